//! Properties that must hold for every input: how events are batched and where clock ticks
//! fall (at or below the event clock) never changes the outcomes, the durable state (with
//! its row cache, commits and restarts anywhere) behaves exactly like the in-memory one,
//! and no input panics.

use std::sync::Arc;

use proptest::prelude::*;
use sagawatch::engine::{Engine, MemoryState, Outcome};
use sagawatch::event::Decoder;
use sagawatch::rules::{self, RuleSet};
use sagawatch::store::{self, SqliteState};

const RULES: &str = r#"
rules:
  - name: checkout
    trigger: { source: orders, where: { type: Placed }, key: id }
    expect:
      - { step: pay, where: { type: Paid, ok: true }, key: id, within: 10m }
      - { step: ship, where: { type: Shipped }, key: id, after: pay, within: 30m }
      - { step: mail, where: { type: Mailed }, key: id, within: 5m }
    cancel:
      - { where: { type: Cancelled }, key: id }
    dedup: 20m
    late: 15m
    on_missing:
      - alert: { summary: "{{key}} {{step}}" }
      - compensate: { sink: cmds, payload: { id: "{{key}}" } }
  - name: refunds
    trigger: { where: { type: Refund }, key: id }
    expect:
      - { step: settle, where: { type: Settled }, key: id, within: 7m }
    dedup: 1m
    late: 1m
"#;

fn rules() -> Arc<RuleSet> {
    Arc::new(rules::load_sources(&[("p.yaml".into(), RULES.into())]).unwrap())
}

#[derive(Clone, Debug)]
struct Ev {
    line: String,
    source: Option<&'static str>,
}

fn event() -> impl Strategy<Value = (u32, usize, usize, bool, usize)> {
    // (time offset in seconds, type index, key index, ok flag, source index)
    (0u32..7200, 0usize..8, 0usize..6, any::<bool>(), 0usize..3)
}

fn build(raw: Vec<(u32, usize, usize, bool, usize)>, jitter: bool) -> Vec<Ev> {
    let types = [
        "Placed",
        "Paid",
        "Shipped",
        "Mailed",
        "Cancelled",
        "Refund",
        "Settled",
        "Noise",
    ];
    let sources = [Some("orders"), Some("payments"), None];
    let mut t = 0i64;
    raw.into_iter()
        .map(|(off, ty, key, ok, src)| {
            // Mostly increasing time, with some events out of order.
            let secs = if jitter {
                i64::from(off)
            } else {
                t + i64::from(off % 300)
            };
            t = secs;
            let line = format!(
                r#"{{"type":"{}","id":"k{}","ok":{},"time":"2026-01-01T{:02}:{:02}:{:02}Z"}}"#,
                types[ty],
                key,
                ok,
                (secs / 3600) % 24,
                (secs / 60) % 60,
                secs % 60
            );
            Ev {
                line,
                source: sources[src],
            }
        })
        .collect()
}

