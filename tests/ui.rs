//! The web page at /ui, driven in Debian's real headless Chromium over the DevTools
//! protocol (a minimal WebSocket client below): the overview lists the instances, a click
//! opens one instance's timeline, and the timeline shows its steps and actions.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

/// A WebSocket connection speaking just enough of RFC 6455 for DevTools: masked text
/// frames out, unfragmented text frames in.
struct Ws {
    stream: TcpStream,
    next_id: u64,
}

impl Ws {
    /// Connects to the DevTools listener on `port` (the URL's host part may lack the
    /// port: Chromium builds it from our Host header).
    fn connect(port: u16, url: &str) -> Ws {
        let rest = url.strip_prefix("ws://").expect("ws:// URL");
        let (_, path) = rest.split_once('/').unwrap();
        let host = format!("127.0.0.1:{port}");
        let mut stream = TcpStream::connect(&host).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        write!(
            stream,
            "GET /{path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: c2FnYXdhdGNoLXRlc3Qta2V5IQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .unwrap();
        let mut r = BufReader::new(stream.try_clone().unwrap());
        let mut status = String::new();
        r.read_line(&mut status).unwrap();
        assert!(status.contains(" 101 "), "handshake: {status}");
        loop {
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            if l.trim().is_empty() {
                break;
            }
        }
        Ws { stream, next_id: 1 }
    }

    fn send(&mut self, text: &str) {
        let b = text.as_bytes();
        let mut frame = vec![0x81u8];
        let n = b.len();
        if n < 126 {
            frame.push(0x80 | n as u8);
        } else if n < 65536 {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
        let mask = [0x12u8, 0x34, 0x56, 0x78];
        frame.extend_from_slice(&mask);
        frame.extend(b.iter().enumerate().map(|(i, x)| x ^ mask[i % 4]));
        self.stream.write_all(&frame).unwrap();
    }

    fn recv(&mut self) -> String {
        let mut h = [0u8; 2];
        self.stream.read_exact(&mut h).unwrap();
        let mut n = u64::from(h[1] & 0x7f);
        if n == 126 {
            let mut b = [0u8; 2];
            self.stream.read_exact(&mut b).unwrap();
            n = u64::from(u16::from_be_bytes(b));
        } else if n == 127 {
            let mut b = [0u8; 8];
            self.stream.read_exact(&mut b).unwrap();
            n = u64::from_be_bytes(b);
        }
        let mut payload = vec![0u8; n as usize];
        self.stream.read_exact(&mut payload).unwrap();
        String::from_utf8_lossy(&payload).into_owned()
    }

    /// Sends a DevTools command and returns its result (events in between are skipped).
    fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&serde_json::json!({"id": id, "method": method, "params": params}).to_string());
        loop {
            let v: serde_json::Value = serde_json::from_str(&self.recv()).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluates JavaScript in the page; its value.
    fn eval(&mut self, js: &str) -> serde_json::Value {
        let r = self.call(
            "Runtime.evaluate",
            serde_json::json!({"expression": js, "returnByValue": true}),
        );
        r["result"]["value"].clone()
    }
}

struct Chromium {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_ui_lists_instances_and_a_click_shows_the_timeline() {
    let mut d = Daemon::new(
        "time: { idle: 0s }\nbatch: { interval: 20ms }\nsources: { api: { type: http } }\nsinks: { hook: { type: stdout } }\n",
    );
    d.start();
    for ev in [
        r#"{"time":"2026-03-02T09:00:00Z","type":"OrderPlaced","order_id":"o-1"}"#,
        r#"{"time":"2026-03-02T09:01:00Z","type":"OrderPlaced","order_id":"o-2"}"#,
        r#"{"time":"2026-03-02T09:02:00Z","type":"OrderPlaced","order_id":".."}"#,
        r#"{"time":"2026-03-02T09:15:30Z","type":"PaymentCompleted","order_id":"o-2"}"#,
    ] {
        assert_eq!(
            http(d.port, "POST", "/v1/events", &[], ev.as_bytes())
                .unwrap()
                .0,
            202
        );
    }
    wait_for(Duration::from_secs(30), "delivered actions", || {
        (metric(
            d.port,
            "sagawatch_outbox_deliveries_total{result=\"delivered\"",
        )? >= 2.0)
            .then_some(())
    });

    let dir = tempfile::tempdir().unwrap();
    let cdp = free_port();
    let child = Command::new("chromium")
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-dev-shm-usage",
            &format!("--remote-debugging-port={cdp}"),
            &format!("--user-data-dir={}", dir.path().display()),
            "about:blank",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromium is installed by scripts/test.sh");
    let _browser = Chromium { child, _dir: dir };
    let ws_url = wait_for(
        Duration::from_secs(60),
        "Chromium's DevTools endpoint",
        || {
            let (st, body) = http(cdp, "GET", "/json/list", &[], b"").ok()?;
            let targets: Vec<serde_json::Value> = serde_json::from_str(&body).ok()?;
            (st == 200)
                .then(|| {
                    targets
                        .iter()
                        .find(|t| t["type"] == "page")
                        .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(str::to_string))
                })
                .flatten()
        },
    );
    let mut ws = Ws::connect(cdp, &ws_url);
    ws.call(
        "Page.navigate",
        serde_json::json!({"url": format!("http://127.0.0.1:{}/ui", d.port)}),
    );
    // The overview: rule counts, the oldest open and the recently missing instance.
    wait_for(Duration::from_secs(30), "the overview", || {
        let v =
            ws.eval("document.querySelector('#recent-missing a.instance')?.dataset.key ?? null");
        (v == "o-1").then_some(())
    });
    let rules = ws.eval("document.querySelector('#rules').innerText");
    let rules = rules.as_str().unwrap();
    assert!(rules.contains("checkout"), "{rules}");
    let oldest = ws.eval("document.querySelector('#oldest').innerText");
    assert!(oldest.as_str().unwrap().contains("o-2"), "{oldest}");
    // Click through to o-1.
    ws.eval("document.querySelector('#recent-missing a.instance[data-key=\"o-1\"]').click()");
    let text = wait_for(Duration::from_secs(30), "the timeline", || {
        ws.eval("document.querySelector('#timeline')?.innerText ?? null")
            .as_str()
            .map(str::to_string)
    });
    for want in [
        "checkout / o-1",
        "OrderPlaced",
        "payment",
        "missing",
        "2026-03-02T09:15:00Z",
        "not yet open",
        "alert",
        "compensate",
        "delivered",
        "order o-1: payment missing",
    ] {
        assert!(text.contains(want), "timeline lacks {want:?}:\n{text}");
    }
    assert_eq!(
        ws.eval("location.hash"),
        "#/instance/checkout/o-1",
        "the click navigated"
    );
    // A key a URL path cannot carry, even encoded: the browser collapses `..`.
    ws.eval("location.hash = '#/instance/checkout/..'");
    wait_for(Duration::from_secs(30), "the timeline of key ..", || {
        let t = ws.eval("document.querySelector('#timeline')?.innerText ?? null");
        t.as_str()
            .is_some_and(|t| t.contains("checkout / .. — open"))
            .then_some(())
    });
    assert_eq!(d.terminate(), 0);
}
