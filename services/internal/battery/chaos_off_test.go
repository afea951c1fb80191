//go:build !chaos

package battery

// chaosByTag is the default of -kagzi.chaos: the gate sizes unless built with -tags chaos.
const chaosByTag = false
