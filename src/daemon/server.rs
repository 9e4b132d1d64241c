//! The HTTP listener (hyper): `/metrics`, `/healthz`, `/readyz`, `POST /v1/events` (the
//! http source) and `POST /-/reload`. Mutating endpoints need the bearer token when one
//! is configured.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::value::RawValue;
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot};

use crate::config::{ClockMode, Config, Secret, SourceKind};
use crate::daemon::core::{LineAt, Msg};
use crate::daemon::metrics::Metrics;
use crate::event::{DecodeError, Decoder};

/// Why a reload did not take.
#[derive(Clone, Debug)]
pub enum ReloadError {
    /// The rules are invalid: the previous ones keep running (422).
    Rejected(String),
    /// Valid rules the state failed to take: the daemon stops (503).
    StateFailed(String),
}

impl std::fmt::Display for ReloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReloadError::Rejected(e) => f.write_str(e),
            ReloadError::StateFailed(e) => {
                write!(
                    f,
                    "the state failed during the reload; the daemon stops: {e}"
                )
            }
        }
    }
}

/// What the handlers share.
pub struct Shared {
    pub cfg: Arc<Config>,
    /// The Kafka link, when there are kafka sources.
    pub kafka: Option<Arc<crate::daemon::kafka::Health>>,
    pub metrics: Arc<Metrics>,
    pub core: SyncSender<Msg>,
    pub ready: AtomicBool,
    /// Set when the core thread has stopped (fatal error or shutdown).
    pub core_down: AtomicBool,
    /// Set when a stop begins: events not handed to the core yet are refused.
    pub stopping: AtomicBool,
    /// Signalled by `POST /-/reload`.
    pub reload: Arc<Notify>,
    /// Requests waiting for the outcome of the next reload; `None` once shutting down.
    #[allow(clippy::type_complexity)]
    pub reload_result: tokio::sync::Mutex<Option<Vec<oneshot::Sender<Result<(), ReloadError>>>>>,
    pub readers: Arc<Readers>,
    /// Bytes of `POST /v1/events` bodies held at once, from before they are read until
    /// the core has applied their events: see [`ingest_budget`].
    pub ingest: Arc<tokio::sync::Semaphore>,
    /// `POST /v1/events` requests whose events are with the core, waiting for their
    /// commit: a stop answers them, however long the core takes (within reason).
    pub committing: Committing,
}

/// A count of requests waiting for their commit, and a wake-up when it falls.
#[derive(Default)]
pub struct Committing {
    n: std::sync::atomic::AtomicUsize,
    fell: Notify,
}

/// One request counted in [`Committing`] while it lives.
struct Awaiting<'a>(&'a Committing);

impl<'a> Awaiting<'a> {
    fn new(c: &'a Committing) -> Self {
        c.n.fetch_add(1, Ordering::SeqCst);
        Awaiting(c)
    }
}

impl Drop for Awaiting<'_> {
    fn drop(&mut self) {
        self.0.n.fetch_sub(1, Ordering::SeqCst);
        self.0.fell.notify_waiters();
    }
}

/// How long a stop waits, beyond the 5 s for open requests, for the commits of events
/// the core has taken: a large body applied by a busy core is answered, not cut off
/// after it was committed (its sender would send it again).
const COMMIT_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

/// The ingest budget, in body bytes: two bodies of `max_body`. A body holds its share
/// (its `Content-Length`, or `max_body` when sent chunked) from before it is read until
/// the core has applied it, so small requests pass while a large one is read, and at
/// most about two full-size bodies, with their lines, are in memory (one takes a few
/// times its size: about 130 MiB for two of 12 MiB, measured).
pub fn ingest_budget(cfg: &Config) -> usize {
    let max_body = cfg
        .sources
        .iter()
        .find_map(|s| match s.kind {
            SourceKind::Http { max_body } => Some(max_body),
            _ => None,
        })
        .unwrap_or(0);
    max_body
        .saturating_mul(2)
        .min(tokio::sync::Semaphore::MAX_PERMITS)
        .min(u32::MAX as usize)
}

/// How long a request waits for its share of the ingest budget before a 503.
const INGEST_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Queries of the read API (timeline, listings, rules) running at once; more wait.
const READERS: usize = 4;
/// A read API query still running after this is interrupted (503): a reader holds a
/// snapshot of the state file, which keeps the WAL from starting over while it runs.
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The read API's connections: at most `READERS` queries at once, each connection kept
/// for the next. Unbounded, every request opened a connection of its own (with its page
/// cache) on a thread of its own: 200 concurrent listings took 3 GB. A query holds its
/// permit on the blocking thread that runs it, so a client that goes away mid-request
/// frees its slot only when the query ends.
pub struct Readers {
    permits: Arc<tokio::sync::Semaphore>,
    idle: std::sync::Mutex<Vec<rusqlite::Connection>>,
}

impl Default for Readers {
    fn default() -> Readers {
        Readers {
            permits: Arc::new(tokio::sync::Semaphore::new(READERS)),
            idle: std::sync::Mutex::new(Vec::new()),
        }
    }
}

type Resp = Response<Full<Bytes>>;

/// The web page at `/ui`: one self-contained file, embedded in the binary.
const UI: &str = include_str!("ui/index.html");

fn text(status: StatusCode, body: impl Into<String>) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        "text/plain; charset=utf-8".parse().expect("header"),
    );
    r
}

/// `/metrics` in Prometheus' text format.
fn metrics_page(m: &Metrics) -> Resp {
    let mut r = text(StatusCode::OK, m.render());
    r.headers_mut().insert(
        "content-type",
        "text/plain; version=0.0.4; charset=utf-8"
            .parse()
            .expect("header"),
    );
    r
}

fn json(status: StatusCode, v: serde_json::Value) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", "application/json".parse().expect("header"));
    r
}

/// Constant-time comparison of the presented token.
fn authorized(token: &Option<Secret>, req: &Request<Incoming>) -> bool {
    let Some(want) = token else { return true };
    let Some(got) = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            // The scheme is case-insensitive (RFC 9110, section 11.1).
            let (scheme, token) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim_start())
        })
    else {
        return false;
    };
    // Compared as SHA-256 digests, so that the time taken tells neither where the first
    // difference is nor whether the lengths match.
    use sha2::{Digest, Sha256};
    let (a, b) = (Sha256::digest(got.as_bytes()), Sha256::digest(&want.0));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

fn unauthorized() -> Resp {
    let mut r = json(
        StatusCode::UNAUTHORIZED,
        serde_json::json!({"error": "missing or wrong bearer token"}),
    );
    r.headers_mut()
        .insert("www-authenticate", "Bearer".parse().expect("header"));
    r
}

/// Binds the listener (so a taken port is a startup error, not a later surprise).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("listen {addr}: {e}"))
}

/// Connection settings of both servers: a client has `HEADER_TIMEOUT` to send a request's
/// headers, the first or the next on a kept-alive connection.
fn http1_builder() -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    b
}

