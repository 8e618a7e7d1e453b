#!/usr/bin/env bash
set -euo pipefail
usage() {
  cat <<USAGE
Usage: script/check_all.sh [options]
One line per imflow process of this host: pid, port, up or down. Up means
running, announced in etcd, and /healthz answering. Exits 1 if any is down.
$common_options
USAGE
}
source "$(dirname "$0")/cluster-common.sh"
parse_common "$@"
exec "$bin" check --config "$config" --host "$host" --run-dir "$run_dir"
