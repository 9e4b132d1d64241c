//! Kafka end to end against a real Kafka-protocol broker (tansu): an order saga across
//! three co-partitioned topics whose missing steps become commands on a commands topic,
//! checked against `replay` of the same events; SIGKILLs during a 200k-event stream; a
//! paused and a restarted broker; two instances in one consumer group; the startup check
//! of partition counts.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Duration;

use common::kafka::{Broker, Consumed};
use common::*;

const KAFKA_RULES: &str = r#"
rules:
  - name: checkout
    trigger: { source: orders, where: { type: OrderPlaced }, key: order_id }
    expect:
      - step: payment
        source: payments
        where: { type: PaymentCompleted }
        key: order_id
        within: 15m
      - step: shipment
        source: shipments
        where: { type: OrderShipped }
        key: order_id
        after: payment
        within: 2h
    cancel:
      - { source: orders, where: { type: OrderCancelled }, key: order_id }
    on_missing:
      - alert: { severity: critical, summary: "order {{key}}: {{step}} missing" }
      - compensate: { sink: commands, payload: { type: CancelOrder, order_id: "{{key}}", step: "{{step}}" } }
    late: 1h
"#;

const TOPICS: [&str; 3] = ["orders", "payments", "shipments"];
/// Event-time skew between topics while catching up stays far below this.
const LATENESS: &str = "3h";

fn topic_of(line: &str) -> &'static str {
    if line.contains("PaymentCompleted") {
        "payments"
    } else if line.contains("OrderShipped") {
        "shipments"
    } else {
        "orders"
    }
}

fn key_of(line: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    v["order_id"].as_str().unwrap().to_string()
}

/// A checkout workload split over the three topics, what replay reports for it (with a
/// final clock tick on every orders partition, sent once everything else is consumed).
struct Saga {
    broker: Broker,
    rx: Receiver,
    lines: Vec<String>,
    ticks: Vec<String>,
    want: BTreeMap<String, serde_json::Value>,
    late: usize,
    commands: usize,
}

