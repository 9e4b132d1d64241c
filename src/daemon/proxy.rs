//! HTTP proxies for the webhook and Alertmanager sinks: which sink goes through which
//! proxy (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and `NO_PROXY`, read as curl reads
//! them), and the connector that reaches a receiver directly or through a proxy's
//! `CONNECT` tunnel.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::proxy::matcher::{Intercept, Matcher};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

use crate::config::{Sink, SinkKind};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The proxy of every HTTP sink that has one. `env` reads a variable (the process
/// environment in the daemon). A variable that would apply to a sink but holds no usable
/// proxy URL is an error naming the variable and the sink, never its value (it may hold
/// a password); a variable no sink uses is not looked at.
pub fn resolve(
    sinks: &[Sink],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<HashMap<String, Intercept>, Vec<String>> {
    // The first of each pair that is set: the lowercase name first, as curl reads them.
    let first = |names: [&'static str; 2]| {
        names
            .into_iter()
            .find_map(|n| env(n).filter(|v| !v.trim().is_empty()).map(|v| (n, v)))
    };
    let https = first(["https_proxy", "HTTPS_PROXY"]);
    let http = first(["http_proxy", "HTTP_PROXY"]);
    let all = first(["all_proxy", "ALL_PROXY"]);
    let no = first(["no_proxy", "NO_PROXY"])
        .map(|(_, v)| v)
        .unwrap_or_default();
    // `*` exempts every host (the matcher takes it for names only, not addresses).
    let everything = no.split(',').any(|e| e.trim() == "*");
    // NO_PROXY alone, against a proxy that always parses.
    let excluded = Matcher::builder().all("http://127.0.0.1:1").no(no).build();
    let (mut found, mut problems) = (HashMap::new(), Vec::new());
    for s in sinks {
        let (SinkKind::Webhook { url, .. } | SinkKind::Alertmanager { url, .. }) = &s.kind else {
            continue;
        };
        let var = match url.scheme_str() {
            Some("https") => https.as_ref(),
            _ => http.as_ref(),
        }
        .or(all.as_ref());
        let Some((name, value)) = var else { continue };
        if everything || excluded.intercept(url).is_none() {
            continue;
        }
        let said = |what: &str| format!("sink {:?}: {name} {what}", s.name);
        match proxy_url(value.trim()) {
            Err(what) => problems.push(said(&what)),
            Ok(()) => match Matcher::builder().all(value.trim()).build().intercept(url) {
                Some(i) => {
                    found.insert(s.name.clone(), i);
                }
                None => problems.push(said(NOT_A_PROXY)),
            },
        }
    }
    if problems.is_empty() {
        Ok(found)
    } else {
        Err(problems)
    }
}

const NOT_A_PROXY: &str = "is not a proxy URL (http://[user:password@]host:port)";

/// Whether `value` is a usable proxy URL; if not, what is wrong, without the value.
fn proxy_url(value: &str) -> Result<(), String> {
    let Ok(p) = value.parse::<Uri>() else {
        return Err(NOT_A_PROXY.into());
    };
    let Some(authority) = p.authority() else {
        return Err(NOT_A_PROXY.into());
    };
    match p.scheme_str() {
        None | Some("http") => {}
        Some(other) => {
            return Err(format!(
                "names a {other} proxy; only http:// proxies (HTTP CONNECT) are supported"
            ));
        }
    }
    let (userinfo, host_port) = match authority.as_str().rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority.as_str()),
    };
    if host_port.is_empty() || p.host().is_none_or(str::is_empty) {
        return Err(NOT_A_PROXY.into());
    }
    // A proxy's port is not implied (curl would take 1080, a URL's scheme 80).
    if p.port_u16().is_none_or(|port| port == 0) {
        return Err("names no port, or one that is not a number from 1 to 65535".into());
    }
    // Each `%` starts an escape of two hex digits.
    if let Some(u) = userinfo {
        // The proxy matcher splits at the first `@`, this check at the last: a password
        // holding one would be sent cut short, its rest taken for part of the host (and
        // logged with it).
        if u.contains('@') {
            return Err("has credentials with an `@` in them: write it as %40".into());
        }
        let b = u.as_bytes();
        let bad = b.iter().enumerate().any(|(i, &c)| {
            c == b'%'
                && !b
                    .get(i + 1..i + 3)
                    .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
        });
        if bad {
            return Err("has credentials with a bad %-escape (want % and two hex digits)".into());
        }
    }
    Ok(())
}

