//! In-memory state: a slab of rows found through a hash table of slot numbers (so each key
//! is stored once), a min-heap of open deadlines with lazy deletion (a satisfied step's
//! entry stays until it surfaces and is found stale: no mid-structure removals), and a
//! heap of closed rows' expiries, lazily deleted the same way.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::hash::{BuildHasher, Hash, Hasher};

use hashbrown::{DefaultHashBuilder, HashMap, HashTable};

use super::state::{Clock, Due, Instance, State, StepStatus, Steps};
use crate::time::Instant;

/// A correlation key stored inline when it is short (most keys), on the heap otherwise.
enum SmallKey {
    Inline(u8, [u8; 22]),
    Heap(Box<str>),
}

impl SmallKey {
    fn new(key: &str) -> SmallKey {
        let b = key.as_bytes();
        if b.len() <= 22 {
            let mut buf = [0u8; 22];
            buf[..b.len()].copy_from_slice(b);
            SmallKey::Inline(b.len() as u8, buf)
        } else {
            SmallKey::Heap(Box::from(key))
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            SmallKey::Inline(n, buf) => &buf[..usize::from(*n)],
            SmallKey::Heap(b) => b.as_bytes(),
        }
    }

    fn to_string_lossy(&self) -> String {
        String::from_utf8_lossy(self.bytes()).into_owned()
    }
}

/// A row as stored: the fields of [`Instance`] with `closed_at` as a sentinel, so a slot
/// is about 110 bytes with no allocation for keys up to 22 bytes and rules of up to two
/// steps.
struct Slot {
    rule: u32,
    key: SmallKey,
    opened_at: Instant,
    /// `Instant::MIN` while open.
    closed_at: Instant,
    expires_at: Instant,
    steps: Steps,
    captures: Box<[String]>,
}

/// What a row looked like when it was taken, to update the indexes on `put`. The open
/// steps it had are in `MemoryState::taken_open`.
struct Taken {
    slot: u32,
    expiry: Option<Instant>,
}

#[derive(PartialEq, Eq, Hash)]
struct EarlyKey(u32, u32, Box<str>);

#[derive(Hash)]
struct EarlyRef<'a>(u32, u32, &'a str);

impl hashbrown::Equivalent<EarlyKey> for EarlyRef<'_> {
    fn equivalent(&self, k: &EarlyKey) -> bool {
        self.0 == k.0 && self.1 == k.1 && self.2 == &*k.2
    }
}

/// (expiry, rule, step, key) of a remembered early correlate.
type EarlyExpiry = (Instant, u32, u32, Box<str>);

/// State held in memory, for `replay`, `test` and the engine's own tests.
#[derive(Default)]
pub struct MemoryState {
    hasher: DefaultHashBuilder,
    table: HashTable<u32>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// (deadline, slot, step) of every open step.
    /// (deadline, slot, step) of every open step, plus stale entries of steps that were
    /// satisfied, cancelled or freed since; `due` checks each against its slot.
    deadlines: BinaryHeap<Reverse<(Instant, u32, u32)>>,
    /// (expires_at, slot) of every closed row.
    expiries: BinaryHeap<Reverse<(Instant, u32)>>,
    taken: Option<Taken>,
    taken_open: Vec<(u32, Instant)>,
    new_open: Vec<(u32, Instant)>,
    /// Early correlates: (rule, step, key) → (event time, expiry).
    early: HashMap<EarlyKey, (Instant, Instant)>,
    early_expiry: BinaryHeap<Reverse<EarlyExpiry>>,
    /// Remembered cancels: (rule, 0, key) → expiry.
    cancels: HashMap<EarlyKey, Instant>,
    cancel_expiry: BinaryHeap<Reverse<(Instant, u32, Box<str>)>>,
    clock: Clock,
    open: usize,
}

fn open_steps(steps: &Steps, out: &mut Vec<(u32, Instant)>) {
    out.clear();
    out.extend(
        steps
            .iter()
            .enumerate()
            .filter(|(_, s)| s.status == StepStatus::Open)
            .map(|(i, s)| (i as u32, s.at)),
    );
}

