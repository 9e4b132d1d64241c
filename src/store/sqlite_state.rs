//! The engine's state trait over SQLite: one row per (rule, key) with the earliest open
//! deadline indexed, so deadlines fire from the index and memory does not grow with open
//! instances. Hot rows are held in a bounded write-back cache (`rows.rs`) and written at
//! commit. The caller brackets engine calls in `begin`/`commit`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use rusqlite::{Connection, OptionalExtension, params};

use super::rows::{DueRow, Rows, next_deadline};
use crate::engine::state::{Clock, Due, Instance, State, StepState, StepStatus, Steps};
use crate::rules::RuleSet;
use crate::time::Instant;

/// Instance rows held in memory by default: the rows of the last few minutes of a busy
/// stream, about 20 MB.
pub const ROW_CACHE: usize = 100_000;

/// SQLite-backed [`State`]. Errors from SQLite cannot cross the trait, so the first one is
/// kept and [`SqliteState::commit`] rolls the whole batch back and fails instead of
/// committing it.
pub struct SqliteState {
    conn: Connection,
    /// Rule names by index; `Arc` so the hot path borrows them without copying.
    names: Vec<Arc<str>>,
    index: HashMap<Arc<str>, usize>,
    clock: Clock,
    clock_dirty: bool,
    /// No open deadline is earlier than this (`i64::MAX`: none known).
    next_due: Instant,
    /// No expiry (closed rows, early correlates, cancels) is earlier than this.
    next_purge: Instant,
    /// Open instances by rule index.
    open: Vec<i64>,
    open_dirty: bool,
    /// Whether the row taken last existed and was open.
    taken_open: bool,
    /// Whether the row taken last existed, and when it opened.
    taken_existed: bool,
    taken_opened: Option<Instant>,
    /// When the row taken last had closed, if it had.
    taken_closed: Option<Instant>,
    /// Hot instance rows, written back at commit; the truth for the rows they hold.
    rows: Rows,
    row_cache: usize,
    /// Open deadlines in SQLite below this belong to rows changed since (answered from
    /// `rows`): the deadline query need not look below it. Lowered when rows are written.
    sql_floor: Instant,
    /// The last `due` stopped at its limit: its rows are being fired in chunks.
    chunked: bool,
    /// The clock of the last `purge`; expired rows are deleted at commit.
    purge_clock: Instant,
    error: Option<rusqlite::Error>,
    /// The same for reads made through `&self` (early correlates, cancels).
    read_error: RefCell<Option<rusqlite::Error>>,
    in_tx: bool,
    /// Turns at writing with the outbox dispatcher (the daemon's), held from `begin` to
    /// the commit or rollback (or the drop, after a failure in between).
    gate: Option<Arc<super::WriteGate>>,
    /// Whether this batch took its turn (a wait for it may time out).
    in_turn: bool,
    /// The state file, for errors.
    path: std::path::PathBuf,
    /// How many early-correlate and cancel rows each (rule, key) hash may have: a
    /// negative cache that spares most triggers two lookups. It only ever overcounts
    /// (then a lookup is made), so it never hides a row. Its size follows remembered
    /// early correlates and cancels, not open instances.
    remembered: HashMap<u64, u32>,
    /// Set by the checkpointer when the WAL should be started over after this commit.
    wal_restart: Arc<AtomicBool>,
    /// The event being applied (its text and time), kept as the trigger of rows it opens
    /// and the correlate of steps it satisfies, for the timeline.
    event: Option<(Box<str>, Instant)>,
    /// The seq of the current event in the events table, once a row references it.
    event_seq: Option<i64>,
    /// The seq the next appended event gets (0: not read from the file yet).
    next_seq: i64,
    /// Events appended in this batch, inserted together at commit.
    new_events: Vec<(i64, Instant, Box<str>)>,
    /// Their texts' bytes.
    new_event_bytes: usize,
    /// The Kafka partition of the event being applied, stored on the rows it creates.
    part: Option<i32>,
    /// Step statuses and event references of the row taken last.
    taken_steps: Vec<StepStatus>,
    taken_refs: Vec<i64>,
    /// (clock, largest event seq) checkpoints: events up to that seq are forgotten once
    /// the clock is `retention` past the checkpoint.
    event_marks: std::collections::VecDeque<(Instant, i64)>,
    /// Large single moves of the clock, (from, by): an instance whose deadline such a move
    /// passed closes at the clock it moved to, however far past its deadline, and is
    /// remembered from there; the events stored before the move are kept that much longer.
    jumps: std::collections::VecDeque<(Instant, i64)>,
    /// Whether `event_marks` or `jumps` changed since they were stored (in `meta`, so
    /// that a restart does not start the marks over, and keep every event for another
    /// retention period each time).
    marks_dirty: bool,
    /// Rules loaded again (at open or by the last reload) whose deadlines came back.
    restored: Vec<String>,
    /// Rules loaded with changed `after` links, until [`SqliteState::take_reafter`].
    reafter: Vec<String>,
    /// The engine's `lateness`: a trigger stored at clock C may be timed up to C + lateness,
    /// and so its deadlines.
    lateness: i64,
    /// How long any instance can need its events: the longest chain of `within`s plus
    /// dedup or late memory, over all rules, plus an hour.
    retention: i64,
    /// Early correlates looked up while applying this event: (step, time, text).
    early_seen: RefCell<Vec<(usize, Instant, String)>>,
}

/// A move of the clock larger than this is remembered for keeping events (see `jumps`);
/// smaller ones are within the hour `retention` adds.
const JUMP: i64 = 600_000_000_000;

/// Longest event text kept for the timeline (and for a reload's new capture fields,
/// which a text cut short cannot give).
const MAX_EVENT_TEXT: usize = 64 << 10;

fn memo_hash(rule: &str, key: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    rule.hash(&mut h);
    key.hash(&mut h);
    h.finish()
}

fn status_code(s: StepStatus) -> u8 {
    match s {
        StepStatus::Pending => 0,
        StepStatus::Open => 1,
        StepStatus::Satisfied => 2,
        StepStatus::Missing => 3,
        StepStatus::Late => 4,
        StepStatus::Cancelled => 5,
    }
}

fn status_from(c: u8) -> StepStatus {
    match c {
        1 => StepStatus::Open,
        2 => StepStatus::Satisfied,
        3 => StepStatus::Missing,
        4 => StepStatus::Late,
        5 => StepStatus::Cancelled,
        _ => StepStatus::Pending,
    }
}

/// Event references (seqs; 0 for none) as little-endian i64s: the trigger, then one
/// per step.
pub fn encode_refs(refs: &[i64]) -> Vec<u8> {
    refs.iter().flat_map(|r| r.to_le_bytes()).collect()
}

pub fn decode_refs(b: &[u8]) -> Vec<i64> {
    b.chunks_exact(8)
        .map(|c| {
            let mut x = [0u8; 8];
            x.copy_from_slice(c);
            i64::from_le_bytes(x)
        })
        .collect()
}

/// Steps as 9 bytes each: status, then the instant little-endian.
pub fn encode_steps(steps: &[StepState]) -> Vec<u8> {
    let mut b = Vec::with_capacity(steps.len() * 9);
    for s in steps {
        b.push(status_code(s.status));
        b.extend_from_slice(&s.at.to_le_bytes());
    }
    b
}

pub fn decode_steps(b: &[u8]) -> Steps {
    let n = b.len() / 9;
    let mut steps = Steps::pending(n);
    for (i, c) in b.chunks_exact(9).enumerate() {
        let mut at = [0u8; 8];
        at.copy_from_slice(&c[1..]);
        steps[i] = StepState {
            status: status_from(c[0]),
            at: i64::from_le_bytes(at),
        };
    }
    steps
}

