#!/usr/bin/env bash
# make demo: build bin/kagzi, run `kagzi dev` in the background (logs in .kagzi/dev.log),
# wait until it is ready, run examples/simple against it and stop it.
#
# Honours DATABASE_URL and NATS_URL: with NATS_URL set, kagzi dev uses that server
# instead of its embedded one. The example gets the NATS URL kagzi dev actually used,
# which differs from the default when port 4222 was taken.
set -euo pipefail

cd "$(dirname "$0")/.."
export PATH="/usr/local/go/bin:$PATH"

http_addr=127.0.0.1:9100
log=.kagzi/dev.log
mkdir -p .kagzi bin

# readyz prints nothing and succeeds when kagzi dev's /readyz answers 200.
readyz() {
	if command -v curl >/dev/null; then
		curl -fsS -o /dev/null --max-time 2 "http://$http_addr/readyz"
	else
		# No curl: speak HTTP/1.0 through bash's /dev/tcp.
		local status
		exec 3<>"/dev/tcp/${http_addr%:*}/${http_addr#*:}" || return 1
		printf 'GET /readyz HTTP/1.0\r\nHost: %s\r\n\r\n' "$http_addr" >&3
		read -r _ status _ <&3 || true
		exec 3<&- 3>&-
		[ "$status" = 200 ]
	fi
} 2>/dev/null

if readyz; then
	echo "demo: something already answers on $http_addr (another kagzi dev?); stop it first" >&2
	exit 1
fi

echo "demo: building bin/kagzi"
make --no-print-directory build BINS=kagzi

echo "demo: starting kagzi dev (logs: $log)"
bin/kagzi dev --http-addr "$http_addr" >"$log" 2>&1 &
dev_pid=$!

stop_dev() {
	if kill -0 "$dev_pid" 2>/dev/null; then
		echo "demo: stopping kagzi dev"
		kill -INT "$dev_pid"
		wait "$dev_pid" || true
	fi
}
trap stop_dev EXIT

for _ in $(seq 1 300); do # 60 s: the first run creates and migrates the database
	if ! kill -0 "$dev_pid" 2>/dev/null; then
		echo "demo: kagzi dev exited; its log:" >&2
		cat "$log" >&2
		exit 1
	fi
	readyz && break
	sleep 0.2
done
if ! readyz; then
	echo "demo: kagzi dev not ready after 60s; its log:" >&2
	cat "$log" >&2
	exit 1
fi

NATS_URL=$(grep -o 'NATS_URL=[^[:space:]]*' "$log" | head -n 1 | cut -d= -f2-)
if [ -z "$NATS_URL" ]; then
	echo "demo: kagzi dev printed no NATS_URL; its log:" >&2
	cat "$log" >&2
	exit 1
fi
export NATS_URL
echo "demo: kagzi dev is ready, NATS_URL=$NATS_URL"

echo "demo: go run ./examples/simple"
if ! timeout 300 go run ./examples/simple; then
	echo "demo: the example failed; kagzi dev's log is in $log" >&2
	exit 1
fi
