//! The outbox dispatcher: delivers pending messages to their sinks with bounded
//! concurrency per sink (a hanging receiver holds only its own slots; deliveries start as
//! slots free up), per-sink timeouts and exponential backoff with jitter (or the
//! receiver's `Retry-After`), records every attempt in the state file, gives up (logged
//! and counted) after the configured age, and re-sends firing alerts to Alertmanager.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant as StdInstant};

use anyhow::Result;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_tls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::proxy::matcher::Intercept;
use hyper_util::rt::TokioExecutor;
use rusqlite::Connection;
use tokio::sync::Notify;
use tokio::task::{Id, JoinError, JoinSet};

use crate::config::{Config, OutboxConfig, Sink, SinkKind, Tls};
use crate::daemon::bad_log::BadLog;
use crate::daemon::core::wall_ms;
use crate::daemon::metrics::Metrics;
use crate::daemon::proxy::Route;
use crate::sign;
use crate::store::{self, Delivery, Outbox, Pending};

type HttpClient = Client<HttpsConnector<Route>, Full<Bytes>>;

/// What deliveries go through: the HTTP clients and, with `kafka` sinks, the producer.
#[derive(Clone)]
struct Clients {
    /// For HTTP sinks that trust the system's CAs only, without a proxy.
    http: HttpClient,
    /// For those with TLS settings of their own or a proxy, by sink name.
    http_tls: Arc<HashMap<String, HttpClient>>,
    /// The proxy (URL without credentials) of each HTTP sink that has one, for messages.
    via: Arc<HashMap<String, String>>,
    kafka: Option<crate::daemon::kafka::Producer>,
    /// With a `stdout` sink, its writer.
    stdout: Option<StdoutWriter>,
}

/// A line to print and where to say how it went.
type StdoutLine = (String, tokio::sync::oneshot::Sender<std::io::Result<()>>);

/// The `stdout` sink's writer: a thread of its own, because a write to a pipe nobody reads
/// blocks. Then only this sink's deliveries wait (its slots fill, as a hanging receiver's
/// do), never the runtime serving HTTP, signals and the other sinks. A line is printed
/// whole and flushed before it counts as delivered.
///
/// Lines are queued in outbox order by the dispatcher itself (the delivery tasks, which
/// run concurrently, only wait for them), so they print in that order; the queue holds at
/// most the sink's deliveries in flight.
#[derive(Clone)]
struct StdoutWriter(tokio::sync::mpsc::UnboundedSender<StdoutLine>);

/// A line queued for printing: its result to come.
type Queued = Result<tokio::sync::oneshot::Receiver<std::io::Result<()>>, Failed>;

impl StdoutWriter {
    fn start() -> std::io::Result<StdoutWriter> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<StdoutLine>();
        std::thread::Builder::new()
            .name("sink-stdout".into())
            .spawn(move || {
                while let Some((line, done)) = rx.blocking_recv() {
                    // Its delivery was given up (the stop's grace period ended): the line
                    // stays pending and is printed after a restart, not now too.
                    if done.is_closed() {
                        continue;
                    }
                    let mut out = std::io::stdout().lock();
                    let r = writeln!(out, "{line}").and_then(|()| out.flush());
                    let _ = done.send(r);
                }
            })?;
        Ok(StdoutWriter(tx))
    }

    /// Queues the line of an outbox message's body (its `data`, as `replay` prints it).
    fn queue(&self, body: &str) -> Queued {
        let v = crate::event::parse_json(body).map_err(|e| Failed::from(e.to_string()))?;
        let line = crate::output::line_text(v.get("data").unwrap_or(&v));
        let (done, result) = tokio::sync::oneshot::channel();
        self.0.send((line, done)).map_err(|_| gone())?;
        Ok(result)
    }

    /// Waits until a queued line is printed and flushed.
    async fn printed(queued: Queued) -> Result<(), Failed> {
        match queued?.await {
            Ok(r) => r.map_err(|e| Failed::from(format!("stdout: {e}"))),
            Err(_) => Err(gone()),
        }
    }
}

fn gone() -> Failed {
    Failed::from("stdout: the writer stopped".to_string())
}

pub struct Dispatcher {
    pub cfg: Arc<Config>,
    pub metrics: Arc<Metrics>,
    pub rt: tokio::runtime::Handle,
    /// Notified when new messages are committed, and at the stop.
    pub wake: Arc<Notify>,
    pub stop: Arc<AtomicBool>,
    /// How long to keep delivering after `stop`.
    pub grace: Duration,
    /// The proxy of each HTTP sink that has one.
    pub proxies: HashMap<String, Intercept>,
    /// Turns at writing with the core.
    pub gate: Arc<store::WriteGate>,
}

/// How often the backlog gauges are refreshed while deliveries are in flight.
const PUBLISH_EVERY: Duration = Duration::from_millis(250);

/// Lines the stdout sink may have queued and not yet printed.
const STDOUT_IN_FLIGHT: usize = 1024;

/// What a finished task reports.
enum Done {
    Delivery(Box<Pending>, Result<(), Failed>),
    /// An Alertmanager sink's firing alerts re-sent.
    Resend(String, Result<(), Failed>),
}

/// Deliveries that must not overtake one another: an Alertmanager alert and its resolve
/// (Alertmanager knows an alert by its labels, so they share a label set), or the messages
/// of one instance step to one sink. Firing alerts with the same labels may go together;
/// anything else goes alone.
struct Lane {
    name: String,
    shared: bool,
    /// An Alertmanager resolve: it must not race a re-send of the sink's firing alerts
    /// either (the re-send would fire the alert again).
    resolve: bool,
}

impl Lane {
    fn of(p: &Pending) -> Lane {
        let name = match &p.fp {
            Some(fp) => format!("{}\0{}\0{}\0{fp}", p.sink, p.rule, p.step),
            None => format!(
                "{}\0{}\0{}\0{}\0{:?}",
                p.sink, p.rule, p.step, p.key, p.opened
            ),
        };
        Lane {
            name,
            shared: p.fp.is_some() && p.kind == "alert",
            resolve: p.fp.is_some() && p.kind == "resolve",
        }
    }
}

