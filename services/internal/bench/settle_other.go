//go:build !unix

package bench

// syncDisks has no portable form here: the checkpoint and the pause are all of the settle.
func syncDisks() {}
