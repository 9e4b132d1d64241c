//! Kafka: the consumer that feeds the core (offsets stored in the state file in the same
//! transaction as the state they caused; seek to them on every assignment; commit before
//! letting partitions go), the co-partitioning check at startup, and the idempotent
//! producer behind `kafka` sinks. Kafka's own group offsets are only a mirror for lag tools.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant as StdInstant};

use anyhow::{Context as _, Result};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, ClientContext, Message, Offset, Statistics, TopicPartitionList};
use rusqlite::Connection;
use tokio::sync::oneshot;

use crate::config::{Config, KafkaConfig, SourceKind};
use crate::daemon::core::{Msg, Record, Rejected, wall_ms};
use crate::daemon::metrics::Metrics;
use crate::rules::{Matcher, RuleSet};
use crate::store::{self, Pending, Position};

/// Records per message to the core.
const MAX_BATCH: usize = 2000;
/// Messages held for ordering, in all, beyond which they are released without waiting
/// (brokers that honour `max.partition.fetch.bytes` keep this far lower).
const MAX_HELD: usize = 500_000;
/// The same bound in bytes of message text: a catch-up over topics of different volumes
/// holds the lighter ones' messages, each copied out of librdkafka's own bounded queue.
const MAX_HELD_BYTES: usize = 64 << 20;
/// How long an assignment waits for its partitions' offset ranges, all together.
const WATERMARKS_WAIT: Duration = Duration::from_secs(5);
/// How many partitions' offset ranges are asked for at once.
const WATERMARK_LANES: usize = 8;

/// A broker that sent nothing for this long is taken as unreachable (a paused broker keeps
/// its connections open, so librdkafka itself notices only after its request timeouts).
const STALE_MICROS: i64 = 10_000_000;
/// How often the committed offsets are mirrored to the group for lag tooling.
const MIRROR_EVERY: Duration = Duration::from_secs(1);

/// The Kafka link as /healthz, /readyz and `sagawatch_kafka_up` report it.
pub struct Health {
    down: Mutex<Option<(i64, String)>>,
    /// Set while Kafka holds events back from the core (no assignment yet, brokers
    /// unreachable, or a known backlog): the stream is not idle then, so the idle
    /// fallback must not move the clock past events still waiting in Kafka.
    holding: AtomicBool,
    /// When `holding` was last worked out (wall ms): past `HOLD_FRESH`, nothing is known
    /// (the daemon was suspended, say, while events arrived), so the clock waits too.
    held_at: std::sync::atomic::AtomicI64,
}

impl Default for Health {
    fn default() -> Health {
        Health {
            down: Mutex::default(),
            holding: AtomicBool::new(true),
            held_at: std::sync::atomic::AtomicI64::new(0),
        }
    }
}

/// How old the last backlog reading may be for the idle fallback to trust it: statistics
/// come every second.
const HOLD_FRESH_MS: i64 = 3_000;
/// A partition's high watermark in the statistics is current only if its leader answered
/// this recently (a fetch long-poll returns every `fetch.wait.max.ms`, 500 ms by default).
const FRESH_MICROS: i64 = 2_000_000;

impl Health {
    /// Whether events are known to wait in Kafka (see `holding`).
    pub fn holds_clock(&self) -> bool {
        self.holding.load(Ordering::Relaxed)
            || wall_ms() - self.held_at.load(Ordering::Relaxed) > HOLD_FRESH_MS
    }

    fn set_down(&self, reason: &str) {
        let mut d = lock(&self.down);
        if d.is_none() {
            tracing::warn!(reason, "kafka: brokers unreachable");
            *d = Some((wall_ms(), reason.to_string()));
        }
    }

    /// The consumer thread ended with an error: report it until restart.
    pub fn stopped(&self, why: &str) {
        *lock(&self.down) = Some((wall_ms(), format!("the kafka consumer stopped: {why}")));
    }

    fn set_up(&self) {
        if lock(&self.down).take().is_some() {
            tracing::info!("kafka: brokers reachable again");
        }
    }

    /// `None` while a broker answers; otherwise what is wrong and since when.
    pub fn problem(&self) -> Option<String> {
        lock(&self.down).as_ref().map(|(since, why)| {
            format!(
                "kafka: {why} (since {})",
                crate::time::format_rfc3339(since * 1_000_000)
            )
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn log_to_tracing(level: RDKafkaLogLevel, fac: &str, msg: &str) {
    use RDKafkaLogLevel::*;
    match level {
        Emerg | Alert | Critical | Error => tracing::error!(target: "librdkafka", fac, "{msg}"),
        Warning => tracing::warn!(target: "librdkafka", fac, "{msg}"),
        Notice | Info => tracing::info!(target: "librdkafka", fac, "{msg}"),
        Debug => tracing::debug!(target: "librdkafka", fac, "{msg}"),
    }
}

fn error_kind(e: &KafkaError) -> &'static str {
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::AllBrokersDown) => "all_brokers_down",
        Some(RDKafkaErrorCode::BrokerTransportFailure) => "transport",
        Some(RDKafkaErrorCode::Authentication) => "authentication",
        Some(RDKafkaErrorCode::UnknownTopicOrPartition) => "unknown_topic",
        _ => match e {
            KafkaError::MessageConsumption(_) => "consume",
            KafkaError::ConsumerCommit(_) => "commit",
            _ => "other",
        },
    }
}

fn base_config(k: &KafkaConfig, props: &[(String, String)]) -> ClientConfig {
    let mut c = ClientConfig::new();
    // librdkafka's `debug` contexts log at debug level: let them through when asked for.
    let debug = props.iter().any(|(key, _)| key == "debug");
    c.set("bootstrap.servers", &k.brokers)
        .set("client.id", "sagawatch")
        .set_log_level(if debug {
            RDKafkaLogLevel::Debug
        } else {
            RDKafkaLogLevel::Info
        });
    c
}

fn consumer_config(k: &KafkaConfig) -> ClientConfig {
    let mut c = base_config(k, &k.consumer);
    c.set("auto.offset.reset", "earliest");
    for (key, v) in &k.consumer {
        c.set(key, v);
    }
    // Set last: correctness depends on them (validation refuses them in properties).
    // Statistics drive lag, readiness and the idle clock.
    c.set("statistics.interval.ms", "1000")
        .set("enable.partition.eof", "false")
        .set("group.id", &k.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("partition.assignment.strategy", "range");
    c
}

/// Where a partition with a stored offset starts.
#[derive(Debug, PartialEq)]
enum Start {
    /// At the stored offset (also when the watermarks are not known).
    Stored,
    /// The partition (`lo` to `hi`) ends before the stored offset: the topic was
    /// recreated (its offsets now name other messages), or the broker lost data. A fetch
    /// from the stored offset would skip what comes up to it, or wait for it. Where
    /// `auto.offset.reset` says, as for a partition never read, but from the watermarks
    /// (not the group's offset, which mirrors the stored one).
    PastEnd { lo: i64, hi: i64 },
    /// The messages from the stored offset to this one were deleted before they were
    /// read (retention): from the oldest one left, whatever `auto.offset.reset` says.
    Deleted(i64),
}

/// Where a partition starts, from the offset stored for it and its watermarks (`lo`,
/// `hi`) when the broker gave them.
fn start_of(stored: i64, range: Option<(i64, i64)>) -> Start {
    match range {
        Some((lo, hi)) if stored > hi => Start::PastEnd { lo, hi },
        Some((lo, _)) if stored < lo => Start::Deleted(lo),
        _ => Start::Stored,
    }
}

/// Where `auto.offset.reset` in `c` starts a partition (`None` for `error`).
fn reset_offset(c: &ClientConfig) -> Option<Offset> {
    // librdkafka reads the value ignoring case.
    let v = c.get("auto.offset.reset").unwrap_or("largest").trim();
    match v.to_ascii_lowercase().as_str() {
        "smallest" | "earliest" | "beginning" => Some(Offset::Beginning),
        "error" => None,
        _ => Some(Offset::End),
    }
}

/// The producer's client context: librdkafka's logs and errors to `tracing`, and its
/// errors counted (when there are metrics: not for the startup check).
pub struct LogContext(Option<Arc<Metrics>>, Mutex<Option<String>>);

impl ClientContext for LogContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, msg: &str) {
        log_to_tracing(level, fac, msg);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        // rdkafka (0.39) hands each error event of a producer to this twice in a row (its
        // client's event poll, then the producer's): the second is the same event.
        let this = format!("{error}\u{0}{reason}");
        {
            let mut last = self.1.lock().unwrap_or_else(|e| e.into_inner());
            if last.as_deref() == Some(this.as_str()) {
                *last = None;
                return;
            }
            *last = Some(this);
        }
        if let Some(m) = &self.0 {
            m.kafka_errors
                .with_label_values(&[error_kind(&error)])
                .inc();
        }
        tracing::warn!(%error, reason, "kafka producer error");
    }
}