/// What is in flight: delivery tasks by message, their lanes, and re-sends by sink.
#[derive(Default)]
struct Flight {
    tasks: JoinSet<Done>,
    /// A delivery task's message seq; re-send tasks are not here.
    by_task: HashMap<Id, i64>,
    /// Messages in flight: their sink, lane, and the message (recorded as failed if its
    /// task panics, so it backs off like any failure).
    seqs: HashMap<i64, (String, Lane, Pending)>,
    /// Lanes in use: deliveries in flight, and whether one of them goes alone.
    lanes: HashMap<String, (usize, bool)>,
    /// Deliveries in flight by sink.
    sinks: HashMap<String, usize>,
    resending: HashMap<Id, String>,
    /// Retry-After answers to re-sends, by sink: they hold the sink like any other.
    held: Vec<(String, Duration)>,
}

impl Flight {
    /// Deliveries in flight (what the concurrency bound counts).
    fn len(&self) -> usize {
        self.seqs.len()
    }

    /// Whether no task at all (delivery or re-send) is running.
    fn idle(&self) -> bool {
        self.tasks.is_empty()
    }

    fn sink_len(&self, sink: &str) -> usize {
        self.sinks.get(sink).copied().unwrap_or(0)
    }

    fn has(&self, seq: i64) -> bool {
        self.seqs.contains_key(&seq)
    }

    fn may_start(&self, lane: &Lane) -> bool {
        match self.lanes.get(&lane.name) {
            None => true,
            Some(&(_, alone)) => lane.shared && !alone,
        }
    }

    fn start(&mut self, task: Id, p: Pending, sink: &str, lane: Lane) {
        let seq = p.seq;
        *self.sinks.entry(sink.to_string()).or_default() += 1;
        let e = self.lanes.entry(lane.name.clone()).or_insert((0, false));
        e.0 += 1;
        e.1 |= !lane.shared;
        self.by_task.insert(task, seq);
        self.seqs.insert(seq, (sink.to_string(), lane, p));
    }

    fn resending(&self, sink: &str) -> bool {
        self.resending.values().any(|s| s == sink)
    }

    /// The label sets of the resolves to `sink` in flight.
    fn resolving<'a>(&'a self, sink: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.seqs
            .values()
            .filter(move |(s, l, _)| s == sink && l.resolve)
            .filter_map(|(_, _, p)| p.fp.as_deref())
    }

    /// Takes a finished task off the books; a delivery's result goes to `out`.
    fn finish(
        &mut self,
        r: Result<(Id, Done), JoinError>,
        out: &mut Vec<(Pending, Result<(), Failed>)>,
    ) {
        let id = match &r {
            Ok((id, _)) => *id,
            Err(e) => e.id(),
        };
        self.resending.remove(&id);
        let mut message = None;
        if let Some((sink, lane, p)) = self
            .by_task
            .remove(&id)
            .and_then(|seq| self.seqs.remove(&seq))
        {
            message = Some(p);
            if let Some(n) = self.sinks.get_mut(&sink) {
                *n -= 1;
            }
            if let Some(e) = self.lanes.get_mut(&lane.name) {
                e.0 -= 1;
                if e.0 == 0 {
                    self.lanes.remove(&lane.name);
                }
            }
        }
        match r {
            Ok((_, Done::Delivery(p, r))) => out.push((*p, r)),
            Ok((_, Done::Resend(sink, Err(e)))) => {
                tracing::warn!(sink, error = %e.error, "re-sending firing alerts failed");
                if let Some(d) = e.retry_after {
                    self.held.push((sink, d));
                }
            }
            Ok((_, Done::Resend(_, Ok(())))) => {}
            Err(e) if e.is_panic() => {
                tracing::error!(error = %e, "delivery task panicked");
                if let Some(p) = message {
                    out.push((p, Err(Failed::from("delivery task panicked".to_string()))));
                }
            }
            // Cut at shutdown: the message stays pending and is sent after restart.
            Err(_) => {}
        }
    }
}

impl Clients {
    fn http_for(&self, sink: &Sink) -> Http {
        Http {
            client: self.http_tls.get(&sink.name).unwrap_or(&self.http).clone(),
            via: self.via.get(&sink.name).cloned(),
        }
    }
}

/// A sink's HTTP client, and the proxy it goes through, if any.
#[derive(Clone)]
struct Http {
    client: HttpClient,
    via: Option<String>,
}

/// An HTTP client for `http://` and `https://` URLs. `https` verifies the receiver's
/// certificate and name, with TLS 1.2 at least, against the CAs of `tls` only, or without
/// any against the system's (OpenSSL's store); and shows its client certificate if asked.
/// Connecting (to the receiver or the proxy) may take the sink's whole `timeout`, which
/// bounds the request as well.
fn client(tls_settings: &Tls, proxy: Option<&Intercept>, timeout: Duration) -> Result<HttpClient> {
    let ca = &tls_settings.ca;
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(timeout));
    http.set_nodelay(true);
    http.enforce_http(false);
    let mut tls = native_tls::TlsConnector::builder();
    tls.min_protocol_version(Some(native_tls::Protocol::Tlsv12));
    // As a ca_file in Prometheus' and Alertmanager's TLS settings: these CAs, not the
    // system's besides (a public CA could otherwise vouch for an internal name).
    tls.disable_built_in_roots(!ca.is_empty());
    for pem in ca {
        tls.add_root_certificate(native_tls::Certificate::from_pem(pem.as_bytes())?);
    }
    if let Some(c) = &tls_settings.client {
        tls.identity(native_tls::Identity::from_pkcs8(
            c.chain.as_bytes(),
            &c.key.0,
        )?);
    }
    let tls = tls
        .build()
        .map_err(|e| anyhow::anyhow!("cannot set up TLS: {e}"))?;
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(HttpsConnector::from((Route::new(http, proxy), tls.into()))))
}

