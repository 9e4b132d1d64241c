//! Decoding events: a JSON object per line, read in one pass that keeps only the fields
//! the rules use (and the time field) and skips the rest without allocating.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::rules::RuleSet;
use crate::time::{Instant, parse_rfc3339};

/// A field value taken from an event. Strings borrow from the input line when they can.
#[derive(Clone, Debug, PartialEq)]
pub enum Field<'a> {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(Cow<'a, str>),
    /// An array or object, kept whole.
    Json(serde_json::Value),
}

/// The longest correlation key, in bytes. A key is stored several times over (the row, its
/// indexes, every alert and payload that renders it), so an 8 MB key from upstream data
/// cost a quarter of a gigabyte of state; a longer value is no key.
pub const MAX_KEY_BYTES: usize = 1024;

impl Field<'_> {
    /// The correlation key this field stands for: a non-empty string of at most
    /// [`MAX_KEY_BYTES`], or an integer as its decimal text. Anything else is no key.
    pub fn key(&self) -> Option<Cow<'_, str>> {
        match self {
            Field::Str(s) if !s.is_empty() && s.len() <= MAX_KEY_BYTES => {
                Some(Cow::Borrowed(s.as_ref()))
            }
            Field::Int(i) => Some(Cow::Owned(i.to_string())),
            Field::UInt(u) => Some(Cow::Owned(u.to_string())),
            _ => None,
        }
    }

    /// Equality with a rule's expected value: JSON types must agree, numbers compare
    /// numerically, arrays and objects compare element by element.
    pub fn equals(&self, want: &serde_json::Value) -> bool {
        use serde_json::Value as V;
        match (self, want) {
            (Field::Null, V::Null) => true,
            (Field::Bool(a), V::Bool(b)) => a == b,
            (Field::Str(a), V::String(b)) => a == b,
            (Field::Int(a), V::Number(b)) => num_eq(Num::I(*a), num_of(b)),
            (Field::UInt(a), V::Number(b)) => num_eq(Num::U(*a), num_of(b)),
            (Field::Float(a), V::Number(b)) => num_eq(Num::F(*a), num_of(b)),
            (Field::Json(a), b) => json_eq(a, b),
            _ => false,
        }
    }

    /// The field as text for templates: strings as they are, other values as JSON.
    pub fn to_text(&self) -> String {
        match self {
            Field::Null => "null".into(),
            Field::Bool(b) => b.to_string(),
            Field::Int(i) => i.to_string(),
            Field::UInt(u) => u.to_string(),
            Field::Float(f) => {
                serde_json::Number::from_f64(*f).map_or("null".into(), |n| n.to_string())
            }
            Field::Str(s) => s.to_string(),
            Field::Json(v) => v.to_string(),
        }
    }
}

#[derive(Clone, Copy)]
enum Num {
    I(i64),
    U(u64),
    F(f64),
}

fn num_of(n: &serde_json::Number) -> Num {
    if let Some(u) = n.as_u64() {
        Num::U(u)
    } else if let Some(i) = n.as_i64() {
        Num::I(i)
    } else {
        Num::F(n.as_f64().unwrap_or(f64::NAN))
    }
}

fn num_eq(a: Num, b: Num) -> bool {
    fn int(n: Num) -> Option<i128> {
        match n {
            Num::I(i) => Some(i128::from(i)),
            Num::U(u) => Some(i128::from(u)),
            Num::F(_) => None,
        }
    }
    match (int(a), int(b), a, b) {
        (Some(x), Some(y), _, _) => x == y,
        (_, _, Num::F(x), Num::F(y)) => x == y,
        (Some(i), None, _, Num::F(f)) | (None, Some(i), Num::F(f), _) => {
            // Exact: any whole f64 within i128's range converts without loss, and one
            // beyond it saturates, far from any i64 or u64.
            f.fract() == 0.0 && (f as i128) == i
        }
        _ => false,
    }
}

/// JSON equality where numbers compare numerically.
pub fn json_eq(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value as V;
    match (a, b) {
        (V::Number(x), V::Number(y)) => num_eq(num_of(x), num_of(y)),
        (V::Array(x), V::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| json_eq(p, q))
        }
        (V::Object(x), V::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

/// A decoded event: its source, its time, and the fields the rules read, indexed by
/// [`crate::rules::PathId`].
#[derive(Clone, Debug)]
pub struct Event<'a> {
    pub source: Option<&'a str>,
    pub time: Instant,
    pub fields: Vec<Option<Field<'a>>>,
}

impl<'a> Event<'a> {
    pub fn field(&self, id: usize) -> Option<&Field<'a>> {
        self.fields.get(id).and_then(Option::as_ref)
    }
}

