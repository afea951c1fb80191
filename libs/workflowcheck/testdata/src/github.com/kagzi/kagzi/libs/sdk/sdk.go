// Package sdk is the shape of Kagzi's SDK that the analyzer recognises (test stub).
package sdk

import (
	"context"
	"time"
)

type Context interface {
	context.Context
	Sleep(key string, d time.Duration) error
}

type WorkflowDef[I, O any] struct{}

func Workflow[I, O any](name string, fn func(Context, I) (O, error)) *WorkflowDef[I, O] { return nil }

func Step[T any](ctx Context, key string, fn func(context.Context) (T, error)) (T, error) {
	var zero T
	return zero, nil
}