/// A pseudo-random factor in [0.5, 1.0) for backoff jitter (no crate needed for that).
fn jitter(seed: i64) -> f64 {
    let mut x = (seed as u64) ^ 0x9E37_79B9_7F4A_7C15 ^ (wall_ms() as u64).rotate_left(17);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    0.5 + (x % 1000) as f64 / 2000.0
}

/// Why a delivery failed, and how long the receiver asked to be left alone.
#[derive(Debug)]
pub struct Failed {
    pub error: String,
    /// From a `Retry-After` header (seconds or an HTTP date), at most [`MAX_RETRY_AFTER`].
    pub retry_after: Option<Duration>,
}

impl From<String> for Failed {
    fn from(error: String) -> Failed {
        Failed {
            error,
            retry_after: None,
        }
    }
}

/// Finished messages forgotten per turn at writing.
const PURGE_CHUNK: usize = 10_000;

/// The longest `Retry-After` honoured: a receiver asking for days is retried hourly.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// The delay a `Retry-After` value asks for, at `now`: delay-seconds or an HTTP date.
pub fn retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let v = value.trim();
    let d = match v.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        // More seconds than a u64 holds: as long as is honoured.
        Err(_) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => MAX_RETRY_AFTER,
        Err(_) => httpdate::parse_http_date(v)
            .ok()?
            .duration_since(now)
            .unwrap_or_default(),
    };
    Some(d.min(MAX_RETRY_AFTER))
}

pub fn backoff(cfg: &OutboxConfig, attempts: i64, seed: i64) -> Duration {
    let base = cfg.backoff.as_secs_f64() * 2f64.powi(attempts.clamp(0, 30) as i32);
    let d = base.min(cfg.max_backoff.as_secs_f64());
    Duration::from_secs_f64(d * jitter(seed))
}