/// The UTF-8 byte order mark some tools write at the start of a file: skipped there.
pub const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Why a line is not an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    Json(String),
    NotObject,
    NoTime(String),
    BadTime(String, String),
    /// A valid RFC 3339 time outside what nanoseconds since 1970 in an i64 hold.
    TimeOutOfRange(String, String),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Json(e) => write!(f, "invalid JSON: {e}"),
            DecodeError::NotObject => write!(f, "not a JSON object"),
            DecodeError::NoTime(p) => write!(f, "no time field {p:?}"),
            DecodeError::BadTime(p, v) => {
                write!(f, "time field {p:?} is not an RFC 3339 timestamp: {v}")
            }
            DecodeError::TimeOutOfRange(p, v) => write!(
                f,
                "time field {p:?} is outside the supported range (1677-09-21 to 2262-04-11): {v}"
            ),
        }
    }
}

impl std::error::Error for DecodeError {}

/// serde_json's message without its position (`expected value`).
pub fn json_message(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    text.strip_suffix(&suffix).unwrap_or(&text).to_string()
}

/// serde_json's message with a position within the line: the line number is the
/// caller's to give (serde_json counts the line's own end as a second line).
fn json_error(e: serde_json::Error) -> DecodeError {
    let message = json_message(&e);
    DecodeError::Json(match (e.line(), e.column()) {
        (0, _) => message.to_string(),
        (1, c) => format!("{message} at column {c}"),
        _ if e.is_eof() => format!("{message} at the end of the line"),
        (_, c) => format!("{message} at column {c} after a line break"),
    })
}

impl DecodeError {
    /// The `reason` label of `sagawatch_events_rejected_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Json(_) => "invalid_json",
            DecodeError::NotObject => "not_object",
            DecodeError::NoTime(_) => "no_time",
            DecodeError::BadTime(..) | DecodeError::TimeOutOfRange(..) => "bad_time",
        }
    }
}

/// The array index a path segment names: digits as `usize` prints them (`0`, `12`;
/// not `01` or `+1`, which only name object members).
fn array_index(seg: &str) -> Option<usize> {
    seg.parse::<usize>().ok().filter(|i| i.to_string() == seg)
}

#[derive(Default, Debug)]
struct Trie {
    children: Vec<(String, Trie)>,
    slot: Option<usize>,
    /// Whether some child name is an array index.
    numeric: bool,
}

impl Trie {
    fn child(&self, name: &str) -> Option<&Trie> {
        self.children
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
    }

    fn insert(&mut self, segs: &[String], slot: usize) {
        match segs.split_first() {
            None => self.slot = Some(slot),
            Some((head, rest)) => {
                if array_index(head).is_some() {
                    self.numeric = true;
                }
                let i = match self.children.iter().position(|(n, _)| n == head) {
                    Some(i) => i,
                    None => {
                        self.children.push((head.clone(), Trie::default()));
                        self.children.len() - 1
                    }
                };
                self.children[i].1.insert(rest, slot);
            }
        }
    }
}

/// Decodes JSON lines into [`Event`]s for one rule set and time field.
#[derive(Debug)]
pub struct Decoder {
    trie: Trie,
    slots: usize,
    time_slot: usize,
    time_path: String,
}

impl Decoder {
    /// `time_path` is the dot path of the event time (default `time`).
    pub fn new(rules: &RuleSet, time_path: &str) -> Decoder {
        let mut trie = Trie::default();
        for (id, segs) in rules.paths.iter().enumerate() {
            trie.insert(segs, id);
        }
        let time_segs: Vec<String> = time_path.split('.').map(str::to_string).collect();
        let time_slot = match rules.paths.iter().position(|p| *p == time_segs) {
            Some(id) => id,
            None => {
                trie.insert(&time_segs, rules.paths.len());
                rules.paths.len()
            }
        };
        Decoder {
            trie,
            slots: rules.paths.len().max(time_slot + 1),
            time_slot,
            time_path: time_path.to_string(),
        }
    }

    /// A decoder that reads only the event time: what makes a line an event or not.
    pub fn time_only(time_path: &str) -> Decoder {
        let none = RuleSet {
            rules: Vec::new(),
            paths: Vec::new(),
        };
        Decoder::new(&none, time_path)
    }

