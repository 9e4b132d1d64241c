//! YAML with positions: a small node tree built from saphyr's event parser, and a serde
//! deserializer over it that reports every unknown field (with a suggestion) and every type
//! error with its file position and YAML path, instead of stopping at the first.
//!
//! serde_yaml has no spans, and an operator fixing a broken rules file wants all the
//! problems at once, each pointing at a line and column. Scalars are resolved with the
//! YAML 1.2 core schema (`true`, `~`, `12`, `1.5` ...), as serde_yaml does.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;

use saphyr_parser::{Event, Parser, ScalarStyle, Span};
use serde::de::{self, DeserializeOwned, Visitor};

/// Most nodes a file may expand to (aliases included): far beyond any real rules or config
/// file, far below what would exhaust memory.
const MAX_NODES: usize = 1_000_000;
/// Deepest nesting of collections a file may have (aliases included): far beyond any real
/// rules or config file. What reads the tree recurses (on a runtime thread's stack, for a
/// reload): a file nested thousands deep would overflow it and abort the daemon.
const MAX_DEPTH: usize = 64;

/// A collection being read: the node, the key waiting for its value (mappings), and the
/// texts of the keys so far (duplicates are found by them; keys without text by value).
struct Open {
    node: Node,
    key: Option<Node>,
    texts: std::collections::HashSet<String>,
    textless: bool,
}

/// A position in a source file, both 1-based.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

/// One step of a YAML path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// A YAML path such as `rules[0].expect[1].after`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct YamlPath(pub Vec<Seg>);

impl YamlPath {
    pub fn key(&self, k: &str) -> YamlPath {
        let mut p = self.clone();
        p.0.push(Seg::Key(k.to_string()));
        p
    }
    pub fn index(&self, i: usize) -> YamlPath {
        let mut p = self.clone();
        p.0.push(Seg::Index(i));
        p
    }
    /// The path one level up (the root's parent is the root).
    pub fn parent(&self) -> YamlPath {
        let mut p = self.clone();
        p.0.pop();
        p
    }
}

impl fmt::Display for YamlPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// A problem found in a YAML file, at a position and a path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diag {
    pub pos: Pos,
    pub path: String,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

/// A YAML node with the position where it starts. Scalars keep their source text so that a
/// number can still be read as a string where a string is expected.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub pos: Pos,
    pub value: Value,
    pub text: Option<String>,
}

impl Node {
    fn kind(&self) -> &'static str {
        match self.value {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a sequence",
            Value::Map(_) => "a mapping",
        }
    }

    /// The scalar text of a node that can stand for a string.
    fn as_text(&self) -> Option<&str> {
        match &self.value {
            Value::Str(s) => Some(s),
            Value::Seq(_) | Value::Map(_) | Value::Null => None,
            _ => self.text.as_deref(),
        }
    }

    /// The map entry for `key`, if this is a mapping that has it.
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.value {
            Value::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.as_text() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// The node a path leads to, or the deepest node on the way (so a diagnostic about a
    /// missing field still points at the mapping that lacks it).
    pub fn locate(&self, path: &YamlPath) -> Pos {
        let mut node = self;
        for seg in &path.0 {
            match node.step(seg) {
                Some(n) => node = n,
                None => break,
            }
        }
        node.pos
    }

    fn step(&self, seg: &Seg) -> Option<&Node> {
        match (seg, &self.value) {
            (Seg::Key(k), Value::Map(_)) => self.get(k),
            (Seg::Index(i), Value::Seq(items)) => items.get(*i),
            _ => None,
        }
    }

    /// The source text of the scalar a path leads to, as written (`010`, `1e3`, `true`),
    /// where the path leads to a number or a boolean.
    pub fn scalar_text(&self, path: &YamlPath) -> Option<&str> {
        let node = path.0.iter().try_fold(self, |n, seg| n.step(seg))?;
        match node.value {
            Value::Int(_) | Value::Float(_) | Value::Bool(_) => node.text.as_deref(),
            _ => None,
        }
    }

    /// An integer above `i64::MAX` (read as a float) that fits a `u64`: kept exact, as
    /// events' integers are.
    fn big_uint(&self) -> Option<u64> {
        match self.value {
            Value::Float(f) if f >= 9_223_372_036_854_775_808.0 => self
                .text
                .as_deref()?
                .strip_prefix('+')
                .unwrap_or(self.text.as_deref()?)
                .parse()
                .ok(),
            _ => None,
        }
    }

    /// How many nodes this one is, itself included.
    /// How deep collections nest in it (a scalar: 0).
    fn depth(&self) -> usize {
        match &self.value {
            Value::Seq(items) => 1 + items.iter().map(Node::depth).max().unwrap_or(0),
            Value::Map(entries) => {
                1 + entries
                    .iter()
                    .map(|(k, v)| k.depth().max(v.depth()))
                    .max()
                    .unwrap_or(0)
            }
            _ => 0,
        }
    }

    /// Its size in nodes, a scalar's text weighing one more per 64 bytes (what an alias
    /// of it copies).
    fn count(&self) -> usize {
        1 + match &self.value {
            Value::Seq(items) => items.iter().map(Node::count).sum(),
            Value::Map(entries) => entries.iter().map(|(k, v)| k.count() + v.count()).sum(),
            _ => self.text.as_ref().map_or(0, |t| t.len() / 64),
        }
    }

    /// Converts to JSON (for `where` values and payloads).
    pub fn to_json(&self) -> serde_json::Value {
        if let Some(u) = self.big_uint() {
            return u.into();
        }
        match &self.value {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => (*b).into(),
            Value::Int(i) => (*i).into(),
            Value::Float(f) => serde_json::Number::from_f64(*f)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            Value::Str(s) => s.clone().into(),
            Value::Seq(items) => items.iter().map(Node::to_json).collect(),
            Value::Map(entries) => entries
                .iter()
                .map(|(k, v)| (k.as_text().unwrap_or_default().to_string(), v.to_json()))
                .collect::<serde_json::Map<_, _>>()
                .into(),
        }
    }
}