impl Dispatcher {
    pub fn run(self, state_path: &Path) -> Result<()> {
        let conn = store::open_existing(state_path)?;
        // Checkpoints are the checkpointer's: left on, each commit here copied the WAL's
        // newest frames into the database too.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        let kafka_timeout = self
            .cfg
            .sinks
            .iter()
            .filter(|s| matches!(s.kind, SinkKind::Kafka { .. }))
            .map(|s| s.timeout)
            .max();
        let kafka = match (&self.cfg.kafka, kafka_timeout) {
            (Some(k), Some(t)) => Some(crate::daemon::kafka::producer(
                k,
                t,
                Some(Arc::clone(&self.metrics)),
            )?),
            _ => None,
        };
        let stdout = if self
            .cfg
            .sinks
            .iter()
            .any(|s| matches!(s.kind, SinkKind::Stdout))
        {
            Some(StdoutWriter::start()?)
        } else {
            None
        };
        // One client (its CA store and connection pool) per TLS setting, proxy and
        // timeout, shared by the sinks that have the same.
        let mut by_tls: HashMap<(&Tls, Option<String>, Duration), HttpClient> = HashMap::new();
        let mut http_tls = HashMap::new();
        let mut via = HashMap::new();
        for s in &self.cfg.sinks {
            let tls = s.kind.tls();
            let proxy = self.proxies.get(&s.name);
            if let Some(p) = proxy {
                // The URL without credentials (the matcher keeps them apart).
                tracing::info!(sink = s.name, proxy = %p.uri(), "delivering through a proxy");
                via.insert(s.name.clone(), p.uri().to_string());
            }
            if !matches!(
                s.kind,
                SinkKind::Webhook { .. } | SinkKind::Alertmanager { .. }
            ) {
                continue;
            }
            // Sinks share a proxy's client when they share its URL and credentials.
            let id = proxy.map(|p| {
                let auth = p.basic_auth().map(|a| a.as_bytes().to_vec());
                format!("{}{auth:?}", p.uri())
            });
            let c = match by_tls.get(&(tls, id.clone(), s.timeout)) {
                Some(c) => c.clone(),
                None => {
                    let c = client(tls, proxy, s.timeout)?;
                    by_tls.insert((tls, id, s.timeout), c.clone());
                    c
                }
            };
            http_tls.insert(s.name.clone(), c);
        }
        let clients = Clients {
            http: client(&Tls::default(), None, Duration::from_secs(10))?,
            http_tls: Arc::new(http_tls),
            via: Arc::new(via),
            kafka,
            stdout,
        };
        let sinks: HashMap<String, Sink> = self
            .cfg
            .sinks
            .iter()
            .map(|s| (s.name.clone(), s.clone()))
            .collect();
        let _rt = self.rt.enter();
        // Messages for a sink no longer in the config wait for it to come back.
        for (sink, n) in Outbox::stats(&conn)?.pending {
            if !sinks.contains_key(&sink) && n > 0 {
                tracing::warn!(
                    sink,
                    pending = n,
                    "messages for a sink that is no longer configured are kept, and sent once it is configured again"
                );
            }
        }
        let mut flight = Flight::default();
        // When the grace period after a stop ends.
        let mut stop_at: Option<StdInstant> = None;
        let mut finished: Vec<(Pending, Result<(), Failed>)> = Vec::new();
        // Results classified (and counted) but not yet recorded: kept until a record
        // commits, and their messages not started again meanwhile (a full disk must not
        // make delivered messages go out again and again).
        let mut unrecorded: Vec<(i64, Delivery)> = Vec::new();
        // A dead receiver with a large backlog fails thousands of deliveries a second.
        let mut retry_log = BadLog::for_sinks("failed deliveries to retry");
        let mut last_resend: HashMap<String, StdInstant> = HashMap::new();
        let mut last_purge = StdInstant::now();
        let mut last_publish: Option<StdInstant> = None;
        // Sinks whose receiver asked (Retry-After) not to be sent anything until then.
        let mut paused: HashMap<String, StdInstant> = HashMap::new();
        loop {
            if stop_at.is_none() && self.stop.load(Ordering::Relaxed) {
                stop_at = Some(StdInstant::now() + self.grace);
            }
            // An idempotent producer that hit a fatal error (its sequence lost, say) fails
            // every send from then on: the dispatcher stops, and with it the daemon, for a
            // restart with a new producer; the outbox keeps what was not delivered.
            if let Some(k) = &clients.kafka
                && let Some((code, why)) = rdkafka::producer::Producer::client(k).fatal_error()
            {
                anyhow::bail!("kafka producer stopped by a fatal error ({code:?}): {why}");
            }
            let r = (|| -> Result<Option<Duration>> {
                // What finished is recorded first, in its turn at writing (see
                // `WriteGate`); what fails to be recorded is kept and recorded later.
                for (p, r) in finished.drain(..) {
                    if let Err(Failed {
                        retry_after: Some(d),
                        ..
                    }) = &r
                    {
                        let until = StdInstant::now() + *d;
                        let e = paused.entry(p.sink.clone()).or_insert(until);
                        *e = (*e).max(until);
                    }
                    let d = self.classify(&p, r, &mut retry_log);
                    unrecorded.push((p.seq, d));
                }
                retry_log.flush(false);
                for (sink, d) in flight.held.drain(..) {
                    let until = StdInstant::now() + d;
                    let e = paused.entry(sink).or_insert(until);
                    *e = (*e).max(until);
                }
                paused.retain(|_, t| *t > StdInstant::now());
                // Re-sends go out whatever else waits: they only read, while every write
                // here waits for its turn, which a long core batch (a mass expiry) holds
                // for as long as it takes; re-sends held up that long would let
                // Alertmanager end every firing alert, to fire them again at the next one.
                // So they are also sent while a turn is awaited (see `turn`).
                let mut resend = |flight: &mut Flight,
                                  finished: &mut Vec<(Pending, Result<(), Failed>)>|
                 -> Result<()> {
                    // Tasks that finished meanwhile off the books first: a re-send task
                    // done holds its sink's next re-send only until it is (their results
                    // are recorded in the next round).
                    while let Some(r) = flight.tasks.try_join_next_with_id() {
                        flight.finish(r, finished);
                    }
                    if stop_at.is_none() {
                        self.resend_alerts(
                            &conn,
                            &clients,
                            &sinks,
                            &mut last_resend,
                            flight,
                            &paused,
                        )?;
                    }
                    Ok(())
                };
                resend(&mut flight, &mut finished)?;
                if !unrecorded.is_empty() {
                    let _turn = self.turn(|| resend(&mut flight, &mut finished))?;
                    self.record(&conn, &unrecorded)?;
                    unrecorded.clear();
                }
                // Past the grace period nothing more starts.
                if stop_at.is_some_and(|t| StdInstant::now() >= t) {
                    return Ok(None);
                }
                let now = wall_ms();
                // Start what is due, sink by sink, in outbox order, while the sink has
                // slots: a slow or hanging receiver holds only its own. A message whose
                // lane is busy waits, and so does everything after it in that lane.
                // Stopping, nothing more starts in the second half of the grace period:
                // what is in flight gets that long to finish and be recorded (one cut at
                // the end may have arrived, and goes again after the restart).
                let starting = stop_at.is_none_or(|t| StdInstant::now() + self.grace / 2 < t);
                let mut waiting = false;
                // Messages held behind an older one of their lane that waits for a retry:
                // not due before it. Left due, they would sort first at every round (by
                // their first due time), read again and again, and enough of them would
                // fill the fetched window and hide the sink's other messages.
                let mut deferred: Vec<(i64, i64)> = Vec::new();
                for s in self.cfg.sinks.iter().filter(|_| starting) {
                    // The receiver's Retry-After holds the whole sink, not only the
                    // message it answered.
                    if paused.contains_key(&s.name) {
                        continue;
                    }
                    // The stdout sink's lines are queued in order for one writer thread:
                    // many in flight cost nothing, and a few made a burst of alerts print
                    // at the pace of one dispatcher round (with its commit) per few lines.
                    let bound = match s.kind {
                        SinkKind::Stdout => self.cfg.outbox.concurrency.max(STDOUT_IN_FLIGHT),
                        _ => self.cfg.outbox.concurrency,
                    };
                    let mut limit = bound * 2 + flight.sink_len(&s.name);
                    let mut seen: HashSet<i64> = HashSet::new();
                    // Lanes holding a message back, with the oldest one held: a message
                    // waits only behind an older one (a retried message is due after newer
                    // ones of its lane, in `next_ms` order).
                    let mut blocked: HashMap<String, i64> = HashMap::new();
                    // Lanes whose head waits for a retry: until when.
                    let mut retrying: HashMap<String, i64> = HashMap::new();
                    loop {
                        let due = Outbox::due_for(&conn, &s.name, now, limit)?;
                        let fetched = due.len();
                        let mut queue: VecDeque<Pending> = due.into();
                        while let Some(p) = queue.pop_front() {
                            // (Nothing is unrecorded here: a failed record ends the
                            // round above, before anything starts. But a delivery that
                            // finished while a re-send went out waits in `finished` for
                            // the next round's record: not started again meanwhile.)
                            if flight.has(p.seq)
                                || finished.iter().any(|(f, _)| f.seq == p.seq)
                                || !seen.insert(p.seq)
                            {
                                continue;
                            }
                            waiting = true;
                            let lane = Lane::of(&p);
                            // The stdout sink prints in the order lines are queued (below):
                            // messages of a lane may be in flight together.
                            let queued_in_order = matches!(s.kind, SinkKind::Stdout);
                            let mut held = flight.sink_len(&s.name) >= bound
                                || blocked.get(&lane.name).is_some_and(|&q| q < p.seq)
                                || (!queued_in_order && !flight.may_start(&lane))
                                || (lane.resolve && flight.resending(&s.name));
                            // Outside Alertmanager lanes (kept in order by superseding), a
                            // message also waits for an older pending one of its lane (one
                            // waiting for a retry, say). That one may be due but outside the
                            // fetched window (it sorts by its retry time): take it up now.
                            if !held
                                && p.fp.is_none()
                                && let Some(head) = Outbox::lane_head(&conn, &p)?
                                && head.seq != p.seq
                                && !(queued_in_order && flight.has(head.seq))
                            {
                                held = true;
                                if head.next_ms > now {
                                    retrying.insert(lane.name.clone(), head.next_ms);
                                } else if !seen.contains(&head.seq) {
                                    queue.push_front(head);
                                }
                            }
                            if held {
                                if let Some(&until) = retrying.get(&lane.name)
                                    && p.next_ms < until
                                {
                                    deferred.push((p.seq, until));
                                }
                                let q = blocked.entry(lane.name).or_insert(p.seq);
                                *q = (*q).min(p.seq);
                                continue;
                            }
                            let client = clients.clone();
                            let sink = s.clone();
                            let message = p.clone();
                            // Queued here, in outbox order: the tasks run concurrently.
                            let queued = match (&s.kind, &clients.stdout) {
                                (SinkKind::Stdout, Some(out)) => Some(out.queue(&p.body)),
                                _ => None,
                            };
                            let task = flight.tasks.spawn(async move {
                                let r = match queued {
                                    Some(q) => StdoutWriter::printed(q).await,
                                    None => deliver(&client, &sink, &p).await,
                                };
                                Done::Delivery(Box::new(p), r)
                            });
                            flight.start(task.id(), message, &s.name, lane);
                        }
                        // More may be due behind what was fetched: fetch further while
                        // slots are free.
                        if fetched < limit || flight.sink_len(&s.name) >= bound || limit >= 1 << 14
                        {
                            break;
                        }
                        limit *= 4;
                    }
                }
                // Stopping: done once nothing is due and no delivery is in flight (a
                // re-send in flight carries no outbox message; it is cut).
                if stop_at.is_some() && !waiting && flight.len() == 0 {
                    return Ok(None);
                }
                if !deferred.is_empty() {
                    let _turn = self.turn(|| resend(&mut flight, &mut finished))?;
                    let tx = conn.unchecked_transaction()?;
                    for (seq, until) in deferred.drain(..) {
                        Outbox::defer(&tx, seq, until)?;
                    }
                    tx.commit()?;
                }
                if last_purge.elapsed() >= Duration::from_secs(60) {
                    let before = wall_ms() - self.cfg.outbox.retain.as_millis() as i64;
                    // A chunk per round: a week after a burst of a million alerts, one
                    // DELETE of them all would hold the core's batches for seconds, and
                    // chunks back to back would too (the gate goes to whoever asks
                    // first). While chunks come back full, the next round purges again.
                    let _turn = self.turn(|| resend(&mut flight, &mut finished))?;
                    if Outbox::purge_done(&conn, before, PURGE_CHUNK)? < PURGE_CHUNK
                        && Outbox::purge_alerts(&conn, Outbox::clock_ms(&conn)?, PURGE_CHUNK)?
                            < PURGE_CHUNK
                    {
                        last_purge = StdInstant::now();
                    }
                }
                if flight.idle() || last_publish.is_none_or(|t| t.elapsed() >= PUBLISH_EVERY) {
                    self.publish(&conn)?;
                    last_publish = Some(StdInstant::now());
                }
                // Wait for the next message to fall due; a finished delivery (a free slot
                // or lane), new messages and the stop wake the wait sooner.
                let mut wait = match Outbox::next_due_after_ms(&conn, now)? {
                    Some(t) => Duration::from_millis((t - wall_ms()).clamp(0, 1000) as u64),
                    None => Duration::from_secs(1),
                };
                if let Some(t) = paused.values().min() {
                    wait = wait.min(t.saturating_duration_since(StdInstant::now()));
                }
                Ok(Some(wait))
            })();
            let wait = match r {
                Ok(Some(w)) => w,
                Ok(None) => break,
                Err(e) => {
                    // A busy or failing state file must not stop deliveries for good. Busy
                    // is expected while the core writes a long batch (a mass expiry an
                    // event caused is one batch): worth a line, not a warning.
                    let busy = e.chain().any(|c| {
                        c.downcast_ref::<rusqlite::Error>().is_some_and(|e| {
                            e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy)
                        })
                    });
                    if busy {
                        tracing::info!(
                            error = format!("{e:#}"),
                            "outbox dispatcher: state file busy (a long batch being written?); retrying"
                        );
                    } else {
                        tracing::warn!(
                            error = format!("{e:#}"),
                            "outbox dispatcher: state file error; retrying"
                        );
                    }
                    if stop_at.is_some_and(|t| StdInstant::now() >= t) {
                        break;
                    }
                    Duration::from_secs(1)
                }
            };
            let cut = stop_at;
            self.rt.block_on(async {
                let cut = async {
                    match cut {
                        Some(t) => tokio::time::sleep_until(t.into()).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    Some(r) = flight.tasks.join_next_with_id(), if !flight.idle() => {
                        flight.finish(r, &mut finished);
                        while let Some(r) = flight.tasks.try_join_next_with_id() {
                            flight.finish(r, &mut finished);
                        }
                    }
                    () = self.wake.notified() => {}
                    () = tokio::time::sleep(wait) => {}
                    () = cut => {}
                }
            });
        }
        // Past the grace period: what is still in flight is cut and sent after restart;
        // what finished is recorded.
        while let Some(r) = flight.tasks.try_join_next_with_id() {
            flight.finish(r, &mut finished);
        }
        let cut = flight.len();
        flight.tasks.abort_all();
        for (p, r) in finished.drain(..) {
            let d = self.classify(&p, r, &mut retry_log);
            unrecorded.push((p.seq, d));
        }
        self.record(&conn, &unrecorded)?;
        if cut > 0 {
            tracing::warn!(
                in_flight = cut,
                "shutting down with deliveries in flight; they are kept and sent after restart"
            );
        }
        let pending: i64 = Outbox::stats(&conn)?.pending.iter().map(|(_, n)| n).sum();
        if pending > cut as i64 {
            tracing::warn!(
                pending,
                "shutting down with undelivered messages; they are kept and sent after restart"
            );
        }
        Ok(())
    }

