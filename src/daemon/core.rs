//! The core thread: the only writer of the state file. It applies batches of lines from
//! every source to the engine, writes the outbox rows and source positions the batch
//! caused in the same transaction, commits every N events or M milliseconds, and only
//! then acknowledges upstream. It also moves the clock when streams go quiet.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration as StdDuration, Instant as StdInstant};

use anyhow::Result;
use tokio::sync::oneshot;

use crate::config::{ClockMode, Config, SinkKind};
use crate::daemon::bad_log::BadLog;
use crate::daemon::dispatch;
use crate::daemon::metrics::Metrics;
use crate::engine::Engine;
use crate::engine::outcome::{Kind, Outcome};
use crate::event::Decoder;
use crate::output;
use crate::rules::RuleSet;
use crate::store::{self, AlertRow, NewMessage, Outbox, Position, SqliteState};
use crate::time::{Instant, format_rfc3339};

/// Why a request's lines were refused.
#[derive(Debug)]
pub struct Rejected {
    /// 1-based index of the first bad line or element.
    pub line: usize,
    pub message: String,
}

/// Where each line of a [`Msg::Lines`] starts.
#[derive(Debug)]
pub enum LineAt {
    /// Not said (the http source names a bad line in its answer).
    Unknown,
    /// Byte offsets in a file.
    Offsets(Vec<u64>),
    /// Line numbers (stdin), 1-based.
    Numbers(Vec<u64>),
}

impl LineAt {
    /// The `i`th line's (offset, line number), for a log record.
    fn of(&self, i: usize) -> (Option<u64>, Option<u64>) {
        match self {
            LineAt::Unknown => (None, None),
            LineAt::Offsets(v) => (v.get(i).copied(), None),
            LineAt::Numbers(v) => (None, v.get(i).copied()),
        }
    }
}

/// What sources and the server send to the core.
pub enum Msg {
    /// Lines from a source. With `atomic`, a bad line rejects them all (HTTP); otherwise
    /// bad lines are counted and skipped. `position` is stored with the batch's effects.
    Lines {
        source: Arc<str>,
        lines: Vec<String>,
        /// Where each line starts, for the log of a bad one.
        at: LineAt,
        position: Option<Position>,
        atomic: bool,
        done: Option<oneshot::Sender<Result<usize, Rejected>>>,
        /// What the sender holds until the core has applied the lines: the HTTP source's
        /// share of its memory bound.
        hold: Option<tokio::sync::OwnedSemaphorePermit>,
    },
    /// Records from several sources at once (Kafka), each with the partition it came
    /// from; bad ones are counted and skipped. `positions` (key, position) are stored with
    /// the batch's effects; `done` gets the number applied once they are committed.
    Records {
        records: Vec<Record>,
        positions: Vec<(String, Position)>,
        done: Option<oneshot::Sender<Result<usize, Rejected>>>,
    },
    /// Commit what was received so far, then answer (before a Kafka partition is let go).
    Sync {
        done: oneshot::Sender<Result<(), String>>,
    },
    /// Swap in a reloaded rule set.
    Reload {
        rules: Arc<RuleSet>,
        done: oneshot::Sender<Result<(), String>>,
    },
    /// The daemon is stopping: commit now, and from now on after every message, so that
    /// requests still waiting for their batch are answered within the shutdown grace.
    Stopping,
    /// Commit and stop.
    Shutdown,
}

/// One event from a source that interleaves several (Kafka topics and partitions).
pub struct Record {
    pub source: Arc<str>,
    pub text: String,
    /// False when the payload was not UTF-8: the record is counted and skipped, as a
    /// file's line would be (its text, with replacement characters, is not read).
    pub utf8: bool,
    /// The Kafka partition, stored on the state rows the event creates.
    pub part: Option<i32>,
    /// The Kafka offset, for the log of a bad record.
    pub offset: Option<i64>,
}

