// Package wire holds Kagzi's shared primitives: run statuses, ids, the JSON messages
// that cross NATS, subject and stream names, limits, name validation and the sentinel
// errors that callers act on.
//
// It is the leaf of the module graph: it imports only the standard library and nothing
// of Kagzi's, so every other package (and a client in any language, reading this file)
// can rely on it.
package wire