/// A client-creation error without the property's value: rdkafka's own message ends
/// with it, and the value may be a password (`sasl.password` under a misspelt key, say).
fn redacted(e: &KafkaError) -> String {
    match e {
        KafkaError::ClientConfig(_, desc, key, value) => {
            let desc = crate::config::without_value(desc, value);
            format!("client config error: {desc} (property {key:?}; values are never logged)")
        }
        other => other.to_string(),
    }
}

/// The producer behind every `kafka` sink: idempotent, so broker retries neither lose
/// nor duplicate a command.
pub type Producer = FutureProducer<LogContext>;

pub fn producer(
    k: &KafkaConfig,
    delivery_timeout: Duration,
    metrics: Option<Arc<Metrics>>,
) -> Result<Producer> {
    producer_config(k, delivery_timeout)
        .create_with_context(LogContext(metrics, Mutex::new(None)))
        .map_err(|e| anyhow::anyhow!("kafka: cannot create the producer: {}", redacted(&e)))
}

fn producer_config(k: &KafkaConfig, delivery_timeout: Duration) -> ClientConfig {
    let mut c = base_config(k, &k.producer);
    // The Java client's partitioner (librdkafka's own default hashes otherwise): commands
    // keyed by the correlation key land where the services' own events with that key do,
    // should a rule read the commands topic beside theirs. `kafka.producer` may set another.
    c.set("partitioner", "murmur2_random");
    c.set("linger.ms", "5").set(
        "message.timeout.ms",
        delivery_timeout.as_millis().max(1).to_string(),
    );
    for (key, v) in &k.producer {
        c.set(key, v);
    }
    c.set("enable.idempotence", "true");
    c
}

/// Sends one outbox message as a command: key = correlation key, headers = idempotency
/// id, rule and step. Ok only on a successful delivery report.
pub async fn send(p: &Producer, topic: &str, m: &Pending, timeout: Duration) -> Result<(), String> {
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: "sagawatch-id",
            value: Some(m.id.as_str()),
        })
        .insert(Header {
            key: "sagawatch-rule",
            value: Some(m.rule.as_str()),
        })
        .insert(Header {
            key: "sagawatch-step",
            value: Some(m.step.as_str()),
        })
        .insert(Header {
            key: "content-type",
            value: Some("application/json"),
        });
    let record = FutureRecord::to(topic)
        .key(m.key.as_str())
        .payload(m.body.as_str())
        .headers(headers);
    match tokio::time::timeout(timeout, p.send(record, Timeout::After(timeout))).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(format!("kafka topic {topic}: {e}")),
        Err(_) => Err(format!(
            "kafka topic {topic}: no delivery report after {timeout:?}"
        )),
    }
}

/// The Kafka topics a matcher can see events from: its source's topic, or every Kafka
/// topic when it names no source.
fn topics_of<'a>(m: &Matcher, by_source: &'a BTreeMap<String, String>) -> Vec<&'a str> {
    match &m.source {
        Some(s) => by_source.get(s).map(String::as_str).into_iter().collect(),
        None => by_source.values().map(String::as_str).collect(),
    }
}

/// Why startup refused the Kafka setup.
#[derive(Debug)]
pub enum CheckError {
    /// No broker answered in time.
    Unreachable(String),
    /// Missing topics or topics one rule correlates with different partition counts.
    Config(Vec<String>),
}

/// Creates the clients `run` would, without brokers (so without a connection), so that
/// `validate` sees librdkafka's checks across properties offline: a SASL mechanism this
/// build lacks (GSSAPI, the default), a TLS file that is not there. Property by property
/// checks are the config's own; these need the whole set.
pub fn check_clients(cfg: &Config) -> Vec<String> {
    let Some(k) = &cfg.kafka else {
        return Vec::new();
    };
    let offline = KafkaConfig {
        brokers: String::new(),
        ..k.clone()
    };
    let sinks = cfg
        .sinks
        .iter()
        .filter(|s| matches!(s.kind, crate::config::SinkKind::Kafka { .. }));
    let producer = sinks.clone().map(|s| s.timeout).max().and_then(|t| {
        producer_config(&offline, t)
            .create::<rdkafka::producer::BaseProducer>()
            .err()
            .map(|e| redacted(&e))
    });
    let consumer = if sinks.count() > 0 || !kafka_sources(cfg).is_empty() {
        consumer_config(&offline)
            .create::<BaseConsumer>()
            .err()
            .map(|e| redacted(&e))
    } else {
        None
    };
    match (producer, consumer) {
        // Most such problems are in the shared properties: say it once.
        (Some(p), Some(c)) if p == c => {
            vec![format!("kafka (`kafka.properties`, both clients): {p}")]
        }
        (p, c) => {
            p.map(|p| format!("kafka (producer: `kafka.properties` and `kafka.producer`): {p}"))
                .into_iter()
                .chain(c.map(|c| {
                    format!("kafka (consumer: `kafka.properties` and `kafka.consumer`): {c}")
                }))
                .collect()
        }
    }
}

