//! The correlation engine: pure. Events and an explicit clock go in, outcomes come out as
//! data. It reads no clock, does no I/O and knows nothing of tokio, SQLite or Kafka; its
//! state goes through the [`State`] trait.
//!
//! Semantics (docs/rules.md is the long form): each event first advances the clock to
//! `max(event time seen) - lateness` (times past the caller's ceiling, if it set one, are
//! not seen) and fires every open step whose deadline is before it;
//! then it is applied to each rule — cancel, steps, trigger, in that order.

pub mod memory;
pub mod outcome;
pub mod state;

use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::event::Event;
use crate::rules::template::Vars;
use crate::rules::{Action, Matcher, Rule, RuleSet};
use crate::time::{Instant, format_rfc3339};
pub use memory::MemoryState;
pub use outcome::{Alert, Compensation, Kind, Outcome};
pub use state::{Clock, Due, Instance, State, StepState, StepStatus, Steps};

/// Does `m` select `ev`? Returns the correlation key if so.
pub fn match_key<'e>(m: &Matcher, ev: &'e Event<'_>) -> Option<std::borrow::Cow<'e, str>> {
    if let Some(src) = &m.source
        && ev.source != Some(src.as_str())
    {
        return None;
    }
    for (path, want) in &m.conds {
        match ev.field(*path) {
            Some(f) if f.equals(want) => {}
            _ => return None,
        }
    }
    ev.field(m.key)?.key()
}

/// A stable id for an action of a step of an instance: hex of SHA-256 over its parts.
/// `rendered` is the step's deadline (every message carries it) and everything the action
/// renders (texts, labels, payload): two instances
/// of one key with one trigger time (a repeated trigger after `dedup`) share an id only
/// if they render the same (their deadlines, the trigger fields they read, the rules a
/// reload left them may differ), so one id never carries two payloads.
pub fn action_id(
    rule: &str,
    key: &str,
    opened_at: Instant,
    step: &str,
    action: &str,
    rendered: &[&str],
) -> String {
    let mut h = Sha256::new();
    for part in [rule, key, &opened_at.to_string(), step, action] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    // Length-prefixed, after the parts above.
    for c in rendered {
        h.update((c.len() as u64).to_le_bytes());
        h.update(c.as_bytes());
    }
    let digest = h.finalize();
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// The engine over a state implementation.
pub struct Engine<S: State> {
    rules: Arc<RuleSet>,
    state: S,
    lateness: i64,
    /// The latest event time that moves the clock (`None`: any), set by the caller.
    ceiling: Option<Instant>,
    lifecycle: bool,
    due: Vec<Due>,
}

/// The parts of one rule application that every helper needs.
#[derive(Clone, Copy)]
struct Cx<'a> {
    rule_ix: usize,
    rule: &'a Rule,
    key: &'a str,
    clock: Instant,
    lifecycle: bool,
}

impl<S: State> Engine<S> {
    /// `lateness` (nanoseconds) is subtracted from the largest event time to get the clock.
    pub fn new(rules: Arc<RuleSet>, state: S, lateness: i64) -> Engine<S> {
        Engine {
            rules,
            state,
            lateness,
            ceiling: None,
            lifecycle: false,
            due: Vec::new(),
        }
    }

    /// Also emit lifecycle outcomes (opened, satisfied, closed, cancelled).
    pub fn with_lifecycle(mut self, on: bool) -> Self {
        self.lifecycle = on;
        self
    }

    pub fn rules(&self) -> &Arc<RuleSet> {
        &self.rules
    }

    pub fn state(&self) -> &S {
        &self.state
    }

    pub fn state_mut(&mut self) -> &mut S {
        &mut self.state
    }

    /// Event times past `ceiling` do not move the clock; the events themselves are
    /// applied as they are. The daemon's guard against events dated far ahead
    /// (`time.max_ahead`: wall time plus it): one event from a producer whose clock is
    /// years off would otherwise pass every open deadline at once.
    pub fn set_ceiling(&mut self, ceiling: Option<Instant>) {
        self.ceiling = ceiling;
    }

    pub fn ceiling(&self) -> Option<Instant> {
        self.ceiling
    }

    /// Swaps in a reloaded rule set. The caller keeps the state consistent with it (rows
    /// are keyed by rule name in durable state).
    pub fn set_rules(&mut self, rules: Arc<RuleSet>) {
        self.rules = rules;
    }