fn saga(events: usize, seed: u64, sqlite: bool) -> Saga {
    let broker = Broker::start(sqlite);
    let topics: Vec<(&str, i32)> = TOPICS
        .iter()
        .map(|t| (*t, 3))
        .chain([("commands", 3)])
        .collect();
    broker.create_topics(&topics);
    let lines = checkout_events(events, seed);
    let end: serde_json::Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    let end = sagawatch::time::parse_rfc3339(end["time"].as_str().unwrap()).unwrap();
    let tick_time = sagawatch::time::format_rfc3339(end + 10 * 86_400 * 1_000_000_000);
    let ticks: Vec<String> = (0..3)
        .map(|p| format!(r#"{{"time":"{tick_time}","type":"Tick","order_id":"tick-{p}"}}"#))
        .collect();
    // Replay input: one file per topic (the ticks last), merged by event time.
    let dir = broker.dir.path();
    std::fs::create_dir(dir.join("rules")).unwrap();
    std::fs::write(dir.join("rules/checkout.yaml"), KAFKA_RULES).unwrap();
    let mut args = vec!["--lateness".to_string(), LATENESS.to_string()];
    for t in TOPICS {
        let mut of: Vec<String> = lines.iter().filter(|l| topic_of(l) == t).cloned().collect();
        if t == "orders" {
            of.extend(ticks.iter().cloned());
        }
        let path = dir.join(format!("{t}.jsonl"));
        write_lines(&path, &of);
        args.push(format!("{t}={}", path.display()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (want, late) = replay_args(&dir.join("rules"), &args);
    let commands = want
        .values()
        .filter(|v| v["outcome"] == "compensate")
        .count();
    let mut rx = Receiver::new(free_port());
    rx.start();
    Saga {
        broker,
        rx,
        lines,
        ticks,
        want,
        late,
        commands,
    }
}

impl Saga {
    /// The config of one instance: `member` is its static group membership id (each
    /// instance its own; a restarted one takes its partitions back without a rebalance).
    fn config(&self, group: &str, member: &str) -> String {
        format!(
            "time: {{ lateness: {LATENESS}, idle: 0s }}\n\
             batch: {{ events: 2000, interval: 50ms }}\n\
             kafka:\n  brokers: {}\n  group: {group}\n  consumer:\n    max.partition.fetch.bytes: 16384\n    group.instance.id: {member}\n\
             sources:\n  orders: {{ type: kafka }}\n  payments: {{ type: kafka }}\n  shipments: {{ type: kafka }}\n\
             sinks:\n  hook: {{ type: webhook, url: 'http://127.0.0.1:{}/hook', secrets: ['${{WEBHOOK_SECRET}}'], timeout: 2s }}\n  commands: {{ type: kafka, topic: commands, timeout: 10s }}\n\
             alerts: {{ sinks: [hook] }}\n\
             outbox: {{ backoff: 50ms, max_backoff: 300ms }}\n",
            self.broker.brokers(),
            self.rx.port
        )
    }

    fn daemon(&self, group: &str, member: &str) -> Daemon {
        Daemon::with_rules(KAFKA_RULES, &self.config(group, member))
    }

    fn produce(&self, lines: &[String]) {
        let keys: Vec<String> = lines.iter().map(|l| key_of(l)).collect();
        let msgs: Vec<(&str, &str, &str, Option<i32>)> = lines
            .iter()
            .zip(&keys)
            .map(|(l, k)| (topic_of(l), k.as_str(), l.as_str(), None))
            .collect();
        self.broker.produce(&msgs);
    }

    fn produce_ticks(&self) {
        let msgs: Vec<(&str, &str, &str, Option<i32>)> = self
            .ticks
            .iter()
            .enumerate()
            .map(|(p, t)| ("orders", "tick", t.as_str(), Some(p as i32)))
            .collect();
        self.broker.produce(&msgs);
    }

    /// Commands on the commands topic, once the outbox is empty: all of them.
    fn commands(&self, limit: Duration) -> Vec<Consumed> {
        self.broker.read_all("commands", limit)
    }

    /// Everything delivered: webhook alerts and resolves plus Kafka commands. Without
    /// `at`, the clock reading when a miss was noticed: it depends on how the topics'
    /// events interleaved on arrival, which replay (merged by event time) cannot know.
    fn delivered(&self, commands: &[Consumed]) -> Vec<Received> {
        let mut all = self.rx.received();
        all.extend(commands.iter().map(|c| Received {
            id: c.header("sagawatch-id").unwrap_or_default().to_string(),
            body: c.payload.clone(),
            signed: true,
            user_agents: Vec::new(),
        }));
        for r in &mut all {
            let mut v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
            strip_at(&mut v["data"]);
            v["timestamp"] = serde_json::Value::Null;
            r.body = v.to_string();
        }
        all
    }

    /// What replay reports, without `at` (see `delivered`).
    fn want(&self) -> BTreeMap<String, serde_json::Value> {
        let mut want = self.want.clone();
        want.values_mut().for_each(strip_at);
        want
    }

    /// Waits until the daemons have committed `n` offsets in all.
    fn wait_consumed(&self, ds: &[&Daemon], n: usize, limit: Duration) {
        let end = std::time::Instant::now() + limit;
        loop {
            let sum: f64 = ds
                .iter()
                .map(|d| metric(d.port, "sagawatch_kafka_committed_offset").unwrap_or(0.0))
                .sum();
            if sum as usize >= n {
                return;
            }
            if std::time::Instant::now() >= end {
                let logs: Vec<String> = ds.iter().map(|d| d.stderr()).collect();
                panic!(
                    "timed out after {limit:?}: {sum} of {n} events consumed\n{}\nbroker:\n{}",
                    logs.join("\n---\n"),
                    self.broker.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the alerts reached the receiver and the outboxes are empty, then reads
    /// the commands topic and checks everything against replay.
    fn check(&self, ds: &[&Daemon], limit: Duration) -> Vec<Consumed> {
        let alerts = self.want.len() - self.commands + self.late;
        let end = std::time::Instant::now() + limit;
        let commands = loop {
            let backlog: f64 = ds
                .iter()
                .map(|d| metric(d.port, "sagawatch_outbox_backlog").unwrap_or(1.0))
                .sum();
            let (got_alerts, commands) =
                (distinct(&self.rx), self.commands(Duration::from_secs(60)));
            let ids: std::collections::BTreeSet<&str> = commands
                .iter()
                .filter_map(|c| c.header("sagawatch-id"))
                .collect();
            let got_commands = ids.len();
            if got_alerts >= alerts && got_commands >= self.commands && backlog == 0.0 {
                break commands;
            }
            if std::time::Instant::now() >= end {
                // Say what is missing (the comparison shows which).
                eprintln!(
                    "timed out after {limit:?}: {got_alerts} of {alerts} alerts, {got_commands} of {} commands, backlog {backlog}",
                    self.commands
                );
                break commands;
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        assert_matches_replay(&self.delivered(&commands), &self.want(), self.late);
        commands
    }
}

/// Decision times (`at`, and a resolve's `alert_at`) depend on how the partitions' events
/// interleaved: left out of comparisons.
fn strip_at(v: &mut serde_json::Value) {
    if let Some(o) = v.as_object_mut() {
        o.remove("at");
        o.remove("alert_at");
    }
}

fn assigned(d: &Daemon) -> usize {
    metric(d.port, "sagawatch_kafka_assigned_partitions").unwrap_or(0.0) as usize
}

fn alive(d: &mut Daemon) -> bool {
    matches!(d.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
}

#[test]
fn saga_across_three_topics_sends_exactly_the_expected_commands() {
    let s = saga(3000, 7, false);
    assert!(
        s.commands > 50 && s.late > 10,
        "workload has misses and lates"
    );
    let mut d = s.daemon("saga", "a");
    d.start();
    wait_for(Duration::from_secs(60), "all 9 partitions assigned", || {
        (assigned(&d) == 9).then_some(())
    });
    s.produce(&s.lines);
    s.wait_consumed(&[&d], s.lines.len(), Duration::from_secs(120));
    s.produce_ticks();
    let commands = s.check(&[&d], Duration::from_secs(120));
    // Exactly the expected commands: no more arrive, each once, keyed by the order id,
    // with the rule and step in headers.
    let again = s
        .broker
        .read_settled("commands", s.commands, Duration::from_secs(60));
    assert_eq!(again.len(), s.commands, "no extra commands");
    assert_eq!(commands.len(), s.commands);
    for c in &commands {
        let v: serde_json::Value = serde_json::from_str(&c.payload).unwrap();
        assert_eq!(v["type"], "sagawatch.compensate");
        assert_eq!(v["data"]["payload"]["type"], "CancelOrder");
        assert_eq!(
            c.key,
            v["data"]["key"].as_str().unwrap(),
            "message key = correlation key"
        );
        assert_eq!(c.header("sagawatch-rule"), Some("checkout"));
        assert_eq!(c.header("sagawatch-step"), v["data"]["step"].as_str());
    }
    // Consumer health in metrics.
    assert_eq!(metric(d.port, "sagawatch_kafka_up"), Some(1.0));
    assert!(metric(d.port, "sagawatch_kafka_rebalances_total{kind=\"assign\"}").unwrap() >= 1.0);
    let total = (s.lines.len() + s.ticks.len()) as f64;
    assert_eq!(
        metric(d.port, "sagawatch_kafka_committed_offset"),
        Some(total)
    );
    wait_for(Duration::from_secs(10), "lag to reach 0", || {
        (metric(d.port, "sagawatch_kafka_consumer_lag") == Some(0.0)).then_some(())
    });
    assert_eq!(d.terminate(), 0, "{}", d.stderr());
}

#[test]
fn sigkill_during_a_200k_event_stream_loses_nothing_and_invents_nothing() {
    let s = saga(200_000, 42, false);
    s.produce(&s.lines);
    let mut d = s.daemon("crash", "a");
    let mut rng = Lcg(2026);
    let mut kills = 0;
    d.start();
    while kills < 12 {
        // A random moment while consuming: after a random amount of progress.
        let progress = 2_000.0 + rng.below(14_000) as f64;
        let start = metric(d.port, "sagawatch_kafka_committed_offset").unwrap_or(0.0);
        let done = wait_for(Duration::from_secs(120), "progress before a kill", || {
            let now = metric(d.port, "sagawatch_kafka_committed_offset").unwrap_or(0.0);
            if now as usize >= s.lines.len() {
                return Some(true);
            }
            (now - start >= progress).then_some(false)
        });
        if done {
            break;
        }
        // Every third stop is a SIGTERM: records fetched but still queued for the core are
        // left then, and fetched again after the restart from the stored offsets.
        if kills % 3 == 2 {
            assert_eq!(d.terminate(), 0, "{}", d.stderr());
        } else {
            d.kill();
        }
        kills += 1;
        d.start();
    }
    assert!(
        kills >= 10,
        "only {kills} kills before the stream was consumed"
    );
    s.wait_consumed(&[&d], s.lines.len(), Duration::from_secs(300));
    s.produce_ticks();
    let commands = s.check(&[&d], Duration::from_secs(300));
    // At-least-once delivery may repeat a command; never under a different payload.
    let mut by_id: BTreeMap<&str, std::collections::BTreeSet<&str>> = BTreeMap::new();
    for c in &commands {
        by_id
            .entry(c.header("sagawatch-id").unwrap())
            .or_default()
            .insert(&c.payload);
    }
    assert!(by_id.values().all(|p| p.len() == 1));
    assert_eq!(d.terminate(), 0, "{}", d.stderr());
}

#[test]
fn broker_pause_and_restart_are_survived_without_loss() {
    let mut s = saga(6000, 11, true);
    let mut d = s.daemon("outage", "a");
    d.start();
    wait_for(Duration::from_secs(60), "all 9 partitions assigned", || {
        (assigned(&d) == 9).then_some(())
    });
    let (a, rest) = s.lines.split_at(2000);
    let (b, c) = rest.split_at(2000);
    s.produce(a);
    s.wait_consumed(&[&d], a.len(), Duration::from_secs(60));

    // Pause the broker for more than 30 s: health and metrics report it, the daemon stays.
    let paused = std::time::Instant::now();
    s.broker.pause();
    wait_for(
        Duration::from_secs(30),
        "the outage in /readyz and metrics",
        || {
            let (code, body) = http(d.port, "GET", "/readyz", &[], b"").ok()?;
            (code == 503
                && body.contains("kafka")
                && metric(d.port, "sagawatch_kafka_up") == Some(0.0))
            .then_some(())
        },
    );
    let (code, body) = http(d.port, "GET", "/healthz", &[], b"").unwrap();
    assert_eq!(code, 200, "liveness holds during an outage");
    assert!(body.contains("degraded"), "{body}");
    wait_for(Duration::from_secs(40), "30 s of outage", || {
        (paused.elapsed() >= Duration::from_secs(31)).then_some(())
    });
    assert!(
        alive(&mut d),
        "daemon exited during the pause: {}",
        d.stderr()
    );
    s.broker.resume();
    wait_for(Duration::from_secs(60), "recovery after the pause", || {
        let (code, _) = http(d.port, "GET", "/readyz", &[], b"").ok()?;
        (code == 200 && metric(d.port, "sagawatch_kafka_up") == Some(1.0)).then_some(())
    });
    s.produce(b);
    s.wait_consumed(&[&d], a.len() + b.len(), Duration::from_secs(120));

    // Restart the broker (SQLite storage: topics and messages survive).
    s.broker.stop();
    wait_for(
        Duration::from_secs(30),
        "the outage after the broker stopped",
        || (metric(d.port, "sagawatch_kafka_up") == Some(0.0)).then_some(()),
    );
    assert!(
        alive(&mut d),
        "daemon exited while the broker was down: {}",
        d.stderr()
    );
    s.broker.restart();
    wait_for(
        Duration::from_secs(90),
        "recovery after the restart",
        || (metric(d.port, "sagawatch_kafka_up") == Some(1.0) && assigned(&d) == 9).then_some(()),
    );
    s.produce(c);
    s.wait_consumed(&[&d], s.lines.len(), Duration::from_secs(120));
    s.produce_ticks();
    s.check(&[&d], Duration::from_secs(120));
    assert!(metric(d.port, "sagawatch_kafka_errors_total").unwrap_or(0.0) >= 1.0);
    assert_eq!(d.terminate(), 0, "{}", d.stderr());
}

#[test]
fn two_instances_in_one_group_split_the_partitions_and_deliver_each_outcome_once() {
    let s = saga(6000, 5, false);
    let mut d1 = s.daemon("pair", "a");
    let mut d2 = s.daemon("pair", "b");
    d1.start();
    d2.start();
    wait_for(
        Duration::from_secs(90),
        "the partitions split between both",
        || {
            let (a, b) = (assigned(&d1), assigned(&d2));
            (a > 0 && b > 0 && a + b == 9).then_some(())
        },
    );
    s.produce(&s.lines);
    s.wait_consumed(&[&d1, &d2], s.lines.len(), Duration::from_secs(120));
    s.produce_ticks();
    let commands = s.check(&[&d1, &d2], Duration::from_secs(120));
    // Once across both: no id delivered twice, by webhook or on the commands topic.
    let mut seen = BTreeMap::new();
    for r in s.delivered(&commands) {
        *seen.entry(r.id).or_insert(0) += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert_eq!(d1.terminate(), 0, "{}", d1.stderr());
    assert_eq!(d2.terminate(), 0, "{}", d2.stderr());
}

/// A member the group gives no partition hears from its brokers only at metadata
/// refreshes, minutes apart, but from the group coordinator at every heartbeat: it stays
/// ready, its Kafka up, and its idle clock free for its other sources. (Without client
/// telemetry, which tansu asks for every few seconds and plain Kafka brokers do not.)
#[test]
fn a_group_member_without_partitions_stays_ready_and_lets_the_clock_move() {
    let broker = Broker::start(false);
    broker.create_topics(&[("solo", 1)]);
    let rules = "rules:\n  - name: r\n    trigger: { source: api, where: { type: A }, key: id }\n    \
                 expect: [{ step: b, where: { type: B }, key: id, within: 2s }]\n  \
                 - name: k\n    trigger: { source: solo, where: { type: A }, key: id }\n    \
                 expect: [{ step: b, where: { type: B }, key: id, within: 1h }]\n";
    let config = |member: &str| {
        format!(
            "time: {{ idle: 1s, lateness: 0s }}\n\
             kafka:\n  brokers: {}\n  group: idle\n  consumer: {{ enable.metrics.push: 'false', group.instance.id: {member} }}\n\
             sources:\n  solo: {{ type: kafka }}\n  api: {{ type: http }}\n\
             sinks: {{ out: {{ type: stdout }} }}\nalerts: {{ sinks: [out] }}\n",
            broker.brokers()
        )
    };
    let mut d1 = Daemon::with_rules(rules, &config("a"));
    d1.start();
    wait_for(Duration::from_secs(60), "the partition assigned", || {
        (assigned(&d1) == 1).then_some(())
    });
    let mut d2 = Daemon::with_rules(rules, &config("b"));
    d2.start();
    wait_for(
        Duration::from_secs(60),
        "the second member in the group",
        || {
            let (st, _) = http(d2.port, "GET", "/readyz", &[], b"").ok()?;
            (st == 200 && assigned(&d1) + assigned(&d2) == 1).then_some(())
        },
    );
    // Past the 10 s after which silent brokers count as unreachable.
    let until = std::time::Instant::now() + Duration::from_secs(14);
    while std::time::Instant::now() < until {
        let (st, body) = http(d2.port, "GET", "/readyz", &[], b"").unwrap();
        assert_eq!(st, 200, "{body}");
        assert_eq!(metric(d2.port, "sagawatch_kafka_up"), Some(1.0));
        std::thread::sleep(Duration::from_millis(500));
    }
    // The idle clock moves: an http-source step goes missing without another event.
    let now = sagawatch::time::format_rfc3339(now_nanos());
    let ev = format!(r#"{{"time":"{now}","type":"A","id":"x"}}"#);
    assert_eq!(
        http(d2.port, "POST", "/v1/events", &[], ev.as_bytes())
            .unwrap()
            .0,
        202
    );
    wait_for(Duration::from_secs(30), "the missing step", || {
        (metric(
            d2.port,
            r#"sagawatch_steps_total{outcome="missing",rule="r""#,
        )? == 1.0)
            .then_some(())
    });
    assert_eq!(d2.terminate(), 0, "{}", d2.stderr());
    assert_eq!(d1.terminate(), 0, "{}", d1.stderr());
}

#[test]
fn topics_with_different_partition_counts_are_refused_at_startup() {
    let broker = Broker::start(false);
    broker.create_topics(&[("orders", 3), ("payments", 4), ("shipments", 3)]);
    let d = Daemon::with_rules(
        KAFKA_RULES,
        &format!(
            "kafka: {{ brokers: '{}' }}\nsources:\n  orders: {{ type: kafka }}\n  payments: {{ type: kafka }}\n  shipments: {{ type: kafka }}\n  missing: {{ type: kafka, topic: nope }}\nsinks:\n  commands: {{ type: kafka, topic: commands }}\n  out: {{ type: stdout }}\n",
            broker.brokers()
        ),
    );
    let (code, err) = run_to_exit(&d.path("sagawatch.yaml"));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("rule \"checkout\" correlates kafka topics with different partition counts: orders (3), payments (4), shipments (3)"),
        "{err}"
    );
    assert!(err.contains("kafka topic \"nope\" does not exist"), "{err}");
    // A sink's topic too: missing, it would only show as retried deliveries.
    assert!(
        err.contains("sinks.commands: kafka topic \"commands\" does not exist"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    // An unknown librdkafka property stops startup too, named where it is written.
    let d = Daemon::with_rules(
        KAFKA_RULES,
        &format!(
            "kafka: {{ brokers: '{}', consumer: {{ no.such.property: x }} }}\nsources:\n  orders: {{ type: kafka }}\n  payments: {{ type: kafka }}\n  shipments: {{ type: kafka }}\nsinks:\n  commands: {{ type: kafka, topic: commands }}\n  out: {{ type: stdout }}\n",
            broker.brokers()
        ),
    );
    let (code, err) = run_to_exit(&d.path("sagawatch.yaml"));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("kafka.consumer.no.such.property:"), "{err}");

    // What librdkafka says about a property names it, never its value: it may be a
    // password under a misspelt key, or one a property refuses.
    for props in [
        "producer: { sasl.passwrod: TopSecret-4711 }",
        "consumer: { security.protocol: TopSecret-4711 }",
    ] {
        let d = Daemon::with_rules(
            KAFKA_RULES,
            &format!(
                "kafka: {{ brokers: '{}', {props} }}\nsources:\n  orders: {{ type: kafka }}\n  payments: {{ type: kafka }}\n  shipments: {{ type: kafka }}\nsinks:\n  commands: {{ type: kafka, topic: commands }}\n  out: {{ type: stdout }}\n",
                broker.brokers()
            ),
        );
        let (code, err) = run_to_exit(&d.path("sagawatch.yaml"));
        assert_eq!(code, Some(2), "{err}");
        let key = if props.contains("passwrod") {
            "sasl.passwrod"
        } else {
            "security.protocol"
        };
        assert!(err.contains(key), "{err}");
        assert!(!err.contains("TopSecret"), "{err}");
    }
}

/// The idle fallback moves the clock with wall time only while no events wait in Kafka.
/// A daemon suspended while an order and its payment arrive must not, on waking, take
/// the quiet it has seen for idleness and report the payment missing before it reads
/// it; once the topic is quiet for real, the fallback still fires.
#[test]
fn a_suspended_daemon_reads_what_waits_in_kafka_before_the_idle_clock_moves() {
    const RULES: &str = r#"
rules:
  - name: pay
    trigger: { where: { type: OrderPlaced }, key: order_id }
    expect:
      - step: payment
        where: { type: PaymentCompleted }
        key: order_id
        within: 4s
    on_missing:
      - alert: { severity: critical, summary: "order {{key}}: {{step}} missing" }
"#;
    let broker = Broker::start(false);
    broker.create_topics(&[("orders", 1)]);
    let mut d = Daemon::with_rules(
        RULES,
        &format!(
            "time: {{ lateness: 0s, idle: 1s }}\nbatch: {{ interval: 50ms }}\nkafka: {{ brokers: '{}' }}\nsources:\n  orders: {{ type: kafka }}\nsinks:\n  out: {{ type: stdout }}\n",
            broker.brokers()
        ),
    );
    d.start();
    wait_for(Duration::from_secs(60), "the partition assigned", || {
        (assigned(&d) == 1).then_some(())
    });
    let count = |outcome: &str| {
        metric(
            d.port,
            &format!("sagawatch_steps_total{{outcome=\"{outcome}\""),
        )
        .unwrap_or(0.0)
    };
    let event = |ty: &str, key: &str, at: i64| {
        format!(
            r#"{{"time":"{}","type":"{ty}","order_id":"{key}"}}"#,
            sagawatch::time::format_rfc3339(at)
        )
    };
    let now = now_nanos;
    let child = d.child.as_ref().unwrap();
    signal(child, "STOP");
    let t = now();
    let (placed, paid) = (
        event("OrderPlaced", "o1", t),
        event("PaymentCompleted", "o1", t + 1_000_000_000),
    );
    broker.produce(&[
        ("orders", "o1", placed.as_str(), None),
        ("orders", "o1", paid.as_str(), None),
    ]);
    // Suspended past the payment's deadline plus `idle`: wall time alone would fire it.
    std::thread::sleep(Duration::from_secs(7));
    signal(d.child.as_ref().unwrap(), "CONT");
    let end = std::time::Instant::now() + Duration::from_secs(30);
    while count("satisfied") != 1.0 {
        assert!(
            std::time::Instant::now() < end,
            "the payment was not applied: {}\n{}",
            d.stderr(),
            http(d.port, "GET", "/metrics", &[], b"")
                .map(|r| r.1)
                .unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(count("missing"), 0.0, "{}", d.stderr());
    // Quiet for real now: an order without payment is reported by the idle clock.
    let placed = event("OrderPlaced", "o2", now());
    broker.produce(&[("orders", "o2", placed.as_str(), None)]);
    wait_for(Duration::from_secs(30), "the idle clock to fire", || {
        (count("missing") == 1.0).then_some(())
    });
}

/// Every assigned partition has a lag series, read from or not (a dashboard summing lag
/// over partitions must not miss the ones nothing was read from yet); the producer's
/// errors are counted like the consumer's.
#[test]
fn lag_covers_every_assigned_partition_and_producer_errors_are_counted() {
    const RULES: &str = r#"
rules:
  - name: pay
    trigger: { where: { type: OrderPlaced }, key: order_id }
    expect:
      - { step: payment, where: { type: PaymentCompleted }, key: order_id, within: 1h }
    on_missing:
      - compensate: { sink: commands, payload: { type: CancelOrder, order_id: "{{key}}" } }
"#;
    let mut broker = Broker::start(false);
    broker.create_topics(&[("orders", 3), ("commands", 1)]);
    let config = |source: &str| {
        format!(
            "kafka: {{ brokers: '{}' }}\nsources:\n  orders: {source}\nsinks:\n  commands: {{ type: kafka, topic: commands }}\n",
            broker.brokers()
        )
    };
    let mut consumer = Daemon::with_rules(RULES, &config("{ type: kafka }"));
    consumer.start();
    wait_for(
        Duration::from_secs(60),
        "3 partitions, 3 lag series",
        || {
            let (_, body) = http(consumer.port, "GET", "/metrics", &[], b"").ok()?;
            let series = body
                .lines()
                .filter(|l| l.starts_with("sagawatch_kafka_consumer_lag{"))
                .count();
            (assigned(&consumer) == 3 && series == 3).then_some(())
        },
    );
    // A record that is not UTF-8 is counted and skipped, as a file's line would be.
    broker.produce_bytes(
        "orders",
        b"{\"time\":\"2026-01-01T00:00:00Z\",\"type\":\"OrderPlaced\",\"order_id\":\"\xff\"}",
    );
    // So is one with an empty value; the log says where each was.
    broker.produce_bytes("orders", b"");
    wait_for(Duration::from_secs(60), "the records rejected", || {
        let m = r#"sagawatch_events_rejected_total{reason="invalid_json",source="orders"}"#;
        (metric(consumer.port, m)? == 2.0).then_some(())
    });
    let log = consumer.stderr();
    let skipped: Vec<&str> = log.lines().filter(|l| l.contains("skipped a")).collect();
    assert_eq!(skipped.len(), 2, "{log}");
    assert!(
        skipped
            .iter()
            .all(|l| l.contains("partition=") && l.contains("offset=")),
        "{log}"
    );
    assert_eq!(
        metric(consumer.port, "sagawatch_events_decoded_total").unwrap_or(0.0),
        0.0
    );
    consumer.kill();
    // Only a producer here: what its client reports is its own.
    let mut producer = Daemon::with_rules(RULES, &config("{ type: stdin }"));
    producer.start();
    let errors = |d: &Daemon| metric(d.port, "sagawatch_kafka_errors_total").unwrap_or(0.0);
    assert_eq!(errors(&producer), 0.0);
    broker.stop();
    wait_for(Duration::from_secs(60), "a producer error counted", || {
        (errors(&producer) > 0.0).then_some(())
    });
}

/// While the startup check waits for brokers, the listener answers: alive, not ready,
/// and scraped (`sagawatch_ready` 0: a failed scrape would read as the daemon down).
#[test]
fn probes_are_answered_while_the_startup_check_waits_for_brokers() {
    let nobody = free_port();
    let mut d = Daemon::with_rules(
        KAFKA_RULES,
        &format!(
            "kafka: {{ brokers: '127.0.0.1:{nobody}', connect_timeout: 60s }}\nsources:\n  orders: {{ type: kafka }}\n  payments: {{ type: kafka }}\n  shipments: {{ type: kafka }}\nsinks:\n  commands: {{ type: kafka, topic: commands }}\n  out: {{ type: stdout }}\n"
        ),
    );
    let child = std::process::Command::new(BIN)
        .args(["run", "--config"])
        .arg(d.path("sagawatch.yaml"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    d.child = Some(child);
    let port = d.port;
    wait_for(
        Duration::from_secs(30),
        "/healthz 200 while starting",
        || matches!(http(port, "GET", "/healthz", &[], b""), Ok((200, _))).then_some(()),
    );
    let (status, body) = http(port, "GET", "/readyz", &[], b"").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("starting"), "{body}");
    assert_eq!(metric(port, "sagawatch_ready"), Some(0.0));
    // Refused as the running daemon would refuse it: a DNS name over loopback, a POST.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: evil.example\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    let (status, _) = http(port, "POST", "/metrics", &[], b"").unwrap();
    assert_eq!(status, 405);
    // Events posted meanwhile: a body far larger than the socket's buffers, sent whole
    // before the answer is read, is taken, and the 503 read, not a reset connection.
    let big = vec![b' '; 16 << 20];
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "POST /v1/events HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: {}\r\n\r\n",
        big.len()
    )
    .unwrap();
    s.write_all(&big).expect("the whole body taken");
    let mut status = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(s), &mut status).unwrap();
    assert!(status.contains(" 503 "), "{status}");
    assert!(alive(&mut d));

    // As PID 1 (a container's process), where SIGTERM at its default is ignored, the same
    // wait still ends at a SIGTERM, not when connect_timeout runs out.
    let mut d2 = Daemon::with_rules(
        KAFKA_RULES,
        &format!(
            "kafka: {{ brokers: '127.0.0.1:{nobody}', connect_timeout: 60s }}\nsources:\n  orders: {{ type: kafka }}\n  payments: {{ type: kafka }}\n  shipments: {{ type: kafka }}\nsinks:\n  commands: {{ type: kafka, topic: commands }}\n  out: {{ type: stdout }}\n"
        ),
    );
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .unwrap()
        .stdout
        == b"0\n";
    let mut unshare = std::process::Command::new("unshare");
    if !root {
        unshare.args(["--user", "--map-root-user"]);
    }
    let outer = unshare
        .args(["--pid", "--fork", "--kill-child", BIN, "run", "--config"])
        .arg(d2.path("sagawatch.yaml"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Killed when the test ends, however it ends (and the daemon with it: --kill-child).
    let outer_pid = outer.id();
    d2.child = Some(outer);
    wait_for(
        Duration::from_secs(30),
        "/healthz 200 while starting as PID 1",
        || matches!(http(d2.port, "GET", "/healthz", &[], b""), Ok((200, _))).then_some(()),
    );
    let children = format!("/proc/{0}/task/{0}/children", outer_pid);
    let pid1 = std::fs::read_to_string(children).unwrap();
    let pid1 = pid1.split_whitespace().next().expect("unshare's child");
    let status = std::fs::read_to_string(format!("/proc/{pid1}/status")).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("NSpid:") && l.trim_end().ends_with("\t1")),
        "{status}"
    );
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", pid1])
            .status()
            .unwrap()
            .success()
    );
    let st = wait_for(Duration::from_secs(15), "PID 1 to end at SIGTERM", || {
        d2.child.as_mut().unwrap().try_wait().unwrap()
    });
    d2.child = None;
    assert_eq!(st.code(), Some(143));
}

/// A partition whose end the consumer is never given a message for (here: what a reset to
/// `latest` skipped; likewise a transaction's commit marker) is not taken for one with
/// messages still to come: its lag reads 0, events of the other partitions do not wait
/// for it (`align_wait` is an hour here), and the idle clock still reports a missing step
/// on a quiet stream. Where such a partition starts is stored, so a restart does not skip
/// what reached it meanwhile.
#[test]
fn a_reset_to_latest_leaves_no_phantom_backlog_and_is_not_repeated_at_restart() {
    const RULES: &str = r#"
rules:
  - name: pay
    trigger: { source: orders, where: { type: OrderPlaced }, key: order_id }
    expect:
      - { step: payment, source: payments, where: { type: PaymentCompleted }, key: order_id, within: 2s }
    on_missing:
      - alert: { severity: critical, summary: "order {{key}}: {{step}} missing" }
"#;
    let broker = Broker::start(false);
    broker.create_topics(&[("orders", 1), ("payments", 1)]);
    let old = r#"{"time":"2026-01-01T00:00:00Z","type":"PaymentCompleted","order_id":"old"}"#;
    broker.produce(&[
        ("payments", "old", old, None),
        ("payments", "old", old, None),
        ("payments", "old", old, None),
    ]);
    let mut d = Daemon::with_rules(
        RULES,
        &format!(
            "time: {{ lateness: 0s, idle: 1s }}\nbatch: {{ interval: 50ms }}\nkafka: {{ brokers: '{}', align_wait: 1h, consumer: {{ auto.offset.reset: latest }} }}\nsources:\n  orders: {{ type: kafka }}\n  payments: {{ type: kafka }}\nsinks:\n  out: {{ type: stdout }}\n",
            broker.brokers()
        ),
    );
    d.start();
    wait_for(Duration::from_secs(60), "both partitions assigned", || {
        (assigned(&d) == 2).then_some(())
    });
    let lag = |topic: &str| {
        metric(
            d.port,
            &format!("sagawatch_kafka_consumer_lag{{partition=\"0\",topic=\"{topic}\"}}"),
        )
    };
    wait_for(
        Duration::from_secs(30),
        "the skipped messages' lag to read 0",
        || (lag("payments") == Some(0.0)).then_some(()),
    );
    let now = now_nanos();
    let placed = format!(
        r#"{{"time":"{}","type":"OrderPlaced","order_id":"o1"}}"#,
        sagawatch::time::format_rfc3339(now)
    );
    broker.produce(&[("orders", "o1", placed.as_str(), None)]);
    wait_for(
        Duration::from_secs(30),
        "the idle clock to report the payment missing",
        || (metric(d.port, "sagawatch_steps_total{outcome=\"missing\"") == Some(1.0)).then_some(()),
    );
    // Where the partition that gave nothing starts is stored too: what reaches it while
    // the daemon is stopped is read after the restart, not skipped by `latest` again.
    wait_for(
        Duration::from_secs(30),
        "the payments position stored",
        || {
            (metric(
                d.port,
                "sagawatch_kafka_committed_offset{partition=\"0\",topic=\"payments\"}",
            ) == Some(3.0))
            .then_some(())
        },
    );
    assert_eq!(d.terminate(), 0, "{}", d.stderr());
    let paid = format!(
        r#"{{"time":"{}","type":"PaymentCompleted","order_id":"o2"}}"#,
        sagawatch::time::format_rfc3339(now)
    );
    broker.produce(&[("payments", "o2", paid.as_str(), None)]);
    d.start();
    wait_for(
        Duration::from_secs(30),
        "the payment sent meanwhile read",
        || {
            (metric(
                d.port,
                "sagawatch_events_received_total{source=\"payments\"}",
            ) == Some(1.0))
            .then_some(())
        },
    );
    assert_eq!(d.terminate(), 0, "{}", d.stderr());
}

/// A reload is held to the startup check: rules that correlate topics of different
/// partition counts are rejected (422), and the old ones keep running.
#[test]
fn a_reload_refuses_rules_over_topics_that_are_not_co_partitioned() {
    let rules = |step_source: &str| {
        format!(
            r#"
rules:
  - name: pay
    trigger: {{ source: orders, where: {{ type: OrderPlaced }}, key: order_id }}
    expect:
      - {{ step: payment, source: {step_source}, where: {{ type: PaymentCompleted }}, key: order_id, within: 1h }}
    on_missing:
      - alert: {{ severity: critical, summary: "order {{{{key}}}}: {{{{step}}}} missing" }}
"#
        )
    };
    let broker = Broker::start(false);
    broker.create_topics(&[("orders", 1), ("payments", 1), ("audit", 2)]);
    let mut d = Daemon::with_rules(
        &rules("payments"),
        &format!(
            "kafka: {{ brokers: '{}' }}\nsources:\n  orders: {{ type: kafka }}\n  payments: {{ type: kafka }}\n  audit: {{ type: kafka }}\nsinks:\n  out: {{ type: stdout }}\n",
            broker.brokers()
        ),
    );
    d.start();
    wait_for(Duration::from_secs(60), "the partitions assigned", || {
        (assigned(&d) == 4).then_some(())
    });
    std::fs::write(d.path("rules/checkout.yaml"), rules("audit")).unwrap();
    let (st, b) = http(d.port, "POST", "/-/reload", &[], b"").unwrap();
    assert_eq!(st, 422, "{b}");
    assert!(
        b.contains("different partition counts: audit (2), orders (1)"),
        "{b}"
    );
    assert_eq!(
        metric(d.port, "sagawatch_rules_reloads_total{result=\"failure\"}"),
        Some(1.0)
    );
    std::fs::write(d.path("rules/checkout.yaml"), rules("payments")).unwrap();
    let (st, b) = http(d.port, "POST", "/-/reload", &[], b"").unwrap();
    assert_eq!(st, 200, "{b}");
    assert_eq!(d.terminate(), 0, "{}", d.stderr());
}

/// A partition that is shorter than the offset stored for it (the topic was deleted and
/// created again, or the broker lost its data): the stored offset is out of range, the
/// partition is read again from where `auto.offset.reset` says (default: its start), the
/// log says so, and the lag does not count the offsets that are gone.
#[test]
fn a_stored_offset_past_the_partition_end_reads_the_partition_again() {
    const RULES: &str = r#"
rules:
  - name: pay
    trigger: { source: orders, where: { type: OrderPlaced }, key: order_id }
    expect:
      - { step: payment, source: orders, where: { type: PaymentCompleted }, key: order_id, within: 1000h }
"#;
    let mut broker = Broker::start(false);
    broker.create_topics(&[("orders", 1)]);
    let placed = |i: usize| {
        format!(r#"{{"time":"2026-01-01T00:00:0{i}Z","type":"OrderPlaced","order_id":"o{i}"}}"#)
    };
    let first: Vec<String> = (0..5).map(placed).collect();
    broker.produce(
        &first
            .iter()
            .map(|l| ("orders", "k", l.as_str(), None))
            .collect::<Vec<_>>(),
    );
    let mut d = Daemon::with_rules(
        RULES,
        &format!(
            "time: {{ lateness: 0s }}\nbatch: {{ interval: 50ms }}\nkafka: {{ brokers: '{}' }}\nsources:\n  orders: {{ type: kafka }}\nsinks:\n  out: {{ type: stdout }}\n",
            broker.brokers()
        ),
    );
    d.env.push(("SAGAWATCH_LOG".into(), "info".into()));
    d.start();
    let committed = |d: &Daemon| {
        metric(
            d.port,
            "sagawatch_kafka_committed_offset{partition=\"0\",topic=\"orders\"}",
        )
    };
    wait_for(Duration::from_secs(60), "offset 5 stored", || {
        (committed(&d) == Some(5.0)).then_some(())
    });
    assert_eq!(d.terminate(), 0, "{}", d.stderr());
    // In memory: the restarted broker has nothing; the topic is created again, shorter.
    broker.restart();
    broker.create_topics(&[("orders", 1)]);
    let second: Vec<String> = (5..7).map(placed).collect();
    broker.produce(
        &second
            .iter()
            .map(|l| ("orders", "k", l.as_str(), None))
            .collect::<Vec<_>>(),
    );
    d.start();
    wait_for(Duration::from_secs(60), "the new partition read", || {
        (metric(d.port, "sagawatch_events_received_total{source=\"orders\"}") == Some(2.0)
            && committed(&d) == Some(2.0))
        .then_some(())
    });
    wait_for(Duration::from_secs(30), "no lag", || {
        let lag = metric(
            d.port,
            "sagawatch_kafka_consumer_lag{partition=\"0\",topic=\"orders\"}",
        );
        (lag == Some(0.0)).then_some(())
    });
    assert!(
        d.stderr().contains(
            "the offset stored for this partition is past its end (the topic was recreated, \
             or the broker lost data); reading from its start"
        ),
        "{}",
        d.stderr()
    );
    assert_eq!(d.terminate(), 0, "{}", d.stderr());
}