fn shape(rule: &crate::rules::model::Rule) -> String {
    rule.steps
        .iter()
        .map(|s| s.name.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

impl SqliteState {
    /// Opens the state over a migrated connection for `rules`. Rows of a rule whose steps
    /// changed since they were written are dropped (their step vectors no longer fit);
    /// rows of rules that no longer exist are kept but ignored.
    pub fn open(mut conn: Connection, rules: &RuleSet, path: &Path) -> Result<SqliteState> {
        let Applied {
            dropped,
            restored,
            reafter,
        } = apply_shapes(&mut conn, rules)
            .with_context(|| format!("state file {}: reading rule shapes", path.display()))?;
        for (rule, n) in dropped {
            tracing::warn!(
                rule,
                dropped = n,
                "rule steps changed; its stored instances were dropped"
            );
        }
        let mut st = SqliteState {
            conn,
            names: Vec::new(),
            index: HashMap::new(),
            clock: Clock::default(),
            clock_dirty: false,
            next_due: Instant::MIN,
            next_purge: Instant::MIN,
            open: Vec::new(),
            open_dirty: false,
            taken_open: false,
            taken_existed: false,
            taken_opened: None,
            taken_closed: None,
            rows: Rows::new(0, ROW_CACHE),
            row_cache: ROW_CACHE,
            sql_floor: Instant::MIN,
            chunked: false,
            purge_clock: Instant::MIN,
            error: None,
            read_error: RefCell::default(),
            in_tx: false,
            gate: None,
            in_turn: false,
            path: path.to_path_buf(),
            remembered: HashMap::new(),
            wal_restart: Arc::default(),
            event: None,
            event_seq: None,
            next_seq: 0,
            new_events: Vec::new(),
            new_event_bytes: 0,
            part: None,
            taken_steps: Vec::new(),
            taken_refs: Vec::new(),
            event_marks: Default::default(),
            jumps: Default::default(),
            marks_dirty: false,
            restored,
            reafter,
            lateness: 0,
            retention: 0,
            early_seen: RefCell::default(),
        };
        st.load(rules)
            .with_context(|| format!("state file {}: reading state", path.display()))?;
        Ok(st)
    }

    fn load(&mut self, rules: &RuleSet) -> rusqlite::Result<()> {
        self.names = rules
            .rules
            .iter()
            .map(|r| Arc::from(r.name.as_str()))
            .collect();
        self.retention = rules
            .rules
            .iter()
            .map(|r| {
                let chain = r
                    .steps
                    .iter()
                    .fold(0i64, |a, s| a.saturating_add(s.within.nanos()));
                chain.saturating_add(r.dedup.nanos().max(r.late.nanos()))
            })
            .max()
            .unwrap_or(0)
            .saturating_add(3_600_000_000_000);
        self.index = self
            .names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i))
            .collect();
        self.reload_cached()
    }

    /// Re-reads what is cached from the file: the clock, open counts, remembered hashes.
    fn reload_cached(&mut self) -> rusqlite::Result<()> {
        let meta = |k: &str| -> rusqlite::Result<Option<i64>> {
            self.conn
                .query_row("SELECT v FROM meta WHERE k = ?1", params![k], |r| r.get(0))
                .optional()
        };
        self.clock = Clock {
            max_seen: meta("clock.max_seen")?.unwrap_or(Instant::MIN),
            now: meta("clock.now")?.unwrap_or(Instant::MIN),
        };
        let mut open = Vec::with_capacity(self.names.len());
        for n in &self.names {
            open.push(meta(&format!("open:{n}"))?.unwrap_or(0));
        }
        self.open = open;
        self.next_due = Instant::MIN;
        self.next_purge = Instant::MIN;
        self.rows = Rows::new(self.names.len(), self.row_cache);
        self.sql_floor = Instant::MIN;
        self.chunked = false;
        self.next_seq = 0;
        self.new_events.clear();
        self.new_event_bytes = 0;
        let mut remembered = HashMap::new();
        {
            let mut stmt = self
                .conn
                .prepare("SELECT rule, key FROM early UNION ALL SELECT rule, key FROM cancels")?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                let (rule, key): (String, String) = (r.get(0)?, r.get(1)?);
                *remembered.entry(memo_hash(&rule, &key)).or_insert(0) += 1;
            }
        }
        self.remembered = remembered;
        let text = |k: &str| -> rusqlite::Result<Option<String>> {
            self.conn
                .query_row("SELECT v FROM meta WHERE k = ?1", params![k], |r| r.get(0))
                .optional()
        };
        let pairs = |t: Option<String>| -> std::collections::VecDeque<(Instant, i64)> {
            t.and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or_default()
        };
        self.event_marks = pairs(text("events.marks")?);
        self.jumps = pairs(text("events.jumps")?);
        self.marks_dirty = false;
        Ok(())
    }

    fn may_remember(&self, rule: usize, key: &str) -> bool {
        self.remembered
            .get(&memo_hash(&self.names[rule], key))
            .is_some_and(|&n| n > 0)
    }

    fn remember(&mut self, rule: &str, key: &str) {
        *self.remembered.entry(memo_hash(rule, key)).or_insert(0) += 1;
    }

    fn forget(&mut self, rule: &str, key: &str) {
        let h = memo_hash(rule, key);
        if let Some(n) = self.remembered.get_mut(&h) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.remembered.remove(&h);
            }
        }
    }

    /// Switches to a new rule set (reload): drops rows of rules whose steps changed.
    pub fn set_rules(&mut self, rules: &RuleSet) -> Result<Vec<(String, usize)>> {
        // Between batches the outbox dispatcher may be writing: its turn first (the gate),
        // and an immediate transaction (a deferred one fails at once with SQLITE_BUSY,
        // not waiting, when the dispatcher commits before its first write).
        if let Some(g) = &self.gate {
            self.in_turn = g.enter_core();
        }
        let applied = self
            .flush_meta()
            .and_then(|()| apply_shapes(&mut self.conn, rules));
        self.leave_gate();
        let Applied {
            dropped,
            restored,
            reafter,
        } = applied?;
        self.restored = restored;
        self.reafter = reafter;
        self.load(rules)?;
        Ok(dropped)
    }

    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    /// Takes turns at writing with the daemon's other writer (see [`super::WriteGate`]).
    pub fn with_gate(mut self, gate: Arc<super::WriteGate>) -> SqliteState {
        self.gate = Some(gate);
        self
    }

    pub fn begin(&mut self) -> Result<()> {
        if !self.in_tx {
            if let Some(g) = &self.gate {
                self.in_turn = g.enter_core();
            }
            if let Err(e) = self.conn.execute_batch("BEGIN IMMEDIATE") {
                self.leave_gate();
                return Err(e.into());
            }
            self.in_tx = true;
        }
        Ok(())
    }

    fn write_failed(&self) -> String {
        format!(
            "state file {}: write failed; batch rolled back",
            self.path.display()
        )
    }

    /// The gate taken with [`with_gate`](Self::with_gate), for the other writer.
    pub fn gate(&self) -> Arc<super::WriteGate> {
        self.gate.clone().unwrap_or_default()
    }

    fn leave_gate(&mut self) {
        if let Some(g) = &self.gate
            && std::mem::take(&mut self.in_turn)
        {
            g.leave();
        }
    }

    pub fn in_tx(&self) -> bool {
        self.in_tx
    }

    fn flush_meta(&mut self) -> rusqlite::Result<()> {
        let mut put = self
            .conn
            .prepare_cached("INSERT OR REPLACE INTO meta (k, v) VALUES (?1, ?2)")?;
        if self.clock_dirty {
            put.execute(params!["clock.max_seen", self.clock.max_seen])?;
            put.execute(params!["clock.now", self.clock.now])?;
            self.clock_dirty = false;
        }
        if self.open_dirty {
            for (n, c) in self.names.iter().zip(&self.open) {
                put.execute(params![format!("open:{n}"), c])?;
            }
            self.open_dirty = false;
        }
        Ok(())
    }

    /// Commits the batch: everything the engine changed plus what the caller wrote on
    /// [`conn`](Self::conn) in between.
    pub fn commit(&mut self) -> Result<()> {
        if let Some(e) = self.error.take().or_else(|| self.read_error.take()) {
            self.rollback();
            return Err(e).with_context(|| self.write_failed());
        }
        if !self.in_tx {
            return Ok(());
        }
        let written = self.write_batch();
        if let Err(e) = written {
            self.rollback();
            return Err(e).with_context(|| self.write_failed());
        }
        self.in_tx = false;
        self.leave_gate();
        self.rows.evict();
        if self.wal_restart.swap(false, Ordering::Relaxed) {
            self.restart_wal();
        }
        Ok(())
    }

    /// Starts the WAL over, if no reader (a timeline API request, say) still needs its
    /// frames. Readers may hold a snapshot for a while: then the WAL grows on, and the
    /// checkpointer asks again on its next pass. Waiting for them would stall intake, and
    /// failing would stop the daemon, for nothing the WAL itself needs.
    fn restart_wal(&mut self) {
        let _ = self.conn.busy_timeout(std::time::Duration::from_millis(50));
        let r = self
            .conn
            .query_row("PRAGMA wal_checkpoint(RESTART)", [], |r| r.get::<_, i64>(0));
        let _ = self.conn.busy_timeout(super::BUSY_TIMEOUT);
        match r {
            Ok(0) => {}
            Ok(_) => tracing::debug!("WAL restart deferred: a reader still uses the WAL"),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if matches!(
                    e.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                ) =>
            {
                tracing::debug!(error = %e, "WAL restart deferred")
            }
            Err(e) => tracing::warn!(error = %e, "WAL restart failed; deferred"),
        }
    }

    /// Writes the held rows, purges what expired and commits.
    fn write_batch(&mut self) -> rusqlite::Result<()> {
        self.flush_rows()?;
        self.write_events()?;
        self.try_purge(self.purge_clock)?;
        self.flush_meta()?;
        self.purge_events()?;
        self.conn.execute_batch("COMMIT")
    }

    /// Writes the changed rows; from then on the deadline query must see their deadlines.
    fn flush_rows(&mut self) -> rusqlite::Result<()> {
        if let Some(d) = self.rows.flush(&self.conn, &self.names)? {
            self.sql_floor = self.sql_floor.min(d);
        }
        Ok(())
    }

    /// Holds at most `rows` instance rows in memory (tests use tiny caches).
    pub fn with_row_cache(mut self, rows: usize) -> SqliteState {
        self.row_cache = rows.max(1);
        self.rows = Rows::new(self.names.len(), self.row_cache);
        self
    }

    /// Sets the event about to be applied (`None` for clock ticks) and the Kafka partition
    /// it came from.
    pub fn set_event(&mut self, event: Option<(&str, Instant)>, part: Option<i32>) {
        self.part = part;
        self.event = event.map(|(t, at)| {
            let t = if t.len() > MAX_EVENT_TEXT {
                let mut end = MAX_EVENT_TEXT;
                while !t.is_char_boundary(end) {
                    end -= 1;
                }
                &t[..end]
            } else {
                t
            };
            (Box::from(t), at)
        });
        self.early_seen.borrow_mut().clear();
        self.event_seq = None;
    }

    /// Appends an event text to the events table (at commit); its seq.
    fn append_event(&mut self, time: Instant, text: &str) -> rusqlite::Result<i64> {
        if self.next_seq == 0 {
            self.next_seq = self.conn.query_row(
                "SELECT MAX(COALESCE((SELECT MAX(seq) FROM events), 0),
                                COALESCE((SELECT v FROM meta WHERE k = 'events.purged'), 0)) + 1",
                [],
                |r| r.get(0),
            )?;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.new_event_bytes += text.len();
        self.new_events.push((seq, time, Box::from(text)));
        Ok(seq)
    }

    /// Bytes of event text this batch holds until its commit (see [`MAX_EVENT_TEXT`]):
    /// the core ends a batch early past a bound, whatever `batch.events` allows.
    pub fn pending_event_bytes(&self) -> usize {
        self.new_event_bytes
    }

    /// Inserts the events appended in this batch, many rows per statement.
    fn write_events(&mut self) -> rusqlite::Result<()> {
        const ROWS: usize = 64;
        let events = std::mem::take(&mut self.new_events);
        self.new_event_bytes = 0;
        let mut chunks = events.chunks_exact(ROWS);
        static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let sql = SQL.get_or_init(|| {
            format!(
                "INSERT INTO events (seq, time, text) VALUES {}",
                vec!["(?, ?, ?)"; ROWS].join(", ")
            )
        });
        for chunk in &mut chunks {
            let mut stmt = self.conn.prepare_cached(sql)?;
            for (i, (seq, time, text)) in chunk.iter().enumerate() {
                stmt.raw_bind_parameter(3 * i + 1, seq)?;
                stmt.raw_bind_parameter(3 * i + 2, time)?;
                stmt.raw_bind_parameter(3 * i + 3, &**text)?;
            }
            stmt.raw_execute()?;
        }
        let mut one = self
            .conn
            .prepare_cached("INSERT INTO events (seq, time, text) VALUES (?1, ?2, ?3)")?;
        for (seq, time, text) in chunks.remainder() {
            one.execute(params![seq, time, &**text])?;
        }
        Ok(())
    }

    /// The seq of the current event, appending it on first use.
    fn current_event_seq(&mut self) -> rusqlite::Result<i64> {
        if let Some(s) = self.event_seq {
            return Ok(s);
        }
        let Some((text, at)) = self.event.clone() else {
            return Ok(0);
        };
        let seq = self.append_event(at, &text)?;
        self.event_seq = Some(seq);
        Ok(seq)
    }

    /// The event references of a row being put: the taken refs plus the trigger of a new
    /// instance and the correlate of every step this put newly satisfied or made late.
    fn refs_for(&mut self, inst: &Instance, was_open: bool) -> rusqlite::Result<Vec<i64>> {
        // Only a new trigger opens a closed row, possibly with the old one's time; if its
        // steps are all settled at once (by early correlates), it closes again in the same
        // put, at a later clock than the old one did (after its `dedup`).
        let fresh = !self.taken_existed
            || self.taken_opened != Some(inst.opened_at)
            || (!was_open && (inst.is_open() || inst.closed_at != self.taken_closed));
        let mut refs = std::mem::take(&mut self.taken_refs);
        if fresh {
            // A new instance (possibly replacing a closed row): nothing carries over.
            refs.clear();
            self.taken_steps.clear();
        }
        refs.resize(inst.steps.len() + 1, 0);
        if fresh {
            refs[0] = self.current_event_seq()?;
        }
        for i in 0..inst.steps.len() {
            let s = inst.steps[i];
            let newly = |status| s.status == status && self.taken_steps.get(i) != Some(&status);
            let late = newly(StepStatus::Late);
            if !late && !newly(StepStatus::Satisfied) {
                continue;
            }
            // The correlate that satisfied the step, or made it late: the event at hand, or
            // one remembered as early, read when the step opened (its time is then the
            // satisfaction time; a late one's is after the deadline, which a late step keeps).
            let early = self
                .early_seen
                .borrow()
                .iter()
                .find(|(step, t, _)| *step == i && if late { *t > s.at } else { *t == s.at })
                .map(|(_, t, e)| (*t, e.clone()));
            refs[i + 1] = match early {
                Some((t, text)) => self.append_event(t, &text)?,
                None => self.current_event_seq()?,
            };
        }
        Ok(refs)
    }

    /// Forgets events no live instance can reference any more.
    fn purge_events(&mut self) -> rusqlite::Result<()> {
        let now = self.clock.now;
        if now == Instant::MIN {
            return Ok(());
        }
        let last = self.event_marks.back().map(|m| m.1);
        let seq = if self.next_seq == 0 {
            self.conn
                .query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| r.get(0))?
        } else {
            self.next_seq - 1
        };
        // A mark at most every 1/1024 of the retention (events are kept that much longer
        // at worst): one per commit grew to millions over days-long windows. Events
        // after the last mark are covered by the next one.
        let every = self.retention / 1024;
        if last != Some(seq)
            && self
                .event_marks
                .back()
                .is_none_or(|m| now.saturating_sub(m.0) >= every)
        {
            self.event_marks.push_back((now, seq));
            self.marks_dirty = true;
        }
        let mut upto = None;
        while let Some(&(at, s)) = self.event_marks.front() {
            let slack = self
                .jumps
                .iter()
                .filter(|j| j.0 >= at)
                .map(|j| j.1)
                .max()
                .unwrap_or(0);
            let keep = self
                .retention
                .saturating_add(self.lateness)
                .saturating_add(slack);
            if now.saturating_sub(at) <= keep {
                break;
            }
            upto = Some(s);
            self.event_marks.pop_front();
            self.marks_dirty = true;
        }
        if let Some(&(front, _)) = self.event_marks.front() {
            while self.jumps.front().is_some_and(|j| j.0 < front) {
                self.jumps.pop_front();
            }
        }
        if std::mem::take(&mut self.marks_dirty) {
            let mut put = self
                .conn
                .prepare_cached("INSERT OR REPLACE INTO meta (k, v) VALUES (?1, ?2)")?;
            let json = |d: &std::collections::VecDeque<(Instant, i64)>| {
                serde_json::to_string(d).unwrap_or_default()
            };
            put.execute(params!["events.marks", json(&self.event_marks)])?;
            put.execute(params!["events.jumps", json(&self.jumps)])?;
        }
        if let Some(s) = upto {
            self.conn
                .prepare_cached("DELETE FROM events WHERE seq <= ?1")?
                .execute(params![s])?;
            // Seqs are never used again, even once the table is empty: rows that outlive
            // the events (of removed rules) still name them.
            self.conn
                .prepare_cached("INSERT OR REPLACE INTO meta (k, v) VALUES ('events.purged', ?1)")?
                .execute(params![s])?;
        }
        Ok(())
    }

    /// The flag the WAL checkpointer sets when the writer should start the WAL over.
    /// The rules loaded again since the last call whose deadlines came back into the
    /// index (those that passed meanwhile are due at once).
    pub fn take_restored(&mut self) -> Vec<String> {
        std::mem::take(&mut self.restored)
    }

    pub fn take_reafter(&mut self) -> Vec<String> {
        std::mem::take(&mut self.reafter)
    }

    /// Notes, in the open batch, that the deadlines of `rules` (brought back) that passed
    /// while they were away have been fired.
    pub fn restored_done(&self, rules: &[String]) -> Result<()> {
        for rule in rules {
            self.conn.execute(
                "DELETE FROM meta WHERE k = ?1",
                params![format!("restored:{rule}")],
            )?;
        }
        Ok(())
    }

    /// Notes, in the open batch, that every stored instance of `rule` had its waiting
    /// steps opened after its `after` links changed.
    pub fn reafter_done(&self, rule: &str) -> Result<()> {
        self.conn.execute(
            "DELETE FROM meta WHERE k = ?1",
            params![format!("reafter:{rule}")],
        )?;
        Ok(())
    }

    /// Up to `limit` keys of open instances of `rule` after `from`, in key order.
    pub fn open_keys_after(&self, rule: &str, from: &str, limit: usize) -> Result<Vec<String>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT key FROM instances WHERE rule = ?1 AND key > ?2 AND closed_at IS NULL
             ORDER BY key LIMIT ?3",
        )?;
        let keys = stmt
            .query_map(params![rule, from, limit as i64], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(keys)
    }

    /// Sets the engine's `lateness`, which events are kept that much longer for.
    pub fn with_lateness(mut self, lateness: i64) -> SqliteState {
        self.lateness = lateness.max(0);
        self
    }

    pub fn wal_restart_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.wal_restart)
    }

    /// Abandons the batch; the in-memory caches are reloaded from the file.
    pub fn rollback(&mut self) {
        if self.in_tx {
            let _ = self.conn.execute_batch("ROLLBACK");
            let _ = self.conn.execute_batch("PRAGMA query_only = OFF");
            self.in_tx = false;
            self.leave_gate();
        }
        self.clock_dirty = false;
        self.open_dirty = false;
        if let Err(e) = self.reload_cached() {
            tracing::error!(error = %e, "re-reading state after a rollback failed");
        }
    }

    /// Open instances per rule, in rule order.
    pub fn open_by_rule(&self) -> &[i64] {
        &self.open
    }

    pub fn rule_names(&self) -> &[Arc<str>] {
        &self.names
    }

    /// The earliest open deadline, if any.
    pub fn oldest_deadline(&self) -> Result<Option<Instant>> {
        Ok(self.conn.query_row(
            "SELECT MIN(next_deadline) FROM instances WHERE next_deadline IS NOT NULL",
            [],
            |r| r.get(0),
        )?)
    }

    fn fail<T: Default>(&mut self, r: rusqlite::Result<T>) -> T {
        match r {
            Ok(v) => v,
            Err(e) => {
                if self.error.is_none() {
                    tracing::error!(state = %self.path.display(), error = %e, "state write failed");
                    self.error = Some(e);
                }
                self.keep_batch_whole();
                T::default()
            }
        }
    }

    /// A read through `&self`: a failure fails the batch like a failed write.
    fn read<T>(&self, r: rusqlite::Result<Option<T>>) -> Option<T> {
        r.unwrap_or_else(|e| {
            tracing::error!(error = %e, "state read failed");
            self.read_error.borrow_mut().get_or_insert(e);
            self.keep_batch_whole();
            None
        })
    }

    /// After a failed statement of a batch bound to fail: SQLite ends the transaction
    /// itself on some errors (a full disk, an I/O error), and the batch's later writes
    /// (outbox rows, source positions) would then each commit on their own. A new
    /// transaction takes them, rolled back with the rest; if none can begin, the
    /// connection refuses writes until [`rollback`](Self::rollback).
    fn keep_batch_whole(&self) {
        if !self.in_tx || !self.conn.is_autocommit() {
            return;
        }
        if self.conn.execute_batch("BEGIN IMMEDIATE").is_err() {
            let _ = self.conn.execute_batch("PRAGMA query_only = ON");
        }
    }

    /// Reads a row that is not held: the instance, its event references and partition.
    #[allow(clippy::type_complexity)]
    fn try_load(
        &self,
        rule: &str,
        key: &str,
    ) -> rusqlite::Result<Option<(Instance, Vec<i64>, Option<i32>)>> {
        self.conn
            .prepare_cached(
                "SELECT opened_at, closed_at, expires_at, steps, captures, refs, part
                 FROM instances WHERE rule = ?1 AND key = ?2",
            )?
            .query_row(params![rule, key], |r| {
                let steps: Vec<u8> = r.get(3)?;
                let captures: String = r.get(4)?;
                let refs: Option<Vec<u8>> = r.get(5)?;
                Ok((
                    Instance {
                        opened_at: r.get(0)?,
                        closed_at: r.get(1)?,
                        expires_at: r.get(2)?,
                        steps: decode_steps(&steps),
                        captures: serde_json::from_str::<Vec<String>>(&captures)
                            .unwrap_or_default()
                            .into_boxed_slice(),
                    },
                    decode_refs(refs.as_deref().unwrap_or_default()),
                    r.get(6)?,
                ))
            })
            .optional()
    }

    fn try_due(
        &mut self,
        before: Instant,
        limit: usize,
        out: &mut Vec<Due>,
    ) -> rusqlite::Result<bool> {
        if std::mem::take(&mut self.chunked) {
            // The rows the last chunk fired are changed, so stale in SQLite, where they
            // would come first again: write them (and keep the cache within its bound
            // through a mass expiry).
            self.flush_rows()?;
            self.rows.evict();
        }
        if self.next_due == Instant::MIN {
            self.next_due = self
                .min_deadline(Instant::MIN)?
                .min(self.rows.first_deadline(Instant::MIN));
        }
        if before <= self.next_due {
            return Ok(false);
        }
        // Steps fire in the order of (deadline, rule, key, step), chunks included. A row
        // is placed by its earliest open deadline, and its steps all come at or after
        // that place: so the first `limit` rows in that order hold every step before the
        // place of the last of them, and the others come with later chunks.
        let n = limit.saturating_add(1);
        let cached = self.rows.due_rows(before, n);
        let stored = self.stored_due_rows(before, n)?;
        let (rows, more) = super::rows::merge_due(cached, stored, limit);
        let last = rows.last().map(|r| (r.deadline, r.rule, r.key.clone()));
        for r in rows {
            for (step, s) in r.steps.iter().enumerate() {
                let within = match &last {
                    Some((d, rule, key)) if more => {
                        (s.at, r.rule, r.key.as_str()) <= (*d, *rule, key.as_str())
                    }
                    _ => true,
                };
                if s.status == StepStatus::Open && s.at < before && within {
                    out.push(Due {
                        deadline: s.at,
                        rule: r.rule,
                        key: r.key.clone(),
                        step,
                    });
                }
            }
        }
        if more {
            self.chunked = true;
            return Ok(true);
        }
        self.sql_floor = self.sql_floor.max(before);
        self.next_due = self
            .min_deadline(before)?
            .min(self.rows.first_deadline(before));
        Ok(false)
    }

    /// Up to `n` rows SQLite has (changed rows aside: theirs is stale) with an open
    /// deadline before `before`, in the order of (earliest open deadline, rule, key). The
    /// index orders rules by name, so each run of rows sharing a deadline is sorted by
    /// rule order here; a run longer than `n` (a bulk of triggers with one time) is read
    /// rule by rule instead.
    fn stored_due_rows(&self, before: Instant, n: usize) -> rusqlite::Result<Vec<DueRow>> {
        let mut out: Vec<DueRow> = Vec::new();
        let mut run: Vec<DueRow> = Vec::new();
        let mut stmt = self.conn.prepare_cached(
            "SELECT next_deadline, rule, key, steps FROM instances
             WHERE next_deadline IS NOT NULL AND next_deadline >= ?1 AND next_deadline < ?2
             ORDER BY next_deadline",
        )?;
        let mut rows = stmt.query(params![self.sql_floor, before])?;
        let end_run = |run: &mut Vec<DueRow>, out: &mut Vec<DueRow>| {
            run.sort_unstable_by(|a, b| (a.rule, &a.key).cmp(&(b.rule, &b.key)));
            out.append(run);
        };
        while let Some(r) = rows.next()? {
            let d: i64 = r.get(0)?;
            if run.first().is_some_and(|f| f.deadline != d) {
                end_run(&mut run, &mut out);
                if out.len() >= n {
                    break;
                }
            }
            let rule: String = r.get(1)?;
            let Some(&ix) = self.index.get(rule.as_str()) else {
                continue;
            };
            let key: String = r.get(2)?;
            if self.rows.is_changed(ix, &key) {
                continue;
            }
            let steps: Vec<u8> = r.get(3)?;
            run.push(DueRow {
                deadline: d,
                rule: ix,
                key,
                steps: decode_steps(&steps),
            });
            if out.len() + run.len() > n {
                // The run may be longer than a chunk: read it rule by rule, in key order.
                run.clear();
                let mut one = self.conn.prepare_cached(
                    "SELECT key, steps FROM instances
                     WHERE next_deadline = ?1 AND rule = ?2 ORDER BY key",
                )?;
                'rules: for (ix, name) in self.names.iter().enumerate() {
                    let mut rows = one.query(params![d, &**name])?;
                    while let Some(r) = rows.next()? {
                        let key: String = r.get(0)?;
                        if self.rows.is_changed(ix, &key) {
                            continue;
                        }
                        if out.len() == n {
                            break 'rules;
                        }
                        let steps: Vec<u8> = r.get(1)?;
                        out.push(DueRow {
                            deadline: d,
                            rule: ix,
                            key,
                            steps: decode_steps(&steps),
                        });
                    }
                }
                return Ok(out);
            }
        }
        end_run(&mut run, &mut out);
        out.truncate(n);
        Ok(out)
    }

    fn min_deadline(&self, from: Instant) -> rusqlite::Result<Instant> {
        let v: Option<i64> = self.conn.query_row(
            "SELECT MIN(next_deadline) FROM instances
             WHERE next_deadline IS NOT NULL AND next_deadline >= ?1",
            params![from],
            |r| r.get(0),
        )?;
        Ok(v.unwrap_or(Instant::MAX))
    }

    fn min_expiry(&self) -> rusqlite::Result<Instant> {
        let q = |sql: &str| -> rusqlite::Result<Option<i64>> {
            self.conn.query_row(sql, [], |r| r.get(0))
        };
        let a = q("SELECT MIN(expires_at) FROM instances WHERE closed_at IS NOT NULL")?;
        let b = q("SELECT MIN(expires) FROM early")?;
        let c = q("SELECT MIN(expires) FROM cancels")?;
        Ok([a, b, c]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(Instant::MAX))
    }

    fn try_purge(&mut self, clock: Instant) -> rusqlite::Result<()> {
        /// Rows forgotten per table and commit.
        const PURGE_CHUNK: i64 = 4096;
        if self.next_purge == Instant::MIN {
            self.next_purge = self.min_expiry()?;
        }
        if clock <= self.next_purge {
            return Ok(());
        }
        // A chunk per table and commit (what is left goes at the next commits): a mass
        // expiry closes a million instances at one clock reading, all forgotten at once a
        // `dedup` later, and their keys must not all be held in memory together.
        let closed: Vec<(String, String)> = self
            .conn
            .prepare_cached(
                "DELETE FROM instances WHERE (rule, key) IN (
                     SELECT rule, key FROM instances
                     WHERE closed_at IS NOT NULL AND expires_at < ?1 LIMIT ?2)
                 RETURNING rule, key",
            )?
            .query_map(params![clock, PURGE_CHUNK], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let mut removed = closed.len();
        for (rule, key) in closed {
            if let Some(&ix) = self.index.get(rule.as_str()) {
                self.rows.forget(ix, &key);
            }
        }
        for sql in [
            "DELETE FROM early WHERE (rule, key, step) IN (
                 SELECT rule, key, step FROM early WHERE expires < ?1 LIMIT ?2)
             RETURNING rule, key",
            "DELETE FROM cancels WHERE (rule, key) IN (
                 SELECT rule, key FROM cancels WHERE expires < ?1 LIMIT ?2)
             RETURNING rule, key",
        ] {
            let gone: Vec<(String, String)> = self
                .conn
                .prepare_cached(sql)?
                .query_map(params![clock, PURGE_CHUNK], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?;
            removed += gone.len();
            for (rule, key) in gone {
                self.forget(&rule, &key);
            }
        }
        tracing::trace!(removed, "purged expired memory");
        self.next_purge = self.min_expiry()?;
        Ok(())
    }
}