    fn classify(&self, p: &Pending, r: Result<(), Failed>, retry_log: &mut BadLog) -> Delivery {
        let m = &self.metrics;
        match r {
            Ok(()) => {
                m.deliveries
                    .with_label_values(&[&p.sink, "delivered"])
                    .inc();
                Delivery::Delivered
            }
            Err(Failed { error, retry_after }) => {
                let age = Duration::from_millis((wall_ms() - p.created_ms).max(0) as u64);
                if age >= self.cfg.outbox.give_up {
                    m.deliveries.with_label_values(&[&p.sink, "given_up"]).inc();
                    tracing::error!(sink = p.sink, id = p.id, kind = p.kind, attempts = p.attempts + 1, %error, "giving up on a message");
                    Delivery::GiveUp { error }
                } else {
                    m.deliveries.with_label_values(&[&p.sink, "retry"]).inc();
                    // Not after the give-up age (a last attempt then, not one a whole
                    // `max_backoff` later); never sooner than the receiver asked (429,
                    // 503 with Retry-After).
                    let d = backoff(&self.cfg.outbox, p.attempts, p.seq)
                        .min(self.cfg.outbox.give_up.saturating_sub(age))
                        .max(retry_after.unwrap_or_default());
                    if retry_log.allow(&p.sink) {
                        tracing::warn!(sink = p.sink, id = p.id, attempts = p.attempts + 1, retry_in = ?d, %error, "delivery failed; will retry");
                    }
                    Delivery::Retry {
                        next_ms: wall_ms() + d.as_millis() as i64,
                        error,
                    }
                }
            }
        }
    }