fn pos_of(span: &Span) -> Pos {
    Pos {
        line: span.start.line(),
        col: span.start.col() + 1,
    }
}

/// Resolves a plain scalar with the YAML 1.2 core schema.
pub fn resolve_plain(s: &str) -> Value {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
            return Value::Float(f64::INFINITY);
        }
        "-.inf" | "-.Inf" | "-.INF" => return Value::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Value::Float(f64::NAN),
        _ => {}
    }
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    if !digits.is_empty()
        && digits.bytes().all(|c| c.is_ascii_digit())
        && let Ok(i) = s.parse::<i64>()
    {
        return Value::Int(i);
    }
    // `0x` and `0o` take digits only: `from_str_radix` would also take a sign.
    if let Some(hex) = s.strip_prefix("0x")
        && hex.bytes().all(|c| c.is_ascii_hexdigit())
        && let Ok(i) = i64::from_str_radix(hex, 16)
    {
        return Value::Int(i);
    }
    if let Some(oct) = s.strip_prefix("0o")
        && oct.bytes().all(|c| matches!(c, b'0'..=b'7'))
        && let Ok(i) = i64::from_str_radix(oct, 8)
    {
        return Value::Int(i);
    }
    let looks_numeric = digits
        .bytes()
        .next()
        .is_some_and(|c| c.is_ascii_digit() || c == b'.')
        && digits
            .bytes()
            .all(|c| c.is_ascii_digit() || matches!(c, b'.' | b'e' | b'E' | b'+' | b'-'));
    if looks_numeric && let Ok(f) = s.parse::<f64>() {
        return Value::Float(f);
    }
    Value::Str(s.to_string())
}