/// A connection's stream, its writes under `WRITE_TIMEOUT`.
fn io(stream: tokio::net::TcpStream) -> TokioIo<WriteDeadline<tokio::net::TcpStream>> {
    TokioIo::new(WriteDeadline::new(stream, WRITE_TIMEOUT))
}

/// Answers on the listener while the daemon starts (the Kafka topic check can wait for
/// brokers up to `kafka.connect_timeout`): `/healthz` 200 (alive), `/metrics` (with
/// `sagawatch_ready` 0, so a scrape does not fail and mark the daemon down), everything
/// else 503, one request per connection. Returns the listener once `stop` fires, for the
/// real server. Without it, probes met a refused connection, and a liveness probe could
/// restart a daemon that was only waiting for its brokers.
pub async fn serve_starting(
    listener: TcpListener,
    mut stop: oneshot::Receiver<()>,
    metrics: Arc<Metrics>,
    allowed_hosts: Arc<[String]>,
) -> TcpListener {
    // Bounded as the running server's are: this phase may last minutes.
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => {
                // Those open answer on their own; the running server takes new ones.
                conns.detach_all();
                return listener;
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            acc = listener.accept(), if conns.len() < MAX_CONNECTIONS => {
                let Ok((stream, _)) = acc else {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                };
                let metrics = Arc::clone(&metrics);
                let allowed = Arc::clone(&allowed_hosts);
                let local = stream.local_addr().ok();
                conns.spawn(async move {
                    let svc = service_fn(|req: Request<Incoming>| {
                        let metrics = Arc::clone(&metrics);
                        let refused = local.and_then(|l| cross_site(l, &allowed, &req));
                        let read = matches!(*req.method(), Method::GET | Method::HEAD);
                        async move {
                            let resp = match req.uri().path() {
                                // As the running server would answer.
                                _ if refused.is_some() => json(
                                    StatusCode::FORBIDDEN,
                                    serde_json::json!({ "error": refused }),
                                ),
                                "/healthz" | "/metrics" if !read => {
                                    let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
                                    r.headers_mut().insert(
                                        "allow",
                                        hyper::header::HeaderValue::from_static("GET, HEAD"),
                                    );
                                    r
                                }
                                "/healthz" => text(StatusCode::OK, "starting\n"),
                                "/metrics" => {
                                    metrics.ready.set(0);
                                    metrics_page(&metrics)
                                }
                                _ => text(
                                    StatusCode::SERVICE_UNAVAILABLE,
                                    "not ready: starting (checking the kafka topics)\n",
                                ),
                            };
                            // A body sent (an event POST, say) is read first, as the
                            // running server does: or the client finds the connection
                            // reset instead of the answer.
                            Ok::<_, Infallible>(refuse(req, resp).await)
                        }
                    });
                    let _ = http1_builder()
                        .keep_alive(false)
                        .serve_connection(io(stream), svc)
                        .await;
                });
            }
        }
    }
}