/// Records each rule's step list; deletes rows of rules whose list changed. Returns the
/// rules whose rows were dropped and how many instances each lost. Rows of a rule no
/// longer loaded are kept (it may come back) but leave the deadline index, where their
/// deadlines would never fire and would read as stuck timers; a rule loaded again gets
/// them back.
/// Also returns the rules loaded again whose deadlines went back into the index.
#[allow(clippy::type_complexity)]
/// What [`apply_shapes`] did: rules whose rows it dropped (with how many), rules loaded
/// again (their passed deadlines to fire), rules whose `after` links changed (their
/// stored instances' waiting steps to open).
struct Applied {
    dropped: Vec<(String, usize)>,
    restored: Vec<String>,
    reafter: Vec<String>,
}

fn apply_shapes(conn: &mut Connection, rules: &RuleSet) -> rusqlite::Result<Applied> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let (mut dropped, mut restored, mut reafter) = (Vec::new(), Vec::new(), Vec::new());
    let was_loaded: std::collections::HashSet<String> = tx
        .prepare("SELECT rule FROM rule_shapes WHERE loaded")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for r in &rules.rules {
        let want = shape(r);
        let paths = capture_paths(rules, r);
        let want_captures = serde_json::to_string(&paths).unwrap_or_default();
        let want_windows = Windows::of(r);
        let want_afters = afters(r);
        #[allow(clippy::type_complexity)]
        let (have, have_captures, have_windows, have_afters): (
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
        ) = tx
            .query_row(
                "SELECT steps, captures, windows, afters FROM rule_shapes WHERE rule = ?1",
                params![r.name],
                |row| Ok((Some(row.get(0)?), row.get(1)?, row.get(2)?, row.get(3)?)),
            )
            .optional()?
            .unwrap_or((None, None, None, None));
        if have.as_deref() == Some(want.as_str()) {
            match have_captures {
                Some(c) if c == want_captures => {}
                // Recorded before captures were: taken to be these.
                None => {}
                Some(c) => recapture(&tx, rules, r, &c, &paths)?,
            }
            // Recorded before windows were: taken to be these.
            if let Some(old) = have_windows.as_deref().and_then(Windows::parse) {
                widen(&tx, &r.name, &old, &want_windows)?;
            }
            // Likewise; a step whose `after` went or changed may open in stored instances.
            // Noted in the file with the new links: a restart before every instance was
            // seen to (see `reafter_done`) starts over.
            if have_afters.is_some_and(|a| a != want_afters) {
                tx.execute(
                    "INSERT OR REPLACE INTO meta (k, v) VALUES (?1, 1)",
                    params![format!("reafter:{}", r.name)],
                )?;
            }
            tx.execute(
                "UPDATE rule_shapes SET captures = ?2, windows = ?3, afters = ?4 WHERE rule = ?1",
                params![r.name, want_captures, want_windows.to_string(), want_afters],
            )?;
            if !was_loaded.contains(&r.name) {
                restore_deadlines(&tx, &r.name)?;
                // Noted in the file as well: a restart before the deadlines that passed
                // meanwhile were fired (see `restored_done`) fires them then.
                tx.execute(
                    "INSERT OR REPLACE INTO meta (k, v) VALUES (?1, 1)",
                    params![format!("restored:{}", r.name)],
                )?;
                tx.execute(
                    "UPDATE rule_shapes SET loaded = 1 WHERE rule = ?1",
                    params![r.name],
                )?;
            }
            continue;
        }
        if have.is_some() {
            let n = tx.execute("DELETE FROM instances WHERE rule = ?1", params![r.name])?;
            tx.execute("DELETE FROM early WHERE rule = ?1", params![r.name])?;
            tx.execute("DELETE FROM cancels WHERE rule = ?1", params![r.name])?;
            for k in ["open", "reafter", "restored"] {
                tx.execute(
                    "DELETE FROM meta WHERE k = ?1",
                    params![format!("{k}:{}", r.name)],
                )?;
            }
            dropped.push((r.name.clone(), n));
        }
        tx.execute(
            "INSERT OR REPLACE INTO rule_shapes (rule, steps, loaded, captures, windows, afters)
             VALUES (?1, ?2, 1, ?3, ?4, ?5)",
            params![
                r.name,
                want,
                want_captures,
                want_windows.to_string(),
                want_afters
            ],
        )?;
    }
    for gone in was_loaded
        .iter()
        .filter(|n| !rules.rules.iter().any(|r| &r.name == *n))
    {
        tx.execute(
            "UPDATE instances SET next_deadline = NULL
             WHERE rule = ?1 AND next_deadline IS NOT NULL",
            params![gone],
        )?;
        tx.execute(
            "UPDATE rule_shapes SET loaded = 0 WHERE rule = ?1",
            params![gone],
        )?;
    }
    for r in &rules.rules {
        for (k, list) in [("reafter", &mut reafter), ("restored", &mut restored)] {
            let pending = tx
                .query_row(
                    "SELECT 1 FROM meta WHERE k = ?1",
                    params![format!("{k}:{}", r.name)],
                    |_| Ok(()),
                )
                .optional()?;
            if pending.is_some() {
                list.push(r.name.clone());
            }
        }
    }
    tx.commit()?;
    Ok(Applied {
        dropped,
        restored,
        reafter,
    })
}

