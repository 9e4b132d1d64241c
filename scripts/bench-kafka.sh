#!/usr/bin/env bash
# Kafka benchmark (issue: Kafka): end-to-end throughput of the daemon consuming a topic
# with durable state, against a plain rdkafka consumer reading the same topic from the same
# broker (the practical limit). Starts tansu (in-memory storage) on a free loopback port.
# Usage: scripts/bench-kafka.sh [RUNS] [EVENTS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
events=${2:-1000000}
dir=${BENCH_DIR:-target/bench}
mkdir -p "$dir"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
tansu --version | grep -qx 'tansu 0.6.0' || { echo "needs tansu 0.6.0 (scripts/test.sh installs it)"; exit 1; }
cargo build --release --locked --quiet --bin sagawatch --example gen_checkout --example kafka_bench
[ -f "$dir/checkout-1000000.jsonl" ] || ./target/release/examples/gen_checkout 1000000 "$dir/checkout-1000000.jsonl"
exec python3 scripts/bench_kafka.py "$dir" "$runs" "$events"
