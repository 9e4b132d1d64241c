//! The alertmanager sink against Debian's real `prometheus-alertmanager`: a missing step
//! fires an alert that Alertmanager lists with the expected labels and annotations, and a
//! late correlate resolves it.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

struct Alertmanager {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Alertmanager {
    fn start() -> Alertmanager {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("alertmanager.yml");
        std::fs::write(
            &cfg,
            "route:\n  receiver: default\nreceivers:\n  - name: default\n",
        )
        .unwrap();
        let port = free_port();
        let child = Command::new("prometheus-alertmanager")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address=")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus-alertmanager is installed by scripts/test.sh");
        wait_for(Duration::from_secs(30), "Alertmanager to be ready", || {
            matches!(http(port, "GET", "/-/ready", &[], b""), Ok((200, _))).then_some(())
        });
        Alertmanager {
            child,
            port,
            _dir: dir,
        }
    }

    fn alerts(&self) -> Vec<serde_json::Value> {
        let (st, body) = http(self.port, "GET", "/api/v2/alerts", &[], b"").unwrap();
        assert_eq!(st, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A daemon taking events over HTTP and sending alerts to `am`, re-sent every `resend`.
fn daemon(am: &Alertmanager, resend: &str) -> Daemon {
    let mut d = Daemon::new(&format!(
        "time: {{ idle: 0s }}\nbatch: {{ interval: 20ms }}\nsources: {{ api: {{ type: http }} }}\n\
         sinks:\n  am: {{ type: alertmanager, url: 'http://127.0.0.1:{}', resend: {resend} }}\n  hook: {{ type: stdout }}\n\
         alerts: {{ sinks: [am] }}\n",
        am.port
    ));
    d.start();
    d
}

/// Posts one event; it is committed when this returns.
fn post(d: &Daemon, ev: &str) {
    let (st, b) = http(d.port, "POST", "/v1/events", &[], ev.as_bytes()).unwrap();
    assert_eq!(st, 202, "{b}");
}

/// Waits until Alertmanager shows no alert of the checkout rule (resolved ones drop out).
fn wait_resolved(am: &Alertmanager) {
    wait_for(Duration::from_secs(30), "the alert to be resolved", || {
        (!am.alerts()
            .iter()
            .any(|a| a["labels"]["rule"] == "checkout"))
        .then_some(())
    });
}

#[test]
fn missing_step_fires_in_alertmanager_and_a_late_correlate_resolves_it() {
    let am = Alertmanager::start();
    let mut d = daemon(&am, "1s");
    let post = |ev: &str| post(&d, ev);
    post(r#"{"time":"2026-03-02T09:00:00Z","type":"OrderPlaced","order_id":"o-1"}"#);
    // Another event moves the clock past the payment deadline (09:15).
    post(r#"{"time":"2026-03-02T09:16:00Z","type":"Heartbeat"}"#);
    let alert = wait_for(Duration::from_secs(30), "the alert in Alertmanager", || {
        am.alerts()
            .into_iter()
            .find(|a| a["labels"]["rule"] == "checkout")
    });
    let labels = alert["labels"].as_object().unwrap();
    assert_eq!(labels["alertname"], "SagaStepMissing");
    assert_eq!(labels["step"], "payment");
    assert_eq!(labels["severity"], "critical");
    assert!(
        !labels.contains_key("key"),
        "the correlation key is not a label"
    );
    assert_eq!(
        alert["annotations"]["summary"],
        "order o-1: payment missing"
    );
    assert_eq!(alert["annotations"]["key"], "o-1");
    assert_eq!(alert["annotations"]["deadline"], "2026-03-02T09:15:00Z");
    assert_eq!(alert["status"]["state"], "active");
    // Re-sent while firing: Alertmanager sees its endsAt move forward.
    let first_end = alert["endsAt"].as_str().unwrap().to_string();
    wait_for(
        Duration::from_secs(30),
        "a re-send of the firing alert",
        || {
            am.alerts()
                .into_iter()
                .find(|a| a["labels"]["rule"] == "checkout")
                .filter(|a| a["endsAt"].as_str().unwrap() > first_end.as_str())
        },
    );
    // The late payment resolves it.
    post(r#"{"time":"2026-03-02T09:20:00Z","type":"PaymentCompleted","order_id":"o-1"}"#);
    wait_resolved(&am);
    assert_eq!(d.terminate(), 0);
}

/// Alertmanager knows alerts by labels: two orders missing the same step are one alert
/// there, and a late payment for one of them must not resolve it while the other is still
/// missing.
#[test]
fn a_shared_alert_stays_firing_until_every_instance_behind_it_is_resolved() {
    let am = Alertmanager::start();
    // No re-sends during the test: what Alertmanager shows is what the late events caused.
    let mut d = daemon(&am, "1h");
    let post = |ev: &str| post(&d, ev);
    let firing = || {
        am.alerts()
            .into_iter()
            .find(|a| a["labels"]["rule"] == "checkout" && a["status"]["state"] == "active")
    };
    let delivered = || {
        metric(
            d.port,
            r#"sagawatch_outbox_deliveries_total{result="delivered",sink="am"}"#,
        )
    };
    let drained =
        || (metric(d.port, r#"sagawatch_outbox_backlog{sink="am"}"#) == Some(0.0)).then_some(());
    post(r#"{"time":"2026-03-02T09:00:00Z","type":"OrderPlaced","order_id":"o-1"}"#);
    post(r#"{"time":"2026-03-02T09:00:30Z","type":"OrderPlaced","order_id":"o-2"}"#);
    post(r#"{"time":"2026-03-02T09:16:00Z","type":"Heartbeat"}"#);
    wait_for(Duration::from_secs(30), "both alerts delivered", || {
        (delivered() == Some(2.0)).then_some(())
    });
    assert!(firing().is_some(), "{:?}", am.alerts());
    // o-1's payment arrives late; o-2's is still missing: no resolve may go out.
    post(r#"{"time":"2026-03-02T09:20:00Z","type":"PaymentCompleted","order_id":"o-1"}"#);
    // Answered after its batch committed, with whatever it queued: no resolve.
    let (st, t) = http(d.port, "GET", "/v1/instances/checkout/o-1", &[], b"").unwrap();
    assert_eq!(st, 200, "{t}");
    let t: serde_json::Value = serde_json::from_str(&t).unwrap();
    let actions = t["actions"].as_array().unwrap();
    assert!(!actions.is_empty(), "{t}");
    assert!(
        actions.iter().all(|a| a["kind"] != "resolve"),
        "a resolve was queued while o-2 still fires: {t}"
    );
    wait_for(Duration::from_secs(30), "the outbox to drain", drained);
    assert_eq!(
        delivered(),
        Some(2.0),
        "a resolve was sent while o-2 still fires"
    );
    assert!(firing().is_some(), "resolved too early: {:?}", am.alerts());
    // o-2's late payment leaves nothing firing: now the resolve goes out.
    post(r#"{"time":"2026-03-02T09:21:00Z","type":"PaymentCompleted","order_id":"o-2"}"#);
    wait_resolved(&am);
    assert_eq!(d.terminate(), 0);
}
