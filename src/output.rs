//! Outcomes as JSON lines: the stable, documented shape printed by `replay` and `test` and
//! sent to the `stdout` sink.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::engine::{Kind, Outcome};
use crate::rules::RuleSet;
use crate::time::format_rfc3339;

/// The names of [`Line`]'s fields: what a rule test may expect.
pub const FIELDS: [&str; 17] = [
    "outcome",
    "rule",
    "step",
    "key",
    "deadline",
    "within",
    "time",
    "at",
    "opened_at",
    "id",
    "severity",
    "summary",
    "description",
    "labels",
    "sinks",
    "sink",
    "payload",
];

/// One outcome line. Fields are in a fixed order: outcome, rule, step, key, deadline, then
/// the rest.
#[derive(Serialize)]
pub struct Line<'a> {
    pub outcome: &'static str,
    pub rule: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<&'a str>,
    pub key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deadline: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub within: Option<&'a str>,
    /// Event time of the event that caused the outcome (late correlate, trigger, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// Engine clock when it was decided.
    pub at: String,
    /// Trigger time of the instance.
    pub opened_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub severity: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<&'a str, &'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sinks: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sink: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<&'a serde_json::Value>,
}

impl<'a> Line<'a> {
    pub fn new(rules: &'a RuleSet, o: &'a Outcome) -> Line<'a> {
        let rule = &rules.rules[o.rule];
        let step = o.step.map(|s| &rule.steps[s]);
        let mut line = Line {
            outcome: o.kind.name(),
            rule: &rule.name,
            step: step.map(|s| s.name.as_str()),
            key: &o.key,
            deadline: o.deadline.map(format_rfc3339),
            within: step.map(|s| s.within.as_str()),
            time: o.time.map(format_rfc3339),
            at: format_rfc3339(o.at),
            opened_at: format_rfc3339(o.opened_at),
            id: None,
            severity: None,
            summary: None,
            description: None,
            labels: None,
            sinks: None,
            sink: None,
            payload: None,
        };
        match &o.kind {
            Kind::Alert(a) => {
                line.id = Some(&a.id);
                line.severity = Some(&a.severity);
                line.summary = Some(&a.summary);
                line.description = a.description.as_deref();
                line.labels = Some(
                    a.labels
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect(),
                );
                if !a.sinks.is_empty() {
                    line.sinks = Some(&a.sinks);
                }
            }
            Kind::Compensate(c) => {
                line.id = Some(&c.id);
                line.sink = Some(&c.sink);
                line.payload = Some(&c.payload);
            }
            _ => {}
        }
        line
    }
}

/// An outcome line held as a JSON value (whose object keys are sorted), as text with its
/// fields in [`Line`]'s order again; fields `Line` lacks (a resolve's `resolved_by`) last.
pub fn line_text(v: &serde_json::Value) -> String {
    let Some(m) = v.as_object() else {
        return v.to_string();
    };
    let known = FIELDS.iter().filter_map(|f| m.get_key_value(*f));
    let rest = m.iter().filter(|(k, _)| !FIELDS.contains(&k.as_str()));
    let mut out = String::from("{");
    for (i, (k, val)) in known.chain(rest).enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&serde_json::Value::String(k.clone()).to_string());
        out.push(':');
        out.push_str(&val.to_string());
    }
    out.push('}');
    out
}

/// The outcome as a JSON value (for comparisons in `test`).
pub fn to_json(rules: &RuleSet, o: &Outcome) -> serde_json::Value {
    serde_json::to_value(Line::new(rules, o)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_name_every_field_of_a_line() {
        let payload = serde_json::json!({});
        let sinks = vec!["s".to_string()];
        let line = Line {
            outcome: "alert",
            rule: "r",
            step: Some("s"),
            key: "k",
            deadline: Some(String::new()),
            within: Some("1m"),
            time: Some(String::new()),
            at: String::new(),
            opened_at: String::new(),
            id: Some("i"),
            severity: Some("warning"),
            summary: Some(""),
            description: Some(""),
            labels: Some(BTreeMap::new()),
            sinks: Some(&sinks),
            sink: Some("s"),
            payload: Some(&payload),
        };
        let text = serde_json::to_string(&line).unwrap();
        let v = serde_json::to_value(line).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let mut want = FIELDS.to_vec();
        want.sort_unstable();
        assert_eq!(keys, want);
        // FIELDS is also the order lines are printed in, held as values or not.
        assert_eq!(line_text(&v), text);
        let mut v = v;
        v["resolved_by"] = "t".into();
        assert!(line_text(&v).ends_with(r#","resolved_by":"t"}"#));
    }
}