/// Checks at startup that every Kafka topic exists and that the topics each rule
/// correlates have equal partition counts (co-partitioning: the same key lands in the
/// same partition number of each topic, so one instance sees all of a saga).
/// On success, the partition count of each source topic (for checking reloaded rules).
pub fn check_topics(cfg: &Config, rules: &RuleSet) -> Result<Partitions, CheckError> {
    let Some(k) = &cfg.kafka else {
        return Ok(Partitions::new());
    };
    // librdkafka rejects unknown or invalid properties when a client is created: do it
    // now, so a typo stops startup instead of the outbox dispatcher later.
    let sink_timeout = cfg
        .sinks
        .iter()
        .filter(|s| matches!(s.kind, crate::config::SinkKind::Kafka { .. }))
        .map(|s| s.timeout)
        .max();
    if let Some(t) = sink_timeout {
        drop(producer(k, t, None).map_err(|e| {
            CheckError::Config(vec![format!(
                "kafka (producer: `kafka.properties` and `kafka.producer`): {e:#}"
            )])
        })?);
    }
    // Every topic sagawatch reads or writes must exist: a missing sink topic would only
    // show as retried deliveries. Asked through a consumer, which never creates topics
    // (a producer's metadata request may, on brokers that create topics on demand).
    let mut topics: Vec<(String, String)> = kafka_sources(cfg)
        .into_iter()
        .map(|(source, topic)| (format!("sources.{source}"), topic))
        .collect();
    for s in &cfg.sinks {
        if let crate::config::SinkKind::Kafka { topic } = &s.kind {
            topics.push((format!("sinks.{}", s.name), topic.clone()));
        }
    }
    let mut counts = Partitions::new();
    let mut problems = Vec::new();
    if topics.is_empty() {
        return Ok(counts);
    }
    let mut config = consumer_config(k);
    config.set("allow.auto.create.topics", "false");
    let client: BaseConsumer<CheckContext> = config
        .create_with_context(CheckContext::default())
        .map_err(|e| {
            CheckError::Config(vec![format!(
                "kafka (consumer: `kafka.properties` and `kafka.consumer`): {}",
                redacted(&e)
            )])
        })?;
    let deadline = StdInstant::now() + k.connect_timeout;
    for (at, topic) in &topics {
        match partitions(&client, topic, deadline, k)? {
            Ok(n) => {
                if at.starts_with("sources.") {
                    counts.insert(topic.clone(), n);
                }
            }
            Err(why) => problems.push(format!("{at}: kafka topic {topic:?} {why}")),
        }
    }
    problems.extend(copartitioning(cfg, rules, &counts));
    if problems.is_empty() {
        Ok(counts)
    } else {
        Err(CheckError::Config(problems))
    }
}

/// The startup check's client context: librdkafka's logs to `tracing`, and its last error
/// kept, so that "no broker answered" can say why (a refused SASL handshake, a TLS error)
/// instead of only that.
#[derive(Default)]
struct CheckContext(Mutex<Option<String>>);

impl ClientContext for CheckContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, msg: &str) {
        log_to_tracing(level, fac, msg);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        let why = if reason.is_empty() {
            error.to_string()
        } else {
            reason.to_string()
        };
        let mut last = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // "1/1 brokers are down" follows the error that says why: keep that one.
        if last.is_none() || error.rdkafka_error_code() != Some(RDKafkaErrorCode::AllBrokersDown) {
            *last = Some(why);
        }
    }
}

impl ConsumerContext for CheckContext {}

/// A topic's partition count, or why it cannot be used, asked again until a broker answers
/// for it (a passing error, such as a leader being elected, is asked about again) or
/// `deadline` passes.
fn partitions(
    consumer: &BaseConsumer<CheckContext>,
    topic: &str,
    deadline: StdInstant,
    k: &KafkaConfig,
) -> Result<Result<usize, String>, CheckError> {
    let client = consumer.client();
    // Serves the client's logs and errors (to the context) while waiting: no message
    // comes, nothing is subscribed.
    let wait = |d: Duration| {
        let until = StdInstant::now() + d;
        while StdInstant::now() < until {
            let _ = consumer.poll(until.saturating_duration_since(StdInstant::now()));
        }
    };
    loop {
        let left = deadline.saturating_duration_since(StdInstant::now());
        // A second at a time, so the client's errors are served (and logged) meanwhile.
        let ask = left.clamp(Duration::from_millis(100), Duration::from_secs(1));
        match client.fetch_metadata(Some(topic), ask) {
            Ok(md) => {
                let t = md.topics().iter().find(|t| t.name() == topic);
                let error = t.and_then(|t| t.error()).map(RDKafkaErrorCode::from);
                match (t, error) {
                    (Some(t), None) if !t.partitions().is_empty() => {
                        return Ok(Ok(t.partitions().len()));
                    }
                    (None, _) | (_, Some(RDKafkaErrorCode::UnknownTopicOrPartition)) => {
                        return Ok(Err(
                            "does not exist (sagawatch does not create topics)".into()
                        ));
                    }
                    _ if StdInstant::now() >= deadline => {
                        return Ok(Err(format!(
                            "is not usable: {}",
                            error.map_or_else(|| "it has no partitions".into(), |e| e.to_string())
                        )));
                    }
                    _ => wait(Duration::from_millis(200)),
                }
            }
            Err(e) if StdInstant::now() >= deadline => {
                wait(Duration::from_millis(100));
                let last = client
                    .context()
                    .0
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                let last = last
                    .map(|l| format!(" (last error: {l})"))
                    .unwrap_or_default();
                return Err(CheckError::Unreachable(format!(
                    "kafka: no broker of {} answered within {:?}: {e}{last}",
                    k.brokers, k.connect_timeout
                )));
            }
            Err(_) => wait(Duration::from_millis(200)),
        }
    }
}

/// Partition counts by topic.
pub type Partitions = BTreeMap<String, usize>;

/// Kafka topics by source name.
fn kafka_sources(cfg: &Config) -> BTreeMap<String, String> {
    cfg.sources
        .iter()
        .filter_map(|s| match &s.kind {
            SourceKind::Kafka { topic } => Some((s.name.clone(), topic.clone())),
            _ => None,
        })
        .collect()
}

/// Rules that correlate topics of different partition counts (startup refuses them, and
/// so does a reload).
pub fn copartitioning(cfg: &Config, rules: &RuleSet, counts: &Partitions) -> Vec<String> {
    let by_source = kafka_sources(cfg);
    let mut problems = Vec::new();
    for rule in &rules.rules {
        let mut topics: Vec<&str> = topics_of(&rule.trigger, &by_source);
        for s in &rule.steps {
            topics.extend(topics_of(&s.matcher, &by_source));
        }
        for c in &rule.cancels {
            topics.extend(topics_of(c, &by_source));
        }
        topics.sort_unstable();
        topics.dedup();
        let known: Vec<(&str, usize)> = topics
            .iter()
            .filter_map(|t| counts.get(*t).map(|n| (*t, *n)))
            .collect();
        if known.windows(2).any(|w| w[0].1 != w[1].1) {
            let list: Vec<String> = known.iter().map(|(t, n)| format!("{t} ({n})")).collect();
            problems.push(format!(
                "rule {:?} correlates kafka topics with different partition counts: {}; \
                 topics one rule correlates must be co-partitioned (keyed by the correlation \
                 key, equal partition counts)",
                rule.name,
                list.join(", ")
            ));
        }
    }
    problems
}

