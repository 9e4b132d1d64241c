#!/usr/bin/env bash
# Daemon benchmarks (issue: durable state): sustained file-source throughput with SQLite
# state, peak RSS and restart-to-ready time with 10M open instances, and how soon a
# missing step is reported after its deadline with 1M open timers, and peak RSS when 1M
# deadlines pass at once. Medians of RUNS runs (parts 1 and 2).
# Usage: [BENCH_PARTS=1234] scripts/bench-daemon.sh [RUNS] [OPEN_INSTANCES]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
open=${2:-10000000}
dir=${BENCH_DIR:-target/bench}
mkdir -p "$dir"
cargo build --release --locked --quiet --bin sagawatch --example gen_checkout
[ -f "$dir/checkout-1000000.jsonl" ] || ./target/release/examples/gen_checkout 1000000 "$dir/checkout-1000000.jsonl"
exec python3 scripts/bench_daemon.py "$dir" "$runs" "$open"