    /// Decodes one line (surrounding whitespace allowed).
    pub fn decode<'a>(
        &self,
        line: &'a [u8],
        source: Option<&'a str>,
    ) -> Result<Event<'a>, DecodeError> {
        self.decode_at(line, source, None)
    }

    /// Decodes one line; with `received`, that is the event time and the time field is not
    /// read (the daemon's wall clock mode).
    pub fn decode_at<'a>(
        &self,
        line: &'a [u8],
        source: Option<&'a str>,
        received: Option<Instant>,
    ) -> Result<Event<'a>, DecodeError> {
        let mut fields: Vec<Option<Field<'a>>> = vec![None; self.slots];
        let mut de = serde_json::Deserializer::from_slice(line);
        let is_object = RootSeed {
            node: &self.trie,
            fields: &mut fields,
        }
        .deserialize(&mut de)
        .map_err(json_error)?;
        de.end().map_err(json_error)?;
        if !is_object {
            return Err(DecodeError::NotObject);
        }
        let time = match fields[self.time_slot].as_ref() {
            _ if received.is_some() => received.unwrap_or_default(),
            None => return Err(DecodeError::NoTime(self.time_path.clone())),
            Some(Field::Str(s)) => parse_rfc3339(s).ok_or_else(|| {
                if crate::time::rfc3339_out_of_range(s) {
                    DecodeError::TimeOutOfRange(self.time_path.clone(), format!("{s:?}"))
                } else {
                    DecodeError::BadTime(self.time_path.clone(), format!("{s:?}"))
                }
            })?,
            Some(other) => {
                return Err(DecodeError::BadTime(
                    self.time_path.clone(),
                    other.to_text(),
                ));
            }
        };
        Ok(Event {
            source,
            time,
            fields,
        })
    }
}

/// The top level: must be an object. Returns whether it was.
struct RootSeed<'t, 'f, 'a> {
    node: &'t Trie,
    fields: &'f mut Vec<Option<Field<'a>>>,
}

impl<'de, 't, 'f> DeserializeSeed<'de> for RootSeed<'t, 'f, 'de> {
    type Value = bool;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(RootVisitor(NodeSeed {
            node: self.node,
            fields: self.fields,
        }))
    }
}

struct RootVisitor<'t, 'f, 'a>(NodeSeed<'t, 'f, 'a>);

impl<'de, 't, 'f> Visitor<'de> for RootVisitor<'t, 'f, 'de> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<bool, A::Error> {
        self.0.visit_map(map).map(|_| true)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(false)
    }
    fn visit_bool<E>(self, _: bool) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_i64<E>(self, _: i64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_u64<E>(self, _: u64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_f64<E>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_str<E>(self, _: &str) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_unit<E>(self) -> Result<bool, E> {
        Ok(false)
    }
}

/// Walks an object or array, descending only into paths the trie knows.
struct NodeSeed<'t, 'f, 'a> {
    node: &'t Trie,
    fields: &'f mut Vec<Option<Field<'a>>>,
}