    /// The dispatcher's turn at writing (see `WriteGate`), running `meanwhile` (the
    /// re-sends) every quarter of a second while the core's batch holds it.
    fn turn(&self, mut meanwhile: impl FnMut() -> Result<()>) -> Result<store::GateGuard<'_>> {
        let want = self.gate.want();
        loop {
            if let Some(turn) = want.take_within(Duration::from_millis(250)) {
                return Ok(turn);
            }
            meanwhile()?;
        }
    }

    /// Records delivery results, in one transaction (in the dispatcher's turn at writing).
    fn record(&self, conn: &Connection, results: &[(i64, Delivery)]) -> Result<()> {
        let tx = conn.unchecked_transaction()?;
        for (seq, d) in results {
            Outbox::record(&tx, *seq, d, wall_ms())?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Re-sends the firing alerts of each Alertmanager sink whose interval has passed, as
    /// a task beside the deliveries (one at a time per sink).
    fn resend_alerts(
        &self,
        conn: &Connection,
        clients: &Clients,
        sinks: &HashMap<String, Sink>,
        last: &mut HashMap<String, StdInstant>,
        flight: &mut Flight,
        paused: &HashMap<String, StdInstant>,
    ) -> Result<()> {
        for s in sinks.values() {
            let SinkKind::Alertmanager { resend, .. } = &s.kind else {
                continue;
            };
            // A receiver's Retry-After holds re-sends too, but not so long that
            // Alertmanager lets the firing alerts end (each re-send sets their endsAt four
            // intervals ahead).
            if paused.contains_key(&s.name)
                && last.get(&s.name).is_some_and(|t| t.elapsed() < *resend * 3)
            {
                continue;
            }
            let due = last.get(&s.name).is_none_or(|t| t.elapsed() >= *resend);
            if !due || flight.resending(&s.name) {
                continue;
            }
            // Not the label sets a resolve in flight ends: re-sent, they could land after
            // it and fire the alert again (a new alert with those labels, fired since,
            // follows the resolve in its lane). The others are re-sent all the same: a
            // stream of resolves must not hold them back until Alertmanager ends them.
            let resolving: std::collections::HashSet<&str> = flight.resolving(&s.name).collect();
            // Alertmanager knows an alert by its labels: the missing instances of one rule
            // and step are one alert, sent once (the one that went missing first), not
            // once per instance (100k of them made a re-send of 28 MB). Rows are read one
            // at a time, and only the one kept per label set is turned into an alert.
            let mut by_labels: BTreeMap<String, (Option<crate::time::Instant>, String)> =
                BTreeMap::new();
            let mut alerts: Vec<serde_json::Value> = Vec::new();
            Outbox::for_each_active(conn, &s.name, Outbox::clock_ms(conn)?, |a| {
                let Some(fp) = a.fp else {
                    alerts.extend(alertmanager_alert(&a.body, "alert", *resend));
                    return;
                };
                if resolving.contains(fp.as_str()) {
                    return;
                }
                // As times: the text's fraction digits vary (`00.5Z` < `00Z` as text).
                let at = decided_at(&a.body);
                match by_labels.get(&fp) {
                    Some((kept, _)) if *kept <= at => {}
                    _ => {
                        by_labels.insert(fp, (at, a.body));
                    }
                }
            })?;
            last.insert(s.name.clone(), StdInstant::now());
            if alerts.is_empty() && by_labels.is_empty() {
                continue;
            }
            alerts.extend(
                by_labels
                    .into_values()
                    .filter_map(|(_, body)| alertmanager_alert(&body, "alert", *resend)),
            );
            let body = serde_json::Value::Array(alerts).to_string();
            let (http, mut sink) = (clients.http_for(s), s.clone());
            // The next re-send waits for this one: a receiver slow to answer must not
            // hold it past the alerts' endsAt (four intervals ahead).
            sink.timeout = sink.timeout.min(*resend * 2);
            let task = flight.tasks.spawn(async move {
                let r = post_alertmanager(&http, &sink, body).await;
                Done::Resend(sink.name, r)
            });
            flight.resending.insert(task.id(), s.name.clone());
        }
        Ok(())
    }

    /// Every configured sink's backlog, and that of sinks no longer configured whose
    /// messages are kept until they are again (they wait as much as any).
    fn publish(&self, conn: &Connection) -> Result<()> {
        let stats = Outbox::stats(conn)?;
        let now_ms = wall_ms();
        // Every configured sink (0 when nothing waits), and any other the outbox still has.
        let mut sinks: Vec<&str> = self.cfg.sinks.iter().map(|s| s.name.as_str()).collect();
        for (sink, _) in &stats.pending {
            if !sinks.contains(&sink.as_str()) {
                sinks.push(sink);
            }
        }
        for sink in sinks {
            let find = |v: &[(String, i64)]| v.iter().find(|(k, _)| k == sink).map(|(_, n)| *n);
            self.metrics
                .outbox_backlog
                .with_label_values(&[sink])
                .set(find(&stats.pending).unwrap_or(0));
            // Not for a sink no longer configured: its messages wait, untried, until it is
            // again (an age growing for good would page for a sink nobody uses).
            if self.cfg.sinks.iter().any(|s| s.name == sink) {
                let age = find(&stats.oldest).map_or(0, |t| now_ms.saturating_sub(t).max(0));
                self.metrics
                    .outbox_oldest_age
                    .with_label_values(&[sink])
                    .set(age as f64 / 1e3);
            }
        }
        Ok(())
    }
}

/// When an alert's body says it was decided (its envelope's `timestamp`, the engine
/// clock), read without building the rest of it.
fn decided_at(body: &str) -> Option<crate::time::Instant> {
    #[derive(serde::Deserialize)]
    struct Envelope {
        timestamp: Option<String>,
    }
    serde_json::from_str::<Envelope>(body)
        .ok()?
        .timestamp
        .as_deref()
        .and_then(crate::time::parse_rfc3339)
}

const USER_AGENT: &str = concat!("sagawatch/", env!("CARGO_PKG_VERSION"));

/// Delivers one message to one sink.
async fn deliver(clients: &Clients, sink: &Sink, p: &Pending) -> Result<(), Failed> {
    let http = clients.http_for(sink);
    match &sink.kind {
        SinkKind::Kafka { topic } => match &clients.kafka {
            Some(producer) => crate::daemon::kafka::send(producer, topic, p, sink.timeout)
                .await
                .map_err(Failed::from),
            None => Err(Failed::from("no kafka producer".to_string())),
        },
        SinkKind::Stdout => match &clients.stdout {
            Some(out) => StdoutWriter::printed(out.queue(&p.body)).await,
            None => Err(Failed::from("no stdout writer".to_string())),
        },
        SinkKind::Webhook {
            url,
            secrets,
            headers,
            ..
        } => {
            let ts = wall_ms() / 1000;
            let sig = sign::signature(secrets, &p.id, ts, p.body.as_bytes());
            let mut req =
                hyper::Request::post(url.clone()).header("content-type", "application/json");
            // The configured one replaces it (a receiver's firewall may want its own).
            if !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("user-agent"))
            {
                req = req.header("user-agent", USER_AGENT);
            }
            let mut req = req
                .header("webhook-id", &p.id)
                .header("webhook-timestamp", ts.to_string())
                .header("webhook-signature", sig);
            for (k, v) in headers {
                req = req.header(k, v);
            }
            let req = req
                .body(Full::new(Bytes::from(p.body.clone())))
                .map_err(|e| Failed::from(e.to_string()))?;
            send(&http, req, sink.timeout).await
        }
        SinkKind::Alertmanager { resend, .. } => {
            let a = alertmanager_alert(&p.body, &p.kind, *resend)
                .ok_or_else(|| Failed::from("message is not an alert".to_string()))?;
            let body = serde_json::Value::Array(vec![a]).to_string();
            post_alertmanager(&http, sink, body).await
        }
    }
}