/// Each step's `after` (its index, `-` for none), as stored in `rule_shapes.afters`.
fn afters(r: &crate::rules::model::Rule) -> String {
    r.steps
        .iter()
        .map(|s| s.after.map_or("-".to_string(), |a| a.to_string()))
        .collect::<Vec<_>>()
        .join(",")
}

/// The windows a rule's stored expiries follow from (ns): closed instances are kept
/// `dedup` after they close and `late` after a missing step's deadline, early correlates
/// their step's `within` after their time, cancels the longest `within` after theirs.
#[derive(Debug, PartialEq)]
struct Windows {
    dedup: i64,
    late: i64,
    within: Vec<i64>,
}

impl Windows {
    fn of(r: &crate::rules::model::Rule) -> Windows {
        Windows {
            dedup: r.dedup.nanos(),
            late: r.late.nanos(),
            within: r.steps.iter().map(|s| s.within.nanos()).collect(),
        }
    }

    fn parse(text: &str) -> Option<Windows> {
        let mut parts = text.split(',').map(|p| p.parse::<i64>().ok());
        let dedup = parts.next()??;
        let late = parts.next()??;
        let within = parts.collect::<Option<Vec<i64>>>()?;
        Some(Windows {
            dedup,
            late,
            within,
        })
    }

    fn max_within(&self) -> i64 {
        self.within.iter().copied().max().unwrap_or(0)
    }
}