/// Serves until `stop` is notified; then stops accepting, closes idle keep-alive
/// connections and lets open requests finish (for at most 5 s; those waiting for the
/// commit of their events, for as long as that takes, up to a minute more).
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: Arc<Notify>) {
    let mut conns = tokio::task::JoinSet::new();
    let (closing_tx, closing) = tokio::sync::watch::channel(false);
    loop {
        tokio::select! {
            _ = stop.notified() => break,
            // Reap finished connections, or the set grows with every one ever accepted.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            // At the connection bound, new clients wait in the kernel's backlog.
            acc = listener.accept(), if conns.len() < MAX_CONNECTIONS => {
                let (stream, _) = match acc {
                    Ok(s) => s,
                    Err(e) => {
                        // Out of file descriptors, say: retrying at once would spin and
                        // flood the log.
                        tracing::warn!(error = %e, "accept failed; retrying in 100 ms");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let shared = Arc::clone(&shared);
                let mut closing = closing.clone();
                let local = stream.local_addr().unwrap_or(shared.cfg.listen);
                conns.spawn(async move {
                    let svc = service_fn(move |req| {
                        let shared = Arc::clone(&shared);
                        async move { Ok::<_, Infallible>(route(shared, local, req).await) }
                    });
                    let conn = http1_builder().serve_connection(io(stream), svc);
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        _ = closing.changed() => {
                            // Finish the request in progress, if any; read no more.
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.await;
                        }
                    }
                });
            }
        }
    }
    drop(listener);
    let _ = closing_tx.send(true);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    // Requests whose events the core has taken are answered once committed; the others
    // still open (a slow upload, a large response) are cut.
    let waiting = &shared.committing;
    let _ = tokio::time::timeout(COMMIT_GRACE, async {
        loop {
            let fell = waiting.fell.notified();
            if waiting.n.load(Ordering::SeqCst) == 0 {
                break;
            }
            fell.await;
        }
    })
    .await;
    // Time to write those answers.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
}

/// Connections served at once.
const MAX_CONNECTIONS: usize = 1024;
/// How long a client may take to send a request's body.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// How long a client may take to send a request's headers.
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// How long a response may wait for a client that reads nothing.
const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// A stream whose writes fail (`TimedOut`) after making no progress for a while, so a
/// client that requests a large response and never reads it does not hold its connection
/// (one of a bounded number) for good. hyper has read timeouts only.
struct WriteDeadline<S> {
    inner: S,
    limit: std::time::Duration,
    /// Armed while a write is blocked.
    sleep: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteDeadline<S> {
    fn new(inner: S, limit: std::time::Duration) -> WriteDeadline<S> {
        WriteDeadline {
            inner,
            limit,
            sleep: None,
        }
    }

    /// After a write returned `Pending`: `Ready(error)` once it has been blocked too long.
    fn blocked(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Error> {
        let limit = self.limit;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match sleep.as_mut().poll(cx) {
            std::task::Poll::Ready(()) => std::task::Poll::Ready(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "client read nothing of the response",
            )),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteDeadline<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

/// Runs a write-side poll under the deadline: progress disarms it, `Pending` arms it.
macro_rules! under_deadline {
    ($self:ident, $cx:ident, $poll:expr) => {{
        use std::task::Poll;
        match $poll {
            Poll::Pending => match $self.blocked($cx) {
                Poll::Ready(e) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            },
            done => {
                $self.sleep = None;
                done
            }
        }
    }};
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        under_deadline!(
            self,
            cx,
            std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
        )
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        under_deadline!(
            self,
            cx,
            std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
        )
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        under_deadline!(self, cx, std::pin::Pin::new(&mut self.inner).poll_flush(cx))
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        under_deadline!(
            self,
            cx,
            std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
        )
    }
}

/// The methods a known path answers (for 405's `Allow`); `None`: no such path.
fn allowed(path: &str) -> Option<&'static str> {
    match path {
        "/metrics" | "/healthz" | "/readyz" | "/ui" | "/ui/" | "/v1/rules" | "/v1/instances" => {
            Some("GET, HEAD")
        }
        p if p.starts_with("/v1/instances/") => Some("GET, HEAD"),
        "/v1/events" | "/-/reload" => Some("POST"),
        _ => None,
    }
}

/// Requests that only a web page in a browser makes: a POST from another origin (cross-site
/// request forgery: a page anywhere could post events or reload rules), and, over a
/// loopback connection, a request under a DNS name (DNS rebinding: a page whose name came
/// to resolve to 127.0.0.1 could read the timeline). Other clients send no `Origin`, and
/// reach loopback by its address, `localhost` or a name in `allowed_hosts` (a reverse
/// proxy that passes the client's `Host` on). `local` is the address the connection
/// came in on: a wildcard listener takes loopback connections too.
fn cross_site(
    local: SocketAddr,
    allowed: &[String],
    req: &Request<Incoming>,
) -> Option<&'static str> {
    let host = req
        .headers()
        .get(hyper::header::HOST)
        .map(|h| h.to_str().unwrap_or(""));
    if !matches!(*req.method(), Method::GET | Method::HEAD)
        && let Some(origin) = req.headers().get(hyper::header::ORIGIN)
    {
        let same = origin
            .to_str()
            .ok()
            .and_then(|o| {
                o.strip_prefix("http://")
                    .or_else(|| o.strip_prefix("https://"))
            })
            .zip(host)
            .is_some_and(|(o, h)| o.eq_ignore_ascii_case(h));
        if !same {
            return Some("cross-origin request refused");
        }
    }
    let loopback = match local.ip() {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(v6.is_loopback(), |v4| v4.is_loopback()),
        ip => ip.is_loopback(),
    };
    if loopback
        && let Some(h) = host
        && !allowed.iter().any(|a| a == "*")
    {
        let name = match h.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => h.rsplit_once(':').map_or(h, |(n, _)| n),
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if !(name.parse::<std::net::IpAddr>().is_ok()
            || name == "localhost"
            || name.ends_with(".localhost")
            || allowed.contains(&name))
        {
            return Some(
                "over loopback, only requests to an IP address, localhost or a name in `allowed_hosts` are answered (Host header)",
            );
        }
    }
    None
}

/// Why the daemon is not ready to consume (the body of a 503 from `/readyz`), if it is not.
fn not_ready(shared: &Shared) -> Option<String> {
    if let Some(p) = shared.kafka.as_ref().and_then(|k| k.problem()) {
        Some(format!("not ready: {p}\n"))
    } else if shared.ready.load(Ordering::Relaxed) && !shared.core_down.load(Ordering::Relaxed) {
        None
    } else {
        Some("not ready\n".into())
    }
}

async fn route(shared: Arc<Shared>, local: SocketAddr, req: Request<Incoming>) -> Resp {
    if let Some(why) = cross_site(local, &shared.cfg.allowed_hosts, &req) {
        return json(StatusCode::FORBIDDEN, serde_json::json!({ "error": why }));
    }
    let path = req.uri().path().to_string();
    // HEAD is answered as GET; hyper leaves the body out.
    let method = match req.method() {
        &Method::HEAD => Method::GET,
        m => m.clone(),
    };
    match (&method, path.as_str()) {
        (&Method::GET, "/metrics") => {
            // `sagawatch_ready` says what /readyz would.
            shared
                .metrics
                .ready
                .set(i64::from(not_ready(&shared).is_none()));
            metrics_page(&shared.metrics)
        }
        (&Method::GET, "/healthz") => {
            // Liveness: a Kafka outage is reported, but a restart would not help.
            let kafka = shared.kafka.as_ref().and_then(|k| k.problem());
            if shared.core_down.load(Ordering::Relaxed) {
                text(StatusCode::SERVICE_UNAVAILABLE, "core stopped\n")
            } else if let Some(p) = kafka {
                text(StatusCode::OK, format!("degraded: {p}\n"))
            } else {
                text(StatusCode::OK, "ok\n")
            }
        }
        (&Method::GET, "/readyz") => match not_ready(&shared) {
            None => text(StatusCode::OK, "ready\n"),
            Some(why) => text(StatusCode::SERVICE_UNAVAILABLE, why),
        },
        (&Method::POST, "/v1/events") => events(shared, req).await,
        (&Method::GET, p) if p.starts_with("/v1/instances/") => {
            let q = req.uri().query().unwrap_or("").to_string();
            instance(shared, p, &q).await
        }
        (&Method::GET, "/ui" | "/ui/") => {
            let mut r = Response::new(Full::new(Bytes::from_static(UI.as_bytes())));
            r.headers_mut().insert(
                "content-type",
                "text/html; charset=utf-8".parse().expect("header"),
            );
            r.headers_mut().insert(
                "content-security-policy",
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'"
                    .parse()
                    .expect("header"),
            );
            r
        }
        (&Method::GET, "/v1/rules") => {
            match from_state(
                &shared,
                StatusCode::INTERNAL_SERVER_ERROR,
                crate::store::rule_summary,
            )
            .await
            {
                Ok(v) => json(StatusCode::OK, v),
                Err(r) => r,
            }
        }
        (&Method::GET, "/v1/instances") => {
            let q = req.uri().query().unwrap_or("").to_string();
            list(shared, &q).await
        }
        (&Method::POST, "/-/reload") => {
            if !authorized(&shared.cfg.token, &req) {
                return unauthorized();
            }
            let (tx, rx) = oneshot::channel();
            match shared.reload_result.lock().await.as_mut() {
                Some(waiting) => waiting.push(tx),
                None => {
                    return json(
                        StatusCode::SERVICE_UNAVAILABLE,
                        serde_json::json!({"error": "shutting down"}),
                    );
                }
            }
            shared.reload.notify_one();
            match rx.await {
                Ok(Ok(())) => json(StatusCode::OK, serde_json::json!({"status": "reloaded"})),
                Ok(Err(e)) => {
                    let status = match e {
                        ReloadError::Rejected(_) => StatusCode::UNPROCESSABLE_ENTITY,
                        ReloadError::StateFailed(_) => StatusCode::SERVICE_UNAVAILABLE,
                    };
                    json(status, serde_json::json!({"error": e.to_string()}))
                }
                Err(_) => json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    serde_json::json!({"error": "shutting down"}),
                ),
            }
        }
        (_, p) => match allowed(p) {
            Some(allow) => {
                let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
                r.headers_mut()
                    .insert("allow", hyper::header::HeaderValue::from_static(allow));
                r
            }
            None => text(StatusCode::NOT_FOUND, "not found\n"),
        },
    }
}

/// Runs a state-file read on the blocking pool; its JSON, or the error as a response with
/// `err_status`.
async fn from_state<F>(
    shared: &Shared,
    err_status: StatusCode,
    f: F,
) -> Result<serde_json::Value, Resp>
where
    F: FnOnce(&rusqlite::Connection) -> anyhow::Result<serde_json::Value> + Send + 'static,
{
    let Ok(permit) = Arc::clone(&shared.readers.permits).acquire_owned().await else {
        return Err(text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"));
    };
    let readers = Arc::clone(&shared.readers);
    let state = shared.cfg.state.clone();
    let task = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let idle = readers.idle.lock().ok().and_then(|mut v| v.pop());
        let conn = match idle {
            Some(c) => c,
            None => match crate::store::open_existing(&state) {
                Ok(c) => c,
                Err(e) => return (Err(e), false),
            },
        };
        // SQLite asks every 10k steps whether to go on: past the deadline it stops the
        // query (an interrupt from outside is lost between two statements).
        let deadline = std::time::Instant::now() + READ_TIMEOUT;
        let _ = conn.progress_handler(10_000, Some(move || std::time::Instant::now() > deadline));
        let r = f(&conn);
        let _ = conn.progress_handler(0, None::<fn() -> bool>);
        // Stopped by the handler: SQLite says "interrupted" (any other error is itself).
        let timed_out = r.as_ref().is_err_and(|e| {
            e.chain().any(|c| {
                matches!(
                    c.downcast_ref::<rusqlite::Error>(),
                    Some(rusqlite::Error::SqliteFailure(f, _))
                        if f.code == rusqlite::ErrorCode::OperationInterrupted
                )
            })
        });
        if let Ok(mut idle) = readers.idle.lock() {
            idle.push(conn);
        }
        (r, timed_out)
    });
    match task.await {
        Ok((Ok(v), _)) => Ok(v),
        Ok((Err(_), true)) => Err(json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"error": format!(
                "the query took longer than {}s; ask for a smaller page",
                READ_TIMEOUT.as_secs()
            )}),
        )),
        Ok((Err(e), false)) => Err(json(
            err_status,
            serde_json::json!({"error": format!("{e:#}")}),
        )),
        Err(e) => Err(json(
            StatusCode::INTERNAL_SERVER_ERROR,
            serde_json::json!({"error": e.to_string()}),
        )),
    }
}