fn straight(rules: &Arc<RuleSet>, evs: &[Ev], lateness: i64) -> Vec<Outcome> {
    let d = Decoder::new(rules, "time");
    let mut e = Engine::new(Arc::clone(rules), MemoryState::new(), lateness).with_lifecycle(true);
    let mut out = Vec::new();
    for ev in evs {
        e.process(&d.decode(ev.line.as_bytes(), ev.source).unwrap(), &mut out);
    }
    e.finish(&mut out);
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn batches_and_ticks_do_not_change_outcomes(
        raw in proptest::collection::vec(event(), 1..120),
        jitter in any::<bool>(),
        lateness_s in 0i64..600,
        cuts in proptest::collection::vec((0usize..120, 0i64..1200), 0..20),
        chunk in prop_oneof![Just(usize::MAX), 1usize..4],
    ) {
        let rules = rules();
        let evs = build(raw, jitter);
        let lateness = lateness_s * 1_000_000_000;
        let expected = straight(&rules, &evs, lateness);

        let d = Decoder::new(&rules, "time");
        let mut e = Engine::new(Arc::clone(&rules), MemoryState::new(), lateness).with_lifecycle(true);
        let mut got = Vec::new();
        for (i, ev) in evs.iter().enumerate() {
            let decoded = d.decode(ev.line.as_bytes(), ev.source).unwrap();
            for (at, back_s) in &cuts {
                if *at == i && e.clock() != i64::MIN {
                    // A tick at or below the clock the events already set: a no-op.
                    e.tick(e.clock() - back_s * 1_000_000_000, &mut got);
                }
                if *at == i && back_s % 2 == 0 {
                    // A timer that fires exactly at the clock the next event sets.
                    if e.move_clock(decoded.time - lateness) {
                        while e.fire_some(chunk, &mut got) {}
                    }
                }
            }
            e.process(&decoded, &mut got);
        }
        e.finish(&mut got);
        prop_assert_eq!(expected, got);
    }

    #[test]
    fn durable_state_matches_memory_across_commits_and_restarts(
        raw in proptest::collection::vec(event(), 1..150),
        jitter in any::<bool>(),
        cache in 1usize..6,
        cuts in proptest::collection::vec((0usize..150, any::<bool>()), 0..25),
        chunk in prop_oneof![Just(usize::MAX), 1usize..4],
    ) {
        let rules = rules();
        let evs = build(raw, jitter);
        let expected = straight(&rules, &evs, 0);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let open = || {
            let mut conn = store::open(&path).unwrap();
            store::migrate(&mut conn, &path).unwrap();
            let st = SqliteState::open(conn, &rules, &path).unwrap().with_row_cache(cache);
            Engine::new(Arc::clone(&rules), st, 0).with_lifecycle(true)
        };
        let d = Decoder::new(&rules, "time");
        let mut e = open();
        let mut got = Vec::new();
        e.state_mut().begin().unwrap();
        for (i, ev) in evs.iter().enumerate() {
            for (at, restart) in &cuts {
                if *at == i {
                    e.state_mut().commit().unwrap();
                    if *restart {
                        drop(e);
                        e = open();
                    }
                    e.state_mut().begin().unwrap();
                }
            }
            let decoded = d.decode(ev.line.as_bytes(), ev.source).unwrap();
            e.state_mut().set_event(Some((&ev.line, decoded.time)), None);
            // What the daemon does: the deadlines this event passes fired a chunk at a time,
            // each chunk about `chunk` deadlines (a row has at most three steps, and the
            // state may take `chunk` rows from its cache and as many from SQLite), until
            // none is left.
            e.observe(decoded.time);
            loop {
                let n = got.len();
                let more = e.fire_some(chunk, &mut got);
                prop_assert!(got.len() - n <= 2 * 3 * 5 * chunk.min(1000));
                if !more {
                    break;
                }
            }
            let mut left = Vec::new();
            e.fire_some(usize::MAX, &mut left);
            prop_assert!(left.is_empty(), "chunks left {left:?}");
            e.process(&decoded, &mut got);
        }
        e.finish(&mut got);
        e.state_mut().commit().unwrap();
        prop_assert_eq!(expected, got);
    }

    #[test]
    fn arbitrary_lines_never_panic(lines in proptest::collection::vec(".{0,80}", 1..50)) {
        let rules = rules();
        let d = Decoder::new(&rules, "time");
        let mut e = Engine::new(Arc::clone(&rules), MemoryState::new(), 0);
        let mut out = Vec::new();
        for l in &lines {
            if let Ok(ev) = d.decode(l.as_bytes(), None) {
                e.process(&ev, &mut out);
            }
        }
        e.finish(&mut out);
    }

    #[test]
    fn arbitrary_rules_never_panic(text in "[a-z:{}\\[\\], \\-\\n.0-9\"]{0,200}") {
        let _ = rules::load_sources(&[("f.yaml".into(), text)]);
    }

    #[test]
    fn open_instances_are_counted_exactly(raw in proptest::collection::vec(event(), 1..80)) {
        let rules = rules();
        let evs = build(raw, false);
        let d = Decoder::new(&rules, "time");
        let mut e = Engine::new(Arc::clone(&rules), MemoryState::new(), 0).with_lifecycle(true);
        let mut out = Vec::new();
        for ev in &evs {
            e.process(&d.decode(ev.line.as_bytes(), ev.source).unwrap(), &mut out);
        }
        let opened = out.iter().filter(|o| o.kind.name() == "opened").count();
        let closed = out.iter().filter(|o| matches!(o.kind.name(), "closed" | "cancelled")).count();
        use sagawatch::engine::State;
        prop_assert_eq!(e.state().open_instances(), opened - closed);
    }
}