/// Parses one YAML document into a node tree. An empty document is `Null`. Duplicate keys
/// in a mapping are reported as diagnostics (the first entry wins).
pub fn parse(text: &str, diags: &mut Vec<Diag>) -> Result<Node, Diag> {
    let mut parser = Parser::new_from_str(text);
    let mut stack: Vec<Open> = Vec::new();
    // Anchored nodes with their size and depth: aliases copy them, and nested aliases could
    // make a small file expand without bound ("billion laughs"), so the nodes are counted
    // (the copies kept here too: anchors nested in anchors are each a copy).
    let mut anchors: HashMap<usize, (Node, usize, usize)> = HashMap::new();
    let mut nodes = 0usize;
    let mut anchor_of: Vec<usize> = Vec::new();
    let mut root: Option<Node> = None;
    let mut docs = 0;
    let err = |span: &Span, message: String| Diag {
        pos: pos_of(span),
        path: String::new(),
        message,
    };
    for item in &mut parser {
        let (event, span) = item.map_err(|e| Diag {
            pos: Pos {
                line: e.marker().line(),
                col: e.marker().col() + 1,
            },
            path: String::new(),
            message: format!("invalid YAML: {}", e.info()),
        })?;
        let complete: Node = match event {
            Event::StreamStart | Event::StreamEnd | Event::Nothing | Event::DocumentEnd => {
                continue;
            }
            Event::DocumentStart(_) => {
                docs += 1;
                if docs > 1 {
                    return Err(err(
                        &span,
                        "this file holds one YAML document; found a second `---`".into(),
                    ));
                }
                continue;
            }
            Event::Alias(id) => match anchors.get(&id) {
                Some((n, size, depth)) => {
                    nodes += size;
                    if nodes > MAX_NODES {
                        return Err(err(
                            &span,
                            format!("aliases expand this file beyond {MAX_NODES} YAML nodes"),
                        ));
                    }
                    if stack.len() + depth > MAX_DEPTH {
                        return Err(err(
                            &span,
                            format!("this alias nests the file deeper than {MAX_DEPTH} levels"),
                        ));
                    }
                    n.clone()
                }
                None => return Err(err(&span, "unknown alias".into())),
            },
            Event::Scalar(value, style, anchor, tag) => {
                // The core schema's tags (`!!int`), and the non-specific `!` (a string);
                // other local tags (`!int`) are not these, and change nothing.
                let core = tag
                    .as_ref()
                    .filter(|t| t.is_yaml_core_schema())
                    .map(|t| t.suffix.as_str());
                let non_specific = tag.as_ref().is_some_and(|t| {
                    matches!(
                        (t.handle.as_str(), t.suffix.as_str()),
                        ("!", "") | ("", "!")
                    )
                });
                let v = match core {
                    Some("str") => Value::Str(value.to_string()),
                    // A core-schema type asked for: the text must be one (quoted or not).
                    Some(kind @ ("int" | "float" | "bool" | "null")) => {
                        match (kind, resolve_plain(&value)) {
                            ("float", Value::Int(i)) => Value::Float(i as f64),
                            ("int", v @ Value::Int(_))
                            | ("float", v @ Value::Float(_))
                            | ("bool", v @ Value::Bool(_))
                            | ("null", v @ Value::Null) => v,
                            _ => {
                                return Err(err(
                                    &span,
                                    format!("{value:?} is not a valid !!{kind}"),
                                ));
                            }
                        }
                    }
                    _ if style == ScalarStyle::Plain && !non_specific => resolve_plain(&value),
                    _ => Value::Str(value.to_string()),
                };
                let node = Node {
                    pos: pos_of(&span),
                    value: v,
                    text: Some(value.into_owned()),
                };
                nodes += 1;
                if anchor > 0 {
                    // Weighed by its length too: each alias copies the text (twice over).
                    anchors.insert(anchor, (node.clone(), node.count(), 0));
                }
                node
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                let value = if matches!(event, Event::SequenceStart(..)) {
                    Value::Seq(Vec::new())
                } else {
                    Value::Map(Vec::new())
                };
                if stack.len() >= MAX_DEPTH {
                    return Err(err(&span, format!("nested deeper than {MAX_DEPTH} levels")));
                }
                stack.push(Open {
                    node: Node {
                        pos: pos_of(&span),
                        value,
                        text: None,
                    },
                    key: None,
                    texts: Default::default(),
                    textless: false,
                });
                anchor_of.push(anchor);
                nodes += 1;
                continue;
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let node = stack.pop().expect("balanced events").node;
                let anchor = anchor_of.pop().unwrap_or(0);
                if anchor > 0 {
                    let size = node.count();
                    nodes += size;
                    if nodes > MAX_NODES {
                        return Err(err(
                            &span,
                            format!("anchors expand this file beyond {MAX_NODES} YAML nodes"),
                        ));
                    }
                    anchors.insert(anchor, (node.clone(), size, node.depth()));
                }
                node
            }
        };
        // A key written twice: where, as the other diagnostics say it.
        // Found by the keys' texts (a set: a mapping of many keys is not quadratic), and
        // by value where one of the two has no text.
        // (A key with text and one without never give the same name: scalars have text.)
        let is_dup = |open: &Open, key: &Node| match (&open.node.value, key.as_text()) {
            (Value::Map(_), Some(t)) => open.texts.contains(t),
            (Value::Map(entries), None) => {
                open.textless && entries.iter().any(|(k, _)| same_key(k, key))
            }
            _ => false,
        };
        let dup_at = match stack.split_last() {
            Some((last @ Open { key: Some(key), .. }, outer)) if is_dup(last, key) => {
                let mut path = YamlPath::default();
                for o in outer {
                    path = match (&o.node.value, &o.key) {
                        (Value::Seq(items), _) => path.index(items.len()),
                        (_, Some(k)) => path.key(k.as_text().unwrap_or("?")),
                        _ => path,
                    };
                }
                Some(path.key(key.as_text().unwrap_or("?")).to_string())
            }
            _ => None,
        };
        match stack.last_mut() {
            None => root = Some(complete),
            Some(Open {
                node: parent,
                key: pending_key,
                texts,
                textless,
            }) => match &mut parent.value {
                Value::Seq(items) => items.push(complete),
                Value::Map(entries) => match pending_key.take() {
                    None => *pending_key = Some(complete),
                    Some(key) => {
                        if let Some(path) = dup_at {
                            diags.push(Diag {
                                pos: key.pos,
                                path,
                                message: format!(
                                    "duplicate key {:?} in this mapping",
                                    key.as_text().unwrap_or("?")
                                ),
                            });
                        } else {
                            match key.as_text() {
                                Some(t) => {
                                    texts.insert(t.to_string());
                                }
                                None => *textless = true,
                            }
                            entries.push((key, complete));
                        }
                    }
                },
                _ => unreachable!("only collections are on the stack"),
            },
        }
    }
    Ok(root.unwrap_or(Node {
        pos: Pos { line: 1, col: 1 },
        value: Value::Null,
        text: None,
    }))
}

/// Closest candidate by edit distance, if it is close enough to be a likely typo.
pub fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Optimal string alignment distance: edits and adjacent transpositions.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let w = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * w];
    for i in 0..=a.len() {
        d[i * w] = i;
    }
    for (j, cell) in d.iter_mut().enumerate().take(w) {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[(i - 1) * w + j] + 1)
                .min(d[i * w + j - 1] + 1)
                .min(d[(i - 1) * w + j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[(i - 2) * w + j - 2] + 1);
            }
            d[i * w + j] = v;
        }
    }
    d[a.len() * w + b.len()]
}

/// Appends ` (did you mean "x"?)` when there is a close candidate.
pub fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    match suggest(word, candidates) {
        Some(s) => format!(" (did you mean {s:?}?)"),
        None => String::new(),
    }
}

/// Deserializes `node` into `T`, pushing every problem found to `diags`. Returns `None` when
/// a problem prevented building the value (unknown fields alone do not).
pub fn from_node<T: DeserializeOwned>(
    node: &Node,
    path: &YamlPath,
    diags: &mut Vec<Diag>,
) -> Option<T> {
    read_node(node, path, diags)
        .filter(|r| r.patched.is_empty())
        .map(|r| r.value)
}