/// Decodes %XX escapes in a path segment.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `GET /v1/instances?status=open|missing|late&rule=&older_than=&limit=&cursor=`: a page
/// of instances from the state file's status indexes.
async fn list(shared: Arc<Shared>, query: &str) -> Resp {
    let mut status = crate::store::ListStatus::Open;
    let (mut rule, mut older, mut limit, mut cursor) = (None, None, 100usize, None);
    let bad = |m: String| json(StatusCode::BAD_REQUEST, serde_json::json!({ "error": m }));
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let Some(v) = percent_decode(&v.replace('+', " ")) else {
            return bad(format!("{k}: bad URL encoding"));
        };
        match k {
            "status" => match crate::store::ListStatus::parse(&v) {
                Some(s) => status = s,
                None => return bad(format!("status {v:?}: use open, missing or late")),
            },
            // An empty one (the last counts) is no filter.
            "rule" => rule = (!v.is_empty()).then_some(v),
            "older_than" => match crate::time::Duration::parse_span(&v) {
                Ok(d) => older = Some(d),
                Err(e) => return bad(format!("older_than: {e}")),
            },
            "limit" => match v.parse::<usize>() {
                Ok(n) if (1..=1000).contains(&n) => limit = n,
                _ => return bad(format!("limit {v:?}: use 1 to 1000")),
            },
            "cursor" => cursor = Some(v),
            other => return bad(format!("unknown parameter {other:?}")),
        }
    }
    // The cursor is the caller's; what fails past this point is the server's.
    if let Some(c) = &cursor
        && let Err(e) = crate::store::parse_cursor(c, status)
    {
        return bad(format!("{e:#}"));
    }
    let r = from_state(&shared, StatusCode::INTERNAL_SERVER_ERROR, move |conn| {
        crate::store::list_instances(
            conn,
            status,
            rule.as_deref(),
            older,
            limit,
            cursor.as_deref(),
        )
    })
    .await;
    match r {
        Ok(v) => json(StatusCode::OK, v),
        Err(r) => r,
    }
}

/// `GET /v1/instances/{rule}/{key}`: the instance's timeline from the state file.
/// `/v1/instances/{rule}/{key}`, or `/v1/instances/{rule}?key=KEY`: browsers collapse a
/// key `.` or `..` out of a path, even URL-encoded, but leave a query alone.
async fn instance(shared: Arc<Shared>, path: &str, query: &str) -> Resp {
    let rest = &path["/v1/instances/".len()..];
    let in_query = || {
        // The last one counts, as in the listing.
        let v = query.rsplit('&').find_map(|p| p.strip_prefix("key="))?;
        Some((percent_decode(rest)?, percent_decode(&v.replace('+', " "))?))
    };
    let Some((rule, key)) = match rest.split_once('/') {
        Some((r, k)) => percent_decode(r).zip(percent_decode(k)),
        None => in_query(),
    }
    .filter(|(r, k)| !r.is_empty() && !k.is_empty()) else {
        return json(
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": "use /v1/instances/{rule}/{key} (key URL-encoded) or /v1/instances/{rule}?key={key}"}),
        );
    };
    let r = from_state(&shared, StatusCode::INTERNAL_SERVER_ERROR, move |conn| {
        Ok(crate::store::timeline(conn, &rule, &key)?.unwrap_or(serde_json::Value::Null))
    })
    .await;
    match r {
        Ok(serde_json::Value::Null) => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "no such instance (never opened, or forgotten after dedup and late windows)"}),
        ),
        Ok(v) => json(StatusCode::OK, v),
        Err(r) => r,
    }
}

/// A request body split into events.
#[derive(Debug, PartialEq, Eq)]
pub struct Body {
    pub lines: Vec<String>,
    /// Where each event was, 1-based: its line (NDJSON, one object) or its element (array).
    pub at: Vec<usize>,
    pub array: bool,
}

impl Body {
    /// How an error names the `i`th event (0-based): "line 3", "element 2".
    pub fn locate(&self, i: usize) -> (usize, String) {
        let n = self.at.get(i).copied().unwrap_or(i + 1);
        let unit = if self.array { "element" } else { "line" };
        (n, format!("{unit} {n}"))
    }
}

/// Why a request body was refused.
#[derive(Debug)]
pub struct BodyError {
    /// 1-based: the line, or the array element.
    pub line: usize,
    /// "line 3", "element 2".
    pub at: String,
    pub message: String,
    /// For `sagawatch_events_rejected_total`.
    pub reason: &'static str,
}

fn body_error(line: usize, message: impl Into<String>, reason: &'static str) -> BodyError {
    BodyError {
        line,
        at: format!("line {line}"),
        message: message.into(),
        reason,
    }
}

/// Whether line `n` (1-based) of `text` is a JSON object by itself.
fn is_object_line(text: &str, n: usize) -> bool {
    text.lines().nth(n.saturating_sub(1)).is_some_and(|l| {
        serde_json::from_str::<&RawValue>(l.trim_ascii()).is_ok_and(|v| v.get().starts_with('{'))
    })
}

