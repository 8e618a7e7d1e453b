# Shared by start_all.sh, stop_all.sh and check_all.sh: their options and
# where a host keeps its pid files and logs. Sourced, not run.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
config=${IMFLOW_CONFIG:-config/config.yaml}
host=${IMFLOW_HOST:-127.0.0.1}
bin=${IMFLOW_BIN:-$root/target/release/imflow}
run_dir=""
log_dir=""
timeout=90

parse_common() {
  while (($#)); do
    case "$1" in
      -h|--help) usage; exit 0 ;;
      --config) config=$2; shift 2 ;;
      --host) host=$2; shift 2 ;;
      --bin) bin=$2; shift 2 ;;
      --run-dir) run_dir=$2; shift 2 ;;
      --log-dir) log_dir=$2; shift 2 ;;
      --timeout) timeout=$2; shift 2 ;;
      *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
    esac
  done
  run_dir=${run_dir:-$root/run/$host}
  log_dir=${log_dir:-$root/logs/$host}
  if [[ ! -x $bin ]]; then
    echo "no imflow binary at $bin: run script/batch_build_all_service.sh first (or pass --bin)" >&2
    exit 1
  fi
}

common_options="  --config FILE   cluster config (default config/config.yaml, or IMFLOW_CONFIG)
  --host ADDR     this host's address, one of the config's hosts (default 127.0.0.1, or IMFLOW_HOST)
  --bin PATH      the imflow binary (default target/release/imflow, or IMFLOW_BIN)
  --run-dir DIR   pid files (default run/HOST)
  --log-dir DIR   logs (default logs/HOST)
  --timeout SECS  how long to wait (default 90)"

# Supervisor pids of this host's processes that still run.
running_supervisors() {
  local f pid
  for f in "$run_dir"/*.pid; do
    [[ -e $f && $f != *.child.pid ]] || continue
    pid=$(<"$f")
    kill -0 "$pid" 2>/dev/null && echo "$pid"
  done
  return 0
}