/// How a client reaches its receivers: directly, or through a proxy's `CONNECT` tunnel
/// (for `http://` receivers too: one way through the proxy for both). TLS to an
/// `https://` receiver runs inside the tunnel, end to end.
#[derive(Clone)]
pub enum Route {
    Direct(HttpConnector),
    Tunnel(Tunnel),
}

/// A proxy to tunnel through. (Written here rather than taken from hyper-util, whose
/// tunnel error does not say what the proxy answered: a proxy refusing the credentials
/// with 401 instead of 407, as tinyproxy does, read as "unsuccessful".)
#[derive(Clone)]
pub struct Tunnel {
    http: HttpConnector,
    proxy: Uri,
    auth: Option<hyper::header::HeaderValue>,
    /// The proxy's host:port, for messages.
    at: String,
}

impl Route {
    pub fn new(http: HttpConnector, proxy: Option<&Intercept>) -> Route {
        match proxy {
            None => Route::Direct(http),
            Some(p) => Route::Tunnel(Tunnel {
                http,
                proxy: p.uri().clone(),
                auth: p.basic_auth().cloned(),
                at: p
                    .uri()
                    .authority()
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
            }),
        }
    }
}

impl Service<Uri> for Route {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self {
            Route::Direct(c) | Route::Tunnel(Tunnel { http: c, .. }) => {
                c.poll_ready(cx).map_err(Into::into)
            }
        }
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        match self {
            Route::Direct(c) => {
                let f = c.call(dst);
                Box::pin(async move { f.await.map_err(Into::into) })
            }
            Route::Tunnel(t) => {
                let connecting = t.http.call(t.proxy.clone());
                let (auth, at) = (t.auth.clone(), t.at.clone());
                Box::pin(async move {
                    let io = connecting
                        .await
                        .map_err(|e| BoxError::from(format!("proxy {at}: {}", chain(&e))))?;
                    let target = target(&dst).ok_or("the URL names no host")?;
                    connect(io.into_inner(), &target, auth.as_ref())
                        .await
                        .map(TokioIo::new)
                        .map_err(|e| format!("proxy {at}: {e}").into())
                })
            }
        }
    }
}

/// An error with its causes, as one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut m = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        m.push_str(&format!(": {s}"));
        src = s.source();
    }
    m
}

/// `host:port` of a URL, with its scheme's default port when it names none.
fn target(dst: &Uri) -> Option<String> {
    let host = dst.host()?;
    let port = dst.port_u16().unwrap_or(match dst.scheme_str() {
        Some("https") => 443,
        _ => 80,
    });
    Some(format!("{host}:{port}"))
}