impl<'de, 't, 'f> NodeSeed<'t, 'f, 'de> {
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        // The children met in this object, by index (modulo 64: a false "seen" only
        // costs a needless clear).
        let mut seen = 0u64;
        while let Some(child) = map.next_key_seed(KeySeed(self.node))? {
            match child {
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
                Some((i, child)) => {
                    // A member named twice: the last one wins, whole (as serde_json has it).
                    let bit = 1u64 << (i % 64);
                    if seen & bit != 0 {
                        clear(child, self.fields);
                    }
                    seen |= bit;
                    if child.slot.is_some() {
                        let v = map.next_value_seed(FieldSeed)?;
                        store(child, v, self.fields);
                    } else {
                        map.next_value_seed(NodeSeed {
                            node: child,
                            fields: &mut *self.fields,
                        })?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Forgets what `node`'s slot and every slot below it hold.
fn clear(node: &Trie, fields: &mut [Option<Field<'_>>]) {
    if let Some(slot) = node.slot {
        fields[slot] = None;
    }
    for (_, child) in &node.children {
        clear(child, fields);
    }
}

/// Stores a captured value at `node`'s slot and at every slot below it.
fn store<'a>(node: &Trie, v: Field<'a>, fields: &mut [Option<Field<'a>>]) {
    if let Field::Json(json) = &v {
        for (name, child) in &node.children {
            let sub = match json {
                serde_json::Value::Object(m) => m.get(name),
                serde_json::Value::Array(a) => array_index(name).and_then(|i| a.get(i)),
                _ => None,
            };
            if let Some(sub) = sub {
                store(child, field_of(sub), fields);
            }
        }
    }
    if let Some(slot) = node.slot {
        fields[slot] = Some(v);
    }
}

fn field_of(v: &serde_json::Value) -> Field<'static> {
    use serde_json::Value as V;
    match v {
        V::Null => Field::Null,
        V::Bool(b) => Field::Bool(*b),
        V::Number(n) => match num_of(n) {
            Num::U(u) => Field::UInt(u),
            Num::I(i) => Field::Int(i),
            Num::F(f) => Field::Float(f),
        },
        V::String(s) => Field::Str(Cow::Owned(s.clone())),
        other => Field::Json(other.clone()),
    }
}

impl<'de, 't, 'f> DeserializeSeed<'de> for NodeSeed<'t, 'f, 'de> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, 't, 'f> Visitor<'de> for NodeSeed<'t, 'f, 'de> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        NodeSeed::visit_map(self, map)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if !self.node.numeric {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(());
        }
        let mut i = 0usize;
        loop {
            let name = i.to_string();
            let more = match self.node.child(&name) {
                None => seq.next_element::<IgnoredAny>()?.is_some(),
                Some(child) if child.slot.is_some() => match seq.next_element_seed(FieldSeed)? {
                    Some(v) => {
                        store(child, v, self.fields);
                        true
                    }
                    None => false,
                },
                Some(child) => seq
                    .next_element_seed(NodeSeed {
                        node: child,
                        fields: &mut *self.fields,
                    })?
                    .is_some(),
            };
            if !more {
                return Ok(());
            }
            i += 1;
        }
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
}

/// Looks a key up among a trie node's children without allocating.
struct KeySeed<'t>(&'t Trie);

impl<'de, 't> DeserializeSeed<'de> for KeySeed<'t> {
    /// The child named, with its index.
    type Value = Option<(usize, &'t Trie)>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de, 't> Visitor<'de> for KeySeed<'t> {
    type Value = Option<(usize, &'t Trie)>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(self
            .0
            .children
            .iter()
            .enumerate()
            .find(|(_, (n, _))| n == v)
            .map(|(i, (_, t))| (i, t)))
    }
}

/// Captures one value as a [`Field`].
struct FieldSeed;

impl<'de> DeserializeSeed<'de> for FieldSeed {
    type Value = Field<'de>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Field<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for FieldSeed {
    type Value = Field<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E>(self) -> Result<Field<'de>, E> {
        Ok(Field::Null)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Field<'de>, E> {
        Ok(Field::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Field<'de>, E> {
        Ok(Field::Int(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Field<'de>, E> {
        Ok(Field::UInt(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Field<'de>, E> {
        Ok(Field::Float(v))
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Field<'de>, E> {
        Ok(Field::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Field<'de>, E> {
        Ok(Field::Str(Cow::Owned(v.to_string())))
    }
    fn visit_string<E>(self, v: String) -> Result<Field<'de>, E> {
        Ok(Field::Str(Cow::Owned(v)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Field<'de>, A::Error> {
        JsonSeed.visit_seq(seq).map(Field::Json)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Field<'de>, A::Error> {
        JsonSeed.visit_map(map).map(Field::Json)
    }
}

/// Parses JSON text as it is written (see [`JsonSeed`]): for texts that hold what events
/// carried (stored events, outbox bodies with their captures and payloads).
pub fn parse_json(text: &str) -> serde_json::Result<serde_json::Value> {
    let mut de = serde_json::Deserializer::from_str(text);
    let v = JsonSeed.deserialize(&mut de)?;
    de.end()?;
    Ok(v)
}

/// Reads any JSON value as it is written. Not `serde_json::Value`'s own deserializer:
/// with the `raw_value` feature (the HTTP source splits bodies with it) that takes an
/// object whose first member has serde_json's private raw-value name for the JSON text
/// in its value, so an event could pass an object off as any other value.
struct JsonSeed;

impl<'de> DeserializeSeed<'de> for JsonSeed {
    type Value = serde_json::Value;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for JsonSeed {
    type Value = serde_json::Value;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        // JSON text has no NaN or infinity: a number out of range fails before this.
        Ok(serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, Into::into))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(e) = seq.next_element_seed(JsonSeed)? {
            v.push(e);
        }
        Ok(serde_json::Value::Array(v))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut m = serde_json::Map::new();
        while let Some(k) = map.next_key::<String>()? {
            let v = map.next_value_seed(JsonSeed)?;
            m.insert(k, v);
        }
        Ok(serde_json::Value::Object(m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::load_sources;

    fn rules() -> RuleSet {
        let yaml = r#"
rules:
  - name: r
    trigger: { where: { type: A, "n": 1, "obj": {"x": [1, 2.0]} }, key: data.id }
    expect:
      - { step: s, key: items.1.id, within: 1m }
"#;
        load_sources(&[("r.yaml".into(), yaml.into())]).unwrap()
    }

    /// A float decodes to the nearest f64, as the rules' YAML does (serde_json's default
    /// parse could be one unit off in the last place for some spellings, so a rule's
    /// `where` on such a number did not match an event with the same text).
    #[test]
    fn floats_decode_exactly() {
        let rs = rules();
        let d = Decoder::new(&rs, "time");
        let n = rs.paths.iter().position(|p| p == &["n"]).unwrap();
        for text in ["123456789012345680000.0", "2.2250738585072011e-308", "0.1"] {
            let line = format!(r#"{{"n":{text},"time":"2026-01-01T00:00:00Z"}}"#);
            let ev = d.decode(line.as_bytes(), None).unwrap();
            let want: f64 = text.parse().unwrap();
            assert_eq!(ev.field(n), Some(&Field::Float(want)), "{text}");
        }
    }

    #[test]
    fn decodes_only_needed_fields() {
        let rs = rules();
        let d = Decoder::new(&rs, "time");
        let line = br#"{"type":"A","n":1.0,"obj":{"x":[1,2]},"junk":{"deep":[1,{"a":2}]},"data":{"id":7},"items":[{"id":"a"},{"id":"b"}],"time":"2026-01-01T00:00:00Z"}"#;
        let ev = d.decode(line, None).unwrap();
        let id = |segs: &[&str]| {
            rs.paths
                .iter()
                .position(|p| p.iter().map(String::as_str).eq(segs.iter().copied()))
                .unwrap()
        };
        assert_eq!(ev.field(id(&["type"])), Some(&Field::Str("A".into())));
        assert!(ev.field(id(&["n"])).unwrap().equals(&serde_json::json!(1)));
        assert!(
            ev.field(id(&["obj"]))
                .unwrap()
                .equals(&serde_json::json!({"x": [1.0, 2]}))
        );
        assert_eq!(ev.field(id(&["data", "id"])).unwrap().key().unwrap(), "7");
        assert_eq!(
            ev.field(id(&["items", "1", "id"])).unwrap().key().unwrap(),
            "b"
        );
    }

    #[test]
    fn rejects_bad_lines() {
        let d = Decoder::new(&rules(), "time");
        assert!(matches!(
            d.decode(b"[1]", None),
            Err(DecodeError::NotObject)
        ));
        assert!(matches!(
            d.decode(b"{\"a\":", None),
            Err(DecodeError::Json(_))
        ));
        assert!(matches!(d.decode(b"{} x", None), Err(DecodeError::Json(_))));
        assert!(matches!(d.decode(b"{}", None), Err(DecodeError::NoTime(_))));
        assert!(matches!(
            d.decode(br#"{"time":"yesterday"}"#, None),
            Err(DecodeError::BadTime(..))
        ));
        assert!(matches!(
            d.decode(br#"{"time":5}"#, None),
            Err(DecodeError::BadTime(..))
        ));
        // Valid RFC 3339, beyond what the clock holds: said so, not "not RFC 3339".
        for t in ["9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z"] {
            let line = format!(r#"{{"time":"{t}"}}"#);
            let e = d.decode(line.as_bytes(), None);
            assert!(matches!(e, Err(DecodeError::TimeOutOfRange(..))), "{e:?}");
        }
        assert!(matches!(
            d.decode(br#"{"time":"9999-13-31T23:59:59Z"}"#, None),
            Err(DecodeError::BadTime(..))
        ));
    }

    #[test]
    fn keys_are_strings_or_integers() {
        assert_eq!(Field::Str("x".into()).key().unwrap(), "x");
        assert_eq!(Field::Int(-3).key().unwrap(), "-3");
        assert!(Field::Str("".into()).key().is_none());
        let long = "k".repeat(MAX_KEY_BYTES);
        assert_eq!(Field::Str(long.as_str().into()).key().unwrap(), long);
        assert!(Field::Str(format!("{long}k").into()).key().is_none());
        assert!(Field::Float(1.0).key().is_none());
        assert!(Field::Bool(true).key().is_none());
        assert!(Field::Null.key().is_none());
    }

    #[test]
    fn numbers_compare_numerically_types_must_agree() {
        assert!(Field::Int(1).equals(&serde_json::json!(1.0)));
        assert!(Field::Float(2.0).equals(&serde_json::json!(2)));
        assert!(!Field::Str("1".into()).equals(&serde_json::json!(1)));
        assert!(!Field::Bool(true).equals(&serde_json::json!(1)));
        assert!(Field::Null.equals(&serde_json::Value::Null));
        assert!(!Field::UInt(u64::MAX).equals(&serde_json::json!(-1)));
        // Whole floats up to 2^64 equal the u64 they are.
        assert!(Field::UInt(18_000_000_000_000_000_000).equals(&serde_json::json!(1.8e19)));
        assert!(Field::Float(1.8e19).equals(&serde_json::json!(18_000_000_000_000_000_000u64)));
        assert!(!Field::UInt(u64::MAX).equals(&serde_json::json!(1e300)));
        assert!(!Field::Int(i64::MIN).equals(&serde_json::json!(-1e300)));
    }

    /// Paths `a.01` and `a.+1` name object members only, and the same whether the array
    /// holding them is walked or captured whole (by another path, `a`); `a.1` indexes it.
    #[test]
    fn only_canonical_numbers_index_arrays() {
        let yaml = r#"
rules:
  - name: r
    trigger: { where: { "a.01": x, "a.+1": x, "a.1": y }, key: k }
    expect: [{ step: s, key: k, within: 1m }]
  - name: whole
    trigger: { where: { a: [] }, key: k }
    expect: [{ step: s, key: k, within: 1m }]
"#;
        let rs = load_sources(&[("r.yaml".into(), yaml.into())]).unwrap();
        let d = Decoder::new(&rs, "time");
        let id = |p: &str| rs.paths.iter().position(|q| q.join(".") == p).unwrap();
        let ev = d
            .decode(br#"{"time":"2026-01-01T00:00:00Z","a":["x","y"]}"#, None)
            .unwrap();
        assert_eq!(ev.field(id("a.1")), Some(&Field::Str("y".into())));
        assert_eq!(ev.field(id("a.01")), None);
        assert_eq!(ev.field(id("a.+1")), None);
        let ev = d
            .decode(
                br#"{"time":"2026-01-01T00:00:00Z","a":{"01":"x","1":"y"}}"#,
                None,
            )
            .unwrap();
        assert_eq!(ev.field(id("a.01")), Some(&Field::Str("x".into())));
        assert_eq!(ev.field(id("a.1")), Some(&Field::Str("y".into())));
    }

    /// An object is an object whatever its members are named: serde_json's private
    /// raw-value name neither turns it into the value its text spells nor fails the line.
    #[test]
    fn an_object_with_serde_json_s_raw_value_name_is_an_object() {
        let rs = rules();
        let d = Decoder::new(&rs, "time");
        let obj = rs.paths.iter().position(|p| p == &["obj"]).unwrap();
        let magic = "$serde_json::private::RawValue";
        let text = serde_json::Value::from(r#"{"x":[1,2.0]}"#);
        for inner in [text, serde_json::Value::from(5)] {
            let line = format!(r#"{{"time":"2026-01-01T00:00:00Z","obj":{{"{magic}":{inner}}}}}"#);
            let ev = d.decode(line.as_bytes(), None).unwrap();
            let want =
                serde_json::Value::Object([(magic.to_string(), inner)].into_iter().collect());
            assert_eq!(ev.field(obj), Some(&Field::Json(want.clone())), "{line}");
            // And so when read back from an outbox body or a stored event.
            assert_eq!(parse_json(&want.to_string()).unwrap(), want);
        }
        assert!(parse_json("{} x").is_err());
    }

    /// A member named twice: the last one counts, whole, as serde_json reads it.
    #[test]
    fn the_last_of_duplicate_members_wins_whole() {
        let rs = rules();
        let d = Decoder::new(&rs, "time");
        let key = rs
            .paths
            .iter()
            .position(|p| p.join(".") == "data.id")
            .unwrap();
        let ev = d
            .decode(
                br#"{"time":"2026-01-01T00:00:00Z","data":{"id":"old"},"data":{"x":1}}"#,
                None,
            )
            .unwrap();
        assert_eq!(ev.field(key), None);
        let ev = d
            .decode(
                br#"{"time":"2026-01-01T00:00:00Z","data":{"id":"old"},"data":{"id":"new"}}"#,
                None,
            )
            .unwrap();
        assert_eq!(ev.field(key), Some(&Field::Str("new".into())));
    }
}
