//! What SQLite alone can do with the instance table's access pattern, without sagawatch
//! around it: the ceiling any design that updates each instance row in place runs into.
//! `cargo run --release --example sqlite_ceiling -- [ROWS] [DIR] [BATCH]` creates a WAL-mode file
//! with the instance table's shape (text (rule, key) primary key, five partial indexes),
//! inserts ROWS rows (default 1M) with increasing keys, then makes 2×ROWS read-and-update
//! passes over random keys among the 200k most recent, each batch of BATCH (default 20k) sorted by key and
//! committed (as the daemon's write-back does), half of them moving the indexed deadline
//! and half closing the row. Prints the rates.
use std::time::Instant;

use rusqlite::{Connection, params};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args
        .get(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let dir = args.get(2).map(String::as_str).unwrap_or("target/bench");
    std::fs::create_dir_all(dir).expect("create the output directory");
    let path = format!("{dir}/sqlite-ceiling.db");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{path}{suffix}"));
    }
    let c = Connection::open(&path).expect("open");
    c.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA cache_size = -98304;
         CREATE TABLE i (rule TEXT, key TEXT, opened_at INT, closed_at INT, expires_at INT,
             next_deadline INT, steps BLOB, missing_at INT, late_at INT,
             PRIMARY KEY (rule, key)) WITHOUT ROWID;
         CREATE INDEX d ON i (next_deadline) WHERE next_deadline IS NOT NULL;
         CREATE INDEX e ON i (expires_at) WHERE closed_at IS NOT NULL;
         CREATE INDEX o ON i (opened_at) WHERE closed_at IS NULL;
         CREATE INDEX m ON i (missing_at) WHERE missing_at IS NOT NULL;
         CREATE INDEX l ON i (late_at) WHERE late_at IS NOT NULL;",
    )
    .expect("schema");
    let rule = "order-fulfilment";
    let batch: usize = args
        .get(3)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000)
        .max(1);

    let t = Instant::now();
    c.execute_batch("BEGIN").expect("begin");
    for i in 0..n {
        let ms = i as i64 * 1000;
        c.prepare_cached("INSERT INTO i VALUES (?1, ?2, ?3, NULL, ?4, ?5, ?6, NULL, NULL)")
            .and_then(|mut s| {
                s.execute(params![
                    rule,
                    format!("ord-{i:08}"),
                    ms,
                    ms + 99,
                    ms + 900_000,
                    [0u8; 18]
                ])
            })
            .expect("insert");
        if i % batch == batch - 1 {
            c.execute_batch("COMMIT; BEGIN").expect("commit");
        }
    }
    c.execute_batch("COMMIT").expect("commit");
    let inserts = n as f64 / t.elapsed().as_secs_f64();

    // xorshift: the same keys every run.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let updates = 2 * n;
    let t = Instant::now();
    let mut keys = Vec::with_capacity(batch);
    for j in 0..updates {
        keys.push(((j / 2) as u64).saturating_sub(rnd() % 200_000) as usize % n);
        if keys.len() < batch && j + 1 < updates {
            continue;
        }
        keys.sort_unstable();
        c.execute_batch("BEGIN").expect("begin");
        for &i in &keys {
            let key = format!("ord-{i:08}");
            let _steps: Vec<u8> = c
                .prepare_cached("SELECT steps FROM i WHERE rule = ?1 AND key = ?2")
                .and_then(|mut s| s.query_row(params![rule, key], |r| r.get(0)))
                .expect("read");
            let (sql, v) = if rnd() % 2 == 0 {
                (
                    "UPDATE i SET closed_at = ?3, next_deadline = NULL, steps = ?4
                     WHERE rule = ?1 AND key = ?2",
                    j as i64,
                )
            } else {
                (
                    "UPDATE i SET next_deadline = ?3, steps = ?4 WHERE rule = ?1 AND key = ?2",
                    2_000_000_000 + j as i64,
                )
            };
            c.prepare_cached(sql)
                .and_then(|mut s| s.execute(params![rule, key, v, [1u8; 18]]))
                .expect("update");
        }
        c.execute_batch("COMMIT").expect("commit");
        keys.clear();
    }
    let rate = updates as f64 / t.elapsed().as_secs_f64();
    println!(
        "SQLite alone, {n} rows: {inserts:.0} inserts/s (increasing keys); \
         {rate:.0} read+update/s (random recent keys, sorted batches of {batch})"
    );
}
