//! The practical limit for the replay benchmark: read and decode every line of a file with
//! the same decoder `replay` uses (same rules, same fields), without the engine.
//! `cargo run --release --example parse_only -- RULES FILE`.

use std::io::BufRead;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rules = sagawatch::rules::load(std::path::Path::new(&args[1])).expect("rules");
    let decoder = sagawatch::event::Decoder::new(&rules, "time");
    let file = std::fs::File::open(&args[2]).expect("open input");
    let mut r = std::io::BufReader::with_capacity(1 << 20, file);
    let mut buf = Vec::new();
    let started = std::time::Instant::now();
    let (mut ok, mut bad) = (0u64, 0u64);
    loop {
        buf.clear();
        if r.read_until(b'\n', &mut buf).expect("read") == 0 {
            break;
        }
        match decoder.decode(&buf, Some("orders")) {
            Ok(ev) => {
                ok += 1;
                std::hint::black_box(&ev);
            }
            Err(_) => bad += 1,
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{{\"events\":{ok},\"bad\":{bad},\"seconds\":{secs:.3},\"events_per_s\":{:.0}}}",
        ok as f64 / secs
    );
}
