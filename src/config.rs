//! The daemon's config file: raw serde types mirroring the YAML, `${ENV}` interpolation,
//! and validation into [`Config`], reporting every problem with file:line:column.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::rules::{self, FileDiag, Known, RuleSet, RulesError};
use crate::time::Duration;
use crate::yaml::{self, Diag, Node, Pos, Value, YamlPath};

/// The config file as written. Paths are relative to the config file's directory.
#[derive(Debug, Default, Deserialize)]
pub struct RawConfig {
    /// SQLite state file. Default `sagawatch.db`.
    #[serde(default)]
    pub state: Option<String>,
    /// Rules file or directory (required; checked in validation, so that its absence
    /// does not hide the other problems).
    #[serde(default)]
    pub rules: Option<String>,
    /// HTTP listen address. Default `127.0.0.1:9464`.
    #[serde(default)]
    pub listen: Option<String>,
    /// Bearer token required on mutating endpoints (`/v1/events`, `/-/reload`).
    #[serde(default)]
    pub token: Option<String>,
    /// File holding the bearer token (alternative to `token`).
    #[serde(default)]
    pub token_file: Option<String>,
    /// Host names a loopback listener answers to besides IP addresses and `localhost`.
    #[serde(default)]
    pub allowed_hosts: Option<Vec<String>>,
    #[serde(default)]
    pub time: Option<RawTime>,
    #[serde(default)]
    pub batch: Option<RawBatch>,
    #[serde(default)]
    pub sources: BTreeMap<String, RawSource>,
    #[serde(default)]
    pub sinks: BTreeMap<String, RawSink>,
    #[serde(default)]
    pub alerts: Option<RawAlerts>,
    #[serde(default)]
    pub outbox: Option<RawOutbox>,
    /// The Kafka cluster that `kafka` sources and sinks use.
    #[serde(default)]
    pub kafka: Option<RawKafka>,
}

impl RawConfig {
    /// Takes the sections `other` has (a section read on its own is the only one it has).
    fn absorb(&mut self, other: RawConfig) {
        let RawConfig {
            state,
            rules,
            listen,
            token,
            token_file,
            allowed_hosts,
            time,
            batch,
            sources,
            sinks,
            alerts,
            outbox,
            kafka,
        } = other;
        self.state = self.state.take().or(state);
        self.rules = self.rules.take().or(rules);
        self.listen = self.listen.take().or(listen);
        self.token = self.token.take().or(token);
        self.token_file = self.token_file.take().or(token_file);
        self.allowed_hosts = self.allowed_hosts.take().or(allowed_hosts);
        self.time = self.time.take().or(time);
        self.batch = self.batch.take().or(batch);
        self.sources.extend(sources);
        self.sinks.extend(sinks);
        self.alerts = self.alerts.take().or(alerts);
        self.outbox = self.outbox.take().or(outbox);
        self.kafka = self.kafka.take().or(kafka);
    }
}

#[derive(Debug, Deserialize)]
pub struct RawKafka {
    /// Bootstrap servers, `host:port[,host:port…]` (required).
    #[serde(default)]
    pub brokers: Option<String>,
    /// Consumer group id. Default `sagawatch`.
    #[serde(default)]
    pub group: Option<String>,
    /// librdkafka properties for the consumer and the producer (`security.protocol`,
    /// `sasl.*`, `ssl.*`, …). Values may use `${ENV}`; they are never logged.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// librdkafka properties for the consumer only.
    #[serde(default)]
    pub consumer: BTreeMap<String, String>,
    /// librdkafka properties for the producer only.
    #[serde(default)]
    pub producer: BTreeMap<String, String>,
    /// How long startup waits for the brokers' topic metadata. Default `30s`.
    #[serde(default)]
    pub connect_timeout: Option<String>,
    /// Messages are applied in timestamp order across partitions; this is how long a
    /// partition's messages wait for another partition known to hold older ones.
    /// Default `10s`; `0s` merges only what has arrived.
    #[serde(default)]
    pub align_wait: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RawTime {
    /// Dot path of the event time (RFC 3339). Default `time`.
    #[serde(default)]
    pub field: Option<String>,
    /// How far the clock runs behind the largest event time. Default `0s`.
    #[serde(default)]
    pub lateness: Option<String>,
    /// After this long without events the clock also follows wall time − lateness.
    /// Default `10s`; `0s` turns the fallback off.
    #[serde(default)]
    pub idle: Option<String>,
    /// `event` (default) or `wall` (event times are the receipt times).
    #[serde(default)]
    pub clock: Option<String>,
    /// Event times further than this ahead of the wall clock do not move the clock.
    /// Default: off.
    #[serde(default)]
    pub max_ahead: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RawBatch {
    /// Commit after this many events. Default 20000.
    #[serde(default)]
    pub events: Option<u64>,
    /// ... or after this long. Default `100ms`.
    #[serde(default)]
    pub interval: Option<String>,
    /// `normal` (default) or `full`: whether each commit waits for the disk.
    #[serde(default)]
    pub sync: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RawSource {
    /// `file`, `stdin`, `http` or `kafka` (required; empty when missing).
    #[serde(rename = "type", default)]
    pub kind: String,
    /// `file`: the JSON-lines file to follow.
    #[serde(default)]
    pub path: Option<String>,
    /// `file`: keep following after the end (`true`, default) or stop at the end.
    #[serde(default)]
    pub follow: Option<bool>,
    /// `http`: largest accepted request body in bytes. Default 10485760 (10 MiB).
    #[serde(default)]
    pub max_body: Option<u64>,
    /// `kafka`: the topic. Default: the source's name.
    #[serde(default)]
    pub topic: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RawSink {
    /// `webhook`, `alertmanager`, `stdout` or `kafka` (required; empty when missing).
    #[serde(rename = "type", default)]
    pub kind: String,
    /// `webhook`: the URL to POST to; `alertmanager`: its base URL.
    #[serde(default)]
    pub url: Option<String>,
    /// `webhook`: signing secrets (`whsec_…` base64 or raw); the first signs, all are
    /// sent, so receivers can rotate.
    #[serde(default)]
    pub secrets: Vec<String>,
    /// `webhook`: files each holding one secret.
    #[serde(default)]
    pub secret_files: Vec<String>,
    /// Per-request timeout. Default `10s`.
    #[serde(default)]
    pub timeout: Option<String>,
    /// `alertmanager`: how often firing alerts are re-sent. Default `1m`.
    #[serde(default)]
    pub resend: Option<String>,
    /// Extra HTTP headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// `webhook`, `alertmanager` with an `https://` URL: a PEM file of the CA certificates
    /// to trust instead of the system's (a private CA).
    #[serde(default)]
    pub ca_file: Option<String>,
    /// `webhook`, `alertmanager` with an `https://` URL: a client certificate (PEM, the
    /// chain after it) for receivers that ask for one, with `key_file`.
    #[serde(default)]
    pub cert_file: Option<String>,
    /// The private key of `cert_file` (PEM, unencrypted).
    #[serde(default)]
    pub key_file: Option<String>,
    /// `kafka`: the topic compensation commands are produced to.
    #[serde(default)]
    pub topic: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RawAlerts {
    /// Sinks for alerts whose rule names none. Default: every `stdout` sink.
    #[serde(default)]
    pub sinks: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
pub struct RawOutbox {
    /// Deliveries in flight at once. Default 8.
    #[serde(default)]
    pub concurrency: Option<u64>,
    /// First retry delay. Default `1s`.
    #[serde(default)]
    pub backoff: Option<String>,
    /// Longest retry delay. Default `5m`.
    #[serde(default)]
    pub max_backoff: Option<String>,
    /// Give up on a message this long after it was created. Default `24h`.
    #[serde(default)]
    pub give_up: Option<String>,
    /// Keep delivered messages (for the timeline) this long. Default `7d`.
    #[serde(default)]
    pub retain: Option<String>,
}

/// A secret: never printed.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Secret(pub Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// How durable a batch's commit is (SQLite's `synchronous` on the core's connection).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchSync {
    /// Survives a crash of the daemon; the last batches may be lost with the machine.
    Normal,
    /// Each commit waits until the WAL is on disk: survives the machine too.
    Full,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClockMode {
    Event,
    Wall,
}

#[derive(Clone, Debug)]
pub struct TimeConfig {
    pub field: String,
    pub lateness: i64,
    /// Nanoseconds; 0 disables the idle fallback.
    pub idle: i64,
    pub clock: ClockMode,
    /// Nanoseconds: event times past wall time plus this do not move the clock (`None`:
    /// off).
    pub max_ahead: Option<i64>,
}

#[derive(Clone, Debug)]
pub enum SourceKind {
    File { path: PathBuf, follow: bool },
    Stdin,
    Http { max_body: usize },
    Kafka { topic: String },
}

#[derive(Clone, Debug)]
pub struct Source {
    pub name: String,
    pub kind: SourceKind,
}

#[derive(Clone, Debug)]
pub enum SinkKind {
    Stdout,
    Webhook {
        url: hyper::Uri,
        secrets: Vec<Secret>,
        headers: Vec<(String, String)>,
        tls: Tls,
    },
    Alertmanager {
        url: hyper::Uri,
        resend: std::time::Duration,
        headers: Vec<(String, String)>,
        tls: Tls,
    },
    Kafka {
        topic: String,
    },
}

impl SinkKind {
    pub fn takes_payloads(&self) -> bool {
        !matches!(self, SinkKind::Alertmanager { .. })
    }

    /// An HTTP sink's TLS settings (none for the others).
    pub fn tls(&self) -> &Tls {
        const NONE: &Tls = &Tls {
            ca: Vec::new(),
            client: None,
        };
        match self {
            SinkKind::Webhook { tls, .. } | SinkKind::Alertmanager { tls, .. } => tls,
            _ => NONE,
        }
    }
}

/// How an HTTP sink speaks TLS, beyond the defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Tls {
    /// The CA certificates (PEM, one each) trusted instead of the system's; empty: the
    /// system's.
    pub ca: Vec<String>,
    /// The client certificate to show.
    pub client: Option<ClientCert>,
}

/// A client certificate with its key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClientCert {
    /// PEM: the certificate, then the rest of its chain.
    pub chain: String,
    /// PEM, PKCS#8.
    pub key: Secret,
}

#[derive(Clone, Debug)]
pub struct Sink {
    pub name: String,
    pub kind: SinkKind,
    pub timeout: std::time::Duration,
}

#[derive(Clone, Debug)]
pub struct OutboxConfig {
    pub concurrency: usize,
    pub backoff: std::time::Duration,
    pub max_backoff: std::time::Duration,
    pub give_up: std::time::Duration,
    pub retain: std::time::Duration,
}

/// Settings librdkafka owns for sagawatch: set through other keys, or fixed because
/// correctness depends on them.
pub const KAFKA_RESERVED: &[(&str, &str)] = &[
    ("bootstrap.servers", "set `kafka.brokers`"),
    ("metadata.broker.list", "set `kafka.brokers`"),
    ("group.id", "set `kafka.group`"),
    (
        "enable.auto.commit",
        "offsets are stored in the state file with the state they caused",
    ),
    (
        "enable.auto.offset.store",
        "offsets are stored in the state file with the state they caused",
    ),
    (
        "partition.assignment.strategy",
        "co-partitioned topics need the range assignor",
    ),
    (
        "group.protocol",
        "co-partitioned topics need the range assignor",
    ),
    (
        "statistics.interval.ms",
        "the statistics (every second) drive lag, readiness and the idle clock",
    ),
    (
        "enable.partition.eof",
        "the end of a partition is known from the statistics",
    ),
    ("enable.idempotence", "the producer is always idempotent"),
    (
        "delivery.report.only.error",
        "a command counts as delivered only on its successful delivery report",
    ),
    (
        "message.timeout.ms",
        "set the kafka sinks' `timeout` (the producer waits for the longest)",
    ),
    (
        "delivery.timeout.ms",
        "set the kafka sinks' `timeout` (the producer waits for the longest)",
    ),
    (
        "transactional.id",
        "no transactions: a transactional producer refuses every message sent outside one (the outbox's stable ids give at-least-once)",
    ),
    (
        "acks",
        "the idempotent producer always waits for all replicas",
    ),
    (
        "request.required.acks",
        "the idempotent producer always waits for all replicas",
    ),
];

/// Properties sagawatch sets by default, before the config's own (which override them).
const KAFKA_DEFAULTS: &[&str] = &["auto.offset.reset", "linger.ms", "partitioner", "client.id"];

/// The name under which a property the config sets reaches librdkafka: one sagawatch
/// sets too (reserved or by default) under that one name. librdkafka also takes a topic
/// property with a `topic.` prefix, and `queue.buffering.max.ms` is what `linger.ms`
/// stands for; both names reaching it would leave which value wins to the order they
/// are applied in. (Other `topic.` names, such as `topic.metadata.refresh.interval.ms`,
/// are properties of their own and stay as written.)
pub fn kafka_key(key: &str) -> &str {
    let ours = |k: &str| KAFKA_DEFAULTS.contains(&k) || KAFKA_RESERVED.iter().any(|(r, _)| *r == k);
    let key = match key.strip_prefix("topic.") {
        Some(k) if ours(k) => k,
        _ => key,
    };
    match key {
        "queue.buffering.max.ms" => "linger.ms",
        k => k,
    }
}

/// The Kafka cluster. Property values may hold secrets: `Debug` prints keys only.
#[derive(Clone)]
pub struct KafkaConfig {
    pub brokers: String,
    pub group: String,
    /// `properties` then `consumer`, in order (later wins).
    pub consumer: Vec<(String, String)>,
    /// `properties` then `producer`.
    pub producer: Vec<(String, String)>,
    pub connect_timeout: std::time::Duration,
    pub align_wait: std::time::Duration,
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys = |v: &[(String, String)]| v.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("group", &self.group)
            .field("consumer", &keys(&self.consumer))
            .field("producer", &keys(&self.producer))
            .finish()
    }
}

/// A validated config.
#[derive(Clone, Debug)]
pub struct Config {
    pub file: PathBuf,
    pub state: PathBuf,
    pub rules_path: PathBuf,
    pub listen: SocketAddr,
    pub token: Option<Secret>,
    /// Host names (lowercase, without a trailing dot) a loopback listener answers to
    /// besides IP addresses and `localhost`; `*` for any.
    pub allowed_hosts: Vec<String>,
    pub time: TimeConfig,
    pub batch_events: usize,
    pub batch_interval: std::time::Duration,
    pub batch_sync: BatchSync,
    pub sources: Vec<Source>,
    pub sinks: Vec<Sink>,
    pub alert_sinks: Vec<String>,
    pub outbox: OutboxConfig,
    pub kafka: Option<KafkaConfig>,
    /// What rules may reference: every source and sink the file declares, including those
    /// whose definition has problems (so `validate` reports no follow-on "unknown sink").
    known: Known,
    /// Values taken from the environment, with the `${NAME}` each came from.
    from_env: EnvValues,
}

/// Values taken from the environment: secrets among them, so `Debug` shows the names.
#[derive(Clone, Default)]
struct EnvValues(Vec<(String, String)>);

impl std::fmt::Debug for EnvValues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(_, n)| n))
            .finish()
    }
}

