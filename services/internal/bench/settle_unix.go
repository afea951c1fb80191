//go:build unix

package bench

import "syscall"

// syncDisks writes every dirty page of the machine back to its disks (sync(2)).
func syncDisks() { syscall.Sync() }