    /// The engine clock (`i64::MIN` before anything happened).
    pub fn clock(&self) -> Instant {
        self.state.clock().now
    }

    /// Applies one event.
    pub fn process(&mut self, ev: &Event<'_>, out: &mut Vec<Outcome>) {
        self.observe(ev.time);
        self.fire_some(usize::MAX, out);
        let now = self.state.clock().now;
        let rules = Arc::clone(&self.rules);
        for (rule_ix, rule) in rules.rules.iter().enumerate() {
            self.apply(rule_ix, rule, ev, now, out);
        }
    }

    /// Moves the clock as an event at `time` does, without firing or applying anything:
    /// what `process` starts with. A caller that must not hold every outcome of a mass
    /// expiry at once calls this, then `fire_some` until it returns false (handling the
    /// outcomes in between), then `process`, which then has nothing left to fire.
    pub fn observe(&mut self, time: Instant) {
        if self.ceiling.is_some_and(|c| time > c) {
            return;
        }
        let mut c = self.state.clock();
        c.max_seen = c.max_seen.max(time);
        // Never `MIN`, which means "no clock yet" (nothing fires) and, in a closed
        // instance, "open": event times near the start of the range less `lateness`
        // would saturate there. The earliest valid time instead: no deadline is that early.
        let now = c
            .max_seen
            .saturating_sub(self.lateness)
            .max(Instant::MIN + 1);
        c.now = c.now.max(now);
        self.state.set_clock(c);
    }

    /// Moves the clock forward to `to`; false when it is there already. A tick that does
    /// not move the clock changes nothing, so timer ticks never change outcomes, only
    /// their latency: after `true`, fire with `fire_some` (or call `tick`).
    pub fn move_clock(&mut self, to: Instant) -> bool {
        let mut c = self.state.clock();
        if to > c.now {
            c.now = to;
            self.state.set_clock(c);
            true
        } else {
            false
        }
    }

    /// Moves the clock forward to `to` and fires what is due (see `move_clock`).
    pub fn tick(&mut self, to: Instant, out: &mut Vec<Outcome>) {
        if self.move_clock(to) {
            self.fire_some(usize::MAX, out);
        }
    }

    /// End of input: the clock moves to the largest event time seen and fires what is due.
    pub fn finish(&mut self, out: &mut Vec<Outcome>) {
        let mut c = self.state.clock();
        if c.max_seen != Instant::MIN {
            c.now = c.now.max(c.max_seen);
            self.state.set_clock(c);
            self.fire_some(usize::MAX, out);
        }
    }

    /// Fires about `limit` of the open steps whose deadline the clock has passed (all of
    /// them with `usize::MAX`); true when more are due, to be fired by calling again
    /// before anything else reaches the engine. Firing a step changes only its own row
    /// and opens no step, so the steps due when a fire starts are exactly those its
    /// chunks fire, all at the same clock and in the same order: chunking changes when
    /// the caller sees the outcomes, not what they are.
    pub fn fire_some(&mut self, limit: usize, out: &mut Vec<Outcome>) -> bool {
        let clock = self.state.clock().now;
        if clock == Instant::MIN {
            return false;
        }
        self.due.clear();
        let more = self.state.due(clock, limit, &mut self.due);
        let mut fired = 0;
        if !self.due.is_empty() {
            self.due.sort();
            let due = std::mem::take(&mut self.due);
            let rules = Arc::clone(&self.rules);
            for d in &due {
                let Some(rule) = rules.rules.get(d.rule) else {
                    continue;
                };
                let cx = Cx {
                    rule_ix: d.rule,
                    rule,
                    key: &d.key,
                    clock,
                    lifecycle: self.lifecycle,
                };
                let mut row = self.state.take(d.rule, &d.key);
                if let Some(inst) = row.as_mut() {
                    let s = inst.steps.get(d.step).copied();
                    if s == Some(StepState {
                        status: StepStatus::Open,
                        at: d.deadline,
                    }) {
                        mark_missing(&cx, inst, d.step, out);
                        close_if_done(&cx, inst, out);
                        self.forget_early_if_closed(&cx, inst);
                        fired += 1;
                    }
                }
                self.state.put(d.rule, &d.key, row);
            }
            self.due = due;
        }
        // Each chunk that asks for another fires at least one step (open steps only ever
        // go down here), so a caller's loop ends whatever the state answers.
        let more = more && fired > 0;
        if !more {
            self.state.purge(clock);
        }
        more
    }

