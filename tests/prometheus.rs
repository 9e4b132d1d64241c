//! The dashboards and alerting rules against Debian's real Prometheus: it scrapes a
//! running daemon while a workload with missing, late and undeliverable steps flows
//! through, then every query of every dashboard panel must parse and return data;
//! `promtool check metrics` is clean on a live scrape; the alerting rules pass
//! `promtool check rules` and their unit tests.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_prometheus(target_port: u16) -> Prometheus {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\n\
             scrape_configs:\n  - job_name: sagawatch\n    static_configs: [ {{ targets: ['127.0.0.1:{target_port}'] }} ]\n"
        ),
    )
    .unwrap();
    let port = free_port();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus is installed by scripts/test.sh");
    wait_for(Duration::from_secs(60), "Prometheus to be ready", || {
        matches!(http(port, "GET", "/-/ready", &[], b""), Ok((200, _))).then_some(())
    });
    Prometheus {
        child,
        port,
        _dir: dir,
    }
}

/// Evaluates an instant query; the number of series in the result.
fn query(port: u16, q: &str) -> Result<usize, String> {
    let (st, body) = http(
        port,
        "GET",
        &format!("/api/v1/query?query={}", urlencode(q)),
        &[],
        b"",
    )
    .map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    if st != 200 || v["status"] != "success" {
        return Err(format!("HTTP {st}: {body}"));
    }
    Ok(v["data"]["result"].as_array().map_or(0, Vec::len))
}

#[test]
fn every_dashboard_query_returns_data_from_a_live_daemon() {
    let dead = free_port();
    let mut d = Daemon::new(&format!(
        "time: {{ idle: 0s }}\nbatch: {{ interval: 20ms }}\n\
         sources:\n  events: {{ type: file, path: events.jsonl }}\n  api: {{ type: http }}\n\
         sinks:\n  hook: {{ type: stdout }}\n  pager: {{ type: webhook, url: 'http://127.0.0.1:{dead}/', secrets: ['${{WEBHOOK_SECRET}}'], timeout: 1s }}\n\
         alerts: {{ sinks: [pager] }}\n\
         outbox: {{ backoff: 100ms, max_backoff: 200ms, give_up: 1s }}\n"
    ));
    let mut lines = checkout_events(3000, 17);
    lines.insert(10, "{not json".into());
    lines.insert(20, r#"{"type":"OrderPlaced","order_id":"no-time"}"#.into());
    write_lines(&d.path("events.jsonl"), &lines);
    d.start();
    let (st, b) = http(d.port, "POST", "/-/reload", &[], b"").unwrap();
    assert_eq!(st, 200, "{b}");
    wait_for(Duration::from_secs(60), "given-up deliveries", || {
        (metric(
            d.port,
            "sagawatch_outbox_deliveries_total{result=\"given_up\"",
        )? > 0.0)
            .then_some(())
    });

    // The live scrape is clean for promtool.
    let (_, scrape) = http(d.port, "GET", "/metrics", &[], b"").unwrap();
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        check
            .stdin
            .take()
            .unwrap()
            .write_all(scrape.as_bytes())
            .unwrap();
    }
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let prom = start_prometheus(d.port);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards");
    let mut checked = 0;
    for name in ["sagawatch-overview.json", "sagawatch-rule.json"] {
        let dash: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(name)).unwrap()).unwrap();
        let vars = dash["templating"]["list"].as_array().unwrap();
        assert!(
            vars.iter()
                .any(|v| v["name"] == "datasource" && v["type"] == "datasource")
        );
        for p in dash["panels"].as_array().unwrap() {
            assert_eq!(
                p["datasource"]["uid"], "${datasource}",
                "{name}: {}",
                p["title"]
            );
            for t in p["targets"].as_array().unwrap() {
                assert_eq!(t["datasource"]["uid"], "${datasource}");
                let expr = t["expr"]
                    .as_str()
                    .unwrap()
                    .replace("$__rate_interval", "30s")
                    .replace("$rule", "checkout");
                wait_for(
                    Duration::from_secs(90),
                    &format!("data for {name} / {}: {expr}", p["title"]),
                    || match query(prom.port, &expr) {
                        Ok(n) if n > 0 => Some(()),
                        Ok(_) => None,
                        Err(e) => panic!("{name} / {}: {expr}: {e}", p["title"]),
                    },
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 20, "{checked} queries");
    assert_eq!(d.terminate(), 0);
}

#[test]
fn alerting_rules_pass_promtool_check_and_unit_tests() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards/prometheus");
    for args in [
        &["check", "rules", "sagawatch-alerts.yaml"][..],
        &["test", "rules", "sagawatch-alerts.test.yaml"][..],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