/// The elements of a JSON array body, checked one by one as they are parsed: the first
/// bad one is named, whether what is wrong is its time or its syntax (or the syntax of
/// anything after it).
fn split_array(
    text: &str,
    check: &impl Fn(&str) -> Result<(), DecodeError>,
) -> Result<Body, BodyError> {
    split_array_to(text, check).map_err(|(e, _)| e)
}

/// As [`split_array`]; an error also tells whether the text ended inside the array (its
/// element, in `at`, cut short).
fn split_array_to(
    text: &str,
    check: &impl Fn(&str) -> Result<(), DecodeError>,
) -> Result<Body, (BodyError, bool)> {
    use serde::de::{Deserializer as _, Error as _};
    struct Elements<'c, F> {
        check: &'c F,
        /// The element being parsed (1-based), and what was wrong with one parsed.
        at: &'c std::cell::Cell<usize>,
        bad: &'c std::cell::RefCell<Option<BodyError>>,
    }
    impl<'de, F: Fn(&str) -> Result<(), DecodeError>> serde::de::Visitor<'de> for Elements<'_, F> {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON array")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Vec<String>, A::Error> {
            let mut lines = Vec::new();
            loop {
                let i = lines.len() + 1;
                self.at.set(i);
                let Some(e) = seq.next_element::<&'de RawValue>()? else {
                    self.at.set(0);
                    return Ok(lines);
                };
                let at = format!("element {i}");
                let refused = if !e.get().starts_with('{') {
                    Some(BodyError {
                        line: i,
                        at,
                        message: "not a JSON object".into(),
                        reason: "not_object",
                    })
                } else {
                    let line = one_line(e.get());
                    match (self.check)(&line) {
                        Ok(()) => {
                            lines.push(line);
                            None
                        }
                        Err(e) => Some(BodyError {
                            line: i,
                            at,
                            message: e.to_string(),
                            reason: e.reason(),
                        }),
                    }
                };
                if let Some(r) = refused {
                    *self.bad.borrow_mut() = Some(r);
                    return Err(A::Error::custom("refused"));
                }
            }
        }
    }
    let at = std::cell::Cell::new(0);
    let bad = std::cell::RefCell::new(None);
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed = de
        .deserialize_seq(Elements {
            check,
            at: &at,
            bad: &bad,
        })
        .and_then(|lines| de.end().map(|()| lines));
    match parsed {
        Ok(lines) => Ok(Body {
            at: (1..=lines.len()).collect(),
            lines,
            array: true,
        }),
        Err(e) => {
            let cut = bad.borrow().is_none() && at.get() > 0 && e.is_eof();
            let error = bad.into_inner().unwrap_or_else(|| match at.get() {
                // After the array (or before it).
                0 => body_error(e.line(), format!("invalid JSON array: {e}"), "invalid_json"),
                // Within it: the element being parsed.
                i => BodyError {
                    line: i,
                    at: format!("element {i}"),
                    message: format!("invalid JSON array: {e}"),
                    reason: "invalid_json",
                },
            });
            Err((error, cut))
        }
    }
}

/// Splits a request body into event lines: one JSON object, a JSON array of objects, or
/// NDJSON, each of which `check` must accept (the event time). Returns them, or where the
/// first bad one is and why.
pub fn split_body(
    body: &[u8],
    check: impl Fn(&str) -> Result<(), DecodeError>,
) -> Result<Body, BodyError> {
    let refused = |line: usize, at: String, e: DecodeError| BodyError {
        line,
        at,
        message: e.to_string(),
        reason: e.reason(),
    };
    let text = std::str::from_utf8(body).map_err(|e| {
        let valid = &body[..e.valid_up_to()];
        // In an array: the element it is in (unless one before it is bad already).
        if let Ok(prefix) = std::str::from_utf8(valid)
            && prefix
                .strip_prefix('\u{feff}')
                .unwrap_or(prefix)
                .trim_ascii_start()
                .starts_with('[')
        {
            let prefix = prefix.strip_prefix('\u{feff}').unwrap_or(prefix);
            // Cut between elements (the bad byte after a complete one): no element to
            // name, but the line.
            let between =
                serde_json::from_str::<serde::de::IgnoredAny>(&format!("{prefix}]")).is_ok();
            match split_array_to(prefix, &check) {
                Err((_, true)) if between => {}
                Err((mut bad, true)) => {
                    bad.message = "not UTF-8".into();
                    return bad;
                }
                Err((bad, false)) => return bad,
                Ok(_) => {}
            }
        }
        let line = 1 + valid.iter().filter(|&&b| b == b'\n').count();
        body_error(line, format!("not UTF-8: {e}"), "invalid_json")
    })?;
    // A byte order mark before the body is not part of it (as at the start of a file).
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let trimmed = text.trim_ascii_start();
    if trimmed.is_empty() {
        return Err(body_error(1, "empty body", "invalid_json"));
    }
    if trimmed.starts_with('[') {
        return split_array(text, &check);
    }
    // One object, possibly spanning lines.
    let whole = serde_json::from_str::<&RawValue>(text);
    if let Ok(raw) = whole
        && raw.get().starts_with('{')
    {
        let first = 1 + text.len() - trimmed.len();
        let line = 1 + text[..first - 1].matches('\n').count();
        let event = one_line(raw.get());
        check(&event).map_err(|e| refused(line, format!("line {line}"), e))?;
        return Ok(Body {
            lines: vec![event],
            at: vec![line],
            array: false,
        });
    }
    let (mut lines, mut at) = (Vec::new(), Vec::new());
    for (i, line) in text.lines().enumerate() {
        let l = line.trim_ascii();
        if l.is_empty() {
            continue;
        }
        match serde_json::from_str::<&RawValue>(l) {
            Ok(v) if v.get().starts_with('{') => {
                check(l).map_err(|e| refused(i + 1, format!("line {}", i + 1), e))?;
                lines.push(l.to_string());
                at.push(i + 1);
            }
            Ok(_) => return Err(body_error(i + 1, "not a JSON object", "not_object")),
            Err(e) => {
                // The first line opens an object it does not close: a pretty-printed
                // object, whose own error (and line) is the one to name.
                // Unless the line that error names (or the last before it that is not
                // blank: an error at the end of the body names the line after its last
                // newline) is an object of its own: then this is NDJSON whose first
                // line is cut short.
                let named_object = |w: &serde_json::Error| {
                    let last = text
                        .lines()
                        .take(w.line())
                        .enumerate()
                        .filter(|(_, l)| !l.trim_ascii().is_empty())
                        .last()
                        .map_or(w.line(), |(n, _)| n + 1);
                    is_object_line(text, last)
                };
                let (line, e) = match whole {
                    Err(w) if lines.is_empty() && e.is_eof() && !named_object(&w) => (w.line(), w),
                    _ => (i + 1, e),
                };
                return Err(body_error(
                    line,
                    format!(
                        "invalid JSON: {} at column {}",
                        crate::event::json_message(&e),
                        e.column()
                    ),
                    "invalid_json",
                ));
            }
        }
    }
    if lines.is_empty() {
        return Err(body_error(1, "no events in the body", "invalid_json"));
    }
    Ok(Body {
        lines,
        at,
        array: false,
    })
}

