//! `sagawatch test`: rule unit tests in YAML, in the spirit of `promtool test rules`.
//! Each test feeds events (absolute times or offsets like `+5m` from `start`) through the
//! rules and compares the outcomes, in order, with the expected ones.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::engine::{Engine, MemoryState};
use crate::event::{Decoder, json_eq};
use crate::output;
use crate::rules::{self, RuleSet};
use crate::time::{Duration, Instant, format_rfc3339, parse_rfc3339};
use crate::yaml::{self, YamlPath};

/// A test file.
#[derive(Debug, Deserialize)]
pub struct RawTestFile {
    /// The rules under test: a file or directory relative to this test file, or a list
    /// of rules written inline.
    pub rules: serde_json::Value,
    /// Default `lateness` for the tests in this file (default 0s).
    #[serde(default)]
    pub lateness: Option<String>,
    /// Dot path of the event time (default `time`).
    #[serde(default)]
    pub time_field: Option<String>,
    pub tests: Vec<RawTest>,
}

/// One test case.
#[derive(Debug, Deserialize)]
pub struct RawTest {
    pub name: String,
    /// Base for `+offset` times (RFC 3339). Default 2000-01-01T00:00:00Z.
    #[serde(default)]
    pub start: Option<String>,
    #[serde(default)]
    pub lateness: Option<String>,
    pub events: Vec<RawTestEvent>,
    /// Every expected outcome, in order. Each entry lists the fields to compare;
    /// time fields accept `+offset`.
    #[serde(default)]
    pub expect: Vec<BTreeMap<String, serde_json::Value>>,
    /// Also expect lifecycle outcomes (opened, satisfied, closed, cancelled).
    #[serde(default)]
    pub lifecycle: bool,
}

#[derive(Debug, Deserialize)]
pub struct RawTestEvent {
    /// Event time: `+5m` from the test's start, or RFC 3339. Written into the time field.
    #[serde(default)]
    pub at: Option<String>,
    /// Source name the event comes from.
    #[serde(default)]
    pub source: Option<String>,
    /// The event itself.
    pub event: serde_json::Value,
}

const TIME_FIELDS: [&str; 4] = ["deadline", "time", "at", "opened_at"];
/// The outcome kinds: those always reported, then the lifecycle ones.
const OUTCOMES: [&str; 8] = [
    "missing",
    "late",
    "alert",
    "compensate",
    "opened",
    "satisfied",
    "closed",
    "cancelled",
];
const DEFAULT_START: &str = "2000-01-01T00:00:00Z";

/// Result of one test.
pub struct TestResult {
    pub file: PathBuf,
    pub name: String,
    /// `None` passed; otherwise the report.
    pub failure: Option<String>,
}

/// The test files of a path: the file, or every `*.yaml`/`*.yml` below a directory.
pub fn test_files(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    // Linked directories are walked, each directory once: a link to `.` makes no loop.
    let mut seen = std::collections::HashSet::new();
    while let Some(dir) = stack.pop() {
        if !seen.insert(std::fs::canonicalize(&dir).unwrap_or_else(|_| dir.clone())) {
            continue;
        }
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", dir.display()))?;
        for e in entries {
            let p = e?.path();
            // Hidden files and directories are left out, as in a rules directory.
            if crate::rules::hidden(&p) {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                out.push(p);
            }
        }
    }
    out.sort();
    if out.is_empty() {
        anyhow::bail!("{}: no test files (*.yaml, *.yml)", path.display());
    }
    Ok(out)
}

fn resolve_time(text: &str, start: Instant) -> Result<Instant, String> {
    if let Some(off) = text.strip_prefix('+') {
        return Duration::parse_span(off).and_then(|d| {
            start
                .checked_add(d)
                .ok_or_else(|| format!("{text:?} from the start is beyond 2262"))
        });
    }
    parse_rfc3339(text).ok_or_else(|| format!("{text:?} is neither +offset nor RFC 3339"))
}

fn set_path(v: &mut serde_json::Value, path: &[&str], value: serde_json::Value) {
    let Some((head, rest)) = path.split_first() else {
        *v = value;
        return;
    };
    if !v.is_object() {
        *v = serde_json::Value::Object(Default::default());
    }
    let obj = v.as_object_mut().expect("made an object");
    let slot = obj
        .entry(head.to_string())
        .or_insert(serde_json::Value::Null);
    set_path(slot, rest, value);
}

