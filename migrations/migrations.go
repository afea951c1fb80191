// Package migrations embeds Kagzi's PostgreSQL schema as goose SQL files.
//
// It imports only the standard library so that any binary (services, a user's
// executor, the kagzi command) can carry the schema without extra dependencies.
// The runner lives in libs/store.
package migrations

import "embed"

// FS holds the numbered goose migrations, applied in order.
//
//go:embed *.sql
var FS embed.FS