    /// Opens the pending steps of (rule, key) that the rules let open now: those without
    /// `after`, or whose `after` step is satisfied. Only an instance opened under other
    /// rules has such a step (a reload removed or changed its `after`): without this, it
    /// would wait for an opening that never comes, and never be reported. Its deadline is
    /// what the rules say (trigger time, or the satisfying correlate's time, plus
    /// `within`); one already past fires at the next move of the clock.
    pub fn open_waiting_steps(&mut self, rule_ix: usize, key: &str, out: &mut Vec<Outcome>) {
        let rules = Arc::clone(&self.rules);
        let Some(rule) = rules.rules.get(rule_ix) else {
            return;
        };
        let cx = Cx {
            rule_ix,
            rule,
            key,
            clock: self.state.clock().now,
            lifecycle: self.lifecycle,
        };
        let mut row = self.state.take(rule_ix, key);
        if let Some(inst) = row.as_mut().filter(|i| i.is_open()) {
            // One at a time: one satisfied at once (by an early correlate) opens its own
            // dependents, which are then no longer pending.
            while let Some((step, deadline)) = (0..rule.steps.len()).find_map(|i| {
                if inst.steps[i].status != StepStatus::Pending {
                    return None;
                }
                let from = match rule.steps[i].after {
                    None => inst.opened_at,
                    Some(a) if inst.steps[a].status == StepStatus::Satisfied => inst.steps[a].at,
                    Some(_) => return None,
                };
                Some((i, from.saturating_add(rule.steps[i].within.nanos())))
            }) {
                self.open_step(&cx, inst, step, deadline, out);
            }
            close_if_done(&cx, inst, out);
            self.forget_early_if_closed(&cx, inst);
        }
        self.state.put(rule_ix, key, row);
    }

    fn apply(
        &mut self,
        rule_ix: usize,
        rule: &Rule,
        ev: &Event<'_>,
        clock: Instant,
        out: &mut Vec<Outcome>,
    ) {
        let base = Cx {
            rule_ix,
            rule,
            key: "",
            clock,
            lifecycle: self.lifecycle,
        };
        for m in &rule.cancels {
            if let Some(key) = match_key(m, ev) {
                self.cancel(&Cx { key: &key, ..base }, ev.time, out);
                break;
            }
        }
        for (step, s) in rule.steps.iter().enumerate() {
            if let Some(key) = match_key(&s.matcher, ev) {
                self.correlate(&Cx { key: &key, ..base }, step, ev.time, out);
            }
        }
        if let Some(key) = match_key(&rule.trigger, ev) {
            self.trigger(&Cx { key: &key, ..base }, ev, out);
        }
    }

    fn cancel(&mut self, cx: &Cx<'_>, time: Instant, out: &mut Vec<Outcome>) {
        let mut row = self.state.take(cx.rule_ix, cx.key);
        match row.as_mut() {
            Some(inst) if inst.is_open() => {
                for s in inst.steps.iter_mut() {
                    if s.status == StepStatus::Open {
                        s.status = StepStatus::Cancelled;
                    }
                }
                close(cx, inst);
                self.forget_early_if_closed(cx, inst);
                if cx.lifecycle {
                    out.push(outcome(
                        cx,
                        Kind::Cancelled,
                        inst.opened_at,
                        None,
                        None,
                        Some(time),
                    ));
                }
                self.state.put(cx.rule_ix, cx.key, row);
            }
            _ => {
                self.state.put(cx.rule_ix, cx.key, row);
                let expires = time.saturating_add(cx.rule.max_within);
                if expires >= cx.clock {
                    let prev = self
                        .state
                        .cancel(cx.rule_ix, cx.key)
                        .unwrap_or(Instant::MIN);
                    if expires > prev {
                        self.state.put_cancel(cx.rule_ix, cx.key, expires);
                    }
                }
            }
        }
    }

