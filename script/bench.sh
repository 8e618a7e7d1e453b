#!/usr/bin/env bash
# Run a load test against a fresh standalone imflow server.
#
#   script/bench.sh SCENARIO [imflow-bench options]
#
# Builds imflow and imflow-bench in release mode, starts the server on
# loopback with an empty data directory, runs the scenario (its progress on
# stderr, a summary on stdout), and stops the server. The seed's two tests:
#
#   script/bench.sh single --clients 10000 --rate 2300 --duration 60 --report benches/results/seed-single.json
#   script/bench.sh group --members 10000 --online 1000 --rate 500 --duration 60 --report benches/results/seed-group.json
#
# Scenarios: single, group, connections; `imflow-bench SCENARIO --help` lists
# the options (--find-max among them). Environment:
#   BENCH_GATEWAY  WebSocket listen address (default 127.0.0.1:10001)
#   BENCH_API      REST listen address      (default 127.0.0.1:10002)
#   BENCH_CONFIG   server config file       (default: config/standalone.yaml)
#   BENCH_SERVER   the imflow binary to serve (default: this tree's release
#                  build); another commit's build, with that commit's
#                  BENCH_CONFIG, measures it with this load generator, e.g.
#                  before and after a change, side by side
#   BENCH_PIPELINE another pipeline file for the server (the config's
#                  `pipeline:` replaced), e.g. one with a webhook stage:
#                  run `imflow-bench receive-webhooks` beside it
#   BENCH_KEEP_DATA=1  keep the data directory and server log afterwards
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $# -eq 0 || "$1" == "-h" || "$1" == "--help" ]]; then
  sed -n '2,/^[^#]/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 0
fi

gateway=${BENCH_GATEWAY:-127.0.0.1:10001}
api=${BENCH_API:-127.0.0.1:10002}
config=${BENCH_CONFIG:-config/standalone.yaml}
secret=bench-admin-secret

echo "== building (release)" >&2
cargo build --release -q -p imflow -p imflow-bench

# Another server on these ports would answer the health check and take the
# load in this one's place (which then fails to bind): refuse up front. curl
# exits 7 when nothing listens; anything else means the port is taken.
for addr in "$api" "$gateway"; do
  rc=0
  curl -s -o /dev/null --max-time 2 "http://$addr/" || rc=$?
  if [[ $rc -ne 7 ]]; then
    echo "something already listens on $addr (another imflow?); stop it or set BENCH_API and BENCH_GATEWAY" >&2
    exit 1
  fi
done

data=$(mktemp -d /tmp/imflow-bench.XXXXXX)
if [[ -n "${BENCH_PIPELINE:-}" ]]; then
  [[ -f "$BENCH_PIPELINE" ]] || { echo "BENCH_PIPELINE: no file $BENCH_PIPELINE" >&2; exit 2; }
  sed "s|^pipeline:.*|pipeline: $(realpath "$BENCH_PIPELINE")|" "$config" >"$data/config.yaml"
  config=$data/config.yaml
fi
ulimit -n "$(ulimit -Hn)"
server=${BENCH_SERVER:-./target/release/imflow}
IMFLOW_ADMIN_SECRET=$secret IMFLOW_LOG=${IMFLOW_LOG:-warn} "$server" serve \
  --config "$config" --data-dir "$data/data" --gateway-addr "$gateway" --api-addr "$api" \
  >"$data/server.log" 2>&1 &
pid=$!
cleanup() {
  kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  if [[ "${BENCH_KEEP_DATA:-0}" == 1 ]]; then
    echo "kept $data (server.log inside)" >&2
  else
    rm -rf "$data"
  fi
}
trap cleanup EXIT

for _ in $(seq 1 100); do
  if curl -sf "http://$api/healthz" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "server failed to start:" >&2; cat "$data/server.log" >&2; exit 1
  fi
  sleep 0.1
done
echo "== server pid $pid on ws://$gateway/ws and http://$api" >&2

./target/release/imflow-bench --api "http://$api" --ws "ws://$gateway/ws" \
  --admin-secret "$secret" --server-pid "$pid" "$@"
