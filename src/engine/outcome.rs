//! What the engine decides, as data: lifecycle events of instances, and the `missing` and
//! `late` reports with the alert and compensation actions they trigger.

use crate::time::Instant;

/// One decision of the engine.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub kind: Kind,
    /// Index of the rule in the rule set.
    pub rule: usize,
    pub key: String,
    /// The step concerned, for step outcomes and actions.
    pub step: Option<usize>,
    /// The step's deadline, for step outcomes and actions.
    pub deadline: Option<Instant>,
    /// Engine clock when the decision was made.
    pub at: Instant,
    /// Event time of the event that caused it (trigger, correlate, cancel), if any.
    pub time: Option<Instant>,
    /// Trigger time of the instance.
    pub opened_at: Instant,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Kind {
    /// A trigger opened an instance (lifecycle; emitted only when asked for).
    Opened,
    /// A correlate satisfied a step (lifecycle).
    Satisfied,
    /// An instance finished: no step open or able to open (lifecycle).
    Closed,
    /// A cancel ended an instance (lifecycle).
    Cancelled,
    /// A step's deadline passed without its correlate.
    Missing,
    /// A correlate for a missing step arrived.
    Late,
    Alert(Alert),
    Compensate(Compensation),
}

impl Kind {
    /// Every name [`Kind::name`] returns.
    pub const NAMES: [&'static str; 8] = [
        "opened",
        "satisfied",
        "closed",
        "cancelled",
        "missing",
        "late",
        "alert",
        "compensate",
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Kind::Opened => "opened",
            Kind::Satisfied => "satisfied",
            Kind::Closed => "closed",
            Kind::Cancelled => "cancelled",
            Kind::Missing => "missing",
            Kind::Late => "late",
            Kind::Alert(_) => "alert",
            Kind::Compensate(_) => "compensate",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Alert {
    /// Stable per (rule, key, instance, step, action).
    pub id: String,
    pub severity: String,
    pub summary: String,
    pub description: Option<String>,
    pub labels: Vec<(String, String)>,
    pub sinks: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Compensation {
    /// Idempotency id, stable per (rule, key, instance, step, action).
    pub id: String,
    pub sink: String,
    pub payload: serde_json::Value,
}
