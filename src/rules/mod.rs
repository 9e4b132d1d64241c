//! The rules language: loading YAML rule files, validating them with every problem
//! reported at once (file:line:column and YAML path), and the validated model.

pub mod model;
pub mod raw;
pub mod template;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::time::Duration;
use crate::yaml::{self, Diag, Node, Pos, YamlPath};
pub use model::*;
use raw::{RawAction, RawMatcher, RawRule};
use template::{PayloadTemplate, Template};

/// The default for `dedup` and `late`.
pub const DEFAULT_MEMORY: &str = "24h";
/// Steps a rule may have at most.
pub const MAX_STEPS: usize = 64;

/// A problem in a named file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileDiag {
    pub file: PathBuf,
    pub diag: Diag,
}

impl fmt::Display for FileDiag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.diag;
        write!(f, "{}", self.file.display())?;
        if d.pos.line > 0 {
            write!(f, ":{}:{}", d.pos.line, d.pos.col)?;
        }
        if !d.path.is_empty() {
            write!(f, ": {}", d.path)?;
        }
        write!(f, ": {}", d.message)
    }
}

/// Every problem found in a rules path.
#[derive(Clone, Debug)]
pub struct RulesError {
    pub diags: Vec<FileDiag>,
}

impl fmt::Display for RulesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diags.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for RulesError {}

/// Is `s` a valid rule, step, source or sink name: `[a-z0-9][a-z0-9_-]*`.
pub fn valid_name(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit())
        && b.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-')
}

/// Why `s` cannot be a rule-defined alert label, if it cannot.
fn label_problem(s: &str) -> Option<String> {
    let mut b = s.bytes();
    let valid = matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_');
    if !valid {
        return Some(format!(
            "invalid label name {s:?}: use [a-zA-Z_][a-zA-Z0-9_]*"
        ));
    }
    if matches!(s, "alertname" | "rule" | "step" | "severity") {
        return Some(format!(
            "label {s:?} is set by sagawatch itself (alertname, rule, step, severity)"
        ));
    }
    if s.starts_with("__") {
        return Some(format!(
            "label {s:?}: names starting with __ are reserved by Prometheus"
        ));
    }
    None
}

/// Splits a dot path, or says why it is not one.
pub fn split_path(p: &str) -> Result<Vec<String>, String> {
    if p.is_empty() {
        return Err("empty dot path".into());
    }
    let segs: Vec<String> = p.split('.').map(str::to_string).collect();
    if segs.iter().any(String::is_empty) {
        return Err(format!("invalid dot path {p:?}: empty segment"));
    }
    Ok(segs)
}

/// Whether a directory entry is hidden (`.name`): not rules nor tests, as a shell's
/// `*.yaml` would not list it (editor backups and locks, macOS `._` files).
pub fn hidden(p: &Path) -> bool {
    p.file_name()
        .is_some_and(|n| n.as_encoded_bytes().starts_with(b"."))
}

