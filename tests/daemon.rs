//! The daemon end to end: the real binary on a real SQLite file, fed through its file and
//! HTTP sources, delivering to a webhook receiver that verifies signatures; checked
//! against `replay` of the same events. Also crashes, receiver outages and bad input.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;

fn hook_config(extra: &str) -> String {
    format!(
        "time: {{ idle: 0s }}\nbatch: {{ events: 500, interval: 20ms }}\n\
         sinks:\n  hook: {{ type: webhook, url: 'http://127.0.0.1:${{HOOK_PORT}}/hook', secrets: ['${{WEBHOOK_SECRET}}'], timeout: 2s }}\n\
         alerts: {{ sinks: [hook] }}\n\
         outbox: {{ backoff: 50ms, max_backoff: 300ms }}\n{extra}"
    )
}

/// Replaces the receiver port placeholder (the daemon reads `${HOOK_PORT}` from its
/// config; tests write it literally to keep the environment simple).
fn with_port(cfg: &str, port: u16) -> String {
    cfg.replace("${HOOK_PORT}", &port.to_string())
}

/// A daemon delivering to a webhook receiver, with `events` generated checkout events in
/// `events.jsonl` and what `replay` reports for them.
struct Hooked {
    rx: Receiver,
    d: Daemon,
    lines: Vec<String>,
    want: std::collections::BTreeMap<String, serde_json::Value>,
    late: usize,
}

fn hooked(extra: &str, events: usize, seed: u64, receiver_up: bool) -> Hooked {
    let hook = free_port();
    let mut rx = Receiver::new(hook);
    if receiver_up {
        rx.start();
    }
    let d = Daemon::new(&with_port(&hook_config(extra), hook));
    let lines = checkout_events(events, seed);
    write_lines(&d.path("events.jsonl"), &lines);
    let (want, late) = replay(&d.path("rules"), &d.path("events.jsonl"));
    Hooked {
        rx,
        d,
        lines,
        want,
        late,
    }
}

const FILE_SOURCE: &str = "sources:\n  events: { type: file, path: events.jsonl }\n";

fn wait_delivered(d: &Daemon, rx: &Receiver, want: usize, limit: Duration) {
    wait_for(limit, "every message to be delivered", || {
        let backlog = metric(d.port, "sagawatch_outbox_backlog")?;
        (distinct(rx) >= want && backlog == 0.0).then_some(())
    });
}

#[test]
fn file_source_delivers_what_replay_reports() {
    let Hooked {
        rx,
        mut d,
        lines,
        want,
        late,
    } = hooked(FILE_SOURCE, 3000, 7, true);
    assert!(
        want.len() > 100 && late > 10,
        "workload has misses and lates"
    );
    d.start();
    wait_delivered(&d, &rx, want.len() + late, Duration::from_secs(60));
    let got = rx.received();
    assert_matches_replay(&got, &want, late);
    let ua = format!("sagawatch/{}", env!("CARGO_PKG_VERSION"));
    assert!(
        got.iter().all(|r| r.user_agents == [ua.as_str()]),
        "{:?}",
        got[0].user_agents
    );
    assert_eq!(
        metric(d.port, "sagawatch_events_received_total"),
        Some(lines.len() as f64)
    );
    assert_eq!(d.terminate(), 0, "{}", d.stderr());
}

#[test]
fn file_source_follows_appends_and_rotation() {
    let hook = free_port();
    let mut rx = Receiver::new(hook);
    rx.start();
    let cfg = with_port(
        &hook_config("sources:\n  events: { type: file, path: events.jsonl }\n"),
        hook,
    );
    let mut d = Daemon::new(&cfg);
    let lines = checkout_events(2000, 11);
    let (a, rest) = lines.split_at(700);
    let (b, c) = rest.split_at(600);
    write_lines(&d.path("all.jsonl"), &lines);
    let (want, late) = replay(&d.path("rules"), &d.path("all.jsonl"));
    // First part, then an append, then rotation (rename and recreate) with the rest.
    write_lines(&d.path("events.jsonl"), a);
    d.start();
    wait_for(Duration::from_secs(30), "the first part to be read", || {
        (metric(d.port, "sagawatch_events_received_total")? == a.len() as f64).then_some(())
    });
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(d.path("events.jsonl"))
            .unwrap();
        for l in b {
            writeln!(f, "{l}").unwrap();
        }
    }
    wait_for(Duration::from_secs(30), "the append to be read", || {
        (metric(d.port, "sagawatch_events_received_total")? == (a.len() + b.len()) as f64)
            .then_some(())
    });
    std::fs::rename(d.path("events.jsonl"), d.path("events.jsonl.1")).unwrap();
    write_lines(&d.path("events.jsonl"), c);
    wait_delivered(&d, &rx, want.len() + late, Duration::from_secs(60));
    assert_matches_replay(&rx.received(), &want, late);
    assert_eq!(
        metric(d.port, "sagawatch_events_received_total"),
        Some(lines.len() as f64)
    );
    // A restart resumes from the stored offset: nothing is read twice, only what is
    // appended after it.
    assert_eq!(d.terminate(), 0);
    d.start();
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(d.path("events.jsonl"))
            .unwrap();
        writeln!(f, "{}", c[c.len() - 1]).unwrap();
    }
    wait_for(
        Duration::from_secs(30),
        "the appended line to be read",
        || (metric(d.port, "sagawatch_events_received_total")? >= 1.0).then_some(()),
    );
    assert_eq!(metric(d.port, "sagawatch_events_received_total"), Some(1.0));
    assert_eq!(d.terminate(), 0);
}

/// A bad line in a file is logged with the byte offset where it starts, so that it can
/// be found in a large file.
#[test]
fn bad_lines_are_logged_with_their_offset() {
    let mut d = Daemon::new(
        "sources: { events: { type: file, path: events.jsonl } }\nsinks: { hook: { type: stdout } }\n",
    );
    let good = r#"{"time":"2026-01-01T00:00:00Z","type":"X"}"#;
    let text = format!("{good}\n{{bad\n\n{{\"type\":\"X\"}}\n");
    std::fs::write(d.path("events.jsonl"), &text).unwrap();
    d.start();
    wait_for(Duration::from_secs(30), "the file to be read", || {
        (metric(d.port, "sagawatch_events_received_total")? == 3.0).then_some(())
    });
    assert_eq!(d.terminate(), 0);
    let err = d.stderr();
    let bad = good.len() + 1;
    let no_time = bad + "{bad\n\n".len();
    for offset in [bad, no_time] {
        assert!(
            err.lines()
                .any(|l| l.contains("skipped a bad line")
                    && l.contains(&format!("offset={offset} "))),
            "offset {offset}:\n{err}"
        );
    }
}

/// A source of garbage does not flood the log: each source logs 10 bad lines per window,
/// and says how many more it skipped (at the latest when it stops); all are counted.
#[test]
fn bad_lines_are_logged_at_a_bounded_rate() {
    let mut d = Daemon::new(
        "sources: { events: { type: file, path: events.jsonl } }\nsinks: { hook: { type: stdout } }\n",
    );
    let mut bytes = Vec::new();
    for _ in 0..50 {
        bytes.extend_from_slice(b"{bad\n");
    }
    for _ in 0..30 {
        bytes.extend_from_slice(b"\xff\xfe\n");
    }
    std::fs::write(d.path("events.jsonl"), &bytes).unwrap();
    d.start();
    // Received as read, rejected once the core has looked at them: both, in time.
    wait_for(Duration::from_secs(30), "the file to be read", || {
        (metric(d.port, "sagawatch_events_received_total")? == 80.0
            && metric(d.port, "sagawatch_events_rejected_total")? == 80.0)
            .then_some(())
    });
    assert_eq!(d.terminate(), 0);
    let err = d.stderr();
    let count = |s: &str| err.lines().filter(|l| l.contains(s)).count();
    assert_eq!(count("skipped a bad line"), 10, "{err}");
    assert_eq!(count("skipped a line that is not UTF-8"), 10, "{err}");
    assert_eq!(
        count("skipped 40 more lines that are not events"),
        1,
        "{err}"
    );
    assert_eq!(
        count("skipped 20 more oversized or non-UTF-8 lines"),
        1,
        "{err}"
    );
}

