//! The hot part of the instance table, held in memory: rows read or changed recently.
//! Changes stay here until the batch commits, so a row touched several times in a batch is
//! written once, and then they are written back sorted by key, each statement setting only
//! the columns that changed (SQLite then leaves the indexes of the others alone). Beyond a
//! bound, the rows used least recently are dropped after a commit, so memory does not
//! follow open instances. While a row is held here it is the truth: its open deadline is
//! indexed here and the caller ignores what SQLite says about it.

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
    /// The commit generation that last used the row, for eviction.
    used: u32,
}

pub(super) struct Rows {
    by_rule: Vec<HashMap<Box<str>, Entry>>,
    /// (next open deadline, rule, key) of every held row that has one.
    deadlines: BTreeSet<(Instant, u32, Box<str>)>,
    /// Rows changed since the last flush.
    dirty: Vec<(u32, Box<str>)>,
    len: usize,
    cap: usize,
    generation: u32,
    /// UPDATE statements by changed-column mask.
    updates: HashMap<u16, String>,
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

fn values(inst: &Instance, refs: &[i64], part: Option<i32>) -> [Value; 10] {
    let opt = |v: Option<i64>| v.map(Value::Integer).unwrap_or(Value::Null);
    [
        Value::Integer(inst.opened_at),
        opt(inst.closed_at),
        Value::Integer(inst.expires_at),
        opt(next_deadline(&inst.steps)),
        Value::Blob(super::sqlite_state::encode_steps(&inst.steps)),
        Value::Text(serde_json::to_string(&inst.captures).unwrap_or_default()),
        opt(latest(&inst.steps, StepStatus::Missing)),
        opt(latest(&inst.steps, StepStatus::Late)),
        Value::Blob(super::sqlite_state::encode_refs(refs)),
        opt(part.map(i64::from)),
    ]
}

impl Rows {
    pub fn new(rules: usize, cap: usize) -> Rows {
        Rows {
            by_rule: (0..rules).map(|_| HashMap::new()).collect(),
            deadlines: BTreeSet::new(),
            dirty: Vec::new(),
            len: 0,
            cap,
            generation: 0,
            updates: HashMap::new(),
        }
    }

    /// Rows held (clean and changed).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Rows changed since the last flush.
    pub fn dirty(&self) -> usize {
        self.dirty.len()
    }

    /// The held row for (rule, key), marked as used.
    pub fn get(&mut self, rule: usize, key: &str) -> Option<&Entry> {
        let generation = self.generation;
        let e = self.by_rule.get_mut(rule)?.get_mut(key)?;
        e.used = generation;
        Some(e)
    }

    pub fn contains(&self, rule: usize, key: &str) -> bool {
        self.by_rule.get(rule).is_some_and(|m| m.contains_key(key))
    }

    /// Holds a row just read from SQLite.
    pub fn insert_loaded(
        &mut self,
        rule: usize,
        key: &str,
        row: Instance,
        refs: Vec<i64>,
        part: Option<i32>,
    ) {
        if let Some(d) = next_deadline(&row.steps) {
            self.deadlines.insert((d, rule as u32, Box::from(key)));
        }
        let old = self.by_rule[rule].insert(
            Box::from(key),
            Entry {
                row: Some(row),
                refs,
                part,
                in_db: true,
                changed: 0,
                used: self.generation,
            },
        );
        if old.is_none() {
            self.len += 1;
        }
    }

    /// Records the engine's new version of a row (`None`: gone). `part` is kept from the
    /// row's first event.
    pub fn put(
        &mut self,
        rule: usize,
        key: &str,
        row: Option<Instance>,
        refs: Vec<i64>,
        part: Option<i32>,
    ) {
        let map = &mut self.by_rule[rule];
        if !map.contains_key(key) {
            if row.is_none() {
                return;
            }
            map.insert(
                Box::from(key),
                Entry {
                    row: None,
                    refs: Vec::new(),
                    part: None,
                    in_db: false,
                    changed: 0,
                    used: 0,
                },
            );
            self.len += 1;
        }
        let Some(e) = map.get_mut(key) else {
            return;
        };
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
        let old_due = e.row.as_ref().and_then(|i| next_deadline(&i.steps));
        let new_due = row.as_ref().and_then(|i| next_deadline(&i.steps));
        if old_due != new_due {
            if let Some(d) = old_due {
                self.deadlines.remove(&(d, rule as u32, Box::from(key)));
            }
            if let Some(d) = new_due {
                self.deadlines.insert((d, rule as u32, Box::from(key)));
            }
        }
        e.row = row;
        e.refs = refs;
        e.part = part;
        e.used = self.generation;
        if changed != 0 {
            if e.changed == 0 {
                self.dirty.push((rule as u32, Box::from(key)));
            }
            e.changed |= changed;
        } else if e.row.is_none() && !e.in_db && e.changed == 0 {
            map.remove(key);
            self.len -= 1;
        }
    }

