package bench

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
)

// row is one line of the table.
type row struct {
	name, result, target, verdict, ratio string
}

// verdict says whether every check of a target held.
func verdict(checks ...bool) string {
	for _, ok := range checks {
		if !ok {
			return "MISSED"
		}
	}
	return "met"
}

func writeTable(w io.Writer, rep *Report) {
	var rows []row
	if r := rep.Reference; r != nil {
		rows = append(rows, row{name: "reference", result: fmt.Sprintf("1-row INSERT commits: 1 client %.0f/s (%.3f ms each), 8 clients %.0f/s",
			r.OneClient, r.OneClientMS, r.EightClients), target: "-", verdict: "-", ratio: "1"})
	}
	if r := rep.S1; r != nil {
		rows = append(rows, row{name: "S1 throughput",
			result: fmt.Sprintf("%d runs in %.2f s: %.0f wf/s, %.0f steps/s; start→complete p50 %.0f p95 %.0f p99 %.0f ms; executor peak RSS %s; %.2f PG xacts/run; %d re-dispatched",
				r.Runs, float64(r.Wall), r.WorkflowsPerS, r.StepsPerS, r.Latency.P50, r.Latency.P95, r.Latency.P99, mib(r.ExecutorPeakRSS), r.XactsPerRun, r.Redispatched),
			target:  "≥ 2,900 wf/s (≥ 0.15 × 8-client rate); RSS ≤ 100 MB",
			verdict: verdict(r.WorkflowsPerS >= 2900 || r.RatioTo8Clients >= 0.15, r.ExecutorPeakRSS <= 100_000_000),
			ratio:   ratio(r.RatioTo8Clients, "× 8-client commit rate")})
	}
	if r := rep.S2; r != nil {
		result := fmt.Sprintf("%d sequential runs: start→result p50 %.2f p95 %.2f p99 %.2f ms (server side p50 %.2f ms",
			r.Runs, r.Client.P50, r.Client.P95, r.Client.P99, r.Server.P50)
		if st := r.Stages; st != nil {
			result += fmt.Sprintf(": created→claimed %.2f, claimed→step 1 %.2f, step→step %.2f, last step→finished %.2f",
				st.CreatedToClaimed, st.ClaimedToFirstStep, st.StepToStep, st.LastStepToFinished)
		}
		// The issue's 2.5 ms were set where one commit took 0.18 ms: so many commits is
		// what the same target asks of a machine whose disk is slower or faster.
		vs := ratio(r.P50InCommits, fmt.Sprintf("× one 1-client commit (p50; the issue's machine: 2.5 ms = %.1f ×)", 2.5/issueCommitMS))
		if r.P50InCommitsBeside > 0 {
			result += fmt.Sprintf("; one-row commits between its runs p50 %.3f ms", r.CommitMSBeside)
			beside := fmt.Sprintf("%.3g × one commit between its runs", r.P50InCommitsBeside)
			if r.P50InCommits > 0 {
				beside += ", " + vs
			}
			vs = beside
		}
		rows = append(rows, row{name: "S2 latency",
			result:  result + ")",
			target:  "p50 ≤ 2.5 ms, p99 ≤ 5 ms",
			verdict: verdict(r.Client.P50 <= 2.5, r.Client.P99 <= 5),
			ratio:   vs})
	}
	if r := rep.S3; r != nil {
		path := func(p SleepPath) string {
			out := fmt.Sprintf("p50 %.1f p99 %.1f max %.1f ms", p.Lateness.P50, p.Lateness.P99, p.Lateness.Max)
			if t := p.TimerPart; t != nil {
				out += fmt.Sprintf(" (queued at the wake time %+.1f ms p50, %+.1f ms p99)", t.P50, t.P99)
			}
			if p.Early > 0 {
				out += fmt.Sprintf(", %d WOKE EARLY", p.Early)
			}
			return out + redispatched(p.Redispatched)
		}
		met := func(p SleepPath) bool {
			return p.Lateness.P50 <= 5 && p.Lateness.P99 <= 20 && p.Lateness.Max <= 100 && p.Early == 0
		}
		rows = append(rows, row{name: "S3 durable sleep",
			result: fmt.Sprintf("%d runs sleeping %s, lateness with the executor's defaults: %s; with every sleep parked for the timer: %s",
				r.Runs, r.Sleep, path(r.Defaults), path(r.Parked)),
			target:  "p50 ≤ 5, p99 ≤ 20, max ≤ 100 ms (both)",
			verdict: verdict(met(r.Defaults), met(r.Parked)),
			ratio:   "-"})
	}
	if r := rep.S4; r != nil {
		note := ""
		if !r.AllInStep2 {
			note = fmt.Sprintf("; only %d of %d runs were inside step 2 at the kill", r.InsideAtKill, r.Runs)
		}
		rows = append(rows, row{name: "S4 crash recovery",
			result: fmt.Sprintf("%d runs, lease %s, step 2 %s: all completed %.2f s after kill -9; completed steps re-run %d, interrupted steps re-run %d/%d, later steps re-run %d%s",
				r.Runs, r.Lease, r.Step2, float64(r.Recovery), r.CompletedRerun, r.Interrupted, r.Runs, r.LaterRerun, note),
			target:  fmt.Sprintf("≤ %s (lease + step 2 + 1 s), 0 completed re-run", r.Target),
			verdict: verdict(r.Recovery <= r.Target, r.CompletedRerun == 0, r.LaterRerun == 0, r.AllInStep2),
			ratio:   "-"})
	}
	if r := rep.S5; r != nil && rep.Errors[S5Sleepers] == "" {
		asleep := "all asleep at once"
		if !r.AllAsleepAtOnce {
			asleep = fmt.Sprintf("at most %d asleep at once", r.PeakAsleep)
		}
		scaled := ""
		if r.ScaledFrom > 0 {
			scaled = fmt.Sprintf(" (SCALED DOWN from %d to fit the time budget)", r.ScaledFrom)
		}
		rows = append(rows, row{name: "S5 sleeping scale",
			result: fmt.Sprintf("%d sleepers%s, %s after %.0f s: executor RSS %s at %d (probe), %s at %d → %s at %d, timer %s → %s; %.0f PG bytes/run; woke and finished all in %.1f s (%.0f/s)%s",
				r.Sleepers, scaled, asleep, float64(r.StartPhase), mib(r.First.Executor), r.First.Sleepers, mib(r.Quarter.Executor), r.Quarter.Sleepers,
				mib(r.All.Executor), r.All.Sleepers, mib(r.Quarter.Timer), mib(r.All.Timer), r.PGBytesPerRun, float64(r.WakeToFinish), r.FinishPerS, redispatched(r.Redispatched)),
			target: "RSS independent of sleepers; ≤ 2 KB PG/run",
			// "Independent" allows the noise of a Go heap: within 25% or 8 MiB.
			verdict: verdict(flat(r.Quarter.Executor, r.All.Executor), flat(r.Quarter.Timer, r.All.Timer), r.PGBytesPerRun <= 2048, r.AllAsleepAtOnce),
			ratio:   ratio(r.RatioTo8Clients, "× 8-client commit rate (finishing)")})
	}
	if r := rep.S6; r != nil {
		var per []string
		for _, name := range []string{"scheduler", "timer", "executor"} {
			per = append(per, fmt.Sprintf("%s %.2f", name, float64(r.CPUPerService[name])))
		}
		rows = append(rows, row{name: "S6 idle cost",
			result: fmt.Sprintf("%.0f s idle: %d PG transactions (%.1f/min); CPU %.2f s (%.3f s/min: %s)",
				float64(r.Window), r.Transactions, r.PerMinute, float64(r.CPU), float64(r.CPUPerMinute), strings.Join(per, ", ")),
			target:  "≤ 10 queries/min",
			verdict: verdict(r.PerMinute <= 10),
			ratio:   "-"})
	}
	for _, name := range append([]string{"reference"}, AllScenarios...) {
		if msg, ok := rep.Errors[name]; ok {
			first, _, _ := strings.Cut(msg, "\n")
			rows = append(rows, row{name: strings.ToUpper(name[:1]) + name[1:], result: "FAILED: " + first, target: "-", verdict: "FAILED", ratio: "-"})
		}
	}

	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "SCENARIO\tRESULT\tTARGET (issue 4)\tVERDICT\tVS REFERENCE")
	for _, r := range rows {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", r.name, r.result, r.target, r.verdict, r.ratio)
	}
	_ = tw.Flush()
	fmt.Fprintf(w, "\n%d CPUs, %s, %s; NATS: %s; whole bench %.0f s; load average %s before, %s after\n",
		rep.Machine.CPUs, rep.Machine.OS, rep.Machine.Postgres, rep.Machine.NATS, float64(rep.Duration),
		rep.Machine.LoadBefore, rep.Machine.LoadAfter)
}

func redispatched(n int) string {
	if n == 0 {
		return ""
	}
	return fmt.Sprintf("; %d re-dispatched while queued", n)
}

// issueCommitMS is the one-client commit time of the machine issue 4's targets were set
// on ("about 5,500 times a second from 1 client (0.18 ms)").
const issueCommitMS = 0.18

func ratio(v float64, unit string) string {
	if v == 0 {
		return "-"
	}
	return fmt.Sprintf("%.3g %s", v, unit)
}

// flat says two resident sizes are the same but for heap noise.
func flat(before, after int64) bool {
	return after <= before+before/4 || after-before <= 8<<20
}