impl Config {
    /// `message` (about something this config set, found after loading it: an unusable
    /// state path, say) with each value from the environment named as `${NAME}`, as the
    /// config's own messages are.
    pub fn masked(&self, message: &str) -> String {
        without_env_values(message, &self.from_env.0)
    }

    /// What rules may reference.
    pub fn known(&self) -> Known {
        self.known.clone()
    }

    /// Loads the rules this config names, checking their source and sink references.
    pub fn load_rules(&self) -> Result<RuleSet, RulesError> {
        rules::load_known(&self.rules_path, &self.known())
    }
}

/// Every problem in a config file, in the same `file:line:col: path: message` form as
/// rules problems.
pub type ConfigError = RulesError;

/// Replaces `${NAME}` (and `${NAME:-default}`) in every string scalar with the environment
/// variable; `$$` is a literal `$`. A variable that is unset and has no default is an error
/// at the scalar's position. Each value taken from the environment is added to `from_env`
/// with its `${NAME}`, so that messages can leave it out.
pub fn interpolate(
    node: &mut Node,
    path: &YamlPath,
    env: &dyn Fn(&str) -> Option<String>,
    diags: &mut Vec<Diag>,
    from_env: &mut Vec<(String, String)>,
) {
    match &mut node.value {
        Value::Str(s) if s.contains('$') => match expand(s, env, from_env) {
            Ok(v) => {
                // A value that reads as a number or boolean serves where one is expected
                // (`concurrency: ${N}`); its text still serves where a string is. Never
                // null: `token: ${TOKEN}` must not turn into "no token".
                node.value = match yaml::resolve_plain(&v) {
                    x @ (Value::Int(_) | Value::Float(_) | Value::Bool(_)) => x,
                    _ => Value::Str(v.clone()),
                };
                node.text = Some(v);
            }
            Err(e) => diags.push(Diag {
                pos: node.pos,
                path: path.to_string(),
                message: e,
            }),
        },
        Value::Seq(items) => {
            for (i, n) in items.iter_mut().enumerate() {
                interpolate(n, &path.index(i), env, diags, from_env);
            }
        }
        Value::Map(entries) => {
            for (k, v) in entries.iter_mut() {
                let key = k.text.clone().unwrap_or_default();
                interpolate(v, &path.key(&key), env, diags, from_env);
            }
        }
        _ => {}
    }
}

/// `s` with its `${...}` expanded; every variable that is not set (or empty) is named in
/// the one error.
fn expand(
    s: &str,
    env: &dyn Fn(&str) -> Option<String>,
    from_env: &mut Vec<(String, String)>,
) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut missing: Vec<String> = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = after.strip_prefix('{') {
            let Some(end) = r.find('}') else {
                return Err("unterminated ${...}".into());
            };
            let inner = &r[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("invalid variable name {name:?} in ${{...}}"));
            }
            // The first `}` ends it: a `${` in the default would be taken as text.
            if default.is_some_and(|d| d.contains("${")) {
                return Err(format!(
                    "the default of ${{{name}:-...}} holds a ${{...}}: defaults are plain \
                     text, not expanded"
                ));
            }
            let set = env(name).filter(|v| !v.is_empty());
            if let Some(v) = &set {
                from_env.push((v.clone(), format!("${{{name}}}")));
            }
            match set.or(default.map(String::from)) {
                Some(v) => out.push_str(&v),
                None => {
                    let why = if env(name).is_some() {
                        "is empty"
                    } else {
                        "is not set"
                    };
                    missing.push(format!("environment variable {name} {why}"));
                }
            }
            rest = &r[end + 1..];
        } else if after.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
            // As a shell, systemd or compose would read it: taken literally, `token:
            // $TOKEN` would make the text "$TOKEN" the token.
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            return Err(format!(
                "${name} is not expanded: write ${{{name}}} for the environment variable, or $${name} for the text"
            ));
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    if missing.is_empty() {
        Ok(out)
    } else {
        Err(missing.join("; "))
    }
}

/// Reads and validates a config file against the process environment.
pub fn load(file: &Path) -> Result<Config, ConfigError> {
    match check_file(file) {
        (Some(c), None) => Ok(c),
        (_, e) => Err(e.unwrap_or(ConfigError { diags: Vec::new() })),
    }
}

/// Checks a config file: its problems, if any, and the config as far as it could be built
/// (even with problems, unless the file is not a config at all), so `validate` can check
/// the rules too.
pub fn check_file(file: &Path) -> (Option<Config>, Option<ConfigError>) {
    let text = match std::fs::read_to_string(file).map_err(|e| ConfigError {
        diags: vec![FileDiag {
            file: file.to_path_buf(),
            diag: Diag {
                pos: Pos::default(),
                path: String::new(),
                message: format!("cannot read: {e}"),
            },
        }],
    }) {
        Ok(t) => t,
        Err(e) => return (None, Some(e)),
    };
    check_text(file, &text, &|k| std::env::var(k).ok())
}

/// Validates config text; `env` resolves `${NAME}`.
pub fn load_text(
    file: &Path,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    match check_text(file, text, env) {
        (Some(c), None) => Ok(c),
        (_, e) => Err(e.unwrap_or(ConfigError { diags: Vec::new() })),
    }
}

/// What librdkafka says of one property (an unknown name, a value of the wrong form), so
/// that `validate` finds it at its place in the config, offline. The value is not repeated:
/// it may be a password.
fn kafka_property_problem(key: &str, value: &str) -> Option<String> {
    match rdkafka::ClientConfig::new()
        .set(key, value)
        .create_native_config()
    {
        Ok(_) => None,
        Err(rdkafka::error::KafkaError::ClientConfig(_, desc, _, v)) => {
            Some(crate::config::without_value(&desc, &v))
        }
        Err(e) => Some(e.to_string()),
    }
}

/// librdkafka's description of a property problem without the value (it may be a
/// password): its quoted form, as librdkafka writes it, and any other occurrence of a
/// value long enough not to garble the words around it.
pub fn without_value(desc: &str, value: &str) -> String {
    let desc = desc.trim_end();
    if value.is_empty() {
        return desc.to_string();
    }
    let d = desc.replace(&format!("\"{value}\""), "(value not shown)");
    if value.len() >= 4 {
        d.replace(value, "(value not shown)")
    } else {
        d
    }
}

/// `message` with every value of `from_env` (as written, or escaped as `{:?}` quotes it)
/// replaced by its `${NAME}`. Values shorter than 4 bytes stay: replacing them would
/// garble the words around them, and they are no secrets.
/// One pass, longest value first, so that a value inside another variable's name is not
/// replaced within the `${NAME}` just put in.
fn without_env_values(message: &str, from_env: &[(String, String)]) -> String {
    // Each value as written and as `{:?}` writes it, without its quotes
    // (`str::escape_debug` escapes `'` too).
    // Trimmed too: values are trimmed before they are read (a secret from a file often
    // ends in a newline).
    let mut forms: Vec<(String, &str)> = Vec::new();
    for (value, name) in from_env {
        for v in [value.as_str(), value.trim()] {
            if v.len() >= 4 {
                let quoted = format!("{v:?}");
                forms.push((quoted[1..quoted.len() - 1].to_string(), name));
                forms.push((v.to_string(), name));
            }
        }
    }
    forms.sort_by_key(|(v, _)| std::cmp::Reverse(v.len()));
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    'scan: while let Some(c) = rest.chars().next() {
        for (value, name) in &forms {
            if let Some(after) = rest.strip_prefix(value.as_str()) {
                out.push_str(name);
                rest = after;
                continue 'scan;
            }
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// The most deliveries in flight per sink (`outbox.concurrency`).
const MAX_CONCURRENCY: u64 = 1024;

/// The longest `timeout` of a `kafka` sink: librdkafka's `message.timeout.ms` is a 32-bit
/// count of milliseconds (about 24.8 days).
const MAX_KAFKA_TIMEOUT_MS: u128 = i32::MAX as u128;

/// Checks one entry of `kafka.brokers`: `host:port`, optionally after a security protocol
/// (`SSL://host:port`), the host a name, an IPv4 address or a bracketed IPv6 one. The
/// entry itself is not repeated: it may come from the environment.
fn broker_address(entry: &str) -> Result<(), &'static str> {
    let entry = match entry.split_once("://") {
        Some((proto, rest))
            if ["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"]
                .contains(&proto.to_ascii_lowercase().as_str()) =>
        {
            rest
        }
        Some(_) => {
            return Err("unknown protocol before `://` (PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL)");
        }
        None => entry,
    };
    if entry.is_empty() {
        return Err("empty (a comma too many?)");
    }
    let Some((host, port)) = entry.rsplit_once(':') else {
        return Err("not host:port (the port is required)");
    };
    if port.is_empty()
        || !port.bytes().all(|b| b.is_ascii_digit())
        || !port.parse::<u16>().is_ok_and(|p| p > 0)
    {
        return Err("the port is not a number from 1 to 65535");
    }
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        }
    };
    if host_ok {
        Ok(())
    } else {
        Err("the host is not a name or an IP address (an IPv6 one in brackets)")
    }
}

/// "a" or "an", before a type's name.
fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// Whether an authority's port (digits after the last colon) is out of range: the URI
/// parser takes it, and reports no port at all.
fn bad_port(authority: &str) -> bool {
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    // After an IPv6 literal's closing bracket, if any.
    let rest = host_port
        .rfind(']')
        .map_or(host_port, |i| &host_port[i + 1..]);
    rest.rsplit_once(':')
        .is_some_and(|(_, p)| !p.is_empty() && !p.parse::<u16>().is_ok_and(|p| p > 0))
}

/// Whether two paths name the same file: the same inode when both exist, else the same
/// path once `.` and `..` are resolved.
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    if let (Ok(x), Ok(y)) = (std::fs::metadata(a), std::fs::metadata(b)) {
        return (x.dev(), x.ino()) == (y.dev(), y.ino());
    }
    fn normal(p: &Path) -> PathBuf {
        let mut out = PathBuf::new();
        for c in p.components() {
            match c {
                std::path::Component::CurDir => {}
                std::path::Component::ParentDir => {
                    out.pop();
                }
                c => out.push(c),
            }
        }
        out
    }
    normal(a) == normal(b)
}