/// Steps that fire together are reported by deadline, rule order, key and step, however
/// the fire is chunked: here 2×40 steps share one deadline across two rules whose names
/// sort the other way round (SQLite's index orders them by name), some rows still in the
/// row cache and some only in SQLite, with a second step at a later deadline for some.
#[test]
fn chunked_fires_keep_the_documented_order() {
    const TIES: &str = r#"
rules:
  - name: zulu
    trigger: { where: { type: Z }, key: id }
    expect:
      - { step: s, where: { type: Done }, key: id, within: 1m }
      - { step: t, where: { type: Done2 }, key: id, within: 2m }
  - name: alpha
    trigger: { where: { type: A }, key: id }
    expect:
      - { step: s, where: { type: Done }, key: id, within: 1m }
"#;
    let rules = Arc::new(rules::load_sources(&[("t.yaml".into(), TIES.into())]).unwrap());
    let mut lines = Vec::new();
    for i in 0..40 {
        for ty in ["A", "Z"] {
            lines.push(format!(
                r#"{{"type":"{ty}","id":"k{:02}","time":"2026-01-01T00:00:00Z"}}"#,
                (i * 7) % 40
            ));
        }
    }
    lines.push(r#"{"type":"X","time":"2026-01-01T01:00:00Z"}"#.to_string());
    let evs: Vec<Ev> = lines
        .into_iter()
        .map(|line| Ev { line, source: None })
        .collect();
    let expected = straight(&rules, &evs, 0);
    assert_eq!(
        expected
            .iter()
            .filter(|o| o.kind.name() == "missing")
            .count(),
        120
    );
    let d = Decoder::new(&rules, "time");
    for chunk in [1, 2, 3, 7, 39, 40, 41, 79, 80, 81, 1000] {
        let mut e = Engine::new(Arc::clone(&rules), MemoryState::new(), 0).with_lifecycle(true);
        let mut got = Vec::new();
        for ev in &evs {
            let decoded = d.decode(ev.line.as_bytes(), ev.source).unwrap();
            e.observe(decoded.time);
            while e.fire_some(chunk, &mut got) {}
            e.process(&decoded, &mut got);
        }
        e.finish(&mut got);
        assert_eq!(expected, got, "in memory, chunk {chunk}");
        for (cache, commit_at) in [(1, 30), (1000, 50), (1000, 80)] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("state.db");
            let mut conn = store::open(&path).unwrap();
            store::migrate(&mut conn, &path).unwrap();
            let st = SqliteState::open(conn, &rules, &path)
                .unwrap()
                .with_row_cache(cache);
            let mut e = Engine::new(Arc::clone(&rules), st, 0).with_lifecycle(true);
            let mut got = Vec::new();
            e.state_mut().begin().unwrap();
            for (i, ev) in evs.iter().enumerate() {
                if i == commit_at {
                    e.state_mut().commit().unwrap();
                    e.state_mut().begin().unwrap();
                }
                let decoded = d.decode(ev.line.as_bytes(), ev.source).unwrap();
                e.observe(decoded.time);
                while e.fire_some(chunk, &mut got) {}
                e.process(&decoded, &mut got);
            }
            e.finish(&mut got);
            e.state_mut().commit().unwrap();
            assert_eq!(
                expected, got,
                "chunk {chunk}, cache {cache}, commit at {commit_at}"
            );
        }
    }
}
