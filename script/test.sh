#!/usr/bin/env bash
# The project's test command (README, CI): installs what the build needs on a
# fresh Debian machine, starts the real servers the cluster-mode tests use
# (script/infra.sh, data in a temporary directory, stopped afterwards), then
# runs formatting, lint and every test.
#   script/test.sh            everything
#   script/test.sh --quick    tests only (no fmt/clippy)
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
case "${1:-}" in
  -h|--help)
    sed -n '2,7p' "$0"; exit 0 ;;
  --quick) quick=1 ;;
  "") ;;
  *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
esac

need_apt=()
command -v cc >/dev/null || need_apt+=(build-essential)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
# The build itself needs nothing more (librdkafka builds with its own
# configure script; protoc comes from a crate, see script/protoc).
command -v make >/dev/null || need_apt+=(make)
# The nginx test: TLS for its clients (native-tls), a self-signed
# certificate, and the real nginx.
[[ -e /usr/include/openssl/ssl.h ]] || need_apt+=(libssl-dev)
command -v openssl >/dev/null || need_apt+=(openssl)
[[ -x /usr/sbin/nginx ]] || command -v nginx >/dev/null || need_apt+=(nginx)
# The web pages' tests (tests/web.rs): a real Chromium and its WebDriver.
command -v chromium >/dev/null || need_apt+=(chromium)
command -v chromedriver >/dev/null || need_apt+=(chromium-driver)
if ((${#need_apt[@]})); then
  echo "== installing ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
  echo "cargo not found: install Rust (rustup) first" >&2
  exit 1
fi

if ((quick == 0)); then
  echo "== cargo fmt --check"
  cargo fmt --all -- --check
  echo "== cargo clippy"
  cargo clippy --workspace --all-targets -- -D warnings
fi
infra=$(mktemp -d /tmp/imflow-test-infra.XXXXXX)
stop_infra() { script/infra.sh down "$infra" >/dev/null 2>&1 || true; rm -rf "$infra"; }
trap stop_infra EXIT
echo "== starting the test servers (script/infra.sh up $infra)"
script/infra.sh up "$infra"
# Where infra.sh installed the servers the fault tests start privately.
set -a; eval "$(script/infra.sh paths)"; set +a
echo "== a tansu with SQLite storage for the broker-restart test (built once per machine)"
IMFLOW_TANSU_SQLITE=$(script/infra.sh tansu-sqlite)
export IMFLOW_TANSU_SQLITE

echo "== cargo test (standalone, and the runtime's Kafka edges)"
cargo test --workspace --all-targets
echo "== imflow test: the pipeline tests of the six kinds (tests/pipeline)"
target/debug/imflow test tests/pipeline/*.yaml
echo "== cargo test: the end-to-end tests again on the cluster data plane"
echo "   (Kafka edges, MySQL, MongoDB, Redis of script/infra.sh)"
# --workspace as above: the same package selection unifies features the same
# way, so this pass reuses the first build instead of compiling again.
IMFLOW_TEST_MODE=cluster cargo test --workspace --test protocol --test slow_client --test kafka_mode --test trust --test protocol_v2 --test openapi --test example_kind --test webhook --test before_send --test offline_push --test files --test operator_tools --test reload
