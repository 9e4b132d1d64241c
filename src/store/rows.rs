//! The hot part of the instance table, held in memory: rows read or changed recently.
//! Changes stay here until the batch commits, so a row touched several times in a batch is
//! written once, and then they are written back sorted by key, each statement setting only
//! the columns that changed (SQLite then leaves the indexes of the others alone). Rows live
//! in two generations: when the young one reaches half the bound after a commit, the old
//! one is dropped and the young one becomes old (a row used again moves back to young), so
//! memory does not follow open instances and eviction never scans for victims. A changed
//! row is the truth until it is written: its open deadline is indexed here and the caller
//! ignores what SQLite says about it; a written row is exactly what SQLite has.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use rusqlite::Connection;
use rusqlite::types::Value;

use crate::engine::state::{Instance, StepState, StepStatus};
use crate::time::Instant;

/// The instance columns besides the key, in bit order.
const COLS: [&str; 10] = [
    "opened_at",
    "closed_at",
    "expires_at",
    "next_deadline",
    "steps",
    "captures",
    "missing_at",
    "late_at",
    "refs",
    "part",
];
const ALL: u16 = (1 << COLS.len()) - 1;
const REFS: u16 = 1 << 8;
const PART: u16 = 1 << 9;

/// A row with a due step, placed by its earliest open deadline.
#[derive(Debug)]
pub(super) struct DueRow {
    pub deadline: Instant,
    pub rule: usize,
    pub key: String,
    pub steps: crate::engine::state::Steps,
}

impl DueRow {
    fn place(&self) -> (Instant, usize, &str) {
        (self.deadline, self.rule, &self.key)
    }
}

/// Merges two runs of due rows, each in (deadline, rule, key) order, into the first `n` of
/// both in that order; true when rows were left over.
pub(super) fn merge_due(a: Vec<DueRow>, b: Vec<DueRow>, n: usize) -> (Vec<DueRow>, bool) {
    let more = a.len() + b.len() > n;
    let mut out = Vec::with_capacity(n.min(a.len() + b.len()));
    let (mut a, mut b) = (a.into_iter().peekable(), b.into_iter().peekable());
    while out.len() < n {
        let take_a = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) => x.place() <= y.place(),
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => break,
        };
        out.extend(if take_a { a.next() } else { b.next() });
    }
    (out, more)
}

/// One held row.
pub(super) struct Entry {
    /// The row as the engine last put it; `None` once deleted.
    pub row: Option<Instance>,
    /// Event references: the trigger, then one per step (0 for none).
    pub refs: Vec<i64>,
    /// The Kafka partition the row's first event came from.
    pub part: Option<i32>,
    /// Whether SQLite has a row for this key.
    in_db: bool,
    /// `COLS` bits changed since SQLite last saw the row; 0 when clean.
    changed: u16,
    /// The deadline under which `deadlines` holds this (changed) row.
    indexed: Option<Instant>,
}

/// Rows by key, one map per rule. foldhash (already in the build through hashbrown) is
/// several times faster than SipHash on short keys and randomly seeded per process.
type Generation = Vec<HashMap<Box<str>, Entry, foldhash::fast::RandomState>>;

pub(super) struct Rows {
    /// Rows used since the last rotation, by rule index; every changed row is here.
    young: Generation,
    /// Rows of the generation before, dropped at the next rotation unless used again.
    old: Generation,
    /// (next open deadline, rule, key) of every changed row that has one.
    deadlines: BTreeSet<(Instant, u32, Box<str>)>,
    /// Rows changed since the last flush.
    dirty: Vec<(u32, Box<str>)>,
    cap: usize,
    /// UPDATE statements by changed-column mask.
    updates: HashMap<u16, String>,
}

fn count(g: &Generation) -> usize {
    g.iter().map(HashMap::len).sum()
}

fn empty(rules: usize) -> Generation {
    (0..rules).map(|_| HashMap::default()).collect()
}

pub fn next_deadline(steps: &[StepState]) -> Option<Instant> {
    steps
        .iter()
        .filter(|s| s.status == StepStatus::Open)
        .map(|s| s.at)
        .min()
}

/// The latest `at` of the steps with status `want` (the timeline's status indexes).
fn latest(steps: &[StepState], want: StepStatus) -> Option<Instant> {
    steps
        .iter()
        .filter(|s| s.status == want)
        .map(|s| s.at)
        .max()
}

