//go:build chaos

package battery

// chaosByTag is the default of -kagzi.chaos: built with -tags chaos, the full sizes.
const chaosByTag = true