/// The rule files of a rules path: the file itself, or the `*.yaml`/`*.yml` files of a
/// directory in name order, hidden ones (`.name`) left out.
pub fn rule_files(path: &Path) -> Result<Vec<PathBuf>, RulesError> {
    let fail = |message: String| RulesError {
        diags: vec![FileDiag {
            file: path.to_path_buf(),
            diag: Diag {
                pos: Pos::default(),
                path: String::new(),
                message,
            },
        }],
    };
    let meta = std::fs::metadata(path).map_err(|e| fail(format!("cannot read rules: {e}")))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    let entries = std::fs::read_dir(path).map_err(|e| fail(format!("cannot list rules: {e}")))?;
    for entry in entries {
        let p = entry
            .map_err(|e| fail(format!("cannot list rules: {e}")))?
            .path();
        let is_yaml = p.extension().is_some_and(|e| e == "yaml" || e == "yml");
        // Regular files, through links; and a link whose target is gone (or cannot be
        // looked at), so that its read names the problem instead of its rules vanishing
        // without a word. Not a FIFO, socket or device (a link to /dev/null, to switch a
        // file off): reading one may block, or give nothing that is rules.
        let listed = match std::fs::metadata(&p) {
            Ok(m) => m.is_file(),
            Err(_) => true,
        };
        if is_yaml && !hidden(&p) && listed {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(fail(
            "no *.yaml or *.yml rule files in this directory".into(),
        ));
    }
    Ok(files)
}

/// Loads and validates a rules path (a file or a directory).
pub fn load(path: &Path) -> Result<RuleSet, RulesError> {
    load_with(path, Validator::default())
}

/// Loads a rules path and checks every source and sink it names against `known`.
pub fn load_known(path: &Path, known: &Known) -> Result<RuleSet, RulesError> {
    load_with(
        path,
        Validator {
            known: Some(known.clone()),
            ..Validator::default()
        },
    )
}

fn load_with(path: &Path, mut v: Validator) -> Result<RuleSet, RulesError> {
    let files = rule_files(path)?;
    let mut sources = Vec::new();
    let mut diags = Vec::new();
    for f in files {
        match std::fs::read_to_string(&f) {
            Ok(text) => sources.push((f, text)),
            Err(e) => diags.push(FileDiag {
                file: f,
                diag: Diag {
                    pos: Pos::default(),
                    path: String::new(),
                    message: format!("cannot read: {e}"),
                },
            }),
        }
    }
    for (file, text) in &sources {
        v.file(file, text);
    }
    match v.finish() {
        Ok(set) if diags.is_empty() => Ok(set),
        Ok(_) => Err(RulesError { diags }),
        Err(mut e) => {
            diags.append(&mut e.diags);
            Err(RulesError { diags })
        }
    }
}

/// Validates rules held inline in another YAML document (a test file): `node` is the
/// `rules:` list, `path` its YAML path there.
pub fn load_node(file: &Path, node: &Node) -> Result<RuleSet, RulesError> {
    let mut v = Validator::default();
    let root = Node {
        pos: node.pos,
        value: yaml::Value::Map(vec![(
            Node {
                pos: node.pos,
                value: yaml::Value::Str("rules".into()),
                text: Some("rules".into()),
            },
            node.clone(),
        )]),
        text: None,
    };
    v.root(file, &root);
    v.finish()
}

/// Validates rule files given as (name, text) pairs.
pub fn load_sources(files: &[(PathBuf, String)]) -> Result<RuleSet, RulesError> {
    let mut v = Validator::default();
    for (file, text) in files {
        v.file(file, text);
    }
    v.finish()
}

/// What a daemon config defines, so rules that name a source or sink can be checked
/// against it. Replay and rule tests have no config and check names only.
#[derive(Clone, Debug, Default)]
pub struct Known {
    pub sources: Vec<String>,
    /// Sink name and whether it takes compensation payloads.
    pub sinks: Vec<(String, bool)>,
    /// Whether alerts that name no sinks have somewhere to go (`alerts.sinks`, or the
    /// stdout sinks it defaults to).
    pub default_alert_sinks: bool,
}

impl Known {
    fn source_error(&self, s: &str) -> Option<String> {
        if self.sources.iter().any(|k| k == s) {
            return None;
        }
        Some(format!(
            "unknown source {s:?}{}",
            yaml::did_you_mean(s, self.sources.iter().map(String::as_str))
        ))
    }

    fn sink_error(&self, s: &str, payload: bool) -> Option<String> {
        match self.sinks.iter().find(|(k, _)| k == s) {
            Some((_, takes)) if payload && !takes => {
                Some(format!("sink {s:?} does not take compensation payloads"))
            }
            Some(_) => None,
            None => Some(format!(
                "unknown sink {s:?}{}",
                yaml::did_you_mean(s, self.sinks.iter().map(|(k, _)| k.as_str()))
            )),
        }
    }
}

#[derive(Default)]
struct Validator {
    known: Option<Known>,
    rules: Vec<Rule>,
    paths: Vec<Vec<String>>,
    path_ids: HashMap<Vec<String>, PathId>,
    /// Rule name → where it was first defined.
    names: HashMap<String, (PathBuf, Pos)>,
    diags: Vec<FileDiag>,
}

/// Context for checking one rule: its file, its YAML node and the diagnostics so far.
struct RuleCx<'a> {
    file: &'a Path,
    node: &'a Node,
    diags: Vec<FileDiag>,
}

