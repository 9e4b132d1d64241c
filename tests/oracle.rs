//! The engine against an independent model: `tests/oracle/model.py` implements
//! docs/rules.md in plain Python, written from the docs without reading `src/`. Random
//! rules and event streams (`tests/oracle/gen.py`: `after` chains, cancels, short dedup
//! and late windows, lateness, duplicates, out-of-order and early correlates, several
//! inputs, odd keys) go through `sagawatch replay` and through the model; every line must
//! be the same, in the same order. A divergence is shrunk to a small case, written out and
//! named in the failure.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_sagawatch");
const DIFF: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/oracle/diff.py");

fn agree(cases: u32, seed: u32, extra: &[&str]) {
    let out = Command::new("python3")
        // No __pycache__ in the source tree.
        .arg("-B")
        .arg(DIFF)
        .args([cases.to_string(), seed.to_string()])
        .args(["--bin", BIN])
        .args(extra)
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "replay and the model differ (seed {seed}):\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("ran {cases} cases: {{'same': {cases}}}")),
        "{stdout}"
    );
}

#[test]
fn replay_agrees_with_the_independent_model() {
    agree(3000, 1, &[]);
}

#[test]
fn replay_agrees_with_the_independent_model_on_lifecycle_lines() {
    agree(1000, 2, &["--lifecycle"]);
}