type Tp = (Arc<str>, i32);

/// A batch sent to the core: its commit acknowledgement and the offsets it moves to.
type Inflight = (oneshot::Receiver<Result<usize, Rejected>>, Vec<(Tp, i64)>);

/// A message held back until it is its turn in timestamp order.
struct Held {
    ts: i64,
    offset: i64,
    record: Record,
}

#[derive(Default)]
struct Inner {
    /// Messages per partition, not yet released to `batch`.
    held: HashMap<Tp, VecDeque<Held>>,
    held_count: usize,
    /// Whether the group gave this consumer its assignment (possibly no partitions: more
    /// members than partitions), and has not revoked it since.
    has_assignment: bool,
    /// Bytes of the messages held (their text).
    held_bytes: usize,
    /// Next offset after the last message received per partition.
    seen: HashMap<Tp, i64>,
    /// Partitions whose consumer went back to offsets already read, while it does.
    rewound: HashSet<Tp>,
    /// Where each partition starts after its assignment (from the state file).
    start: HashMap<Tp, i64>,
    /// High watermarks and low/committed offsets from the last statistics.
    hi: HashMap<Tp, (i64, i64)>,
    /// Partitions whose fetcher had reached the high watermark with nothing prefetched,
    /// by how many statistics in a row said so: what lies below the watermark past the
    /// last message received is then nothing the consumer is given (transaction markers,
    /// or what a reset to `latest` skipped), and must not read as messages still to come.
    /// Trusted from the second reading on (the first after an assignment may still show
    /// the fetch position from before it); forgotten at every rebalance.
    drained: HashMap<Tp, u8>,
    /// Since when a partition known to have older events held the others back.
    blocked_since: Option<StdInstant>,
    gave_up_waiting: bool,
    batch: Vec<Record>,
    /// Next offset per partition for the records in `batch`.
    next: HashMap<Tp, i64>,
    /// Batches sent to the core, waiting for their commit.
    inflight: VecDeque<Inflight>,
    /// Next offsets committed in the state file.
    committed: HashMap<Tp, i64>,
    /// What was last committed to the group (the mirror).
    mirrored: HashMap<Tp, i64>,
    assigned: HashSet<Tp>,
}

/// The consumer's context: rebalance handling, statistics, errors. Callbacks run on the
/// consumer thread inside `poll`, so the lock is never contended; it is never held
/// across a call into the consumer.
struct Ctx {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    core: SyncSender<Msg>,
    /// Topic → source name.
    sources: HashMap<String, Arc<str>>,
    /// Topic → the one shared copy of its name.
    topics: HashMap<String, Arc<str>>,
    /// Reads stored positions on assignment.
    state: Mutex<Connection>,
    /// Where a partition whose stored offset lies past its end starts instead: what
    /// `auto.offset.reset` says (`None`: `error`, left to librdkafka).
    reset: Option<Offset>,
    inner: Mutex<Inner>,
    /// Set when the core is gone: stop consuming.
    core_gone: AtomicBool,
    /// The code of the error event just counted in [`ClientContext::error`]: the consumer's
    /// poll returns the same event as an error next, not to be counted again.
    reported: Mutex<Option<RDKafkaErrorCode>>,
}

impl Ctx {
    fn topic_arc(&self, topic: &str) -> Option<Arc<str>> {
        self.topics.get(topic).cloned()
    }

    /// Holds a message until its turn (see [`Ctx::release`]).
    fn push(&self, m: &rdkafka::message::BorrowedMessage<'_>) {
        let Some(source) = self.sources.get(m.topic()) else {
            return;
        };
        let Some(topic) = self.topic_arc(m.topic()) else {
            return;
        };
        let tp = (topic, m.partition());
        // An empty value (or none: a tombstone) is no event either: counted and logged
        // like any other record that is not one.
        let text = std::str::from_utf8(m.payload().unwrap_or_default()).map(str::to_owned);
        let record = Record {
            source: Arc::clone(source),
            utf8: text.is_ok(),
            text: text.unwrap_or_default(),
            part: Some(m.partition()),
            offset: Some(m.offset()),
        };
        let mut inner = lock(&self.inner);
        if let Some(&seen) = inner.seen.get(&tp)
            && m.offset() < seen
        {
            // Within one assignment librdkafka delivers a partition's offsets in order,
            // so an earlier one means it reset its fetch position by itself (an
            // out-of-range fetch and `auto.offset.reset`). Offsets once taken are the
            // same messages in the same log: skipped, not applied twice. A recreated
            // topic, whose offsets are new messages, comes through a new assignment,
            // where the stored offset is checked against the partition's range.
            if inner.rewound.insert(tp.clone()) {
                tracing::warn!(
                    topic = m.topic(),
                    partition = m.partition(),
                    offset = m.offset(),
                    next = seen,
                    "kafka: the consumer went back to an offset already read (its fetch \
                     position was reset); skipping to the next offset not read yet"
                );
            }
            return;
        }
        if !inner.rewound.is_empty() {
            inner.rewound.remove(&tp);
        }
        let q_bytes = record.text.len();
        let q = inner.held.entry(tp.clone()).or_default();
        // Without a timestamp, a message keeps its predecessor's place.
        let ts = m
            .timestamp()
            .to_millis()
            .or_else(|| q.back().map(|h| h.ts))
            .unwrap_or(i64::MIN);
        q.push_back(Held {
            ts,
            offset: m.offset(),
            record,
        });
        inner.held_count += 1;
        inner.held_bytes += q_bytes;
        inner.seen.insert(tp, m.offset() + 1);
    }

    /// Whether a partition is known to have messages not yet received.
    fn may_have_more(inner: &Inner, tp: &Tp) -> bool {
        let Some(&(hi, base)) = inner.hi.get(tp) else {
            return true; // no statistics yet
        };
        let at = inner
            .seen
            .get(tp)
            .or_else(|| inner.start.get(tp))
            .copied()
            .unwrap_or(base);
        hi > at && !Self::drained(inner, tp)
    }

    /// Whether the fetcher of a partition is known to have nothing more to deliver.
    fn drained(inner: &Inner, tp: &Tp) -> bool {
        inner.drained.get(tp).is_some_and(|&n| n >= 2)
    }

    /// Assigned partitions with nothing held that are known to have more: the ones whose
    /// older messages the others wait for.
    fn awaited(inner: &Inner) -> impl Iterator<Item = &Tp> {
        inner.assigned.iter().filter(|a| {
            inner.held.get(*a).is_none_or(|q| q.is_empty()) && Self::may_have_more(inner, a)
        })
    }