fn hash_key(hasher: &DefaultHashBuilder, rule: u32, key: &[u8]) -> u64 {
    let mut h = hasher.build_hasher();
    rule.hash(&mut h);
    key.hash(&mut h);
    h.finish()
}

impl MemoryState {
    pub fn new() -> MemoryState {
        MemoryState::default()
    }

    fn find(&self, rule: u32, key: &str) -> Option<u32> {
        let hash = hash_key(&self.hasher, rule, key.as_bytes());
        let slots = &self.slots;
        self.table
            .find(hash, |&s| {
                let slot = &slots[s as usize];
                slot.rule == rule && slot.key.bytes() == key.as_bytes()
            })
            .copied()
    }

    /// Rows held (open and closed), for tests and memory accounting.
    pub fn rows(&self) -> usize {
        self.table.len()
    }
}

impl State for MemoryState {
    fn take(&mut self, rule: usize, key: &str) -> Option<Instance> {
        debug_assert!(self.taken.is_none(), "take without put");
        let slot = self.find(rule as u32, key)?;
        let s = &mut self.slots[slot as usize];
        let closed_at = (s.closed_at != Instant::MIN).then_some(s.closed_at);
        let inst = Instance {
            opened_at: s.opened_at,
            closed_at,
            expires_at: s.expires_at,
            steps: std::mem::replace(&mut s.steps, Steps::pending(0)),
            captures: std::mem::take(&mut s.captures),
        };
        open_steps(&inst.steps, &mut self.taken_open);
        self.taken = Some(Taken {
            slot,
            expiry: closed_at.map(|_| inst.expires_at),
        });
        if inst.is_open() {
            self.open -= 1;
        }
        Some(inst)
    }

    fn put(&mut self, rule: usize, key: &str, row: Option<Instance>) {
        let rule32 = rule as u32;
        let (slot, old_expiry) = match self.taken.take() {
            Some(t) => (Some(t.slot), t.expiry),
            None => {
                self.taken_open.clear();
                (None, None)
            }
        };
        let Some(inst) = row else {
            if let Some(slot) = slot {
                let hash = hash_key(&self.hasher, rule32, key.as_bytes());
                if let Ok(entry) = self.table.find_entry(hash, |&s| s == slot) {
                    entry.remove();
                }
                let s = &mut self.slots[slot as usize];
                s.key = SmallKey::new("");
                s.captures = Box::default();
                self.free.push(slot);
            }
            return;
        };
        let slot = match slot {
            Some(s) => s,
            None => {
                let fresh = Slot {
                    rule: rule32,
                    key: SmallKey::new(key),
                    opened_at: 0,
                    closed_at: Instant::MIN,
                    expires_at: 0,
                    steps: Steps::pending(0),
                    captures: Box::default(),
                };
                let s = match self.free.pop() {
                    Some(s) => {
                        self.slots[s as usize] = fresh;
                        s
                    }
                    None => {
                        self.slots.push(fresh);
                        (self.slots.len() - 1) as u32
                    }
                };
                let hash = hash_key(&self.hasher, rule32, key.as_bytes());
                let slots = &self.slots;
                let hasher = &self.hasher;
                self.table.insert_unique(hash, s, |&x| {
                    let sl = &slots[x as usize];
                    hash_key(hasher, sl.rule, sl.key.bytes())
                });
                s
            }
        };
        open_steps(&inst.steps, &mut self.new_open);
        for &(step, d) in &self.new_open {
            if !self.taken_open.contains(&(step, d)) {
                self.deadlines.push(Reverse((d, slot, step)));
            }
        }
        let new_expiry = inst.closed_at.map(|_| inst.expires_at);
        if old_expiry != new_expiry
            && let Some(e) = new_expiry
        {
            self.expiries.push(Reverse((e, slot)));
        }
        if inst.is_open() {
            self.open += 1;
        }
        let s = &mut self.slots[slot as usize];
        s.opened_at = inst.opened_at;
        s.closed_at = inst.closed_at.unwrap_or(Instant::MIN);
        s.expires_at = inst.expires_at;
        s.steps = inst.steps;
        s.captures = inst.captures;
    }