impl std::fmt::Display for Windows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{},{}", self.dedup, self.late)?;
        for w in &self.within {
            write!(f, ",{w}")?;
        }
        Ok(())
    }
}

/// Extends the stored expiries of a rule whose windows a reload widened, sums capped at
/// the largest instant (SQLite would turn an overflow into a float). Narrowed ones are
/// left: kept longer than needed changes nothing, the engine checks the windows.
/// A closed instance's expiry is the later of its close plus `dedup` and its missing
/// steps' deadlines plus `late`: moved to the new `dedup`, and by as much as `late` grew
/// (at most that much longer than needed, when `dedup` set it).
fn widen(tx: &Connection, rule: &str, old: &Windows, new: &Windows) -> rusqlite::Result<()> {
    let more_late = new.late.saturating_sub(old.late).max(0);
    if more_late > 0 {
        // Firing alerts stay resolvable (and re-sent) until deadline + `late` too.
        tx.execute(
            "UPDATE alerts SET active_until_ms = MIN(active_until_ms + ?2, ?3) WHERE rule = ?1",
            params![rule, more_late / 1_000_000, i64::MAX],
        )?;
    }
    if new.dedup > old.dedup || more_late > 0 {
        tx.execute(
            "UPDATE instances SET expires_at = MAX(MIN(expires_at + ?3, ?4), MIN(closed_at + ?2, ?4))
             WHERE rule = ?1 AND closed_at IS NOT NULL",
            params![rule, new.dedup, more_late, i64::MAX],
        )?;
    }
    for (step, (&was, &now)) in old.within.iter().zip(&new.within).enumerate() {
        if now > was {
            tx.execute(
                "UPDATE early SET expires = MAX(expires, MIN(time + ?3, ?4)) WHERE rule = ?1 AND step = ?2",
                params![rule, step as i64, now, i64::MAX],
            )?;
        }
    }
    let more = new.max_within().saturating_sub(old.max_within());
    if more > 0 {
        tx.execute(
            "UPDATE cancels SET expires = MIN(expires + ?2, ?3) WHERE rule = ?1",
            params![rule, more, i64::MAX],
        )?;
    }
    Ok(())
}