async fn post_alertmanager(http: &Http, sink: &Sink, body: String) -> Result<(), Failed> {
    let SinkKind::Alertmanager { url, headers, .. } = &sink.kind else {
        return Err(Failed::from("not an alertmanager sink".to_string()));
    };
    let base = url.to_string();
    let target = format!("{}/api/v2/alerts", base.trim_end_matches('/'));
    let mut req = hyper::Request::post(target).header("content-type", "application/json");
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("user-agent"))
    {
        req = req.header("user-agent", USER_AGENT);
    }
    for (k, v) in headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| Failed::from(e.to_string()))?;
    send(http, req, sink.timeout).await
}

async fn send(
    http: &Http,
    req: hyper::Request<Full<Bytes>>,
    timeout: Duration,
) -> Result<(), Failed> {
    let fut = async {
        let resp = http.client.request(req).await.map_err(|e| {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                // (TLS errors repeat their cause's text in their own.)
                let text = s.to_string();
                if !msg.contains(&text) {
                    msg.push_str(": ");
                    msg.push_str(&text);
                }
                src = s.source();
            }
            Failed::from(msg)
        })?;
        Ok::<_, Failed>(resp)
    };
    let resp = match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r?,
        // Through a proxy, the wait may be the proxy's (one that takes the connection and
        // never answers CONNECT, say): the message names it.
        Err(_) => {
            return Err(Failed::from(match &http.via {
                Some(p) => format!("timed out after {timeout:?} (through the proxy {p})"),
                None => format!("timed out after {timeout:?}"),
            }));
        }
    };
    let status = resp.status();
    let wait = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| retry_after(v, std::time::SystemTime::now()));
    // Only the status counts: a receiver that answered 2xx took the message, however its
    // body then comes. The start of the body goes into an error; reading a short body to
    // its end lets the connection be used again; a long one is not read on (a receiver
    // answering with a gigabyte must not cost a gigabyte here), nor a slow one waited for.
    let mut body = resp.into_body();
    let mut head = Vec::new();
    let read = async {
        let mut read = 0usize;
        while read < 64 * 1024 {
            match body.frame().await {
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        read += d.len();
                        let room = 200usize.saturating_sub(head.len());
                        head.extend_from_slice(&d[..d.len().min(room)]);
                    }
                }
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(timeout.min(BODY_WAIT), read).await;
    if status.is_success() {
        Ok(())
    } else {
        Err(Failed {
            error: format!("HTTP {status}: {}", printable(&head)),
            retry_after: wait,
        })
    }
}

