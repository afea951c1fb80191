package sdk

// SetSandboxEnv adds env to the environment of w's sandboxes; call it before Start. A
// test binary's sandbox finds the test's database and NATS server through it.
func SetSandboxEnv(w *Worker, env ...string) { w.sandboxExtraEnv = env }