/// Asks the proxy for a tunnel to `target`; the stream is the tunnel once it says 2xx.
async fn connect(
    mut tcp: TcpStream,
    target: &str,
    auth: Option<&hyper::header::HeaderValue>,
) -> Result<TcpStream, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n").into_bytes();
    if let Some(a) = auth {
        req.extend_from_slice(b"Proxy-Authorization: ");
        req.extend_from_slice(a.as_bytes());
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"\r\n");
    tcp.write_all(&req)
        .await
        .map_err(|e| format!("sending CONNECT {target}: {e}"))?;
    // The answer's head; nothing follows it until the client speaks (TLS, a request).
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > 16 * 1024 {
            return Err(format!("answer to CONNECT {target}: head over 16 KiB"));
        }
        let n = tcp
            .read(&mut buf)
            .await
            .map_err(|e| format!("reading the answer to CONNECT {target}: {e}"))?;
        if n == 0 {
            return Err(format!("closed the connection at CONNECT {target}"));
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line: String = head
        .split(|&b| b == b'\r')
        .next()
        .unwrap_or_default()
        .iter()
        .take(200)
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '?'
            }
        })
        .collect();
    let status = line.split(' ').nth(1).and_then(|c| c.parse::<u16>().ok());
    match status {
        Some(200..=299) if line.starts_with("HTTP/1.") => Ok(tcp),
        Some(401 | 407) => Err(format!(
            "answered {line:?} to CONNECT {target}: check the credentials in the proxy variable"
        )),
        _ => Err(format!("answered {line:?} to CONNECT {target}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sink(name: &str, url: &str) -> Sink {
        Sink {
            name: name.into(),
            kind: SinkKind::Webhook {
                url: url.parse().unwrap(),
                secrets: Vec::new(),
                headers: Vec::new(),
                tls: Default::default(),
            },
            timeout: std::time::Duration::from_secs(1),
        }
    }

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |n| {
            vars.iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn sinks_take_the_proxy_of_their_scheme_unless_no_proxy_names_them() {
        let sinks = [
            sink("secure", "https://hooks.example/a"),
            sink("plain", "http://hooks.example/b"),
            sink("inside", "https://alerts.corp.internal/c"),
            sink("local", "http://10.1.2.3:9093/"),
        ];
        let vars = [
            ("https_proxy", "http://user:pa%3Ass@proxy.corp:3128"),
            ("ALL_PROXY", "http://fallback:8080"),
            ("NO_PROXY", ".corp.internal, 10.0.0.0/8"),
        ];
        let p = resolve(&sinks, &env(&vars)).unwrap();
        assert_eq!(p.len(), 2, "{:?}", p.keys().collect::<Vec<_>>());
        assert_eq!(p["secure"].uri().authority().unwrap(), "proxy.corp:3128");
        assert!(p["secure"].basic_auth().is_some());
        assert_eq!(p["plain"].uri().authority().unwrap(), "fallback:8080");
        assert!(resolve(&sinks, &env(&[])).unwrap().is_empty());
    }

    #[test]
    fn an_unusable_proxy_is_named_without_its_value() {
        let sinks = [
            sink("secure", "https://hooks.example/a"),
            sink("plain", "http://hooks.example/b"),
        ];
        let e = resolve(
            &sinks,
            &env(&[
                ("HTTPS_PROXY", "socks5://s3cret@proxy:1080"),
                ("HTTP_PROXY", "not a url s3cret"),
            ]),
        )
        .unwrap_err();
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].contains("sink \"secure\": HTTPS_PROXY names a socks5 proxy"));
        assert!(e[1].contains("sink \"plain\": HTTP_PROXY is not a proxy URL"));
        assert!(!e.concat().contains("s3cret"));
        // Not used by any sink: not an error.
        let only_secure = &sinks[..1];
        assert!(resolve(only_secure, &env(&[("HTTP_PROXY", "::bad")])).is_ok());
        // A port is required and must be one; credentials must decode.
        for (value, want) in [
            ("http://127.0.0.1:99999", "names no port"),
            ("http://proxy.corp", "names no port"),
            ("http://proxy.corp:0", "names no port"),
            ("http://u:pa%ZZ@proxy.corp:3128", "bad %-escape"),
            ("http://u:pa%2@proxy.corp:3128", "bad %-escape"),
            (
                "http://user:p@ss@proxy.corp:3128",
                "an `@` in them: write it as %40",
            ),
            ("http://:3128", "is not a proxy URL"),
        ] {
            let e = resolve(only_secure, &env(&[("HTTPS_PROXY", value)])).unwrap_err();
            assert!(e[0].contains(want), "{value}: {e:?}");
        }
    }

    #[test]
    fn lowercase_names_win_and_a_star_exempts_addresses_too() {
        let sinks = [
            sink("ip", "http://127.0.0.1:9/a"),
            sink("name", "https://hooks.example/b"),
        ];
        let p = resolve(
            &sinks,
            &env(&[
                ("HTTP_PROXY", "http://upper:1"),
                ("http_proxy", "http://lower:2"),
                ("HTTPS_PROXY", "http://upper:1"),
                ("https_proxy", "http://lower:2"),
            ]),
        )
        .unwrap();
        assert_eq!(p["ip"].uri().authority().unwrap(), "lower:2");
        assert_eq!(p["name"].uri().authority().unwrap(), "lower:2");
        // no_proxy over NO_PROXY; `*` among others, for addresses as for names.
        let p = resolve(
            &sinks,
            &env(&[
                ("ALL_PROXY", "socks5://not-even-checked:1"),
                ("NO_PROXY", "nothing.example"),
                ("no_proxy", "other.example, *"),
            ]),
        )
        .unwrap();
        assert!(p.is_empty());
    }

    #[test]
    fn tunnels_are_asked_for_the_scheme_s_port() {
        let t = |u: &str| target(&u.parse().unwrap()).unwrap();
        assert_eq!(t("http://hooks.example/a?b"), "hooks.example:80");
        assert_eq!(t("https://hooks.example/"), "hooks.example:443");
        assert_eq!(t("http://[::1]:8080/x"), "[::1]:8080");
        assert_eq!(t("https://[::1]/x"), "[::1]:443");
    }
}
