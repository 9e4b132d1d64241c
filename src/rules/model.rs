//! The validated rules model the engine runs on: names resolved to indices, durations in
//! nanoseconds, templates parsed, every dot path interned so events are decoded once.

use std::path::PathBuf;

use crate::rules::template::{PayloadTemplate, Template};
use crate::time::Duration;

/// Index of an interned dot path in [`RuleSet::paths`].
pub type PathId = usize;

/// A loaded, validated set of rules.
#[derive(Clone, Debug)]
pub struct RuleSet {
    pub rules: Vec<Rule>,
    /// Every dot path any rule reads, split into segments; events are decoded into exactly
    /// these fields.
    pub paths: Vec<Vec<String>>,
}

#[derive(Clone, Debug)]
pub struct Rule {
    pub name: String,
    pub description: String,
    /// The file the rule came from, for messages.
    pub file: PathBuf,
    pub trigger: Matcher,
    pub steps: Vec<Step>,
    pub cancels: Vec<Matcher>,
    pub on_missing: Vec<Action>,
    pub dedup: Duration,
    pub late: Duration,
    /// The longest `within` of any step: how long an early cancel is remembered.
    pub max_within: i64,
    /// Trigger fields used by `{{trigger.PATH}}` templates; captured when an instance opens.
    pub captures: Vec<PathId>,
    /// Labels on every alert of the rule (an alert's own labels win).
    pub labels: Vec<(String, Template)>,
}

impl Rule {
    /// The actions to run when `step` goes missing.
    pub fn actions_for(&self, step: usize) -> &[Action] {
        self.steps[step]
            .on_missing
            .as_deref()
            .unwrap_or(&self.on_missing)
    }
}

/// Selects events and names where their correlation key is.
#[derive(Clone, Debug)]
pub struct Matcher {
    pub source: Option<String>,
    /// Every path must exist and equal the value.
    pub conds: Vec<(PathId, serde_json::Value)>,
    pub key: PathId,
}

#[derive(Clone, Debug)]
pub struct Step {
    pub name: String,
    pub matcher: Matcher,
    pub within: Duration,
    /// The step that must be satisfied before this one opens.
    pub after: Option<usize>,
    /// Steps whose `after` is this one, opened when this one is satisfied.
    pub dependents: Vec<usize>,
    /// This step's own actions; `None` means the rule's.
    pub on_missing: Option<Vec<Action>>,
}

#[derive(Clone, Debug)]
pub enum Action {
    Alert(AlertAction),
    Compensate(CompensateAction),
}

#[derive(Clone, Debug)]
pub struct AlertAction {
    pub severity: Template,
    pub summary: Template,
    pub description: Option<Template>,
    pub labels: Vec<(String, Template)>,
    /// Sink names; empty means the daemon's default alert sinks.
    pub sinks: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct CompensateAction {
    pub sink: String,
    pub payload: PayloadTemplate,
}