/// The dot paths of the trigger fields a rule's templates read, in capture order.
fn capture_paths(rules: &RuleSet, r: &crate::rules::model::Rule) -> Vec<String> {
    r.captures
        .iter()
        .map(|&p| rules.paths[p].join("."))
        .collect()
}

/// Re-captures the stored instances of a rule whose templates now read other trigger
/// fields (`want`) than `had` (the stored paths): a field read before keeps its value, a new one
/// is read from the stored trigger event (empty when that is gone, as an absent field).
/// Without this, `{{trigger.x}}` of an instance opened before the reload would render
/// the value of whatever field stood at its position then.
fn recapture(
    tx: &rusqlite::Transaction<'_>,
    rules: &RuleSet,
    r: &crate::rules::model::Rule,
    had: &str,
    want: &[String],
) -> rusqlite::Result<()> {
    let had: Vec<String> = serde_json::from_str(had).unwrap_or_default();
    let decoder = crate::event::Decoder::new(rules, "time");
    let mut page = tx.prepare(
        "SELECT key, captures, refs FROM instances WHERE rule = ?1 AND key > ?2
         ORDER BY key LIMIT 1000",
    )?;
    let mut trigger = tx.prepare("SELECT text FROM events WHERE seq = ?1")?;
    let mut set = tx.prepare("UPDATE instances SET captures = ?3 WHERE rule = ?1 AND key = ?2")?;
    // A page at a time: the rule's rows (closed ones too) may be millions.
    let mut from = String::new();
    // Instances whose trigger text was kept cut short: their new fields are empty.
    let mut cut = 0u64;
    loop {
        let rows: Vec<(String, String, Option<Vec<u8>>)> = page
            .query_map(params![r.name, from], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        let Some(last) = rows.last() else { break };
        from = last.0.clone();
        for (key, stored, refs) in rows {
            let old: Vec<String> = serde_json::from_str(&stored).unwrap_or_default();
            let text: Option<String> =
                match decode_refs(refs.as_deref().unwrap_or_default()).first() {
                    Some(&seq) if seq > 0 => {
                        trigger.query_row(params![seq], |t| t.get(0)).optional()?
                    }
                    _ => None,
                };
            // Decoded with the receipt time standing in: only the fields are wanted.
            let ev = text
                .as_deref()
                .and_then(|t| decoder.decode_at(t.as_bytes(), None, Some(0)).ok());
            cut += u64::from(text.is_some() && ev.is_none());
            let new: Vec<String> = want
                .iter()
                .zip(&r.captures)
                .map(|(path, &id)| match had.iter().position(|h| h == path) {
                    Some(i) => old.get(i).cloned().unwrap_or_default(),
                    None => ev
                        .as_ref()
                        .and_then(|e| e.field(id))
                        .map(|f| f.to_text())
                        .unwrap_or_default(),
                })
                .collect();
            let new = serde_json::to_string(&new).unwrap_or_default();
            if new != stored {
                set.execute(params![r.name, key, new])?;
            }
        }
    }
    if cut > 0 {
        tracing::warn!(
            rule = r.name,
            instances = cut,
            "the trigger events of these stored instances were kept cut short (longer than \
             the {} KiB the state keeps, or than the 4 KiB versions before 2026-11-24 kept): \
             the trigger fields the new templates read render empty for them",
            MAX_EVENT_TEXT >> 10
        );
    }
    Ok(())
}

/// Puts the open deadlines of a rule loaded again back into the deadline index.
fn restore_deadlines(tx: &rusqlite::Transaction<'_>, rule: &str) -> rusqlite::Result<()> {
    let mut page = tx.prepare(
        "SELECT key, steps FROM instances WHERE rule = ?1 AND key > ?2 AND closed_at IS NULL
         ORDER BY key LIMIT 1000",
    )?;
    let mut set =
        tx.prepare("UPDATE instances SET next_deadline = ?3 WHERE rule = ?1 AND key = ?2")?;
    // A page at a time: the rule's open rows may be millions.
    let mut from = String::new();
    loop {
        let rows: Vec<(String, Vec<u8>)> = page
            .query_map(params![rule, from], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let Some(last) = rows.last() else { break };
        from = last.0.clone();
        for (key, steps) in rows {
            if let Some(d) = next_deadline(&decode_steps(&steps)) {
                set.execute(params![rule, key, d])?;
            }
        }
    }
    Ok(())
}

impl State for SqliteState {
    fn take(&mut self, rule: usize, key: &str) -> Option<Instance> {
        // The early correlates read for another row (another rule's trigger for this
        // event, say) are not this one's: what settles this row's steps is read between
        // this take and its put.
        self.early_seen.borrow_mut().clear();
        let (row, refs) = match self.rows.get(rule, key) {
            Some(h) => h,
            None => {
                let name = self.names[rule].clone();
                let r = self.try_load(&name, key);
                match self.fail(r) {
                    Some((inst, refs, part)) => {
                        self.rows
                            .insert_loaded(rule, key, inst.clone(), refs.clone(), part);
                        (Some(inst), refs)
                    }
                    None => (None, Vec::new()),
                }
            }
        };
        self.taken_open = row.as_ref().is_some_and(|i| i.is_open());
        self.taken_existed = row.is_some();
        self.taken_opened = row.as_ref().map(|i| i.opened_at);
        self.taken_closed = row.as_ref().and_then(|i| i.closed_at);
        self.taken_steps.clear();
        if let Some(i) = &row {
            self.taken_steps.extend(i.steps.iter().map(|s| s.status));
        }
        self.taken_refs = refs;
        row
    }

    fn put(&mut self, rule: usize, key: &str, row: Option<Instance>) {
        let now_open = row.as_ref().is_some_and(|i| i.is_open());
        let was_open = self.taken_open;
        if now_open != self.taken_open {
            self.open[rule] += if now_open { 1 } else { -1 };
            self.open_dirty = true;
        }
        self.taken_open = false;
        let refs = match &row {
            Some(inst) => {
                if let Some(d) = next_deadline(&inst.steps) {
                    self.next_due = self.next_due.min(d);
                }
                if inst.closed_at.is_some() {
                    self.next_purge = self.next_purge.min(inst.expires_at);
                }
                let r = self.refs_for(inst, was_open);
                self.fail(r)
            }
            None => std::mem::take(&mut self.taken_refs),
        };
        self.rows.put(rule, key, row, refs, self.part);
        self.taken_existed = false;
        self.taken_opened = None;
        self.taken_closed = None;
        self.taken_steps.clear();
        self.taken_refs.clear();
        if self.rows.dirty() >= self.row_cache {
            // A huge batch: write what it changed so far (still uncommitted), and let the
            // written rows age out, so the cache stays within its bound.
            let r = self.flush_rows();
            self.fail(r);
            self.rows.evict();
        }
    }

    fn due(&mut self, before: Instant, limit: usize, out: &mut Vec<Due>) -> bool {
        let r = self.try_due(before, limit, out);
        self.fail(r)
    }

    fn early(&self, rule: usize, key: &str, step: usize) -> Option<(Instant, Instant)> {
        if !self.may_remember(rule, key) {
            return None;
        }
        let r = self
            .conn
            .prepare_cached(
                "SELECT time, expires, event FROM early WHERE rule = ?1 AND key = ?2 AND step = ?3",
            )
            .and_then(|mut s| {
                s.query_row(params![&*self.names[rule], key, step as i64], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get::<_, Option<String>>(2)?))
                })
                .optional()
            })
            .map(|found| {
                found.map(|(time, expires, event)| {
                    if let Some(e) = event {
                        self.early_seen.borrow_mut().push((step, time, e));
                    }
                    (time, expires)
                })
            });
        self.read(r)
    }

    fn put_early(&mut self, rule: usize, key: &str, step: usize, time: Instant, expires: Instant) {
        let name = self.names[rule].clone();
        // Counted once per row: one replaced is not one more (the purge takes one off).
        let had = self
            .conn
            .prepare_cached("SELECT 1 FROM early WHERE rule = ?1 AND key = ?2 AND step = ?3")
            .and_then(|mut s| {
                s.query_row(params![&*name, key, step as i64], |_| Ok(()))
                    .optional()
            });
        if !self.fail(had.map(|h| h.is_some())) {
            self.remember(&name, key);
        }
        self.next_purge = self.next_purge.min(expires);
        let r = self
            .conn
            .prepare_cached(
                "INSERT OR REPLACE INTO early (rule, key, step, time, expires, event, part)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    &*self.names[rule],
                    key,
                    step as i64,
                    time,
                    expires,
                    self.event.as_ref().map(|(t, _)| t.as_ref()),
                    self.part
                ])
            });
        self.fail(r.map(|_| ()));
    }

    fn remove_early(&mut self, rule: usize, key: &str, step: usize) {
        if !self.may_remember(rule, key) {
            return;
        }
        let r = self
            .conn
            .prepare_cached("DELETE FROM early WHERE rule = ?1 AND key = ?2 AND step = ?3")
            .and_then(|mut s| s.execute(params![&*self.names[rule], key, step as i64]));
        if r.as_ref().is_ok_and(|&n| n > 0) {
            let name = self.names[rule].clone();
            self.forget(&name, key);
        }
        self.fail(r.map(|_| ()));
    }

    fn cancel(&self, rule: usize, key: &str) -> Option<Instant> {
        if !self.may_remember(rule, key) {
            return None;
        }
        let r = self
            .conn
            .prepare_cached("SELECT expires FROM cancels WHERE rule = ?1 AND key = ?2")
            .and_then(|mut s| {
                s.query_row(params![&*self.names[rule], key], |r| r.get(0))
                    .optional()
            });
        self.read(r)
    }

    fn put_cancel(&mut self, rule: usize, key: &str, expires: Instant) {
        let name = self.names[rule].clone();
        let had = self
            .conn
            .prepare_cached("SELECT 1 FROM cancels WHERE rule = ?1 AND key = ?2")
            .and_then(|mut s| s.query_row(params![&*name, key], |_| Ok(())).optional());
        if !self.fail(had.map(|h| h.is_some())) {
            self.remember(&name, key);
        }
        self.next_purge = self.next_purge.min(expires);
        let r = self
            .conn
            .prepare_cached(
                "INSERT OR REPLACE INTO cancels (rule, key, expires, part) VALUES (?1, ?2, ?3, ?4)",
            )
            .and_then(|mut s| s.execute(params![&*self.names[rule], key, expires, self.part]));
        self.fail(r.map(|_| ()));
    }

    fn purge(&mut self, clock: Instant) {
        // Forgetting never changes outcomes, so it waits for the commit.
        self.purge_clock = self.purge_clock.max(clock);
    }

    fn clock(&self) -> Clock {
        self.clock
    }

    fn set_clock(&mut self, clock: Clock) {
        let by = clock.now.saturating_sub(self.clock.now);
        if self.clock.now != Instant::MIN && by > JUMP {
            self.jumps.push_back((self.clock.now, by));
            self.marks_dirty = true;
        }
        if clock != self.clock {
            self.clock = clock;
            self.clock_dirty = true;
        }
    }

    fn open_instances(&self) -> usize {
        self.open.iter().sum::<i64>().max(0) as usize
    }
}