    /// Moves held messages to the batch in timestamp order across partitions (the order
    /// their services published them), as Kafka Streams does: a message waits while a
    /// partition known to hold older ones has nothing received yet, for at most `wait`.
    /// Catching up after downtime then interleaves topics by time instead of replaying
    /// one topic's backlog before the next, which `lateness` could not absorb.
    fn release(&self, wait: Duration) {
        let mut inner = lock(&self.inner);
        let now = StdInstant::now();
        loop {
            let head = inner
                .held
                .iter()
                .filter_map(|(tp, q)| q.front().map(|h| (h.ts, tp.clone())))
                .min();
            let Some((_, tp)) = head else {
                inner.blocked_since = None;
                break;
            };
            // Past the bound, memory wins over order. (Pausing the fullest partitions
            // instead lost messages: librdkafka drops what it prefetched for a paused
            // partition and resumed past it, even after a seek.)
            let blocked = inner.held_count <= MAX_HELD
                && inner.held_bytes <= MAX_HELD_BYTES
                && Self::awaited(&inner).next().is_some();
            if blocked {
                let since = *inner.blocked_since.get_or_insert(now);
                if now.duration_since(since) < wait {
                    break;
                }
                if !inner.gave_up_waiting {
                    inner.gave_up_waiting = true;
                    let waiting: Vec<String> = Self::awaited(&inner)
                        .map(|(t, p)| format!("{t}/{p}"))
                        .collect();
                    tracing::info!(partitions = %waiting.join(","), ?wait, "kafka: stopped waiting for partitions with older messages; events may arrive out of order");
                }
            } else {
                inner.gave_up_waiting = false;
                inner.blocked_since = None;
            }
            let Some(h) = inner.held.get_mut(&tp).and_then(|q| q.pop_front()) else {
                break;
            };
            inner.held_count -= 1;
            inner.held_bytes -= h.record.text.len();
            inner.next.insert(tp, h.offset + 1);
            inner.batch.push(h.record);
            if inner.batch.len() >= MAX_BATCH {
                break;
            }
        }
    }

    fn held(&self) -> usize {
        lock(&self.inner).held_count
    }

    fn batch_full(&self) -> bool {
        lock(&self.inner).batch.len() >= MAX_BATCH
    }

    /// Whether records (or skipped offsets) wait to be sent to the core.
    fn has_pending(&self) -> bool {
        !lock(&self.inner).next.is_empty()
    }

    /// Sends the accumulated records and their positions to the core.
    fn send_batch(&self) {
        let (records, positions, tps) = {
            let mut inner = lock(&self.inner);
            if inner.next.is_empty() {
                return;
            }
            let records = std::mem::take(&mut inner.batch);
            let next = std::mem::take(&mut inner.next);
            let positions = next
                .iter()
                .map(|((t, p), o)| {
                    (
                        store::kafka_position_key(t, *p),
                        Position {
                            file_id: String::new(),
                            offset: *o as u64,
                        },
                    )
                })
                .collect();
            (records, positions, next.into_iter().collect::<Vec<_>>())
        };
        let (tx, rx) = oneshot::channel();
        let msg = Msg::Records {
            records,
            positions,
            done: Some(tx),
        };
        if self.core.send(msg).is_err() {
            self.core_gone.store(true, Ordering::Relaxed);
            return;
        }
        lock(&self.inner).inflight.push_back((rx, tps));
    }

    /// Moves acknowledged batches' offsets to `committed`; with `wait`, waits for all.
    fn collect_acks(&self, wait: bool) {
        let mut inner = lock(&self.inner);
        while let Some((rx, _)) = inner.inflight.front_mut() {
            let r = if wait {
                // Only after a Sync: every earlier batch is already answered.
                let (rx, tps) = inner.inflight.pop_front().expect("front exists");
                match rx.blocking_recv() {
                    Ok(Ok(_)) => Some(tps),
                    _ => None,
                }
            } else {
                match rx.try_recv() {
                    Ok(Ok(_)) => inner.inflight.pop_front().map(|(_, tps)| tps),
                    Err(oneshot::error::TryRecvError::Empty) => break,
                    _ => {
                        // The batch failed: the core stops; nothing was committed.
                        inner.inflight.pop_front();
                        None
                    }
                }
            };
            for (tp, off) in r.into_iter().flatten() {
                self.metrics
                    .kafka_committed
                    .with_label_values(&[&*tp.0, &tp.1.to_string()])
                    .set(off);
                inner.committed.insert(tp, off);
            }
        }
    }

    /// Commits the state file's offsets of assigned partitions to the group.
    fn mirror(&self, consumer: &BaseConsumer<Ctx>, only: Option<&HashSet<Tp>>, mode: CommitMode) {
        let mut tpl = TopicPartitionList::new();
        let mut sent = Vec::new();
        {
            let inner = lock(&self.inner);
            for (tp, off) in &inner.committed {
                let wanted = match only {
                    Some(set) => set.contains(tp),
                    None => inner.assigned.contains(tp),
                };
                if wanted && inner.mirrored.get(tp) != Some(off) {
                    let _ = tpl.add_partition_offset(&tp.0, tp.1, Offset::Offset(*off));
                    sent.push((tp.clone(), *off));
                }
            }
        }
        if sent.is_empty() {
            return;
        }
        match consumer.commit(&tpl, mode) {
            Ok(()) => {
                let mut inner = lock(&self.inner);
                for (tp, off) in sent {
                    inner.mirrored.insert(tp, off);
                }
            }
            Err(e) => {
                self.metrics
                    .kafka_errors
                    .with_label_values(&["commit"])
                    .inc();
                tracing::debug!(error = %e, "kafka: mirroring offsets to the group failed");
            }
        }
    }