/// A value read by [`read_node`]: where `patched` is not empty, the nodes at those paths
/// were wrong (reported) and stand in as empty values, so the value is fit only for finding
/// the other problems, and what is said of anything at or under them is noise.
pub struct Read<T> {
    pub value: T,
    pub patched: Vec<YamlPath>,
}

/// Whether a problem reported at `path` (a [`YamlPath`] as text) concerns one of the
/// `patched` nodes of a [`Read`], or a node under one.
pub fn covered(patched: &[YamlPath], path: &str) -> bool {
    patched.iter().any(|p| {
        let p = p.to_string();
        path.strip_prefix(p.as_str())
            .is_some_and(|rest| p.is_empty() || rest.is_empty() || rest.starts_with(['.', '[']))
    })
}

/// Most passes [`read_node`] makes: each one gets past one more problem.
const MAX_PASSES: usize = 64;

/// Like [`from_node`], but a problem that stops the reading (a missing field, a value of
/// the wrong type) does not hide the ones after it: the node at fault is reported, then
/// stands in as an empty value of the type wanted there (`""`, `0`, no items) and the
/// reading starts over, until it gets through. Returns `None` only when it cannot.
pub fn read_node<T: DeserializeOwned>(
    node: &Node,
    path: &YamlPath,
    diags: &mut Vec<Diag>,
) -> Option<Read<T>> {
    let mut patched = Vec::new();
    let mut found: Vec<Diag> = Vec::new();
    let result = loop {
        let sink = RefCell::new(Vec::new());
        let result = T::deserialize(NodeDe {
            node,
            path: path.clone(),
            sink: &sink,
            patched: &patched,
        });
        for d in sink.into_inner() {
            if !found.contains(&d) {
                found.push(d);
            }
        }
        match result {
            Ok(value) => break Some(Read { value, patched }),
            Err(e) => {
                if !e.reported {
                    found.push(Diag {
                        pos: node.pos,
                        path: path.to_string(),
                        message: e.message,
                    });
                }
                match e.at {
                    Some(at) if !patched.contains(&at) && patched.len() < MAX_PASSES => {
                        patched.push(at)
                    }
                    _ => break None,
                }
            }
        }
    };
    diags.extend(found);
    result
}

/// A deserialization error. `reported` means it is already in the sink with its position.
#[derive(Debug)]
pub struct DeError {
    message: String,
    reported: bool,
    /// The node to stand in for on the next pass: where the error was reported, or the
    /// missing field.
    at: Option<YamlPath>,
    /// Set by `missing_field`: the field whose absence is the error.
    missing: Option<&'static str>,
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError {
            message: msg.to_string().replace('`', "\""),
            reported: false,
            at: None,
            missing: None,
        }
    }

    fn missing_field(field: &'static str) -> Self {
        DeError {
            missing: Some(field),
            ..de::Error::custom(format_args!("missing field `{field}`"))
        }
    }
}

struct NodeDe<'a> {
    node: &'a Node,
    path: YamlPath,
    sink: &'a RefCell<Vec<Diag>>,
    /// Paths whose nodes stand in as empty values (see [`read_node`]).
    patched: &'a [YamlPath],
}

/// The node behind a missing field that stands in as an empty value.
static EMPTY: Node = Node {
    pos: Pos { line: 0, col: 0 },
    value: Value::Null,
    text: None,
};

impl<'a> NodeDe<'a> {
    fn report(&self, message: String) -> DeError {
        // What a stand-in value fails is noise: not reported, and no pass gets past it.
        let patched = self.is_patched();
        if !patched {
            self.sink.borrow_mut().push(Diag {
                pos: self.node.pos,
                path: self.path.to_string(),
                message,
            });
        }
        DeError {
            message: String::new(),
            reported: true,
            at: (!patched).then(|| self.path.clone()),
            missing: None,
        }
    }

    /// Attaches this node's position to an error raised by a visitor below it.
    fn locate(&self, e: DeError) -> DeError {
        if e.reported {
            return e;
        }
        let mut message = e.message;
        if let (Value::Float(f), Some(raw)) = (&self.node.value, self.node.as_text()) {
            // serde shows a float re-rendered (`1e23` as 100000000000000000000000.0): show
            // it as written, which is also what hides a value from the environment.
            let shown = de::Unexpected::Float(*f).to_string().replace('`', "\"");
            message = message.replace(&shown, &format!("floating point \"{raw}\""));
        }
        if let (Value::Int(i), Some(raw)) = (&self.node.value, self.node.as_text()) {
            // Likewise `0x1F`, `0o17` or `007`, shown as 31, 15 or 7: an environment
            // value written in another base would show through the masking of its text.
            let shown = de::Unexpected::Signed(*i).to_string().replace('`', "\"");
            message = message.replace(&shown, &format!("integer \"{raw}\""));
        }
        let mut r = self.report(message);
        if let Some(field) = e.missing
            && r.at.is_some()
        {
            r.at = Some(self.path.key(field));
        }
        r
    }

    /// This node stands in as an empty value: it, or a node above it, was wrong.
    fn is_patched(&self) -> bool {
        self.patched.iter().any(|p| self.path.0.starts_with(&p.0))
    }

