package sdk

import "syscall"

// sandboxProcAttr has the kernel kill a sandbox when its executor dies, whatever it is
// doing; its pipe's closing would end it only between two runs. (The signal follows the
// thread that started it, and Go's runtime ends no thread a goroutine has not locked.)
func sandboxProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