    fn correlate(&mut self, cx: &Cx<'_>, step: usize, time: Instant, out: &mut Vec<Outcome>) {
        let mut row = self.state.take(cx.rule_ix, cx.key);
        let remember = match row.as_mut() {
            Some(inst) if inst.is_open() => {
                let s = inst.steps[step];
                match s.status {
                    StepStatus::Open if time <= s.at => {
                        self.satisfy(cx, inst, step, time, out);
                        close_if_done(cx, inst, out);
                        self.forget_early_if_closed(cx, inst);
                        false
                    }
                    StepStatus::Open => {
                        mark_missing(cx, inst, step, out);
                        report_late(cx, inst, step, time, out);
                        close_if_done(cx, inst, out);
                        self.forget_early_if_closed(cx, inst);
                        false
                    }
                    StepStatus::Missing => {
                        if cx.clock <= s.at.saturating_add(cx.rule.late.nanos()) {
                            report_late(cx, inst, step, time, out);
                        }
                        false
                    }
                    StepStatus::Pending => can_still_open(cx.rule, inst, step),
                    _ => false,
                }
            }
            Some(inst) => {
                let s = inst.steps[step];
                let closed_at = inst.closed_at.unwrap_or(Instant::MIN);
                if s.status == StepStatus::Missing
                    && cx.clock <= s.at.saturating_add(cx.rule.late.nanos())
                {
                    report_late(cx, inst, step, time, out);
                    inst.expires_at = expiry(cx.rule, inst);
                    false
                } else {
                    cx.clock > closed_at.saturating_add(cx.rule.dedup.nanos())
                }
            }
            None => true,
        };
        self.state.put(cx.rule_ix, cx.key, row);
        if remember {
            let expires = time.saturating_add(cx.rule.steps[step].within.nanos());
            let known = self
                .state
                .early(cx.rule_ix, cx.key, step)
                .is_some_and(|(_, e)| cx.clock <= e);
            if !known && cx.clock <= expires {
                self.state
                    .put_early(cx.rule_ix, cx.key, step, time, expires);
            }
        }
    }

    fn trigger(&mut self, cx: &Cx<'_>, ev: &Event<'_>, out: &mut Vec<Outcome>) {
        let row = self.state.take(cx.rule_ix, cx.key);
        let duplicate = match &row {
            Some(inst) => match inst.closed_at {
                None => true,
                Some(c) => cx.clock <= c.saturating_add(cx.rule.dedup.nanos()),
            },
            None => false,
        };
        let cancelled = || {
            self.state
                .cancel(cx.rule_ix, cx.key)
                .is_some_and(|e| cx.clock <= e)
        };
        if duplicate || cancelled() {
            self.state.put(cx.rule_ix, cx.key, row);
            return;
        }
        let captures = cx
            .rule
            .captures
            .iter()
            .map(|p| ev.field(*p).map(|f| f.to_text()).unwrap_or_default())
            .collect();
        let mut inst = Instance {
            opened_at: ev.time,
            closed_at: None,
            expires_at: 0,
            steps: Steps::pending(cx.rule.steps.len()),
            captures,
        };
        if cx.lifecycle {
            out.push(outcome(
                cx,
                Kind::Opened,
                ev.time,
                None,
                None,
                Some(ev.time),
            ));
        }
        for (i, s) in cx.rule.steps.iter().enumerate() {
            if s.after.is_none() {
                self.open_step(
                    cx,
                    &mut inst,
                    i,
                    ev.time.saturating_add(s.within.nanos()),
                    out,
                );
            }
        }
        close_if_done(cx, &mut inst, out);
        self.forget_early_if_closed(cx, &inst);
        self.state.put(cx.rule_ix, cx.key, Some(inst));
    }

    /// Once an instance has closed: forgets the early correlates remembered for the steps
    /// it closed without opening. They came while it was open, or before it opened, so
    /// they were its own: a later instance of the key (after `dedup`) must not take them.
    fn forget_early_if_closed(&mut self, cx: &Cx<'_>, inst: &Instance) {
        if inst.is_open() {
            return;
        }
        for (i, s) in inst.steps.iter().enumerate() {
            if s.status == StepStatus::Pending {
                self.state.remove_early(cx.rule_ix, cx.key, i);
            }
        }
    }