/// The columns (`COLS` bits, refs and part aside) that differ between two versions.
fn diff(old: &Instance, new: &Instance) -> u16 {
    let mut bits = 0;
    let mut set = |i: usize, differs: bool| {
        if differs {
            bits |= 1 << i;
        }
    };
    set(0, old.opened_at != new.opened_at);
    set(1, old.closed_at != new.closed_at);
    set(2, old.expires_at != new.expires_at);
    if old.steps[..] != new.steps[..] {
        set(3, next_deadline(&old.steps) != next_deadline(&new.steps));
        set(4, true);
        set(
            6,
            latest(&old.steps, StepStatus::Missing) != latest(&new.steps, StepStatus::Missing),
        );
        set(
            7,
            latest(&old.steps, StepStatus::Late) != latest(&new.steps, StepStatus::Late),
        );
    }
    set(5, old.captures != new.captures);
    bits
}

/// The column values in `mask` (`COLS` bits), in column order; the others are not
/// computed (encoding steps and captures is most of the cost of a row write).
fn values(inst: &Instance, refs: &[i64], part: Option<i32>, mask: u16) -> Vec<Value> {
    let opt = |v: Option<i64>| v.map(Value::Integer).unwrap_or(Value::Null);
    let mut out = Vec::with_capacity(mask.count_ones() as usize);
    for i in 0..COLS.len() {
        if mask & (1 << i) == 0 {
            continue;
        }
        out.push(match i {
            0 => Value::Integer(inst.opened_at),
            1 => opt(inst.closed_at),
            2 => Value::Integer(inst.expires_at),
            3 => opt(next_deadline(&inst.steps)),
            4 => Value::Blob(super::sqlite_state::encode_steps(&inst.steps)),
            5 => Value::Text(serde_json::to_string(&inst.captures).unwrap_or_default()),
            6 => opt(latest(&inst.steps, StepStatus::Missing)),
            7 => opt(latest(&inst.steps, StepStatus::Late)),
            8 => Value::Blob(super::sqlite_state::encode_refs(refs)),
            _ => opt(part.map(i64::from)),
        });
    }
    out
}

impl Rows {
    pub fn new(rules: usize, cap: usize) -> Rows {
        Rows {
            young: empty(rules),
            old: empty(rules),
            deadlines: BTreeSet::new(),
            dirty: Vec::new(),
            cap,
            updates: HashMap::new(),
        }
    }

    /// Rows changed since the last flush.
    pub fn dirty(&self) -> usize {
        self.dirty.len()
    }

    /// A copy of the held row for (rule, key) and its event references; the row moves to
    /// the young generation.
    pub fn get(&mut self, rule: usize, key: &str) -> Option<(Option<Instance>, Vec<i64>)> {
        if let Some(e) = self.young.get(rule)?.get(key) {
            return Some((e.row.clone(), e.refs.clone()));
        }
        let (k, e) = self.old.get_mut(rule)?.remove_entry(key)?;
        let copy = (e.row.clone(), e.refs.clone());
        self.young[rule].insert(k, e);
        Some(copy)
    }

    /// Whether (rule, key) is held with changes SQLite has not seen.
    pub fn is_changed(&self, rule: usize, key: &str) -> bool {
        self.young
            .get(rule)
            .and_then(|m| m.get(key))
            .is_some_and(|e| e.changed != 0)
    }

    /// Holds a row just read from SQLite (after `get` missed it in both generations).
    pub fn insert_loaded(
        &mut self,
        rule: usize,
        key: &str,
        row: Instance,
        refs: Vec<i64>,
        part: Option<i32>,
    ) {
        self.young[rule].insert(
            Box::from(key),
            Entry {
                row: Some(row),
                refs,
                part,
                in_db: true,
                changed: 0,
                indexed: None,
            },
        );
    }

    /// Records the engine's new version of a row (`None`: gone), after `get` (or a miss and
    /// `insert_loaded`) for the same row. `part` is kept from the row's first event.
    pub fn put(
        &mut self,
        rule: usize,
        key: &str,
        row: Option<Instance>,
        refs: Vec<i64>,
        part: Option<i32>,
    ) {
        if row.is_none() && !self.young[rule].contains_key(key) {
            return;
        }
        let map = &mut self.young[rule];
        let e = map.entry(Box::from(key)).or_insert_with(|| Entry {
            row: None,
            refs: Vec::new(),
            part: None,
            in_db: false,
            changed: 0,
            indexed: None,
        });
        let mut changed = match (&e.row, &row) {
            (Some(old), Some(new)) => diff(old, new),
            (None, None) => 0,
            _ => ALL,
        };
        if refs != e.refs {
            changed |= REFS;
        }
        let part = if row.is_some() {
            e.part.or(part)
        } else {
            e.part
        };
        if part != e.part {
            changed |= PART;
        }
        e.row = row;
        e.refs = refs;
        e.part = part;
        if changed != 0 {
            if e.changed == 0 {
                self.dirty.push((rule as u32, Box::from(key)));
            }
            e.changed |= changed;
        }
        if e.changed != 0 {
            let due = e.row.as_ref().and_then(|i| next_deadline(&i.steps));
            if due != e.indexed {
                if let Some(d) = e.indexed {
                    self.deadlines.remove(&(d, rule as u32, Box::from(key)));
                }
                if let Some(d) = due {
                    self.deadlines.insert((d, rule as u32, Box::from(key)));
                }
                e.indexed = due;
            }
        } else if e.row.is_none() && !e.in_db {
            map.remove(key);
        }
    }

