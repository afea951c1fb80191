package sdk

// failpoint is a named crash point for fault tests; without the kagzi_failpoints build
// tag it compiles to nothing.
func (w *Worker) failpoint(name string) { failpointHook(name) }

var failpointHook = func(string) {}