impl RuleCx<'_> {
    fn err(&mut self, path: &YamlPath, message: impl Into<String>) {
        self.diags.push(FileDiag {
            file: self.file.to_path_buf(),
            diag: Diag {
                pos: self.node.locate(path),
                path: path.to_string(),
                message: message.into(),
            },
        });
    }

    fn duration(&mut self, path: &YamlPath, text: Option<&str>, default: &str) -> Duration {
        match Duration::parse(text.unwrap_or(default)) {
            Ok(d) => d,
            Err(e) => {
                self.err(path, e);
                Duration::from_nanos(1)
            }
        }
    }
}

impl Validator {
    /// The rule set, or every problem sorted by file and position.
    fn finish(mut self) -> Result<RuleSet, RulesError> {
        if self.diags.is_empty() {
            return Ok(RuleSet {
                rules: self.rules,
                paths: self.paths,
            });
        }
        self.diags.sort_by(|a, b| {
            (&a.file, a.diag.pos.line, a.diag.pos.col).cmp(&(
                &b.file,
                b.diag.pos.line,
                b.diag.pos.col,
            ))
        });
        Err(RulesError { diags: self.diags })
    }

    fn intern(&mut self, segs: Vec<String>) -> PathId {
        if let Some(id) = self.path_ids.get(&segs) {
            return *id;
        }
        let id = self.paths.len();
        self.paths.push(segs.clone());
        self.path_ids.insert(segs, id);
        id
    }

    fn file(&mut self, file: &Path, text: &str) {
        let mut ydiags = Vec::new();
        let root = match yaml::parse(text, &mut ydiags) {
            Ok(n) => n,
            Err(d) => {
                self.diags.push(FileDiag {
                    file: file.to_path_buf(),
                    diag: d,
                });
                return;
            }
        };
        self.diags.extend(ydiags.into_iter().map(|diag| FileDiag {
            file: file.to_path_buf(),
            diag,
        }));
        self.root(file, &root);
    }

    /// Validates a parsed rules document: a mapping with a `rules:` list.
    fn root(&mut self, file: &Path, root: &Node) {
        let push_all = |diags: &mut Vec<FileDiag>, ds: Vec<Diag>| {
            diags.extend(ds.into_iter().map(|diag| FileDiag {
                file: file.to_path_buf(),
                diag,
            }));
        };
        let top = YamlPath::default();
        let rules_node = match &root.value {
            yaml::Value::Map(entries) => {
                for (k, _) in entries {
                    let name = k.text.as_deref().unwrap_or_default();
                    if name != "rules" {
                        self.diags.push(FileDiag {
                            file: file.to_path_buf(),
                            diag: Diag {
                                pos: k.pos,
                                path: name.to_string(),
                                message: format!(
                                    "unknown field {name:?}{}",
                                    yaml::did_you_mean(name, ["rules"])
                                ),
                            },
                        });
                    }
                }
                root.get("rules")
            }
            yaml::Value::Null => None,
            _ => {
                self.diags.push(FileDiag {
                    file: file.to_path_buf(),
                    diag: Diag {
                        pos: root.pos,
                        path: String::new(),
                        message: "expected a mapping with a `rules:` list".into(),
                    },
                });
                return;
            }
        };
        let Some(rules_node) = rules_node else {
            self.diags.push(FileDiag {
                file: file.to_path_buf(),
                diag: Diag {
                    pos: root.pos,
                    path: String::new(),
                    message: "missing field \"rules\" (a list of rules)".into(),
                },
            });
            return;
        };
        let items = match &rules_node.value {
            yaml::Value::Seq(items) => items,
            yaml::Value::Null => return,
            _ => {
                self.diags.push(FileDiag {
                    file: file.to_path_buf(),
                    diag: Diag {
                        pos: rules_node.pos,
                        path: "rules".into(),
                        message: "expected a sequence of rules".into(),
                    },
                });
                return;
            }
        };
        for (i, item) in items.iter().enumerate() {
            let path = top.key("rules").index(i);
            let mut ds = Vec::new();
            // A rule with a missing field or a value of the wrong type is still checked,
            // with those values standing in as empty ones and nothing said about them.
            let read: Option<yaml::Read<RawRule>> = yaml::read_node(item, &path, &mut ds);
            push_all(&mut self.diags, ds);
            if let Some(yaml::Read { value, patched }) = read {
                let mut cx = RuleCx {
                    file,
                    node: root,
                    diags: Vec::new(),
                };
                let rule = self.rule(&mut cx, &path, value);
                // A step whose name stood in as "" leaves the `after`s naming it unmatched
                // (any unknown name may be the one lost); other `after` errors stand.
                let name_lost = patched
                    .iter()
                    .any(|p| matches!(p.0.last(), Some(yaml::Seg::Key(k)) if k == "step"));
                let noise = |d: &yaml::Diag| {
                    yaml::covered(&patched, &d.path)
                        || (name_lost
                            && d.path.ends_with(".after")
                            && d.message.starts_with("unknown step "))
                };
                cx.diags.retain(|d| !noise(&d.diag));
                let failed = !cx.diags.is_empty() || !patched.is_empty();
                self.diags.append(&mut cx.diags);
                if !failed {
                    self.rules.push(rule);
                }
            }
        }
    }

