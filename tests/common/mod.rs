//! Shared parts of the daemon tests: a generated checkout workload, the real binary on a
//! real SQLite file, a webhook receiver that verifies Standard Webhooks signatures, a tiny
//! HTTP client, and waiting on conditions with deadlines (never fixed sleeps).

#![allow(dead_code)]

pub mod kafka;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sagawatch::config::Secret;
use sagawatch::sign;

pub const BIN: &str = env!("CARGO_BIN_EXE_sagawatch");
pub const SECRET: &str = "whsec_dGVzdC1zZWNyZXQtZm9yLXNhZ2F3YXRjaA==";

pub const RULES: &str = r#"
rules:
  - name: checkout
    trigger: { where: { type: OrderPlaced }, key: order_id }
    expect:
      - step: payment
        where: { type: PaymentCompleted }
        key: order_id
        within: 15m
      - step: shipment
        where: { type: OrderShipped }
        key: order_id
        after: payment
        within: 2h
    cancel:
      - where: { type: OrderCancelled }
        key: order_id
    on_missing:
      - alert: { severity: critical, summary: "order {{key}}: {{step}} missing" }
      - compensate: { sink: hook, payload: { type: CancelOrder, order_id: "{{key}}", step: "{{step}}" } }
    late: 1h
"#;

/// An NDJSON line of a checkout event on 2026-03-02 at `hhmm`, of `kind`, for order `key`.
pub fn order_event(hhmm: &str, kind: &str, key: &str) -> String {
    format!("{{\"time\":\"2026-03-02T{hhmm}:00Z\",\"type\":\"{kind}\",\"order_id\":\"{key}\"}}\n")
}

