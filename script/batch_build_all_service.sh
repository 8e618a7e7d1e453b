#!/usr/bin/env bash
# Build the release binary every imflow process runs (target/release/imflow).
# Prints "all services build success" on success; fails loudly otherwise.
set -uo pipefail
case "${1:-}" in
  -h|--help)
    echo "Usage: script/batch_build_all_service.sh"
    echo "Release build of imflow (every process kind is the same binary)."
    exit 0 ;;
  "") ;;
  *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
if cargo build --release --bin imflow; then
  echo "all services build success"
else
  echo "BUILD FAILED: see the cargo errors above" >&2
  exit 1
fi
