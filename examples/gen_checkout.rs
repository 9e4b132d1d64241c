//! Generates the checkout saga of rules/orders.yaml at scale, as one JSON-lines file in
//! time order, for the replay benchmark: `cargo run --release --example gen_checkout --
//! ORDERS OUT`. Each order yields ~5 events (placed, payment, shipment and two unrelated
//! events); 2% are never paid, 2% never shipped, 1% paid late, 1% cancelled. Orders arrive
//! over one hour and ship two to three hours after payment, so at the one-hour mark every
//! instance (about a million) is open at once.

use std::io::{BufWriter, Write};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let orders: u64 = args
        .get(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let path = args.get(2).map(String::as_str).unwrap_or("checkout.jsonl");
    // A fixed linear congruential generator: the same file every time.
    let mut seed: u64 = 0x5eed;
    let mut rnd = move |n: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % n
    };
    let base: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z in ms
    let span_ms: i64 = 3_600_000;
    let mut events: Vec<(i64, String)> = Vec::with_capacity(orders as usize * 5);
    for i in 0..orders {
        let id = format!("ord-{i:08}");
        let t0 = base + (i as i64 * span_ms) / orders as i64;
        let fate = rnd(100);
        events.push((t0, format!(r#"{{"type":"OrderPlaced","data":{{"order_id":"{id}","amount":{},"currency":"EUR"}},"customer":"c-{}"}}"#, rnd(50_000), rnd(100_000))));
        events.push((
            t0 + 1_000 + rnd(60_000) as i64,
            format!(
                r#"{{"type":"InventoryReserved","data":{{"order_id":"{id}","sku":"sku-{}"}}}}"#,
                rnd(5000)
            ),
        ));
        if fate == 0 {
            events.push((
                t0 + 2_000,
                format!(r#"{{"type":"OrderCancelled","data":{{"order_id":"{id}"}}}}"#),
            ));
            continue;
        }
        if fate < 3 {
            continue; // never paid
        }
        let paid = if fate < 4 {
            t0 + 16 * 60_000 + rnd(600_000) as i64 // late
        } else {
            t0 + 5_000 + rnd(600_000) as i64
        };
        events.push((paid, format!(r#"{{"type":"PaymentCompleted","data":{{"status":"ok","amount":{}}},"payload":{{"order":{{"id":"{id}"}}}}}}"#, rnd(50_000))));
        events.push((
            paid + 500,
            format!(r#"{{"type":"EmailSent","data":{{"order_id":"{id}","template":"receipt"}}}}"#),
        ));
        if fate >= 6 {
            events.push((
                paid + 7_200_000 + rnd(3_600_000) as i64,
                format!(
                    r#"{{"type":"OrderShipped","data":{{"order_id":"{id}","carrier":"dhl"}}}}"#
                ),
            ));
        }
    }
    events.sort_by_key(|(t, _)| *t);
    let f = std::fs::File::create(path).expect("create output file");
    let mut w = BufWriter::with_capacity(1 << 20, f);
    for (t, body) in &events {
        let secs = t.div_euclid(1000);
        let ms = t.rem_euclid(1000);
        let ts = sagawatch::time::format_rfc3339(secs * 1_000_000_000 + ms * 1_000_000);
        // Put "time" first, as most producers do.
        writeln!(w, "{{\"time\":\"{ts}\",{}", &body[1..]).expect("write");
    }
    w.flush().expect("flush");
    eprintln!(
        "wrote {} events for {orders} orders to {path}",
        events.len()
    );
}