fn check_text(
    file: &Path,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> (Option<Config>, Option<ConfigError>) {
    let mut v = Checker {
        file: file.to_path_buf(),
        dir: file.parent().map(Path::to_path_buf).unwrap_or_default(),
        diags: Vec::new(),
        root: None,
        unknown: Vec::new(),
        from_env: Vec::new(),
    };
    let cfg = v.check(text, env);
    let unknown: Vec<_> = std::mem::take(&mut v.unknown);
    // A message quoting a value (`listen: "…" is not an address`) names the variable it
    // came from instead: a secret put under the wrong key must not reach the log.
    v.from_env
        .sort_by_key(|(value, _)| std::cmp::Reverse(value.len()));
    for d in &mut v.diags {
        d.message = without_env_values(&d.message, &v.from_env);
    }
    let mut cfg = cfg;
    if let Some(c) = &mut cfg {
        // Also on a config with problems: `validate` still checks its Kafka clients,
        // whose messages may quote values too.
        c.from_env = EnvValues(std::mem::take(&mut v.from_env));
    }
    if v.diags.is_empty()
        && let Some(c) = cfg
    {
        return (Some(c), None);
    }
    let mut diags: Vec<FileDiag> = v
        .diags
        .into_iter()
        .map(|diag| FileDiag {
            file: file.to_path_buf(),
            diag,
        })
        .collect();
    diags.sort_by_key(|d| (d.diag.pos.line, d.diag.pos.col));
    // A value whose `${...}` could not be expanded is unknown: what else was said about
    // it (that `${ADDR}` is not an address) is noise. The sort is stable and the
    // interpolation problems were found first, so each stays and the rest go.
    let mut seen = Vec::new();
    diags.retain(|d| {
        let pos = d.diag.pos;
        if !unknown.contains(&pos) {
            return true;
        }
        let first = !seen.contains(&pos);
        seen.push(pos);
        first
    });
    (cfg, Some(ConfigError { diags }))
}

struct Checker {
    file: PathBuf,
    dir: PathBuf,
    diags: Vec<Diag>,
    root: Option<Node>,
    /// Where `${...}` could not be expanded.
    unknown: Vec<Pos>,
    /// Values taken from the environment, with their `${NAME}`: secrets, often.
    from_env: Vec<(String, String)>,
}

impl Checker {
    /// Whether `rules` is a directory whose rule files would include the config file.
    fn rules_dir_holds_config(&self, rules: &Path) -> bool {
        let yaml = self
            .file
            .extension()
            .is_some_and(|e| e == "yaml" || e == "yml");
        let hidden = self
            .file
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        let dir = match self.dir.as_os_str().is_empty() {
            true => Path::new("."),
            false => &self.dir,
        };
        yaml && !hidden
            && rules.is_dir()
            && matches!(
                (std::fs::canonicalize(dir), std::fs::canonicalize(rules)),
                (Ok(a), Ok(b)) if a == b
            )
    }

    /// After the config failed to read (a value of the wrong type): reads each top-level
    /// section on its own, so the problems of the sections after the one that failed show
    /// too (a section that fails ends the reading of the mapping it is in). Returns the
    /// sections that read, and the names of those that did not.
    fn each_section(&mut self, root: &Node) -> (RawConfig, Vec<String>) {
        let mut raw = RawConfig::default();
        let mut failed = Vec::new();
        let Value::Map(entries) = &root.value else {
            return (raw, failed);
        };
        for (k, v) in entries {
            let one = Node {
                pos: root.pos,
                value: Value::Map(vec![(k.clone(), v.clone())]),
                text: None,
            };
            let mut found = Vec::new();
            match yaml::from_node::<RawConfig>(&one, &YamlPath::default(), &mut found) {
                Some(section) => raw.absorb(section),
                None => failed.push(match &k.value {
                    Value::Str(name) => name.clone(),
                    _ => String::new(),
                }),
            }
            for d in found {
                if !self.diags.contains(&d) {
                    self.diags.push(d);
                }
            }
        }
        (raw, failed)
    }

    fn err(&mut self, path: &YamlPath, message: impl Into<String>) {
        let pos = self
            .root
            .as_ref()
            .map(|r| r.locate(path))
            .unwrap_or_default();
        self.diags.push(Diag {
            pos,
            path: path.to_string(),
            message: message.into(),
        });
    }

    /// A librdkafka property's value, with a relative file path (`ssl.ca.location`,
    /// `sasl.kerberos.keytab`, …) taken relative to the config's directory, as every other
    /// path in the config is: librdkafka would take it from the working directory (`/`
    /// under the systemd unit), so a config that validated beside its files failed there.
    fn kafka_path(&self, key: &str, value: &str) -> String {
        let is_path = key.ends_with(".location") || key.ends_with(".keytab");
        // `probe`: ssl.ca.location's "find the system's CA certificates".
        if !is_path || value.is_empty() || value == "probe" || Path::new(value).is_absolute() {
            return value.to_string();
        }
        self.resolve(value).to_string_lossy().into_owned()
    }

    fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir.join(p)
        }
    }

    fn duration(
        &mut self,
        path: &YamlPath,
        text: Option<&str>,
        default: &str,
        zero_ok: bool,
    ) -> i64 {
        let t = text.unwrap_or(default);
        let r = if zero_ok {
            Duration::parse_span(t)
        } else {
            Duration::parse(t).map(|d| d.nanos())
        };
        match r {
            Ok(n) => n,
            Err(e) => {
                // The parser quotes the part it could not read (`unknown unit "…"`): part of
                // a value from the environment, which no masking of whole values finds.
                let masked = without_env_values(&e, &self.from_env);
                let from_env = self.from_env.iter().find(|(v, _)| {
                    let v = v.trim();
                    v.len() >= 4
                        && t.contains(v)
                        && v.as_bytes()
                            .windows(4)
                            .any(|w| masked.as_bytes().windows(4).any(|m| m == w))
                });
                match from_env {
                    Some((_, name)) => {
                        let name = name.clone();
                        self.err(
                            path,
                            format!(
                                "invalid duration from {name} (not shown): a number and a unit, one of ms, s, m, h, d (10s, 1h30m)"
                            ),
                        );
                    }
                    None => self.err(path, e),
                }
                1
            }
        }
    }

    fn std_duration(
        &mut self,
        path: &YamlPath,
        text: Option<&str>,
        default: &str,
    ) -> std::time::Duration {
        std::time::Duration::from_nanos(self.duration(path, text, default, false).max(0) as u64)
    }

    fn url(&mut self, path: &YamlPath, url: Option<&str>) -> hyper::Uri {
        let Some(u) = url else {
            self.err(&path.parent(), "missing field \"url\"");
            return hyper::Uri::default();
        };
        let fragment = u.contains('#');
        if fragment {
            // The client drops it: what the writer meant by it does not happen.
            self.err(path, "a URL fragment (`#…`) is never sent: leave it out");
        }
        // The rest is checked too: every problem at once.
        let u = u.split_once('#').map_or(u, |(before, _)| before);
        let uri = match u.parse::<hyper::Uri>() {
            // The client would connect to port 80 instead.
            Ok(uri) if uri.authority().is_some_and(|a| bad_port(a.as_str())) => {
                self.err(
                    path,
                    "invalid URL: its port is not a number from 1 to 65535",
                );
                hyper::Uri::default()
            }
            // The client sends no `Authorization` from them.
            Ok(uri) if uri.authority().is_some_and(|a| a.as_str().contains('@')) => {
                self.err(
                    path,
                    "credentials in the URL are not sent: give them in `headers` (`Authorization`)",
                );
                hyper::Uri::default()
            }
            Ok(uri)
                if matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some() =>
            {
                uri
            }
            // The value itself is not repeated: a URL may hold credentials or a token.
            Ok(uri) => {
                let what = match uri.scheme_str() {
                    Some(scheme) => format!("its scheme is {scheme:?}"),
                    None => "it has no scheme".into(),
                };
                self.err(
                    path,
                    format!("not an http:// or https:// URL with a host: {what}"),
                );
                hyper::Uri::default()
            }
            Err(e) => {
                self.err(path, format!("invalid URL: {e}"));
                hyper::Uri::default()
            }
        };
        if fragment { hyper::Uri::default() } else { uri }
    }

    fn check(&mut self, text: &str, env: &dyn Fn(&str) -> Option<String>) -> Option<Config> {
        let mut root = match yaml::parse(text, &mut self.diags) {
            Ok(n) => n,
            Err(d) => {
                self.diags.push(d);
                return None;
            }
        };
        let before = self.diags.len();
        interpolate(
            &mut root,
            &YamlPath::default(),
            env,
            &mut self.diags,
            &mut self.from_env,
        );
        self.unknown = self.diags[before..].iter().map(|d| d.pos).collect();
        // A value of the wrong type is reported and stands in as an empty one (a key left
        // out, mostly), so everything else is still checked; what is then said about it
        // or under it is dropped (below). Only when that cannot get through is each
        // section read on its own: after a section failed to read, the others are still
        // checked, without the problems that only its absence causes (a missing field, an
        // unknown name), and no config comes out.
        let read: Option<yaml::Read<RawConfig>> =
            yaml::read_node(&root, &YamlPath::default(), &mut self.diags);
        let (raw, patched, failed) = match read {
            Some(r) => (r.value, r.patched, None),
            None => {
                let (raw, failed) = self.each_section(&root);
                (raw, Vec::new(), Some(failed))
            }
        };
        let checked_from = self.diags.len();
        let broken = |section: &str| {
            failed
                .as_ref()
                .is_some_and(|f| f.iter().any(|s| s == section))
                || patched.iter().any(|p| p.to_string() == section)
        };
        self.root = Some(root);
        let top = YamlPath::default();

        if raw.state.as_deref().is_some_and(|s| s.trim().is_empty()) {
            self.err(
                &top.key("state"),
                "empty path (leave the key out for sagawatch.db beside the config)",
            );
        }
        let state = followed(self.resolve(raw.state.as_deref().unwrap_or("sagawatch.db")));
        // Missing: an empty path, which names no rules to check.
        let rules_path = raw
            .rules
            .as_deref()
            .map(|r| self.resolve(r))
            .unwrap_or_default();
        if raw.rules.is_none() && !broken("rules") {
            self.err(&top, "missing field \"rules\"");
        } else if raw.rules.as_deref().is_some_and(|r| r.trim().is_empty()) {
            // It would name the config's own directory, and load the config as rules.
            self.err(&top.key("rules"), "empty path");
        } else if !rules_path.exists() {
            self.err(
                &top.key("rules"),
                format!("{} does not exist", rules_path.display()),
            );
        } else if self.rules_dir_holds_config(&rules_path) {
            self.err(
                &top.key("rules"),
                format!(
                    "{} holds this config file, which would be read as a rules file: give the rules a directory of their own",
                    rules_path.display()
                ),
            );
        }
        let mut allowed_hosts = Vec::new();
        for (i, h) in raw.allowed_hosts.iter().flatten().enumerate() {
            let name = h.trim_end_matches('.').to_ascii_lowercase();
            if name != "*"
                && (name.is_empty()
                    || !name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'))
            {
                self.err(
                    &top.key("allowed_hosts").index(i),
                    format!("{h:?} is not a host name (or `*`)"),
                );
            }
            allowed_hosts.push(name);
        }
        let listen_text = raw.listen.as_deref().unwrap_or("127.0.0.1:9464");
        let listen = match listen_text.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                self.err(
                    &top.key("listen"),
                    format!("{listen_text:?} is not an IP:port address"),
                );
                SocketAddr::from(([127, 0, 0, 1], 9464))
            }
        };
        let token = match (&raw.token, &raw.token_file) {
            (Some(_), Some(_)) => {
                self.err(
                    &top.key("token_file"),
                    "give `token` or `token_file`, not both",
                );
                None
            }
            (Some(t), None) => self.token(&top.key("token"), t),
            (None, Some(f)) => self
                .read_secret(&top.key("token_file"), f)
                .and_then(|s| self.token(&top.key("token_file"), &String::from_utf8_lossy(&s.0))),
            (None, None) => {
                // `token:` with nothing after it (a template rendered without a value, say)
                // must not read as "no token": that would leave the endpoints open.
                for key in ["token", "token_file"] {
                    if self
                        .root
                        .as_ref()
                        .and_then(|r| r.get(key))
                        .is_some_and(|n| n.value == Value::Null)
                    {
                        self.err(
                            &top.key(key),
                            "empty (leave the key out to run without a token)",
                        );
                    }
                }
                None
            }
        };

        let t = raw.time.as_ref();
        let tp = top.key("time");
        let field = t
            .and_then(|t| t.field.clone())
            .unwrap_or_else(|| "time".into());
        if rules::split_path(&field).is_err() {
            self.err(&tp.key("field"), format!("{field:?} is not a dot path"));
        }
        let time = TimeConfig {
            lateness: self.duration(
                &tp.key("lateness"),
                t.and_then(|t| t.lateness.as_deref()),
                "0s",
                true,
            ),
            idle: self.duration(
                &tp.key("idle"),
                t.and_then(|t| t.idle.as_deref()),
                "10s",
                true,
            ),
            max_ahead: t
                .and_then(|t| t.max_ahead.as_deref())
                .map(|text| self.duration(&tp.key("max_ahead"), Some(text), text, false)),
            clock: match t.and_then(|t| t.clock.as_deref()).unwrap_or("event") {
                "event" => ClockMode::Event,
                "wall" => ClockMode::Wall,
                other => {
                    self.err(
                        &tp.key("clock"),
                        format!("unknown clock {other:?}: use event or wall"),
                    );
                    ClockMode::Event
                }
            },
            field,
        };

        let b = raw.batch.as_ref();
        let bp = top.key("batch");
        let batch_events = b.and_then(|b| b.events).unwrap_or(20_000);
        if batch_events == 0 {
            self.err(&bp.key("events"), "must be at least 1");
        }
        let batch_interval = self.std_duration(
            &bp.key("interval"),
            b.and_then(|b| b.interval.as_deref()),
            "100ms",
        );
        let batch_sync = match b.and_then(|b| b.sync.as_deref()).unwrap_or("normal") {
            "normal" => BatchSync::Normal,
            "full" => BatchSync::Full,
            other => {
                self.err(
                    &bp.key("sync"),
                    format!("unknown sync {other:?}: use normal or full"),
                );
                BatchSync::Normal
            }
        };

        let mut sources = Vec::new();
        let (mut http_sources, mut stdin_sources) = (0, 0);
        for (name, s) in &raw.sources {
            let p = top.key("sources").key(name);
            if !rules::valid_name(name) {
                self.err(
                    &p,
                    format!("invalid source name {name:?}: use [a-z0-9][a-z0-9_-]*"),
                );
            }
            // (An unknown type's settings are not judged: its own error says it.)
            let allowed: &[&str] = match s.kind.as_str() {
                "file" => &["path", "follow"],
                "http" => &["max_body"],
                "kafka" => &["topic"],
                "stdin" => &[],
                _ => &["path", "follow", "max_body", "topic"],
            };
            for (field, set) in [
                ("path", s.path.is_some()),
                ("follow", s.follow.is_some()),
                ("max_body", s.max_body.is_some()),
                ("topic", s.topic.is_some()),
            ] {
                if set && !allowed.contains(&field) {
                    self.err(
                        &p.key(field),
                        format!("not a setting of {} {} source", article(&s.kind), s.kind),
                    );
                }
            }
            let kind = match s.kind.as_str() {
                "file" => match &s.path {
                    Some(path) => {
                        let path = self.resolve(path);
                        // A FIFO would block the source's open (and its shutdown) until a
                        // writer came; a directory fails every read.
                        if path.exists() && !path.is_file() {
                            let what = if path.is_dir() {
                                "a directory, not a file"
                            } else {
                                "not a regular file"
                            };
                            self.err(&p.key("path"), format!("{} is {what}", path.display()));
                        }
                        // The daemon would read its own database pages as events (and
                        // a writer appending to the file would corrupt the state).
                        for suffix in ["", "-wal", "-shm"] {
                            let mut db = state.clone().into_os_string();
                            db.push(suffix);
                            if same_file(Path::new(&db), &path) {
                                self.err(
                                    &p.key("path"),
                                    format!(
                                        "{} is the state file{}",
                                        path.display(),
                                        match suffix {
                                            "" => "",
                                            "-wal" => "'s write-ahead log",
                                            _ => "'s shared-memory index",
                                        }
                                    ),
                                );
                            }
                        }
                        // Both would apply every event, each under its own name.
                        if let Some(other) = sources.iter().find_map(|o: &Source| match &o.kind {
                            SourceKind::File { path: p, .. } if same_file(p, &path) => {
                                Some(o.name.clone())
                            }
                            _ => None,
                        }) {
                            self.err(
                                &p.key("path"),
                                format!("{} is already source {other:?}", path.display()),
                            );
                        }
                        SourceKind::File {
                            path,
                            follow: s.follow.unwrap_or(true),
                        }
                    }
                    None => {
                        self.err(&p, "missing field \"path\"");
                        continue;
                    }
                },
                "stdin" => {
                    stdin_sources += 1;
                    if stdin_sources > 1 {
                        self.err(
                            &p,
                            "only one stdin source: the process has one standard input",
                        );
                    }
                    SourceKind::Stdin
                }
                "http" => {
                    http_sources += 1;
                    if http_sources > 1 {
                        self.err(&p, "only one http source: it is served at POST /v1/events");
                    }
                    let max = s.max_body.unwrap_or(10 << 20);
                    if max == 0 {
                        self.err(&p.key("max_body"), "must be at least 1");
                    } else if max > 2 << 30 {
                        // Twice it must fit the budget of bodies in memory (4 GiB).
                        self.err(&p.key("max_body"), "at most 2147483648 (2 GiB)");
                    }
                    SourceKind::Http {
                        max_body: max as usize,
                    }
                }
                "kafka" => {
                    let topic = s.topic.clone().unwrap_or_else(|| name.clone());
                    self.topic(&p.key("topic"), &topic);
                    if raw.kafka.is_none() && !broken("kafka") {
                        self.err(
                            &p,
                            "a kafka source needs the top-level `kafka` section (brokers, group)",
                        );
                    }
                    if let Some((other, _)) = sources.iter().find_map(|o: &Source| match &o.kind {
                        SourceKind::Kafka { topic: t } if *t == topic => Some((o.name.clone(), ())),
                        _ => None,
                    }) {
                        self.err(
                            &p.key("topic"),
                            format!("topic {topic:?} is already source {other:?}"),
                        );
                    }
                    SourceKind::Kafka { topic }
                }
                "" => {
                    self.err(&p, "missing field \"type\"");
                    continue;
                }
                other => {
                    self.err(
                        &p.key("type"),
                        format!(
                            "unknown source type {other:?}{}",
                            yaml::did_you_mean(other, ["file", "stdin", "http", "kafka"])
                        ),
                    );
                    continue;
                }
            };
            sources.push(Source {
                name: name.clone(),
                kind,
            });
        }
        if sources.is_empty() && raw.sources.is_empty() && !broken("sources") {
            self.err(&top, "no sources: add at least one under `sources`");
        }

        let mut sinks = Vec::new();
        for (name, s) in &raw.sinks {
            let p = top.key("sinks").key(name);
            if !rules::valid_name(name) {
                self.err(
                    &p,
                    format!("invalid sink name {name:?}: use [a-z0-9][a-z0-9_-]*"),
                );
            }
            let allowed: &[&str] = match s.kind.as_str() {
                "webhook" => &[
                    "url",
                    "secrets",
                    "secret_files",
                    "timeout",
                    "headers",
                    "ca_file",
                    "cert_file",
                    "key_file",
                ],
                "alertmanager" => &[
                    "url",
                    "timeout",
                    "resend",
                    "headers",
                    "ca_file",
                    "cert_file",
                    "key_file",
                ],
                "kafka" => &["topic", "timeout"],
                "stdout" => &[],
                // (An unknown type's settings are not judged: its own error says it.)
                _ => &[
                    "url",
                    "secrets",
                    "secret_files",
                    "timeout",
                    "resend",
                    "headers",
                    "topic",
                    "ca_file",
                    "cert_file",
                    "key_file",
                ],
            };
            for (field, set) in [
                ("url", s.url.is_some()),
                ("secrets", !s.secrets.is_empty()),
                ("secret_files", !s.secret_files.is_empty()),
                ("timeout", s.timeout.is_some()),
                ("resend", s.resend.is_some()),
                ("headers", !s.headers.is_empty()),
                ("topic", s.topic.is_some()),
                ("ca_file", s.ca_file.is_some()),
                ("cert_file", s.cert_file.is_some()),
                ("key_file", s.key_file.is_some()),
            ] {
                if set && !allowed.contains(&field) {
                    self.err(
                        &p.key(field),
                        format!("not a setting of {} {} sink", article(&s.kind), s.kind),
                    );
                }
            }
            let timeout = self.std_duration(&p.key("timeout"), s.timeout.as_deref(), "10s");
            if s.kind == "kafka" && timeout.as_millis() > MAX_KAFKA_TIMEOUT_MS {
                self.err(
                    &p.key("timeout"),
                    "at most 24d (librdkafka's message.timeout.ms is at most 2147483647 ms)",
                );
            } else if s.kind == "kafka" && timeout < std::time::Duration::from_millis(100) {
                // Else librdkafka refuses it at startup, naming a setting nobody wrote
                // (message.timeout.ms must be above linger.ms, 5 ms).
                self.err(&p.key("timeout"), "at least 100ms for a kafka sink");
            }
            let headers: Vec<(String, String)> = s
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            // Headers the client or the signing sets itself: a second copy would break
            // the framing (a wrong length), or the signature a receiver verifies.
            const OWN: [&str; 8] = [
                "host",
                "content-length",
                "transfer-encoding",
                "connection",
                "content-type",
                "webhook-id",
                "webhook-timestamp",
                "webhook-signature",
            ];
            let mut seen = std::collections::HashSet::new();
            for (k, v) in &headers {
                let lower = k.to_ascii_lowercase();
                if hyper::header::HeaderName::from_bytes(k.as_bytes()).is_err()
                    || hyper::header::HeaderValue::from_str(v).is_err()
                {
                    self.err(&p.key("headers").key(k), "not a valid HTTP header");
                } else if OWN.contains(&lower.as_str()) {
                    self.err(
                        &p.key("headers").key(k),
                        "set by sagawatch itself for every request: leave it out",
                    );
                } else if !seen.insert(lower) {
                    self.err(
                        &p.key("headers").key(k),
                        "given twice (header names are case-insensitive)",
                    );
                }
            }
            let kind = match s.kind.as_str() {
                "stdout" => SinkKind::Stdout,
                "webhook" => {
                    let url = self.url(&p.key("url"), s.url.as_deref());
                    let mut secrets = Vec::new();
                    for (i, sec) in s.secrets.iter().enumerate() {
                        match crate::sign::parse_secret(sec) {
                            Ok(k) => secrets.push(k),
                            Err(e) => self.err(&p.key("secrets").index(i), e),
                        }
                    }
                    for (i, f) in s.secret_files.iter().enumerate() {
                        let fp = p.key("secret_files").index(i);
                        if let Some(sec) = self.read_secret(&fp, f) {
                            match crate::sign::parse_secret(&String::from_utf8_lossy(&sec.0)) {
                                Ok(k) => secrets.push(k),
                                Err(e) => self.err(&fp, e),
                            }
                        }
                    }
                    // (Not also when the ones given were refused above.)
                    if s.secrets.is_empty() && s.secret_files.is_empty() {
                        self.err(
                            &p,
                            "a webhook sink needs `secrets` or `secret_files` to sign with",
                        );
                    }
                    let tls = self.tls(&p, &url, s);
                    SinkKind::Webhook {
                        url,
                        secrets,
                        headers,
                        tls,
                    }
                }
                "alertmanager" => {
                    let url = self.url(&p.key("url"), s.url.as_deref());
                    // `/api/v2/alerts` goes after the base URL's path: a query would end
                    // up in the middle.
                    if url.query().is_some() {
                        self.err(
                            &p.key("url"),
                            "Alertmanager's base URL takes no query (`?…`): /api/v2/alerts is appended to it",
                        );
                    }
                    let tls = self.tls(&p, &url, s);
                    let resend = self.std_duration(&p.key("resend"), s.resend.as_deref(), "1m");
                    if resend < std::time::Duration::from_secs(1) {
                        // Re-sends back to back, each alert's endsAt a few ms ahead: they
                        // would end in Alertmanager between two sends.
                        self.err(&p.key("resend"), "at least 1s");
                    }
                    SinkKind::Alertmanager {
                        url,
                        resend,
                        headers,
                        tls,
                    }
                }
                "kafka" => {
                    let Some(topic) = s.topic.clone() else {
                        self.err(&p, "missing field \"topic\"");
                        continue;
                    };
                    self.topic(&p.key("topic"), &topic);
                    if raw.kafka.is_none() && !broken("kafka") {
                        self.err(
                            &p,
                            "a kafka sink needs the top-level `kafka` section (brokers)",
                        );
                    }
                    SinkKind::Kafka { topic }
                }
                "" => {
                    self.err(&p, "missing field \"type\"");
                    continue;
                }
                other => {
                    self.err(
                        &p.key("type"),
                        format!(
                            "unknown sink type {other:?}{}",
                            yaml::did_you_mean(
                                other,
                                ["webhook", "alertmanager", "stdout", "kafka"]
                            )
                        ),
                    );
                    continue;
                }
            };
            sinks.push(Sink {
                name: name.clone(),
                kind,
                timeout,
            });
        }

        let alert_sinks = match raw.alerts.as_ref().and_then(|a| a.sinks.as_ref()) {
            Some(a) => {
                for (i, s) in a.iter().enumerate() {
                    if a[..i].contains(s) {
                        // Each would get its own copy of every alert.
                        self.err(
                            &top.key("alerts").key("sinks").index(i),
                            format!("sink {s:?} listed twice"),
                        );
                    } else if !raw.sinks.contains_key(s) && !broken("sinks") {
                        self.err(
                            &top.key("alerts").key("sinks").index(i),
                            format!(
                                "unknown sink {s:?}{}",
                                yaml::did_you_mean(s, raw.sinks.keys().map(String::as_str))
                            ),
                        );
                    }
                }
                a.clone()
            }
            None => sinks
                .iter()
                .filter(|s| matches!(s.kind, SinkKind::Stdout))
                .map(|s| s.name.clone())
                .collect(),
        };

        let o = raw.outbox.as_ref();
        let op = top.key("outbox");
        let concurrency = o.and_then(|o| o.concurrency).unwrap_or(8);
        if concurrency == 0 {
            self.err(&op.key("concurrency"), "must be at least 1");
        } else if concurrency > MAX_CONCURRENCY {
            self.err(
                &op.key("concurrency"),
                format!("at most {MAX_CONCURRENCY} deliveries in flight per sink"),
            );
        }
        let outbox = OutboxConfig {
            concurrency: concurrency as usize,
            backoff: self.std_duration(
                &op.key("backoff"),
                o.and_then(|o| o.backoff.as_deref()),
                "1s",
            ),
            max_backoff: self.std_duration(
                &op.key("max_backoff"),
                o.and_then(|o| o.max_backoff.as_deref()),
                "5m",
            ),
            give_up: self.std_duration(
                &op.key("give_up"),
                o.and_then(|o| o.give_up.as_deref()),
                "24h",
            ),
            retain: self.std_duration(&op.key("retain"), o.and_then(|o| o.retain.as_deref()), "7d"),
        };
        // Both written, one contradicting the other: which did the writer mean? (With only
        // `max_backoff` written below the default `backoff`, the maximum caps the first
        // delay as documented.)
        if o.is_some_and(|o| o.backoff.is_some() && o.max_backoff.is_some())
            && outbox.backoff > outbox.max_backoff
        {
            self.err(
                &op.key("backoff"),
                "longer than outbox.max_backoff: the first retry delay would already be past the maximum",
            );
        }

        let kafka = raw.kafka.as_ref().map(|k| self.kafka(&top.key("kafka"), k));

        let known = Known {
            sources: raw.sources.keys().cloned().collect(),
            // A sink of an unknown type is taken to accept payloads: its own error says it.
            sinks: raw
                .sinks
                .iter()
                .map(|(n, s)| (n.clone(), s.kind != "alertmanager"))
                .collect(),
            default_alert_sinks: !alert_sinks.is_empty(),
        };
        // What was said about stand-in values, or under them, is noise; so is a field
        // "missing" that is there, with a value of the wrong type (reported as such).
        let missing_but_patched = |d: &Diag| {
            d.message
                .strip_prefix("missing field \"")
                .and_then(|m| m.strip_suffix('"'))
                .is_some_and(|field| {
                    let at = if d.path.is_empty() {
                        field.to_string()
                    } else {
                        format!("{}.{field}", d.path)
                    };
                    patched.iter().any(|p| p.to_string() == at)
                })
        };
        let mut i = checked_from;
        while i < self.diags.len() {
            if yaml::covered(&patched, &self.diags[i].path) || missing_but_patched(&self.diags[i]) {
                self.diags.remove(i);
            } else {
                i += 1;
            }
        }
        // The rules are checked against the sources and sinks: not when a stand-in value
        // changed which there are, where alerts go, or which sinks take payloads.
        let decides_references = |p: &YamlPath| {
            let p = p.to_string();
            ["sources", "sinks", "alerts"].contains(&p.as_str())
                || p.starts_with("alerts.")
                || (p.starts_with("sinks.") && p.ends_with(".type"))
        };
        if failed.is_some() || patched.iter().any(decides_references) {
            return None;
        }
        Some(Config {
            known,
            file: self.file.clone(),
            state,
            rules_path,
            listen,
            token,
            allowed_hosts,
            time,
            batch_events: batch_events as usize,
            batch_interval,
            batch_sync,
            sources,
            sinks,
            alert_sinks,
            outbox,
            kafka,
            from_env: EnvValues::default(),
        })
    }

    fn topic(&mut self, path: &YamlPath, topic: &str) {
        let ok = !topic.is_empty()
            && topic.len() <= 249
            && topic != "."
            && topic != ".."
            && topic
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !ok {
            self.err(
                path,
                format!("invalid topic name {topic:?}: use 1 to 249 of [a-zA-Z0-9._-]"),
            );
        }
    }

    fn kafka(&mut self, path: &YamlPath, k: &RawKafka) -> KafkaConfig {
        let brokers = k.brokers.as_deref().unwrap_or_default();
        match &k.brokers {
            None => self.err(path, "missing field \"brokers\""),
            Some(b) if b.trim().is_empty() => self.err(&path.key("brokers"), "empty broker list"),
            Some(b) => {
                // librdkafka takes anything here and says only, after `connect_timeout`,
                // that no broker answered (and wraps a port above 65535 onto another one).
                for (i, entry) in b.split(',').enumerate() {
                    if let Err(why) = broker_address(entry.trim()) {
                        self.err(
                            &path.key("brokers"),
                            format!("broker {} of the list: {why}", i + 1),
                        );
                    }
                }
            }
        }
        let group = k.group.clone().unwrap_or_else(|| "sagawatch".into());
        if group.is_empty() {
            self.err(&path.key("group"), "empty group id");
        }
        let check = |this: &mut Self, section: &str, props: &BTreeMap<String, String>| {
            for key in props.keys() {
                let name = kafka_key(key);
                if let Some((_, why)) = KAFKA_RESERVED.iter().find(|(r, _)| *r == name) {
                    this.err(
                        &path.key(section).key(key),
                        format!("sagawatch sets {name}: {why}"),
                    );
                } else if let Some(why) = kafka_property_problem(name, &props[key]) {
                    this.err(&path.key(section).key(key), why);
                }
            }
            props
                .iter()
                .map(|(k, v)| (kafka_key(k).to_string(), this.kafka_path(k, v)))
                .collect::<Vec<_>>()
        };
        let common = check(self, "properties", &k.properties);
        let consumer = check(self, "consumer", &k.consumer);
        let producer = check(self, "producer", &k.producer);
        let connect_timeout = self.std_duration(
            &path.key("connect_timeout"),
            k.connect_timeout.as_deref(),
            "30s",
        );
        let align_wait = std::time::Duration::from_nanos(
            self.duration(
                &path.key("align_wait"),
                k.align_wait.as_deref(),
                "10s",
                true,
            )
            .max(0) as u64,
        );
        KafkaConfig {
            align_wait,
            brokers: brokers.trim().to_string(),
            group,
            consumer: common.iter().cloned().chain(consumer).collect(),
            producer: common.into_iter().chain(producer).collect(),
            connect_timeout,
        }
    }

    /// A bearer token as configured: surrounding whitespace (the newline a secret file or
    /// variable often ends with) is not part of it, and it must fit in an HTTP header.
    fn token(&mut self, path: &YamlPath, text: &str) -> Option<Secret> {
        let t = text.trim();
        if t.is_empty() {
            self.err(path, "empty token");
            return None;
        }
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            self.err(
                path,
                "the token may hold only visible ASCII characters (it is sent in an HTTP header)",
            );
            return None;
        }
        Some(Secret(t.as_bytes().to_vec()))
    }

    /// An HTTP sink's `ca_file`, `cert_file` and `key_file`, each read and checked.
    fn tls(&mut self, sink: &YamlPath, url: &hyper::Uri, s: &RawSink) -> Tls {
        let tls = Tls::default();
        let mut plain = false;
        for (key, set) in [
            ("ca_file", s.ca_file.is_some()),
            ("cert_file", s.cert_file.is_some()),
            ("key_file", s.key_file.is_some()),
        ] {
            if set && url.scheme_str() == Some("http") {
                self.err(
                    &sink.key(key),
                    format!("only an https:// URL uses `{key}`: this sink's URL is http://"),
                );
                plain = true;
            }
        }
        if plain {
            return tls;
        }
        let mut tls = tls;
        if let Some(file) = &s.ca_file {
            let path = sink.key("ca_file");
            if let Some((name, text)) = self.read_pem(&path, file) {
                // A key here usually means the wrong file was given (a server's
                // certificate and key instead of the CA that signed it).
                if text.contains("PRIVATE KEY-----") {
                    self.err(
                        &path,
                        format!("{name} holds a private key: give a file of CA certificates only"),
                    );
                } else if let Some(certs) = self.pem_certs(&path, &name, &text) {
                    tls.ca = certs.into_iter().map(|(pem, _)| pem).collect();
                }
            }
        }
        match (&s.cert_file, &s.key_file) {
            (None, None) => {}
            (Some(_), None) | (None, Some(_)) => self.err(
                sink,
                "`cert_file` and `key_file` go together: the client certificate and its key",
            ),
            (Some(cert), Some(key)) => tls.client = self.client_cert(sink, cert, key),
        }
        tls
    }

    /// A PEM file's path as shown and its text.
    fn read_pem(&mut self, path: &YamlPath, file: &str) -> Option<(String, String)> {
        if file.trim().is_empty() {
            self.err(path, "empty path");
            return None;
        }
        let f = self.resolve(file);
        match read_limited(&f, 1 << 20) {
            Ok(t) => Some((
                f.display().to_string(),
                String::from_utf8_lossy(&t).into_owned(),
            )),
            Err(e) => {
                self.err(path, format!("cannot read {}: {e}", f.display()));
                None
            }
        }
    }

    /// The certificates of a PEM file, in order, each whole, valid and not expired; at
    /// least one.
    fn pem_certs(
        &mut self,
        path: &YamlPath,
        name: &str,
        text: &str,
    ) -> Option<Vec<(String, openssl::x509::X509)>> {
        const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
        const END: &str = "-----END CERTIFICATE-----";
        let now = openssl::asn1::Asn1Time::days_from_now(0).ok();
        let mut certs = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find(BEGIN) {
            let n = certs.len() + 1;
            let body = &rest[start + BEGIN.len()..];
            // Its own END, before the next BEGIN: a cut certificate must not swallow the
            // next one (and pass as the first).
            let next = body.find(BEGIN);
            let Some(len) = body.find(END).filter(|&e| next.is_none_or(|b| e < b)) else {
                self.err(
                    path,
                    format!("{name}: certificate {n} has no `{END}` line (cut short?)"),
                );
                return None;
            };
            let inner = &body[..len];
            rest = &body[len + END.len()..];
            // Decoded here rather than by OpenSSL's PEM reader, which asks for a passphrase
            // on the terminal when a block has encryption headers.
            if inner.contains(':') {
                self.err(
                    path,
                    format!("{name}: certificate {n} has PEM headers (encrypted?): give plain certificates"),
                );
                return None;
            }
            let b64: String = inner.split_whitespace().collect();
            let Some(cert) = openssl::base64::decode_block(&b64)
                .ok()
                .and_then(|der| openssl::x509::X509::from_der(&der).ok())
            else {
                self.err(
                    path,
                    format!("{name}: certificate {n} is not a valid X.509 certificate"),
                );
                return None;
            };
            let Ok(pem) = cert
                .to_pem()
                .map(|p| String::from_utf8_lossy(&p).into_owned())
            else {
                self.err(path, format!("{name}: certificate {n} cannot be used"));
                return None;
            };
            if let Some(now) = &now
                && cert.not_after().compare(now).ok() == Some(std::cmp::Ordering::Less)
            {
                self.err(
                    path,
                    format!("{name}: certificate {n} expired on {}", cert.not_after()),
                );
                return None;
            }
            certs.push((pem, cert));
        }
        if certs.is_empty() {
            self.err(
                path,
                format!("{name}: no PEM certificate in it (`{BEGIN}` … `{END}`)"),
            );
            return None;
        }
        Some(certs)
    }

    /// A client certificate and its key, which must belong together. The key's text is
    /// never repeated in a message.
    fn client_cert(&mut self, sink: &YamlPath, cert: &str, key: &str) -> Option<ClientCert> {
        let (cert_path, key_path) = (sink.key("cert_file"), sink.key("key_file"));
        let certs = self.read_pem(&cert_path, cert).and_then(|(name, text)| {
            self.pem_certs(&cert_path, &name, &text)
                .map(|certs| (name, certs))
        });
        let (name, text) = self.read_pem(&key_path, key)?;
        if text.contains("ENCRYPTED") {
            self.err(
                &key_path,
                format!("{name}: the key is encrypted; give it unencrypted (`openssl pkey -in KEY -out PLAIN`) in a file only sagawatch can read"),
            );
            return None;
        }
        // With a passphrase given (empty), OpenSSL never asks for one on the terminal.
        let Ok(pkey) = openssl::pkey::PKey::private_key_from_pem_passphrase(text.as_bytes(), b"")
        else {
            self.err(
                &key_path,
                format!("{name}: no PEM private key in it (PKCS#8, RSA or EC)"),
            );
            return None;
        };
        let (cert_name, certs) = certs?;
        let matches = certs[0]
            .1
            .public_key()
            .is_ok_and(|public| public.public_eq(&pkey));
        if !matches {
            self.err(
                &key_path,
                format!("{name}: not the key of the first certificate in {cert_name} (the client's own certificate comes first, its intermediates after it)"),
            );
            return None;
        }
        // What OpenSSL refuses only when the connection is set up (a key too small for
        // its security level, a signature by SHA-1) is refused here, by the same check.
        let usable = openssl::ssl::SslContext::builder(openssl::ssl::SslMethod::tls_client())
            .and_then(|mut b| {
                b.set_certificate(&certs[0].1)?;
                b.set_private_key(&pkey)?;
                // The intermediates sent with it pass the same check (at each handshake).
                let mut ssl = openssl::ssl::Ssl::new(&b.build())?;
                for (_, c) in &certs[1..] {
                    ssl.add_chain_cert(c.clone())?;
                }
                Ok(())
            });
        if let Err(e) = usable {
            let why = e
                .errors()
                .iter()
                .filter_map(|e| e.reason())
                .collect::<Vec<_>>()
                .join(", ");
            self.err(
                &cert_path,
                format!("{cert_name}: OpenSSL refuses this certificate and key: {why}"),
            );
            return None;
        }
        let Ok(pkcs8) = pkey.private_key_to_pem_pkcs8() else {
            self.err(&key_path, format!("{name}: the key cannot be used"));
            return None;
        };
        Some(ClientCert {
            chain: certs.into_iter().map(|(pem, _)| pem).collect(),
            key: Secret(pkcs8),
        })
    }

    fn read_secret(&mut self, path: &YamlPath, file: &str) -> Option<Secret> {
        if file.trim().is_empty() {
            self.err(path, "empty path");
            return None;
        }
        let f = self.resolve(file);
        let text = read_limited(&f, 64 << 10).and_then(|b| {
            String::from_utf8(b).map_err(|_| std::io::Error::other("not UTF-8 text"))
        });
        match text {
            Ok(s) if s.trim().is_empty() => {
                self.err(path, format!("{} is empty", f.display()));
                None
            }
            Ok(s) => Some(Secret(s.trim().as_bytes().to_vec())),
            Err(e) => {
                self.err(path, format!("cannot read {}: {e}", f.display()));
                None
            }
        }
    }
}