#[test]
fn http_source_delivers_what_replay_reports() {
    let Hooked {
        rx,
        mut d,
        lines,
        want,
        late,
    } = hooked(
        "token: s3cret\nsources:\n  api: { type: http }\n",
        2500,
        3,
        true,
    );
    d.start();
    let auth = [("authorization", "Bearer s3cret")];
    // The same stream in NDJSON chunks, JSON arrays and single objects.
    let mut sent = 0;
    for (n, chunk) in lines.chunks(97).enumerate() {
        let body = match n % 3 {
            0 => chunk.join("\n"),
            1 => format!("[{}]", chunk.join(",")),
            _ => {
                for l in chunk {
                    let (st, b) = http(d.port, "POST", "/v1/events", &auth, l.as_bytes()).unwrap();
                    assert_eq!(st, 202, "{b}");
                }
                sent += chunk.len();
                continue;
            }
        };
        let (st, b) = http(d.port, "POST", "/v1/events", &auth, body.as_bytes()).unwrap();
        assert_eq!(st, 202, "{b}");
        assert_eq!(b, format!(r#"{{"accepted":{}}}"#, chunk.len()));
        sent += chunk.len();
    }
    assert_eq!(sent, lines.len());
    wait_delivered(&d, &rx, want.len() + late, Duration::from_secs(60));
    assert_matches_replay(&rx.received(), &want, late);
    assert_eq!(d.terminate(), 0);
}

#[test]
fn sigkill_at_random_moments_loses_nothing_and_invents_nothing() {
    let Hooked {
        rx,
        mut d,
        lines: _,
        want,
        late,
    } = hooked(FILE_SOURCE, 200_000, 42, true);
    let mut rng = Lcg(2024);
    let mut kills = 0;
    d.start();
    while kills < 12 {
        // A random moment: after a random number of received deliveries or a random
        // amount of progress, whichever the daemon reaches first.
        let target = distinct(&rx) + 1 + rng.below(300) as usize;
        let progress = rng.below(15_000) as f64;
        let start = metric(d.port, "sagawatch_events_received_total").unwrap_or(0.0);
        wait_for(Duration::from_secs(60), "progress before a kill", || {
            let now = metric(d.port, "sagawatch_events_received_total").unwrap_or(0.0);
            (distinct(&rx) >= target || now - start >= progress || distinct(&rx) >= want.len())
                .then_some(())
        });
        d.kill();
        kills += 1;
        d.start();
    }
    wait_delivered(&d, &rx, want.len() + late, Duration::from_secs(300));
    assert_matches_replay(&rx.received(), &want, late);
    assert_eq!(d.terminate(), 0);
    assert!(kills >= 10);
}

#[test]
fn receiver_outage_loses_nothing() {
    let Hooked {
        mut rx,
        mut d,
        lines: _,
        want,
        late,
    } = hooked(FILE_SOURCE, 1500, 5, false);
    // The receiver is down: deliveries fail and are retried.
    let down = std::time::Instant::now();
    d.start();
    wait_for(
        Duration::from_secs(30),
        "failed deliveries while down",
        || {
            (metric(d.port, "sagawatch_outbox_deliveries_total{result=\"retry\"")? >= 100.0)
                .then_some(())
        },
    );
    // The gauge is refreshed every 250 ms while deliveries are in flight.
    wait_for(Duration::from_secs(5), "a backlog", || {
        (metric(d.port, "sagawatch_outbox_backlog")? > 0.0).then_some(())
    });
    // Restart the daemon while the receiver is still down: the outbox is durable.
    let failed = metric(d.port, "sagawatch_outbox_deliveries_total{result=\"retry\"").unwrap();
    assert_eq!(d.terminate(), 0);
    // The failures are not logged one by one: ten per 10 s, then how many more (at the
    // latest when the daemon stops).
    let log = d.stderr();
    let logged = log.matches("delivery failed; will retry").count();
    let windows = 2 + down.elapsed().as_secs() as usize / 10;
    assert!(logged <= 10 * windows, "{failed} failed, {logged} logged");
    assert!(log.contains("more failed deliveries to retry"), "{log}");
    d.start();
    rx.start();
    wait_delivered(&d, &rx, want.len() + late, Duration::from_secs(60));
    assert_matches_replay(&rx.received(), &want, late);
    assert_eq!(d.terminate(), 0);
}

#[test]
fn bad_http_input_gets_clear_errors_and_the_daemon_stays_up() {
    let mut d = Daemon::new(
        "token: s3cret\nallowed_hosts: [proxy.example]\nsources:\n  api: { type: http, max_body: 4096 }\nsinks:\n  out: { type: stdout }\n  hook: { type: stdout }\n",
    );
    d.start();
    let auth = [("authorization", "Bearer s3cret")];
    // Counters that alerting rules watch with increase() exist from the start; no Kafka
    // gauges without Kafka sources.
    assert_eq!(
        metric(d.port, "sagawatch_rules_reloads_total{result=\"failure\"}"),
        Some(0.0)
    );
    assert_eq!(
        metric(
            d.port,
            "sagawatch_outbox_deliveries_total{result=\"given_up\",sink=\"hook\"}"
        ),
        Some(0.0)
    );
    assert_eq!(metric(d.port, "sagawatch_kafka_up"), None);
    // Read at each scrape from what /readyz answers.
    assert_eq!(metric(d.port, "sagawatch_ready"), Some(1.0));
    // A second daemon on the same state file is refused.
    let (code, err) = run_to_exit(&d.path("sagawatch.yaml"));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("in use by another sagawatch"), "{err}");
    // So is one that names it through a symbolic link.
    std::os::unix::fs::symlink("state.db", d.path("link.db")).unwrap();
    let cfg = std::fs::read_to_string(d.path("sagawatch.yaml"))
        .unwrap()
        .replace("state: state.db", "state: link.db");
    std::fs::write(d.path("link.yaml"), cfg).unwrap();
    let (code, err) = run_to_exit(&d.path("link.yaml"));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("in use by another sagawatch"), "{err}");
    let post =
        |h: &[(&str, &str)], body: &[u8]| http(d.port, "POST", "/v1/events", h, body).unwrap();
    let good = r#"{"time":"2026-01-01T00:00:00Z","type":"OrderPlaced","order_id":"a"}"#;

    let (st, b) = post(&[], good.as_bytes());
    assert_eq!(st, 401, "{b}");
    let (st, _) = post(&[("authorization", "Bearer wrong")], good.as_bytes());
    assert_eq!(st, 401);

    let (st, b) = post(&auth, format!("{good}\n{{not json\n").as_bytes());
    assert_eq!(st, 400);
    assert!(b.contains("line 2"), "{b}");
    let (st, b) = post(&auth, format!("{good}\n[1]\n").as_bytes());
    assert_eq!(st, 400);
    assert!(
        b.contains("line 2") && b.contains("not a JSON object"),
        "{b}"
    );
    let (st, b) = post(&auth, format!("{good}\n{{\"type\":\"x\"}}\n").as_bytes());
    assert_eq!(st, 400);
    assert!(b.contains("line 2") && b.contains("time"), "{b}");
    // Refused by the core's decoder (a field a rule reads), not the server's first look:
    // counted as rejected, not received, as any request refused whole.
    let (st, b) = post(
        &auth,
        format!("{good}\n{{\"time\":\"2026-01-01T00:00:00Z\",\"order_id\":1e400}}\n").as_bytes(),
    );
    assert_eq!(st, 400);
    assert!(
        b.contains("line 2") && b.contains("number out of range"),
        "{b}"
    );
    assert_eq!(
        metric(d.port, r#"sagawatch_events_received_total{source="api"}"#).unwrap_or(0.0),
        0.0
    );
    // Lines are numbered as sent, blank lines included; array elements by position.
    let (st, b) = post(&auth, format!("{good}\n\n{{\"type\":\"x\"}}\n").as_bytes());
    assert_eq!(st, 400);
    assert!(b.contains("line 3") && b.contains("time"), "{b}");
    let (st, b) = post(&auth, format!("[{good}, {{\"type\":\"x\"}}]").as_bytes());
    assert_eq!(st, 400);
    assert!(b.contains("element 2") && b.contains("time"), "{b}");
    let (st, b) = post(&auth, &vec![b' '; 10_000]);
    assert_eq!(st, 413, "{b}");
    // A body far larger than the socket's buffers, sent whole before the answer is read
    // (as most clients do without `Expect: 100-continue`): it is taken, and the answer
    // read, not a reset connection.
    let big = vec![b' '; 16 << 20];
    let refused = |headers: &str| {
        use std::io::{BufRead, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", d.port)).unwrap();
        write!(
            s,
            "POST /v1/events HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: {}\r\n{headers}\r\n",
            big.len()
        )
        .unwrap();
        s.write_all(&big).expect("the whole body taken");
        let mut status = String::new();
        std::io::BufReader::new(s).read_line(&mut status).unwrap();
        status
    };
    assert!(refused("authorization: Bearer s3cret\r\n").contains(" 413 "));
    assert!(refused("").contains(" 401 "));
    assert!(refused("authorization: Bearer s3cret\r\ncontent-encoding: br\r\n").contains(" 415 "));
    // A body in an encoding not taken is refused as such, not as a line that is not UTF-8.
    let (st, b) = post(&[auth[0], ("content-encoding", "br")], b"\x1f\x8b\x08\x00");
    assert_eq!(st, 415, "{b}");
    assert!(
        b.contains(
            "content-encoding \\\"br\\\" is not supported: send the body uncompressed or gzip"
        ),
        "{b}"
    );
    // A gzip body is read decompressed: its lines named as there, `max_body` applied to
    // what it holds (a few bytes that hold 10 kB are refused), a broken one a 400.
    let gzip = [auth[0], ("content-encoding", "gzip")];
    let (st, b) = post(&gzip, &gz(format!("{good}\n{{not json\n").as_bytes()));
    assert_eq!(st, 400, "{b}");
    assert!(b.contains("line 2"), "{b}");
    let bomb = gz(&vec![b' '; 10_000]);
    assert!(bomb.len() < 100);
    let (st, b) = post(&gzip, &bomb);
    assert_eq!(st, 413, "{b}");
    assert!(
        b.contains("larger than 4096 bytes once decompressed"),
        "{b}"
    );
    let (st, b) = post(&gzip, b"\x1f\x8b\x08\x00");
    assert_eq!(st, 400, "{b}");
    assert!(b.contains("body is not valid gzip"), "{b}");
    let (st, b) = post(&gzip, format!("{good}\n").as_bytes());
    assert_eq!(st, 400, "{b}");
    assert!(b.contains("body is not valid gzip"), "{b}");
    // An empty body is empty, compressed or not.
    let (st, b) = post(&gzip, b"");
    assert_eq!(st, 400, "{b}");
    assert!(b.contains("line 1: empty body"), "{b}");
    // `identity` is no encoding: the body is read (here, a bad line).
    let plain = [auth[0], ("content-encoding", "identity")];
    let (st, b) = post(&plain, b"{not json");
    assert_eq!(st, 400, "{b}");
    assert!(b.contains("line 1"), "{b}");
    let (st, _) = http(d.port, "GET", "/v1/events", &auth, b"").unwrap();
    assert_eq!(st, 405);
    // Raw exchanges, to see the headers: HEAD is answered as GET without a body, and a
    // 405 names what the path allows.
    let raw = |req: &str| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", d.port)).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out.to_ascii_lowercase()
    };
    let head = raw("HEAD /metrics HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.ends_with("\r\n\r\n"), "a body after HEAD: {head}");
    let not = raw(
        "POST /v1/rules HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
    );
    assert!(
        not.starts_with("http/1.1 405") && not.contains("allow: get, head"),
        "{not}"
    );
    let not = raw("GET /v1/events HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n");
    assert!(not.contains("allow: post"), "{not}");
    // What only a web page in a browser sends: a POST from another origin (cross-site
    // request forgery), a request under a foreign name to a loopback listener (DNS
    // rebinding).
    let (st, b) = post(
        &[auth[0], ("origin", "http://evil.example")],
        good.as_bytes(),
    );
    assert_eq!(st, 403, "{b}");
    assert!(b.contains("cross-origin"), "{b}");
    let (st, b) = http(
        d.port,
        "POST",
        "/-/reload",
        &[auth[0], ("origin", "null")],
        b"",
    )
    .unwrap();
    assert_eq!(st, 403, "{b}");
    let rebound =
        raw("GET /v1/rules HTTP/1.1\r\nhost: evil.example:80\r\nconnection: close\r\n\r\n");
    assert!(rebound.starts_with("http/1.1 403"), "{rebound}");
    for host in [
        "127.0.0.1",
        "localhost:1",
        "[::1]:9464",
        "app.localhost",
        "localhost.",
        // A reverse proxy that passes the client's Host on.
        "Proxy.Example:8443",
    ] {
        let ok = raw(&format!(
            "GET /v1/rules HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n"
        ));
        assert!(ok.starts_with("http/1.1 200"), "{host}: {ok}");
    }
    let same = format!("http://127.0.0.1:{}", d.port);
    let (st, b) = http(
        d.port,
        "GET",
        "/v1/rules",
        &[("origin", same.as_str())],
        b"",
    )
    .unwrap();
    assert_eq!(st, 200, "{b}");

    // A rejected request applies nothing, not even its good lines.
    assert_eq!(metric(d.port, "sagawatch_outcomes_total"), None);
    // A same-origin POST is a POST like any other.
    let (st, b) = post(&[auth[0], ("origin", "http://127.0.0.1")], good.as_bytes());
    assert_eq!((st, b.as_str()), (202, r#"{"accepted":1}"#));
    assert_eq!(
        metric(d.port, "sagawatch_outcomes_total{outcome=\"opened\""),
        Some(1.0)
    );
    // Gzip members one after another (as concatenated files make) are read in turn.
    let members = [
        good.replace("\"a\"", "\"g1\""),
        good.replace("\"a\"", "\"g2\""),
    ]
    .map(|e| gz(format!("{e}\n").as_bytes()))
    .concat();
    let (st, b) = post(&[auth[0], ("content-encoding", "GZip")], &members);
    assert_eq!((st, b.as_str()), (202, r#"{"accepted":2}"#));
    assert_eq!(
        metric(d.port, "sagawatch_outcomes_total{outcome=\"opened\""),
        Some(3.0)
    );
    assert_eq!(http(d.port, "GET", "/healthz", &[], b"").unwrap().0, 200);
    assert_eq!(d.terminate(), 0);
}

/// A state file this user may not write is refused at startup (SQLite would open it
/// read-only, and the daemon would say it is ready and then fail at the first batch).
#[test]
fn a_read_only_state_file_is_refused_at_startup() {
    use std::os::unix::fs::PermissionsExt;
    let mut d = Daemon::new(
        "sources: { a: { type: stdin } }\nsinks: { out: { type: stdout }, hook: { type: stdout } }\n",
    );
    // A state file as a daemon leaves it, that this user may only read.
    d.start();
    assert_eq!(d.terminate(), 0);
    let dir = d.dir.path();
    std::fs::copy(dir.join("state.db"), dir.join("ro.db")).unwrap();
    std::fs::set_permissions(dir.join("ro.db"), std::fs::Permissions::from_mode(0o444)).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let cfg = std::fs::read_to_string(dir.join("sagawatch.yaml"))
        .unwrap()
        .replace("state: state.db", "state: ro.db");
    std::fs::write(dir.join("ro.yaml"), cfg).unwrap();
    let run = |config: &str| {
        let out = as_nobody()
            .args(["run", "--config"])
            .arg(dir.join(config))
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        err
    };
    let err = run("ro.yaml");
    assert!(
        err.contains("state file") && err.contains("ro.db: not writable"),
        "{err}"
    );
    // Refused before SQLite read it: no read-only `-wal` or `-shm` left behind, which
    // would refuse every later start once the file is made writable.
    assert!(!dir.join("ro.db-wal").exists() && !dir.join("ro.db-shm").exists());
    // Such a leftover is named.
    std::fs::set_permissions(dir.join("ro.db"), std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::write(dir.join("ro.db-shm"), b"").unwrap();
    std::fs::set_permissions(
        dir.join("ro.db-shm"),
        std::fs::Permissions::from_mode(0o444),
    )
    .unwrap();
    let err = run("ro.yaml");
    assert!(
        err.contains("ro.db-shm (its shared-memory index) is not writable by this user"),
        "{err}"
    );
    // A writable state file in a directory this user may not write: SQLite could not
    // create its -wal and -shm there, and the message says so (not "cannot read").
    std::fs::create_dir(dir.join("sd")).unwrap();
    std::fs::copy(dir.join("state.db"), dir.join("sd/s.db")).unwrap();
    std::fs::set_permissions(dir.join("sd/s.db"), std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::set_permissions(dir.join("sd"), std::fs::Permissions::from_mode(0o555)).unwrap();
    let cfg = std::fs::read_to_string(dir.join("sagawatch.yaml"))
        .unwrap()
        .replace("state: state.db", "state: sd/s.db");
    std::fs::write(dir.join("sd.yaml"), cfg).unwrap();
    let err = run("sd.yaml");
    assert!(
        err.contains("s.db: its directory") && err.contains("is not writable by this user"),
        "{err}"
    );
    // Its lock file there already, as a daemon run before left it.
    std::fs::set_permissions(dir.join("sd"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(dir.join("sd/s.db.lock"), b"").unwrap();
    std::fs::set_permissions(
        dir.join("sd/s.db.lock"),
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    std::fs::set_permissions(dir.join("sd"), std::fs::Permissions::from_mode(0o555)).unwrap();
    let err = run("sd.yaml");
    std::fs::set_permissions(dir.join("sd"), std::fs::Permissions::from_mode(0o755)).unwrap();
    assert!(
        err.contains("s.db: its directory") && err.contains("is not writable by this user"),
        "{err}"
    );
}

/// A file source whose file cannot be opened (its permissions) counts its bytes as lag,
/// not a healthy 0, and is read once it can be. Meanwhile the stream is not idle: the
/// idle fallback does not move the clock past the events waiting in the file.
#[test]
fn an_unreadable_file_counts_as_lag_until_it_can_be_read() {
    use std::os::unix::fs::PermissionsExt;
    let mut d = Daemon::new(
        "time: { lateness: 0s, idle: 1s }\nsources: { a: { type: file, path: events.jsonl } }\nsinks: { out: { type: stdout }, hook: { type: stdout } }\n",
    );
    let line = "{\"time\":\"2026-01-01T00:00:00Z\",\"type\":\"OrderPlaced\",\"order_id\":\"o1\"}\n";
    let events = d.path("events.jsonl");
    std::fs::write(&events, line).unwrap();
    std::fs::set_permissions(&events, std::fs::Permissions::from_mode(0o000)).unwrap();
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    d.command = Some(as_nobody());
    d.start();
    let lag = |d: &Daemon| metric(d.port, "sagawatch_source_lag_bytes{source=\"a\"}");
    wait_for(
        Duration::from_secs(10),
        "the file's bytes counted as lag",
        || (lag(&d) == Some(line.len() as f64)).then_some(()),
    );
    assert!(
        d.stderr().contains("cannot open; will retry"),
        "{}",
        d.stderr()
    );
    // Twice `idle` with the file's events waiting: the clock has not moved.
    std::thread::sleep(Duration::from_secs(2));
    std::fs::set_permissions(&events, std::fs::Permissions::from_mode(0o644)).unwrap();
    wait_for(Duration::from_secs(10), "the file read", || {
        (metric(d.port, "sagawatch_events_received_total") == Some(1.0) && lag(&d) == Some(0.0))
            .then_some(())
    });
    // At the event's time (2026-01-01), not at wall time.
    let clock = wait_for(Duration::from_secs(10), "the clock published", || {
        metric(d.port, "sagawatch_engine_clock_seconds").filter(|&c| c != 0.0)
    });
    assert_eq!(clock, 1_767_225_600.0);
    assert_eq!(d.terminate(), 0, "{}", d.stderr());
    // After a restart, only what lies past the stored position counts.
    let more = line.replace("o1", "o2");
    std::fs::write(&events, format!("{line}{more}")).unwrap();
    std::fs::set_permissions(&events, std::fs::Permissions::from_mode(0o000)).unwrap();
    d.command = Some(as_nobody());
    d.start();
    wait_for(
        Duration::from_secs(10),
        "the new bytes counted as lag",
        || (lag(&d) == Some(more.len() as f64)).then_some(()),
    );
    std::fs::set_permissions(&events, std::fs::Permissions::from_mode(0o644)).unwrap();
    wait_for(Duration::from_secs(10), "the rest read", || {
        (metric(d.port, "sagawatch_events_received_total") == Some(1.0) && lag(&d) == Some(0.0))
            .then_some(())
    });
    assert_eq!(d.terminate(), 0, "{}", d.stderr());
}

/// Every connection the daemon opens leaves SQLite's locks on the state file in place:
/// closing any descriptor of a file drops the process's POSIX locks on it, so a check that
/// opened the file would leave its shared-memory index unlocked, and another connection
/// (an `inspect`, a backup) would take it for abandoned and rebuild it under the daemon.
#[test]
fn the_daemon_keeps_its_sqlite_locks_on_the_state_file() {
    use std::os::unix::fs::MetadataExt;
    let mut d =
        Daemon::new("sources: { api: { type: http } }\nsinks: { hook: { type: stdout } }\n");
    d.start();
    // The timeline API opens a reader connection of its own.
    assert_eq!(
        http(d.port, "GET", "/v1/instances", &[], b"").unwrap().0,
        200
    );
    let pid = d.child.as_ref().unwrap().id().to_string();
    let ino = std::fs::metadata(d.path("state.db-shm"))
        .unwrap()
        .ino()
        .to_string();
    let locks = std::fs::read_to_string("/proc/locks").unwrap();
    assert!(
        locks.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1) == Some(&"POSIX")
                && f.get(4) == Some(&pid.as_str())
                && f.get(5).and_then(|i| i.rsplit(':').next()) == Some(ino.as_str())
        }),
        "no lock of pid {pid} on inode {ino}:\n{locks}"
    );
    assert_eq!(d.terminate(), 0);
}

/// A state file (or its WAL) deleted under a running daemon: it would go on writing into
/// an unlinked file, lost at exit; it stops instead, with exit 1 and the reason. So does a
/// stop asked for at once, before the daemon noticed (no "stopped cleanly" and exit 0).
#[test]
fn a_state_file_deleted_while_running_stops_the_daemon() {
    for (gone, stop) in [
        ("state.db", false),
        ("state.db-wal", false),
        ("state.db", true),
    ] {
        let mut d = Daemon::new(
            "sources: { a: { type: stdin } }\nsinks: { out: { type: stdout }, hook: { type: stdout } }\n",
        );
        d.start();
        std::fs::remove_file(d.path(gone)).unwrap();
        let mut c = d.child.take().unwrap();
        if stop {
            signal(&c, "TERM");
        }
        let st = wait_for(Duration::from_secs(30), "the daemon to stop", || {
            c.try_wait().unwrap()
        });
        let err = d.stderr();
        assert_eq!(st.code(), Some(1), "{err}");
        assert!(
            gone != "state.db" || !d.path(gone).exists(),
            "created again: {err}"
        );
        assert!(
            err.contains(&format!(
                "{gone} was deleted or replaced while sagawatch was running"
            )),
            "{err}"
        );
    }
}

#[test]
fn broken_config_and_unusable_state_exit_2_with_one_clear_error() {
    let run = |dir: &std::path::Path, cfg: &str| {
        std::fs::write(dir.join("c.yaml"), cfg).unwrap();
        run_to_exit(&dir.join("c.yaml"))
    };
    let d = Daemon::new("sources: { a: { type: stdin } }\n");
    let dir = d.dir.path();
    let (code, err) = run(
        dir,
        "rules: rules\nsources: { a: { type: stdni } }\nlisten: x\n",
    );
    assert_eq!(code, Some(2));
    assert!(
        err.contains(
            "c.yaml:2:23: sources.a.type: unknown source type \"stdni\" (did you mean \"stdin\"?)"
        ),
        "{err}"
    );
    assert!(err.contains("c.yaml:3:9: listen:"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // One line per problem; one problem, one line.
    assert_eq!(err.lines().count(), 2, "{err}");
    // With JSON logs, every line of the error is a JSON log record.
    let out = std::process::Command::new(BIN)
        .args(["run", "--log-format", "json", "--config"])
        .arg(dir.join("c.yaml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let records: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(records.iter().all(|r| r["level"] == "ERROR"), "{records:?}");
    let messages: Vec<&str> = records
        .iter()
        .filter_map(|r| r["fields"]["message"].as_str())
        .collect();
    assert!(
        messages.iter().any(|m| m.contains("c.yaml:3:9: listen:")),
        "{messages:?}"
    );
    let (code, err) = run(
        dir,
        "rules: rules\nsources: { a: { type: stdin } }\nbogus: 1\n",
    );
    assert_eq!(code, Some(2));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(
        err.trim_end()
            .ends_with("c.yaml:3:1: bogus: unknown field \"bogus\""),
        "{err}"
    );

    let (code, err) = run(
        dir,
        "rules: rules\nstate: no/such/dir/state.db\nsources: { a: { type: stdin } }\nsinks: { hook: { type: stdout } }\n",
    );
    assert_eq!(code, Some(2));
    assert!(
        err.contains("state file") && err.contains("does not exist"),
        "{err}"
    );
    // Named with the config file and key; a value from the environment as its name.
    let (code, err) = run(
        dir,
        "rules: rules\nstate: ${HOME}/no/such/dir/state.db\nsources: { a: { type: stdin } }\nsinks: { hook: { type: stdout } }\n",
    );
    assert_eq!(code, Some(2));
    let home = std::env::var("HOME").unwrap();
    assert!(
        err.contains("c.yaml: state: state file ${HOME}/no/such/dir/state.db")
            && (home.len() < 4 || !err.contains(&home)),
        "{err}"
    );

    // A device or a directory is refused before SQLite touches it.
    for path in ["/dev/null", "rules"] {
        let (code, err) = run(
            dir,
            &format!(
                "rules: rules\nstate: {path}\nsources: {{ a: {{ type: stdin }} }}\nsinks: {{ hook: {{ type: stdout }} }}\n"
            ),
        );
        assert_eq!(code, Some(2));
        assert!(err.contains("not a regular file"), "{err}");
    }

    std::fs::write(dir.join("garbage.db"), vec![b'x'; 8192]).unwrap();
    let (code, err) = run(
        dir,
        "rules: rules\nstate: garbage.db\nsources: { a: { type: stdin } }\nsinks: { hook: { type: stdout } }\n",
    );
    assert_eq!(code, Some(2));
    assert!(err.contains("garbage.db"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // Another program's database is not taken over.
    {
        let c = rusqlite::Connection::open(dir.join("theirs.db")).unwrap();
        c.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .unwrap();
    }
    let before = std::fs::read(dir.join("theirs.db")).unwrap();
    let (code, err) = run(
        dir,
        "rules: rules\nstate: theirs.db\nsources: { a: { type: stdin } }\nsinks: { hook: { type: stdout } }\n",
    );
    assert_eq!(code, Some(2));
    assert!(
        err.contains("theirs.db") && err.contains("not a sagawatch state file"),
        "{err}"
    );
    assert!(
        std::fs::read(dir.join("theirs.db")).unwrap() == before,
        "theirs.db was changed"
    );

    // A rule naming an unknown source or a sink that takes no payloads.
    let (code, err) = run(
        dir,
        "rules: rules\nsources: { orders: { type: stdin } }\nsinks: { am: { type: alertmanager, url: 'http://127.0.0.1:1' } }\n",
    );
    assert_eq!(code, Some(2));
    assert!(
        err.contains(
            "checkout.yaml:20:29: rules[0].on_missing[1].compensate.sink: unknown sink \"hook\""
        ),
        "{err}"
    );
    // An alert naming no sinks, with no stdout sink or `alerts.sinks` to default to.
    assert!(
        err.contains(
            "checkout.yaml:19:16: rules[0].on_missing[0].alert: this alert would go nowhere"
        ),
        "{err}"
    );

    let port = free_port();
    let _busy = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let (code, err) = run(
        dir,
        &format!(
            "rules: rules\nlisten: 127.0.0.1:{port}\nsources: {{ a: {{ type: stdin }} }}\nsinks: {{ hook: {{ type: stdout }} }}\n"
        ),
    );
    assert_eq!(code, Some(2));
    assert!(
        err.contains(&format!("c.yaml: listen 127.0.0.1:{port}: ")),
        "{err}"
    );
}

/// A SIGTERM during a reload stops intake at once: the stop does not wait for the
/// reload, which waits in the core's queue behind what the sources read.
#[test]
fn a_sigterm_during_a_reload_does_not_wait_for_it() {
    let mut d = Daemon::new(&format!(
        "{FILE_SOURCE}sinks:\n  hook: {{ type: stdout }}\n"
    ));
    write_lines(&d.path("events.jsonl"), &checkout_events(200_000, 7));
    d.env.push(("SAGAWATCH_LOG".into(), "info".into()));
    d.start();
    wait_for(Duration::from_secs(60), "intake under way", || {
        (metric(d.port, "sagawatch_events_received_total")? >= 20_000.0).then_some(())
    });
    signal(d.child.as_ref().unwrap(), "HUP");
    wait_for(Duration::from_secs(10), "the SIGHUP seen", || {
        d.stderr().contains("SIGHUP: reloading rules").then_some(())
    });
    assert_eq!(d.terminate(), 0, "{}", d.stderr());
    let log = d.stderr();
    let term = log
        .find("SIGTERM: shutting down")
        .expect("the SIGTERM logged");
    // The reload is done after the stop began, or not at all.
    if let Some(reloaded) = log.find("rules reloaded") {
        assert!(term < reloaded, "{log}");
    }
}

#[test]
fn reload_keeps_the_old_rules_when_the_new_ones_are_invalid() {
    let mut d = Daemon::new(
        "token: s3cret\nsources:\n  api: { type: http }\nsinks:\n  hook: { type: stdout }\n",
    );
    d.start();
    let auth = [("authorization", "Bearer s3cret")];
    let (st, _) = http(d.port, "POST", "/-/reload", &[], b"").unwrap();
    assert_eq!(st, 401);
    let (st, b) = http(d.port, "POST", "/-/reload", &auth, b"").unwrap();
    assert_eq!(st, 200, "{b}");
    std::fs::write(
        d.path("rules/checkout.yaml"),
        RULES
            .replace("after: payment", "after: paymnt")
            .replacen("within: 15m", "within: 15x", 1),
    )
    .unwrap();
    let (st, b) = http(d.port, "POST", "/-/reload", &auth, b"").unwrap();
    assert_eq!(st, 422);
    assert!(b.contains("unknown step \\\"paymnt\\\""), "{b}");
    // SIGHUP with the broken file: logged and counted, the old rules keep running.
    signal(d.child.as_ref().unwrap(), "HUP");
    wait_for(Duration::from_secs(10), "the failed SIGHUP reload", || {
        (metric(d.port, "sagawatch_rules_reloads_total{result=\"failure\"")? == 2.0).then_some(())
    });
    let ev = r#"{"time":"2026-01-01T00:00:00Z","type":"OrderPlaced","order_id":"a"}"#;
    let (st, _) = http(d.port, "POST", "/v1/events", &auth, ev.as_bytes()).unwrap();
    assert_eq!(st, 202);
    assert_eq!(
        metric(d.port, "sagawatch_open_instances{rule=\"checkout\"}"),
        Some(1.0)
    );
    for series in [
        "sagawatch_outcomes_total{outcome=\"opened\",rule=\"checkout\"}",
        "sagawatch_instances_opened_total{rule=\"checkout\"}",
    ] {
        assert_eq!(metric(d.port, series), Some(1.0), "{series}");
    }
    assert_eq!(
        metric(
            d.port,
            "sagawatch_steps_total{outcome=\"missing\",rule=\"checkout\",step=\"payment\"}"
        ),
        Some(0.0)
    );
    // The rule renamed: the old name's series go, the new one's come.
    std::fs::write(
        d.path("rules/checkout.yaml"),
        RULES.replace("name: checkout", "name: checkout-v2"),
    )
    .unwrap();
    let (st, b) = http(d.port, "POST", "/-/reload", &auth, b"").unwrap();
    assert_eq!(st, 200, "{b}");
    assert_eq!(
        metric(d.port, "sagawatch_open_instances{rule=\"checkout\"}"),
        None
    );
    assert_eq!(
        metric(d.port, "sagawatch_open_instances{rule=\"checkout-v2\"}"),
        Some(0.0)
    );
    for gone in [
        "rule=\"checkout\"",
        "outcome=\"opened\",rule=\"checkout\"}",
        "outcome=\"missing\",rule=\"checkout\",",
    ] {
        let body = http(d.port, "GET", "/metrics", &[], b"").unwrap().1;
        assert!(!body.contains(gone), "{gone} still in\n{body}");
    }
    // A step renamed: its series go, the rule's others stay.
    std::fs::write(
        d.path("rules/checkout.yaml"),
        RULES
            .replace("name: checkout", "name: checkout-v2")
            .replace("step: shipment", "step: ship"),
    )
    .unwrap();
    let (st, b) = http(d.port, "POST", "/-/reload", &auth, b"").unwrap();
    assert_eq!(st, 200, "{b}");
    let body = http(d.port, "GET", "/metrics", &[], b"").unwrap().1;
    assert!(!body.contains("step=\"shipment\""), "{body}");
    assert!(
        body.contains("rule=\"checkout-v2\",step=\"ship\""),
        "{body}"
    );
    assert!(
        body.contains("rule=\"checkout-v2\",step=\"payment\""),
        "{body}"
    );
    assert_eq!(d.terminate(), 0);
    // Both problems on the one log line that says so.
    assert!(
        d.stderr()
            .lines()
            .any(|l| l.contains("rules reload rejected")
                && l.contains("unknown step \\\"paymnt\\\"")
                && l.contains("invalid duration \\\"15x\\\"")),
        "{}",
        d.stderr()
    );
}

/// A reload that takes a step's `after` away opens that step in the instances already
/// open, as the new rules open it in new ones (deadline: trigger time plus `within`):
/// otherwise it would wait for an opening that never comes, and never be reported.
#[test]
fn a_reload_removing_an_after_opens_the_waiting_steps() {
    let mut d = Daemon::new(
        "time: { lateness: 0s, idle: 0s }\nsources:\n  api: { type: http }\nsinks:\n  hook: { type: stdout }\n",
    );
    d.start();
    let post = |d: &Daemon, ev: &str| {
        let (st, b) = http(d.port, "POST", "/v1/events", &[], ev.as_bytes()).unwrap();
        assert_eq!(st, 202, "{b}");
    };
    post(
        &d,
        r#"{"time":"2026-01-01T00:00:00Z","type":"OrderPlaced","order_id":"o1"}"#,
    );
    std::fs::write(
        d.path("rules/checkout.yaml"),
        RULES.replace("        after: payment\n", ""),
    )
    .unwrap();
    let (st, b) = http(d.port, "POST", "/-/reload", &[], b"").unwrap();
    assert_eq!(st, 200, "{b}");
    post(&d, r#"{"time":"2026-01-01T03:00:00Z","type":"Tick"}"#);
    let missing = |step: &str| {
        metric(
            d.port,
            &format!(
                "sagawatch_steps_total{{outcome=\"missing\",rule=\"checkout\",step=\"{step}\"}}"
            ),
        )
    };
    assert_eq!(missing("payment"), Some(1.0));
    assert_eq!(missing("shipment"), Some(1.0));
    let (_, t) = http(d.port, "GET", "/v1/instances/checkout/o1", &[], b"").unwrap();
    assert!(t.contains("\"deadline\":\"2026-01-01T02:00:00Z\""), "{t}");
    assert_eq!(d.terminate(), 0);
}

/// Times at the edges of the accepted range (1677..2262) move the clock without breaking
/// the arithmetic of the gauges and timers (the test binary is built with overflow checks).
#[test]
fn event_times_at_the_edges_of_the_range_are_handled() {
    let mut d = Daemon::new(
        "token: s3cret\nsources:\n  api: { type: http }\nsinks:\n  hook: { type: stdout }\n",
    );
    d.start();
    let auth = [("authorization", "Bearer s3cret")];
    for t in ["1700-01-01T00:00:00Z", "2262-04-01T00:00:00Z"] {
        let ev = format!(r#"{{"time":"{t}","type":"OrderPlaced","order_id":"{t}"}}"#);
        let (st, b) = http(d.port, "POST", "/v1/events", &auth, ev.as_bytes()).unwrap();
        assert_eq!(st, 202, "{b}");
        wait_for(Duration::from_secs(10), "the gauges after a commit", || {
            let (st, m) = http(d.port, "GET", "/metrics", &[], b"").ok()?;
            (st == 200 && m.contains("sagawatch_clock_lag_seconds")).then_some(())
        });
    }
    assert_eq!(http(d.port, "GET", "/readyz", &[], b"").unwrap().0, 200);
    assert_eq!(d.terminate(), 0);
}

/// The lateness the clock keeps back on purpose is not lag: with `clock: wall` the clock
/// is where it could be, so `sagawatch_clock_lag_seconds` is about 0, not the lateness.
#[test]
fn clock_lag_leaves_out_the_lateness() {
    let mut d = Daemon::new(
        "token: s3cret\ntime: { clock: wall, lateness: 1h }\nsources:\n  api: { type: http }\nsinks:\n  hook: { type: stdout }\n",
    );
    d.start();
    let auth = [("authorization", "Bearer s3cret")];
    let ev = r#"{"type":"OrderPlaced","order_id":"a"}"#;
    assert_eq!(
        http(d.port, "POST", "/v1/events", &auth, ev.as_bytes())
            .unwrap()
            .0,
        202
    );
    wait_for(
        Duration::from_secs(10),
        "the engine clock to be set",
        || (metric(d.port, "sagawatch_engine_clock_seconds")? > 0.0).then_some(()),
    );
    let lag = metric(d.port, "sagawatch_clock_lag_seconds").unwrap();
    assert!(lag.abs() < 60.0, "lag {lag}");
    assert_eq!(d.terminate(), 0);

    // A clock that stands still (event time, no idle fallback, no events): its lag grows
    // from scrape to scrape, although nothing is committed.
    let mut d = Daemon::new(
        "time: { idle: 0s, lateness: 0s }\nsources:\n  api: { type: http }\nsinks:\n  hook: { type: stdout }\n",
    );
    d.start();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let time = sagawatch::time::format_rfc3339((now as i64 - 5) * 1_000_000_000);
    let ev = format!(r#"{{"time":"{time}","type":"OrderPlaced","order_id":"a"}}"#);
    assert_eq!(
        http(d.port, "POST", "/v1/events", &[], ev.as_bytes())
            .unwrap()
            .0,
        202
    );
    let first = wait_for(Duration::from_secs(10), "the clock lag", || {
        metric(d.port, "sagawatch_clock_lag_seconds").filter(|&l| l != 0.0)
    });
    wait_for(Duration::from_secs(10), "the clock lag to grow", || {
        (metric(d.port, "sagawatch_clock_lag_seconds")? > first + 1.0).then_some(())
    });
    assert_eq!(d.terminate(), 0);
}

/// When the clock leaps (the idle fallback after old events, as in the quickstart), the
/// instances it closes are listed for their dedup memory from the new clock: their trigger
/// and correlate events stay as long.
#[test]
fn a_leap_of_the_clock_keeps_the_events_of_the_instances_it_closes() {
    let mut d = Daemon::new(
        "token: s3cret\ntime: { idle: 1s }\nsources:\n  api: { type: http }\nsinks:\n  hook: { type: stdout }\n",
    );
    d.start();
    let auth = [("authorization", "Bearer s3cret")];
    let body = concat!(
        r#"{"time":"2020-01-01T00:00:00Z","type":"OrderPlaced","order_id":"a"}"#,
        "\n",
        r#"{"time":"2020-01-01T00:01:00Z","type":"PaymentCompleted","order_id":"a"}"#,
    );
    let (st, b) = http(d.port, "POST", "/v1/events", &auth, body.as_bytes()).unwrap();
    assert_eq!(st, 202, "{b}");
    // The idle fallback moves the clock to the present: a's shipment goes missing.
    wait_for(
        Duration::from_secs(20),
        "the shipment reported missing",
        || {
            let n = metric(
                d.port,
                r#"sagawatch_outcomes_total{outcome="missing",rule="checkout"}"#,
            )?;
            (n == 1.0).then_some(())
        },
    );
    // A commit after the leap has run the purge of old events.
    let ev = r#"{"time":"2020-01-01T00:02:00Z","type":"Other","order_id":"x"}"#;
    assert_eq!(
        http(d.port, "POST", "/v1/events", &auth, ev.as_bytes())
            .unwrap()
            .0,
        202
    );
    let (st, t) = http(d.port, "GET", "/v1/instances/checkout/a", &[], b"").unwrap();
    assert_eq!(st, 200, "{t}");
    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
    assert_eq!(v["trigger"]["type"], "OrderPlaced", "{t}");
    assert!(t.contains("PaymentCompleted"), "{t}");
    assert_eq!(d.terminate(), 0);
}

/// A restart does not fire what the rules did not: a step that opened already overdue
/// fires at the next event, as in replay, not when the daemon starts again (its time
/// decides the dedup memory, and so whether a later trigger opens a new instance).
#[test]
fn a_restart_fires_nothing_replay_would_not() {
    const RULES: &str = r#"
rules:
  - name: r
    trigger: { where: { type: A }, key: k }
    expect:
      - { step: s0, where: { type: B }, key: k, within: 10s }
      - { step: s1, where: { type: C }, key: k, after: s0, within: 2s }
    on_missing:
      - compensate: { sink: cmds, payload: { key: "{{key}}" } }
    dedup: 30s
"#;
    let mut d = Daemon::with_rules(
        RULES,
        "time: { idle: 0s }\nsources: { ev: { type: file, path: ev.jsonl } }\nsinks: { cmds: { type: stdout } }\n",
    );
    let first = [
        r#"{"time":"2026-01-01T00:00:25Z","type":"B","k":"1"}"#,
        r#"{"time":"2026-01-01T00:00:30Z","type":"A","k":"1"}"#,
    ];
    let then = [
        r#"{"time":"2026-01-01T00:00:50Z","type":"Z"}"#,
        r#"{"time":"2026-01-01T00:01:10Z","type":"A","k":"1"}"#,
        r#"{"time":"2099-01-01T00:00:00Z","type":"FLUSH"}"#,
    ];
    write_lines(&d.path("ev.jsonl"), &first.map(String::from));
    d.start();
    wait_for(Duration::from_secs(20), "the first part", || {
        (metric(d.port, "sagawatch_events_decoded_total")? == 2.0).then_some(())
    });
    assert_eq!(d.terminate(), 0);
    d.start();
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(d.path("ev.jsonl"))
            .unwrap();
        for l in then {
            writeln!(f, "{l}").unwrap();
        }
    }
    wait_for(Duration::from_secs(20), "the rest", || {
        (metric(d.port, "sagawatch_events_decoded_total")? == 3.0).then_some(())
    });
    // Replay: s1 goes missing at 00:50 (one compensation); the trigger at 01:10 is within
    // the 30 s of dedup memory from then, and opens nothing.
    let compensations = r#"sagawatch_outcomes_total{outcome="compensate",rule="r"}"#;
    assert_eq!(metric(d.port, compensations), Some(1.0));
    assert_eq!(d.terminate(), 0);
}

/// A reload whose templates read other trigger fields re-captures the open instances
/// from their stored triggers: an instance opened before renders the new template with
/// its own trigger's fields (not empty, and not the value of the field that stood at the
/// same position in the old list), in the daemon and across a restart; from a trigger
/// over 4 KiB as well.
#[test]
fn a_reload_that_reads_new_trigger_fields_renders_them_for_open_instances() {
    let rules = |payload: &str| {
        format!(
            "rules:\n  - name: r\n    trigger: {{ where: {{ type: A }}, key: k }}\n    expect:\n      \
             - {{ step: b, where: {{ type: B }}, key: k, within: 1m }}\n    on_missing:\n      \
             - compensate: {{ sink: hook, payload: {payload} }}\n"
        )
    };
    let hook = free_port();
    let mut rx = Receiver::new(hook);
    rx.start();
    let mut d = Daemon::with_rules(
        &rules("{ y: \"{{trigger.y}}\" }"),
        &with_port(
            &hook_config("token: s3cret\nsources: { api: { type: http } }\n"),
            hook,
        ),
    );
    d.start();
    let auth = [("authorization", "Bearer s3cret")];
    let post = |port: u16, ev: &str| {
        let (st, b) = http(port, "POST", "/v1/events", &auth, ev.as_bytes()).unwrap();
        assert_eq!(st, 202, "{b}");
    };
    // A trigger of 10 kB, its field z at the end: kept whole, so read at the restart.
    let pad = "p".repeat(10_000);
    post(
        d.port,
        &format!(
            r#"{{"time":"2026-01-01T09:00:00Z","type":"A","k":"1","x":"ex1","y":"why1","pad":"{pad}","z":"zed1"}}"#
        ),
    );
    // x is read first now: the old captures' positions mean other fields.
    std::fs::write(
        d.path("rules/checkout.yaml"),
        rules("{ x: \"{{trigger.x}}\", y: \"{{trigger.y}}\", n: \"{{trigger.n.v}}\" }"),
    )
    .unwrap();
    let (st, b) = http(d.port, "POST", "/-/reload", &auth, b"").unwrap();
    assert_eq!(st, 200, "{b}");
    post(
        d.port,
        r#"{"time":"2026-01-01T09:00:30Z","type":"A","k":"2","x":"ex2","y":"why2","n":{"v":[1]}}"#,
    );
    // Across a restart: z is new, x is no longer read.
    assert_eq!(d.terminate(), 0);
    std::fs::write(
        d.path("rules/checkout.yaml"),
        rules("{ y: \"{{trigger.y}}\", z: \"{{trigger.z}}\", n: \"{{trigger.n.v}}\" }"),
    )
    .unwrap();
    d.start();
    post(
        d.port,
        r#"{"time":"2026-01-01T09:05:00Z","type":"Heartbeat"}"#,
    );
    let payloads = wait_for(Duration::from_secs(30), "both compensations", || {
        let got = rx.received();
        let mut p: Vec<serde_json::Value> = got
            .iter()
            .map(|r| {
                let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
                v["data"]["payload"].clone()
            })
            .collect();
        p.sort_by_key(|v| v.to_string());
        (p.len() >= 2).then_some(p)
    });
    assert_eq!(
        payloads,
        [
            serde_json::json!({"n": "", "y": "why1", "z": "zed1"}),
            serde_json::json!({"n": "[1]", "y": "why2", "z": ""}),
        ]
    );
    assert_eq!(d.terminate(), 0);
}

/// A removed rule's instances wait; when it comes back (by a reload, or across a restart)
/// a deadline that passed meanwhile is reported missing at once, not at the next event.
#[test]
fn a_rule_loaded_again_reports_its_passed_deadlines_at_once() {
    let mut d = Daemon::new(
        "token: s3cret\ntime: { idle: 0s }\nsources:\n  api: { type: http }\nsinks:\n  hook: { type: stdout }\n",
    );
    let other = RULES
        .replace("name: checkout", "name: other")
        .replace("OrderPlaced", "Other");
    std::fs::write(d.path("rules/other.yaml"), &other).unwrap();
    d.start();
    let auth = [("authorization", "Bearer s3cret")];
    let post = |port: u16, ev: &str| {
        let (st, b) = http(port, "POST", "/v1/events", &auth, ev.as_bytes()).unwrap();
        assert_eq!(st, 202, "{b}");
    };
    let reload = |port: u16| {
        let (st, b) = http(port, "POST", "/-/reload", &auth, b"").unwrap();
        assert_eq!(st, 200, "{b}");
    };
    let missing = r#"sagawatch_outcomes_total{outcome="missing",rule="checkout"}"#;
    post(
        d.port,
        r#"{"time":"2026-01-01T00:00:00Z","type":"OrderPlaced","order_id":"a"}"#,
    );
    std::fs::remove_file(d.path("rules/checkout.yaml")).unwrap();
    reload(d.port);
    // The clock passes a's payment deadline (00:15) while its rule is away.
    post(
        d.port,
        r#"{"time":"2026-01-01T05:00:00Z","type":"Other","order_id":"x"}"#,
    );
    std::fs::write(d.path("rules/checkout.yaml"), RULES).unwrap();
    reload(d.port);
    wait_for(
        Duration::from_secs(10),
        "a's payment reported missing",
        || (metric(d.port, missing)? == 1.0).then_some(()),
    );
    // The same across a restart: b opens, its rule goes, the clock passes, the daemon
    // restarts with the rule back.
    post(
        d.port,
        r#"{"time":"2026-01-01T05:00:00Z","type":"OrderPlaced","order_id":"b"}"#,
    );
    std::fs::remove_file(d.path("rules/checkout.yaml")).unwrap();
    reload(d.port);
    post(
        d.port,
        r#"{"time":"2026-01-01T09:00:00Z","type":"Other","order_id":"y"}"#,
    );
    assert_eq!(d.terminate(), 0);
    std::fs::write(d.path("rules/checkout.yaml"), RULES).unwrap();
    d.start();
    wait_for(
        Duration::from_secs(10),
        "b's payment reported missing",
        || (metric(d.port, missing)? == 1.0).then_some(()),
    );
    let (_, timeline) = http(d.port, "GET", "/v1/instances/checkout/b", &[], b"").unwrap();
    assert!(timeline.contains("\"missing\""), "{timeline}");
    assert_eq!(d.terminate(), 0);
}

#[test]
fn stdin_source_and_stdout_sink_print_what_replay_reports() {
    use std::io::{BufRead, Write};
    let mut d = Daemon::new(
        "time: { idle: 0s }\nsources: { events: { type: stdin } }\nsinks: { hook: { type: stdout } }\n",
    );
    let lines = checkout_events(800, 9);
    write_lines(&d.path("events.jsonl"), &lines);
    let (want, _) = replay(&d.path("rules"), &d.path("events.jsonl"));
    let mut child = std::process::Command::new(BIN)
        .args(["run", "--config"])
        .arg(d.path("sagawatch.yaml"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (stdin, out) = (child.stdin.take().unwrap(), child.stdout.take().unwrap());
    d.child = Some(child);
    {
        // Closed at the end of the block: the end of the input.
        let mut stdin = stdin;
        for l in &lines {
            writeln!(stdin, "{l}").unwrap();
        }
    }
    // The stdout sink prints exactly replay's alert and compensate lines, in its order.
    let mut got = std::collections::BTreeMap::new();
    let mut order = Vec::new();
    let mut texts = std::collections::BTreeMap::new();
    let out = std::io::BufReader::new(out);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in out.lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    while got.len() < want.len() {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("an output line within 60 s");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["outcome"] != "resolved" {
            order.push(v["id"].as_str().unwrap().to_string());
            texts.insert(v["id"].as_str().unwrap().to_string(), line);
            got.insert(v["id"].as_str().unwrap().to_string(), v);
        }
    }
    assert_eq!(got, want);
    let mut replay_order = Vec::new();
    // Line for line as replay prints them, fields in the same order.
    let out = std::process::Command::new(BIN)
        .args(["replay", "--rules"])
        .arg(d.path("rules"))
        .arg(d.path("events.jsonl"))
        .output()
        .unwrap();
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if let Some(id) = v["id"].as_str() {
            assert_eq!(texts.get(id).map(String::as_str), Some(line));
            replay_order.push(id.to_string());
        }
    }
    assert_eq!(order, replay_order);
    assert_eq!(d.terminate(), 0);
}

/// A SIGTERM while stdin streams in: every line the daemon took from the pipe is in the
/// state after the stop, and what it did not take is still in the pipe. (It used to drop
/// what it had read but not yet handed to the core: up to 64 KiB that nothing could
/// read again.)
#[test]
fn a_stop_keeps_every_line_taken_from_stdin() {
    const RULE: &str = "rules:\n  - name: pay\n    trigger: { where: { type: OrderPlaced }, key: order_id }\n    \
         expect: [{ step: payment, where: { type: PaymentCompleted }, key: order_id, within: 1000h }]\n";
    let mut d = Daemon::with_rules(
        RULE,
        "sources: { events: { type: stdin } }\nsinks: { hook: { type: stdout } }\n",
    );
    let total = 200_000;
    let mut data = Vec::new();
    for i in 0..total {
        writeln!(
            data,
            r#"{{"time":"{}","type":"OrderPlaced","order_id":"o{i}"}}"#,
            ts(i)
        )
        .unwrap();
    }
    let (mut reader, writer) = std::io::pipe().unwrap();
    d.child = Some(
        std::process::Command::new(BIN)
            .args(["run", "--config"])
            .arg(d.path("sagawatch.yaml"))
            .env("SAGAWATCH_LOG", "info")
            .stdin(reader.try_clone().unwrap())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&d.stderr_path).unwrap())
            .spawn()
            .unwrap(),
    );
    let feed = data.clone();
    let feeder = std::thread::spawn(move || {
        let mut writer = writer;
        // Fails with EPIPE only if the reads below have ended, which they do not before
        // this end is closed.
        writer.write_all(&feed).unwrap();
    });
    wait_for(Duration::from_secs(60), "events read from stdin", || {
        (metric(d.port, "sagawatch_events_received_total")? >= 10_000.0).then_some(())
    });
    assert_eq!(d.terminate(), 0, "{}", d.stderr());
    // What the daemon left in the pipe (the read end kept here), once the rest is written.
    let mut left = Vec::new();
    reader.read_to_end(&mut left).unwrap();
    feeder.join().unwrap();
    let taken = data.len() - left.len();
    assert!(!left.is_empty(), "the stop came after the end of the input");
    let lines = data[..taken].iter().filter(|&&b| b == b'\n').count() as i64;
    let c = rusqlite::Connection::open(d.path("state.db")).unwrap();
    let open: i64 = c
        .query_row("SELECT count(*) FROM instances", [], |r| r.get(0))
        .unwrap();
    assert_eq!(open, lines, "{} bytes taken", taken);
    if taken < data.len() && data[taken - 1] != b'\n' {
        assert!(
            d.stderr()
                .contains("stopping in the middle of a stdin line")
        );
    }
}

/// `time.max_ahead`: an event dated years ahead (a producer with a wrong clock) is applied,
/// counted and logged, but does not move the clock, so the open deadlines do not all pass
/// at once; the services' events go on as before.
#[test]
fn an_event_dated_far_ahead_does_not_pass_every_deadline() {
    const RULE: &str = "rules:\n  - name: pay\n    trigger: { where: { type: OrderPlaced }, key: order_id }\n    \
         expect: [{ step: payment, where: { type: PaymentCompleted }, key: order_id, within: 15m }]\n    \
         on_missing: [{ alert: { summary: 'order {{key}} unpaid' } }]\n";
    let mut d = Daemon::with_rules(
        RULE,
        "time: { idle: 0s, max_ahead: 1h }\nsources: { api: { type: http } }\nsinks: { out: { type: stdout } }\nalerts: { sinks: [out] }\n",
    );
    d.start();
    let now = now_nanos();
    let at = |secs: i64| sagawatch::time::format_rfc3339(now + secs * 1_000_000_000);
    let post = |body: String| {
        let (st, b) = http(d.port, "POST", "/v1/events", &[], body.as_bytes()).unwrap();
        assert_eq!(st, 202, "{b}");
    };
    post(format!(
        r#"{{"time":"{}","type":"OrderPlaced","order_id":"a"}}"#,
        at(0)
    ));
    post(r#"{"time":"2099-01-01T00:00:00Z","type":"OrderPlaced","order_id":"z"}"#.into());
    assert_eq!(
        metric(d.port, r#"sagawatch_events_ahead_total{source="api"}"#),
        Some(1.0)
    );
    // Still at a's time.
    let clock = metric(d.port, "sagawatch_engine_clock_seconds").unwrap();
    assert!(
        (clock - now as f64 / 1e9).abs() < 1.0,
        "clock {clock}, a at {now}"
    );
    assert!(
        d.stderr()
            .contains("event dated more than time.max_ahead ahead of the wall clock"),
        "{}",
        d.stderr()
    );
    // a's deadline (15 minutes on) is not past: its payment is on time.
    post(format!(
        r#"{{"time":"{}","type":"PaymentCompleted","order_id":"a"}}"#,
        at(60)
    ));
    wait_for(Duration::from_secs(10), "a's payment counted", || {
        (metric(d.port, r#"sagawatch_steps_total{outcome="satisfied""#) == Some(1.0)).then_some(())
    });
    // Every step's counters exist from the start, at 0.
    let missing = metric(d.port, r#"sagawatch_steps_total{outcome="missing""#);
    assert_eq!(missing, Some(0.0));
    let (_, t) = http(d.port, "GET", "/v1/instances/pay/z", &[], b"").unwrap();
    assert!(t.contains("2099-01-01T00:00:00Z"), "{t}");
    assert_eq!(d.terminate(), 0);
}

/// An instance's timeline lists its own actions only: the outbox keeps those of an earlier
/// instance of the same key (forgotten since) for `outbox.retain`.
#[test]
fn a_timeline_lists_only_its_own_instances_actions() {
    const RULE: &str = "rules:\n  - name: pay\n    trigger: { where: { type: OrderPlaced }, key: order_id }\n    \
         expect: [{ step: payment, where: { type: PaymentCompleted }, key: order_id, within: 5m }]\n    \
         on_missing: [{ alert: { summary: missing } }]\n    dedup: 30m\n    late: 1m\n";
    let mut d = Daemon::with_rules(
        RULE,
        "time: { lateness: 0s }\nsources: { api: { type: http } }\nsinks: { out: { type: stdout } }\n",
    );
    d.start();
    let post = |time: &str, kind: &str| {
        let ev = format!(r#"{{"time":"2026-01-01T{time}:00Z","type":"{kind}","order_id":"k"}}"#);
        assert_eq!(
            http(d.port, "POST", "/v1/events", &[], ev.as_bytes())
                .unwrap()
                .0,
            202
        );
    };
    let actions = || {
        let (st, t) = http(d.port, "GET", "/v1/instances/pay/k", &[], b"").unwrap();
        assert_eq!(st, 200, "{t}");
        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
        (
            v["opened_at"].clone(),
            v["actions"].as_array().unwrap().len(),
        )
    };
    post("09:00", "OrderPlaced");
    post("09:06", "Tick");
    wait_for(
        Duration::from_secs(10),
        "the alert of the first instance",
        || (actions() == ("2026-01-01T09:00:00Z".into(), 1)).then_some(()),
    );
    // Forgotten (past dedup and late), then opened again and paid in time.
    post("09:45", "Tick");
    post("10:00", "OrderPlaced");
    post("10:01", "PaymentCompleted");
    assert_eq!(actions(), ("2026-01-01T10:00:00Z".into(), 0));
    assert_eq!(d.terminate(), 0);
}

/// A trigger that opens a closed instance again (past `dedup`, while `late` still keeps the
/// row) with the old one's time starts a timeline of its own.
#[test]
fn a_trigger_reopening_at_the_same_time_starts_a_fresh_timeline() {
    const RULE: &str = "rules:\n  - name: pay\n    trigger: { where: { type: OrderPlaced }, key: order_id }\n    \
         expect: [{ step: payment, where: { type: PaymentCompleted }, key: order_id, within: 5m }]\n    \
         dedup: 1m\n    late: 1h\n";
    let mut d = Daemon::with_rules(
        RULE,
        "time: { lateness: 0s, idle: 0s }\nsources: { api: { type: http } }\nsinks: { out: { type: stdout } }\n",
    );
    d.start();
    for (time, kind, n) in [
        ("09:00", "OrderPlaced", 1),
        ("09:06", "Tick", 1),
        ("09:10", "Tick", 1),
        ("09:00", "OrderPlaced", 2),
    ] {
        let ev =
            format!(r#"{{"time":"2026-01-01T{time}:00Z","type":"{kind}","order_id":"k","n":{n}}}"#);
        assert_eq!(
            http(d.port, "POST", "/v1/events", &[], ev.as_bytes())
                .unwrap()
                .0,
            202
        );
    }
    let (st, t) = http(d.port, "GET", "/v1/instances/pay/k", &[], b"").unwrap();
    assert_eq!(st, 200, "{t}");
    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
    assert_eq!(v["status"], "open", "{t}");
    assert_eq!(v["trigger"]["n"], 2, "{t}");
    assert_eq!(v["steps"][0]["status"], "open", "{t}");
    assert_eq!(d.terminate(), 0);
}

/// A running daemon whose rule `pay` (payment within 1 s of `OrderPlaced`, `late` as
/// given) alerts to an Alertmanager sink re-sending every second, here a receiver; the
/// idle fallback is off, so the clock stays where the events leave it.
fn alertmanager_daemon(late: &str) -> (Receiver, Daemon) {
    let rule = format!(
        "rules:\n  - name: pay\n    trigger: {{ where: {{ type: OrderPlaced }}, key: order_id }}\n    \
         expect: [{{ step: payment, where: {{ type: PaymentCompleted }}, key: order_id, within: 1s }}]\n    \
         on_missing: [{{ alert: {{ summary: missing, sinks: [am] }} }}]\n    late: {late}\n"
    );
    let mut am = Receiver::new(free_port());
    am.start();
    let mut d = Daemon::with_rules(
        &rule,
        &format!(
            "time: {{ lateness: 0s, idle: 0s }}\nsources: {{ api: {{ type: http }} }}\n\
             sinks: {{ am: {{ type: alertmanager, url: 'http://127.0.0.1:{}', resend: 1s }} }}\n",
            am.port
        ),
    );
    d.start();
    (am, d)
}

/// An alert is resolvable, and re-sent to Alertmanager, while a late correlate can come:
/// its deadline plus `late` on the engine clock, however far that lags wall time (here,
/// with the idle fallback off, it stays where the events left it).
#[test]
fn a_late_correlate_resolves_its_alert_however_far_the_clock_lags_wall_time() {
    let (am, mut d) = alertmanager_daemon("3s");
    let post = |time: &str, kind: &str| {
        let ev = format!(r#"{{"time":"2026-01-01T00:00:{time}Z","type":"{kind}","order_id":"k"}}"#);
        assert_eq!(
            http(d.port, "POST", "/v1/events", &[], ev.as_bytes())
                .unwrap()
                .0,
            202
        );
    };
    post("00", "OrderPlaced");
    post("02", "Tick");
    // Re-sent well past `late` of wall time since it fired.
    let sent = |n| am.requests.load(std::sync::atomic::Ordering::Relaxed) >= n;
    wait_for(Duration::from_secs(10), "the alert", || {
        sent(1).then_some(())
    });
    let fired = std::time::Instant::now();
    wait_for(
        Duration::from_secs(20),
        "re-sends past `late` in wall time",
        || (sent(2) && fired.elapsed() > Duration::from_secs(5)).then_some(()),
    );
    let before = am.requests.load(std::sync::atomic::Ordering::Relaxed);
    wait_for(Duration::from_secs(10), "one more re-send", || {
        sent(before + 1).then_some(())
    });
    // Within deadline + late on the engine clock: late, and the alert resolved.
    post("03", "PaymentCompleted");
    wait_for(Duration::from_secs(10), "the resolve delivered", || {
        let (_, t) = http(d.port, "GET", "/v1/instances/pay/k", &[], b"").ok()?;
        let v: serde_json::Value = serde_json::from_str(&t).ok()?;
        v["actions"]
            .as_array()?
            .iter()
            .any(|a| a["kind"] == "resolve" && a["delivery"] == "delivered")
            .then_some(())
    });
    assert_eq!(d.terminate(), 0, "{}", d.stderr());
}

/// Alertmanager knows alerts by their labels: the missing instances of one rule and step
/// are re-sent as one alert, not one per instance.
#[test]
fn alertmanager_re_sends_one_alert_per_label_set() {
    let (am, mut d) = alertmanager_daemon("1h");
    let body: String = ["a", "b", "c"]
        .iter()
        .map(|k| {
            format!(
                "{{\"time\":\"2026-01-01T00:00:00Z\",\"type\":\"OrderPlaced\",\"order_id\":\"{k}\"}}\n"
            )
        })
        .chain(["{\"time\":\"2026-01-01T00:00:05Z\",\"type\":\"Tick\"}\n".to_string()])
        .collect();
    assert_eq!(
        http(d.port, "POST", "/v1/events", &[], body.as_bytes())
            .unwrap()
            .0,
        202
    );
    // The three alerts, then re-sends.
    wait_for(Duration::from_secs(20), "two re-sends", || {
        (am.received().len() >= 5).then_some(())
    });
    for r in am.received() {
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v.as_array().map(Vec::len), Some(1), "{}", r.body);
    }
    assert_eq!(d.terminate(), 0, "{}", d.stderr());
}

/// Only a response's status counts: a receiver that answers 2xx and then stalls its body
/// has taken the message (it is not sent again); and what a receiver answers goes into the
/// log with its control characters escaped (no forged log lines).
#[test]
fn a_2xx_with_a_stalled_body_is_delivered_and_answers_are_logged_escaped() {
    use std::io::{BufRead, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let mut r = std::io::BufReader::new(conn);
            let mut len = 0;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; len];
            let _ = r.read_exact(&mut body);
            let mut conn = r.into_inner();
            // The alert: 200, and a body that never ends. The compensation: 400, with a
            // line that would read as a log line of sagawatch's own.
            let answer = if String::from_utf8_lossy(&body).contains("compensate") {
                "HTTP/1.1 400 Bad Request\r\nContent-Length: 43\r\n\r\nbad\nZ ERROR sagawatch: FORGED \x1b[31mred\x1b[0m!"
                    .to_string()
            } else {
                "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial".to_string()
            };
            let _ = conn.write_all(answer.as_bytes());
            held.push(conn);
        }
    });
    const RULE: &str = "rules:\n  - name: pay\n    trigger: { where: { type: OrderPlaced }, key: order_id }\n    \
         expect: [{ step: payment, where: { type: PaymentCompleted }, key: order_id, within: 1s }]\n    \
         on_missing:\n      - alert: { summary: missing, sinks: [hook] }\n      - compensate: { sink: hook, payload: { do: compensate } }\n";
    let mut d = Daemon::with_rules(
        RULE,
        &format!(
            "sources: {{ api: {{ type: http }} }}\n\
             sinks: {{ hook: {{ type: webhook, url: 'http://127.0.0.1:{port}/', secrets: ['${{WEBHOOK_SECRET}}'], timeout: 1s }} }}\n"
        ),
    );
    d.start();
    let body = "{\"time\":\"2026-01-01T00:00:00Z\",\"type\":\"OrderPlaced\",\"order_id\":\"a\"}\n\
                {\"time\":\"2026-01-01T00:00:05Z\",\"type\":\"Tick\"}\n";
    assert_eq!(
        http(d.port, "POST", "/v1/events", &[], body.as_bytes())
            .unwrap()
            .0,
        202
    );
    let count = |result: &str| {
        metric(
            d.port,
            &format!("sagawatch_outbox_deliveries_total{{result=\"{result}\",sink=\"hook\"}}"),
        )
    };
    wait_for(
        Duration::from_secs(20),
        "the alert delivered, the compensation retried",
        || (count("delivered") == Some(1.0) && count("retry")? >= 2.0).then_some(()),
    );
    assert!(
        d.stderr()
            .contains(r"HTTP 400 Bad Request: bad\nZ ERROR sagawatch: FORGED \u{1b}[31mred"),
        "{}",
        d.stderr()
    );
    assert!(
        !d.stderr().lines().any(|l| l.starts_with("Z ERROR")),
        "{}",
        d.stderr()
    );
    assert_eq!(d.terminate(), 0, "{}", d.stderr());
}

/// Events held back by `time.max_ahead` are no activity for `time.idle`: a stream of them
/// alone (a producer stamping local time as UTC, say) leaves the clock to the idle
/// fallback, which reports what went missing meanwhile.
#[test]
fn events_dated_ahead_alone_leave_the_clock_to_the_idle_fallback() {
    const RULE: &str = "rules:\n  - name: pay\n    trigger: { where: { type: OrderPlaced }, key: order_id }\n    \
         expect: [{ step: payment, where: { type: PaymentCompleted }, key: order_id, within: 15m }]\n";
    let mut d = Daemon::with_rules(
        RULE,
        "time: { idle: 1s, max_ahead: 5m }\nsources: { api: { type: http } }\nsinks: { out: { type: stdout } }\n",
    );
    d.start();
    let now = now_nanos();
    // Placed 20 minutes ago: its payment is 5 minutes overdue by the wall clock.
    let placed = format!(
        r#"{{"time":"{}","type":"OrderPlaced","order_id":"a"}}"#,
        sagawatch::time::format_rfc3339(now - 20 * 60 * 1_000_000_000)
    );
    let (st, b) = http(d.port, "POST", "/v1/events", &[], placed.as_bytes()).unwrap();
    assert_eq!(st, 202, "{b}");
    let ahead = r#"{"time":"2099-01-01T00:00:00Z","type":"Other","order_id":"z"}"#;
    let mut sent = 0;
    wait_for(
        Duration::from_secs(20),
        "the payment reported missing",
        || {
            // Well within `idle`, all the while.
            let (st, _) = http(d.port, "POST", "/v1/events", &[], ahead.as_bytes()).unwrap();
            assert_eq!(st, 202);
            sent += 1;
            let n = metric(d.port, r#"sagawatch_steps_total{outcome="missing""#);
            (n == Some(1.0)).then_some(())
        },
    );
    assert!(sent > 1);
    assert_eq!(
        metric(d.port, r#"sagawatch_events_ahead_total{source="api"}"#),
        Some(sent as f64)
    );
    assert_eq!(d.terminate(), 0);
}

/// A clock that jumps past thousands of deadlines at once (an upstream outage, a long
/// stop) fires them a chunk at a time; every one is reported, once, as replay reports it.
#[test]
fn a_mass_expiry_reports_every_deadline_once() {
    mass_expiry("time: { idle: 0s }", true);
}

/// The same when the idle fallback moves the clock (to the present, past every deadline):
/// the chunks are committed as they go; replay gives the same ids (its clock differs).
#[test]
fn a_mass_expiry_on_an_idle_stream_reports_every_deadline_once() {
    mass_expiry("time: { idle: 1s }", false);
}

fn mass_expiry(time: &str, later_event: bool) {
    use std::io::BufRead;
    let mut d = Daemon::new(&format!(
        "{time}\nsources: {{ events: {{ type: file, path: events.jsonl }} }}\nsinks: {{ hook: {{ type: stdout }} }}\n"
    ));
    // 9000 orders within a minute (a third of them paid, so their shipment step opens),
    // then (or with the idle fallback) a day later: about 15k deadlines pass at once,
    // several chunks' worth.
    let mut timed = Vec::new();
    for i in 0..9000i64 {
        let t = i / 150;
        let ev =
            |t: i64, ty: &str| format!(r#"{{"time":"{}","type":"{ty}","order_id":"o{i}"}}"#, ts(t));
        timed.push((t, ev(t, "OrderPlaced")));
        if i % 3 == 0 {
            timed.push((t + 1, ev(t + 1, "PaymentCompleted")));
        }
    }
    timed.sort_by_key(|(t, _)| *t);
    let mut lines: Vec<String> = timed.into_iter().map(|(_, l)| l).collect();
    let later = format!(r#"{{"time":"{}","type":"Later"}}"#, ts(86_400));
    write_lines(
        &d.path("replay.jsonl"),
        &[lines.clone(), vec![later.clone()]].concat(),
    );
    if later_event {
        lines.push(later);
    }
    write_lines(&d.path("events.jsonl"), &lines);
    let (want, _) = replay(&d.path("rules"), &d.path("replay.jsonl"));
    assert_eq!(
        want.len(),
        2 * 9000,
        "an alert and a compensation per order"
    );
    let mut child = std::process::Command::new(BIN)
        .args(["run", "--config"])
        .arg(d.path("sagawatch.yaml"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let out = std::io::BufReader::new(child.stdout.take().unwrap());
    d.child = Some(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in out.lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    // An event's fire commits as one batch, so a scrape sees none of its outcomes or all
    // of them, never the count of a part the state file does not hold yet.
    let missing = r#"sagawatch_outcomes_total{outcome="missing",rule="checkout"}"#;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scraped = {
        let (done, port) = (std::sync::Arc::clone(&done), d.port);
        std::thread::spawn(move || {
            let mut seen = std::collections::BTreeSet::new();
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                if let Some(v) = metric(port, missing) {
                    seen.insert(v as u64);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            seen
        })
    };
    let mut got = std::collections::BTreeMap::new();
    let mut printed = 0;
    while got.len() < want.len() {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("an output line within 60 s");
        printed += 1;
        let mut v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if !later_event {
            // Decided at the present, not at the later event's time.
            assert!(v["at"].as_str().unwrap() > ts(86_400).as_str(), "{v}");
            v["at"] = want[v["id"].as_str().unwrap()]["at"].clone();
        }
        got.insert(v["id"].as_str().unwrap().to_string(), v);
    }
    assert_eq!(got, want);
    let total = metric(d.port, missing).unwrap() as u64;
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = scraped.join().unwrap();
    assert_eq!(total, 9000, "a payment or shipment missing per order");
    if later_event {
        assert!(
            seen.iter().all(|v| [0, total].contains(v)),
            "scrapes saw uncommitted counts: {seen:?}"
        );
    }
    assert_eq!(d.terminate(), 0);
    assert_eq!(printed, want.len(), "nothing printed twice");
}

#[test]
fn instance_timeline_over_http_and_inspect() {
    let mut d = Daemon::new(
        "time: { idle: 0s }\nbatch: { interval: 20ms }\nsources: { api: { type: http } }\nsinks: { hook: { type: stdout } }\n",
    );
    d.start();
    for ev in [
        r#"{"time":"2026-03-02T09:00:00Z","type":"OrderPlaced","order_id":"o/1"}"#,
        r#"{"time":"2026-03-02T09:16:00Z","type":"Heartbeat"}"#,
    ] {
        assert_eq!(
            http(d.port, "POST", "/v1/events", &[], ev.as_bytes())
                .unwrap()
                .0,
            202
        );
    }
    let v = wait_for(
        Duration::from_secs(30),
        "delivered actions in the timeline",
        || {
            let (st, body) = http(d.port, "GET", "/v1/instances/checkout/o%2F1", &[], b"").ok()?;
            assert_eq!(st, 200, "{body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            let acts = v["actions"].as_array()?;
            (acts.len() == 2 && acts.iter().all(|a| a["delivery"] == "delivered")).then_some(v)
        },
    );
    assert_eq!(v["status"], "closed");
    assert_eq!(v["opened_at"], "2026-03-02T09:00:00Z");
    assert_eq!(v["trigger"]["order_id"], "o/1");
    assert_eq!(v["trigger"]["type"], "OrderPlaced");
    assert_eq!(v["steps"][0]["step"], "payment");
    assert_eq!(v["steps"][0]["status"], "missing");
    assert_eq!(v["steps"][0]["deadline"], "2026-03-02T09:15:00Z");
    assert_eq!(v["steps"][1]["status"], "not yet open");
    assert_eq!(v["actions"][0]["kind"], "alert");
    assert_eq!(v["actions"][0]["summary"], "order o/1: payment missing");
    assert_eq!(v["actions"][1]["kind"], "compensate");
    assert_eq!(v["actions"][1]["payload"]["type"], "CancelOrder");
    assert_eq!(v["actions"][1]["attempts"], 1);
    let (st, _) = http(d.port, "GET", "/v1/instances/checkout/nope", &[], b"").unwrap();
    assert_eq!(st, 404);

    // The correlate behind each satisfied step: directly, and remembered as early.
    for ev in [
        r#"{"time":"2026-03-02T09:17:00Z","type":"OrderPlaced","order_id":"direct"}"#,
        r#"{"time":"2026-03-02T09:18:00Z","type":"PaymentCompleted","order_id":"direct","n":1}"#,
        r#"{"time":"2026-03-02T09:19:00Z","type":"PaymentCompleted","order_id":"early","n":2}"#,
        r#"{"time":"2026-03-02T09:20:00Z","type":"OrderPlaced","order_id":"early"}"#,
    ] {
        assert_eq!(
            http(d.port, "POST", "/v1/events", &[], ev.as_bytes())
                .unwrap()
                .0,
            202
        );
    }
    for (key, n, at) in [
        ("direct", 1, "2026-03-02T09:18:00Z"),
        ("early", 2, "2026-03-02T09:19:00Z"),
    ] {
        let (st, body) = http(
            d.port,
            "GET",
            &format!("/v1/instances/checkout/{key}"),
            &[],
            b"",
        )
        .unwrap();
        assert_eq!(st, 200, "{body}");
        let t: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(t["steps"][0]["status"], "satisfied", "{key}");
        assert_eq!(t["steps"][0]["satisfied_at"], at, "{key}");
        assert_eq!(t["steps"][0]["event"]["n"], n, "{key}");
        assert_eq!(t["steps"][1]["status"], "open", "{key}");
        assert_eq!(t["trigger"]["type"], "OrderPlaced", "{key}");
    }

    let out = std::process::Command::new(BIN)
        .args(["inspect", "--config"])
        .arg(d.path("sagawatch.yaml"))
        .args(["checkout", "o/1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cli, v);
    // inspect needs only the state path: a secret this shell lacks does not stop it, a
    // state path it cannot know does.
    let cfg = std::fs::read_to_string(d.path("sagawatch.yaml")).unwrap();
    let dir = d.dir.path().to_path_buf();
    let inspect = |cfg: &str| {
        std::fs::write(dir.join("other.yaml"), cfg).unwrap();
        std::process::Command::new(BIN)
            .args(["inspect", "--config"])
            .arg(dir.join("other.yaml"))
            .args(["checkout", "o/1"])
            .env_remove("SAGAWATCH_TEST_UNSET")
            .output()
            .unwrap()
    };
    let out = inspect(&cfg.replace(
        "sinks: { hook: { type: stdout } }",
        "sinks:\n  hook: { type: stdout }\n  w: { type: webhook, url: 'http://127.0.0.1:9/', secrets: ['${SAGAWATCH_TEST_UNSET}'] }",
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(),
        v
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with("warning: "),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A misspelt `state` would read the default file instead: refused.
    let out = inspect(&cfg.replace("state: state.db", "stat: state.db"));
    assert_eq!(out.status.code(), Some(2));
    let out = inspect(&cfg.replace("state: state.db", "state: ${SAGAWATCH_TEST_UNSET}/s.db"));
    assert_eq!(out.status.code(), Some(2));
    // A state path that holds no sagawatch state is a problem with `state` (exit 2), not
    // an instance that is not there (exit 1); and inspect writes nothing.
    std::fs::write(d.path("empty.db"), b"").unwrap();
    std::fs::write(d.path("text.db"), b"not a database\n").unwrap();
    {
        let c = rusqlite::Connection::open(d.path("theirs.db")).unwrap();
        c.execute_batch("CREATE TABLE t (x);").unwrap();
        // One an older sagawatch wrote: its schema lacks what the timeline reads.
        let c = rusqlite::Connection::open(d.path("old.db")).unwrap();
        c.execute_batch("CREATE TABLE instances (x); PRAGMA user_version = 2;")
            .unwrap();
        // Of this version, but damaged where the timeline reads it.
        let c = rusqlite::Connection::open(d.path("damaged.db")).unwrap();
        c.execute_batch(&format!(
            "CREATE TABLE instances (x); PRAGMA user_version = {};",
            sagawatch::store::SCHEMA_VERSION
        ))
        .unwrap();
    }
    for (state, says) in [
        ("rules", "not a regular file"),
        ("empty.db", "not a sagawatch state file"),
        ("theirs.db", "not a sagawatch state file"),
        (
            "old.db",
            "schema version 2 is older than this sagawatch reads",
        ),
        ("text.db", "not a usable SQLite file"),
        ("damaged.db", "no such column"),
    ] {
        let before = std::fs::read(d.path(state)).ok();
        let out = inspect(&cfg.replace("state: state.db", &format!("state: {state}")));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{state}: {err}");
        assert!(err.contains(state) && err.contains(says), "{state}: {err}");
        assert!(
            std::fs::read(d.path(state)).ok() == before,
            "{state} changed"
        );
    }
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("SAGAWATCH_TEST_UNSET"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A late correlate is shown with its step, and when it came.
    let late =
        r#"{"time":"2026-03-02T09:30:00Z","type":"PaymentCompleted","order_id":"o/1","n":3}"#;
    let (st, _) = http(d.port, "POST", "/v1/events", &[], late.as_bytes()).unwrap();
    assert_eq!(st, 202);
    let (st, body) = http(d.port, "GET", "/v1/instances/checkout/o%2F1", &[], b"").unwrap();
    assert_eq!(st, 200, "{body}");
    let t: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(t["steps"][0]["status"], "late", "{body}");
    assert_eq!(t["steps"][0]["deadline"], "2026-03-02T09:15:00Z");
    assert_eq!(t["steps"][0]["late_at"], "2026-03-02T09:30:00Z");
    assert_eq!(t["steps"][0]["event"]["n"], 3);
    // So is one remembered as early that turns out late when its step opens.
    for ev in [
        r#"{"time":"2026-03-02T09:40:00Z","type":"PaymentCompleted","order_id":"e","n":4}"#,
        r#"{"time":"2026-03-02T09:20:00Z","type":"OrderPlaced","order_id":"e"}"#,
    ] {
        assert_eq!(
            http(d.port, "POST", "/v1/events", &[], ev.as_bytes())
                .unwrap()
                .0,
            202
        );
    }
    let (_, body) = http(d.port, "GET", "/v1/instances/checkout/e", &[], b"").unwrap();
    let t: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(t["steps"][0]["status"], "late", "{body}");
    assert_eq!(t["steps"][0]["late_at"], "2026-03-02T09:40:00Z", "{body}");
    assert_eq!(t["steps"][0]["event"]["n"], 4, "{body}");
    assert_eq!(d.terminate(), 0);
    // With no daemon running, inspect reads the file without creating a `-wal` or `-shm`
    // (which, this user's, a daemon running as another one could not write).
    assert!(!d.path("state.db-wal").exists());
    let out = inspect(&cfg);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(t["steps"][0]["status"], "late");
    assert!(!d.path("state.db-wal").exists() && !d.path("state.db-shm").exists());
}

/// The state file holds event contents and outbox bodies: it and its companions are for
/// the daemon's user only, whatever the umask.
#[test]
fn state_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let mut d =
        Daemon::new("sources: { api: { type: http } }\nsinks: { hook: { type: stdout } }\n");
    // Under the usual umask, 022.
    let child = std::process::Command::new("sh")
        .args(["-c", "umask 022 && exec \"$0\" run --config \"$1\""])
        .arg(BIN)
        .arg(d.path("sagawatch.yaml"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    d.child = Some(child);
    let port = d.port;
    wait_for(Duration::from_secs(30), "the daemon to be ready", || {
        matches!(http(port, "GET", "/readyz", &[], b""), Ok((200, _))).then_some(())
    });
    for f in ["state.db", "state.db-wal", "state.db-shm", "state.db.lock"] {
        let mode = std::fs::metadata(d.path(f)).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{f}: {mode:o}");
    }
    assert_eq!(d.terminate(), 0);
}

/// A state write that fails (here the file size limit, as a full disk would) stops the
/// daemon with exit 1 and an error naming the state file; the request whose batch failed
/// is answered 503, and every one answered 202 before is there after the restart.
#[test]
fn a_failed_state_write_stops_the_daemon_and_keeps_what_was_acknowledged() {
    let mut d =
        Daemon::new("sources: { api: { type: http } }\nsinks: { hook: { type: stdout } }\n");
    // Writes past 4 MiB fail: the daemon handles SIGXFSZ, whose default would kill it
    // with nothing said.
    let child = std::process::Command::new("bash")
        .args(["-c", "ulimit -f 4096; exec \"$0\" run --config \"$1\""])
        .arg(BIN)
        .arg(d.path("sagawatch.yaml"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&d.stderr_path).unwrap())
        .spawn()
        .unwrap();
    d.child = Some(child);
    let port = d.port;
    wait_for(Duration::from_secs(30), "the daemon to be ready", || {
        matches!(http(port, "GET", "/readyz", &[], b""), Ok((200, _))).then_some(())
    });
    let mut accepted = 0;
    let refused = (0..100)
        .find_map(|b| {
            let body: Vec<String> = (0..1000)
                .map(|i| {
                    format!(
                        r#"{{"time":"{}","type":"OrderPlaced","order_id":"o{b}-{i}","pad":"{}"}}"#,
                        ts(b),
                        "x".repeat(500)
                    )
                })
                .collect();
            match http(port, "POST", "/v1/events", &[], body.join("\n").as_bytes()) {
                Ok((202, _)) => {
                    accepted += 1000;
                    None
                }
                other => Some(other),
            }
        })
        .expect("the file size limit was reached");
    assert!(
        matches!(&refused, Ok((503, b)) if b.contains("not committed")),
        "{refused:?}"
    );
    let mut c = d.child.take().unwrap();
    let st = wait_for(Duration::from_secs(30), "the daemon to stop", || {
        c.try_wait().unwrap()
    });
    let err = d.stderr();
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "error: state file {}: write failed; batch rolled back",
            d.path("state.db").display()
        )),
        "{err}"
    );
    // Without the limit: all that was acknowledged, and nothing of the failed batch.
    d.start();
    assert!(accepted > 0);
    assert_eq!(
        metric(d.port, "sagawatch_open_instances"),
        Some(accepted as f64)
    );
    assert_eq!(d.terminate(), 0);
}

/// Event bodies are read a few at a time: many large requests at once do not all sit in
/// memory together (each is up to `max_body`, and its lines again).
#[test]
fn concurrent_large_posts_are_read_a_few_at_a_time() {
    let mut d = Daemon::new(
        "sources: { api: { type: http, max_body: 16777216 } }\nsinks: { hook: { type: stdout } }\n",
    );
    d.start();
    let pid = d.child.as_ref().unwrap().id();
    // Peak RSS since the last reset (writing 5 to clear_refs resets it).
    let peak_kib = || -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    };
    let reset_peak = || std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
    reset_peak();
    let before = peak_kib();
    // 12 MiB of events whose last line is bad: each is read and split whole, then
    // refused (400), so nothing reaches the state.
    let mut body = String::new();
    while body.len() < 12 << 20 {
        body.push_str(r#"{"time":"2026-03-02T09:00:00Z","type":"Noise","padding":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#);
        body.push('\n');
    }
    body.push_str("not json\n");
    let port = d.port;
    std::thread::scope(|s| {
        let posts: Vec<_> = (0..16)
            .map(|_| s.spawn(|| http(port, "POST", "/v1/events", &[], body.as_bytes()).unwrap()))
            .collect();
        for p in posts {
            let (st, b) = p.join().unwrap();
            // Refused for its last line, or (a slow machine) after waiting over 10 s for
            // its share of the ingest budget.
            assert!(st == 400 || st == 503, "{st} {b}");
        }
    });
    let grew_mib = peak_kib().saturating_sub(before) / 1024;
    // All 16 at once grew it by 490 MiB here, 2 at once by about 110.
    assert!(grew_mib < 250, "peak RSS grew {grew_mib} MiB");
    // One event of 9 MB, an array of 4.5M numbers: checked as text, not built into a
    // tree (which cost 330 MiB).
    reset_peak();
    let before = peak_kib();
    let mut big = String::from(r#"{"time":"2026-03-02T09:00:00Z","type":"Noise","n":["#);
    big.push_str(&"0,".repeat(4_500_000));
    big.push_str("0]}\n");
    let (st, b) = http(port, "POST", "/v1/events", &[], big.as_bytes()).unwrap();
    assert_eq!(st, 202, "{b}");
    let grew_mib = peak_kib().saturating_sub(before) / 1024;
    assert!(grew_mib < 100, "peak RSS grew {grew_mib} MiB for one event");
    assert_eq!(d.terminate(), 0);
}

/// Bodies that fill the ingest budget (two of `max_body`) while they arrive hold other
/// requests back: after 10 s those get 503 with `Retry-After` instead of piling up; a
/// small request passes while only one large body is being read.
#[test]
fn a_full_ingest_budget_answers_503_with_retry_after() {
    let mut d = Daemon::new(
        "sources: { api: { type: http, max_body: 1000000 } }\nsinks: { hook: { type: stdout } }\n",
    );
    d.start();
    let port = d.port;
    let slow = || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(
            b"POST /v1/events HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 1000000\r\n\r\n{",
        )
        .unwrap();
        s
    };
    let small = || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let ev = r#"{"time":"2026-03-02T09:00:00Z","type":"Noise"}"#;
        write!(
            s,
            "POST /v1/events HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{ev}",
            ev.len()
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let first = slow();
    // Wait until the first body is being read (its share taken): a small one still passes.
    wait_for(
        Duration::from_secs(10),
        "a small request beside one slow body",
        || small().starts_with("HTTP/1.1 202").then_some(()),
    );
    let second = slow();
    // (A small request that got in before the second body took its share passes: ask
    // again.)
    let out = wait_for(
        Duration::from_secs(60),
        "a 503 while two bodies arrive",
        || {
            let out = small();
            out.starts_with("HTTP/1.1 503").then_some(out)
        },
    );
    assert!(out.to_ascii_lowercase().contains("retry-after: 1"), "{out}");
    drop((first, second));
    wait_for(Duration::from_secs(10), "the budget back", || {
        small().starts_with("HTTP/1.1 202").then_some(())
    });
    assert_eq!(d.terminate(), 0);
}

/// The read API runs at most a few queries at once, each on a kept connection: many
/// concurrent listings neither open a connection each (each with its page cache, on a
/// thread of its own) nor fail.
#[test]
fn concurrent_reads_share_a_bounded_set_of_connections() {
    let mut d = Daemon::new(
        "batch: { interval: 20ms }\nsources: { api: { type: http } }\nsinks: { hook: { type: stdout } }\n",
    );
    d.start();
    let mut body = String::new();
    for i in 0..20_000 {
        body.push_str(&format!(
            "{{\"time\":\"2026-03-02T09:00:00Z\",\"type\":\"OrderPlaced\",\"order_id\":\"o{i}\"}}\n"
        ));
    }
    assert_eq!(
        http(d.port, "POST", "/v1/events", &[], body.as_bytes())
            .unwrap()
            .0,
        202
    );
    let pid = d.child.as_ref().unwrap().id();
    // File descriptors on the state file: the core's, the dispatcher's, the
    // checkpointer's, and the readers'.
    let state_fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|fds| {
                fds.filter_map(|f| std::fs::read_link(f.ok()?.path()).ok())
                    .filter(|p| p.to_string_lossy().ends_with("state.db"))
                    .count()
            })
            .unwrap_or(0)
    };
    let done = std::sync::atomic::AtomicBool::new(false);
    let port = d.port;
    let peak = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(state_fds());
            }
            peak
        });
        let readers: Vec<_> = (0..48)
            .map(|_| {
                s.spawn(move || {
                    http(
                        port,
                        "GET",
                        "/v1/instances?status=open&limit=1000",
                        &[],
                        b"",
                    )
                    .unwrap()
                })
            })
            .collect();
        for r in readers {
            let (st, b) = r.join().unwrap();
            assert_eq!(st, 200, "{b}");
            assert_eq!(
                serde_json::from_str::<serde_json::Value>(&b).unwrap()["items"]
                    .as_array()
                    .unwrap()
                    .len(),
                1000
            );
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        sampler.join().unwrap()
    });
    assert!(peak <= 3 + 4, "{peak} connections on the state file");
    assert_eq!(d.terminate(), 0);
}

#[test]
fn instance_listing_pages_through_the_status_indexes() {
    let mut d = Daemon::new(
        "time: { idle: 0s }\nbatch: { interval: 20ms }\nsources: { api: { type: http } }\nsinks: { hook: { type: stdout } }\n",
    );
    d.start();
    let mut body = String::new();
    for i in 0..5 {
        body.push_str(&format!(
            "{{\"time\":\"2026-03-02T09:0{i}:00Z\",\"type\":\"OrderPlaced\",\"order_id\":\"o{i}\"}}\n"
        ));
    }
    // o0 and o1 are paid; then the clock passes o0..o2's payment deadlines.
    body.push_str(r#"{"time":"2026-03-02T09:05:00Z","type":"PaymentCompleted","order_id":"o0"}"#);
    body.push('\n');
    body.push_str(r#"{"time":"2026-03-02T09:05:00Z","type":"PaymentCompleted","order_id":"o1"}"#);
    body.push('\n');
    body.push_str(r#"{"time":"2026-03-02T09:17:30Z","type":"Heartbeat"}"#);
    assert_eq!(
        http(d.port, "POST", "/v1/events", &[], body.as_bytes())
            .unwrap()
            .0,
        202
    );
    let get = |q: &str| -> serde_json::Value {
        let (st, b) = http(d.port, "GET", &format!("/v1/instances?{q}"), &[], b"").unwrap();
        assert_eq!(st, 200, "{q}: {b}");
        serde_json::from_str(&b).unwrap()
    };
    let keys = |v: &serde_json::Value| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["key"].as_str().unwrap().to_string())
            .collect()
    };
    // Open, oldest first, two per page: o0, o1 (shipment pending), o3, o4.
    let p1 = get("status=open&limit=2");
    assert_eq!(keys(&p1), ["o0", "o1"]);
    let cursor = p1["next_cursor"].as_str().unwrap();
    let p2 = get(&format!("status=open&limit=2&cursor={cursor}"));
    assert_eq!(keys(&p2), ["o3", "o4"]);
    let p3 = get(&format!(
        "status=open&limit=2&cursor={}",
        p2["next_cursor"].as_str().unwrap()
    ));
    assert_eq!(keys(&p3), Vec::<String>::new());
    // Missing, most recent deadline first: only o2 (o3's deadline 09:18 not passed).
    let m = get("status=missing&rule=checkout");
    assert_eq!(keys(&m), ["o2"]);
    assert_eq!(m["items"][0]["missing_deadline"], "2026-03-02T09:17:00Z");
    // Opened more than 16 minutes before the clock (09:17:30): o0 and o1.
    assert_eq!(keys(&get("status=open&older_than=16m")), ["o0", "o1"]);
    assert_eq!(keys(&get("status=open&rule=other")), Vec::<String>::new());
    // The last of repeated parameters counts, an empty `rule` being no filter.
    assert_eq!(keys(&get("status=missing&rule=other&rule=")), ["o2"]);
    // A page position in the open order means nothing in the missing order.
    let (st, b) = http(
        d.port,
        "GET",
        &format!("/v1/instances?status=missing&cursor={cursor}"),
        &[],
        b"",
    )
    .unwrap();
    assert_eq!(st, 400, "{b}");
    assert!(b.contains("cursor of a status=open listing"), "{b}");
    for bad in [
        "status=stuck",
        "limit=0",
        "older_than=soon",
        "cursor=zz",
        "colour=red",
    ] {
        let (st, b) = http(d.port, "GET", &format!("/v1/instances?{bad}"), &[], b"").unwrap();
        assert_eq!(st, 400, "{bad}: {b}");
    }
    assert_eq!(d.terminate(), 0);
}

/// A SIGTERM while the core applies a large ingest request answers that request once its
/// events are committed, though that takes longer than the 5 s open requests get: cut
/// off, its sender would see a failure and send again what was applied.
#[test]
fn sigterm_answers_an_ingest_request_the_core_has_taken() {
    let mut d = Daemon::new(
        "time: { idle: 0s }\nsources: { api: { type: http, max_body: 67108864 } }\nsinks: { hook: { type: stdout } }\n",
    );
    d.start();
    // Enough triggers that applying them takes the debug build well over 5 s.
    let n = 200_000;
    let mut body = String::with_capacity(n * 80);
    for i in 0..n {
        body.push_str(&format!(
            "{{\"time\":\"2026-03-02T09:00:00Z\",\"type\":\"OrderPlaced\",\"order_id\":\"o{i}\"}}\n"
        ));
    }
    let port = d.port;
    let post = std::thread::spawn(move || http(port, "POST", "/v1/events", &[], body.as_bytes()));
    // The core has the request once it counts its lines as received.
    wait_for(
        Duration::from_secs(60),
        "the core to take the request",
        || (metric(d.port, "sagawatch_events_received_total")? == n as f64).then_some(()),
    );
    let stopping = std::time::Instant::now();
    assert_eq!(d.terminate(), 0);
    let (st, b) = post
        .join()
        .unwrap()
        .expect("an answer, not a cut connection");
    assert_eq!(st, 202, "{b}");
    assert_eq!(b.trim(), format!("{{\"accepted\":{n}}}"));
    eprintln!("answered {:?} after SIGTERM", stopping.elapsed());
    // Committed: the restarted daemon has the last one.
    d.start();
    let (st, b) = http(
        d.port,
        "GET",
        &format!("/v1/instances/checkout/o{}", n - 1),
        &[],
        b"",
    )
    .unwrap();
    assert_eq!(st, 200, "{b}");
    assert_eq!(d.terminate(), 0);
}

/// SIGTERM gives deliveries in flight the grace period (5 s), not the sink's timeout, and
/// an idle keep-alive connection (a scraper's) does not hold the exit up; what was cut
/// short is still pending after a restart.
#[test]
fn sigterm_bounds_in_flight_deliveries_and_idle_connections() {
    use std::io::{Read, Write};
    // A receiver that accepts and never answers.
    let hang = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hang_port = hang.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    {
        let accepted = std::sync::Arc::clone(&accepted);
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for s in hang.incoming().flatten() {
                held.push(s);
                accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
    }
    let mut d = Daemon::new(&format!(
        "time: {{ idle: 0s }}\nbatch: {{ interval: 20ms }}\nsources: {{ api: {{ type: http }} }}\n\
         sinks:\n  hook: {{ type: webhook, url: 'http://127.0.0.1:{hang_port}/hook', secrets: ['${{WEBHOOK_SECRET}}'], timeout: 120s }}\n\
         alerts: {{ sinks: [hook] }}\n"
    ));
    d.start();
    // An idle keep-alive connection, as a Prometheus scraper leaves between scrapes.
    let mut idle = std::net::TcpStream::connect(("127.0.0.1", d.port)).unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 256];
    assert!(idle.read(&mut buf).unwrap() > 0);
    for ev in [
        r#"{"time":"2026-03-02T09:00:00Z","type":"OrderPlaced","order_id":"o-1"}"#,
        r#"{"time":"2026-03-02T09:16:00Z","type":"Heartbeat"}"#,
    ] {
        let (st, b) = http(d.port, "POST", "/v1/events", &[], ev.as_bytes()).unwrap();
        assert_eq!(st, 202, "{b}");
    }
    wait_for(Duration::from_secs(30), "a delivery in flight", || {
        (accepted.load(std::sync::atomic::Ordering::SeqCst) > 0).then_some(())
    });
    // The grace period (5 s), not the sink's timeout (120 s) nor the idle connection's
    // header timeout (30 s after its request): well under 20 s however slow the machine.
    let stopping = std::time::Instant::now();
    assert_eq!(d.terminate(), 0, "{}", d.stderr());
    assert!(
        stopping.elapsed() < Duration::from_secs(20),
        "{:?}",
        stopping.elapsed()
    );
    assert!(
        d.stderr().contains("deliveries in flight"),
        "{}",
        d.stderr()
    );
    drop(idle);
    d.start();
    // Kept: the restarted daemon sends it again.
    wait_for(
        Duration::from_secs(30),
        "the cut delivery sent again",
        || (accepted.load(std::sync::atomic::Ordering::SeqCst) > 1).then_some(()),
    );
}

/// A receiver answering 503 with `Retry-After` is sent nothing sooner than it asked, even
/// though the backoff alone would retry within 300 ms; meanwhile its messages keep their
/// order.
#[test]
fn retry_after_is_honoured() {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::{Arc, Mutex};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let times: Arc<Mutex<Vec<(std::time::Instant, String)>>> = Arc::default();
    {
        let times = Arc::clone(&times);
        std::thread::spawn(move || {
            for s in listener.incoming().flatten() {
                let mut r = BufReader::new(s);
                let mut len = 0;
                let mut line = String::new();
                while r.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                    line.clear();
                }
                let mut body = vec![0; len];
                r.read_exact(&mut body).unwrap();
                let id = String::from_utf8_lossy(&body).into_owned();
                let first = {
                    let mut t = times.lock().unwrap();
                    t.push((std::time::Instant::now(), id));
                    t.len() == 1
                };
                let answer = if first {
                    "HTTP/1.1 503 Service Unavailable\r\nretry-after: 2\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                } else {
                    "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                };
                let _ = r.get_mut().write_all(answer.as_bytes());
            }
        });
    }
    let mut d = Daemon::new(&format!(
        "time: {{ idle: 0s }}\nbatch: {{ interval: 20ms }}\nsources: {{ api: {{ type: http }} }}\n\
         sinks:\n  hook: {{ type: webhook, url: 'http://127.0.0.1:{port}/hook', secrets: ['${{WEBHOOK_SECRET}}'] }}\n\
         alerts: {{ sinks: [hook] }}\noutbox: {{ concurrency: 1, backoff: 50ms, max_backoff: 300ms }}\n"
    ));
    d.start();
    let body = "{\"time\":\"2026-03-02T09:00:00Z\",\"type\":\"OrderPlaced\",\"order_id\":\"o-1\"}\n{\"time\":\"2026-03-02T09:00:01Z\",\"type\":\"OrderPlaced\",\"order_id\":\"o-2\"}\n{\"time\":\"2026-03-02T09:16:00Z\",\"type\":\"Heartbeat\"}";
    let (st, b) = http(d.port, "POST", "/v1/events", &[], body.as_bytes()).unwrap();
    assert_eq!(st, 202, "{b}");
    // The first message is o-1's alert; while it waits for its retry, the payment arrives
    // late and resolves it.
    wait_for(Duration::from_secs(30), "the refused alert", || {
        let t = times.lock().unwrap();
        t.first()
            .map(|(_, b)| assert!(b.contains("alert.firing") && b.contains("\"o-1\""), "{b}"))
    });
    let late = r#"{"time":"2026-03-02T09:16:30Z","type":"PaymentCompleted","order_id":"o-1"}"#;
    let (st, b) = http(d.port, "POST", "/v1/events", &[], late.as_bytes()).unwrap();
    assert_eq!(st, 202, "{b}");
    // The refused message comes again (same body), no sooner than 2 s after.
    let waited = wait_for(
        Duration::from_secs(30),
        "the refused delivery again",
        || {
            let t = times.lock().unwrap();
            let (first, body) = t.first()?;
            let again = t[1..].iter().find(|(_, b)| b == body)?;
            Some(again.0 - *first)
        },
    );
    assert!(waited >= Duration::from_secs(2), "retried after {waited:?}");
    // The receiver's Retry-After held the whole sink: o-2's messages (another lane) waited
    // too.
    wait_for(Duration::from_secs(30), "o-2's messages", || {
        let t = times.lock().unwrap();
        (t.iter().filter(|(_, b)| b.contains("\"o-2\"")).count() >= 2).then_some(())
    });
    {
        let t = times.lock().unwrap();
        for (at, b) in &t[1..] {
            assert!(
                *at - t[0].0 >= Duration::from_secs(2),
                "sent during the pause: {b}"
            );
        }
    }
    // Nothing of o-1's instance step overtook the alert waiting for its retry: the
    // compensation and the resolve come after it.
    let order = wait_for(Duration::from_secs(30), "the resolve", || {
        let t = times.lock().unwrap();
        t.iter()
            .any(|(_, b)| b.contains("alert.resolved"))
            .then(|| t.iter().map(|(_, b)| b.clone()).collect::<Vec<_>>())
    });
    let kinds: Vec<&str> = order
        .iter()
        .filter(|b| b.contains("\"o-1\""))
        .map(|b| {
            ["alert.firing", "alert.resolved", "compensate"]
                .into_iter()
                .find(|k| b.contains(k))
                .unwrap_or("?")
        })
        .collect();
    assert_eq!(kinds[..2], ["alert.firing", "alert.firing"], "{kinds:?}");
    assert_eq!(d.terminate(), 0);
}

/// A receiver that accepts connections and never answers holds only its own sink's
/// delivery slots: the other sink's messages are delivered meanwhile.
#[test]
fn a_hanging_receiver_does_not_hold_up_other_sinks() {
    let hang = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hang_port = hang.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in hang.incoming().flatten() {
            held.push(s);
        }
    });
    let hook = free_port();
    let mut rx = Receiver::new(hook);
    rx.start();
    let mut d = Daemon::new(&format!(
        "time: {{ idle: 0s }}\nbatch: {{ interval: 20ms }}\nsources: {{ api: {{ type: http }} }}\n\
         sinks:\n  hook: {{ type: webhook, url: 'http://127.0.0.1:{hook}/hook', secrets: ['${{WEBHOOK_SECRET}}'] }}\n\
         \x20 hang: {{ type: webhook, url: 'http://127.0.0.1:{hang_port}/hook', secrets: ['${{WEBHOOK_SECRET}}'], timeout: 120s }}\n\
         alerts: {{ sinks: [hang, hook] }}\noutbox: {{ concurrency: 1 }}\n"
    ));
    d.start();
    let mut body = String::new();
    for i in 0..5 {
        body.push_str(&format!(
            "{{\"time\":\"2026-03-02T09:00:0{i}Z\",\"type\":\"OrderPlaced\",\"order_id\":\"o-{i}\"}}\n"
        ));
    }
    body.push_str(r#"{"time":"2026-03-02T09:16:00Z","type":"Heartbeat"}"#);
    let (st, b) = http(d.port, "POST", "/v1/events", &[], body.as_bytes()).unwrap();
    assert_eq!(st, 202, "{b}");
    // Five alerts and five compensations for `hook`, one at a time, while the first
    // delivery to `hang` waits out its 120 s timeout.
    wait_for(Duration::from_secs(30), "hook's messages", || {
        (distinct(&rx) >= 10).then_some(())
    });
    let alerts = rx
        .received()
        .iter()
        .filter(|r| r.body.contains("sagawatch.alert.firing"))
        .map(|r| r.id.clone())
        .collect::<std::collections::BTreeSet<_>>();
    assert_eq!(alerts.len(), 5);
    assert!(rx.received().iter().all(|r| r.signed));
    d.kill();
}

/// `listen: …:0` takes any free port; the startup log names the one bound, so that it can
/// be found.
#[test]
fn a_listen_port_of_0_is_reported_as_bound_and_loopback_is_guarded_on_any_address() {
    let mut d = Daemon::new(&with_port(
        &hook_config("sources: { in: { type: http } }\n"),
        free_port(),
    ));
    let cfg = std::fs::read_to_string(d.path("sagawatch.yaml")).unwrap();
    // A wildcard address: loopback connections come in on it too.
    let cfg = cfg.replace(&format!("127.0.0.1:{}", d.port), "0.0.0.0:0");
    std::fs::write(d.path("sagawatch.yaml"), cfg).unwrap();
    let log = std::fs::File::create(&d.stderr_path).unwrap();
    let child = std::process::Command::new(BIN)
        .args(["run", "--log-format", "json", "--config"])
        .arg(d.path("sagawatch.yaml"))
        .env("SAGAWATCH_LOG", "info")
        .env("WEBHOOK_SECRET", SECRET)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    // Killed on drop, should an assertion fail.
    d.child = Some(child);
    let port = wait_for(Duration::from_secs(30), "the startup line", || {
        d.stderr().lines().find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            let listen = v["fields"]["listen"].as_str()?;
            let port: u16 = listen.rsplit_once(':')?.1.parse().ok()?;
            Some(port)
        })
    });
    assert_ne!(port, 0, "{}", d.stderr());
    let (code, _) = http(port, "GET", "/healthz", &[], b"").unwrap();
    assert_eq!(code, 200);
    // Over loopback, a foreign Host is refused (DNS rebinding) whatever the listener.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /v1/rules HTTP/1.1\r\nhost: evil.example\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert_eq!(d.terminate(), 0, "{}", d.stderr());
}

/// A reader that stops reading the `stdout` sink (a full pipe blocks every write) holds up
/// that sink alone: the other sinks deliver, health answers, SIGTERM ends the daemon.
#[test]
fn a_stdout_nobody_reads_holds_up_only_its_own_sink() {
    let hook = free_port();
    let mut rx = Receiver::new(hook);
    rx.start();
    let mut d = Daemon::new(&format!(
        "time: {{ idle: 0s }}\nsources: {{ events: {{ type: file, path: events.jsonl }} }}\n\
         sinks:\n  out: {{ type: stdout }}\n  hook: {{ type: webhook, url: 'http://127.0.0.1:{hook}/hook', secrets: ['${{WEBHOOK_SECRET}}'], timeout: 2s }}\n\
         alerts: {{ sinks: [out] }}\noutbox: {{ backoff: 50ms, max_backoff: 300ms }}\n"
    ));
    // 600 orders never paid (about 200 kB of alert lines, three pipes' worth), then one
    // a day later that moves the clock past their deadlines.
    let n = 600;
    let mut lines: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"{{"time":"{}","type":"OrderPlaced","order_id":"o{i}"}}"#,
                ts(0)
            )
        })
        .collect();
    lines.push(format!(
        r#"{{"time":"{}","type":"OrderPlaced","order_id":"last"}}"#,
        ts(86_400)
    ));
    write_lines(&d.path("events.jsonl"), &lines);
    let log = std::fs::File::create(&d.stderr_path).unwrap();
    let mut child = std::process::Command::new(BIN)
        .args(["run", "--config"])
        .arg(d.path("sagawatch.yaml"))
        .env("WEBHOOK_SECRET", SECRET)
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    // Held open, never read.
    let _stdout = child.stdout.take();
    d.child = Some(child);
    wait_for(
        Duration::from_secs(60),
        "every compensation to reach the webhook",
        || (distinct(&rx) >= n).then_some(()),
    );
    assert_eq!(http(d.port, "GET", "/healthz", &[], b"").unwrap().0, 200);
    assert_eq!(d.terminate(), 0, "{}", d.stderr());
}

/// Messages kept for a sink that is no longer configured wait as much as any: they count
/// in the backlog gauge under that sink's name.
#[test]
fn the_backlog_counts_messages_kept_for_a_removed_sink() {
    let down = free_port();
    let rules = RULES.replace("sink: hook", "sink: old");
    let mut d = Daemon::with_rules(
        &rules,
        &format!(
            "time: {{ idle: 0s }}\nsources: {{ events: {{ type: file, path: events.jsonl }} }}\n\
             sinks:\n  out: {{ type: stdout }}\n  old: {{ type: webhook, url: 'http://127.0.0.1:{down}/x', secrets: ['${{WEBHOOK_SECRET}}'], timeout: 1s }}\n\
             alerts: {{ sinks: [out] }}\n"
        ),
    );
    write_lines(
        &d.path("events.jsonl"),
        &[
            r#"{"time":"2026-01-01T00:00:00Z","type":"OrderPlaced","order_id":"a"}"#.into(),
            r#"{"time":"2026-01-01T01:00:00Z","type":"Tick"}"#.into(),
        ],
    );
    d.start();
    let old = r#"sagawatch_outbox_backlog{sink="old"}"#;
    wait_for(
        Duration::from_secs(30),
        "a message for the old sink",
        || (metric(d.port, old)? == 1.0).then_some(()),
    );
    assert_eq!(d.terminate(), 0);
    std::fs::write(
        d.path("rules/checkout.yaml"),
        RULES.replace("sink: hook", "sink: out"),
    )
    .unwrap();
    let cfg = std::fs::read_to_string(d.path("sagawatch.yaml")).unwrap();
    let cfg: String = cfg
        .lines()
        .filter(|l| !l.trim_start().starts_with("old:"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(d.path("sagawatch.yaml"), cfg).unwrap();
    d.start();
    wait_for(
        Duration::from_secs(30),
        "the kept message in the backlog",
        || (metric(d.port, old)? == 1.0).then_some(()),
    );
    assert_eq!(d.terminate(), 0);
}

/// A request waiting for its batch when SIGTERM comes is answered 202 once the batch is
/// committed at the stop, even when `batch.interval` is longer than the shutdown grace.
#[test]
fn sigterm_answers_requests_waiting_for_their_batch() {
    let mut d = Daemon::new(
        "time: { idle: 0s }\nbatch: { interval: 1h }\nsources: { api: { type: http } }\nsinks: { hook: { type: stdout } }\n",
    );
    d.start();
    let port = d.port;
    let post = std::thread::spawn(move || {
        let ev = r#"{"time":"2026-03-02T09:00:00Z","type":"OrderPlaced","order_id":"o-1"}"#;
        http(port, "POST", "/v1/events", &[], ev.as_bytes())
    });
    wait_for(
        Duration::from_secs(30),
        "the event in the open batch",
        || (metric(d.port, "sagawatch_events_received_total")? == 1.0).then_some(()),
    );
    assert_eq!(d.terminate(), 0, "{}", d.stderr());
    let (st, body) = post.join().unwrap().expect("an answer");
    assert_eq!(st, 202, "{body}");
    // Committed: the restarted daemon has the instance.
    d.start();
    let (st, body) = http(d.port, "GET", "/v1/instances/checkout/o-1", &[], b"").unwrap();
    assert_eq!(st, 200, "{body}");
    assert_eq!(d.terminate(), 0);
}

/// Webhooks over HTTPS: the receiver's certificate is verified, here against the sink's
/// `ca_file`; a sink without it does not trust the test CA, so its deliveries fail (and
/// are retried) with the reason in the timeline, and the receiver never sees them.
#[test]
fn https_webhooks_verify_the_receiver_certificate() {
    let pki = Pki::new();
    let (cert, key) = pki.issue(true);
    let port = free_port();
    let mut rx = Receiver::new(port);
    rx.start_tls(&cert, &key, None);
    let mut d = Daemon::new(&format!(
        "time: {{ idle: 0s }}\nbatch: {{ interval: 20ms }}\nsources: {{ api: {{ type: http }} }}\n\
         sinks:\n  hook: {{ type: webhook, url: 'https://127.0.0.1:{port}/hook', secrets: ['${{WEBHOOK_SECRET}}'], ca_file: ca.pem }}\n  \
         untrusted: {{ type: webhook, url: 'https://127.0.0.1:{port}/hook', secrets: ['${{WEBHOOK_SECRET}}'] }}\n\
         alerts: {{ sinks: [hook, untrusted] }}\noutbox: {{ backoff: 50ms, max_backoff: 300ms }}\n"
    ));
    std::fs::write(d.path("ca.pem"), &pki.ca).unwrap();
    d.start();
    let body = "{\"time\":\"2026-03-02T09:00:00Z\",\"type\":\"OrderPlaced\",\"order_id\":\"o-1\"}\n{\"time\":\"2026-03-02T09:16:00Z\",\"type\":\"Heartbeat\"}";
    let (st, b) = http(d.port, "POST", "/v1/events", &[], body.as_bytes()).unwrap();
    assert_eq!(st, 202, "{b}");
    // The alert and the compensation, signed, over TLS.
    wait_for(Duration::from_secs(30), "both messages over https", || {
        (rx.received().len() >= 2).then_some(())
    });
    let got = rx.received();
    assert!(got.iter().all(|r| r.signed), "{got:?}");
    assert!(
        got.iter().any(|r| r.body.contains("alert.firing")),
        "{got:?}"
    );
    assert!(
        got.iter().any(|r| r.body.contains("CancelOrder")),
        "{got:?}"
    );
    // The other sink's alert: refused by its own certificate check, kept and retried.
    let error = wait_for(
        Duration::from_secs(30),
        "the untrusted sink's error",
        || {
            let (st, b) = http(d.port, "GET", "/v1/instances/checkout/o-1", &[], b"").ok()?;
            assert_eq!(st, 200, "{b}");
            let v: serde_json::Value = serde_json::from_str(&b).unwrap();
            let a = v["actions"]
                .as_array()?
                .iter()
                .find(|a| a["sink"] == "untrusted")?
                .clone();
            assert_eq!(a["delivery"], "pending", "{a}");
            let e = a["last_error"].as_str()?.to_string();
            (a["attempts"].as_i64()? >= 2).then_some(e)
        },
    );
    // OpenSSL's reason, once (the TLS error repeats its cause's text).
    assert_eq!(
        error.matches("certificate verify failed").count(),
        1,
        "{error}"
    );
    assert!(
        error.contains("(unable to get local issuer certificate)"),
        "{error}"
    );
    assert!(rx.tls_failures.load(std::sync::atomic::Ordering::Relaxed) >= 2);
    assert_eq!(rx.received().len(), 2);
    assert_eq!(d.terminate(), 0);
}

/// Sinks reach their receivers through the proxy that `HTTPS_PROXY` and `HTTP_PROXY`
/// name (a real one, tinyproxy, asking for credentials): HTTPS end to end inside its
/// `CONNECT` tunnel, plain HTTP through a tunnel too; a host that `NO_PROXY` names is
/// reached directly. Wrong credentials: deliveries wait, retried, with the proxy's answer
/// in the timeline. The password shows in no log and no error.
#[test]
fn webhooks_go_through_the_proxy_the_environment_names() {
    let pki = Pki::new();
    let (cert, key) = pki.issue(true);
    let (tls_port, plain_port, direct_port) = (free_port(), free_port(), free_port());
    let mut secure = Receiver::new(tls_port);
    secure.start_tls(&cert, &key, None);
    let mut plain = Receiver::new(plain_port);
    plain.start();
    let mut direct = Receiver::new(direct_port);
    direct.start();
    let proxy = Proxy::start("sagawatch", "pr0xy-pw");
    let mut d = Daemon::new(&format!(
        "time: {{ idle: 0s }}\nbatch: {{ interval: 20ms }}\nsources: {{ api: {{ type: http }} }}\n\
         sinks:\n  hook: {{ type: webhook, url: 'https://127.0.0.1:{tls_port}/hook', secrets: ['${{WEBHOOK_SECRET}}'], ca_file: ca.pem }}\n  \
         plain: {{ type: webhook, url: 'http://127.0.0.1:{plain_port}/hook', secrets: ['${{WEBHOOK_SECRET}}'] }}\n  \
         direct: {{ type: webhook, url: 'http://localhost:{direct_port}/hook', secrets: ['${{WEBHOOK_SECRET}}'] }}\n\
         alerts: {{ sinks: [hook, plain, direct] }}\noutbox: {{ backoff: 50ms, max_backoff: 300ms }}\n"
    ));
    std::fs::write(d.path("ca.pem"), &pki.ca).unwrap();
    let through = |pw: &str| format!("http://sagawatch:{pw}@127.0.0.1:{}", proxy.port);
    d.env = vec![
        ("https_proxy".into(), through("pr0xy-pw")),
        ("HTTP_PROXY".into(), through("pr0xy-pw")),
        ("NO_PROXY".into(), "localhost".into()),
        ("SAGAWATCH_LOG".into(), "info".into()),
    ];
    d.start();
    let order = |id: &str, minute: u32| {
        format!(
            "{{\"time\":\"2026-03-02T{minute:02}:00:00Z\",\"type\":\"OrderPlaced\",\"order_id\":\"{id}\"}}\n\
             {{\"time\":\"2026-03-02T{minute:02}:16:00Z\",\"type\":\"Heartbeat\"}}"
        )
    };
    let (st, b) = http(
        d.port,
        "POST",
        "/v1/events",
        &[],
        order("o-1", 9).as_bytes(),
    )
    .unwrap();
    assert_eq!(st, 202, "{b}");
    wait_for(Duration::from_secs(30), "every sink's messages", || {
        let n = (
            secure.received().len(),
            plain.received().len(),
            direct.received().len(),
        );
        (n == (2, 1, 1)).then_some(())
    });
    for r in [&secure, &plain, &direct] {
        assert!(r.received().iter().all(|m| m.signed));
    }
    let log = proxy.log();
    assert!(
        log.contains(&format!("CONNECT 127.0.0.1:{tls_port} ")),
        "{log}"
    );
    assert!(
        log.contains(&format!("CONNECT 127.0.0.1:{plain_port} ")),
        "{log}"
    );
    assert!(!log.contains(&format!(":{direct_port}")), "{log}");
    assert_eq!(d.terminate(), 0);
    let said = d.stderr();
    assert!(said.contains("delivering through a proxy"), "{said}");
    assert!(
        said.contains(&format!("127.0.0.1:{}", proxy.port)),
        "{said}"
    );

    // Wrong credentials: the proxy answers 407; the message waits and is retried.
    d.env[0].1 = through("wr0ng-pw");
    d.start();
    let (st, b) = http(
        d.port,
        "POST",
        "/v1/events",
        &[],
        order("o-2", 10).as_bytes(),
    )
    .unwrap();
    assert_eq!(st, 202, "{b}");
    let error = wait_for(Duration::from_secs(30), "the proxy's refusal", || {
        let (st, b) = http(d.port, "GET", "/v1/instances/checkout/o-2", &[], b"").ok()?;
        assert_eq!(st, 200, "{b}");
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        let a = v["actions"]
            .as_array()?
            .iter()
            .find(|a| a["sink"] == "hook" && a["kind"] == "alert")?
            .clone();
        assert_eq!(a["delivery"], "pending", "{a}");
        let e = a["last_error"].as_str()?.to_string();
        (a["attempts"].as_i64()? >= 2).then_some(e)
    });
    assert!(
        error.contains(&format!("proxy 127.0.0.1:{}", proxy.port))
            && error.contains(&format!(
                "401 Unauthorized\" to CONNECT 127.0.0.1:{tls_port}"
            ))
            && error.contains("check the credentials"),
        "{error}"
    );
    assert_eq!(secure.received().len(), 2, "nothing got past the proxy");
    assert_eq!(d.terminate(), 0);
    let said = d.stderr();
    for secret in ["pr0xy-pw", "wr0ng-pw"] {
        assert!(!said.contains(secret), "{said}");
        assert!(!error.contains(secret), "{error}");
    }

    // A proxy that takes the connection and never answers CONNECT: the sink's timeout,
    // naming the proxy it went through.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let config = std::fs::read_to_string(d.path("sagawatch.yaml")).unwrap();
    std::fs::write(
        d.path("sagawatch.yaml"),
        config.replace("ca_file: ca.pem }", "ca_file: ca.pem, timeout: 1s }"),
    )
    .unwrap();
    d.env[0].1 = format!("http://127.0.0.1:{silent_port}");
    d.start();
    let (st, b) = http(
        d.port,
        "POST",
        "/v1/events",
        &[],
        order("o-3", 11).as_bytes(),
    )
    .unwrap();
    assert_eq!(st, 202, "{b}");
    let error = wait_for(
        Duration::from_secs(30),
        "the silent proxy's timeout",
        || {
            let (_, b) = http(d.port, "GET", "/v1/instances/checkout/o-3", &[], b"").ok()?;
            let v: serde_json::Value = serde_json::from_str(&b).unwrap();
            let a = v["actions"]
                .as_array()?
                .iter()
                .find(|a| a["sink"] == "hook" && a["kind"] == "alert")?
                .clone();
            a["last_error"].as_str().map(str::to_string)
        },
    );
    assert_eq!(
        error,
        format!("timed out after 1s (through the proxy http://127.0.0.1:{silent_port}/)")
    );
    assert_eq!(d.terminate(), 0);
}

/// Messages keep their order within an instance only: one a receiver keeps refusing does
/// not hold back the alerts of a later instance of the same key (until its give-up).
#[test]
fn a_refused_message_does_not_hold_back_a_later_instance_of_its_key() {
    let port = free_port();
    let mut rx = Receiver::new(port);
    // The first instance's alert (its deadline 09:15) is refused, every time.
    rx.refuse.lock().unwrap().push("T09:15:00".into());
    rx.start();
    let rules = "rules:\n  - name: checkout\n    trigger: { where: { type: OrderPlaced }, key: order_id }\n    \
                 expect: [{ step: payment, where: { type: PaymentCompleted }, key: order_id, within: 15m }]\n    \
                 on_missing: [{ alert: { summary: 'order {{key}}: {{step}} missing' } }]\n    dedup: 1m\n";
    let mut d = Daemon::with_rules(
        rules,
        &format!(
            "time: {{ idle: 0s }}\nbatch: {{ interval: 20ms }}\nsources: {{ api: {{ type: http }} }}\n\
             sinks:\n  hook: {{ type: webhook, url: 'http://127.0.0.1:{port}/hook', secrets: ['${{WEBHOOK_SECRET}}'] }}\n\
             alerts: {{ sinks: [hook] }}\noutbox: {{ backoff: 50ms, max_backoff: 200ms }}\n"
        ),
    );
    d.start();
    let event = |t: &str, ty: &str| order_event(t, ty, "o-1");
    let body = [
        event("09:00", "OrderPlaced"),
        event("09:16", "Heartbeat"),
        event("10:00", "OrderPlaced"),
        event("10:16", "Heartbeat"),
    ]
    .concat();
    let (st, b) = http(d.port, "POST", "/v1/events", &[], body.as_bytes()).unwrap();
    assert_eq!(st, 202, "{b}");
    let got = wait_for(
        Duration::from_secs(30),
        "the second instance's alert",
        || {
            let got = rx.received();
            got.iter()
                .any(|r| r.body.contains("T10:15:00"))
                .then_some(got)
        },
    );
    // The first instance's alert is still refused and retried, not given up.
    assert!(got.iter().all(|r| !r.body.contains("T09:15:00")), "{got:?}");
    assert!(
        rx.requests.load(std::sync::atomic::Ordering::Relaxed) > got.len(),
        "{got:?}"
    );
    assert_eq!(
        metric(
            d.port,
            "sagawatch_outbox_deliveries_total{result=\"given_up\""
        ),
        Some(0.0)
    );
    assert_eq!(d.terminate(), 0);
}

/// A late correlate ends its own instance's alert only: an earlier instance of the key
/// (closed, its alert still firing while `late` runs) keeps its alert.
#[test]
fn a_late_correlate_resolves_only_its_own_instances_alert() {
    let rules = "rules:\n  - name: checkout\n    trigger: { where: { type: OrderPlaced }, key: order_id }\n    \
                 expect: [{ step: payment, where: { type: PaymentCompleted }, key: order_id, within: 10m }]\n    \
                 on_missing: [{ alert: { summary: 'order {{key}}: {{step}} missing' } }]\n    dedup: 1h\n    late: 24h\n";
    let mut d = Daemon::with_rules(
        rules,
        "time: { idle: 0s }\nsources: { api: { type: http } }\nsinks: { hook: { type: webhook, url: 'http://127.0.0.1:9/hook', secrets: ['${WEBHOOK_SECRET}'] } }\n\
         alerts: { sinks: [hook] }\n",
    );
    d.start();
    let event = |t: &str, ty: &str| order_event(t, ty, "k");
    let body = [
        event("00:00", "OrderPlaced"),
        event("00:11", "Heartbeat"),
        event("01:20", "OrderPlaced"),
        event("01:31", "Heartbeat"),
        event("01:35", "PaymentCompleted"),
    ]
    .concat();
    let (st, b) = http(d.port, "POST", "/v1/events", &[], body.as_bytes()).unwrap();
    assert_eq!(st, 202, "{b}");
    // Committed with the answer.
    let c = read_state(&d);
    let kinds: Vec<(String, String)> = c
        .prepare("SELECT kind, body FROM outbox ORDER BY seq")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .map(|(k, b): (String, String)| {
            let v: serde_json::Value = serde_json::from_str(&b).unwrap();
            (k, v["data"]["opened_at"].as_str().unwrap().to_string())
        })
        .collect();
    let at = |t: &str| format!("2026-03-02T{t}:00Z");
    assert_eq!(
        kinds,
        [
            ("alert".to_string(), at("00:00")),
            ("alert".to_string(), at("01:20")),
            ("resolve".to_string(), at("01:20")),
        ]
    );
    assert_eq!(d.terminate(), 0);
}

/// A step's timeline shows its own correlate, not an early correlate that another rule's
/// trigger read for the same event (same step number, a time that would fit).
#[test]
fn a_timeline_step_shows_its_own_correlate() {
    let rules = "rules:\n  - name: a\n    trigger: { where: { type: PaymentCompleted }, key: order_id }\n    \
                 expect: [{ step: audit, where: { type: Audited }, key: order_id, within: 1h }]\n  \
                 - name: b\n    trigger: { where: { type: OrderPlaced }, key: order_id }\n    \
                 expect: [{ step: pay, where: { type: PaymentCompleted }, key: order_id, within: 10m }]\n    \
                 late: 1h\n";
    let mut d = Daemon::with_rules(
        rules,
        "time: { idle: 0s, lateness: 0s }\nsources: { api: { type: http } }\nsinks: { out: { type: stdout } }\n",
    );
    d.start();
    let body = [
        order_event("00:00", "OrderPlaced", "k"),
        order_event("00:20", "Audited", "k"),
        order_event("00:21", "PaymentCompleted", "k"),
    ]
    .concat();
    let (st, b) = http(d.port, "POST", "/v1/events", &[], body.as_bytes()).unwrap();
    assert_eq!(st, 202, "{b}");
    let (st, t) = http(d.port, "GET", "/v1/instances/b/k", &[], b"").unwrap();
    assert_eq!(st, 200, "{t}");
    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
    assert_eq!(v["steps"][0]["status"], "late", "{t}");
    assert_eq!(v["steps"][0]["event"]["type"], "PaymentCompleted", "{t}");
    assert_eq!(v["steps"][0]["late_at"], "2026-03-02T00:21:00Z", "{t}");
    assert_eq!(d.terminate(), 0);
}

/// A message held behind an older one of its lane that waits for a retry is not due
/// before that retry: it is not read again at every round, and many of them do not fill
/// the window of due messages that the sink's others are found in.
#[test]
fn a_message_held_behind_a_retry_waits_until_then() {
    let port = free_port();
    let mut rx = Receiver::new(port);
    // Alerts are refused: each instance's compensation waits behind its alert.
    rx.refuse.lock().unwrap().push("alert.firing".into());
    rx.start();
    let mut d = Daemon::new(&format!(
        "time: {{ idle: 0s }}\nbatch: {{ interval: 20ms }}\nsources: {{ api: {{ type: http }} }}\n\
         sinks:\n  hook: {{ type: webhook, url: 'http://127.0.0.1:{port}/hook', secrets: ['${{WEBHOOK_SECRET}}'] }}\n\
         alerts: {{ sinks: [hook] }}\noutbox: {{ backoff: 3s, max_backoff: 3s }}\n"
    ));
    d.start();
    let body = "{\"time\":\"2026-03-02T09:00:00Z\",\"type\":\"OrderPlaced\",\"order_id\":\"o-1\"}\n{\"time\":\"2026-03-02T09:16:00Z\",\"type\":\"Heartbeat\"}";
    let (st, b) = http(d.port, "POST", "/v1/events", &[], body.as_bytes()).unwrap();
    assert_eq!(st, 202, "{b}");
    let c = read_state(&d);
    let rows = || -> Vec<(String, i64, i64)> {
        c.prepare("SELECT kind, attempts, next_ms FROM outbox ORDER BY seq")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    let got = wait_for(
        Duration::from_secs(30),
        "the compensation due with its alert's retry",
        || {
            let got = rows();
            (got.len() == 2 && got[0].1 >= 1 && got[1].2 == got[0].2).then_some(got)
        },
    );
    assert_eq!(
        (got[0].0.as_str(), got[1].0.as_str(), got[1].1),
        ("alert", "compensate", 0)
    );
    assert!(rx.received().is_empty(), "{:?}", rx.received());
    assert_eq!(d.terminate(), 0);
}

/// A sink's `ca_file` replaces the system's CAs, as in Prometheus' TLS settings: here the
/// "system" store (`SSL_CERT_FILE`) holds the CA that signed the receiver, which the sink
/// without `ca_file` trusts and the one whose `ca_file` names another CA does not.
#[test]
fn a_ca_file_replaces_the_system_cas() {
    let (system, other) = (Pki::new(), Pki::new());
    let (cert, key) = system.issue(true);
    let port = free_port();
    let mut rx = Receiver::new(port);
    rx.start_tls(&cert, &key, None);
    let mut d = Daemon::new(&format!(
        "time: {{ idle: 0s }}\nbatch: {{ interval: 20ms }}\nsources: {{ api: {{ type: http }} }}\n\
         sinks:\n  sys: {{ type: webhook, url: 'https://127.0.0.1:{port}/hook', secrets: ['${{WEBHOOK_SECRET}}'] }}\n  \
         hook: {{ type: webhook, url: 'https://127.0.0.1:{port}/hook', secrets: ['${{WEBHOOK_SECRET}}'], ca_file: other.pem }}\n\
         alerts: {{ sinks: [sys, hook] }}\noutbox: {{ backoff: 50ms, max_backoff: 300ms }}\n"
    ));
    std::fs::write(d.path("system.pem"), &system.ca).unwrap();
    std::fs::write(d.path("other.pem"), &other.ca).unwrap();
    std::fs::create_dir(d.path("no-certs")).unwrap();
    d.env = vec![
        (
            "SSL_CERT_FILE".into(),
            d.path("system.pem").display().to_string(),
        ),
        (
            "SSL_CERT_DIR".into(),
            d.path("no-certs").display().to_string(),
        ),
    ];
    d.start();
    let body = "{\"time\":\"2026-03-02T09:00:00Z\",\"type\":\"OrderPlaced\",\"order_id\":\"o-1\"}\n{\"time\":\"2026-03-02T09:16:00Z\",\"type\":\"Heartbeat\"}";
    let (st, b) = http(d.port, "POST", "/v1/events", &[], body.as_bytes()).unwrap();
    assert_eq!(st, 202, "{b}");
    wait_for(Duration::from_secs(30), "the alert through sys", || {
        (!rx.received().is_empty()).then_some(())
    });
    // hook's alert: refused, as its own CA did not sign the receiver's certificate, and
    // retried (its compensation waits behind it, in order).
    wait_for(Duration::from_secs(30), "hook's failed attempts", || {
        let (_, b) = http(d.port, "GET", "/v1/instances/checkout/o-1", &[], b"").ok()?;
        let v: serde_json::Value = serde_json::from_str(&b).ok()?;
        let hook: Vec<&serde_json::Value> = v["actions"]
            .as_array()?
            .iter()
            .filter(|a| a["sink"] == "hook")
            .collect();
        let alert = hook.iter().find(|a| a["kind"] == "alert")?;
        (hook.len() == 2
            && hook.iter().all(|a| a["delivery"] == "pending")
            && alert["attempts"].as_i64()? >= 2
            && alert["last_error"]
                .as_str()?
                .contains("unable to get local issuer certificate"))
        .then_some(())
    });
    let got = rx.received();
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        got[0].signed && got[0].body.contains("alert.firing"),
        "{got:?}"
    );
    assert_eq!(d.terminate(), 0);
}

/// A receiver that asks for a client certificate gets the one in the sink's `cert_file`
/// (here with an RSA key in its traditional PEM form, which the client takes as well); a
/// sink with none cannot deliver there, and keeps its message.
#[test]
fn a_client_certificate_is_shown_to_receivers_that_ask() {
    let pki = Pki::new();
    let (cert, key) = pki.issue(true);
    let rsa = openssl::rsa::Rsa::generate(2048).unwrap();
    let client_key = openssl::pkey::PKey::from_rsa(rsa.clone()).unwrap();
    let client_cert = pki.issue_for(false, &client_key);
    let port = free_port();
    let mut rx = Receiver::new(port);
    rx.start_tls(&cert, &key, Some(&pki.ca));
    let mut d = Daemon::new(&format!(
        "time: {{ idle: 0s }}\nbatch: {{ interval: 20ms }}\nsources: {{ api: {{ type: http }} }}\n\
         sinks:\n  hook: {{ type: webhook, url: 'https://127.0.0.1:{port}/hook', secrets: ['${{WEBHOOK_SECRET}}'], ca_file: ca.pem, cert_file: client.pem, key_file: client.key }}\n  \
         anonymous: {{ type: webhook, url: 'https://127.0.0.1:{port}/hook', secrets: ['${{WEBHOOK_SECRET}}'], ca_file: ca.pem }}\n\
         alerts: {{ sinks: [hook, anonymous] }}\noutbox: {{ backoff: 50ms, max_backoff: 300ms }}\n"
    ));
    std::fs::write(d.path("ca.pem"), &pki.ca).unwrap();
    std::fs::write(d.path("client.pem"), &client_cert).unwrap();
    let traditional = rsa.private_key_to_pem().unwrap();
    assert!(traditional.starts_with(b"-----BEGIN RSA PRIVATE KEY-----"));
    std::fs::write(d.path("client.key"), traditional).unwrap();
    d.start();
    let body = "{\"time\":\"2026-03-02T09:00:00Z\",\"type\":\"OrderPlaced\",\"order_id\":\"o-1\"}\n{\"time\":\"2026-03-02T09:16:00Z\",\"type\":\"Heartbeat\"}";
    let (st, b) = http(d.port, "POST", "/v1/events", &[], body.as_bytes()).unwrap();
    assert_eq!(st, 202, "{b}");
    wait_for(Duration::from_secs(30), "hook's two messages", || {
        (rx.received().len() >= 2).then_some(())
    });
    wait_for(
        Duration::from_secs(30),
        "anonymous's failed attempts",
        || {
            let (_, b) = http(d.port, "GET", "/v1/instances/checkout/o-1", &[], b"").ok()?;
            let v: serde_json::Value = serde_json::from_str(&b).ok()?;
            let a = v["actions"]
                .as_array()?
                .iter()
                .find(|a| a["sink"] == "anonymous")?
                .clone();
            assert_eq!(a["delivery"], "pending", "{a}");
            (a["attempts"].as_i64()? >= 2 && a["last_error"].is_string()).then_some(())
        },
    );
    assert!(rx.tls_failures.load(std::sync::atomic::Ordering::Relaxed) >= 2);
    let got = rx.received();
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got.iter().all(|r| r.signed), "{got:?}");
    assert_eq!(d.terminate(), 0);
}

/// Alerts leave while intake goes on: the outbox dispatcher records what it delivered
/// between two of the core's batches (it starved before: the core begins its next batch
/// right after each commit, and SQLite's busy handler, polling with sleeps, almost never
/// caught the moment; alerts waited for the end of the intake, and after the busy
/// timeout were sent again). After a stop in the middle of the intake, the restart reads
/// on from the stored offset: every alert of the replay arrives, once.
#[test]
fn alerts_leave_during_a_long_intake_and_a_stop_in_it_loses_nothing() {
    const RULE: &str = "rules:\n  - name: pay\n    trigger: { where: { type: OrderPlaced }, key: order_id }\n    \
         expect: [{ step: payment, where: { type: PaymentCompleted }, key: order_id, within: 15m }]\n    \
         on_missing: [{ alert: { summary: 'order {{key}} unpaid' } }]\n";
    let port = free_port();
    let mut rx = Receiver::new(port);
    rx.start();
    let mut d = Daemon::with_rules(
        RULE,
        &format!(
            "time: {{ idle: 0s }}\n\
             sources: {{ events: {{ type: file, path: events.jsonl, follow: false }} }}\n\
             sinks: {{ hook: {{ type: webhook, url: 'http://127.0.0.1:{port}/hook', secrets: ['${{WEBHOOK_SECRET}}'], headers: {{ user-agent: custom/1 }} }} }}\n\
             alerts: {{ sinks: [hook] }}\noutbox: {{ concurrency: 32 }}\n"
        ),
    );
    // An order a second, none paid: from the 900th on, each event passes a deadline.
    let total = 50_000;
    let lines: Vec<String> = (0..total as i64)
        .map(|i| {
            format!(
                r#"{{"time":"{}","type":"OrderPlaced","order_id":"o{i}"}}"#,
                ts(i)
            )
        })
        .collect();
    write_lines(&d.path("events.jsonl"), &lines);
    let (want, late) = replay(&d.path("rules"), &d.path("events.jsonl"));
    assert_eq!((want.len(), late), (total - 901, 0));
    d.start();
    let (delivered, read) = wait_for(Duration::from_secs(120), "deliveries", || {
        let n = rx.received().len();
        let read = metric(d.port, "sagawatch_events_received_total")?;
        if n >= 100 {
            return Some((n, read));
        }
        assert!(
            read < total as f64,
            "the intake ended with {n} deliveries made meanwhile"
        );
        None
    });
    assert!(read < total as f64, "{delivered} delivered, {read} read");
    // The stop applies what the sources had queued for the core (up to 64 chunks of
    // 1000 lines, each line here firing a deadline): in a debug build under a loaded
    // machine that takes longer than terminate()'s usual 30 s.
    assert_eq!(d.terminate_within(Duration::from_secs(180)), 0);
    d.start();
    wait_delivered(&d, &rx, want.len(), Duration::from_secs(300));
    let got = rx.received();
    assert_matches_replay(&got, &want, 0);
    // The receiver answers at once and the stop was clean: nothing was sent twice.
    assert_eq!(got.len(), want.len(), "deliveries repeated");
    // A configured User-Agent replaces sagawatch's own.
    assert!(
        got.iter().all(|r| r.user_agents == ["custom/1"]),
        "{:?}",
        got[0].user_agents
    );
    assert_eq!(d.terminate(), 0);
}

/// A message is given up at its give-up age, not at the retry after it: with a
/// `max_backoff` far longer than `give_up`, the last attempt is made at the age.
#[test]
fn a_message_is_given_up_at_its_age_whatever_the_backoff() {
    let port = free_port();
    let mut rx = Receiver::new(port);
    rx.refuse.lock().unwrap().push("T09:15:00".into());
    rx.start();
    let rules = "rules:\n  - name: checkout\n    trigger: { where: { type: OrderPlaced }, key: order_id }\n    \
                 expect: [{ step: payment, where: { type: PaymentCompleted }, key: order_id, within: 15m }]\n    \
                 on_missing: [{ alert: { summary: 'order {{key}}: {{step}} missing' } }]\n";
    let mut d = Daemon::with_rules(
        rules,
        &format!(
            "time: {{ idle: 0s }}\nbatch: {{ interval: 20ms }}\nsources: {{ api: {{ type: http }} }}\n\
             sinks:\n  hook: {{ type: webhook, url: 'http://127.0.0.1:{port}/hook', secrets: ['${{WEBHOOK_SECRET}}'] }}\n\
             alerts: {{ sinks: [hook] }}\noutbox: {{ backoff: 1h, max_backoff: 1h, give_up: 2s }}\n"
        ),
    );
    d.start();
    let body = [
        order_event("09:00", "OrderPlaced", "o-1"),
        order_event("09:16", "Heartbeat", "o-1"),
    ]
    .concat();
    let (st, b) = http(d.port, "POST", "/v1/events", &[], body.as_bytes()).unwrap();
    assert_eq!(st, 202, "{b}");
    // (Half an hour at least to the second attempt before: its backoff, with jitter.)
    wait_for(Duration::from_secs(30), "the message given up", || {
        let given_up = metric(
            d.port,
            "sagawatch_outbox_deliveries_total{result=\"given_up\"",
        )?;
        (given_up == 1.0).then_some(())
    });
    // The first attempt and the last, at the age (only the last, on a machine slow
    // enough that the first came after it).
    let tries = rx.requests.load(std::sync::atomic::Ordering::Relaxed);
    assert!((1..=2).contains(&tries), "{tries} attempts");
    assert!(d.stderr().contains("giving up on a message"));
    assert_eq!(d.terminate(), 0);
}