/// Runs every test of one file. Problems with the file itself are an `Err`.
pub fn run_file(file: &Path) -> Result<Vec<TestResult>, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("{}: cannot read: {e}", file.display()))?;
    let mut diags = Vec::new();
    let fmt_diags = |diags: &[yaml::Diag]| {
        diags
            .iter()
            .map(|d| {
                rules::FileDiag {
                    file: file.to_path_buf(),
                    diag: d.clone(),
                }
                .to_string()
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let node = yaml::parse(&text, &mut diags).map_err(|d| fmt_diags(&[d]))?;
    let raw: Option<RawTestFile> = yaml::from_node(&node, &YamlPath::default(), &mut diags);
    let raw = match raw {
        Some(r) if diags.is_empty() => r,
        _ => return Err(fmt_diags(&diags)),
    };
    let rules = match (&raw.rules, node.get("rules")) {
        (serde_json::Value::String(p), _) => {
            let rules_path = file.parent().unwrap_or(Path::new(".")).join(p);
            rules::load(&rules_path).map_err(|e| e.to_string())?
        }
        (serde_json::Value::Array(_), Some(inline)) => {
            rules::load_node(file, inline).map_err(|e| e.to_string())?
        }
        _ => {
            return Err(format!(
                "{}: rules: expected a path or a list of rules",
                file.display()
            ));
        }
    };
    let rules = Arc::new(rules);
    let time_field = raw.time_field.clone().unwrap_or_else(|| "time".into());
    let mut results = Vec::new();
    // A problem of a test is reported where it is written.
    let at = |path: &YamlPath, message: String| {
        rules::FileDiag {
            file: file.to_path_buf(),
            diag: yaml::Diag {
                pos: node.locate(path),
                path: path.to_string(),
                message,
            },
        }
        .to_string()
    };
    if raw.tests.is_empty() {
        // A file that tests nothing passes nothing: say so rather than count it as fine.
        return Err(at(&YamlPath::default().key("tests"), "no tests".into()));
    }
    if let Err(e) = rules::split_path(&time_field) {
        return Err(at(&YamlPath::default().key("time_field"), e.to_string()));
    }
    for (k, t) in raw.tests.iter().enumerate() {
        let tp = YamlPath::default().key("tests").index(k);
        let text =
            |p: &dyn Fn(&YamlPath) -> YamlPath| node.scalar_text(&p(&tp)).map(str::to_string);
        let failure = run_one(&rules, &raw, t, &time_field, &|p, m| at(&p(&tp), m), &text).err();
        results.push(TestResult {
            file: file.to_path_buf(),
            name: t.name.clone(),
            failure,
        });
    }
    Ok(results)
}

/// Where a problem is: a path below the test, and the message; gives the located text.
type At<'a> = &'a dyn Fn(&dyn Fn(&YamlPath) -> YamlPath, String) -> String;
/// The source text of a number or boolean at a path below the test.
type TextAt<'a> = &'a dyn Fn(&dyn Fn(&YamlPath) -> YamlPath) -> Option<String>;

fn run_one(
    rules: &Arc<RuleSet>,
    file: &RawTestFile,
    t: &RawTest,
    time_field: &str,
    at: At<'_>,
    text_at: TextAt<'_>,
) -> Result<(), String> {
    let start_text = t.start.as_deref().unwrap_or(DEFAULT_START);
    let start = parse_rfc3339(start_text).ok_or_else(|| {
        at(
            &|tp| tp.key("start"),
            format!("{start_text:?} is not an RFC 3339 time"),
        )
    })?;
    let lateness = match (t.lateness.as_deref(), file.lateness.as_deref()) {
        (None, None) => 0,
        (Some(l), _) => Duration::parse_span(l).map_err(|e| at(&|tp| tp.key("lateness"), e))?,
        (None, Some(l)) => {
            Duration::parse_span(l).map_err(|e| at(&|_| YamlPath::default().key("lateness"), e))?
        }
    };
    let decoder = Decoder::new(rules, time_field);
    let mut engine =
        Engine::new(Arc::clone(rules), MemoryState::new(), lateness).with_lifecycle(t.lifecycle);
    let mut outcomes = Vec::new();
    let path: Vec<&str> = time_field.split('.').collect();
    for (i, e) in t.events.iter().enumerate() {
        let here = |k: &'static str| move |tp: &YamlPath| tp.key("events").index(i).key(k);
        if !e.event.is_object() {
            return Err(at(
                &here("event"),
                "an event is a mapping (a JSON object)".into(),
            ));
        }
        if let Some(s) = e.source.as_deref().filter(|s| !rules::valid_name(s)) {
            return Err(at(
                &here("source"),
                format!("invalid source name {s:?}: use [a-z0-9][a-z0-9_-]*"),
            ));
        }
        let mut ev = e.event.clone();
        if let Some(t) = &e.at {
            let time = resolve_time(t, start).map_err(|m| at(&here("at"), m))?;
            set_path(&mut ev, &path, format_rfc3339(time).into());
        }
        let line = serde_json::to_vec(&ev).map_err(|m| m.to_string())?;
        let decoded = decoder
            .decode(&line, e.source.as_deref())
            .map_err(|m| at(&here("event"), m.to_string()))?;
        engine.process(&decoded, &mut outcomes);
    }
    engine.finish(&mut outcomes);
    let actual: Vec<serde_json::Value> =
        outcomes.iter().map(|o| output::to_json(rules, o)).collect();
    let mut expected = Vec::new();
    for (i, exp) in t.expect.iter().enumerate() {
        let mut m = serde_json::Map::new();
        for (k, v) in exp {
            let here = |tp: &YamlPath| tp.key("expect").index(i).key(k);
            if !output::FIELDS.contains(&k.as_str()) {
                return Err(at(
                    &here,
                    format!(
                        "not a field of an outcome{}",
                        yaml::did_you_mean(k, output::FIELDS)
                    ),
                ));
            }
            if k == "outcome" {
                let kinds = if t.lifecycle {
                    &OUTCOMES[..]
                } else {
                    &OUTCOMES[..4]
                };
                match v.as_str() {
                    Some(o) if kinds.contains(&o) => {}
                    Some(o) if OUTCOMES.contains(&o) => {
                        return Err(at(
                            &here,
                            format!(
                                "{o:?} is a lifecycle outcome: reported only with `lifecycle: true`"
                            ),
                        ));
                    }
                    _ => {
                        return Err(at(
                            &here,
                            format!(
                                "{v} is not an outcome: one of {}{}",
                                kinds.join(", "),
                                v.as_str()
                                    .map(|o| yaml::did_you_mean(o, kinds.iter().copied()))
                                    .unwrap_or_default()
                            ),
                        ));
                    }
                }
            }
            let v = match (TIME_FIELDS.contains(&k.as_str()), v.as_str()) {
                (true, Some(s)) => {
                    let t = resolve_time(s, start).map_err(|m| at(&here, m))?;
                    serde_json::Value::String(format_rfc3339(t))
                }
                // Keys are text: `key: 42` means the key an event's 42 gives, "42".
                _ if k == "key" && (v.is_i64() || v.is_u64()) => {
                    serde_json::Value::String(v.to_string())
                }
                // So are names and texts, which the rules' YAML may also write bare
                // (`step: 1`, `severity: 010`): compared as the text they are written as,
                // as the rules take them.
                _ if TEXT_FIELDS.contains(&k.as_str()) && (v.is_number() || v.is_boolean()) => {
                    serde_json::Value::String(text_at(&here).unwrap_or_else(|| v.to_string()))
                }
                // And so are label values.
                _ if k == "labels" && v.is_object() => v
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(name, lv)| {
                        let lv = match lv {
                            serde_json::Value::Number(_) | serde_json::Value::Bool(_) => {
                                serde_json::Value::String(
                                    text_at(&|tp| here(tp).key(name))
                                        .unwrap_or_else(|| lv.to_string()),
                                )
                            }
                            _ => lv.clone(),
                        };
                        (name.clone(), lv)
                    })
                    .collect(),
                _ => v.clone(),
            };
            m.insert(k.clone(), v);
        }
        expected.push(serde_json::Value::Object(m));
    }
    let matches = |e: &serde_json::Value, a: &serde_json::Value| {
        e.as_object().is_some_and(|em| {
            em.iter()
                .all(|(k, v)| a.get(k).is_some_and(|av| json_eq(av, v)))
        })
    };
    if expected.len() == actual.len() && expected.iter().zip(&actual).all(|(e, a)| matches(e, a)) {
        return Ok(());
    }
    Err(diff(&expected, &actual, matches))
}

/// Outcome fields that are always text.
const TEXT_FIELDS: &[&str] = &[
    "rule",
    "step",
    "severity",
    "summary",
    "description",
    "sink",
    "id",
    "within",
];

/// A line diff (longest common subsequence) of expected and actual outcomes.
fn diff(
    expected: &[serde_json::Value],
    actual: &[serde_json::Value],
    eq: impl Fn(&serde_json::Value, &serde_json::Value) -> bool,
) -> String {
    let (n, m) = (expected.len(), actual.len());
    let mut lcs = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if eq(&expected[i], &actual[j]) {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut out = String::from("outcomes differ (- expected, + actual):\n");
    let (mut i, mut j) = (0, 0);
    while i < n || j < m {
        if i < n && j < m && eq(&expected[i], &actual[j]) {
            let _ = writeln!(out, "    {}", expected[i]);
            i += 1;
            j += 1;
        } else if j < m && (i == n || lcs[i][j + 1] >= lcs[i + 1][j]) {
            // In the order `replay` prints its fields, to compare with its lines.
            let _ = writeln!(out, "  + {}", crate::output::line_text(&actual[j]));
            j += 1;
        } else {
            let _ = writeln!(out, "  - {}", expected[i]);
            i += 1;
        }
    }
    out
}
