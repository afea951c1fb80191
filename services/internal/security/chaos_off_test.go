//go:build !chaos

package security

// chaosByTag is the default of -kagzi.chaos: the gate tier unless built with -tags chaos.
const chaosByTag = false