    fn matcher(&mut self, cx: &mut RuleCx<'_>, path: &YamlPath, m: &RawMatcher) -> Matcher {
        if let Some(s) = &m.source {
            if !valid_name(s) {
                cx.err(
                    &path.key("source"),
                    format!("invalid source name {s:?}: use [a-z0-9][a-z0-9_-]*"),
                );
            } else if let Some(e) = self.known.as_ref().and_then(|k| k.source_error(s)) {
                cx.err(&path.key("source"), e);
            }
        }
        let mut conds = Vec::new();
        for (p, v) in &m.where_ {
            match split_path(p) {
                Ok(segs) => conds.push((self.intern(segs), v.clone())),
                Err(e) => cx.err(&path.key("where").key(p), e),
            }
        }
        let key = match split_path(&m.key) {
            Ok(segs) => self.intern(segs),
            Err(e) => {
                cx.err(&path.key("key"), e);
                0
            }
        };
        Matcher {
            source: m.source.clone(),
            conds,
            key,
        }
    }

    fn rule(&mut self, cx: &mut RuleCx<'_>, path: &YamlPath, raw: RawRule) -> Rule {
        let name_path = path.key("name");
        if !valid_name(&raw.name) {
            cx.err(
                &name_path,
                format!("invalid rule name {:?}: use [a-z0-9][a-z0-9_-]*", raw.name),
            );
        } else if let Some((f, p)) = self.names.get(&raw.name) {
            let msg = format!(
                "duplicate rule name {:?} (first defined at {}:{}:{})",
                raw.name,
                f.display(),
                p.line,
                p.col
            );
            cx.err(&name_path, msg);
        } else {
            let pos = cx.node.locate(&name_path);
            self.names
                .insert(raw.name.clone(), (cx.file.to_path_buf(), pos));
        }

        let trigger = self.matcher(cx, &path.key("trigger"), &raw.trigger);
        let cancels = raw
            .cancel
            .iter()
            .enumerate()
            .map(|(i, c)| self.matcher(cx, &path.key("cancel").index(i), c))
            .collect();

        let dedup = cx.duration(&path.key("dedup"), raw.dedup.as_deref(), DEFAULT_MEMORY);
        let late = cx.duration(&path.key("late"), raw.late.as_deref(), DEFAULT_MEMORY);

        // Steps: names first, so `after` can be resolved regardless of order.
        let expect_path = path.key("expect");
        if raw.expect.is_empty() {
            cx.err(&expect_path, "a rule needs at least one step in `expect`");
        }
        if raw.expect.len() > MAX_STEPS {
            cx.err(
                &expect_path,
                format!(
                    "a rule has at most {MAX_STEPS} steps, this one has {}",
                    raw.expect.len()
                ),
            );
        }
        let step_names: Vec<&str> = raw.expect.iter().map(|s| s.step.as_str()).collect();
        let mut captures: Vec<PathId> = Vec::new();
        let mut steps = Vec::new();
        for (i, s) in raw.expect.iter().enumerate() {
            let sp = expect_path.index(i);
            if !valid_name(&s.step) {
                cx.err(
                    &sp.key("step"),
                    format!("invalid step name {:?}: use [a-z0-9][a-z0-9_-]*", s.step),
                );
            } else if step_names[..i].contains(&s.step.as_str()) {
                cx.err(&sp.key("step"), format!("duplicate step name {:?}", s.step));
            }
            let after = match &s.after {
                None => None,
                Some(a) if a == &s.step => {
                    cx.err(
                        &sp.key("after"),
                        format!("step {a:?} cannot come after itself"),
                    );
                    None
                }
                Some(a) => match step_names.iter().position(|n| n == a) {
                    Some(j) => Some(j),
                    None => {
                        cx.err(
                            &sp.key("after"),
                            format!(
                                "unknown step {a:?}{}",
                                yaml::did_you_mean(a, step_names.iter().copied())
                            ),
                        );
                        None
                    }
                },
            };
            let within = cx.duration(&sp.key("within"), Some(&s.within), "");
            let matcher = self.matcher(
                cx,
                &sp,
                &RawMatcher {
                    source: s.source.clone(),
                    where_: s.where_.clone(),
                    key: s.key.clone(),
                },
            );
            let on_missing = s
                .on_missing
                .as_ref()
                .map(|acts| self.actions(cx, &sp.key("on_missing"), acts, &mut captures));
            steps.push(Step {
                name: s.step.clone(),
                matcher,
                within,
                after,
                dependents: Vec::new(),
                on_missing,
            });
        }
        // Cycles through `after`: each step has one parent, so follow the chain.
        let mut reported = vec![false; steps.len()];
        for start in 0..steps.len() {
            let mut chain = vec![start];
            let mut cur = steps[start].after;
            while let Some(next) = cur {
                if next == start {
                    if !chain.iter().any(|&c| reported[c]) {
                        let names: Vec<&str> = chain
                            .iter()
                            .chain(std::iter::once(&start))
                            .map(|&c| steps[c].name.as_str())
                            .collect();
                        cx.err(
                            &expect_path.index(start).key("after"),
                            format!("cyclic `after`: {}", names.join(" -> ")),
                        );
                        for &c in &chain {
                            reported[c] = true;
                        }
                    }
                    break;
                }
                if chain.contains(&next) || chain.len() > steps.len() {
                    break;
                }
                chain.push(next);
                cur = steps[next].after;
            }
        }
        for i in 0..steps.len() {
            if let Some(a) = steps[i].after {
                steps[a].dependents.push(i);
            }
        }
        let on_missing = self.actions(cx, &path.key("on_missing"), &raw.on_missing, &mut captures);
        // Rule labels are templates like an alert's own.
        let mut labels = Vec::new();
        for (k, v) in &raw.labels {
            let lp = path.key("labels").key(k);
            if let Some(problem) = label_problem(k) {
                cx.err(&lp, problem);
            }
            labels.push((k.clone(), self.template(cx, &lp, v, &mut captures)));
        }
        let max_within = steps.iter().map(|s| s.within.nanos()).max().unwrap_or(1);
        Rule {
            name: raw.name,
            description: raw.description.unwrap_or_default(),
            file: cx.file.to_path_buf(),
            trigger,
            steps,
            cancels,
            on_missing,
            dedup,
            late,
            max_within,
            captures,
            labels,
        }
    }