    /// Commit what was processed, then let the partitions go.
    fn on_revoke(&self, consumer: &BaseConsumer<Ctx>, tpl: &TopicPartitionList) {
        self.send_batch();
        let (tx, rx) = oneshot::channel();
        if self.core.send(Msg::Sync { done: tx }).is_ok() {
            if let Ok(Err(e)) = rx.blocking_recv() {
                tracing::error!(error = %e, "kafka: commit before revocation failed");
            }
        } else {
            self.core_gone.store(true, Ordering::Relaxed);
        }
        self.collect_acks(true);
        let revoked: HashSet<Tp> = tpl
            .elements()
            .iter()
            .filter_map(|e| self.topic_arc(e.topic()).map(|t| (t, e.partition())))
            .collect();
        // The state file holds the truth and is committed; the group's copy is a mirror,
        // sent without waiting (a paused broker must not block the rebalance).
        self.mirror(consumer, Some(&revoked), CommitMode::Async);
        let r = match consumer.rebalance_protocol() {
            RebalanceProtocol::Cooperative => consumer.incremental_unassign(tpl),
            _ => consumer.unassign(),
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "kafka: unassign failed");
        }
        let mut inner = lock(&self.inner);
        for tp in &revoked {
            // Held messages were not applied: the next owner reads them from the
            // committed offset.
            if let Some(q) = inner.held.remove(tp) {
                inner.held_count -= q.len();
                inner.held_bytes -= q.iter().map(|h| h.record.text.len()).sum::<usize>();
            }
            inner.seen.remove(tp);
            inner.rewound.remove(tp);
            inner.start.remove(tp);
            inner.drained.remove(tp);
            inner.assigned.remove(tp);
            inner.mirrored.remove(tp);
            // Set again on the next assignment from the state file: a partition that
            // comes back different (a recreated topic) must not inherit the old one.
            inner.committed.remove(tp);
            let labels = [&*tp.0, &tp.1.to_string()];
            let _ = self.metrics.kafka_lag.remove_label_values(&labels);
            let _ = self.metrics.kafka_committed.remove_label_values(&labels);
        }
        if inner.assigned.is_empty() {
            inner.has_assignment = false;
        }
        self.metrics.kafka_assigned.set(inner.assigned.len() as i64);
        tracing::info!(partitions = %list(tpl), "kafka: partitions revoked");
    }

    /// The offset an assigned partition starts from (see [`start_of`]), logged when that
    /// is not the offset stored for it.
    fn start_at(&self, topic: &str, part: i32, off: i64, range: Option<(i64, i64)>) -> i64 {
        match start_of(off, range) {
            Start::Stored => off,
            Start::PastEnd { lo, hi } => {
                let (start, to) = match self.reset {
                    Some(Offset::Beginning) => (lo, "reading from its start"),
                    Some(_) => (hi, "reading from its end"),
                    None => (off, "nothing is read from it until that is resolved"),
                };
                tracing::warn!(
                    topic,
                    partition = part,
                    stored = off,
                    end = hi,
                    "kafka: the offset stored for this partition is past its end (the topic \
                     was recreated, or the broker lost data); {to}, as auto.offset.reset says"
                );
                start
            }
            Start::Deleted(lo) => {
                tracing::warn!(
                    topic,
                    partition = part,
                    stored = off,
                    oldest = lo,
                    "kafka: messages of this partition were deleted (retention) before they \
                     were read; reading from the oldest one left"
                );
                lo
            }
        }
    }

    /// Seek every assigned partition to the offset stored with the state.
    fn on_assign(&self, consumer: &BaseConsumer<Ctx>, tpl: &mut TopicPartitionList) {
        self.metrics
            .kafka_rebalances
            .with_label_values(&["assign"])
            .inc();
        let parts: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        // Watermarks first: a stored offset outside them is not where to start, and they
        // tell ordering at once which partitions have a backlog (statistics would tell
        // only a second later).
        // At most `WATERMARKS_WAIT` for all of them: this holds up the rebalance.
        // Asked a few at a time, so one slow partition does not use the whole budget.
        let until = StdInstant::now() + WATERMARKS_WAIT;
        let lanes = parts.len().clamp(1, WATERMARK_LANES);
        let answers: Vec<_> = std::thread::scope(|scope| {
            let parts = &parts;
            let lanes: Vec<_> = (0..lanes)
                .map(|lane| {
                    scope.spawn(move || {
                        parts
                            .iter()
                            .skip(lane)
                            .step_by(lanes)
                            .map(|(t, p)| {
                                let left = until.saturating_duration_since(StdInstant::now());
                                (t, *p, consumer.fetch_watermarks(t, *p, left))
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            lanes
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_default())
                .collect()
        });
        let mut marks = Vec::new();
        let mut unknown = Vec::new();
        for (t, p, answer) in answers {
            match answer {
                // librdkafka gives -1 for what the broker did not say.
                Ok((lo, hi)) if lo >= 0 && hi >= 0 => marks.push((t.clone(), p, lo, hi)),
                Ok(_) => unknown.push(format!("{t}/{p}")),
                Err(e) => {
                    tracing::debug!(error = %e, topic = t, partition = p, "kafka: no watermarks");
                    unknown.push(format!("{t}/{p}"));
                }
            }
        }
        if !unknown.is_empty() {
            tracing::warn!(
                partitions = %unknown.join(","),
                "kafka: the brokers did not tell these partitions' offset ranges in time; \
                 their stored offsets are used unchecked"
            );
        }
        let mut stored = Vec::new();
        {
            let conn = lock(&self.state);
            for (t, p) in &parts {
                match store::load_position(&conn, &store::kafka_position_key(t, *p)) {
                    Ok(Some(pos)) => {
                        let off = pos.offset as i64;
                        let range = marks
                            .iter()
                            .find(|m| m.0 == *t && m.1 == *p)
                            .map(|m| (m.2, m.3));
                        let start = self.start_at(t, *p, off, range);
                        let _ = tpl.set_partition_offset(t, *p, Offset::Offset(start));
                        stored.push((t.clone(), *p, start, start != off));
                    }
                    Ok(None) => {}
                    Err(e) => tracing::error!(
                        error = format!("{e:#}"),
                        topic = t,
                        partition = p,
                        "kafka: cannot read the stored offset; starting from the group's"
                    ),
                }
            }
        }
        let r = match consumer.rebalance_protocol() {
            RebalanceProtocol::Cooperative => consumer.incremental_assign(tpl),
            _ => consumer.assign(tpl),
        };
        if let Err(e) = r {
            tracing::error!(error = %e, "kafka: assign failed");
        }
        let mut inner = lock(&self.inner);
        if !matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        ) {
            inner.assigned.clear();
        }
        inner.has_assignment = true;
        for (t, p, lo, hi) in marks {
            if let Some(ta) = self.topic_arc(&t) {
                inner.hi.insert((ta, p), (hi, lo.max(0)));
            }
        }
        for (t, p) in &parts {
            if let Some(ta) = self.topic_arc(t) {
                inner.drained.remove(&(Arc::clone(&ta), *p));
                inner.assigned.insert((ta, *p));
            }
        }
        for (t, p, off, moved) in stored {
            if let Some(ta) = self.topic_arc(&t) {
                // Stored with the next batch, even if the partition gives nothing: the
                // check is not made again at every restart.
                if moved {
                    inner.next.insert((Arc::clone(&ta), p), off);
                }
                inner.start.insert((Arc::clone(&ta), p), off);
                self.metrics
                    .kafka_committed
                    .with_label_values(&[&t, &p.to_string()])
                    .set(off);
                inner.committed.insert((ta, p), off);
            }
        }
        self.metrics.kafka_assigned.set(inner.assigned.len() as i64);
        tracing::info!(partitions = %list(tpl), "kafka: partitions assigned");
    }
}

fn list(tpl: &TopicPartitionList) -> String {
    tpl.elements()
        .iter()
        .map(|e| format!("{}/{}", e.topic(), e.partition()))
        .collect::<Vec<_>>()
        .join(",")
}

impl ClientContext for Ctx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, msg: &str) {
        log_to_tracing(level, fac, msg);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        *self.reported.lock().unwrap_or_else(|e| e.into_inner()) = error.rdkafka_error_code();
        let kind = error_kind(&error);
        self.metrics.kafka_errors.with_label_values(&[kind]).inc();
        if kind == "all_brokers_down" {
            self.health
                .set_down(&format!("brokers unreachable: {reason}"));
            self.metrics.kafka_up.set(0);
        }
        tracing::warn!(%error, reason, "kafka client error");
    }

    fn stats(&self, s: Statistics) {
        // A member with nothing to fetch hears from its brokers only at metadata refreshes
        // (minutes apart), but from the group coordinator at every heartbeat: that logical
        // connection's answers count too.
        let answering = s.brokers.values().any(|b| {
            b.state == "UP"
                && ((b.nodeid >= 0 && b.rxidle < STALE_MICROS)
                    || (b.source == "logical" && (0..STALE_MICROS).contains(&b.rxidle)))
        });
        if answering {
            self.health.set_up();
            self.metrics.kafka_up.set(1);
        } else {
            let idle = s
                .brokers
                .values()
                .filter(|b| b.nodeid >= 0 && b.state == "UP")
                .map(|b| b.rxidle / 1_000_000)
                .max();
            let why = match idle {
                Some(secs) => format!("brokers unreachable: no response for {secs}s"),
                None => "brokers unreachable: no connection".to_string(),
            };
            self.health.set_down(&why);
            self.metrics.kafka_up.set(0);
        }
        // Leaders whose last answer is recent enough for their high watermarks to count.
        let fresh: std::collections::HashSet<i32> = s
            .brokers
            .values()
            .filter(|b| b.nodeid >= 0 && b.state == "UP" && (0..FRESH_MICROS).contains(&b.rxidle))
            .map(|b| b.nodeid)
            .collect();
        let mut inner = lock(&self.inner);
        // Not before the group has answered (an assignment of no partitions is an
        // answer: this member has nothing to read, and no broker's silence holds it).
        let mut backlog = !inner.has_assignment || (!answering && !inner.assigned.is_empty());
        // Assigned partitions the statistics tell a high watermark of.
        let mut known = 0;
        for (topic, t) in &s.topics {
            for (p, part) in &t.partitions {
                if *p < 0 {
                    continue;
                }
                let Some(ta) = self.topic_arc(topic) else {
                    continue;
                };
                let tp = (ta, *p);
                if !inner.assigned.contains(&tp) {
                    continue;
                }
                if part.hi_offset < 0 {
                    // Never fetched (its leader down since the assignment, say): what it
                    // holds is not known, so it is not known to be idle either.
                    backlog = true;
                    continue;
                }
                known += 1;
                // An old watermark may miss what arrived since: not known to be idle. Told
                // by the broker fetched from (a follower, with `client.rack`), else the
                // leader.
                let from = if part.broker >= 0 {
                    part.broker
                } else {
                    part.leader
                };
                backlog |= !fresh.contains(&from);
                let base = if part.committed_offset >= 0 {
                    part.committed_offset
                } else {
                    part.lo_offset.max(0)
                };
                inner.hi.insert(tp.clone(), (part.hi_offset, base));
                let drained = part.fetch_state == "active"
                    && part.next_offset >= part.hi_offset
                    && part.fetchq_cnt == 0;
                if drained {
                    let n = inner.drained.entry(tp.clone()).or_default();
                    *n = n.saturating_add(1);
                } else {
                    inner.drained.remove(&tp);
                }
                let drained = Self::drained(&inner, &tp);
                // A partition that has given nothing since its assignment, with its fetcher
                // at the end: its position is stored too (with the next batch), so that a
                // restart reads on from here instead of resolving `auto.offset.reset` again
                // (with `latest`, what came while the daemon was stopped was skipped).
                if drained
                    && part.next_offset >= 0
                    && !inner.seen.contains_key(&tp)
                    && !inner.start.contains_key(&tp)
                    && !inner.committed.contains_key(&tp)
                    && !inner.next.contains_key(&tp)
                {
                    inner.next.insert(tp.clone(), part.next_offset);
                }
                // Lag from the offset committed in the state file; for a partition
                // nothing was consumed from yet, from where reading will start. None once
                // the fetcher is at the end and all it gave is committed.
                let from = inner.committed.get(&tp).copied().unwrap_or(base);
                let all_committed = inner
                    .seen
                    .get(&tp)
                    .is_none_or(|s| inner.committed.get(&tp).is_some_and(|c| c >= s));
                let lag = if drained && all_committed {
                    0
                } else {
                    (part.hi_offset - from).max(0)
                };
                backlog |= lag > 0;
                self.metrics
                    .kafka_lag
                    .with_label_values(&[topic, &p.to_string()])
                    .set(lag);
            }
        }
        // An assigned partition the statistics do not tell at all: not known idle.
        backlog |= known < inner.assigned.len();
        self.health.holding.store(backlog, Ordering::Relaxed);
        self.health.held_at.store(wall_ms(), Ordering::Relaxed);
    }
}

impl ConsumerContext for Ctx {
    /// An asynchronous mirror commit that failed is sent again on the next round: the
    /// partitions' mirrored offsets are forgotten (unless a newer one was sent since).
    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        let failed = forget_failed(&mut lock(&self.inner).mirrored, &result, offsets, |t| {
            self.topic_arc(t)
        });
        if failed > 0 {
            self.metrics
                .kafka_errors
                .with_label_values(&["commit"])
                .inc();
            let error = result.err().map(|e| e.to_string());
            tracing::debug!(
                partitions = failed,
                ?error,
                "kafka: mirroring offsets to the group failed; retrying"
            );
        }
    }

    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => self.on_assign(consumer, tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                // (A rebalance error drops the assignment the same way; counted as such.)
                self.metrics
                    .kafka_rebalances
                    .with_label_values(&["revoke"])
                    .inc();
                self.on_revoke(consumer, tpl);
            }
            other => {
                self.metrics
                    .kafka_rebalances
                    .with_label_values(&["error"])
                    .inc();
                tracing::error!(error = %RDKafkaErrorCode::from(other), "kafka: rebalance error; dropping the assignment");
                self.on_revoke(consumer, tpl);
            }
        }
    }
}