    /// A mapping's entries, for a visitor. A key that is a sequence, a mapping or null has
    /// no text to be a JSON member name (it read as "" before): refused where it is.
    fn map_access<'s>(&'s self, entries: &'a [(Node, Node)]) -> Result<MapDe<'s, 'a>, DeError> {
        match entries.iter().find(|(k, _)| k.as_text().is_none()) {
            Some((k, _)) => Err(NodeDe {
                node: k,
                path: self.path.clone(),
                sink: self.sink,
                patched: self.patched,
            }
            .report(format!(
                "a key must be a string, a number or a boolean, found {}",
                k.kind()
            ))),
            None => Ok(MapDe {
                de: self,
                entries: entries
                    .iter()
                    .map(|(k, v)| (k.as_text().unwrap_or_default(), v))
                    .collect(),
                at: 0,
            }),
        }
    }

    fn expected(&self, what: &str) -> DeError {
        self.report(format!("expected {what}, found {}", self.node.kind()))
    }

    fn child(&self, node: &'a Node, seg: Seg) -> NodeDe<'a> {
        let mut path = self.path.clone();
        path.0.push(seg);
        NodeDe {
            node,
            path,
            sink: self.sink,
            patched: self.patched,
        }
    }
}

/// Scalar requests: a stand-in node gives the type's zero, any other node is read as is.
macro_rules! stand_in {
    ($($method:ident => $visit:ident($zero:expr)),* $(,)?) => {
        $(fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
            if self.is_patched() {
                return visitor.$visit($zero).map_err(|e| self.locate(e));
            }
            self.deserialize_any(visitor)
        })*
    };
}

impl<'de, 'a: 'de> de::Deserializer<'de> for NodeDe<'a> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        if self.is_patched() {
            return visitor.visit_unit().map_err(|e| self.locate(e));
        }
        let r = match &self.node.value {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Int(i) => visitor.visit_i64(*i),
            Value::Float(f) => match self.node.big_uint() {
                Some(u) => visitor.visit_u64(u),
                // JSON has none: a `where` value or a payload would silently become null.
                None if !f.is_finite() => {
                    return Err(self.report(format!(
                        "{} is not a number JSON can hold (no infinity or NaN)",
                        self.node.as_text().unwrap_or("this value")
                    )));
                }
                None => visitor.visit_f64(*f),
            },
            Value::Str(s) => visitor.visit_borrowed_str(s),
            Value::Seq(items) => visitor.visit_seq(SeqDe {
                de: &self,
                items: items.iter().enumerate(),
            }),
            Value::Map(entries) => visitor.visit_map(self.map_access(entries)?),
        };
        r.map_err(|e| self.locate(e))
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        if self.is_patched() {
            return visitor.visit_borrowed_str("").map_err(|e| self.locate(e));
        }
        match self.node.as_text() {
            Some(s) => visitor.visit_borrowed_str(s).map_err(|e| self.locate(e)),
            None => Err(self.expected("a string")),
        }
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.node.value {
            _ if self.is_patched() => visitor.visit_none(),
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        if self.is_patched() {
            return visitor
                .visit_seq(SeqDe {
                    de: &self,
                    items: [].iter().enumerate(),
                })
                .map_err(|e| self.locate(e));
        }
        match &self.node.value {
            Value::Seq(items) => visitor
                .visit_seq(SeqDe {
                    de: &self,
                    items: items.iter().enumerate(),
                })
                .map_err(|e| self.locate(e)),
            _ => Err(self.expected("a sequence")),
        }
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        if self.is_patched() {
            return visitor
                .visit_map(MapDe {
                    de: &self,
                    entries: Vec::new(),
                    at: 0,
                })
                .map_err(|e| self.locate(e));
        }
        match &self.node.value {
            Value::Map(entries) => visitor
                .visit_map(self.map_access(entries)?)
                .map_err(|e| self.locate(e)),
            _ => Err(self.expected("a mapping")),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        if self.is_patched() {
            // Every field stands in as an empty value too, so none is missing.
            return visitor
                .visit_map(MapDe {
                    de: &self,
                    entries: fields.iter().map(|&f| (f, &EMPTY)).collect(),
                    at: 0,
                })
                .map_err(|e| self.locate(e));
        }
        let Value::Map(entries) = &self.node.value else {
            return Err(self.expected("a mapping"));
        };
        let mut known = Vec::with_capacity(entries.len());
        for (k, v) in entries {
            let name = k.as_text().unwrap_or_default();
            if fields.contains(&name) {
                known.push((name, v));
            } else {
                self.sink.borrow_mut().push(Diag {
                    pos: k.pos,
                    path: self.path.key(name).to_string(),
                    message: format!(
                        "unknown field {name:?}{}",
                        did_you_mean(name, fields.iter().copied())
                    ),
                });
            }
        }
        // A field found missing on an earlier pass stands in as an empty value.
        for &f in fields {
            if !known.iter().any(|(k, _)| *k == f) && self.patched.contains(&self.path.key(f)) {
                known.push((f, &EMPTY));
            }
        }
        visitor
            .visit_map(MapDe {
                de: &self,
                entries: known,
                at: 0,
            })
            .map_err(|e| self.locate(e))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let (tag, body) = match &self.node.value {
            _ if self.is_patched() => (variants.first().copied().unwrap_or_default(), Some(&EMPTY)),
            Value::Str(s) => (s.as_str(), None),
            Value::Map(entries) if entries.len() == 1 => (
                entries[0].0.as_text().unwrap_or_default(),
                Some(&entries[0].1),
            ),
            _ => {
                return Err(self.report(format!(
                    "expected one of {} (a mapping with one key)",
                    variants.join(", ")
                )));
            }
        };
        if !variants.contains(&tag) {
            return Err(self.report(format!(
                "unknown kind {tag:?}, expected one of {}{}",
                variants.join(", "),
                did_you_mean(tag, variants.iter().copied())
            )));
        }
        let body_de = body.map(|b| self.child(b, Seg::Key(tag.to_string())));
        visitor
            .visit_enum(EnumDe { tag, body: body_de })
            .map_err(|e| self.locate(e))
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }

    stand_in! {
        deserialize_bool => visit_bool(false),
        deserialize_i8 => visit_i64(0),
        deserialize_i16 => visit_i64(0),
        deserialize_i32 => visit_i64(0),
        deserialize_i64 => visit_i64(0),
        deserialize_u8 => visit_u64(0),
        deserialize_u16 => visit_u64(0),
        deserialize_u32 => visit_u64(0),
        deserialize_u64 => visit_u64(0),
        deserialize_f32 => visit_f64(0.0),
        deserialize_f64 => visit_f64(0.0),
    }

    serde::forward_to_deserialize_any! {
        i128 u128 char bytes byte_buf unit unit_struct tuple tuple_struct
    }
}

