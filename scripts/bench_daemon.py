"""Drives the release daemon for the benchmarks of scripts/bench-daemon.sh."""
import calendar, json, os, shutil, signal, socket, statistics, subprocess, sys, threading, time, urllib.request
from benchlib import free_port, metric, wait

BIN = os.path.abspath(os.environ.get("SAGAWATCH_BIN", "target/release/sagawatch"))
bench_dir, runs, open_n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def ready(port):
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5).status == 200
    except OSError:
        return False

def hwm(pid):
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmHWM:"):
            return int(l.split()[1]) / 1024
    return 0

def written(pid):
    """Bytes the process has caused to be written to disk (WAL frames and checkpoints)."""
    for l in open(f"/proc/{pid}/io"):
        if l.startswith("write_bytes:"):
            return int(l.split()[1])
    return 0

def core_cpu(pid):
    """CPU seconds of the core thread (engine and SQLite writer)."""
    for t in os.listdir(f"/proc/{pid}/task"):
        if open(f"/proc/{pid}/task/{t}/comm").read().strip() == "sagawatch-core":
            f = open(f"/proc/{pid}/task/{t}/stat").read().rsplit(")", 1)[1].split()
            return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    return 0

def setup(name, rules, config):
    d = os.path.join(bench_dir, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    open(os.path.join(d, "rules.yaml"), "w").write(rules)
    port = free_port()
    open(os.path.join(d, "c.yaml"), "w").write(f"state: state.db\nrules: rules.yaml\nlisten: 127.0.0.1:{port}\n{config}")
    return d, port

def start(d, stdout=subprocess.DEVNULL):
    return subprocess.Popen([BIN, "run", "--config", os.path.join(d, "c.yaml")], stdout=stdout,
                            stderr=open(os.path.join(d, "stderr.log"), "a"))

def stop(p):
    p.send_signal(signal.SIGTERM)
    if p.wait(60) != 0:
        sys.exit("daemon did not exit cleanly")

# BENCH_PARTS (default "1234") picks the parts to run.
parts = os.environ.get("BENCH_PARTS", "1234")

if "1" in parts:
    # 1. Sustained throughput from a file source with durable state: default batches (100ms),
    #    then 1s batches (a row changed several times in a batch is written once), then
    #    default batches each synced to disk (`batch.sync: full`: an fsync per commit).
    events_file = os.path.abspath(os.path.join(bench_dir, "checkout-1000000.jsonl"))
    n_events = sum(1 for _ in open(events_file, "rb"))
    for label, batch in [("default batches", ""), ("batch.interval 1s", "batch: { interval: 1s, events: 500000 }\n"),
                         ("batch.sync full", "batch: { sync: full }\n")]:
        rates, rss, wbytes, cpu = [], [], [], []
        for _ in range(runs):
            d, port = setup("throughput", open("rules/orders.yaml").read(),
                            f"time: {{ idle: 0s }}\n{batch}sources: {{ orders: {{ type: file, path: {events_file} }} }}\n"
                            "sinks: { saga-commands: { type: stdout }, out: { type: stdout } }\n")
            p = start(d)
            wait(lambda: ready(port), 30, "ready")
            t = time.time()
            wait(lambda: metric(port, "sagawatch_events_received_total") == n_events, 600, "all events")
            rates.append(n_events / (time.time() - t))
            rss.append(hwm(p.pid))
            # Wall time on a shared machine moves with its disk; these two do not much.
            wbytes.append(written(p.pid) / n_events)
            cpu.append(core_cpu(p.pid) / n_events * 1e6)
            stop(p)
        print(f"file source, durable state, {label}: {n_events} events, median {statistics.median(rates):,.0f} events/s, "
              f"core thread {statistics.median(cpu):.1f} µs CPU and {statistics.median(wbytes):,.0f} bytes written per event, "
              f"peak RSS median {statistics.median(rss):.0f} MB", flush=True)

if "2" in parts:
    # 2. Open instances: peak RSS while they accumulate, then restart-to-ready time.
    rules = """rules:
      - name: open
        trigger: { where: { type: Opened }, key: id }
        expect:
          - step: done
            where: { type: Done }
            key: id
            within: 7d
    """
    d, port = setup("open", rules, "time: { idle: 0s }\nsources: { events: { type: file, path: events.jsonl } }\nsinks: { out: { type: stdout } }\n")
    with open(os.path.join(d, "events.jsonl"), "w") as f:
        base = 1767225600
        for i in range(open_n):
            s = base + i // 10000
            f.write('{"time":"%s","type":"Opened","id":"k%09d"}\n' % (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(s)), i))
    p = start(d)
    wait(lambda: ready(port), 30, "ready")
    t = time.time()
    wait(lambda: metric(port, "sagawatch_open_instances") == open_n, 3600, "all instances open")
    fill = open_n / (time.time() - t)
    peak = hwm(p.pid)
    stop(p)
    restarts = []
    for _ in range(runs):
        t = time.time()
        p = start(d)
        wait(lambda: ready(port), 60, "ready after restart")
        restarts.append(time.time() - t)
        assert metric(port, "sagawatch_open_instances") == open_n
        stop(p)
    print(f"{open_n:,} open instances: filled at {fill:,.0f} events/s, peak RSS {peak:.0f} MB, "
          f"restart to ready median {statistics.median(restarts):.3f} s")