/// Reads a small file named in the config: a regular file (a FIFO would block, a device
/// might never end) of at most `limit` bytes.
/// The file a path names through any symbolic links at its end: the state file is
/// locked, and its `-wal` and `-shm` files looked for, beside the file itself (where
/// SQLite puts them), so that two names for it are one state file.
fn followed(mut p: PathBuf) -> PathBuf {
    // As the kernel's limit on links in a row: a loop is left to the open to report.
    for _ in 0..40 {
        let Ok(target) = std::fs::read_link(&p) else {
            return p;
        };
        p = match p.parent() {
            Some(dir) if target.is_relative() => dir.join(target),
            _ => target,
        };
    }
    p
}

fn read_limited(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    if !std::fs::metadata(path)?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut buf = Vec::new();
    std::fs::File::open(path)?
        .take(limit + 1)
        .read_to_end(&mut buf)?;
    if buf.len() as u64 > limit {
        let size = if limit >= 1 << 20 {
            format!("{} MiB", limit >> 20)
        } else {
            format!("{} KiB", limit >> 10)
        };
        return Err(std::io::Error::other(format!("larger than {size}")));
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(k: &str) -> Option<String> {
        match k {
            "SECRET" => Some("whsec_c2VjcmV0".into()),
            "HOST" => Some("127.0.0.1".into()),
            "N" => Some("3".into()),
            "NO" => Some("false".into()),
            "NUMERIC" => Some("123".into()),
            "NULL" => Some("null".into()),
            "NL" => Some("abc\n".into()),
            "EMPTY" => Some(String::new()),
            "PW" => Some("S3cr3t'\"pw".into()),
            "PWNAME" => Some("{PW}".into()),
            "BIG" => Some("99999999999999999999999".into()),
            "FILESECRET" => Some("hunter2secret\n".into()),
            "UNITSECRET" => Some("1hunterTWOsecret".into()),
            "HEX" => Some("0x5EC12E7ABCDEF".into()),
            _ => None,
        }
    }

    fn check(text: &str) -> Result<Config, String> {
        let dir = std::env::current_dir().unwrap();
        load_text(&dir.join("sagawatch.yaml"), text, &env).map_err(|e| e.to_string())
    }

    /// A rules directory that holds the config file would load it as rules (and fail
    /// with its keys as unknown fields): said plainly instead.
    #[test]
    fn a_rules_directory_holding_the_config_is_refused() {
        let e =
            check("rules: .\nsources: { a: { type: stdin } }\nsinks: { o: { type: stdout } }\n")
                .unwrap_err();
        assert!(
            e.contains("rules: ") && e.contains("holds this config file"),
            "{e}"
        );
        assert_eq!(e.lines().count(), 1, "{e}");
    }

    #[test]
    fn interpolates_and_defaults() {
        let c = check(
            "rules: rules\nsources: { orders: { type: stdin } }\nsinks:\n  hook: { type: webhook, url: 'http://${HOST}:9/x', secrets: ['${SECRET}'] }\n  out: { type: stdout }\n",
        )
        .unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:9464");
        assert_eq!(c.alert_sinks, vec!["out".to_string()]);
        assert_eq!(c.time.idle, 10_000_000_000);
        match &c.sinks[0].kind {
            SinkKind::Webhook { url, secrets, .. } => {
                assert_eq!(url.host(), Some("127.0.0.1"));
                assert_eq!(secrets[0].0, b"secret");
            }
            other => panic!("{other:?}"),
        }
        // A default is plain text: a `${` in it is refused, not taken as text.
        let e = check(
            "rules: rules\ntoken: '${NOPE:-${HOST:-x}}'\nsources: { a: { type: stdin } }\nsinks: { out: { type: stdout } }\n",
        )
        .unwrap_err();
        assert!(
            e.contains("sagawatch.yaml:2:") && e.contains("defaults are plain text"),
            "{e}"
        );
        // `$NAME` is not taken for the text "$NAME" (a token anyone could guess); `$$` is a
        // `$`, and one before anything but a name stays as it is.
        let e = check(
            "rules: rules\ntoken: $SAGAWATCH_TOKEN\nsources: { a: { type: stdin } }\nsinks: { out: { type: stdout } }\n",
        )
        .unwrap_err();
        assert!(
            e.contains("sagawatch.yaml:2:")
                && e.contains("$SAGAWATCH_TOKEN is not expanded: write ${SAGAWATCH_TOKEN}"),
            "{e}"
        );
        let c = check(
            "rules: rules\ntoken: a$$B$5$\nsources: { a: { type: stdin } }\nsinks: { out: { type: stdout } }\n",
        )
        .unwrap();
        assert_eq!(c.token.unwrap().0, b"a$B$5$");
    }

    #[test]
    fn batch_sync_is_normal_unless_full_is_asked_for() {
        let base =
            "rules: rules\nsources: { a: { type: stdin } }\nsinks: { out: { type: stdout } }\n";
        assert_eq!(check(base).unwrap().batch_sync, BatchSync::Normal);
        let full = check(&format!("{base}batch: {{ sync: full }}\n")).unwrap();
        assert_eq!(full.batch_sync, BatchSync::Full);
        let e = check(&format!("{base}batch: {{ sync: always }}\n")).unwrap_err();
        assert!(
            e.contains(
                "sagawatch.yaml:4:16: batch.sync: unknown sync \"always\": use normal or full"
            ),
            "{e}"
        );
    }

    #[test]
    fn max_ahead_is_off_unless_set_and_must_be_positive() {
        let base =
            "rules: rules\nsources: { a: { type: stdin } }\nsinks: { out: { type: stdout } }\n";
        assert_eq!(check(base).unwrap().time.max_ahead, None);
        let c = check(&format!("{base}time: {{ max_ahead: 10m }}\n")).unwrap();
        assert_eq!(c.time.max_ahead, Some(600_000_000_000));
        let e = check(&format!("{base}time: {{ max_ahead: 0s }}\n")).unwrap_err();
        assert!(e.contains("sagawatch.yaml:4:20: time.max_ahead: "), "{e}");
    }

    /// A secret under the wrong key is not quoted back: the message names its variable.
    #[test]
    fn messages_name_the_variable_instead_of_quoting_its_value() {
        let e = check(
            "rules: rules\nlisten: '${PW}'\ntoken_file: 'no/such/${PW}'\nsources: { a: { type: stdin } }\nsinks: { out: { type: stdout } }\n",
        )
        .unwrap_err();
        assert!(
            e.contains("listen: \"${PW}\" is not an IP:port address"),
            "{e}"
        );
        assert!(e.contains("no/such/${PW}"), "{e}");
        assert!(!e.contains("S3cr3t"), "{e}");
        // A value inside another variable's name is not replaced in the name put in.
        let e = check(
            "rules: rules\nlisten: '${PW}'\nsources: { a: { type: stdin } }\nsinks: { out: { type: stdout } }\nalerts: { sinks: ['${PWNAME}'] }\n",
        )
        .unwrap_err();
        assert!(e.contains("listen: \"${PW}\""), "{e}");
        // Short values are left: replacing them would garble the message.
        let e =
            check("rules: rules\nsources: { a: { type: stdin } }\nbatch: { events: 'x${N}' }\n")
                .unwrap_err();
        assert!(e.contains("x3"), "{e}");
        // Nor is a number serde would show re-rendered (1e23 as 100000000000000000000000.0).
        let e = check(
            "rules: rules\nsources: { a: { type: http, max_body: '${BIG}' } }\nsinks: { out: { type: stdout } }\n",
        )
        .unwrap_err();
        assert!(e.contains("floating point \"${BIG}\""), "{e}");
        assert!(!e.contains("00000"), "{e}");
        // A number written in the file is shown as written.
        let e = check(
            "rules: rules\nsources: { a: { type: http, max_body: 1e3 } }\nsinks: { out: { type: stdout } }\n",
        )
        .unwrap_err();
        assert!(e.contains("floating point \"1e3\", expected u64"), "{e}");
        // A duration parsed from a value trimmed first (a secret file's newline), or one
        // whose parser quotes part of it (`unknown unit "hunter…"`).
        let e = check(
            "rules: rules\nsources: { a: { type: stdin } }\ntime: { idle: '${FILESECRET}' }\noutbox: { retain: '${UNITSECRET}' }\n",
        )
        .unwrap_err();
        assert!(!e.contains("hunter"), "{e}");
        assert!(
            e.contains("time.idle: invalid duration \"${FILESECRET}\""),
            "{e}"
        );
        assert!(
            e.contains("outbox.retain: invalid duration from ${UNITSECRET} (not shown)"),
            "{e}"
        );
        // Every unset variable of a value is named, not only the first.
        let e =
            check("rules: rules\nsources: { a: { type: stdin } }\nlisten: '${NOHOST}:${NOPORT}'\n")
                .unwrap_err();
        assert!(
            e.contains("listen: environment variable NOHOST is not set; environment variable NOPORT is not set"),
            "{e}"
        );
    }

    #[test]
    fn tokens_are_trimmed_and_an_empty_one_is_refused() {
        let base =
            "rules: rules\nsources: { a: { type: stdin } }\nsinks: { out: { type: stdout } }\n";
        // A variable or secret ending in a newline: the newline is not part of the token.
        let c = check(&format!("token: ${{NL}}\n{base}")).unwrap();
        assert_eq!(c.token.as_ref().unwrap().0, b"abc");
        // Present but empty reads as a mistake, not as "no token" (open endpoints).
        for empty in [
            "token:",
            "token: ~",
            "token: ''",
            "token_file:",
            "token_file: ''",
        ] {
            let e = check(&format!("{empty}\n{base}")).unwrap_err();
            assert!(
                e.contains("sagawatch.yaml:1:") && e.contains("empty"),
                "{empty}: {e}"
            );
        }
        let e = check(&format!("token: 'a b'\n{base}")).unwrap_err();
        assert!(e.contains("visible ASCII"), "{e}");
        let c = check(&format!("allowed_hosts: [Proxy.Example., '*']\n{base}")).unwrap();
        assert_eq!(c.allowed_hosts, ["proxy.example", "*"]);
        let e = check(&format!("allowed_hosts: [ok, 'a b']\n{base}")).unwrap_err();
        assert!(
            e.contains("allowed_hosts[1]") && e.contains("not a host name"),
            "{e}"
        );
        let e = check(&format!("state: ''\n{base}")).unwrap_err();
        assert!(e.contains("state") && e.contains("empty path"), "{e}");
    }

    /// One process has one standard input: a second stdin source would never read a
    /// line. An Alertmanager URL's query would end up before the API path.
    #[test]
    fn one_stdin_source_and_an_alertmanager_url_without_query() {
        let e = check("rules: rules\nsources: { a: { type: stdin }, b: { type: stdin } }\nsinks: { out: { type: stdout } }\n").unwrap_err();
        assert!(e.contains("sources.b: only one stdin source"), "{e}");
        let e = check("rules: rules\nsources: { a: { type: stdin } }\nsinks: { am: { type: alertmanager, url: 'http://127.0.0.1:9093/x?q=1' } }\n").unwrap_err();
        assert!(
            e.contains("sinks.am.url: Alertmanager's base URL takes no query"),
            "{e}"
        );
        let e = check("rules: rules\nsources: { a: { type: stdin } }\nsinks: { am: { type: alertmanager, url: 'http://127.0.0.1:9093/x#f' } }\n").unwrap_err();
        assert!(e.contains("sinks.am.url: a URL fragment"), "{e}");
        // Every problem of a URL at once.
        let e = check("rules: rules\nsources: { a: { type: stdin } }\nsinks: { h: { type: webhook, url: 'http://u:pw@127.0.0.1:1/x#f', secrets: [abcd] } }\n").unwrap_err();
        assert!(
            e.contains("a URL fragment") && e.contains("credentials in the URL are not sent"),
            "{e}"
        );
    }

    #[test]
    fn interpolated_numbers_and_booleans_serve_where_expected() {
        let c = check(
            "rules: rules\ntoken: ${NUMERIC}\noutbox:\n  concurrency: ${N}\nsources: { f: { type: file, path: x, follow: '${NO}' } }\nsinks: { out: { type: stdout } }\n",
        )
        .unwrap();
        assert_eq!(c.outbox.concurrency, 3);
        assert!(matches!(
            c.sources[0].kind,
            SourceKind::File { follow: false, .. }
        ));
        assert_eq!(c.token.as_ref().unwrap().0, b"123");
        // "null" from the environment is a token, not the absence of one.
        let c = check("rules: rules\ntoken: ${NULL}\nsources: { a: { type: stdin } }\nsinks: { out: { type: stdout } }\n").unwrap();
        assert_eq!(c.token.as_ref().unwrap().0, b"null");
        // A missing variable is one problem, not also a bad address.
        let e =
            check("rules: rules\nlisten: ${NOPE}\nsources: { a: { type: stdin } }\nsinks: { out: { type: stdout } }\n").unwrap_err();
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(e.contains("NOPE is not set"), "{e}");
        let e =
            check("rules: rules\nlisten: ${EMPTY}\nsources: { a: { type: stdin } }\nsinks: { out: { type: stdout } }\n").unwrap_err();
        assert!(e.contains("EMPTY is empty"), "{e}");
        // An integer from the environment in the wrong place is named as written, which the
        // masking of its text covers, not in decimal, which it would not.
        let e = check(
            "rules: rules\nsources: { f: { type: file, path: x, follow: '${HEX}' } }\nsinks: { out: { type: stdout } }\n",
        )
        .unwrap_err();
        assert!(e.contains("integer \"${HEX}\", expected a boolean"), "{e}");
        assert!(!e.contains("1666940823916015"), "{e}");
    }

    /// File paths in librdkafka properties are relative to the config's directory.
    #[test]
    fn kafka_file_paths_are_relative_to_the_config() {
        let c = check(
            "rules: rules\nsources: { a: { type: kafka } }\nsinks: { o: { type: stdout } }\nkafka: { brokers: 'h:9092', properties: { ssl.ca.location: probe, ssl.key.location: k.pem, ssl.certificate.location: /etc/c.pem, client.id: x.pem }, consumer: { sasl.kerberos.keytab: kt } }\n",
        )
        .unwrap();
        let dir = std::env::current_dir().unwrap();
        let k = c.kafka.unwrap();
        let get = |props: &[(String, String)], key: &str| {
            props
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        assert_eq!(get(&k.consumer, "ssl.ca.location"), "probe");
        assert_eq!(
            get(&k.consumer, "ssl.key.location"),
            dir.join("k.pem").display().to_string()
        );
        assert_eq!(
            get(&k.producer, "ssl.key.location"),
            dir.join("k.pem").display().to_string()
        );
        assert_eq!(get(&k.consumer, "ssl.certificate.location"), "/etc/c.pem");
        assert_eq!(get(&k.consumer, "client.id"), "x.pem");
        assert_eq!(
            get(&k.consumer, "sasl.kerberos.keytab"),
            dir.join("kt").display().to_string()
        );
    }

    /// A required field with a value of the wrong type is that problem only, not also a
    /// missing field.
    #[test]
    fn a_required_field_of_the_wrong_type_is_not_also_missing() {
        let e = check(
            "rules: rules\nsources: { a: { type: [stdin] }, b: { type: file, path: [x] } }\nsinks: { o: { type: stdout }, w: { type: webhook, url: [x], secrets: [s] } }\n",
        )
        .unwrap_err();
        assert_eq!(e.lines().count(), 3, "{e}");
        for want in [
            "sources.a.type: expected",
            "sources.b.path: expected",
            "sinks.w.url: expected",
        ] {
            assert!(e.contains(want), "{want:?} not in {e}");
        }
    }

    /// A missing required field, or a value of the wrong type, does not hide the problems
    /// of the rest of the file.
    #[test]
    fn missing_fields_and_wrong_types_do_not_hide_the_other_problems() {
        let e = check(
            "kafka: { group: g }\nsources:\n  a: { type: stdinn }\n  b: { path: x }\nsinks:\n  out: { type: stdout, bogus: 1 }\n",
        )
        .unwrap_err();
        for want in [
            "sagawatch.yaml:1:1: missing field \"rules\"",
            "sagawatch.yaml:1:8: kafka: missing field \"brokers\"",
            "sagawatch.yaml:3:14: sources.a.type: unknown source type \"stdinn\"",
            "sagawatch.yaml:4:6: sources.b: missing field \"type\"",
            "sagawatch.yaml:6:24: sinks.out.bogus: unknown field \"bogus\"",
        ] {
            assert!(e.contains(want), "missing {want:?} in:\n{e}");
        }
        let e = check(
            "rules: rules\nbatch: { events: many }\nsources: { a: { type: stdin, nope: 1 } }\nsinks: { out: { type: stdout } }\n",
        )
        .unwrap_err();
        for want in [
            "sagawatch.yaml:2:18: batch.events: invalid type",
            "sagawatch.yaml:3:30: sources.a.nope: unknown field \"nope\"",
        ] {
            assert!(e.contains(want), "missing {want:?} in:\n{e}");
        }
        // The other sections' own problems show too, and none that only the broken
        // section's absence would cause (`out` is not an unknown sink).
        let e = check(
            "batch: { events: many }\ntime: { idle: forever }\nsources: { a: { type: stdinn } }\nalerts: { sinks: [out] }\nsinks: 3\n",
        )
        .unwrap_err();
        for want in [
            "sagawatch.yaml:1:1: missing field \"rules\"",
            "sagawatch.yaml:1:18: batch.events: invalid type",
            "sagawatch.yaml:2:15: time.idle: invalid duration \"forever\"",
            "sagawatch.yaml:3:23: sources.a.type: unknown source type \"stdinn\"",
            "sagawatch.yaml:5:8: sinks: expected a mapping",
        ] {
            assert!(e.contains(want), "missing {want:?} in:\n{e}");
        }
        assert_eq!(e.lines().count(), 5, "{e}");
        // A value of the wrong type hides nothing else of its section, and the config as
        // far as it goes comes out, so `validate` checks the rules against it too.
        let text = "rules: rules\nsources:\n  a: { type: stdin, max_body: 5 }\n  b: { type: http, max_body: big }\nsinks: { o: { type: stdout } }\noutbox: { concurrency: -1, backoff: 0s, retain: 1 }\n";
        let e = check(text).unwrap_err();
        for want in [
            "sagawatch.yaml:3:31: sources.a.max_body: not a setting of a stdin source",
            "sagawatch.yaml:4:30: sources.b.max_body: invalid type: string \"big\"",
            "sagawatch.yaml:6:24: outbox.concurrency: invalid value",
            "sagawatch.yaml:6:37: outbox.backoff: duration \"0s\" must be positive",
            "sagawatch.yaml:6:49: outbox.retain: invalid duration \"1\"",
        ] {
            assert!(e.contains(want), "missing {want:?} in:\n{e}");
        }
        assert_eq!(e.lines().count(), 5, "{e}");
        let dir = std::env::current_dir().unwrap();
        let (cfg, e) = check_text(&dir.join("sagawatch.yaml"), text, &env);
        assert!(cfg.is_some() && e.is_some());
        // That config still hides what came from the environment in the messages it
        // adds (its Kafka clients' checks).
        let text = "rules: rules\nlisten: '${HOST}:9464'\nsources: { a: { type: stdin } }\nsinks: { o: { type: stdout } }\noutbox: { concurrency: 0 }\n";
        let (cfg, e) = check_text(&dir.join("sagawatch.yaml"), text, &env);
        assert!(e.is_some());
        assert_eq!(cfg.unwrap().masked("on 127.0.0.1"), "on ${HOST}");
        // Twice max_body must fit the 4 GiB budget of bodies in memory.
        let e = check("rules: rules\nsources: { a: { type: http, max_body: 2147483649 } }\nsinks: { o: { type: stdout } }\n").unwrap_err();
        assert!(e.contains("sources.a.max_body: at most 2147483648"), "{e}");
        assert!(check("rules: rules\nsources: { a: { type: http, max_body: 2147483648 } }\nsinks: { o: { type: stdout } }\n").is_ok());
        // Not when the stand-in changes what the rules are checked against.
        let text =
            "rules: rules\nsources: { a: { type: stdin } }\nsinks: { o: { type: [stdout] } }\n";
        assert!(
            check_text(&dir.join("sagawatch.yaml"), text, &env)
                .0
                .is_none()
        );
        // A sink of an unknown type: its settings are not judged against it.
        let e = check(
            "rules: rules\nsources: { a: { type: stdin } }\nsinks: { o: { type: smtp, url: 'http://x' }, p: { type: alertmanager, topic: t, url: 'http://x' } }\n",
        )
        .unwrap_err();
        assert!(!e.contains("sinks.o.url"), "{e}");
        assert!(
            e.contains("sinks.p.topic: not a setting of an alertmanager sink"),
            "{e}"
        );
    }

    /// Settings that would fail, or do something else than meant, only once running.
    #[test]
    fn settings_that_would_misbehave_later_are_refused() {
        let e = check(
            "rules: ''\nsources: { a: { type: stdin } }\nsinks: { o: { type: stdout }, h: { type: webhook, url: 'http://127.0.0.1:0/x', secrets: [s] }, k: { type: kafka, topic: t, timeout: 5ms }, am: { type: alertmanager, url: 'http://127.0.0.1:9093', resend: 500ms } }\nkafka: { brokers: '127.0.0.1:1' }\nalerts: { sinks: [o, h, o] }\n",
        )
        .unwrap_err();
        for want in [
            "sagawatch.yaml:1:8: rules: empty path",
            "sinks.h.url: invalid URL: its port is not a number from 1 to 65535",
            "sinks.k.timeout: at least 100ms for a kafka sink",
            "sinks.am.resend: at least 1s",
            "alerts.sinks[2]: sink \"o\" listed twice",
        ] {
            assert!(e.contains(want), "{want:?} not in {e}");
        }
    }

    /// Values past what the code can hold are refused where they are written.
    #[test]
    fn a_concurrency_or_kafka_timeout_too_large_is_refused() {
        let e = check(
            "rules: rules\nsources: { a: { type: stdin } }\nsinks: { o: { type: stdout }, k: { type: kafka, topic: t, timeout: 25d } }\nkafka: { brokers: '127.0.0.1:1' }\noutbox: { concurrency: 9223372036854775808 }\n",
        )
        .unwrap_err();
        assert!(e.contains("sinks.k.timeout: at most 24d"), "{e}");
        assert!(e.contains("outbox.concurrency: at most 1024"), "{e}");
        check(
            "rules: rules\nsources: { a: { type: stdin } }\nsinks: { o: { type: stdout }, k: { type: kafka, topic: t, timeout: 24d } }\nkafka: { brokers: '127.0.0.1:1' }\noutbox: { concurrency: 1024 }\n",
        )
        .unwrap();
    }

    /// A broker list librdkafka would take and never reach (no port, a port it wraps onto
    /// another one) is refused where it is written, without repeating it.
    #[test]
    fn broker_lists_are_host_port_pairs() {
        for good in [
            "127.0.0.1:9092",
            "kafka-0.kafka:9092, kafka-1.kafka:9092",
            "SSL://b.example:9093",
            "[::1]:9092",
        ] {
            assert_eq!(
                broker_address(good.split(',').next_back().unwrap().trim()),
                Ok(()),
                "{good}"
            );
        }
        let e = check(&format!(
            "rules: rules\nsources: {{ a: {{ type: stdin }} }}\nkafka: {{ brokers: '{}' }}\n",
            "127.0.0.1, b:99999,,tcp://c:1,[nope]:1,not a host:1"
        ))
        .unwrap_err();
        for want in [
            "broker 1 of the list: not host:port",
            "broker 2 of the list: the port is not a number",
            "broker 3 of the list: empty",
            "broker 4 of the list: unknown protocol",
            "broker 5 of the list: the host is not",
            "broker 6 of the list: the host is not",
        ] {
            assert!(e.contains(want), "missing {want:?} in:\n{e}");
        }
        assert!(!e.contains("99999"), "{e}");
    }

    #[test]
    fn one_file_is_one_source() {
        let e = check(
            "rules: rules\nsources:\n  a: { type: file, path: ev.jsonl }\n  b: { type: file, path: ./ev.jsonl }\n  c: { type: file, path: other.jsonl }\n",
        )
        .unwrap_err();
        assert!(e.contains("sagawatch.yaml:4:"), "{e}");
        assert!(
            e.contains("sources.b.path:") && e.contains("is already source \"a\""),
            "{e}"
        );
        assert_eq!(e.lines().count(), 1, "{e}");
        // The same file however spelt: through `..`, or (when it exists) a link or any
        // other path to the same inode.
        let e = check(
            "rules: rules\nsources:\n  a: { type: file, path: x/../ev.jsonl }\n  b: { type: file, path: ev.jsonl }\n  c: { type: file, path: rules/orders.yaml }\n  d: { type: file, path: 'rules/../rules/./orders.yaml' }\n  e: { type: file, path: rules }\n",
        )
        .unwrap_err();
        assert!(
            e.contains("sources.b.path:") && e.contains("is already source \"a\""),
            "{e}"
        );
        assert!(
            e.contains("sources.d.path:") && e.contains("is already source \"c\""),
            "{e}"
        );
        assert!(
            e.contains("sources.e.path:") && e.contains("is a directory"),
            "{e}"
        );
        assert_eq!(e.lines().count(), 3, "{e}");
        // Nor is the state file (or its WAL) a source.
        let e = check(
            "rules: rules\nstate: st.db\nsources:\n  a: { type: file, path: ./st.db }\n  b: { type: file, path: st.db-wal }\n",
        )
        .unwrap_err();
        assert!(
            e.contains("sources.a.path:") && e.contains("st.db is the state file"),
            "{e}"
        );
        assert!(
            e.contains("sources.b.path:")
                && e.contains("st.db-wal is the state file's write-ahead log"),
            "{e}"
        );
        assert_eq!(e.lines().count(), 2, "{e}");
        // A FIFO: opening it would block the source, and its shutdown, until a writer came.
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("ff");
        mkfifo(&fifo);
        let e = check(&format!(
            "rules: rules\nsources:\n  a: {{ type: file, path: '{}' }}\n",
            fifo.display()
        ))
        .unwrap_err();
        assert!(
            e.contains("sources.a.path:") && e.contains("not a regular file"),
            "{e}"
        );
    }

    /// librdkafka's own checks of each property run in `validate`, offline, at the
    /// property's place; values are not repeated (they may be passwords).
    #[test]
    fn kafka_properties_are_checked_where_they_are_written() {
        let e = check(
            "rules: rules\nkafka:\n  brokers: b:9092\n  properties: { foo.bar: x, sasl.password: hunter2, security.protocol: a }\n  consumer: { auto.offset.reset: bogus }\n  producer: { acks: '1', linger.ms: 7 }\nsources: { orders: { type: kafka, topic: t } }\n",
        )
        .unwrap_err();
        assert!(
            e.contains("kafka.properties.foo.bar:") && e.contains("No such configuration property"),
            "{e}"
        );
        assert!(e.contains("kafka.consumer.auto.offset.reset:"), "{e}");
        assert!(e.contains("kafka.producer.acks:"), "{e}");
        assert!(!e.contains("bogus") && !e.contains("hunter2"), "{e}");
        // A short value is taken out where quoted, not out of every word that holds it.
        assert!(
            e.contains(
                "Invalid value (value not shown) for configuration property \"security.protocol\""
            ),
            "{e}"
        );
        assert_eq!(e.lines().count(), 4, "{e}");
    }

    #[test]
    fn kafka_sources_and_sinks_need_the_kafka_section_and_leave_owned_settings_alone() {
        let e = check(
            "rules: rules\nsources:\n  orders: { type: kafka }\n  pay: { type: kafka, topic: 'bad topic' }\nsinks:\n  cmds: { type: kafka }\n",
        )
        .unwrap_err();
        for want in [
            "sources.orders: a kafka source needs the top-level `kafka` section",
            "sources.pay.topic: invalid topic name \"bad topic\"",
            "sinks.cmds: missing field \"topic\"",
        ] {
            assert!(e.contains(want), "missing {want:?} in:\n{e}");
        }
        let e = check(
            "rules: rules\nkafka:\n  brokers: b:9092\n  consumer: { group.id: x, enable.auto.commit: 'true' }\nsources:\n  orders: { type: kafka }\n",
        )
        .unwrap_err();
        assert!(
            e.contains("kafka.consumer.group.id: sagawatch sets group.id: set `kafka.group`"),
            "{e}"
        );
        assert!(
            e.contains("kafka.consumer.enable.auto.commit: sagawatch sets enable.auto.commit"),
            "{e}"
        );
        // Producer settings that would make delivered commands look undelivered (or
        // never delivered), or overrule the sinks' timeouts.
        for key in [
            "transactional.id",
            "delivery.report.only.error",
            "message.timeout.ms",
            "delivery.timeout.ms",
        ] {
            let e = check(&format!(
                "rules: rules\nkafka:\n  brokers: b:9092\n  producer: {{ {key}: x }}\nsources:\n  orders: {{ type: kafka }}\n"
            ))
            .unwrap_err();
            assert!(
                e.contains(&format!("kafka.producer.{key}: sagawatch sets {key}")),
                "{e}"
            );
        }
        // Under another name librdkafka takes for it too.
        let e = check(
            "rules: rules\nkafka:\n  brokers: b:9092\n  producer: { topic.message.timeout.ms: '600000' }\nsources:\n  orders: { type: kafka }\n",
        )
        .unwrap_err();
        assert!(
            e.contains(
                "kafka.producer.topic.message.timeout.ms: sagawatch sets message.timeout.ms"
            ),
            "{e}"
        );
        // What sagawatch sets by default is overridden under its own name, whichever
        // name the config used; other `topic.` properties stay as written.
        let c = check(
            "rules: rules\nkafka:\n  brokers: b:9092\n  properties: { topic.metadata.refresh.interval.ms: '1000' }\n  consumer: { topic.auto.offset.reset: latest }\n  producer: { queue.buffering.max.ms: '20' }\nsources:\n  orders: { type: kafka }\n",
        )
        .unwrap();
        let k = c.kafka.as_ref().unwrap();
        let keys = |v: &[(String, String)]| v.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
        assert_eq!(
            keys(&k.consumer),
            ["topic.metadata.refresh.interval.ms", "auto.offset.reset"]
        );
        assert_eq!(
            keys(&k.producer),
            ["topic.metadata.refresh.interval.ms", "linger.ms"]
        );
        let c = check(
            "rules: rules\nkafka:\n  brokers: b:9092\n  properties: { sasl.password: '${SECRET}' }\n  consumer: { group.instance.id: a }\nsources:\n  orders: { type: kafka, topic: orders.v1 }\nsinks:\n  cmds: { type: kafka, topic: commands }\n",
        )
        .unwrap();
        let k = c.kafka.as_ref().unwrap();
        assert_eq!(k.group, "sagawatch");
        assert_eq!(k.consumer.len(), 2);
        assert_eq!(k.producer.len(), 1);
        assert!(
            !format!("{c:?}").contains("whsec_"),
            "secrets never in Debug output"
        );
        assert!(matches!(&c.sources[0].kind, SourceKind::Kafka { topic } if topic == "orders.v1"));
    }

    #[test]
    fn reports_every_problem_with_position() {
        let e = check(
            "rules: rules\nlisten: nowhere\nsourcs: {}\nsources:\n  a: { type: fiel }\n  b: { type: stdin, path: x }\nsinks:\n  h: { type: webhook, url: 'http://x/', secrets: ['${MISSING}'] }\nalerts: { sinks: [pager] }\n",
        )
        .unwrap_err();
        for want in [
            "sagawatch.yaml:2:9: listen: \"nowhere\" is not an IP:port address",
            "sagawatch.yaml:3:1: sourcs: unknown field",
            "sagawatch.yaml:5:14: sources.a.type: unknown source type \"fiel\" (did you mean \"file\"?)",
            "sagawatch.yaml:6:27: sources.b.path: not a setting of a stdin source",
            "sagawatch.yaml:8:51: sinks.h.secrets[0]: environment variable MISSING is not set",
            "sagawatch.yaml:9:19: alerts.sinks[0]: unknown sink \"pager\"",
        ] {
            assert!(e.contains(want), "missing {want:?} in:\n{e}");
        }
    }

    #[test]
    fn a_backoff_past_its_maximum_is_refused_only_when_both_are_written() {
        let base = "rules: rules\nsources: { orders: { type: stdin } }\nsinks: { out: { type: stdout } }\n";
        let e = check(&format!(
            "{base}outbox: {{ backoff: 10s, max_backoff: 2s }}\n"
        ))
        .unwrap_err();
        assert!(
            e.contains("sagawatch.yaml:4:20: outbox.backoff: longer than outbox.max_backoff"),
            "{e}"
        );
        let c = check(&format!(
            "{base}outbox: {{ backoff: 2s, max_backoff: 2s }}\n"
        ))
        .unwrap();
        assert_eq!(c.outbox.backoff, c.outbox.max_backoff);
        // The default backoff (1s) under a written maximum: the maximum caps it.
        let c = check(&format!("{base}outbox: {{ max_backoff: 500ms }}\n")).unwrap();
        assert_eq!(c.outbox.max_backoff, std::time::Duration::from_millis(500));
    }

    #[test]
    fn headers_the_sink_sets_itself_are_refused() {
        let e = check(
            "rules: rules\nsources: { orders: { type: stdin } }\nsinks:\n  h: { type: webhook, url: 'http://x/', secrets: [s3cr3t-value], headers: { Webhook-Id: x, content-length: '3', X-Team: a, x-team: b } }\n",
        )
        .unwrap_err();
        for want in [
            "sinks.h.headers.Webhook-Id: set by sagawatch itself",
            "sinks.h.headers.content-length: set by sagawatch itself",
            "sinks.h.headers.x-team: given twice",
        ] {
            assert!(e.contains(want), "missing {want:?} in:\n{e}");
        }
    }

    /// A URL may hold credentials or a token: a bad one is described, never repeated.
    #[test]
    fn a_bad_url_is_not_repeated() {
        for url in [
            "htps://hooks.example/services/T0K3N",
            "user:pa55@am:9093",
            "http://user:pa ss@host/",
        ] {
            let e = check(&format!(
                "rules: rules\nsources: {{ a: {{ type: stdin }} }}\nsinks:\n  am: {{ type: alertmanager, url: '{url}' }}\n"
            ))
            .unwrap_err();
            assert!(e.contains("sinks.am.url:"), "{e}");
            for secret in ["T0K3N", "pa55", "pa ss"] {
                assert!(!e.contains(secret), "{e}");
            }
        }
    }

    fn mkfifo(path: &Path) {
        let made = std::process::Command::new("mkfifo").arg(path).status();
        assert!(made.unwrap().success(), "mkfifo {}", path.display());
    }

    /// A self-signed certificate (PEM) for this key, valid from three days ago to `days`
    /// from now.
    fn cert_until(key: &openssl::pkey::PKeyRef<openssl::pkey::Private>, days: i64) -> String {
        use openssl::{asn1::Asn1Time, hash::MessageDigest, x509};
        let mut name = x509::X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", "test").unwrap();
        let name = name.build();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let mut b = x509::X509::builder().unwrap();
        b.set_version(2).unwrap();
        b.set_subject_name(&name).unwrap();
        b.set_issuer_name(&name).unwrap();
        b.set_pubkey(key).unwrap();
        b.set_not_before(&Asn1Time::from_unix(now - 3 * 86_400).unwrap())
            .unwrap();
        b.set_not_after(&Asn1Time::from_unix(now + days * 86_400).unwrap())
            .unwrap();
        b.sign(key, MessageDigest::sha256()).unwrap();
        String::from_utf8(b.build().to_pem().unwrap()).unwrap()
    }

    fn cert_for(key: &openssl::pkey::PKeyRef<openssl::pkey::Private>) -> String {
        cert_until(key, 1)
    }

    /// A self-signed certificate (PEM) for a new EC key, ending `days` from now.
    fn self_signed(days: i64) -> String {
        use openssl::{ec, nid::Nid, pkey::PKey};
        let group = ec::EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
        cert_until(
            &PKey::from_ec_key(ec::EcKey::generate(&group).unwrap()).unwrap(),
            days,
        )
    }

    /// `https://` URLs are taken; a `ca_file` must hold PEM certificates and goes with
    /// `https://` only, each problem named with the file.
    #[test]
    fn https_urls_and_ca_files() {
        let sink = |extra: &str| {
            check(&format!(
                "rules: rules\nsources: {{ a: {{ type: stdin }} }}\nsinks:\n  am: {{ type: alertmanager, url: 'https://am.example:9093/'{extra} }}\n"
            ))
        };
        let c = sink("").unwrap();
        assert_eq!(c.sinks[0].kind.tls(), &Tls::default());
        let dir = tempfile::tempdir().unwrap();
        let (empty, junk, cut) = (
            dir.path().join("empty.pem"),
            dir.path().join("junk.pem"),
            dir.path().join("cut.pem"),
        );
        std::fs::write(&empty, "").unwrap();
        std::fs::write(
            &junk,
            "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        std::fs::write(&cut, "-----BEGIN CERTIFICATE-----\nMIIB\n").unwrap();
        let missing = dir.path().join("missing.pem");
        let (good, expired) = (self_signed(1), self_signed(-1));
        let (two, merged, keyed, old) = (
            dir.path().join("two.pem"),
            dir.path().join("merged.pem"),
            dir.path().join("keyed.pem"),
            dir.path().join("old.pem"),
        );
        std::fs::write(&two, format!("{good}{}", self_signed(2))).unwrap();
        std::fs::write(
            &merged,
            format!("-----BEGIN CERTIFICATE-----\nMIIB\n{good}"),
        )
        .unwrap();
        std::fs::write(
            &keyed,
            format!("{good}-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n"),
        )
        .unwrap();
        std::fs::write(&old, format!("{good}{expired}")).unwrap();
        let c = sink(&format!(", ca_file: '{}'", two.display())).unwrap();
        assert_eq!(c.sinks[0].kind.tls().ca.len(), 2);
        for (file, says) in [
            (
                &merged,
                "certificate 1 has no `-----END CERTIFICATE-----` line",
            ),
            (&keyed, "holds a private key"),
            (&old, "certificate 2 expired on"),
            (&missing, "cannot read"),
            (&empty, "no PEM certificate"),
            (
                &cut,
                "certificate 1 has no `-----END CERTIFICATE-----` line",
            ),
            (&junk, "certificate 1 is not a valid X.509 certificate"),
        ] {
            let e = sink(&format!(", ca_file: '{}'", file.display())).unwrap_err();
            assert!(e.contains("sinks.am.ca_file:"), "{e}");
            assert!(
                e.contains(&file.display().to_string()) && e.contains(says),
                "{e}"
            );
        }
        let e = check(&format!(
            "rules: rules\nsources: {{ a: {{ type: stdin }} }}\nsinks:\n  h: {{ type: webhook, url: 'http://127.0.0.1:9/', secrets: [s3cr3t-s3cr3t], ca_file: '{}' }}\n",
            junk.display()
        ))
        .unwrap_err();
        assert!(
            e.contains("sinks.h.ca_file: only an https:// URL uses `ca_file`"),
            "{e}"
        );
        let e = check(
            "rules: rules\nsources: { a: { type: stdin } }\nsinks:\n  o: { type: stdout, ca_file: x.pem }\n",
        )
        .unwrap_err();
        assert!(
            e.contains("sinks.o.ca_file: not a setting of a stdout sink"),
            "{e}"
        );
    }

    /// `cert_file` and `key_file`: together, https only, the key unencrypted and the
    /// certificate's own; traditional RSA keys are taken (converted to PKCS#8).
    #[test]
    fn client_certificates() {
        use openssl::{pkey::PKey, rsa::Rsa};
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, text: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p.display().to_string()
        };
        let key = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
        let cert = file("c.pem", cert_for(&key).as_bytes());
        let own = file("own.key", &key.rsa().unwrap().private_key_to_pem().unwrap());
        let other = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
        let other = file("other.key", &other.private_key_to_pem_pkcs8().unwrap());
        let locked = file(
            "locked.key",
            &key.private_key_to_pem_pkcs8_passphrase(openssl::symm::Cipher::aes_128_cbc(), b"pw")
                .unwrap(),
        );
        let sink = |url: &str, extra: &str| {
            check(&format!(
                "rules: rules\nsources: {{ a: {{ type: stdin }} }}\nsinks:\n  am: {{ type: alertmanager, url: '{url}'{extra} }}\n"
            ))
        };
        let c = sink(
            "https://am:9093",
            &format!(", cert_file: '{cert}', key_file: '{own}'"),
        )
        .unwrap();
        let client = c.sinks[0].kind.tls().client.clone().unwrap();
        assert!(client.chain.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(String::from_utf8_lossy(&client.key.0).starts_with("-----BEGIN PRIVATE KEY-----"));
        for (url, extra, says) in [
            (
                "https://am:9093",
                format!(", cert_file: '{cert}'"),
                "sinks.am: `cert_file` and `key_file` go together",
            ),
            (
                "http://am:9093",
                format!(", cert_file: '{cert}', key_file: '{own}'"),
                "sinks.am.cert_file: only an https:// URL uses `cert_file`",
            ),
            (
                "https://am:9093",
                format!(", cert_file: '{cert}', key_file: '{other}'"),
                "sinks.am.key_file: ",
            ),
            (
                "https://am:9093",
                format!(", cert_file: '{cert}', key_file: '{locked}'"),
                "the key is encrypted",
            ),
            (
                "https://am:9093",
                format!(", cert_file: '{cert}', key_file: '{cert}'"),
                "no PEM private key in it",
            ),
        ] {
            let e = sink(url, &extra).unwrap_err();
            assert!(e.contains(says), "{says:?} not in {e}");
        }
        let e = sink(
            "https://am:9093",
            &format!(", cert_file: '{cert}', key_file: '{other}'"),
        )
        .unwrap_err();
        assert!(
            e.contains(&format!("not the key of the first certificate in {cert}")),
            "{e}"
        );
        assert!(!e.contains("PRIVATE KEY"), "{e}");
        // What OpenSSL would refuse only when connecting: a key below its security level.
        // (512 bits: under what any security level from 1 up allows.)
        let weak = PKey::from_rsa(Rsa::generate(512).unwrap()).unwrap();
        let weak_cert = file("weak.pem", cert_for(&weak).as_bytes());
        let weak_key = file("weak.key", &weak.private_key_to_pem_pkcs8().unwrap());
        let e = sink(
            "https://am:9093",
            &format!(", cert_file: '{weak_cert}', key_file: '{weak_key}'"),
        )
        .unwrap_err();
        assert!(
            e.contains("sinks.am.cert_file: ")
                && e.contains("OpenSSL refuses this certificate and key: ee key too small"),
            "{e}"
        );
        // And the intermediates sent with the certificate.
        let chain = file(
            "chain.pem",
            format!("{}{}", cert_for(&key), cert_for(&weak)).as_bytes(),
        );
        let e = sink(
            "https://am:9093",
            &format!(", cert_file: '{chain}', key_file: '{own}'"),
        )
        .unwrap_err();
        assert!(e.contains("ca key too small"), "{e}");
        // A certificate block with encryption headers: refused, never a passphrase prompt.
        let pem = cert_for(&key);
        let headed = file(
            "headed.pem",
            pem.replacen(
                "-----\n",
                "-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00112233445566778899AABBCCDDEEFF\n\n",
                1,
            )
            .as_bytes(),
        );
        let e = sink("https://am:9093", &format!(", ca_file: '{headed}'")).unwrap_err();
        assert!(e.contains("certificate 1 has PEM headers"), "{e}");
        // Only small regular files are read: not a FIFO (it would block), nor a huge file.
        let fifo = dir.path().join("fifo");
        mkfifo(&fifo);
        let big = file("big.key", &vec![b'a'; (1 << 20) + 1]);
        for (f, says) in [
            (fifo.display().to_string(), "not a regular file"),
            (big, "larger than 1 MiB"),
        ] {
            let e = sink(
                "https://am:9093",
                &format!(", cert_file: '{cert}', key_file: '{f}'"),
            )
            .unwrap_err();
            assert!(e.contains(&format!("cannot read {f}: {says}")), "{e}");
        }
    }

    /// URLs the client would not use as written: a port out of range (it would connect to
    /// port 80), credentials (it would not send them).
    #[test]
    fn urls_the_client_would_misread_are_refused() {
        for (url, says) in [
            ("http://127.0.0.1:85136/cmd", "port"),
            ("http://127.0.0.1:9O93/cmd", "port"),
            ("http://[::1]:70000/", "port"),
            ("http://user:pa55@127.0.0.1:9093/", "credentials"),
        ] {
            let e = check(&format!(
                "rules: rules\nsources: {{ a: {{ type: stdin }} }}\nsinks:\n  am: {{ type: alertmanager, url: '{url}' }}\n"
            ))
            .unwrap_err();
            assert!(e.contains("sinks.am.url:") && e.contains(says), "{e}");
            assert!(!e.contains("pa55"), "{e}");
        }
    }
}
