#!/usr/bin/env bash
set -euo pipefail
usage() {
  cat <<USAGE
Usage: script/stop_all.sh [options]
Stop this host's imflow processes: SIGTERM (each drains its pipeline and
leaves etcd), then SIGKILL whatever still runs after --timeout seconds.
$common_options
USAGE
}
source "$(dirname "$0")/cluster-common.sh"
timeout=${IMFLOW_STOP_TIMEOUT:-30}
parse_common "$@"
mapfile -t pids < <(running_supervisors)
children=()
for f in "$run_dir"/*.child.pid; do
  [[ -e $f ]] || continue
  pid=$(<"$f")
  kill -0 "$pid" 2>/dev/null && children+=("$pid")
done
if ((${#pids[@]} == 0 && ${#children[@]} == 0)); then
  echo "no imflow process of $host is running"
  rm -f "$run_dir"/*.pid
  exit 0
fi
echo "stopping ${#pids[@]} imflow processes of $host"
((${#pids[@]})) && kill -TERM "${pids[@]}" 2>/dev/null || true
deadline=$((SECONDS + timeout))
while :; do
  left=()
  for pid in "${pids[@]}" "${children[@]}"; do
    kill -0 "$pid" 2>/dev/null && left+=("$pid")
  done
  ((${#left[@]} == 0)) && break
  if ((SECONDS >= deadline)); then
    echo "${#left[@]} processes still running after ${timeout}s; killing them" >&2
    kill -KILL "${left[@]}" 2>/dev/null || true
    break
  fi
  sleep 0.2
done
rm -f "$run_dir"/*.pid
echo "all imflow processes of $host stopped"