/// A JSON value's text on one line, as received otherwise. A raw line break in JSON text
/// can only be whitespace between tokens (inside a string it must be escaped), so it
/// becomes a space. Checked as raw text, a body is never built into a tree: an event
/// holding an array of a million numbers cost 30 times its size as a tree.
fn one_line(json: &str) -> String {
    json.replace(['\n', '\r'], " ")
}

/// What of a refused request's body is read and dropped, at most, before the answer: a
/// socket closed with unread data is reset, and the reset can destroy the answer before
/// the client reads it (a client that sends its whole body first would see "connection
/// reset" instead of the 413, 401 or 503 with `Retry-After`).
const DRAIN_BYTES: usize = 64 << 20;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(10);

/// Answers `resp` to a request whose body is not wanted, after reading what is left of the
/// body (bounded); the connection is closed if it could not all be read. A client that
/// waits for `100 Continue` has sent nothing yet, and is not asked to.
async fn refuse(req: Request<Incoming>, resp: Resp) -> Resp {
    let expects = req
        .headers()
        .get("expect")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    refuse_as(req, resp, !expects).await
}

/// As [`refuse`], after a wait: a client that asked for `100 Continue` has stopped waiting
/// for it by then (curl waits 1 s) and is sending its body, which is read all the same.
async fn refuse_late(req: Request<Incoming>, resp: Resp) -> Resp {
    refuse_as(req, resp, true).await
}

async fn refuse_as(req: Request<Incoming>, mut resp: Resp, read: bool) -> Resp {
    if !read || drain(req.into_body(), DRAIN_BYTES).await {
        return resp;
    }
    resp.headers_mut().insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("close"),
    );
    resp
}

/// Reads a body of at most `max` bytes (`None` if it is longer; the rest is left unread).
async fn read_body(body: &mut Incoming, max: usize) -> Result<Option<Bytes>, hyper::Error> {
    use hyper::body::Body;
    let hint = usize::try_from(body.size_hint().lower()).unwrap_or(max);
    let mut buf = Vec::with_capacity(hint.min(max));
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame?.data_ref() {
            if d.len() > max - buf.len() {
                return Ok(None);
            }
            buf.extend_from_slice(d);
        }
    }
    Ok(Some(Bytes::from(buf)))
}

/// Why a gzip body could not be decompressed.
enum Unzip {
    /// Over `max_body` once decompressed.
    TooLarge,
    Invalid(String),
}

/// Decompresses a gzip body (several members, as concatenated files make, are read in
/// turn) of at most `max` bytes once decompressed; `None` if it is longer, found before
/// more than `max + 1` bytes are held.
fn gunzip(body: &[u8], max: usize) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let mut out = Vec::new();
    if body.is_empty() {
        // Nothing compressed: the empty body it is (refused as such).
        return Ok(Some(out));
    }
    flate2::read::MultiGzDecoder::new(body)
        .take(max as u64 + 1)
        .read_to_end(&mut out)?;
    Ok((out.len() <= max).then_some(out))
}

/// Reads and drops a body to its end: whether it ended within `cap` bytes and `DRAIN_TIME`.
async fn drain(mut body: Incoming, cap: usize) -> bool {
    let mut left = cap;
    let read = async {
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return false };
            if let Some(d) = frame.data_ref() {
                let Some(l) = left.checked_sub(d.len()) else {
                    return false;
                };
                left = l;
            }
        }
        true
    };
    matches!(tokio::time::timeout(DRAIN_TIME, read).await, Ok(true))
}