pub fn wall_nanos() -> Instant {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

pub fn wall_ms() -> i64 {
    wall_nanos() / 1_000_000
}

/// A gap between two looks at the idle clock longer than this is not quiet on the
/// stream (see `Core::last_look`).
const SUSPENDED: StdDuration = StdDuration::from_secs(1);

/// How often the core wakes when nothing arrives, to move the clock and commit.
const TICK: StdDuration = StdDuration::from_millis(100);
/// Deadlines fired before their outcomes go to the outbox (see `Core::fire`).
const FIRE_CHUNK: usize = 4096;
/// Event text a batch holds (for the timeline, until its commit) past which it commits.
const BATCH_EVENT_BYTES: usize = 64 << 20;

pub struct Core {
    cfg: Arc<Config>,
    engine: Engine<SqliteState>,
    decoder: Decoder,
    metrics: Arc<Metrics>,
    wake_dispatcher: Arc<tokio::sync::Notify>,
    outcomes: Vec<Outcome>,
    pending_acks: Vec<(oneshot::Sender<Result<usize, Rejected>>, usize)>,
    batch_events: usize,
    batch_started: Option<StdInstant>,
    last_event: StdInstant,
    /// Whether an event that may move the clock was applied since `last_event` was last
    /// set: bad lines do not count, nor events past `time.max_ahead` (a stream of those
    /// alone must not hold off the idle fallback, or the clock would stop).
    timed_event: bool,
    /// When the idle fallback last looked: a gap far beyond `TICK` since means the
    /// process was suspended (SIGSTOP, a paused VM) or starved, not that the stream was
    /// quiet. With the wall time then: the monotonic clock stops while the whole machine
    /// sleeps (a suspended laptop or VM, a restored checkpoint), the wall clock does not.
    last_look: (StdInstant, Instant),
    /// The last receipt time given in `wall` mode: receipt times never go back, even when
    /// the wall clock is stepped back (they would open steps whose deadlines the clock,
    /// which never goes back, has passed already).
    last_arrival: Instant,
    wrote_outbox: bool,
    /// With Kafka sources: whether events wait in Kafka (then the stream is not idle).
    kafka: Option<Arc<crate::daemon::kafka::Health>>,
    /// Set by file sources while they hold lines they cannot read yet.
    holds: Vec<Arc<std::sync::atomic::AtomicBool>>,
    children: Children,
    bad_log: BadLog,
    /// Events dated past `time.max_ahead`: a producer whose clock is off sends many.
    ahead_log: BadLog,
    /// Set by `Msg::Stopping`: every message is its own batch.
    stopping: bool,
    /// Set when intake stops (before `Msg::Stopping`, which waits behind queued messages):
    /// queued Kafka records, fetched again after a restart from the stored offsets, are
    /// left for then, so that a stop does not wait for them to be worked off.
    halt: Arc<std::sync::atomic::AtomicBool>,
    /// How many queued events `halt` left, for the log.
    left: usize,
}

/// Which per-rule counter a metric child is.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Slot {
    Outcome(&'static str),
    Opened,
    Finished,
    Cancelled,
    Step(&'static str),
}

/// Metric children by (rule index, slot, step index), resolved once: a label lookup hashes
/// the label strings and takes a lock, too much for every outcome. Cleared on reload (rule
/// indices change).
///
/// Counts wait for their batch's commit: a scrape must not show an outcome that the
/// state file (the timeline, the outbox) does not hold yet, nor one that a failed commit
/// took back.
#[derive(Default)]
struct Children {
    /// Each child with the count its uncommitted outcomes add.
    counters: std::collections::HashMap<(usize, Slot, usize), (prometheus::IntCounter, u64)>,
    latency: std::collections::HashMap<(usize, usize), prometheus::Histogram>,
    /// Step latencies of uncommitted outcomes.
    observed: Vec<((usize, usize), f64)>,
    /// Events decoded in the batch, by source.
    decoded: Vec<(Arc<str>, u64)>,
}

impl Children {
    fn count(&mut self, key: (usize, Slot, usize), make: impl FnOnce() -> prometheus::IntCounter) {
        self.counters.entry(key).or_insert_with(|| (make(), 0)).1 += 1;
    }

    fn observe(
        &mut self,
        key: (usize, usize),
        make: impl FnOnce() -> prometheus::Histogram,
        secs: f64,
    ) {
        self.latency.entry(key).or_insert_with(make);
        self.observed.push((key, secs));
    }

    fn decoded(&mut self, source: &Arc<str>, n: u64) {
        match self.decoded.iter_mut().find(|(s, _)| s == source) {
            Some((_, c)) => *c += n,
            None => self.decoded.push((Arc::clone(source), n)),
        }
    }

    /// The batch committed: its counts and latencies go public.
    fn publish(&mut self, m: &Metrics) {
        for (source, n) in self.decoded.drain(..) {
            m.events_decoded.with_label_values(&[&source]).inc_by(n);
        }
        for (c, n) in self.counters.values_mut() {
            if *n > 0 {
                c.inc_by(std::mem::take(n));
            }
        }
        for (key, secs) in self.observed.drain(..) {
            if let Some(h) = self.latency.get(&key) {
                h.observe(secs);
            }
        }
    }

    /// The batch did not commit: nothing of it happened.
    fn discard(&mut self) {
        for (_, n) in self.counters.values_mut() {
            *n = 0;
        }
        self.observed.clear();
        self.decoded.clear();
    }
}

impl Core {
    pub fn new(
        cfg: Arc<Config>,
        rules: Arc<RuleSet>,
        state: SqliteState,
        metrics: Arc<Metrics>,
        wake_dispatcher: Arc<tokio::sync::Notify>,
    ) -> Core {
        let decoder = Decoder::new(&rules, &cfg.time.field);
        metrics.prepare_rules(&rules);
        let engine = Engine::new(rules, state, cfg.time.lateness).with_lifecycle(true);
        let core = Core {
            cfg,
            engine,
            decoder,
            metrics,
            wake_dispatcher,
            outcomes: Vec::new(),
            pending_acks: Vec::new(),
            batch_events: 0,
            batch_started: None,
            last_event: StdInstant::now(),
            timed_event: false,
            last_look: (StdInstant::now(), wall_nanos()),
            last_arrival: Instant::MIN,
            wrote_outbox: false,
            kafka: None,
            holds: Vec::new(),
            children: Children::default(),
            bad_log: BadLog::new("lines that are not events"),
            ahead_log: BadLog::new("events dated past time.max_ahead"),
            stopping: false,
            halt: Arc::default(),
            left: 0,
        };
        core.publish_gauges();
        core
    }

    /// Leaves queued Kafka records alone once `halt` is set (see the field).
    pub fn with_holds(mut self, holds: Vec<Arc<std::sync::atomic::AtomicBool>>) -> Core {
        self.holds = holds;
        self
    }

    pub fn with_halt(mut self, halt: Arc<std::sync::atomic::AtomicBool>) -> Core {
        self.halt = halt;
        self
    }

    /// Whether queued Kafka records are skipped.
    fn halted(&self) -> bool {
        self.halt.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Makes the idle fallback wait while Kafka reports events held back.
    pub fn with_kafka(mut self, health: Option<Arc<crate::daemon::kafka::Health>>) -> Core {
        self.kafka = health;
        self
    }

    /// Runs until `Shutdown` or every sender is gone; commits before returning.
    pub fn run(mut self, rx: Receiver<Msg>) -> Result<()> {
        self.fire_restored()?;
        self.open_waiting_steps()?;
        loop {
            let timeout = match self.batch_started {
                Some(t) => self
                    .cfg
                    .batch_interval
                    .saturating_sub(t.elapsed())
                    .min(TICK),
                None => TICK,
            };
            match rx.recv_timeout(timeout) {
                Ok(Msg::Lines {
                    source,
                    lines,
                    at,
                    position,
                    atomic,
                    done,
                    hold,
                }) => {
                    // Not left even for a file, read again from its stored position:
                    // the queue may hold the end of a file rotated away (or truncated)
                    // since, which the restart would not find.
                    self.lines(&source, &lines, &at, position, atomic, done)?;
                    drop(hold);
                }
                // Kafka's are fetched again from the stored offsets (the source takes
                // the dropped answer for an uncommitted batch).
                Ok(Msg::Records { records, .. }) if self.halted() => {
                    self.left += records.len();
                }
                Ok(Msg::Records {
                    records,
                    positions,
                    done,
                }) => self.records(&records, &positions, done)?,
                Ok(Msg::Sync { done }) => {
                    let r = self.commit();
                    let _ = done.send(r.as_ref().map(|_| ()).map_err(|e| format!("{e:#}")));
                    r?;
                }
                Ok(Msg::Reload { rules, done }) => {
                    // The rules were checked before they came here: what fails now is the
                    // state (the commit of the open batch, the rule shapes), fatal as any
                    // other state failure (the batch's events were not acknowledged).
                    let r = self.reload(rules);
                    let _ = done.send(r.as_ref().map(|_| ()).map_err(|e| format!("{e:#}")));
                    r?;
                }
                Ok(Msg::Stopping) => self.stopping = true,
                Ok(Msg::Shutdown) | Err(RecvTimeoutError::Disconnected) => {
                    self.commit()?;
                    if self.left > 0 {
                        tracing::info!(
                            events = self.left,
                            "queued events left for after the restart (read again from the stored positions)"
                        );
                    }
                    return Ok(());
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            self.idle_tick()?;
            self.bad_log.flush(false);
            self.ahead_log.flush(false);
            // Also by the event texts it holds for the timeline (up to 64 KiB each, until
            // the commit): large events in long batches stay within memory.
            let full = self.batch_events >= self.cfg.batch_events
                || self.engine.state().pending_event_bytes() >= BATCH_EVENT_BYTES
                || (self.stopping && self.batch_started.is_some());
            let old = self
                .batch_started
                .is_some_and(|t| t.elapsed() >= self.cfg.batch_interval);
            // Alerts that timers fired on a quiet stream: nothing to batch them with, so
            // they leave now instead of after the batch interval.
            let timers_only = self.batch_events == 0 && self.wrote_outbox;
            if full || old || timers_only {
                self.commit()?;
            }
            // The next look at the idle clock measures the wait for a message from here:
            // a long commit or fire is work, not a suspension.
            self.last_look = (StdInstant::now(), wall_nanos());
        }
    }

    fn lines(
        &mut self,
        source: &Arc<str>,
        lines: &[String],
        at: &LineAt,
        position: Option<Position>,
        atomic: bool,
        done: Option<oneshot::Sender<Result<usize, Rejected>>>,
    ) -> Result<()> {
        self.wall_tick()?;
        let received = self.arrival();
        if atomic {
            for (i, line) in lines.iter().enumerate() {
                if let Err(e) = self
                    .decoder
                    .decode_at(line.as_bytes(), Some(source), received)
                {
                    self.reject(source, &e);
                    if let Some(d) = done {
                        let _ = d.send(Err(Rejected {
                            line: i + 1,
                            message: e.to_string(),
                        }));
                    }
                    return Ok(());
                }
            }
        }
        // A request refused whole counts in `rejected` only, as one the server refused.
        self.metrics
            .events_received
            .with_label_values(&[source])
            .inc_by(lines.len() as u64);
        self.begin()?;
        let mut applied = 0;
        for (i, line) in lines.iter().enumerate() {
            applied += self.apply(source, line, None, received, at.of(i))? as usize;
        }
        if std::mem::take(&mut self.timed_event) {
            self.last_event = StdInstant::now();
        }
        self.children.decoded(source, applied as u64);
        if let Some(p) = position {
            store::save_position(self.engine.state().conn(), source, &p)?;
        }
        self.batch_events += lines.len().max(1);
        if let Some(d) = done {
            self.pending_acks.push((d, applied));
        }
        Ok(())
    }

    /// Decodes and applies one line; false when it was bad (counted and skipped).
    fn apply(
        &mut self,
        source: &Arc<str>,
        line: &str,
        part: Option<i32>,
        received: Option<Instant>,
        (offset, line_no): (Option<u64>, Option<u64>),
    ) -> Result<bool> {
        let ok = match self
            .decoder
            .decode_at(line.as_bytes(), Some(source), received)
        {
            Ok(ev) => {
                let ahead = self.engine.ceiling().is_some_and(|c| ev.time > c);
                self.timed_event |= !ahead;
                if ahead {
                    self.metrics.events_ahead.with_label_values(&[source]).inc();
                    if self.ahead_log.allow(source) {
                        tracing::warn!(
                            source = &**source,
                            partition = part,
                            offset,
                            line = line_no,
                            time = crate::time::format_rfc3339(ev.time),
                            "event dated more than time.max_ahead ahead of the wall clock: \
                             applied, but its time does not move the clock"
                        );
                    }
                }
                self.engine
                    .state_mut()
                    .set_event(Some((line, ev.time)), part);
                self.engine.observe(ev.time);
                self.fire(false)?;
                self.engine.process(&ev, &mut self.outcomes);
                true
            }
            Err(e) => {
                self.reject(source, &e);
                if self.bad_log.allow(source) {
                    tracing::warn!(
                        source = &**source,
                        partition = part,
                        offset,
                        line = line_no,
                        error = %e,
                        "skipped a bad line"
                    );
                }
                false
            }
        };
        self.drain_outcomes()?;
        Ok(ok)
    }

    fn records(
        &mut self,
        records: &[Record],
        positions: &[(String, Position)],
        done: Option<oneshot::Sender<Result<usize, Rejected>>>,
    ) -> Result<()> {
        self.wall_tick()?;
        let received = self.arrival();
        self.begin()?;
        // Per-source counts, flushed once per message (sources repeat in runs).
        let mut counts: Vec<(Arc<str>, u64, u64)> = Vec::new();
        for r in records {
            let ok = if r.utf8 {
                let offset = r.offset.and_then(|o| u64::try_from(o).ok());
                self.apply(&r.source, &r.text, r.part, received, (offset, None))?
            } else {
                self.reject(
                    &r.source,
                    &crate::event::DecodeError::Json("not UTF-8".into()),
                );
                if self.bad_log.allow(&r.source) {
                    tracing::warn!(
                        source = &*r.source,
                        partition = r.part,
                        offset = r.offset,
                        "skipped a record that is not UTF-8"
                    );
                }
                false
            };
            match counts.iter_mut().find(|c| Arc::ptr_eq(&c.0, &r.source)) {
                Some(c) => {
                    c.1 += 1;
                    c.2 += ok as u64;
                }
                None => counts.push((Arc::clone(&r.source), 1, ok as u64)),
            }
        }
        let mut applied = 0;
        for (source, n, ok) in counts {
            self.metrics
                .events_received
                .with_label_values(&[&source])
                .inc_by(n);
            self.children.decoded(&source, ok);
            applied += ok as usize;
        }
        if std::mem::take(&mut self.timed_event) {
            self.last_event = StdInstant::now();
        }
        for (key, p) in positions {
            store::save_position(self.engine.state().conn(), key, p)?;
        }
        self.batch_events += records.len().max(1);
        if let Some(d) = done {
            self.pending_acks.push((d, applied));
        }
        Ok(())
    }

    /// In `clock: wall` mode, before a message: the clock moves to wall time and fires
    /// what is due a lot at a time, each committed as it goes (as between messages), not
    /// all in the batch of the message's first event (after a suspension or a restart
    /// that let a million deadlines pass, say).
    fn wall_tick(&mut self) -> Result<()> {
        if matches!(self.cfg.time.clock, ClockMode::Wall) {
            self.idle_tick()?;
        }
        Ok(())
    }

    /// The receipt time `wall` mode gives this message's events (`None` in `event` mode);
    /// sets how far their times may move the clock (`time.max_ahead`).
    fn arrival(&mut self) -> Option<Instant> {
        let wall = wall_nanos();
        if matches!(self.cfg.time.clock, ClockMode::Event) {
            let ceiling = self.cfg.time.max_ahead.map(|a| wall.saturating_add(a));
            self.engine.set_ceiling(ceiling);
            return None;
        }
        // Not before the clock (wall time - lateness, moved by the idle ticks too, and
        // read from the state file after a restart) has come to.
        let floor = self.engine.clock().saturating_add(self.cfg.time.lateness);
        self.last_arrival = self.last_arrival.max(wall).max(floor);
        Some(self.last_arrival)
    }

    fn reject(&self, source: &str, e: &crate::event::DecodeError) {
        self.metrics
            .events_rejected
            .with_label_values(&[source, e.reason()])
            .inc();
    }

    fn begin(&mut self) -> Result<()> {
        if self.batch_started.is_none() {
            self.engine.state_mut().begin()?;
            self.batch_started = Some(StdInstant::now());
        }
        Ok(())
    }

    /// Moves the clock with wall time: always in `wall` mode, after `idle` without events
    /// in `event` mode.
    fn idle_tick(&mut self) -> Result<()> {
        if self.kafka.as_ref().is_some_and(|k| k.holds_clock())
            || self
                .holds
                .iter()
                .any(|h| h.load(std::sync::atomic::Ordering::Relaxed))
        {
            // Not idle: events wait in Kafka (catching up, rebalancing, or unreachable),
            // or in a file its source cannot read yet.
            self.last_event = StdInstant::now();
        }
        let (then, then_wall) =
            std::mem::replace(&mut self.last_look, (StdInstant::now(), wall_nanos()));
        let slept = self
            .last_look
            .1
            .saturating_sub(then_wall)
            .saturating_sub(then.elapsed().as_nanos() as i64);
        if then.elapsed() > SUSPENDED || slept > SUSPENDED.as_nanos() as i64 {
            // Whatever arrived meanwhile has not been read yet: the quiet starts now.
            self.last_event = StdInstant::now();
        }
        let t = &self.cfg.time;
        let go = match t.clock {
            ClockMode::Wall => true,
            ClockMode::Event => {
                t.idle > 0 && self.last_event.elapsed() >= StdDuration::from_nanos(t.idle as u64)
            }
        };
        if !go {
            return Ok(());
        }
        let to = wall_nanos().saturating_sub(t.lateness);
        if to > self.engine.clock() {
            self.begin()?;
            self.engine.state_mut().set_event(None, None);
            if self.engine.move_clock(to) {
                self.fire(true)?;
            }
        }
        Ok(())
    }

    /// Fires what the clock has passed, a chunk at a time, each chunk's outcomes into the
    /// outbox before the next: a clock that jumps past a million deadlines (an outage
    /// upstream, a long stop) must not hold a million outcomes in memory.
    ///
    /// `commit_chunks` commits after each chunk, so a long fire neither holds the write
    /// lock (the dispatcher's) nor grows the WAL for its whole length, and its alerts
    /// leave as it goes. Only where the clock moved with wall time: a crash midway then
    /// fires the rest at the next tick, a little later, as a slower fire would have. A
    /// fire an event caused stays in that event's batch (the events before it in the
    /// same source read are not committed without their position), so a crash leaves
    /// none of it committed and the event is read again.
    fn fire(&mut self, commit_chunks: bool) -> Result<()> {
        while self.engine.fire_some(FIRE_CHUNK, &mut self.outcomes) {
            self.drain_outcomes()?;
            if commit_chunks {
                self.commit()?;
                self.begin()?;
            }
        }
        self.drain_outcomes()
    }

    /// Turns the engine's outcomes into metrics and outbox rows.
    fn drain_outcomes(&mut self) -> Result<()> {
        if self.outcomes.is_empty() {
            return Ok(());
        }
        let outcomes = std::mem::take(&mut self.outcomes);
        let rules = Arc::clone(self.engine.rules());
        let now_ms = wall_ms();
        for o in &outcomes {
            let Some(rule) = rules.rules.get(o.rule) else {
                continue;
            };
            let step = o
                .step
                .and_then(|s| rule.steps.get(s))
                .map(|s| s.name.as_str())
                .unwrap_or("");
            let (r, st) = (o.rule, o.step.unwrap_or(0));
            let m = &self.metrics;
            let kind = o.kind.name();
            self.children.count((r, Slot::Outcome(kind), 0), || {
                m.outcomes.with_label_values(&[&rule.name, kind])
            });
            match &o.kind {
                Kind::Opened => self.children.count((r, Slot::Opened, 0), || {
                    m.instances_opened.with_label_values(&[&rule.name])
                }),
                Kind::Closed => self.children.count((r, Slot::Finished, 0), || {
                    m.instances_closed
                        .with_label_values(&[&rule.name, "finished"])
                }),
                Kind::Cancelled => self.children.count((r, Slot::Cancelled, 0), || {
                    m.instances_closed
                        .with_label_values(&[&rule.name, "cancelled"])
                }),
                Kind::Missing => self.children.count((r, Slot::Step("missing"), st), || {
                    m.steps.with_label_values(&[&rule.name, step, "missing"])
                }),
                Kind::Satisfied => {
                    self.children.count((r, Slot::Step("satisfied"), st), || {
                        m.steps.with_label_values(&[&rule.name, step, "satisfied"])
                    });
                    if let Some(t) = o.time {
                        let secs = t.saturating_sub(o.opened_at).max(0) as f64 / 1e9;
                        self.children.observe(
                            (r, st),
                            || m.step_latency.with_label_values(&[&rule.name, step]),
                            secs,
                        );
                    }
                }
                Kind::Late => self.children.count((r, Slot::Step("late"), st), || {
                    m.steps.with_label_values(&[&rule.name, step, "late"])
                }),
                _ => {}
            }
            match &o.kind {
                Kind::Alert(a) => {
                    let data = output::to_json(&rules, o);
                    let body = envelope("sagawatch.alert.firing", o.at, &data);
                    let sinks = if a.sinks.is_empty() {
                        &self.cfg.alert_sinks
                    } else {
                        &a.sinks
                    };
                    // Firing while a late correlate can still resolve it: until the
                    // engine clock (not wall time, which it may lag far behind) passes
                    // the deadline plus `late`.
                    let until =
                        o.deadline.unwrap_or(o.at).saturating_add(rule.late.nanos()) / 1_000_000;
                    let conn = self.engine.state().conn();
                    for sink in sinks {
                        let fp = if self.to_alertmanager(sink) {
                            label_set(&body)
                        } else {
                            None
                        };
                        if let Some(fp) = &fp {
                            Outbox::supersede_resolves(conn, sink, &rule.name, step, fp, now_ms)?;
                        }
                        Outbox::insert(
                            conn,
                            &NewMessage {
                                id: &a.id,
                                sink,
                                kind: "alert",
                                rule: &rule.name,
                                key: &o.key,
                                step,
                                body: &body,
                                fp: fp.as_deref(),
                                opened: Some(o.opened_at),
                            },
                            now_ms,
                        )?;
                        Outbox::record_alert(
                            conn,
                            &AlertRow {
                                id: a.id.clone(),
                                sink: sink.clone(),
                                rule: rule.name.clone(),
                                key: o.key.clone(),
                                step: step.to_string(),
                                body: body.clone(),
                                active_until_ms: until,
                                fp,
                                opened: Some(o.opened_at),
                            },
                        )?;
                    }
                    self.wrote_outbox = true;
                }
                Kind::Late => {
                    let conn = self.engine.state().conn();
                    for a in Outbox::take_alerts(conn, &rule.name, &o.key, step, o.opened_at)? {
                        if self.to_alertmanager(&a.sink) {
                            Outbox::supersede(conn, &a.id, &a.sink, now_ms)?;
                            // Alertmanager knows alerts by labels only: while another key's
                            // alert with the same labels fires, resolving would end it too.
                            if let Some(fp) = &a.fp
                                && Outbox::labels_firing(
                                    conn,
                                    &a.sink,
                                    &a.rule,
                                    &a.step,
                                    fp,
                                    o.at / 1_000_000,
                                )?
                            {
                                continue;
                            }
                        }
                        let body = resolved(&a.body, o);
                        let id = format!("{}-resolved", a.id);
                        Outbox::insert(
                            conn,
                            &NewMessage {
                                id: &id,
                                sink: &a.sink,
                                kind: "resolve",
                                rule: &a.rule,
                                key: &a.key,
                                step: &a.step,
                                body: &body,
                                fp: a.fp.as_deref(),
                                // Its alert's lane (no instance if the alert was written
                                // before they were recorded, as its outbox row).
                                opened: a.opened,
                            },
                            now_ms,
                        )?;
                        self.wrote_outbox = true;
                    }
                }
                Kind::Compensate(c) => {
                    let data = output::to_json(&rules, o);
                    let body = envelope("sagawatch.compensate", o.at, &data);
                    Outbox::insert(
                        self.engine.state().conn(),
                        &NewMessage {
                            id: &c.id,
                            sink: &c.sink,
                            kind: "compensate",
                            rule: &rule.name,
                            key: &o.key,
                            step,
                            body: &body,
                            fp: None,
                            opened: Some(o.opened_at),
                        },
                        now_ms,
                    )?;
                    self.wrote_outbox = true;
                }
                _ => {}
            }
        }
        self.outcomes = outcomes;
        self.outcomes.clear();
        Ok(())
    }

    fn to_alertmanager(&self, sink: &str) -> bool {
        self.cfg
            .sinks
            .iter()
            .any(|s| s.name == sink && matches!(s.kind, SinkKind::Alertmanager { .. }))
    }

    /// Commits the open batch, then acknowledges what it contained.
    pub fn commit(&mut self) -> Result<()> {
        if self.batch_started.is_none() {
            return Ok(());
        }
        let timer = self.metrics.commit_seconds.start_timer();
        let r = self.engine.state_mut().commit();
        timer.observe_duration();
        self.batch_started = None;
        self.batch_events = 0;
        match r {
            Ok(()) => {
                // Metrics first: whoever is acknowledged sees metrics that include its events.
                self.children.publish(&self.metrics);
                self.publish_gauges();
                for (d, n) in self.pending_acks.drain(..) {
                    let _ = d.send(Ok(n));
                }
                if std::mem::take(&mut self.wrote_outbox) {
                    self.wake_dispatcher.notify_one();
                }
                Ok(())
            }
            Err(e) => {
                // Nothing of the batch is acknowledged: HTTP callers get an error and
                // file sources resume from the last committed position after a restart.
                self.pending_acks.clear();
                self.children.discard();
                Err(e)
            }
        }
    }

    fn reload(&mut self, rules: Arc<RuleSet>) -> Result<()> {
        self.commit()?;
        // A removed rule's instances stay in the state file (ignored), but its series go.
        self.metrics.forget_rules(self.engine.rules(), &rules);
        let dropped = self.engine.state_mut().set_rules(&rules)?;
        for (rule, n) in dropped {
            tracing::warn!(
                rule,
                dropped = n,
                "rule steps changed; its stored instances were dropped"
            );
        }
        self.decoder = Decoder::new(&rules, &self.cfg.time.field);
        self.metrics.prepare_rules(&rules);
        self.engine.set_rules(rules);
        self.children = Children::default();
        self.fire_restored()?;
        self.open_waiting_steps()?;
        self.publish_gauges();
        Ok(())
    }

    /// Reports at once the deadlines of a rule loaded again (by a reload, or across a
    /// restart) that passed while it was away.
    fn fire_restored(&mut self) -> Result<()> {
        // Only then: a step that opened already overdue otherwise fires at the next event,
        // and firing it here instead would change its outcome's time (and the dedup memory
        // that follows).
        let restored = self.engine.state_mut().take_restored();
        if restored.is_empty() {
            return Ok(());
        }
        self.begin()?;
        self.engine.state_mut().set_event(None, None);
        self.fire(true)?;
        self.engine.state().restored_done(&restored)?;
        self.commit()?;
        Ok(())
    }

    /// Opens, in the stored instances of rules whose `after` links changed (by a reload,
    /// or across a restart), the waiting steps the rules let open now, a page of keys per
    /// batch; those already overdue are reported at once.
    fn open_waiting_steps(&mut self) -> Result<()> {
        for name in self.engine.state_mut().take_reafter() {
            let Some(ix) = self
                .engine
                .rules()
                .rules
                .iter()
                .position(|r| r.name == name)
            else {
                continue;
            };
            tracing::info!(
                rule = name,
                "the rule's `after` links changed: opening the steps of its open instances that they let open"
            );
            let mut from = String::new();
            loop {
                let keys = self.engine.state().open_keys_after(&name, &from, 1000)?;
                let Some(last) = keys.last() else { break };
                from = last.clone();
                self.begin()?;
                self.engine.state_mut().set_event(None, None);
                for key in &keys {
                    self.engine.open_waiting_steps(ix, key, &mut self.outcomes);
                }
                self.drain_outcomes()?;
                self.fire(true)?;
                self.commit()?;
            }
            self.begin()?;
            self.engine.state().reafter_done(&name)?;
            self.commit()?;
        }
        Ok(())
    }

    fn publish_gauges(&self) {
        let st = self.engine.state();
        for (name, n) in st.rule_names().iter().zip(st.open_by_rule()) {
            self.metrics
                .open_instances
                .with_label_values(&[name])
                .set(*n);
        }
        let clock = self.engine.clock();
        match st.oldest_deadline() {
            Ok(Some(d)) if clock != Instant::MIN => self
                .metrics
                .oldest_deadline_age
                .set(clock.saturating_sub(d) as f64 / 1e9),
            _ => self.metrics.oldest_deadline_age.set(0.0),
        }
        if clock != Instant::MIN {
            // (`clock_lag` follows from it at each scrape.)
            self.metrics.engine_clock.set(clock as f64 / 1e9);
        }
    }
}

/// The Standard Webhooks payload shape: type, timestamp, data.
fn envelope(kind: &str, at: Instant, data: &serde_json::Value) -> String {
    serde_json::json!({
        "type": kind,
        "timestamp": format_rfc3339(at),
        "data": data,
    })
    .to_string()
}

/// The resolve message for a firing alert's body, resolved by a late correlate.
fn resolved(alert_body: &str, late: &Outcome) -> String {
    let mut v = crate::event::parse_json(alert_body).unwrap_or_default();
    let fired = v.get("timestamp").cloned();
    v["type"] = "sagawatch.alert.resolved".into();
    v["timestamp"] = format_rfc3339(late.at).into();
    if let Some(d) = v.get_mut("data").and_then(|d| d.as_object_mut()) {
        d.insert("outcome".into(), "resolved".into());
        // Its own id (as its webhook-id), so that a receiver deduplicating on ids does
        // not take it for the alert; `alert_id` names the alert it resolves.
        if let Some(id) = d.get("id").and_then(|i| i.as_str()).map(str::to_string) {
            d.insert("id".into(), format!("{id}-resolved").into());
            d.insert("alert_id".into(), id.into());
        }
        // When the alert fired: Alertmanager's `startsAt` for the resolve too.
        if let Some(t) = fired {
            d.insert("alert_at".into(), t);
        }
        d.insert("at".into(), format_rfc3339(late.at).into());
        if let Some(t) = late.time {
            d.insert("resolved_by".into(), format_rfc3339(t).into());
        }
    }
    v.to_string()
}

/// The Alertmanager label set of an alert body, as canonical JSON (keys sorted): what
/// identifies the alert in Alertmanager.
fn label_set(body: &str) -> Option<String> {
    dispatch::alertmanager_labels(body).map(|m| serde_json::Value::Object(m).to_string())
}
