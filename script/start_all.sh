#!/usr/bin/env bash
set -euo pipefail
usage() {
  cat <<USAGE
Usage: script/start_all.sh [options]
Start this host's imflow processes (imflow plan: the pipeline's process
groups, gateway, api) in the background, each under a supervisor that
restarts it if it dies; wait until every one is up; print the table.
$common_options
USAGE
}
source "$(dirname "$0")/cluster-common.sh"
parse_common "$@"
mkdir -p "$run_dir" "$log_dir"
if [[ -n $(running_supervisors) ]]; then
  echo "imflow processes of $host are already running (pid files in $run_dir); run script/stop_all.sh first" >&2
  exit 1
fi
# --strict: a config every process would refuse (secrets) fails here, before
# anything starts.
plan=$("$bin" plan --strict --config "$config" --host "$host")
total=$(wc -l <<<"$plan")
echo "starting $total processes on $host (logs in $log_dir)"
while read -r process index _port; do
  name="$process-$index"
  nohup "$bin" supervise --pid-file "$run_dir/$name.child.pid" -- \
    "$bin" serve --config "$config" --process "$process" --index "$index" --host "$host" \
    >>"$log_dir/$name.log" 2>&1 </dev/null &
  echo $! >"$run_dir/$name.pid"
done <<<"$plan"

deadline=$((SECONDS + timeout))
while :; do
  if "$bin" check --config "$config" --host "$host" --run-dir "$run_dir" --quiet 2>/dev/null; then
    break
  fi
  if ((SECONDS >= deadline)); then
    "$bin" check --config "$config" --host "$host" --run-dir "$run_dir" || true
    echo "not every process came up within ${timeout}s; see the logs in $log_dir" >&2
    exit 1
  fi
  up=$("$bin" check --config "$config" --host "$host" --run-dir "$run_dir" 2>/dev/null | grep -c ' up$' || true)
  echo "  $up/$total up"
  sleep 1
done
"$bin" check --config "$config" --host "$host" --run-dir "$run_dir"
echo "all $total processes of $host are up"