    fn due(&mut self, before: Instant, limit: usize, out: &mut Vec<Due>) -> bool {
        let mut last = None;
        let mut more = false;
        let mut got: Vec<(Due, (Instant, u32, u32))> = Vec::new();
        while let Some(&Reverse(entry)) = self.deadlines.peek() {
            let (deadline, slot, step) = entry;
            if deadline >= before {
                break;
            }
            // Past the limit, only the rest of the last deadline's steps: those go by rule
            // and key, which the heap does not order.
            if got.len() >= limit && got.last().is_some_and(|(d, _)| d.deadline != deadline) {
                more = true;
                break;
            }
            self.deadlines.pop();
            if last == Some(entry) {
                continue;
            }
            last = Some(entry);
            let s = &self.slots[slot as usize];
            let live = s.closed_at == Instant::MIN
                && s.steps
                    .get(step as usize)
                    .is_some_and(|st| st.status == StepStatus::Open && st.at == deadline);
            if live {
                let due = Due {
                    deadline,
                    rule: s.rule as usize,
                    key: s.key.to_string_lossy(),
                    step: step as usize,
                };
                got.push((due, entry));
            }
        }
        if got.len() > limit {
            got.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            for (_, entry) in got.drain(limit..) {
                self.deadlines.push(Reverse(entry));
            }
            more = true;
        }
        out.extend(got.into_iter().map(|(d, _)| d));
        more
    }

    fn early(&self, rule: usize, key: &str, step: usize) -> Option<(Instant, Instant)> {
        self.early
            .get(&EarlyRef(rule as u32, step as u32, key))
            .copied()
    }

    fn put_early(&mut self, rule: usize, key: &str, step: usize, time: Instant, expires: Instant) {
        self.early.insert(
            EarlyKey(rule as u32, step as u32, Box::from(key)),
            (time, expires),
        );
        self.early_expiry
            .push(Reverse((expires, rule as u32, step as u32, Box::from(key))));
    }

    fn remove_early(&mut self, rule: usize, key: &str, step: usize) {
        self.early.remove(&EarlyRef(rule as u32, step as u32, key));
    }

    fn cancel(&self, rule: usize, key: &str) -> Option<Instant> {
        self.cancels.get(&EarlyRef(rule as u32, 0, key)).copied()
    }

    fn put_cancel(&mut self, rule: usize, key: &str, expires: Instant) {
        self.cancels
            .insert(EarlyKey(rule as u32, 0, Box::from(key)), expires);
        self.cancel_expiry
            .push(Reverse((expires, rule as u32, Box::from(key))));
    }

    fn purge(&mut self, clock: Instant) {
        while let Some(&Reverse((e, slot))) = self.expiries.peek() {
            if e >= clock {
                break;
            }
            self.expiries.pop();
            let s = &self.slots[slot as usize];
            // Stale entries (the row was freed, reopened or got a later expiry) are skipped.
            if s.key.bytes().is_empty() || s.closed_at == Instant::MIN || s.expires_at != e {
                continue;
            }
            let (rule, key) = (s.rule as usize, s.key.to_string_lossy());
            self.take(rule, &key);
            self.put(rule, &key, None);
        }
        while let Some(Reverse((e, ..))) = self.early_expiry.peek() {
            if *e >= clock {
                break;
            }
            let Some(Reverse((e, rule, step, key))) = self.early_expiry.pop() else {
                break;
            };
            let q = EarlyRef(rule, step, &key);
            if self.early.get(&q).is_some_and(|&(_, x)| x == e) {
                self.early.remove(&q);
            }
        }
        while let Some(Reverse((e, ..))) = self.cancel_expiry.peek() {
            if *e >= clock {
                break;
            }
            let Some(Reverse((e, rule, key))) = self.cancel_expiry.pop() else {
                break;
            };
            let q = EarlyRef(rule, 0, &key);
            if self.cancels.get(&q) == Some(&e) {
                self.cancels.remove(&q);
            }
        }
    }

    fn clock(&self) -> Clock {
        self.clock
    }

    fn set_clock(&mut self, clock: Clock) {
        self.clock = clock;
    }

    fn open_instances(&self) -> usize {
        self.open
    }
}