async fn events(shared: Arc<Shared>, req: Request<Incoming>) -> Resp {
    let Some((name, max_body)) = shared.cfg.sources.iter().find_map(|s| match s.kind {
        SourceKind::Http { max_body } => Some((s.name.clone(), max_body)),
        _ => None,
    }) else {
        return json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "no http source is configured"}),
        );
    };
    if !authorized(&shared.cfg.token, &req) {
        return refuse(req, unauthorized()).await;
    }
    // A gzip body (as log shippers send NDJSON) is decompressed; one in any other encoding
    // would read as one bad line ("not UTF-8"): say what is wrong.
    let mut gzip = false;
    if let Some(enc) = req.headers().get("content-encoding") {
        let enc = String::from_utf8_lossy(enc.as_bytes())
            .trim()
            .to_ascii_lowercase();
        gzip = matches!(enc.as_str(), "gzip" | "x-gzip");
        if enc != "identity" && !enc.is_empty() && !gzip {
            shared
                .metrics
                .events_rejected
                .with_label_values(&[&name, "content_encoding"])
                .inc();
            let resp = json(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                serde_json::json!({"error": format!("content-encoding {enc:?} is not supported: send the body uncompressed or gzip")}),
            );
            return refuse(req, resp).await;
        }
    }
    let too_large = || {
        json(
            StatusCode::PAYLOAD_TOO_LARGE,
            serde_json::json!({"error": format!("body larger than {max_body} bytes")}),
        )
    };
    let length = req
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if length.is_some_and(|len| len > max_body) {
        return refuse(req, too_large()).await;
    }
    // The body's share of the ingest budget, taken before it is read (a gzip body's adds
    // what it may hold once decompressed: both are held while it is decompressed).
    let share = length
        .unwrap_or(max_body)
        .saturating_add(if gzip { max_body } else { 0 })
        .clamp(1, ingest_budget(&shared.cfg).max(1)) as u32;
    let acquire = Arc::clone(&shared.ingest).acquire_many_owned(share);
    let permit = match tokio::time::timeout(INGEST_WAIT, acquire).await {
        Ok(Ok(p)) => p,
        Ok(Err(_)) => {
            let resp = json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"error": "not accepting events (shutting down)"}),
            );
            return refuse(req, resp).await;
        }
        Err(_) => {
            let mut r = json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"error": "busy: other requests' bodies fill the ingest budget; retry"}),
            );
            r.headers_mut()
                .insert("retry-after", hyper::header::HeaderValue::from_static("1"));
            return refuse_late(req, r).await;
        }
    };
    // A body trickled in slower than this holds a connection slot: cut it.
    let mut incoming = req.into_body();
    let read = tokio::time::timeout(BODY_TIMEOUT, read_body(&mut incoming, max_body));
    let Ok(read) = read.await else {
        return json(
            StatusCode::REQUEST_TIMEOUT,
            serde_json::json!({"error": format!("body not received within {}s", BODY_TIMEOUT.as_secs())}),
        );
    };
    let body = match read {
        Ok(Some(b)) => b,
        Ok(None) => {
            // (Without a length given: found while reading.)
            drop(permit);
            let mut resp = too_large();
            if !drain(incoming, DRAIN_BYTES).await {
                resp.headers_mut().insert(
                    hyper::header::CONNECTION,
                    hyper::header::HeaderValue::from_static("close"),
                );
            }
            return resp;
        }
        Err(e) => {
            return json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": format!("reading body: {e}")}),
            );
        }
    };
    // Each event's time is checked here too, so that the first bad line is the one named
    // whatever is wrong with it (the core refuses the whole request for any of them).
    // Off the async threads: a large body takes long enough to hold up other requests
    // (health probes among them).
    let field = shared.cfg.time.field.clone();
    let wall = matches!(shared.cfg.time.clock, ClockMode::Wall);
    // The permit goes along: a client gone meanwhile frees it only when the split ends.
    let split = tokio::task::spawn_blocking(move || {
        let mut permit = permit;
        let body = if gzip {
            let plain = gunzip(&body, max_body);
            // Not held beside the events.
            drop(body);
            match plain {
                Ok(Some(b)) => Bytes::from(b),
                Ok(None) => return (Err(Unzip::TooLarge), permit),
                Err(e) => return (Err(Unzip::Invalid(e.to_string())), permit),
            }
        } else {
            body
        };
        // From here on the body's share is what it holds: the room taken for a gzip
        // body's decompression, or for a body sent without a length, goes back.
        let keep = body.len().clamp(1, permit.num_permits());
        drop(permit.split(permit.num_permits() - keep));
        let decoder = Decoder::time_only(&field);
        let check = |line: &str| {
            decoder
                .decode_at(line.as_bytes(), None, wall.then_some(0))
                .map(drop)
        };
        (Ok(split_body(&body, check)), permit)
    })
    .await;
    let (split, permit) = match split {
        Ok((Ok(s), permit)) => (s, permit),
        Ok((Err(Unzip::TooLarge), _)) => {
            return json(
                StatusCode::PAYLOAD_TOO_LARGE,
                serde_json::json!({"error": format!("body larger than {max_body} bytes once decompressed")}),
            );
        }
        Ok((Err(Unzip::Invalid(e)), _)) => {
            shared
                .metrics
                .events_rejected
                .with_label_values(&[&name, "content_encoding"])
                .inc();
            return json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": format!("body is not valid gzip: {e}")}),
            );
        }
        Err(e) => {
            return json(
                StatusCode::INTERNAL_SERVER_ERROR,
                serde_json::json!({"error": e.to_string()}),
            );
        }
    };
    let mut body = match split {
        Ok(b) => b,
        Err(e) => {
            shared
                .metrics
                .events_rejected
                .with_label_values(&[&name, e.reason])
                .inc();
            return json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": format!("{}: {}", e.at, e.message), "line": e.line}),
            );
        }
    };
    let (tx, rx) = oneshot::channel();
    let mut msg = Msg::Lines {
        source: Arc::from(name.as_str()),
        lines: std::mem::take(&mut body.lines),
        at: LineAt::Unknown,
        position: None,
        atomic: true,
        done: Some(tx),
        hold: Some(permit),
    };
    // Counted before the stop is looked at: a stop then either finds it refused here or
    // waits for its commit, never cuts it off between the two (its events committed and
    // its sender, seeing no answer, sending them again).
    let _awaiting = Awaiting::new(&shared.committing);
    // Into the core's queue without holding a blocking thread while it is full (a busy
    // core would otherwise park one per waiting request, and the read API needs them).
    let mut pause = std::time::Duration::from_millis(1);
    let sent = loop {
        if shared.stopping.load(Ordering::SeqCst) {
            break false;
        }
        match shared.core.try_send(msg) {
            Ok(()) => break true,
            Err(std::sync::mpsc::TrySendError::Full(m)) => {
                msg = m;
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_millis(20));
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => break false,
        }
    };
    if !sent {
        return json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"error": "not accepting events (shutting down)"}),
        );
    }
    match rx.await {
        Ok(Ok(n)) => json(StatusCode::ACCEPTED, serde_json::json!({"accepted": n})),
        Ok(Err(r)) => {
            let (n, at) = body.locate(r.line - 1);
            json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": format!("{at}: {}", r.message), "line": n}),
            )
        }
        Err(_) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"error": "events not committed (state write failed or shutting down)"}),
        ),
    }
}

#[cfg(test)]
mod tests {
    use crate::event::{DecodeError, Decoder};

    fn split_body(body: &[u8]) -> Result<super::Body, super::BodyError> {
        super::split_body(body, |_| Ok::<(), DecodeError>(()))
    }

    /// A byte that is not UTF-8 inside an array is blamed on the element it is in (unless
    /// one before it is bad already), not on the line.
    #[test]
    fn a_byte_not_utf8_in_an_array_names_its_element() {
        let d = Decoder::time_only("time");
        let check = |l: &str| d.decode(l.as_bytes(), None).map(drop);
        let t = r#""time":"2026-01-01T00:00:00Z""#;
        let bytes = [
            format!("\u{feff}[{{{t}}}, {{{t},\"k\":\"").as_bytes(),
            b"\xff",
            format!("\"}}, {{{t}}}]").as_bytes(),
        ]
        .concat();
        let e = super::split_body(&bytes, check).unwrap_err();
        assert_eq!(
            (e.at.as_str(), e.line, e.message.as_str(), e.reason),
            ("element 2", 2, "not UTF-8", "invalid_json")
        );
        // Between two elements: the next one.
        let body = [format!("[{{{t}}},\n").as_bytes(), b"\xff{}]"].concat();
        let e = super::split_body(&body, check).unwrap_err();
        assert_eq!(
            (e.at.as_str(), e.message.as_str()),
            ("element 2", "not UTF-8")
        );
        // After the last element: no element to name, the line.
        let body = [format!("[{{{t}}}\n").as_bytes(), b"\xff]"].concat();
        let e = super::split_body(&body, check).unwrap_err();
        assert_eq!((e.at.as_str(), e.line), ("line 2", 2), "{}", e.message);
        assert!(e.message.starts_with("not UTF-8"), "{}", e.message);
        // One bad before it: that one.
        let body = [b"[{\"type\":\"A\"}, {\"k\":\"".as_slice(), b"\xff\"}]"].concat();
        let e = super::split_body(&body, check).unwrap_err();
        assert_eq!((e.at.as_str(), e.reason), ("element 1", "no_time"));
        // NDJSON: by line.
        let body = [format!("{{{t}}}\n{{{t}}}\n").as_bytes(), b"\xff\n"].concat();
        let e = super::split_body(&body, check).unwrap_err();
        assert_eq!((e.at.as_str(), e.reason), ("line 3", "invalid_json"));
    }

