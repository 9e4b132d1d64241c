#!/usr/bin/env bash
# Replay benchmark: generates the checkout saga of rules/orders.yaml (1M orders, ~4.9M
# events, ~1M instances open at once), then reports the parse-only rate (the practical
# limit) and `sagawatch replay` events/s and peak RSS, each the median of RUNS runs, pinned
# to one core. Usage: scripts/bench.sh [ORDERS] [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
orders=${1:-1000000}
runs=${2:-3}
data=${BENCH_DIR:-target/bench}/checkout-$orders.jsonl
mkdir -p "$(dirname "$data")"
cargo build --release --locked --quiet --bin sagawatch --example gen_checkout --example parse_only
[ -f "$data" ] || ./target/release/examples/gen_checkout "$orders" "$data"
pin=(); command -v taskset >/dev/null && pin=(taskset -c 0)
python3 - "$data" "$runs" "${pin[@]}" <<'PY'
import json, os, resource, statistics, subprocess, sys, time
data, runs, pin = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
def child_run(cmd):
    # Peak RSS of exactly this child: fork, exec, wait4.
    t = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.execvp(cmd[0], cmd)
    _, status, ru = os.wait4(pid, 0)
    if status != 0:
        sys.exit(f"{cmd} failed: {status}")
    return time.perf_counter() - t, ru.ru_maxrss / 1024
events = sum(1 for _ in open(data, 'rb'))
parse = [json.loads(subprocess.run(pin + ["./target/release/examples/parse_only", "rules/orders.yaml", data],
         capture_output=True, check=True).stdout)["events_per_s"] for _ in range(runs)]
rep = [child_run(pin + ["./target/release/sagawatch", "replay", "--rules", "rules/orders.yaml", "--source", "orders", data]) for _ in range(runs)]
rates = [events / s for s, _ in rep]
rss = [m for _, m in rep]
print(f"events: {events}")
print(f"parse-only: median {statistics.median(parse):,.0f} events/s")
print(f"replay: median {statistics.median(rates):,.0f} events/s, peak RSS median {statistics.median(rss):.0f} MB")
PY