    /// Appends the open steps of held rows whose deadline is before `before`.
    pub fn due(&self, before: Instant, out: &mut Vec<crate::engine::state::Due>) {
        for (_, rule, key) in self.deadlines.range(..(before, 0, Box::<str>::default())) {
            let rule = *rule as usize;
            let Some(Some(inst)) = self.by_rule[rule].get(key).map(|e| &e.row) else {
                continue;
            };
            for (step, s) in inst.steps.iter().enumerate() {
                if s.status == StepStatus::Open && s.at < before {
                    out.push(crate::engine::state::Due {
                        deadline: s.at,
                        rule,
                        key: key.to_string(),
                        step,
                    });
                }
            }
        }
    }

    /// The earliest open deadline at or after `from` among held rows.
    pub fn first_deadline(&self, from: Instant) -> Instant {
        self.deadlines
            .range((from, 0, Box::<str>::default())..)
            .next()
            .map_or(Instant::MAX, |d| d.0)
    }

    /// Writes every changed row to SQLite (inside the caller's transaction), sorted by key.
    pub fn flush(&mut self, conn: &Connection, names: &[Arc<str>]) -> rusqlite::Result<()> {
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        let r = self.write(conn, names, &dirty);
        dirty.clear();
        self.dirty = dirty;
        r
    }

    fn write(
        &mut self,
        conn: &Connection,
        names: &[Arc<str>],
        dirty: &[(u32, Box<str>)],
    ) -> rusqlite::Result<()> {
        for (rule, key) in dirty {
            let (rule, key) = (*rule as usize, &**key);
            let map = &mut self.by_rule[rule];
            let Some(e) = map.get_mut(key) else {
                continue;
            };
            let name = &*names[rule];
            let Some(inst) = &e.row else {
                if e.in_db {
                    conn.prepare_cached("DELETE FROM instances WHERE rule = ?1 AND key = ?2")?
                        .execute(rusqlite::params![name, key])?;
                }
                map.remove(key);
                self.len -= 1;
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
            let mut n = 3;
            for (i, v) in values(inst, &e.refs, e.part).iter().enumerate() {
                if mask & (1 << i) != 0 {
                    stmt.raw_bind_parameter(n, v)?;
                    n += 1;
                }
            }
            stmt.raw_execute()?;
            e.in_db = true;
            e.changed = 0;
        }
        Ok(())
    }

    /// Drops a row SQLite no longer has (purged); it must be clean.
    pub fn forget(&mut self, rule: usize, key: &str) {
        if let Some(e) = self.by_rule.get_mut(rule).and_then(|m| m.remove(key)) {
            self.len -= 1;
            if let Some(d) = e.row.as_ref().and_then(|i| next_deadline(&i.steps)) {
                self.deadlines.remove(&(d, rule as u32, Box::from(key)));
            }
        }
    }

    /// After a commit (everything flushed): starts a new generation and, above the bound,
    /// drops the rows used least recently down to three quarters of it. Returns the
    /// earliest open deadline among the dropped rows (SQLite is their truth again).
    pub fn evict(&mut self) -> Option<Instant> {
        self.generation = self.generation.wrapping_add(1);
        if self.len <= self.cap || !self.dirty.is_empty() {
            return None;
        }
        let mut used: Vec<u32> = self
            .by_rule
            .iter()
            .flat_map(|m| m.values().map(|e| e.used))
            .collect();
        let drop = self.len - self.cap * 3 / 4;
        let (_, &mut threshold, _) = used.select_nth_unstable(drop - 1);
        let mut earliest = None::<Instant>;
        let mut gone = Vec::new();
        for (rule, map) in self.by_rule.iter_mut().enumerate() {
            map.retain(|key, e| {
                let keep = e.used > threshold || e.changed != 0;
                if !keep {
                    if let Some(d) = e.row.as_ref().and_then(|i| next_deadline(&i.steps)) {
                        gone.push((d, rule as u32, key.clone()));
                        earliest = Some(earliest.map_or(d, |x| x.min(d)));
                    }
                }
                keep
            });
        }
        for g in &gone {
            self.deadlines.remove(g);
        }
        self.len = self.by_rule.iter().map(HashMap::len).sum();
        earliest
    }
}