/// How long the start of a response body is waited for, after its status.
const BODY_WAIT: Duration = Duration::from_secs(2);

/// A receiver's text as it may go into a log line: control characters (line breaks, the
/// escape that starts a terminal colour) escaped, so it can neither forge a line of its
/// own nor recolour the terminal.
fn printable(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

/// The Alertmanager labels of an alert's `data`: what identifies the alert there.
fn labels_of(d: &serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    let s = |k: &str| d.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
    let mut labels = serde_json::Map::new();
    if let Some(extra) = d.get("labels").and_then(|l| l.as_object()) {
        for (k, val) in extra {
            labels.insert(k.clone(), val.clone());
        }
    }
    // Last, so they win even over labels validated before reserved names were refused.
    labels.insert("alertname".into(), "SagaStepMissing".into());
    labels.insert("rule".into(), s("rule").into());
    labels.insert("step".into(), s("step").into());
    labels.insert("severity".into(), s("severity").into());
    labels
}

/// The Alertmanager labels of an outbox alert body.
pub fn alertmanager_labels(body: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    let v = crate::event::parse_json(body).ok()?;
    Some(labels_of(v.get("data")?))
}

/// Builds an Alertmanager v2 alert from an outbox alert body. `kind` is `alert` (firing:
/// ends after four resend intervals unless re-sent) or `resolve` (ends now).
pub fn alertmanager_alert(body: &str, kind: &str, resend: Duration) -> Option<serde_json::Value> {
    let v = crate::event::parse_json(body).ok()?;
    let d = v.get("data")?;
    let s = |k: &str| d.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
    let labels = labels_of(d);
    let mut ann = serde_json::Map::new();
    ann.insert("summary".into(), s("summary").into());
    ann.insert("key".into(), s("key").into());
    ann.insert("deadline".into(), s("deadline").into());
    if let Some(desc) = d.get("description").and_then(|x| x.as_str()) {
        ann.insert("description".into(), desc.into());
    }
    let now = crate::daemon::core::wall_nanos();
    // A resolve starts when its alert fired (`alert_at`), so that an Alertmanager which
    // lost the alert meanwhile still shows when the step went missing.
    let starts = match d.get("alert_at") {
        Some(t) if kind == "resolve" => Some(t),
        _ => v.get("timestamp"),
    };
    Some(am_alert(labels, ann, starts, kind, resend, now))
}

/// The alert at wall time `now`. `startsAt` is the body's timestamp (event time), but
/// never after `endsAt`: Alertmanager rejects such an alert (400), which would hold it
/// back for as long as event time runs ahead of wall time.
fn am_alert(
    labels: serde_json::Map<String, serde_json::Value>,
    annotations: serde_json::Map<String, serde_json::Value>,
    timestamp: Option<&serde_json::Value>,
    kind: &str,
    resend: Duration,
    now: crate::time::Instant,
) -> serde_json::Value {
    let ends = if kind == "resolve" {
        now
    } else {
        now.saturating_add(
            i64::try_from(resend.as_nanos())
                .unwrap_or(i64::MAX)
                .saturating_mul(4),
        )
    };
    let starts = timestamp
        .and_then(|t| t.as_str())
        .and_then(crate::time::parse_rfc3339)
        .map_or(now, |t| t.min(now));
    serde_json::json!({
        "labels": labels,
        "annotations": annotations,
        "startsAt": crate::time::format_rfc3339(starts),
        "endsAt": crate::time::format_rfc3339(ends),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    /// Event time ahead of wall time (a producer's clock): still `startsAt` ≤ `endsAt`,
    /// firing or resolved; otherwise the event time.
    #[test]
    fn alertmanager_alerts_never_start_after_they_end() {
        let now = crate::time::parse_rfc3339("2026-01-01T12:00:00Z").unwrap();
        let resend = Duration::from_secs(60);
        for (ts, want) in [
            ("2026-01-01T12:05:00Z", "2026-01-01T12:00:00Z"),
            ("2026-01-01T11:00:00Z", "2026-01-01T11:00:00Z"),
        ] {
            for kind in ["alert", "resolve"] {
                let a = am_alert(
                    Default::default(),
                    Default::default(),
                    Some(&ts.into()),
                    kind,
                    resend,
                    now,
                );
                let at = |k: &str| crate::time::parse_rfc3339(a[k].as_str().unwrap()).unwrap();
                assert!(at("startsAt") <= at("endsAt"), "{kind} {a}");
                assert_eq!(at("startsAt"), crate::time::parse_rfc3339(want).unwrap());
            }
        }
    }

    /// A resolve starts when its alert fired, not when it was resolved.
    #[test]
    fn a_resolve_starts_when_its_alert_fired() {
        let body = r#"{"timestamp":"2026-01-01T11:30:00Z","data":{"rule":"r","step":"s",
            "alert_at":"2026-01-01T11:00:00Z"}}"#;
        let resend = Duration::from_secs(60);
        let starts = |kind| alertmanager_alert(body, kind, resend).unwrap()["startsAt"].clone();
        assert_eq!(starts("resolve"), "2026-01-01T11:00:00Z");
        assert_eq!(starts("alert"), "2026-01-01T11:30:00Z");
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_784_000_000);
        assert_eq!(retry_after(" 120 ", now), Some(Duration::from_secs(120)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(retry_after(&later, now), Some(Duration::from_secs(30)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(retry_after("86400", now), Some(MAX_RETRY_AFTER));
        // Past what a u64 holds: "go away" still, not ignored.
        assert_eq!(
            retry_after("99999999999999999999999", now),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(retry_after("soon", now), None);
    }
}