    #[test]
    fn names_the_first_bad_event_whatever_is_wrong_with_it() {
        let d = Decoder::time_only("time");
        let check = |l: &str| d.decode(l.as_bytes(), None).map(drop);
        let t = r#""time":"2026-01-01T00:00:00Z""#;
        let body = format!("[{{{t}}},{{\"type\":\"A\"}},5]");
        let e = super::split_body(body.as_bytes(), check).unwrap_err();
        assert_eq!((e.at.as_str(), e.reason), ("element 2", "no_time"));
        let body = format!("{{{t}}}\n{{\"time\":\"soon\"}}\n{{bad\n");
        let e = super::split_body(body.as_bytes(), check).unwrap_err();
        assert_eq!((e.at.as_str(), e.reason), ("line 2", "bad_time"));
        let e = super::split_body(b"\n{\"a\":1}", check).unwrap_err();
        assert_eq!((e.line, e.reason), (2, "no_time"));
        assert!(super::split_body(format!("{{{t}}}").as_bytes(), check).is_ok());
        // A pretty-printed object with an error on its fifth line: that line is named.
        let body = format!("{{\n  {t},\n  \"type\": \"A\",\n  \"k\":\n}}\n");
        let e = super::split_body(body.as_bytes(), check).unwrap_err();
        assert_eq!(
            (e.line, e.message.as_str()),
            (5, "invalid JSON: expected value at column 1")
        );
        // In an array, a bad element before a syntax error further on is the one named;
        // a syntax error is named by the element it is in; one after the array by line.
        let body = format!("[{{{t}}},\n{{\"type\":\"A\"}},\n{{bad]");
        let e = super::split_body(body.as_bytes(), check).unwrap_err();
        assert_eq!((e.at.as_str(), e.reason), ("element 2", "no_time"));
        let body = format!("[{{{t}}},\n{{{t}}},\n{{bad]");
        let e = super::split_body(body.as_bytes(), check).unwrap_err();
        assert_eq!(
            (e.at.as_str(), e.line, e.reason),
            ("element 3", 3, "invalid_json")
        );
        let body = format!("[{{{t}}}]\nx");
        let e = super::split_body(body.as_bytes(), check).unwrap_err();
        assert_eq!((e.at.as_str(), e.reason), ("line 2", "invalid_json"));
        let body = format!("[{{{t}}}, {{{t}}}]");
        assert_eq!(
            super::split_body(body.as_bytes(), check)
                .unwrap()
                .lines
                .len(),
            2
        );
        // NDJSON whose first line is cut short: that line is named, not the next.
        let body = format!("{{{t},\"a\":1\n{{{t}}}\n");
        let e = super::split_body(body.as_bytes(), check).unwrap_err();
        assert_eq!((e.at.as_str(), e.reason), ("line 1", "invalid_json"));
        // Also when the whole body reads as one object cut short at its end (after its
        // last newline, a line that does not exist).
        for end in ["", "\n", "\n\n"] {
            let body = format!("{{\"a\":\n{{{t}}}{end}");
            let e = super::split_body(body.as_bytes(), check).unwrap_err();
            assert_eq!(
                (e.at.as_str(), e.reason),
                ("line 1", "invalid_json"),
                "{body:?}"
            );
        }
        // A pretty-printed object left open is named where it ends.
        let body = format!("{{\n  {t},\n  \"a\": 1\n");
        let e = super::split_body(body.as_bytes(), check).unwrap_err();
        assert_eq!(e.reason, "invalid_json");
        assert_ne!(e.at, "line 1");
    }

    /// On paused time (it moves only when every task waits): no race with a loaded
    /// machine's scheduling.
    #[tokio::test(start_paused = true)]
    async fn a_write_nobody_reads_fails_after_the_deadline_and_progress_resets_it() {
        use std::time::Duration;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio::time::Instant;
        let limit = Duration::from_millis(200);
        let (mut client, server) = tokio::io::duplex(1024);
        let mut w = super::WriteDeadline::new(server, limit);
        // A slow reader that keeps up: 8 KiB through a 1 KiB pipe, 512 bytes per 20 ms,
        // takes longer than the limit, but no write waits that long.
        let reader = tokio::spawn(async move {
            let (mut got, mut buf) = (0, [0u8; 512]);
            while got < 8192 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                got += client.read(&mut buf).await.unwrap();
            }
            client
        });
        let started = Instant::now();
        w.write_all(&[0u8; 8192]).await.unwrap();
        assert!(started.elapsed() > limit);
        let client = reader.await.unwrap();
        // Nobody reads now: once the pipe is full, the write fails after the limit.
        let started = Instant::now();
        let err = w.write_all(&[1u8; 4096]).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= limit);
        drop(client);
    }

    /// As `replay` and the file source read them: a byte order mark first is not part of
    /// the body, and only ASCII whitespace makes a blank line (a no-break space is text).
    #[test]
    fn a_bom_is_skipped_and_only_ascii_whitespace_is_blank() {
        for body in [
            &b"\xEF\xBB\xBF{\"a\":1}"[..],
            b"\xEF\xBB\xBF[{\"a\":1}]",
            b"\xEF\xBB\xBF{\"a\":1}\n{\"b\":2}",
        ] {
            assert!(
                split_body(body).is_ok(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        let e = split_body(b"{\"a\":1}\n\xC2\xA0\n{\"b\":2}").unwrap_err();
        assert_eq!((e.line, e.reason), (2, "invalid_json"));
        assert_eq!(
            split_body(b"{\"a\":1}\n \t\r\n{\"b\":2}")
                .unwrap()
                .lines
                .len(),
            2
        );
    }

    #[test]
    fn splits_object_array_and_ndjson() {
        // As sent, on one line.
        let one = split_body(b"\n{\n \"a\": 1\r\n}").unwrap();
        assert_eq!(
            (one.lines, one.at),
            (vec![r#"{  "a": 1  }"#.to_string()], vec![2])
        );
        let array = split_body(b"[{\"a\":1},{\"b\":2}]").unwrap();
        assert_eq!((array.at, array.array), (vec![1, 2], true));
        assert_eq!(array.lines.len(), 2);
        // Lines are numbered as sent, blank ones included.
        let nd = split_body(b"{\"a\":1}\n\n{\"b\":2}\n").unwrap();
        assert_eq!(
            (nd.lines.len(), nd.locate(1)),
            (2, (3, "line 3".to_string()))
        );
        assert_eq!(split_body(b"{\"a\":1}\n\n{oops\n").unwrap_err().line, 3);
        assert_eq!(
            split_body(b"{\"a\":1}\n{\"b\":\"\xff\"}").unwrap_err().line,
            2
        );
        let e = split_body(b"{\"a\":1}\n{oops\n").unwrap_err();
        assert_eq!((e.line, e.reason), (2, "invalid_json"));
        let e = split_body(b"[{\"a\":1}, 3]").unwrap_err();
        assert_eq!((e.at.as_str(), e.reason), ("element 2", "not_object"));
        let e = split_body(b"{\"a\":1}\n42\n").unwrap_err();
        assert_eq!((e.at.as_str(), e.reason), ("line 2", "not_object"));
        assert_eq!(split_body(b"  ").unwrap_err().line, 1);
    }
}