struct SeqDe<'s, 'a> {
    de: &'s NodeDe<'a>,
    items: std::iter::Enumerate<std::slice::Iter<'a, Node>>,
}

impl<'de, 's, 'a: 'de> de::SeqAccess<'de> for SeqDe<'s, 'a> {
    type Error = DeError;
    fn next_element_seed<T: de::DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        match self.items.next() {
            None => Ok(None),
            Some((i, node)) => seed
                .deserialize(self.de.child(node, Seg::Index(i)))
                .map(Some),
        }
    }
}

struct MapDe<'s, 'a> {
    de: &'s NodeDe<'a>,
    entries: Vec<(&'a str, &'a Node)>,
    at: usize,
}

impl<'de, 's, 'a: 'de> de::MapAccess<'de> for MapDe<'s, 'a> {
    type Error = DeError;
    fn next_key_seed<K: de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        let Some(&(text, _)) = self.entries.get(self.at) else {
            return Ok(None);
        };
        let key_de = de::value::BorrowedStrDeserializer::<'de, DeError>::new(text);
        seed.deserialize(key_de).map(Some)
    }

    fn next_value_seed<V: de::DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, DeError> {
        let (name, v) = self.entries[self.at];
        self.at += 1;
        seed.deserialize(self.de.child(v, Seg::Key(name.to_string())))
    }
}

struct EnumDe<'a, 'b> {
    tag: &'a str,
    body: Option<NodeDe<'b>>,
}

impl<'de, 'a: 'de, 'b: 'de> de::EnumAccess<'de> for EnumDe<'a, 'b> {
    type Error = DeError;
    type Variant = VariantDe<'b>;
    fn variant_seed<V: de::DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, VariantDe<'b>), DeError> {
        let tag = de::value::BorrowedStrDeserializer::<'de, DeError>::new(self.tag);
        let v = seed.deserialize(tag)?;
        Ok((v, VariantDe { body: self.body }))
    }
}

struct VariantDe<'b> {
    body: Option<NodeDe<'b>>,
}

impl<'de, 'b: 'de> de::VariantAccess<'de> for VariantDe<'b> {
    type Error = DeError;
    fn unit_variant(self) -> Result<(), DeError> {
        Ok(())
    }
    fn newtype_variant_seed<T: de::DeserializeSeed<'de>>(
        self,
        seed: T,
    ) -> Result<T::Value, DeError> {
        match self.body {
            Some(b) => seed.deserialize(b),
            None => Err(de::Error::custom("expected a mapping for this kind")),
        }
    }
    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, DeError> {
        match self.body {
            Some(b) => de::Deserializer::deserialize_seq(b, visitor),
            None => Err(de::Error::custom("expected a sequence for this kind")),
        }
    }
    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        match self.body {
            Some(b) => de::Deserializer::deserialize_struct(b, "", fields, visitor),
            None => Err(de::Error::custom("expected a mapping for this kind")),
        }
    }
}