/// Forgets the mirrored offset of each partition whose commit failed (all of `offsets`
/// when `result` is an error, else those with an error of their own) while it is still
/// the offset that was sent; returns how many failed.
fn forget_failed(
    mirrored: &mut HashMap<Tp, i64>,
    result: &KafkaResult<()>,
    offsets: &TopicPartitionList,
    topic: impl Fn(&str) -> Option<Arc<str>>,
) -> usize {
    let mut failed = 0;
    for e in offsets.elements() {
        if result.is_ok() && e.error().is_ok() {
            continue;
        }
        failed += 1;
        let (Some(t), Offset::Offset(off)) = (topic(e.topic()), e.offset()) else {
            continue;
        };
        let tp = (t, e.partition());
        if mirrored.get(&tp) == Some(&off) {
            mirrored.remove(&tp);
        }
    }
    failed
}

/// The consumer thread of all `kafka` sources.
pub struct Source {
    pub cfg: Arc<Config>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub core: SyncSender<Msg>,
    pub stop: Arc<AtomicBool>,
}

impl Source {
    pub fn run(self) -> Result<()> {
        let Some(k) = &self.cfg.kafka else {
            return Ok(());
        };
        let mut sources = HashMap::new();
        for s in &self.cfg.sources {
            if let SourceKind::Kafka { topic } = &s.kind {
                sources.insert(topic.clone(), Arc::<str>::from(s.name.as_str()));
            }
        }
        if sources.is_empty() {
            return Ok(());
        }
        let ctx = Ctx {
            metrics: Arc::clone(&self.metrics),
            health: Arc::clone(&self.health),
            core: self.core.clone(),
            topics: sources
                .keys()
                .map(|t| (t.clone(), Arc::<str>::from(t.as_str())))
                .collect(),
            sources,
            state: Mutex::new(store::open_existing(&self.cfg.state)?),
            reset: reset_offset(&consumer_config(k)),
            inner: Mutex::default(),
            core_gone: AtomicBool::new(false),
            reported: Mutex::new(None),
        };
        let consumer: BaseConsumer<Ctx> = consumer_config(k)
            .create_with_context(ctx)
            .map_err(|e| anyhow::anyhow!("kafka: cannot create the consumer: {}", redacted(&e)))?;
        let topics: Vec<String> = consumer.context().sources.keys().cloned().collect();
        let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&refs)
            .context("kafka: cannot subscribe")?;
        tracing::info!(topics = ?topics, group = k.group, "kafka: consuming");
        let ctx = consumer.context();
        let mut last_mirror = StdInstant::now();
        while !self.stop.load(Ordering::Relaxed) && !ctx.core_gone.load(Ordering::Relaxed) {
            // Take what librdkafka has (up to a bound), waiting briefly only when idle.
            let mut drained = false;
            for i in 0..MAX_BATCH {
                let wait = match (i, ctx.held() > 0 || ctx.has_pending()) {
                    (0, false) => Duration::from_millis(100),
                    (0, true) => Duration::from_millis(10),
                    _ => Duration::ZERO,
                };
                match consumer.poll(wait) {
                    Some(Ok(m)) => ctx.push(&m),
                    Some(Err(e)) => {
                        // A fatal error (a static member fenced by another with its
                        // group.instance.id, say) ends consuming for good: librdkafka
                        // leaves the group and never rejoins. Said, not polled on.
                        if let Some((code, why)) = consumer.client().fatal_error() {
                            anyhow::bail!(
                                "kafka consumer stopped by a fatal error ({code:?}): {why}"
                            );
                        }
                        // An error event was counted and logged by the context as it
                        // passed; a fetch error (in a message) was not.
                        let reported = ctx
                            .reported
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .take();
                        if reported.is_none() || reported != e.rdkafka_error_code() {
                            self.metrics
                                .kafka_errors
                                .with_label_values(&[error_kind(&e)])
                                .inc();
                            tracing::warn!(error = %e, "kafka: consume error");
                        }
                    }
                    None => {
                        drained = true;
                        break;
                    }
                }
            }
            ctx.release(k.align_wait);
            if drained || ctx.batch_full() {
                ctx.send_batch();
            }
            ctx.collect_acks(false);
            if last_mirror.elapsed() >= MIRROR_EVERY {
                ctx.mirror(&consumer, None, CommitMode::Async);
                last_mirror = StdInstant::now();
            }
        }
        // Dropping the consumer leaves the group: the revoke handler commits first.
        ctx.send_batch();
        drop(consumer);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_offset_outside_the_watermarks_is_not_where_to_start() {
        assert_eq!(start_of(5, None), Start::Stored);
        assert_eq!(start_of(5, Some((0, 5))), Start::Stored);
        assert_eq!(start_of(5, Some((5, 9))), Start::Stored);
        assert_eq!(start_of(6, Some((1, 5))), Start::PastEnd { lo: 1, hi: 5 });
        assert_eq!(start_of(3, Some((4, 9))), Start::Deleted(4));
        let reset = |v: Option<&str>| {
            let mut c = ClientConfig::new();
            if let Some(v) = v {
                c.set("auto.offset.reset", v);
            }
            reset_offset(&c)
        };
        assert_eq!(reset(Some("earliest")), Some(Offset::Beginning));
        assert_eq!(reset(Some("smallest")), Some(Offset::Beginning));
        assert_eq!(reset(Some("Earliest")), Some(Offset::Beginning));
        assert_eq!(reset(Some("latest")), Some(Offset::End));
        assert_eq!(reset(Some("error")), None);
        // librdkafka's own default.
        assert_eq!(reset(None), Some(Offset::End));
        let mut k = KafkaConfig {
            brokers: "127.0.0.1:1".into(),
            group: "g".into(),
            consumer: Vec::new(),
            producer: Vec::new(),
            connect_timeout: Duration::from_secs(1),
            align_wait: Duration::from_secs(1),
        };
        // sagawatch's default, and the user's choice over it.
        assert_eq!(reset_offset(&consumer_config(&k)), Some(Offset::Beginning));
        k.consumer
            .push(("auto.offset.reset".into(), "latest".into()));
        assert_eq!(reset_offset(&consumer_config(&k)), Some(Offset::End));
    }

