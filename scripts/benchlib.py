"""Helpers shared by the benchmark drivers (scripts/bench_daemon.py, scripts/bench_kafka.py)."""
import socket, sys, time, urllib.request


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def metric(port, prefix):
    """The sum of the series starting with `prefix` in a /metrics scrape, or None."""
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return None
    vals = [float(l.rsplit(" ", 1)[1]) for l in body.splitlines() if l.startswith(prefix)]
    return sum(vals) if vals else None


def wait(cond, limit, what, every=0.05):
    """Polls `cond` until it returns something true, or exits after `limit` seconds."""
    end = time.time() + limit
    while time.time() < end:
        v = cond()
        if v:
            return v
        time.sleep(every)
    sys.exit(f"timed out waiting for {what}")
