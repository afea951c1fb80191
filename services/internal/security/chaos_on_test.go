//go:build chaos

package security

// chaosByTag is the default of -kagzi.chaos: built with -tags chaos, the chaos tier runs.
const chaosByTag = true