if "3" in parts:
    # 3. Timer latency: 1M open timers (1h), then probes that go missing after 2s (wall clock).
    rules = """rules:
      - name: long
        trigger: { where: { type: Long }, key: id }
        expect: [ { step: done, where: { type: Done }, key: id, within: 1h } ]
      - name: probe
        trigger: { where: { type: Probe }, key: id }
        expect: [ { step: done, where: { type: Done }, key: id, within: 2s } ]
        on_missing: [ { alert: { severity: info, summary: "probe {{key}} missing" } } ]
    """
    d, port = setup("timers", rules, "time: { clock: wall }\nsources: { events: { type: file, path: events.jsonl } }\nsinks: { out: { type: stdout } }\n")
    timers = 1_000_000
    with open(os.path.join(d, "events.jsonl"), "w") as f:
        for i in range(timers):
            f.write('{"type":"Long","id":"l%d"}\n' % i)
    p = start(d, stdout=subprocess.PIPE)
    arrivals = {}
    def reader():
        for line in p.stdout:
            v = json.loads(line)
            if v.get("rule") == "probe":
                arrivals[v["key"]] = (time.time(), v["deadline"])
    threading.Thread(target=reader, daemon=True).start()
    wait(lambda: ready(port), 30, "ready")
    wait(lambda: metric(port, "sagawatch_open_instances") == timers, 600, "timers open")
    probes = 300
    with open(os.path.join(d, "events.jsonl"), "a") as f:
        for i in range(probes):
            f.write('{"type":"Probe","id":"p%d"}\n' % i)
            f.flush()
            time.sleep(0.01)
    wait(lambda: len(arrivals) == probes, 120, "probe alerts")
    def parse(ts):
        main, frac = ts.rstrip("Z").split(".") if "." in ts else (ts.rstrip("Z"), "0")
        return calendar.timegm(time.strptime(main, "%Y-%m-%dT%H:%M:%S")) + float("0." + frac)
    lat = sorted(a - parse(dl) for a, dl in arrivals.values())
    stop(p)
    p99 = lat[int(len(lat) * 0.99) - 1]
    print(f"{timers:,} open timers: missing reported after its deadline: median {statistics.median(lat)*1000:.0f} ms, p99 {p99*1000:.0f} ms")


if "4" in parts:
    # 4. Mass expiry: 1M open deadlines that the clock passes at once (an upstream outage,
    #    a long stop). Peak RSS before and after, and how long until every alert is out.
    rules = """rules:
      - name: mass
        trigger: { where: { type: Opened }, key: id }
        expect: [ { step: done, where: { type: Done }, key: id, within: 1h } ]
        on_missing: [ { alert: { severity: warning, summary: "{{key}} missing" } } ]
    """
    d, port = setup("mass", rules, "time: { idle: 0s }\nsources: { events: { type: file, path: events.jsonl } }\n"
                    "sinks: { out: { type: stdout } }\nalerts: { sinks: [out] }\n")
    n = 1_000_000
    with open(os.path.join(d, "events.jsonl"), "w") as f:
        base = 1767225600
        for i in range(n):
            f.write('{"time":"%s","type":"Opened","id":"k%09d"}\n' % (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(base + i // 10000)), i))
    p = start(d, stdout=subprocess.PIPE)
    printed = [0]
    def reader():
        for _ in p.stdout:
            printed[0] += 1
    threading.Thread(target=reader, daemon=True).start()
    wait(lambda: ready(port), 30, "ready")
    wait(lambda: metric(port, "sagawatch_open_instances") == n, 600, "all instances open")
    before = hwm(p.pid)
    t = time.time()
    with open(os.path.join(d, "events.jsonl"), "a") as f:
        f.write('{"time":"%s","type":"Later","id":"x"}\n' % time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(base + 86400)))
    wait(lambda: metric(port, "sagawatch_open_instances") == 0, 600, "every deadline fired")
    fired = time.time() - t
    wait(lambda: printed[0] == n, 600, "every alert printed")
    out = time.time() - t
    after = hwm(p.pid)
    stop(p)
    print(f"{n:,} deadlines passed at once: all fired and committed in {fired:.1f} s, all alerts on stdout after {out:.1f} s "
          f"({n / out:,.0f}/s); peak RSS {before:.0f} MB before, {after:.0f} MB after")
