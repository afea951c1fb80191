//go:build !linux

package sdk

import "syscall"

// sandboxProcAttr: outside Linux a sandbox outlives a dead executor until its run ends
// and it reads its closed pipe; its writes are fenced meanwhile.
func sandboxProcAttr() *syscall.SysProcAttr { return nil }