/// Whether two keys of a mapping name the same member: by their text, as members are
/// named (`1` and `"1"` are one member, `01` and `1` two), or by value for keys without
/// text (refused anyway).
fn same_key(a: &Node, b: &Node) -> bool {
    match (a.as_text(), b.as_text()) {
        (Some(x), Some(y)) => x == y,
        _ => a.value == b.value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize, Debug)]
    #[allow(dead_code)]
    struct Inner {
        name: String,
        within: Option<String>,
    }

    #[derive(Deserialize, Debug)]
    #[allow(dead_code)]
    struct Outer {
        items: Vec<Inner>,
        #[serde(default)]
        payload: serde_json::Value,
    }

    #[test]
    fn reports_all_unknown_fields_with_positions() {
        let text = "items:\n  - name: a\n    withn: 5m\n  - name: b\n    bogus: 1\npayload: {x: [1, 2.5, true, ~, \"s\"]}\n";
        let mut diags = vec![];
        let node = parse(text, &mut diags).unwrap();
        let out: Option<Outer> = from_node(&node, &YamlPath::default(), &mut diags);
        let out = out.expect("unknown fields alone do not fail");
        assert_eq!(out.items.len(), 2);
        assert_eq!(
            out.payload,
            serde_json::json!({"x": [1, 2.5, true, null, "s"]})
        );
        assert_eq!(diags.len(), 2, "{diags:?}");
        assert_eq!(diags[0].pos, Pos { line: 3, col: 5 });
        assert_eq!(diags[0].path, "items[0].withn");
        assert!(
            diags[0].message.contains("did you mean \"within\""),
            "{}",
            diags[0].message
        );
        assert_eq!(diags[1].path, "items[1].bogus");
    }

    /// A key with no text (a sequence, a mapping, null) is refused where it is, not read
    /// as an empty member name.
    #[test]
    fn keys_without_text_are_refused() {
        for (text, pos) in [
            (
                "items: []\npayload: {x: 1, [a]: z}\n",
                Pos { line: 2, col: 17 },
            ),
            ("items: []\npayload:\n  ~: z\n", Pos { line: 3, col: 3 }),
        ] {
            let mut diags = vec![];
            let node = parse(text, &mut diags).unwrap();
            let out: Option<Outer> = from_node(&node, &YamlPath::default(), &mut diags);
            assert!(out.is_none(), "{text}");
            assert_eq!(diags.len(), 1, "{diags:?}");
            assert_eq!(diags[0].pos, pos, "{text}");
            assert_eq!(diags[0].path, "payload", "{text}");
            assert!(
                diags[0].message.starts_with("a key must be a string"),
                "{diags:?}"
            );
        }
    }

    #[test]
    fn type_errors_point_at_the_node() {
        let text = "items:\n  - name: [x]\n";
        let mut diags = vec![];
        let node = parse(text, &mut diags).unwrap();
        let out: Option<Outer> = from_node(&node, &YamlPath::default(), &mut diags);
        assert!(out.is_none());
        assert_eq!(diags.len(), 1);
        assert_eq!(diags[0].path, "items[0].name");
        assert_eq!(diags[0].pos, Pos { line: 2, col: 11 });
        assert!(diags[0].message.contains("expected a string"));
    }

    #[test]
    fn missing_field_points_at_the_mapping() {
        let text = "items:\n  - within: 5m\n";
        let mut diags = vec![];
        let node = parse(text, &mut diags).unwrap();
        let out: Option<Outer> = from_node(&node, &YamlPath::default(), &mut diags);
        assert!(out.is_none());
        assert_eq!(diags[0].path, "items[0]");
        assert!(
            diags[0].message.contains("missing field \"name\""),
            "{:?}",
            diags
        );
    }

    #[test]
    fn syntax_errors_have_positions() {
        let mut diags = vec![];
        let e = parse("a: [1, 2\nb: 3\n", &mut diags).unwrap_err();
        assert!(e.message.starts_with("invalid YAML"));
        assert!(e.pos.line >= 1);
    }

    /// A core-schema tag asks for that type: the text must be one (else an error, not a
    /// string in its place: `!!float nan` would never match a number).
    #[test]
    fn core_schema_tags_ask_for_their_type() {
        let mut diags = vec![];
        let n = parse(
            "a: !!float 1\nb: !!int \"3\"\nc: !!str 5\nd: !!bool true\n",
            &mut diags,
        )
        .unwrap();
        assert_eq!(
            n.to_json(),
            serde_json::json!({"a": 1.0, "b": 3, "c": "5", "d": true})
        );
        for bad in [
            "a: !!float nan\n",
            "a: !!int 1.5\n",
            "a: !!bool yes\n",
            "a: !!null 0\n",
        ] {
            let e = parse(bad, &mut diags).unwrap_err();
            assert!(
                e.message.contains("is not a valid !!"),
                "{bad}: {}",
                e.message
            );
        }
    }

    #[test]
    fn duplicate_keys_are_reported() {
        let mut diags = vec![];
        parse("a: 1\na: 2\n", &mut diags).unwrap();
        assert_eq!(diags.len(), 1);
        assert_eq!(diags[0].pos.line, 2);
        // By the member name they give: their text, not their value.
        let mut diags = vec![];
        parse("1: a\n\"1\": b\n", &mut diags).unwrap();
        assert_eq!(diags.len(), 1, "{diags:?}");
        let mut diags = vec![];
        parse("01: a\n1: b\ntrue: c\n'true': d\n", &mut diags).unwrap();
        assert_eq!(diags.len(), 1, "{diags:?}");
        assert_eq!(diags[0].pos.line, 4);
    }

    /// Integers above i64::MAX stay exact (events' integers up to u64::MAX are).
    #[test]
    fn integers_up_to_u64_max_stay_exact() {
        let mut diags = vec![];
        let node = parse(
            "a: 10000000000000000001\nb: 18446744073709551615\nc: 1e19\n",
            &mut diags,
        )
        .unwrap();
        let v: serde_json::Value = from_node(&node, &YamlPath::default(), &mut diags).unwrap();
        assert_eq!(v["a"].as_u64(), Some(10_000_000_000_000_000_001));
        assert_eq!(v["b"].as_u64(), Some(u64::MAX));
        assert_eq!(v["c"].as_f64(), Some(1e19));
        assert_eq!(node.to_json(), v);
    }

    /// Aliases of aliases cannot expand a small file without bound.
    #[test]
    fn alias_bombs_are_refused() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let p = i - 1;
            text.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let e = parse(&text, &mut vec![]).unwrap_err();
        assert!(
            e.message.contains("beyond 1000000 YAML nodes"),
            "{}",
            e.message
        );
        // Ordinary aliases are fine.
        let n = parse("a: &x {k: 1}\nb: *x\n", &mut vec![]).unwrap();
        assert_eq!(n.get("b").unwrap().to_json(), serde_json::json!({"k": 1}));
    }

    /// Nesting is bounded (what reads the tree recurses): deeper is an error with its
    /// place, directly or through an alias; and anchors nested in anchors count their
    /// copies, so they cannot multiply memory without an alias either.
    #[test]
    fn deep_nesting_and_anchor_copies_are_bounded() {
        let deep = format!("a: {}x{}\n", "[".repeat(80), "]".repeat(80));
        let e = parse(&deep, &mut vec![]).unwrap_err();
        assert!(
            e.message.contains("nested deeper than 64 levels"),
            "{}",
            e.message
        );
        assert_eq!(e.pos.line, 1);
        let ok = format!("a: {}x{}\n", "[".repeat(60), "]".repeat(60));
        assert!(parse(&ok, &mut vec![]).is_ok());
        let alias = format!(
            "a: &d {}x{}\nb: {}*d{}\n",
            "[".repeat(40),
            "]".repeat(40),
            "[".repeat(40),
            "]".repeat(40)
        );
        let e = parse(&alias, &mut vec![]).unwrap_err();
        assert!(e.message.contains("deeper than 64 levels"), "{}", e.message);
        // 50 anchored levels around 30,000 items: 1.5M nodes kept as copies.
        let items = vec!["1"; 30_000].join(",");
        let mut nested = format!("[{items}]");
        for i in 0..50 {
            nested = format!("&a{i} [{nested}]");
        }
        let e = parse(&format!("x: {nested}\n"), &mut vec![]).unwrap_err();
        assert!(
            e.message.contains("beyond 1000000 YAML nodes"),
            "{}",
            e.message
        );
        // A long string, aliased: weighed by its length (64 KiB, 1,100 times: 70 MB).
        let long = "x".repeat(64 << 10);
        let aliases = vec!["*s"; 1100].join(", ");
        let e = parse(&format!("a: &s {long}\nb: [{aliases}]\n"), &mut vec![]).unwrap_err();
        assert!(
            e.message.contains("beyond 1000000 YAML nodes"),
            "{}",
            e.message
        );
    }

    /// A mapping of many keys is read in linear time (duplicates found by a set), and
    /// still reports a duplicate among them.
    #[test]
    fn a_wide_mapping_finds_its_duplicate() {
        let mut text: String = (0..50_000).map(|i| format!("k{i}: {i}\n")).collect();
        text.push_str("k7: again\n");
        let mut diags = vec![];
        let n = parse(&text, &mut diags).unwrap();
        assert_eq!(diags.len(), 1, "{diags:?}");
        assert_eq!(diags[0].pos.line, 50_001);
        assert_eq!(n.get("k7").unwrap().to_json(), serde_json::json!(7));
        // Keys without text (null, collections) are compared by value among themselves.
        let mut diags = vec![];
        parse("~: a\nk: b\n? ~\n: c\n", &mut diags).unwrap();
        assert_eq!(diags.len(), 1, "{diags:?}");
    }

    /// The non-specific tag `!` makes a scalar a string; a local tag (`!int`) is not the
    /// core schema's `!!int`.
    #[test]
    fn non_specific_and_local_tags() {
        let n = parse("a: ! 010\nb: !int \"5\"\nc: !!int \"5\"\n", &mut vec![]).unwrap();
        assert_eq!(n.get("a").unwrap().to_json(), serde_json::json!("010"));
        assert_eq!(n.get("b").unwrap().to_json(), serde_json::json!("5"));
        assert_eq!(n.get("c").unwrap().to_json(), serde_json::json!(5));
    }

    #[test]
    fn core_schema_scalars() {
        assert_eq!(resolve_plain("12"), Value::Int(12));
        assert_eq!(resolve_plain("-3"), Value::Int(-3));
        assert_eq!(resolve_plain("1.5"), Value::Float(1.5));
        assert_eq!(resolve_plain("true"), Value::Bool(true));
        assert_eq!(resolve_plain("yes"), Value::Str("yes".into()));
        assert_eq!(resolve_plain("~"), Value::Null);
        assert_eq!(resolve_plain("15m"), Value::Str("15m".into()));
        assert_eq!(resolve_plain("1e3"), Value::Float(1000.0));
        assert_eq!(resolve_plain("0x1F"), Value::Int(31));
        assert_eq!(resolve_plain("0o17"), Value::Int(15));
        for s in ["0x-1", "0x+1F", "0o-7", "0x", "0o8"] {
            assert_eq!(resolve_plain(s), Value::Str(s.into()), "{s}");
        }
    }

    #[test]
    fn did_you_mean_finds_close_words() {
        assert_eq!(suggest("paymnt", ["payment", "shipment"]), Some("payment"));
        assert_eq!(suggest("zzz", ["payment", "shipment"]), None);
    }
}