    /// Up to `n` changed rows with an open deadline before `before`, in the order of (next
    /// open deadline, rule, key), with their steps.
    pub fn due_rows(&self, before: Instant, n: usize) -> Vec<DueRow> {
        self.deadlines
            .range(..(before, 0, Box::<str>::default()))
            .filter_map(|(d, rule, key)| {
                let inst = self.young[*rule as usize].get(key)?.row.as_ref()?;
                Some(DueRow {
                    deadline: *d,
                    rule: *rule as usize,
                    key: key.to_string(),
                    steps: inst.steps.clone(),
                })
            })
            .take(n)
            .collect()
    }

    /// The earliest open deadline at or after `from` among changed rows.
    pub fn first_deadline(&self, from: Instant) -> Instant {
        self.deadlines
            .range((from, 0, Box::<str>::default())..)
            .next()
            .map_or(Instant::MAX, |d| d.0)
    }

    /// Writes every changed row to SQLite (inside the caller's transaction), sorted by key.
    /// Returns the earliest open deadline among them: SQLite is their truth from now on.
    pub fn flush(
        &mut self,
        conn: &Connection,
        names: &[Arc<str>],
    ) -> rusqlite::Result<Option<Instant>> {
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        let earliest = self.deadlines.first().map(|d| d.0);
        let r = self.write(conn, names, &dirty);
        dirty.clear();
        self.dirty = dirty;
        self.deadlines.clear();
        r.map(|()| earliest)
    }

    fn write(
        &mut self,
        conn: &Connection,
        names: &[Arc<str>],
        dirty: &[(u32, Box<str>)],
    ) -> rusqlite::Result<()> {
        for (rule, key) in dirty {
            let (rule, key) = (*rule as usize, &**key);
            let map = &mut self.young[rule];
            let Some(e) = map.get_mut(key) else {
                continue;
            };
            e.indexed = None;
            let name = &*names[rule];
            let Some(inst) = &e.row else {
                if e.in_db {
                    conn.prepare_cached("DELETE FROM instances WHERE rule = ?1 AND key = ?2")?
                        .execute(rusqlite::params![name, key])?;
                }
                map.remove(key);
                continue;
            };
            let mask = if e.in_db { e.changed } else { ALL };
            let sql = if e.in_db {
                self.updates.entry(mask).or_insert_with(|| {
                    let set: Vec<String> = COLS
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| mask & (1 << i) != 0)
                        .enumerate()
                        .map(|(n, (_, c))| format!("{c} = ?{}", n + 3))
                        .collect();
                    format!(
                        "UPDATE instances SET {} WHERE rule = ?1 AND key = ?2",
                        set.join(", ")
                    )
                })
            } else {
                // A changed row's mask is never 0, so 0 keys the INSERT.
                self.updates.entry(0).or_insert_with(|| {
                    format!(
                        "INSERT OR REPLACE INTO instances (rule, key, {}) VALUES (?1, ?2, {})",
                        COLS.join(", "),
                        (3..3 + COLS.len())
                            .map(|i| format!("?{i}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })
            };
            let mut stmt = conn.prepare_cached(sql)?;
            stmt.raw_bind_parameter(1, name)?;
            stmt.raw_bind_parameter(2, key)?;
            for (n, v) in values(inst, &e.refs, e.part, mask).iter().enumerate() {
                stmt.raw_bind_parameter(n + 3, v)?;
            }
            stmt.raw_execute()?;
            e.in_db = true;
            e.changed = 0;
        }
        Ok(())
    }

    /// Drops a row SQLite no longer has (purged); it must be clean.
    pub fn forget(&mut self, rule: usize, key: &str) {
        for g in [&mut self.young, &mut self.old] {
            if let Some(m) = g.get_mut(rule) {
                m.remove(key);
            }
        }
    }

    /// Once everything is written (at a commit, or a flush within a huge batch) and the
    /// young generation holds half the bound, the old one is dropped and the young one
    /// becomes old.
    pub fn evict(&mut self) {
        if self.dirty.is_empty() && count(&self.young) >= self.cap / 2 {
            // Each new map starts at the size the one it follows reached: growing it
            // again by doubling rehashed every row (about a twentieth of the core thread).
            let next = self
                .young
                .iter()
                .map(|m| HashMap::with_capacity_and_hasher(m.len(), Default::default()))
                .collect();
            self.old = std::mem::replace(&mut self.young, next);
        }
    }
}