/// A read-only connection to a daemon's state file (beside the running daemon: WAL).
pub fn read_state(d: &Daemon) -> rusqlite::Connection {
    rusqlite::Connection::open_with_flags(
        d.path("state.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap()
}

/// `data` gzip-compressed.
pub fn gz(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Waits until `f` returns `Some`, polling every 20 ms, or panics with `what` after `limit`.
pub fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= end {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A deterministic pseudo-random sequence (tests must be reproducible).
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Wall time now, in nanoseconds since the Unix epoch (the daemon's time unit).
pub fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

pub fn ts(secs: i64) -> String {
    sagawatch::time::format_rfc3339(1_780_000_000_000_000_000 + secs * 1_000_000_000)
}

/// A checkout workload of about `events` events, sorted by time: most orders are paid and
/// shipped in time; some payments are missing or late, some shipments missing, some
/// orders cancelled.
pub fn checkout_events(events: usize, seed: u64) -> Vec<String> {
    let mut rng = Lcg(seed);
    let mut out: Vec<(i64, usize, String)> = Vec::new();
    let mut i = 0;
    while out.len() < events {
        let id = format!("o{i}");
        let t = i as i64 * 2;
        let mut push = |t: i64, ty: &str| {
            let n = out.len();
            out.push((
                t,
                n,
                format!(r#"{{"time":"{}","type":"{ty}","order_id":"{id}"}}"#, ts(t)),
            ));
        };
        push(t, "OrderPlaced");
        match rng.below(100) {
            0..=2 => push(t + 60, "OrderCancelled"),
            3..=8 => {}
            9..=11 => push(t + 20 * 60, "PaymentCompleted"),
            _ => {
                let paid = t + 60 + rng.below(600) as i64;
                push(paid, "PaymentCompleted");
                if rng.below(100) >= 6 {
                    push(paid + 600 + rng.below(3000) as i64, "OrderShipped");
                }
            }
        }
        i += 1;
    }
    out.sort();
    out.into_iter().map(|(_, _, l)| l).collect()
}

pub fn write_lines(path: &Path, lines: &[String]) {
    let mut f = std::fs::File::create(path).unwrap();
    for l in lines {
        writeln!(f, "{l}").unwrap();
    }
}

/// `sagawatch replay` of a file: the alert and compensate lines by id, and the number
/// of late lines.
pub fn replay(rules: &Path, events: &Path) -> (BTreeMap<String, serde_json::Value>, usize) {
    replay_args(rules, &[events.to_str().unwrap()])
}

/// `sagawatch replay --rules RULES ARGS…`, read as [`replay`] does.
pub fn replay_args(rules: &Path, args: &[&str]) -> (BTreeMap<String, serde_json::Value>, usize) {
    let out = Command::new(BIN)
        .args(["replay", "--rules"])
        .arg(rules)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut actions = BTreeMap::new();
    let mut late = 0;
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        match v["outcome"].as_str().unwrap() {
            "alert" | "compensate" => {
                actions.insert(v["id"].as_str().unwrap().to_string(), v);
            }
            "late" => late += 1,
            _ => {}
        }
    }
    (actions, late)
}

/// A port free to bind on loopback now, for a server a test starts next. Taken below the
/// kernel's ephemeral range (32768 and up by default), in turn from a start that differs
/// per process: a port the kernel hands out for `:0` may, once released, go to a client
/// connection of a daemon in a test running alongside before the server binds it.
pub fn free_port() -> u16 {
    use std::sync::atomic::AtomicU32;
    const LOW: u32 = 10_000;
    const SPAN: u32 = 20_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % SPAN,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on loopback between {LOW} and {}", LOW + SPAN);
}

/// A real HTTP proxy (tinyproxy) on loopback that asks for `user` and `password` and
/// logs every request (each `CONNECT host:port`).
pub struct Proxy {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Child,
}

impl Proxy {
    pub fn start(user: &str, password: &str) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let log = dir.path().join("proxy.log");
        std::fs::write(
            dir.path().join("proxy.conf"),
            format!(
                "Port {port}\nListen 127.0.0.1\nTimeout 30\nLogFile \"{}\"\nLogLevel Connect\n\
                 MaxClients 20\nAllow 127.0.0.1\nBasicAuth {user} {password}\n",
                log.display()
            ),
        )
        .unwrap();
        let child = Command::new("tinyproxy")
            .arg("-d")
            .arg("-c")
            .arg(dir.path().join("proxy.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tinyproxy (scripts/test.sh installs it)");
        wait_for(Duration::from_secs(10), "tinyproxy to listen", || {
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
        Proxy { port, dir, child }
    }

    /// What the proxy logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("proxy.log")).unwrap_or_default()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A request the receiver got.
#[derive(Clone, Debug)]
pub struct Received {
    pub id: String,
    pub body: String,
    pub signed: bool,
    /// Every `User-Agent` header of the request.
    pub user_agents: Vec<String>,
}

/// A webhook receiver on loopback that verifies signatures; can be stopped and started
/// on the same port to simulate an outage.
pub struct Receiver {
    pub port: u16,
    pub got: Arc<Mutex<Vec<Received>>>,
    running: Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>,
    pub requests: Arc<AtomicUsize>,
    /// With TLS: connections whose handshake failed.
    pub tls_failures: Arc<AtomicUsize>,
    /// Requests whose body holds one of these are answered 400, and not recorded.
    pub refuse: Arc<Mutex<Vec<String>>>,
}

impl Receiver {
    pub fn new(port: u16) -> Receiver {
        Receiver {
            port,
            got: Arc::default(),
            running: None,
            requests: Arc::default(),
            tls_failures: Arc::default(),
            refuse: Arc::default(),
        }
    }

    pub fn start(&mut self) {
        self.start_with(None);
    }

    /// Serves HTTPS with this certificate and key (PEM); with `client_ca` (PEM), only to
    /// clients that show a certificate it signed.
    pub fn start_tls(&mut self, cert: &str, key: &str, client_ca: Option<&str>) {
        use openssl::ssl::{SslAcceptor, SslMethod, SslVerifyMode};
        use openssl::x509::X509;
        let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).unwrap();
        b.set_certificate(&X509::from_pem(cert.as_bytes()).unwrap())
            .unwrap();
        b.set_private_key(&openssl::pkey::PKey::private_key_from_pem(key.as_bytes()).unwrap())
            .unwrap();
        if let Some(ca) = client_ca {
            let ca = X509::from_pem(ca.as_bytes()).unwrap();
            b.cert_store_mut().add_cert(ca.clone()).unwrap();
            b.add_client_ca(&ca).unwrap();
            b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
        }
        self.start_with(Some(Arc::new(b.build())));
    }

    fn start_with(&mut self, tls: Option<Arc<openssl::ssl::SslAcceptor>>) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (s, got, requests, tls_failures) = (
            Arc::clone(&stop),
            Arc::clone(&self.got),
            Arc::clone(&self.requests),
            Arc::clone(&self.tls_failures),
        );
        let refuse = Arc::clone(&self.refuse);
        let h = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let got = Arc::clone(&got);
                let requests = Arc::clone(&requests);
                let s = Arc::clone(&s);
                let tls = tls.clone();
                let tls_failures = Arc::clone(&tls_failures);
                let refuse = Arc::clone(&refuse);
                std::thread::spawn(move || {
                    conn.set_read_timeout(Some(Duration::from_secs(30))).ok();
                    let served = Served {
                        got: &got,
                        requests: &requests,
                        stop: &s,
                        refuse: &refuse,
                    };
                    match tls {
                        None => serve_conn(conn, &served),
                        Some(tls) => match tls.accept(conn) {
                            Ok(conn) => serve_conn(conn, &served),
                            Err(_) => {
                                tls_failures.fetch_add(1, Ordering::Relaxed);
                            }
                        },
                    }
                });
            }
        });
        self.running = Some((stop, h));
    }

    pub fn stop(&mut self) {
        if let Some((stop, h)) = self.running.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = TcpStream::connect(("127.0.0.1", self.port));
            h.join().unwrap();
        }
    }

    pub fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What a receiver's connection records into, and answers by.
struct Served<'a> {
    got: &'a Mutex<Vec<Received>>,
    requests: &'a AtomicUsize,
    stop: &'a AtomicBool,
    refuse: &'a Mutex<Vec<String>>,
}

fn serve_conn(conn: impl Read + Write, served: &Served<'_>) {
    let Served {
        got,
        requests,
        stop,
        refuse,
    } = *served;
    let secret: Secret = sign::parse_secret(SECRET).unwrap();
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut headers = BTreeMap::new();
        let mut user_agents = Vec::new();
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                let k = k.trim().to_ascii_lowercase();
                if k == "user-agent" {
                    user_agents.push(v.trim().to_string());
                }
                headers.insert(k, v.trim().to_string());
            }
        }
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        if stop.load(Ordering::Relaxed) {
            return;
        }
        requests.fetch_add(1, Ordering::Relaxed);
        let id = headers.get("webhook-id").cloned().unwrap_or_default();
        let ts: i64 = headers
            .get("webhook-timestamp")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let sig = headers
            .get("webhook-signature")
            .cloned()
            .unwrap_or_default();
        let signed = sign::verify(&secret, &id, ts, &body, &sig);
        let body = String::from_utf8_lossy(&body).into_owned();
        let refused = refuse.lock().unwrap().iter().any(|r| body.contains(r));
        let resp = if refused {
            "HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n"
        } else {
            got.lock().unwrap().push(Received {
                id,
                body,
                signed,
                user_agents,
            });
            "HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n"
        };
        if r.get_mut().write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

/// A test CA that issues server certificates (for `127.0.0.1` and `localhost`) and client
/// certificates, all valid from a day ago for a day.
pub struct Pki {
    /// The CA's certificate, PEM.
    pub ca: String,
    cert: openssl::x509::X509,
    key: openssl::pkey::PKey<openssl::pkey::Private>,
}

impl Pki {
    pub fn new() -> Pki {
        use openssl::x509::extension::{BasicConstraints, KeyUsage};
        // Each CA a name of its own: OpenSSL finds an issuer by name.
        static CAS: AtomicUsize = AtomicUsize::new(0);
        let name = format!("sagawatch test CA {}", CAS.fetch_add(1, Ordering::Relaxed));
        let key = pki_key();
        let mut ca = pki_cert(&name, &name);
        ca.set_pubkey(&key).unwrap();
        ca.append_extension(BasicConstraints::new().critical().ca().build().unwrap())
            .unwrap();
        ca.append_extension(
            KeyUsage::new()
                .critical()
                .key_cert_sign()
                .crl_sign()
                .build()
                .unwrap(),
        )
        .unwrap();
        ca.sign(&key, openssl::hash::MessageDigest::sha256())
            .unwrap();
        let cert = ca.build();
        Pki {
            ca: String::from_utf8(cert.to_pem().unwrap()).unwrap(),
            cert,
            key,
        }
    }

    /// A certificate and its key (PEM, PKCS#8): for a server on loopback, or a client.
    pub fn issue(&self, server: bool) -> (String, String) {
        let key = pki_key();
        (
            self.issue_for(server, &key),
            String::from_utf8(key.private_key_to_pem_pkcs8().unwrap()).unwrap(),
        )
    }

    /// A certificate (PEM) for this key.
    pub fn issue_for(
        &self,
        server: bool,
        key: &openssl::pkey::PKeyRef<openssl::pkey::Private>,
    ) -> String {
        use openssl::x509::extension::{ExtendedKeyUsage, SubjectAlternativeName};
        let mut b = pki_cert(if server { "127.0.0.1" } else { "client" }, "");
        b.set_issuer_name(self.cert.subject_name()).unwrap();
        b.set_pubkey(key).unwrap();
        if server {
            let san = SubjectAlternativeName::new()
                .ip("127.0.0.1")
                .dns("localhost")
                .build(&b.x509v3_context(Some(&self.cert), None))
                .unwrap();
            b.append_extension(san).unwrap();
            b.append_extension(ExtendedKeyUsage::new().server_auth().build().unwrap())
                .unwrap();
        } else {
            b.append_extension(ExtendedKeyUsage::new().client_auth().build().unwrap())
                .unwrap();
        }
        b.sign(&self.key, openssl::hash::MessageDigest::sha256())
            .unwrap();
        String::from_utf8(b.build().to_pem().unwrap()).unwrap()
    }
}

fn pki_key() -> openssl::pkey::PKey<openssl::pkey::Private> {
    use openssl::ec::{EcGroup, EcKey};
    let group = EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap();
    openssl::pkey::PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
}

/// A certificate builder with subject `cn` (and issuer `issuer` unless empty), a random
/// serial, valid from a day ago for a day.
fn pki_cert(cn: &str, issuer: &str) -> openssl::x509::X509Builder {
    use openssl::asn1::Asn1Time;
    let name = |cn: &str| {
        let mut n = openssl::x509::X509NameBuilder::new().unwrap();
        n.append_entry_by_text("CN", cn).unwrap();
        n.build()
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut b = openssl::x509::X509::builder().unwrap();
    b.set_version(2).unwrap();
    let mut serial = openssl::bn::BigNum::new().unwrap();
    serial
        .rand(64, openssl::bn::MsbOption::MAYBE_ZERO, false)
        .unwrap();
    b.set_serial_number(&serial.to_asn1_integer().unwrap())
        .unwrap();
    b.set_subject_name(&name(cn)).unwrap();
    if !issuer.is_empty() {
        b.set_issuer_name(&name(issuer)).unwrap();
    }
    b.set_not_before(&Asn1Time::from_unix(now - 86_400).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::from_unix(now + 86_400).unwrap())
        .unwrap();
    b
}

/// A minimal HTTP/1.1 request; returns (status, body).
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    // A server may answer (413) before reading a large body; ignore write errors then.
    let _ = s.write_all(body);
    // Read the head, then Content-Length bytes (some servers keep the connection open
    // despite `connection: close`), else to the end.
    let mut r = BufReader::new(s);
    let mut head = String::new();
    loop {
        let mut l = String::new();
        if r.read_line(&mut l)? == 0 || l == "\r\n" {
            break;
        }
        head.push_str(&l);
    }
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {head:?}")))?;
    let len = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())
            .flatten()
    });
    let mut body = Vec::new();
    match len {
        Some(n) => {
            body.resize(n, 0);
            r.read_exact(&mut body)?;
        }
        None => {
            let _ = r.read_to_end(&mut body);
        }
    }
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The value of a metric series from a /metrics scrape (summed over matching lines).
pub fn metric(port: u16, series_prefix: &str) -> Option<f64> {
    let (status, body) = http(port, "GET", "/metrics", &[], b"").ok()?;
    if status != 200 {
        return None;
    }
    let mut found = None;
    for l in body.lines() {
        if l.starts_with(series_prefix) {
            let v: f64 = l.rsplit(' ').next()?.parse().ok()?;
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

/// A daemon under test: a temp dir with rules, a config and the state file.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub child: Option<Child>,
    pub stderr_path: PathBuf,
    /// Environment variables for the daemon, besides the secret.
    pub env: Vec<(String, String)>,
    /// What the next `start` runs instead of the binary itself (see [`as_nobody`]).
    pub command: Option<Command>,
}

/// The binary, run as nobody when the tests run as root (who may open any file), so that
/// file permissions apply to it.
pub fn as_nobody() -> Command {
    let uid = Command::new("id").arg("-u").output().unwrap();
    if String::from_utf8_lossy(&uid.stdout).trim() == "0" {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(nobodys_binary());
        c
    } else {
        Command::new(BIN)
    }
}

/// The binary where nobody may run it: itself, or (a clone in a directory only root may
/// enter) a copy in a directory of its own under the system's temp dir.
fn nobodys_binary() -> &'static Path {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let runs = |bin: &Path| {
            Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(bin)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if runs(Path::new(BIN)) {
            return PathBuf::from(BIN);
        }
        let dir = std::env::temp_dir().join(format!("sagawatch-nobody-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let copy = dir.join("sagawatch");
        std::fs::copy(BIN, &copy).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(runs(&copy), "nobody cannot run {}", copy.display());
        copy
    })
}

impl Daemon {
    /// Writes `RULES` and a config (the `extra` YAML is appended) into a fresh temp dir.
    pub fn new(extra: &str) -> Daemon {
        Daemon::with_rules(RULES, extra)
    }

    /// As [`Daemon::new`] with other rules.
    pub fn with_rules(rules: &str, extra: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rules")).unwrap();
        std::fs::write(dir.path().join("rules/checkout.yaml"), rules).unwrap();
        let port = free_port();
        let cfg = format!("state: state.db\nrules: rules\nlisten: 127.0.0.1:{port}\n{extra}");
        std::fs::write(dir.path().join("sagawatch.yaml"), cfg).unwrap();
        let stderr_path = dir.path().join("stderr.log");
        Daemon {
            dir,
            port,
            child: None,
            stderr_path,
            env: Vec::new(),
            command: None,
        }
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_path)
            .unwrap();
        let child = self
            .command
            .take()
            .unwrap_or_else(|| Command::new(BIN))
            .args(["run", "--config"])
            .arg(self.path("sagawatch.yaml"))
            .env("WEBHOOK_SECRET", SECRET)
            .env(
                "SAGAWATCH_LOG",
                std::env::var("TEST_SAGAWATCH_LOG").unwrap_or_else(|_| "warn".into()),
            )
            // A proxy of the machine's would carry the deliveries to loopback receivers.
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy")
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        self.child = Some(child);
        let port = self.port;
        wait_for(Duration::from_secs(30), "the daemon to be ready", || {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                panic!("daemon exited early with {st}: {}", self.stderr());
            }
            match http(port, "GET", "/readyz", &[], b"") {
                Ok((200, _)) => Some(()),
                _ => None,
            }
        });
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn terminate(&mut self) -> i32 {
        self.terminate_within(Duration::from_secs(30))
    }

    /// SIGTERM, and the exit code once the daemon exits within `limit`.
    pub fn terminate_within(&mut self, limit: Duration) -> i32 {
        let c = self.child.as_ref().expect("running");
        signal(c, "TERM");
        // Left to the guard (killed on drop) until it exits, should it not.
        let st = wait_for(limit, "the daemon to exit", || {
            self.child.as_mut().unwrap().try_wait().unwrap()
        });
        self.child = None;
        st.code().unwrap_or(-1)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `sagawatch run --config FILE` expected to stop on its own (refused config): its exit
/// code and stderr.
pub fn run_to_exit(config: &Path) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn signal(c: &Child, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(c.id().to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} failed");
}

/// The webhook messages by id: every body delivered under each id (deduplicated).
pub fn by_id(got: &[Received]) -> BTreeMap<String, BTreeSet<String>> {
    let mut m: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in got {
        m.entry(r.id.clone()).or_default().insert(r.body.clone());
    }
    m
}

/// Checks the webhook deliveries against replay: exactly the same alerts and
/// compensations (by id, with the same data), one resolve per late correlate, all signed,
/// and no id under two different payloads.
pub fn assert_matches_replay(
    got: &[Received],
    want: &BTreeMap<String, serde_json::Value>,
    late: usize,
) {
    assert!(
        got.iter().all(|r| r.signed),
        "unsigned or badly signed delivery"
    );
    let ids = by_id(got);
    for (id, bodies) in &ids {
        assert_eq!(
            bodies.len(),
            1,
            "id {id} delivered with {} different payloads",
            bodies.len()
        );
    }
    let mut fired = BTreeMap::new();
    let mut resolved = 0;
    for (id, bodies) in &ids {
        let v: serde_json::Value = serde_json::from_str(bodies.iter().next().unwrap()).unwrap();
        match v["type"].as_str().unwrap() {
            "sagawatch.alert.resolved" => {
                // Its own id, as in its webhook-id; the alert it ends in `alert_id`.
                assert_eq!(v["data"]["id"].as_str(), Some(id.as_str()), "{v}");
                let alert = v["data"]["alert_id"].as_str().unwrap_or_default();
                assert_eq!(format!("{alert}-resolved"), *id);
                assert!(want.contains_key(alert), "resolves an unknown alert: {v}");
                // (Callers that leave decision times out compare no times.)
                if !want[alert]["at"].is_null() {
                    assert_eq!(v["data"]["alert_at"], want[alert]["at"], "{v}");
                }
                resolved += 1;
            }
            _ => {
                fired.insert(id.clone(), v["data"].clone());
            }
        }
    }
    let missing: Vec<_> = want
        .keys()
        .filter(|k| !fired.contains_key(*k))
        .take(5)
        .collect();
    let extra: Vec<_> = fired
        .keys()
        .filter(|k| !want.contains_key(*k))
        .take(5)
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {} (first {missing:?}), extra {} (first {extra:?})",
        want.keys().filter(|k| !fired.contains_key(*k)).count(),
        fired.keys().filter(|k| !want.contains_key(*k)).count(),
    );
    for (id, data) in &fired {
        assert_eq!(data, &want[id], "payload of {id}");
    }
    assert_eq!(resolved, late, "one resolve per late correlate");
}

/// Distinct ids received so far.
pub fn distinct(r: &Receiver) -> usize {
    by_id(&r.received()).len()
}
