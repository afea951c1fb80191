package bench

import (
	"context"
	"time"
)

// settlePause is how long the machine idles after its writes are flushed, before a
// scenario or the reference starts.
const settlePause = time.Second

// settle lets the machine finish the writes of whatever ran before a scenario (or the
// reference): PostgreSQL's checkpoint of its dirty buffers, where the bench's role may
// ask for one (superuser or pg_checkpoint; refused otherwise, and the rest still helps),
// then the kernel's writeback of every dirty page (syncDisks), then a pause. Without it a
// scenario pays for its predecessor's writes: S2 right after S1 ran 0.4–0.5 ms slower at
// the median than after a settle, and so did the commits made between its runs (0.33–0.36
// ms against 0.29–0.30).
func (b *bencher) settle(ctx context.Context) {
	if conn, err := adminConn(ctx, b.cfg.DatabaseURL); err == nil {
		if _, err := conn.Exec(ctx, "CHECKPOINT"); err != nil {
			b.progress("settle: no checkpoint (%v); the kernel's writeback goes on", err)
		}
		_ = conn.Close(ctx)
	}
	syncDisks()
	t := time.NewTimer(settlePause)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}