/// A batch cut short by an error (the core stops) or a panic gives the turn back: the
/// dispatcher's remaining records would wait for it otherwise.
impl Drop for SqliteState {
    fn drop(&mut self) {
        self.leave_gate();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One rule `r`: a trigger and one step `s`, both keyed by `k`.
    fn one_rule() -> RuleSet {
        crate::rules::load_sources(&[(
            "r.yaml".into(),
            "rules:\n  - name: r\n    trigger: { key: k }\n    expect: [{ step: s, key: k, within: 1m }]\n"
                .into(),
        )])
        .unwrap()
    }

    /// The state file at `path` for `rules`, created and migrated if need be.
    fn open_at(path: &Path, rules: &RuleSet) -> SqliteState {
        let mut conn = super::super::open(path).unwrap();
        super::super::migrate(&mut conn, path).unwrap();
        SqliteState::open(conn, rules, path).unwrap()
    }

    /// A statement that fails with SQLite ending the transaction itself (the file may not
    /// grow: SQLITE_FULL) leaves the rest of the batch in a transaction all the same: a
    /// source position written after it is rolled back with the batch, not committed
    /// on its own.
    #[test]
    fn a_batch_whose_transaction_sqlite_ended_commits_nothing_after_it() {
        use crate::engine::State as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let rules = Arc::new(
            crate::rules::load_sources(&[(
                "r.yaml".into(),
                "rules:\n  - name: r\n    trigger: { where: { type: T }, key: k }\n    \
                 expect: [{ step: s, where: { type: S }, key: k, within: 1m }]\n"
                    .into(),
            )])
            .unwrap(),
        );
        let mut st = open_at(&path, &rules);
        let pages: i64 = st
            .conn()
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .unwrap();
        st.conn()
            .query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))
            .unwrap();
        st.begin().unwrap();
        let text = "x".repeat(MAX_EVENT_TEXT);
        st.set_event(Some((&text, 0)), None);
        for i in 0..10_000 {
            st.put_early(0, &format!("k{i}"), 0, 0, 1);
            if st.error.is_some() {
                break;
            }
        }
        assert!(st.error.is_some(), "the file grew without limit");
        assert!(
            !st.conn().is_autocommit(),
            "the batch's transaction is gone"
        );
        // What the daemon writes next in the batch (a source position, an outbox row).
        st.conn()
            .execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('probe', 1)", [])
            .unwrap();
        assert!(st.commit().is_err());
        st.conn()
            .query_row("PRAGMA max_page_count = 1000000", [], |_| Ok(()))
            .unwrap();
        let probe: Option<i64> = st
            .conn()
            .query_row("SELECT v FROM meta WHERE k = 'probe'", [], |r| r.get(0))
            .optional()
            .unwrap();
        assert_eq!(probe, None, "a write after the failure was committed");
        // The next batch writes as usual.
        st.begin().unwrap();
        st.conn()
            .execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('probe', 2)", [])
            .unwrap();
        st.commit().unwrap();
    }

    /// A reload that widens a rule's windows extends what is stored under the old ones:
    /// closed instances to the new `dedup` (and `late`), early correlates to their step's
    /// new `within`, cancels to the new longest `within`.
    #[test]
    fn a_reload_widening_the_windows_extends_the_stored_expiries() {
        use crate::engine::Engine;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let load = |within: &str, dedup: &str, late: &str| {
            Arc::new(
                crate::rules::load_sources(&[(
                    "r.yaml".into(),
                    format!(
                        "rules:\n  - name: r\n    trigger: {{ where: {{ type: T }}, key: k }}\n    \
                         expect: [{{ step: s, where: {{ type: S }}, key: k, within: {within} }}]\n    \
                         cancel: [{{ where: {{ type: C }}, key: k }}]\n    dedup: {dedup}\n    late: {late}\n"
                    ),
                )])
                .unwrap(),
            )
        };
        let v1 = load("1m", "1m", "1m");
        let mut conn = super::super::open(&path).unwrap();
        super::super::migrate(&mut conn, &path).unwrap();
        let st = SqliteState::open(conn, &v1, &path).unwrap();
        let d = crate::event::Decoder::new(&v1, "time");
        let mut e = Engine::new(Arc::clone(&v1), st, 0);
        let mut out = Vec::new();
        e.state_mut().begin().unwrap();
        for (k, kind) in [("a", "T"), ("a", "S"), ("b", "S"), ("c", "C")] {
            let line = format!(r#"{{"time":"2026-01-01T00:00:00Z","type":"{kind}","k":"{k}"}}"#);
            e.state_mut().set_event(None, None);
            e.process(&d.decode(line.as_bytes(), None).unwrap(), &mut out);
        }
        e.state_mut()
            .conn()
            .execute(
                "INSERT INTO alerts (id, sink, rule, key, step, body, active_until_ms, fp)
                 VALUES ('i', 'am', 'r', 'z', 's', '{}', 1000, NULL)",
                [],
            )
            .unwrap();
        e.state_mut().commit().unwrap();
        let t0 = crate::time::parse_rfc3339("2026-01-01T00:00:00Z").unwrap();
        let (min, hour) = (60_000_000_000i64, 3_600_000_000_000i64);
        let expiries = |st: &SqliteState| -> (i64, i64, i64) {
            let q = |sql: &str| st.conn().query_row(sql, [], |r| r.get(0)).unwrap();
            (
                q("SELECT expires_at FROM instances WHERE key = 'a'"),
                q("SELECT expires FROM early WHERE key = 'b'"),
                q("SELECT expires FROM cancels WHERE key = 'c'"),
            )
        };
        assert_eq!(expiries(e.state()), (t0 + min, t0 + min, t0 + min));
        let v2 = load("2h", "1h", "1h");
        e.state_mut().set_rules(&v2).unwrap();
        // A firing alert is resolvable for as much longer as `late` grew.
        let until: i64 = e
            .state()
            .conn()
            .query_row("SELECT active_until_ms FROM alerts", [], |r| r.get(0))
            .unwrap();
        assert_eq!(until, 1000 + 59 * 60_000);
        assert_eq!(
            expiries(e.state()),
            (t0 + hour, t0 + 2 * hour, t0 + 2 * hour)
        );
        // Narrowed again: left as they are.
        e.state_mut().set_rules(&v1).unwrap();
        assert_eq!(
            expiries(e.state()),
            (t0 + hour, t0 + 2 * hour, t0 + 2 * hour)
        );
    }

    /// Expired memory is forgotten a bounded chunk per commit (a mass expiry's million
    /// instances all expire at one clock reading); a cancel remembered twice for a key
    /// is forgotten whole, its hash too.
    #[test]
    fn expired_memory_goes_a_chunk_per_commit_and_leaves_no_hash_behind() {
        use crate::engine::State as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let rules = one_rule();
        let mut st = open_at(&path, &rules);
        st.begin().unwrap();
        for i in 0..5000 {
            st.conn()
                .execute(
                    "INSERT INTO instances (rule, key, opened_at, closed_at, expires_at, steps, captures)
                     VALUES ('r', ?1, 0, 1, 10, x'03', '[]')",
                    params![format!("k{i}")],
                )
                .unwrap();
        }
        st.put_cancel(0, "c", 10);
        st.put_cancel(0, "c", 20);
        st.commit().unwrap();
        assert!(st.may_remember(0, "c"));
        let left = |st: &SqliteState| -> i64 {
            st.conn()
                .query_row("SELECT COUNT(*) FROM instances", [], |r| r.get(0))
                .unwrap()
        };
        st.begin().unwrap();
        st.purge(100);
        st.commit().unwrap();
        assert_eq!(left(&st), 5000 - 4096);
        assert!(
            !st.may_remember(0, "c"),
            "a hash left for a forgotten cancel"
        );
        st.begin().unwrap();
        st.commit().unwrap();
        assert_eq!(left(&st), 0);
    }

    /// Changed `after` links are noted in the file until every stored instance had its
    /// waiting steps opened: a restart in between (a crash) still sees to them.
    #[test]
    fn changed_after_links_are_seen_to_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let load = |after: &str| {
            crate::rules::load_sources(&[(
                "r.yaml".into(),
                format!(
                    "rules:\n  - name: r\n    trigger: {{ key: k }}\n    expect:\n      - {{ step: a, key: k, within: 1m }}\n      - {{ step: b, key: k, within: 1m{after} }}\n"
                ),
            )])
            .unwrap()
        };
        let open = |rules: &RuleSet| open_at(&path, rules);
        let (v1, v2) = (load(", after: a"), load(""));
        assert!(open(&v1).take_reafter().is_empty());
        // Loaded with the link gone, then stopped before it was seen to.
        assert_eq!(open(&v2).take_reafter(), ["r"]);
        let mut st = open(&v2);
        assert_eq!(st.take_reafter(), ["r"]);
        st.begin().unwrap();
        st.reafter_done("r").unwrap();
        st.commit().unwrap();
        drop(st);
        assert!(open(&v2).take_reafter().is_empty());
    }

    /// A rule brought back is noted in the file until the deadlines that passed while it
    /// was away were fired: a restart in between (a crash) still fires them at once.
    #[test]
    fn a_rule_brought_back_is_seen_to_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let load = |names: &[&str]| {
            let text: String = names
                .iter()
                .map(|n| {
                    format!(
                        "  - name: {n}\n    trigger: {{ key: k }}\n    expect: [{{ step: a, key: k, within: 1m }}]\n"
                    )
                })
                .collect();
            crate::rules::load_sources(&[("r.yaml".into(), format!("rules:\n{text}"))]).unwrap()
        };
        let open = |rules: &RuleSet| open_at(&path, rules);
        let (both, one) = (load(&["r", "s"]), load(&["s"]));
        assert!(open(&both).take_restored().is_empty());
        assert!(open(&one).take_restored().is_empty());
        // Brought back, then stopped before its deadlines were fired.
        assert_eq!(open(&both).take_restored(), ["r"]);
        let mut st = open(&both);
        assert_eq!(st.take_restored(), ["r"]);
        st.begin().unwrap();
        st.restored_done(&["r".to_string()]).unwrap();
        st.commit().unwrap();
        drop(st);
        assert!(open(&both).take_restored().is_empty());
    }

    /// The marks that say when events may be forgotten survive a restart: a daemon
    /// restarted more often than the retention period still forgets old events.
    #[test]
    fn events_are_forgotten_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let rules = one_rule();
        let open = || {
            let mut st = open_at(&path, &rules);
            st.retention = 100;
            st
        };
        let count = |st: &SqliteState| -> i64 {
            st.conn()
                .query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))
                .unwrap()
        };
        // An event and a commit every 60 ns of clock, a restart after each: the events
        // of the first commits are more than the retention behind the last.
        for (i, now) in (1..=10).map(|i| (i, i * 60)) {
            let mut st = open();
            st.begin().unwrap();
            st.append_event(now, "{}").unwrap();
            st.clock.now = now;
            st.purge_events().unwrap();
            st.commit().unwrap();
            assert!(
                count(&st) <= 3,
                "{} events kept after {i} commits",
                count(&st)
            );
        }
    }

    /// An event seq is never given twice, even after the events table was purged empty
    /// and the state reopened: rows that outlive the events may still name the old ones.
    #[test]
    fn event_seqs_are_not_reused_after_a_purge_and_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let rules = one_rule();
        let open = || open_at(&path, &rules);
        let mut st = open();
        st.begin().unwrap();
        assert_eq!(st.append_event(0, "{}").unwrap(), 1);
        assert_eq!(st.append_event(0, "{}").unwrap(), 2);
        st.commit().unwrap();
        // Long after: every event is past its retention.
        st.retention = 0;
        for now in [1_000_000_000_000, 2_000_000_000_000] {
            st.begin().unwrap();
            st.clock.now = now;
            st.purge_events().unwrap();
            st.commit().unwrap();
        }
        let left: i64 = st
            .conn()
            .query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 0);
        drop(st);
        let mut st = open();
        st.begin().unwrap();
        assert_eq!(st.append_event(0, "{}").unwrap(), 3);
        st.commit().unwrap();
    }
}