    /// Opens a step; a remembered early correlate within the new deadline satisfies it.
    /// One after the deadline has the outcome it would have had in time order: the step
    /// is missing and the correlate late (within the rule's `late` window).
    fn open_step(
        &mut self,
        cx: &Cx<'_>,
        inst: &mut Instance,
        step: usize,
        deadline: Instant,
        out: &mut Vec<Outcome>,
    ) {
        inst.steps[step] = StepState {
            status: StepStatus::Open,
            at: deadline,
        };
        if let Some((time, expires)) = self.state.early(cx.rule_ix, cx.key, step)
            && cx.clock <= expires
        {
            self.state.remove_early(cx.rule_ix, cx.key, step);
            if time <= deadline {
                self.satisfy(cx, inst, step, time, out);
            } else {
                mark_missing(cx, inst, step, out);
                if cx.clock <= deadline.saturating_add(cx.rule.late.nanos()) {
                    report_late(cx, inst, step, time, out);
                }
            }
        }
    }

    fn satisfy(
        &mut self,
        cx: &Cx<'_>,
        inst: &mut Instance,
        step: usize,
        time: Instant,
        out: &mut Vec<Outcome>,
    ) {
        let deadline = inst.steps[step].at;
        inst.steps[step] = StepState {
            status: StepStatus::Satisfied,
            at: time,
        };
        if cx.lifecycle {
            out.push(outcome(
                cx,
                Kind::Satisfied,
                inst.opened_at,
                Some(step),
                Some(deadline),
                Some(time),
            ));
        }
        for &d in &cx.rule.steps[step].dependents {
            // Always so but for an instance opened under rules whose step had no `after`
            // (a reload added it): a step settled already is not opened again.
            if inst.steps[d].status != StepStatus::Pending {
                continue;
            }
            let within = cx.rule.steps[d].within.nanos();
            self.open_step(cx, inst, d, time.saturating_add(within), out);
        }
    }
}

fn outcome(
    cx: &Cx<'_>,
    kind: Kind,
    opened_at: Instant,
    step: Option<usize>,
    deadline: Option<Instant>,
    time: Option<Instant>,
) -> Outcome {
    Outcome {
        kind,
        rule: cx.rule_ix,
        key: cx.key.to_string(),
        step,
        deadline,
        at: cx.clock,
        time,
        opened_at,
    }
}

/// Can a pending step still open: is some step up its `after` chain open?
fn can_still_open(rule: &Rule, inst: &Instance, step: usize) -> bool {
    let mut cur = rule.steps[step].after;
    while let Some(a) = cur {
        match inst.steps[a].status {
            StepStatus::Open => return true,
            StepStatus::Pending => cur = rule.steps[a].after,
            _ => return false,
        }
    }
    false
}

fn expiry(rule: &Rule, inst: &Instance) -> Instant {
    let mut e = inst
        .closed_at
        .unwrap_or(Instant::MIN)
        .saturating_add(rule.dedup.nanos());
    for s in inst.steps.iter() {
        if s.status == StepStatus::Missing {
            e = e.max(s.at.saturating_add(rule.late.nanos()));
        }
    }
    e
}

fn close(cx: &Cx<'_>, inst: &mut Instance) {
    inst.closed_at = Some(cx.clock);
    inst.expires_at = expiry(cx.rule, inst);
}

fn close_if_done(cx: &Cx<'_>, inst: &mut Instance, out: &mut Vec<Outcome>) {
    if inst.is_open() && !inst.steps.iter().any(|s| s.status == StepStatus::Open) {
        close(cx, inst);
        if cx.lifecycle {
            out.push(outcome(cx, Kind::Closed, inst.opened_at, None, None, None));
        }
    }
}

fn report_late(
    cx: &Cx<'_>,
    inst: &mut Instance,
    step: usize,
    time: Instant,
    out: &mut Vec<Outcome>,
) {
    let deadline = inst.steps[step].at;
    inst.steps[step].status = StepStatus::Late;
    out.push(outcome(
        cx,
        Kind::Late,
        inst.opened_at,
        Some(step),
        Some(deadline),
        Some(time),
    ));
}