    fn template(
        &mut self,
        cx: &mut RuleCx<'_>,
        path: &YamlPath,
        text: &str,
        captures: &mut Vec<PathId>,
    ) -> Template {
        let mut capture = |p: &str| self.capture(p, captures);
        match Template::parse(text, &mut capture) {
            Ok(t) => t,
            Err(es) => {
                for e in es {
                    cx.err(path, e);
                }
                Template { parts: vec![] }
            }
        }
    }

    fn capture(&mut self, p: &str, captures: &mut Vec<PathId>) -> Result<usize, String> {
        let id = self.intern(split_path(p)?);
        Ok(match captures.iter().position(|c| *c == id) {
            Some(i) => i,
            None => {
                captures.push(id);
                captures.len() - 1
            }
        })
    }

    fn actions(
        &mut self,
        cx: &mut RuleCx<'_>,
        path: &YamlPath,
        raw: &[RawAction],
        captures: &mut Vec<PathId>,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        for (i, a) in raw.iter().enumerate() {
            let ap = path.index(i);
            match a {
                RawAction::Alert(al) => {
                    let p = ap.key("alert");
                    let severity = self.template(
                        cx,
                        &p.key("severity"),
                        al.severity.as_deref().unwrap_or("warning"),
                        captures,
                    );
                    let summary = self.template(cx, &p.key("summary"), &al.summary, captures);
                    let description = al
                        .description
                        .as_ref()
                        .map(|d| self.template(cx, &p.key("description"), d, captures));
                    let mut labels = Vec::new();
                    for (k, v) in &al.labels {
                        if let Some(problem) = label_problem(k) {
                            cx.err(&p.key("labels").key(k), problem);
                        }
                        labels.push((
                            k.clone(),
                            self.template(cx, &p.key("labels").key(k), v, captures),
                        ));
                    }
                    if al.sinks.as_ref().is_some_and(|s| s.is_empty()) {
                        // It would mean the defaults, not "no sinks", as it may be meant.
                        cx.err(
                            &p.key("sinks"),
                            "an empty list: leave `sinks` out for the default alert sinks",
                        );
                    }
                    let sinks = al.sinks.clone().unwrap_or_default();
                    for (j, s) in sinks.iter().enumerate() {
                        if sinks[..j].contains(s) {
                            cx.err(&p.key("sinks").index(j), format!("sink {s:?} listed twice"));
                        }
                    }
                    if sinks.is_empty()
                        && self.known.as_ref().is_some_and(|k| !k.default_alert_sinks)
                    {
                        cx.err(
                            &p,
                            "this alert would go nowhere: name its `sinks`, or list sinks in the \
                             config's `alerts.sinks` (empty, or unset without a stdout sink)",
                        );
                    }
                    for (j, s) in sinks.iter().enumerate() {
                        if !valid_name(s) {
                            cx.err(
                                &p.key("sinks").index(j),
                                format!("invalid sink name {s:?}: use [a-z0-9][a-z0-9_-]*"),
                            );
                        } else if let Some(e) =
                            self.known.as_ref().and_then(|k| k.sink_error(s, false))
                        {
                            cx.err(&p.key("sinks").index(j), e);
                        }
                    }
                    out.push(Action::Alert(AlertAction {
                        severity,
                        summary,
                        description,
                        labels,
                        sinks,
                    }));
                }
                RawAction::Compensate(c) => {
                    let p = ap.key("compensate");
                    if !valid_name(&c.sink) {
                        cx.err(
                            &p.key("sink"),
                            format!("invalid sink name {:?}: use [a-z0-9][a-z0-9_-]*", c.sink),
                        );
                    } else if let Some(e) = self
                        .known
                        .as_ref()
                        .and_then(|k| k.sink_error(&c.sink, true))
                    {
                        cx.err(&p.key("sink"), e);
                    }
                    let mut errors = Vec::new();
                    let mut capture = |q: &str| self.capture(q, captures);
                    let payload = PayloadTemplate::parse(
                        &c.payload,
                        &mut capture,
                        &mut errors,
                        &mut Vec::new(),
                    );
                    for (at, e) in errors {
                        let mut ep = p.key("payload");
                        for seg in at {
                            ep = match seg.parse::<usize>() {
                                Ok(n) if is_seq_at(cx.node, &ep) => ep.index(n),
                                _ => ep.key(&seg),
                            };
                        }
                        cx.err(&ep, e);
                    }
                    out.push(Action::Compensate(CompensateAction {
                        sink: c.sink.clone(),
                        payload,
                    }));
                }
            }
        }
        out
    }
}

/// Whether the node at `path` is a sequence (so a numeric segment is an index).
fn is_seq_at(root: &Node, path: &YamlPath) -> bool {
    let mut node = root;
    for seg in &path.0 {
        let next = match (seg, &node.value) {
            (yaml::Seg::Key(k), yaml::Value::Map(_)) => node.get(k),
            (yaml::Seg::Index(i), yaml::Value::Seq(items)) => items.get(*i),
            _ => None,
        };
        match next {
            Some(n) => node = n,
            None => return false,
        }
    }
    matches!(node.value, yaml::Value::Seq(_))
}
