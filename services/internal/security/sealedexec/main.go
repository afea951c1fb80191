// Command sealedexec is the executor of the payload-encryption test (BATTERY.md S07): the
// reference executor's platform (configuration, zap logging, PostgreSQL and NATS) around
// an SDK worker that hosts the sealedwf workflow with an AEAD codec, as a user's
// executor that encrypts its payloads would be built.
//
//	KAGZI_TEST_CODEC_KEY  32 bytes, hex; empty: no codec (the test's control run)
//
// and the reference executor's environment (docs/configuration.md).
package main

import (
	"context"
	"encoding/hex"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"go.uber.org/fx"
	"go.uber.org/zap"

	"github.com/kagzi/kagzi/libs/sdk"
	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/services/internal/modules"
	"github.com/kagzi/kagzi/services/internal/platform"
	"github.com/kagzi/kagzi/services/internal/security/sealedwf"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "sealedexec:", err)
		os.Exit(1)
	}
}

func run() error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	cfg, err := platform.LoadExecutor(platform.Source{Program: "sealedexec", Args: os.Args[1:], Env: os.LookupEnv, Output: os.Stderr})
	if err != nil {
		return err
	}
	var codec sdk.Codec
	if k := os.Getenv("KAGZI_TEST_CODEC_KEY"); k != "" {
		key, err := hex.DecodeString(k)
		if err != nil {
			return fmt.Errorf("KAGZI_TEST_CODEC_KEY: %w", err)
		}
		if codec, err = sdk.NewAEADCodec(key); err != nil {
			return err
		}
	}
	effects, err := store.Connect(ctx, cfg.Postgres.URL, 2)
	if err != nil {
		return fmt.Errorf("connect effects pool: %w", err)
	}
	defer effects.Close()
	sealedwf.Effects = effects

	app := fx.New(modules.AppOptions(), fx.Supply(cfg.Config, cfg), modules.PlatformModule,
		fx.Invoke(func(lc fx.Lifecycle, pool *pgxpool.Pool, nc *nats.Conn, log *zap.Logger) error {
			w, err := sdk.NewWorker(sdk.WorkerConfig{Pool: pool, Conn: nc, Namespace: cfg.Namespace,
				Concurrency: cfg.Concurrency, Lease: cfg.Lease, ShutdownGrace: cfg.ShutdownGrace,
				LocalSleepMax: cfg.LocalSleepMax, RetryBackoff: 100 * time.Millisecond,
				Logger: platform.NewSlog(log.Named("executor")), Codec: codec, SkipSchemaCheck: true})
			if err != nil {
				return fmt.Errorf("create worker: %w", err)
			}
			if err := w.Register(sealedwf.Workflow); err != nil {
				return fmt.Errorf("register: %w", err)
			}
			lc.Append(fx.Hook{OnStart: w.Start, OnStop: w.Stop})
			return nil
		}))
	if err := app.Err(); err != nil {
		return err
	}
	startCtx, cancel := context.WithTimeout(ctx, app.StartTimeout())
	err = app.Start(startCtx)
	cancel()
	if err != nil {
		return err
	}
	<-ctx.Done()
	stopCtx, cancel := context.WithTimeout(context.Background(), app.StopTimeout())
	defer cancel()
	return app.Stop(stopCtx)
}