/// Marks a step missing and runs its actions (its own, else the rule's).
fn mark_missing(cx: &Cx<'_>, inst: &mut Instance, step: usize, out: &mut Vec<Outcome>) {
    let deadline = inst.steps[step].at;
    inst.steps[step].status = StepStatus::Missing;
    out.push(outcome(
        cx,
        Kind::Missing,
        inst.opened_at,
        Some(step),
        Some(deadline),
        None,
    ));
    let s = &cx.rule.steps[step];
    let deadline_text = format_rfc3339(deadline);
    let vars = Vars {
        key: cx.key,
        rule: &cx.rule.name,
        step: &s.name,
        within: s.within.as_str(),
        deadline: &deadline_text,
        captures: &inst.captures,
    };
    for (i, action) in cx.rule.actions_for(step).iter().enumerate() {
        let id = |rendered: &[&str]| {
            action_id(
                &cx.rule.name,
                cx.key,
                inst.opened_at,
                &s.name,
                &i.to_string(),
                rendered,
            )
        };
        let kind = match action {
            Action::Alert(a) => {
                let mut labels: Vec<(String, String)> = cx
                    .rule
                    .labels
                    .iter()
                    .map(|(k, t)| (k.clone(), t.render(&vars)))
                    .collect();
                for (k, t) in &a.labels {
                    labels.retain(|(l, _)| l != k);
                    labels.push((k.clone(), t.render(&vars)));
                }
                // A template that renders empty (an absent trigger field) falls back to
                // the default, as an unset severity does.
                let severity = Some(a.severity.render(&vars))
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "warning".into());
                let summary = a.summary.render(&vars);
                let description = a.description.as_ref().map(|d| d.render(&vars));
                let mut rendered = vec![
                    deadline_text.as_str(),
                    severity.as_str(),
                    summary.as_str(),
                    description.as_deref().unwrap_or("\0"),
                ];
                for (k, v) in &labels {
                    rendered.extend([k.as_str(), v.as_str()]);
                }
                Kind::Alert(Alert {
                    id: id(&rendered),
                    severity,
                    summary,
                    description,
                    labels,
                    sinks: a.sinks.clone(),
                })
            }
            Action::Compensate(c) => {
                let payload = c.payload.render(&vars);
                Kind::Compensate(Compensation {
                    id: id(&[&deadline_text, &c.sink, &payload.to_string()]),
                    sink: c.sink.clone(),
                    payload,
                })
            }
        };
        out.push(outcome(
            cx,
            kind,
            inst.opened_at,
            Some(step),
            Some(deadline),
            None,
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Decoder;

    /// A reload that gives a step an `after` does not open it again once its new
    /// predecessor is satisfied, if the instance (opened under the old rules) settled it.
    #[test]
    fn a_step_settled_before_a_reload_gave_it_an_after_is_not_opened_again() {
        let load = |after: &str| {
            Arc::new(
                crate::rules::load_sources(&[(
                    "r.yaml".into(),
                    format!(
                        "rules:\n  - name: r\n    trigger: {{ where: {{ type: T }}, key: id }}\n    expect:\n      \
                         - {{ step: a, where: {{ type: A }}, key: id, within: 1h }}\n      \
                         - {{ step: b, where: {{ type: B }}, key: id, within: 1h{after} }}\n"
                    ),
                )])
                .unwrap(),
            )
        };
        let v1 = load("");
        let d = Decoder::new(&v1, "time");
        let mut e = Engine::new(Arc::clone(&v1), MemoryState::new(), 0);
        let mut out = Vec::new();
        let mut apply = |e: &mut Engine<MemoryState>, time: &str, kind: &str| {
            let line = format!(r#"{{"time":"2026-01-01T{time}:00Z","type":"{kind}","id":"k"}}"#);
            e.process(&d.decode(line.as_bytes(), None).unwrap(), &mut out);
        };
        apply(&mut e, "00:00", "T");
        apply(&mut e, "00:01", "B");
        e.set_rules(load(", after: a"));
        apply(&mut e, "00:02", "A");
        apply(&mut e, "05:00", "Z");
        assert!(
            out.iter().all(|o| !matches!(o.kind, Kind::Missing)),
            "{out:?}"
        );
    }

    /// After a reload changes a step's `after` to a step already satisfied, the waiting
    /// step opens from that step's correlate; a correlate remembered as early for it
    /// satisfies it at once.
    #[test]
    fn waiting_steps_open_when_a_reload_lets_them() {
        let load = |after: &str| {
            Arc::new(
                crate::rules::load_sources(&[(
                    "r.yaml".into(),
                    format!(
                        "rules:\n  - name: r\n    trigger: {{ where: {{ type: T }}, key: id }}\n    expect:\n      \
                         - {{ step: a, where: {{ type: A }}, key: id, within: 1h }}\n      \
                         - {{ step: c, where: {{ type: C }}, key: id, within: 1h }}\n      \
                         - {{ step: b, where: {{ type: B }}, key: id, within: 10m, after: {after} }}\n"
                    ),
                )])
                .unwrap(),
            )
        };
        let v1 = load("a");
        let d = Decoder::new(&v1, "time");
        let mut e = Engine::new(Arc::clone(&v1), MemoryState::new(), 0).with_lifecycle(true);
        let mut out = Vec::new();
        let apply = |e: &mut Engine<MemoryState>,
                     time: &str,
                     kind: &str,
                     id: &str,
                     out: &mut Vec<Outcome>| {
            let line = format!(r#"{{"time":"2026-01-01T{time}:00Z","type":"{kind}","id":"{id}"}}"#);
            e.process(&d.decode(line.as_bytes(), None).unwrap(), out);
        };
        apply(&mut e, "00:00", "T", "x", &mut out);
        apply(&mut e, "00:00", "T", "y", &mut out);
        apply(&mut e, "00:01", "C", "x", &mut out);
        apply(&mut e, "00:01", "C", "y", &mut out);
        apply(&mut e, "00:02", "B", "y", &mut out);
        e.set_rules(load("c"));
        out.clear();
        e.open_waiting_steps(0, "x", &mut out);
        e.open_waiting_steps(0, "y", &mut out);
        // y's early B satisfied it; x's b waits until 00:11 (C at 00:01 plus 10m).
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(
            matches!(out[0].kind, Kind::Satisfied) && out[0].key == "y",
            "{out:?}"
        );
        out.clear();
        apply(&mut e, "00:12", "Z", "z", &mut out);
        let missing: Vec<_> = out
            .iter()
            .filter(|o| matches!(o.kind, Kind::Missing))
            .map(|o| (o.key.as_str(), o.deadline.map(crate::time::format_rfc3339)))
            .collect();
        assert_eq!(missing, [("x", Some("2026-01-01T00:11:00Z".to_string()))]);
    }

    /// An early correlate remembered for a step its instance never opened (its `after`
    /// step went missing, or a cancel came) was that instance's: a later instance of the
    /// key, opened after `dedup`, does not take it, whichever way the first one closed.
    #[test]
    fn an_instance_closed_before_its_step_opened_takes_its_early_correlate_along() {
        let rules = Arc::new(
            crate::rules::load_sources(&[(
                "r.yaml".into(),
                "rules:\n  - name: r\n    trigger: { where: { type: T }, key: id }\n    expect:\n      \
                 - { step: a, where: { type: A }, key: id, within: 15m }\n      \
                 - { step: b, where: { type: B }, key: id, within: 48h, after: a }\n    \
                 cancel: [{ where: { type: X }, key: id }]\n    dedup: 1h\n"
                    .to_string(),
            )])
            .unwrap(),
        );
        let d = Decoder::new(&rules, "time");
        let mut e = Engine::new(Arc::clone(&rules), MemoryState::new(), 0);
        let mut out = Vec::new();
        let mut apply = |day: u8, time: &str, kind: &str, id: &str| {
            let line =
                format!(r#"{{"time":"2026-01-0{day}T{time}:00Z","type":"{kind}","id":"{id}"}}"#);
            e.process(&d.decode(line.as_bytes(), None).unwrap(), &mut out);
        };
        // c: cancelled; m: B before its trigger, a missing; f: a missing (a fired deadline).
        for (t, kind, id) in [
            ("00:00", "T", "c"),
            ("00:05", "B", "c"),
            ("00:06", "X", "c"),
            ("00:00", "B", "m"),
            ("00:01", "T", "m"),
            ("00:02", "T", "f"),
            ("00:05", "B", "f"),
            ("03:00", "Z", "z"),
        ] {
            apply(1, t, kind, id);
        }
        for id in ["c", "m", "f"] {
            apply(2, "01:00", "T", id);
            apply(2, "01:01", "A", id);
        }
        apply(5, "00:00", "Z", "z");
        let mut missing: Vec<_> = out
            .iter()
            .filter(|o| matches!(o.kind, Kind::Missing))
            .map(|o| {
                (
                    o.key.as_str(),
                    o.step,
                    crate::time::format_rfc3339(o.opened_at),
                )
            })
            .filter(|m| m.2.starts_with("2026-01-02"))
            .map(|(k, s, _)| (k, s))
            .collect();
        missing.sort();
        assert_eq!(
            missing,
            [("c", Some(1)), ("f", Some(1)), ("m", Some(1))],
            "{out:?}"
        );
    }

    /// Event times so early that they less `lateness` fall below the range: the clock
    /// stays at the earliest valid time (not at `MIN`, "no clock", which in a closed
    /// instance means "open": it took every later trigger for a duplicate, and overflowed
    /// the open count), so instances close, dedup expires and steps fire as usual.
    #[test]
    fn a_clock_held_back_below_the_range_still_works() {
        let rules = Arc::new(
            crate::rules::load_sources(&[(
                "r.yaml".into(),
                "rules:\n  - name: r\n    trigger: { where: { type: T }, key: id }\n    \
                 expect: [{ step: a, where: { type: A }, key: id, within: 1m }]\n    dedup: 1s\n"
                    .into(),
            )])
            .unwrap(),
        );
        let d = Decoder::new(&rules, "time");
        let hour = 3_600_000_000_000;
        let mut e = Engine::new(Arc::clone(&rules), MemoryState::new(), hour);
        let mut out = Vec::new();
        for (time, kind) in [
            ("00:20", "A"),
            ("00:20", "T"),
            ("00:30", "T"),
            ("02:30", "T"),
            ("05:30", "X"),
        ] {
            let line = format!(r#"{{"time":"1677-09-21T{time}:00Z","type":"{kind}","id":"k"}}"#);
            e.process(&d.decode(line.as_bytes(), None).unwrap(), &mut out);
        }
        e.finish(&mut out);
        let missing: Vec<_> = out
            .iter()
            .filter(|o| matches!(o.kind, Kind::Missing))
            .map(|o| crate::time::format_rfc3339(o.opened_at))
            .collect();
        // 00:30 is within `dedup` of the close: the clock is still at the earliest time.
        assert_eq!(missing, ["1677-09-21T02:30:00Z"], "{out:?}");
    }

    #[test]
    fn events_past_the_ceiling_are_applied_but_do_not_move_the_clock() {
        let rules = Arc::new(
            crate::rules::load_sources(&[(
                "r.yaml".into(),
                "rules:\n  - name: pay\n    trigger: { where: { type: Placed }, key: id }\n    \
                 expect: [{ step: paid, where: { type: Paid }, key: id, within: 10m }]\n"
                    .into(),
            )])
            .unwrap(),
        );
        let d = Decoder::new(&rules, "time");
        let mut e = Engine::new(Arc::clone(&rules), MemoryState::new(), 0).with_lifecycle(true);
        let mut out = Vec::new();
        let apply = |e: &mut Engine<MemoryState>, line: &str, out: &mut Vec<Outcome>| {
            let ev = d.decode(line.as_bytes(), None).unwrap();
            e.process(&ev, out);
        };
        let at = |t: &str| crate::time::parse_rfc3339(t).unwrap();
        apply(
            &mut e,
            r#"{"time":"2026-01-01T00:00:00Z","type":"Placed","id":"a"}"#,
            &mut out,
        );
        e.set_ceiling(Some(at("2026-01-01T00:05:00Z")));
        // Years ahead: it opens its own instance, and the clock stays.
        apply(
            &mut e,
            r#"{"time":"2099-01-01T00:00:00Z","type":"Placed","id":"b"}"#,
            &mut out,
        );
        assert_eq!(e.clock(), at("2026-01-01T00:00:00Z"));
        assert_eq!(e.ceiling(), Some(at("2026-01-01T00:05:00Z")));
        let kinds: Vec<_> = out
            .iter()
            .map(|o| (o.kind.name(), o.key.as_str()))
            .collect();
        assert_eq!(kinds, [("opened", "a"), ("opened", "b")]);
        // Up to the ceiling, times move the clock as ever; a's payment is on time.
        apply(
            &mut e,
            r#"{"time":"2026-01-01T00:05:00Z","type":"Paid","id":"a"}"#,
            &mut out,
        );
        assert_eq!(e.clock(), at("2026-01-01T00:05:00Z"));
        assert_eq!(out[2].kind, Kind::Satisfied);
        e.set_ceiling(None);
        apply(
            &mut e,
            r#"{"time":"2099-01-01T00:00:00Z","type":"Other","id":"c"}"#,
            &mut out,
        );
        assert_eq!(e.clock(), at("2099-01-01T00:00:00Z"));
    }
}
