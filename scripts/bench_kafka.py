"""Drives tansu, the raw consumer and the release daemon for scripts/bench-kafka.sh."""
import os, shutil, signal, socket, statistics, subprocess, sys, tempfile, time, urllib.request
from benchlib import free_port, metric, wait

BIN = os.path.abspath("target/release/sagawatch")
HELPER = os.path.abspath("target/release/examples/kafka_bench")
bench_dir, runs, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

broker_dir = tempfile.mkdtemp(prefix="tansu-bench-")
kport = free_port()
url = f"tcp://127.0.0.1:{kport}"
brokers = f"127.0.0.1:{kport}"
tansu = subprocess.Popen(["tansu", "broker", "--listener-url", url, "--advertised-listener-url", url,
                          "--storage-engine", "memory://tansu/"], cwd=broker_dir,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    time.sleep(1)
    events_file = os.path.abspath(os.path.join(bench_dir, "checkout-1000000.jsonl"))
    n = int(subprocess.check_output([HELPER, "produce", brokers, events_file, str(limit)]).split()[0])
    print(f"{n} events in topic `events` (3 partitions)")

    raw = []
    for _ in range(runs):
        got, secs, _ = subprocess.check_output([HELPER, "raw", brokers]).split()
        raw.append(int(got) / float(secs))
    print(f"raw rdkafka consumer: {statistics.median(raw):,.0f} events/s (runs: {', '.join(f'{r:,.0f}' for r in raw)})")

    rules = open("rules/orders.yaml").read()
    rates = []
    for i in range(runs):
        d = os.path.join(bench_dir, f"kafka-{i}")
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        open(os.path.join(d, "rules.yaml"), "w").write(rules)
        port = free_port()
        open(os.path.join(d, "c.yaml"), "w").write(
            f"state: state.db\nrules: rules.yaml\nlisten: 127.0.0.1:{port}\n"
            f"time: {{ lateness: 1h, idle: 0s }}\n"
            f"kafka: {{ brokers: '{brokers}', group: bench-{i}-{os.getpid()} }}\n"
            "sources:\n  orders: { type: kafka, topic: events }\n"
            "sinks:\n  saga-commands: { type: kafka, topic: saga-commands }\n  out: { type: stdout }\n")
        p = subprocess.Popen([BIN, "run", "--config", os.path.join(d, "c.yaml")],
                             stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, "stderr.log"), "a"))
        wait(lambda: (metric(port, "sagawatch_kafka_committed_offset") or 0) > 0, 120, "the first commit")
        t0 = time.time()
        c0 = metric(port, "sagawatch_kafka_committed_offset")
        wait(lambda: (metric(port, "sagawatch_kafka_committed_offset") or 0) >= n, 1800, "every event")
        rates.append((n - c0) / (time.time() - t0))
        p.send_signal(signal.SIGTERM)
        p.wait(60)
    med = statistics.median(rates)
    print(f"sagawatch, durable state: {med:,.0f} events/s (runs: {', '.join(f'{r:,.0f}' for r in rates)})")
    print(f"ratio: {100 * med / statistics.median(raw):.0f}% of the raw consumer (target >= 80%)")
finally:
    tansu.kill()
    shutil.rmtree(broker_dir, ignore_errors=True)
