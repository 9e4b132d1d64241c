//! The rules file as written (a file is `rules:` and a list of these): serde types that mirror the YAML one to one. Their doc
//! comments are the reference for the rules language; `validate` turns them into the
//! checked model in `model.rs`.

use std::collections::BTreeMap;

use serde::Deserialize;

/// One rule: a trigger that opens an instance per correlation key, the steps expected to
/// follow it, and what to do when one goes missing.
#[derive(Debug, Deserialize)]
pub struct RawRule {
    /// Unique name, `[a-z0-9][a-z0-9_-]*`. Appears in every outcome and metric.
    pub name: String,
    /// Free text for operators; shown in `validate` and the timeline.
    #[serde(default)]
    pub description: Option<String>,
    /// The "done A" event that opens an instance of the rule for its key.
    pub trigger: RawMatcher,
    /// The "done B" correlates that must follow, in order of declaration.
    pub expect: Vec<RawStep>,
    /// Events that end an instance quietly (no outcome), e.g. `OrderCancelled`.
    #[serde(default)]
    pub cancel: Vec<RawMatcher>,
    /// Actions run when a step goes missing, unless the step has its own `on_missing`.
    #[serde(default)]
    pub on_missing: Vec<RawAction>,
    /// How long a finished key is remembered, so a repeated trigger opens nothing.
    /// Default `24h`.
    #[serde(default)]
    pub dedup: Option<String>,
    /// How long after a missed deadline a correlate is still reported as `late`: while the
    /// clock (which `lateness` holds back) is at most deadline + late.
    /// Default `24h`.
    #[serde(default)]
    pub late: Option<String>,
    /// Extra labels attached to this rule's alerts (Alertmanager labels; templates allowed,
    /// keep them bounded: never `{{key}}`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Which events a trigger or cancel matches, and where their correlation key is.
#[derive(Debug, Deserialize)]
pub struct RawMatcher {
    /// Only events from this named source (a replay input or a daemon source).
    #[serde(default)]
    pub source: Option<String>,
    /// Dot path → value; every path must exist in the event and equal the value
    /// (JSON types must agree; numbers compare numerically).
    #[serde(default, rename = "where")]
    pub where_: BTreeMap<String, serde_json::Value>,
    /// Dot path to the correlation key: a non-empty string or an integer.
    pub key: String,
}

/// One expected correlate.
#[derive(Debug, Deserialize)]
pub struct RawStep {
    /// Step name, `[a-z0-9][a-z0-9_-]*`, unique within the rule.
    pub step: String,
    /// Only events from this named source.
    #[serde(default)]
    pub source: Option<String>,
    /// Dot path → value conditions, as for the trigger.
    #[serde(default, rename = "where")]
    pub where_: BTreeMap<String, serde_json::Value>,
    /// Dot path to the correlation key in the correlate.
    pub key: String,
    /// The window: deadline = trigger time + within, or, with `after`, the time of the
    /// correlate that satisfied that step + within.
    pub within: String,
    /// Name of a step of the same rule; this step opens only when that one is satisfied.
    #[serde(default)]
    pub after: Option<String>,
    /// Actions for this step; they replace the rule's `on_missing`.
    #[serde(default)]
    pub on_missing: Option<Vec<RawAction>>,
}

/// What to do when a step goes missing.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawAction {
    /// Raise an alert.
    Alert(RawAlert),
    /// Emit a compensation payload to a sink.
    Compensate(RawCompensate),
}

/// An alert. Texts may use templates: `{{key}}`, `{{rule}}`, `{{step}}`, `{{within}}`,
/// `{{deadline}}`, `{{trigger.PATH}}`.
#[derive(Debug, Deserialize)]
pub struct RawAlert {
    /// Severity label, default `warning`.
    #[serde(default)]
    pub severity: Option<String>,
    /// One-line summary.
    pub summary: String,
    /// Longer description.
    #[serde(default)]
    pub description: Option<String>,
    /// Extra labels (templates allowed; keep them bounded: never `{{key}}`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Sink names to send this alert to, each once; left out: the daemon's default alert
    /// sinks (an empty list is refused).
    #[serde(default)]
    pub sinks: Option<Vec<String>>,
}

/// A compensation trigger: a JSON payload sent to a named sink, with an idempotency id
/// stable per (rule, key, instance, step, action).
#[derive(Debug, Deserialize)]
pub struct RawCompensate {
    /// Name of the sink that takes the payload.
    pub sink: String,
    /// Any JSON value; every string in it is a template.
    pub payload: serde_json::Value,
}
