//! The engine's narrow view of state: rows keyed by (rule, key) with indexed step
//! deadlines, remembered early correlates and cancels, and the clock. The in-memory
//! implementation lives in `memory.rs`; a durable one plugs in behind the same trait.

use crate::time::Instant;

/// Where a step of an instance stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepStatus {
    /// Waiting for its `after` step.
    Pending,
    /// Waiting for its correlate until `at` (the deadline).
    Open,
    /// Satisfied by a correlate whose event time is `at`.
    Satisfied,
    /// The deadline `at` passed (or a correlate came after it); reported missing.
    Missing,
    /// Reported missing, then a late correlate was reported; `at` is the deadline.
    Late,
    /// Open when the instance was cancelled; `at` is the deadline it had.
    Cancelled,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepState {
    pub status: StepStatus,
    /// Deadline, or satisfaction time for `Satisfied`; 0 while `Pending`.
    pub at: Instant,
}

/// The step vector of an instance: up to two steps inline (most sagas), more on the heap.
/// Keeps a million open instances small without an allocation each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Steps {
    Inline(u8, [StepState; 2]),
    Heap(Box<[StepState]>),
}

impl Steps {
    /// `n` steps, all pending.
    pub fn pending(n: usize) -> Steps {
        let p = StepState {
            status: StepStatus::Pending,
            at: 0,
        };
        if n <= 2 {
            Steps::Inline(n as u8, [p; 2])
        } else {
            Steps::Heap(vec![p; n].into_boxed_slice())
        }
    }
}

impl std::ops::Deref for Steps {
    type Target = [StepState];
    fn deref(&self) -> &[StepState] {
        match self {
            Steps::Inline(n, items) => &items[..usize::from(*n)],
            Steps::Heap(b) => b,
        }
    }
}

impl std::ops::DerefMut for Steps {
    fn deref_mut(&mut self) -> &mut [StepState] {
        match self {
            Steps::Inline(n, items) => &mut items[..usize::from(*n)],
            Steps::Heap(b) => b,
        }
    }
}

/// One instance of a rule for one correlation key: a row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    /// Event time of the trigger that opened it.
    pub opened_at: Instant,
    /// Engine clock when it closed; `None` while open. A closed row is kept so that a
    /// repeated trigger is recognised (dedup) and a late correlate reported.
    pub closed_at: Option<Instant>,
    /// For a closed row: when neither dedup nor late memory needs it any more.
    pub expires_at: Instant,
    /// One entry per step of the rule, in declaration order.
    pub steps: Steps,
    /// Trigger fields the rule's templates use, rendered as text when it opened.
    pub captures: Box<[String]>,
}

impl Instance {
    pub fn is_open(&self) -> bool {
        self.closed_at.is_none()
    }
}

/// An open step whose deadline has passed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Due {
    pub deadline: Instant,
    pub rule: usize,
    pub key: String,
    pub step: usize,
}

/// The clock the engine keeps in state, so a restart continues where it stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Clock {
    /// Largest event time seen, `i64::MIN` before the first event.
    pub max_seen: Instant,
    /// The engine clock, `i64::MIN` before the first event or tick.
    pub now: Instant,
}

impl Default for Clock {
    fn default() -> Self {
        Clock {
            max_seen: Instant::MIN,
            now: Instant::MIN,
        }
    }
}

/// State as the engine sees it. Implementations index open deadlines and expiries; the
/// engine never scans.
pub trait State {
    /// Takes the row for (rule, key) out for change. Every `take` is followed by a `put`
    /// for the same row before any other `take`.
    fn take(&mut self, rule: usize, key: &str) -> Option<Instance>;
    /// Puts the row back (or removes it with `None`), updating the deadline index.
    fn put(&mut self, rule: usize, key: &str, row: Option<Instance>);
    /// Appends open steps with `deadline < before`, in any order: all of them, or, when
    /// there are more than about `limit`, returns true having appended about `limit` that
    /// come first in the order of `Due` (deadline, rule, key, step), so that chunks fire
    /// in the order one fire would. The caller fires what it got before it asks again.
    fn due(&mut self, before: Instant, limit: usize, out: &mut Vec<Due>) -> bool;
    /// A remembered early correlate for (rule, key, step): its event time.
    fn early(&self, rule: usize, key: &str, step: usize) -> Option<(Instant, Instant)>;
    /// Remembers an early correlate at `time` until the clock passes `expires`.
    fn put_early(&mut self, rule: usize, key: &str, step: usize, time: Instant, expires: Instant);
    /// Forgets an early correlate, if one is remembered (cheap when none is).
    fn remove_early(&mut self, rule: usize, key: &str, step: usize);
    /// Expiry of a remembered cancel for (rule, key).
    fn cancel(&self, rule: usize, key: &str) -> Option<Instant>;
    fn put_cancel(&mut self, rule: usize, key: &str, expires: Instant);
    /// Forgets closed rows, early correlates and cancels that expired before `clock`.
    fn purge(&mut self, clock: Instant);
    fn clock(&self) -> Clock;
    fn set_clock(&mut self, clock: Clock);
    /// Rows currently held that are open.
    fn open_instances(&self) -> usize;
}