    /// A failed asynchronous mirror commit is forgotten, so the next round sends it
    /// again; a partition mirrored anew meanwhile keeps its newer offset.
    #[test]
    fn a_failed_mirror_commit_is_sent_again() {
        let t: Arc<str> = Arc::from("orders");
        let topic = |name: &str| (name == "orders").then(|| Arc::clone(&t));
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("orders", 0, Offset::Offset(10))
            .unwrap();
        tpl.add_partition_offset("orders", 1, Offset::Offset(20))
            .unwrap();
        let mut mirrored = HashMap::from([((Arc::clone(&t), 0), 10), ((Arc::clone(&t), 1), 25)]);
        assert_eq!(forget_failed(&mut mirrored, &Ok(()), &tpl, topic), 0);
        assert_eq!(mirrored.len(), 2);
        let err = Err(KafkaError::ConsumerCommit(
            RDKafkaErrorCode::RequestTimedOut,
        ));
        assert_eq!(forget_failed(&mut mirrored, &err, &tpl, topic), 2);
        assert_eq!(mirrored, HashMap::from([((Arc::clone(&t), 1), 25)]));
    }

    /// rdkafka hands each producer error event to the context twice in a row: counted
    /// once. The next event, though the same error, counts again.
    #[test]
    fn a_producer_error_event_is_counted_once() {
        let metrics = Arc::new(Metrics::new());
        let ctx = LogContext(Some(Arc::clone(&metrics)), Mutex::new(None));
        let down = || KafkaError::Global(RDKafkaErrorCode::AllBrokersDown);
        let count = || {
            metrics
                .kafka_errors
                .with_label_values(&["all_brokers_down"])
                .get()
        };
        ctx.error(down(), "1/1 brokers are down");
        ctx.error(down(), "1/1 brokers are down");
        assert_eq!(count(), 1);
        ctx.error(down(), "1/1 brokers are down");
        ctx.error(down(), "1/1 brokers are down");
        assert_eq!(count(), 2);
    }
}
