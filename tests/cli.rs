//! The `sagawatch` binary end to end: exit codes, messages on stderr, outcomes on stdout.

use std::io::Write;
use std::process::{Command, Stdio};

fn sagawatch(args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sagawatch"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sagawatch");
    {
        let mut pipe = child.stdin.take().expect("stdin");
        if let Some(s) = stdin {
            pipe.write_all(s.as_bytes()).expect("write stdin");
        }
    }
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const RULE: &str = "rules:\n  - name: r\n    trigger: { where: { type: A }, key: id }\n    expect:\n      - { step: b, where: { type: B }, key: id, within: 1m }\n";

/// Runs the binary with its stdout a pipe closed at once (a reader gone, as `| head` is
/// soon): its exit code and stderr.
fn into_closed_stdout(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sagawatch"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn validate_accepts_shipped_rules() {
    let (code, out, _) = sagawatch(&["validate", "rules"], None);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("ok: 2 rule(s)"), "{out}");
}

#[test]
fn validate_reports_every_problem_with_position_and_suggestion() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string("rules/orders.yaml")
        .unwrap()
        .replace("after: payment", "after: paymnt")
        .replace("within: 15m", "within: 0s")
        .replace("dedup: 24h", "dedup: 24x\n    bogus: 1");
    let f = write(&dir, "orders.yaml", &text);
    let (code, out, err) = sagawatch(&["validate", &f], None);
    assert_eq!(code, 1);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert!(
        out.contains(&format!(
            "{f}:16:16: rules[0].expect[1].after: unknown step \"paymnt\" (did you mean \"payment\"?)"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "{f}:12:17: rules[0].expect[0].within: duration \"0s\" must be positive"
        )),
        "{out}"
    );
    assert!(
        out.contains("rules[0].dedup: invalid duration \"24x\""),
        "{out}"
    );
    assert!(
        out.contains("rules[0].bogus: unknown field \"bogus\""),
        "{out}"
    );
    assert!(err.contains("4 problem(s)"), "{err}");
}

/// A missing field or a value of the wrong type hides none of the other problems, in the
/// same rule or after it, and says nothing of what follows from it.
#[test]
fn validate_reports_every_problem_past_missing_fields_and_wrong_types() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        &dir,
        "r.yaml",
        "rules:\n  - name: a\n    expect: [ { step: s, key: k, within: 1m, where: 5 } ]\n    cancel: [ { where: { type: X } }, { key: k, within: 5m } ]\n    dedup: 5\n  - name: b\n    trigger: { key: k }\n    expect: [ { step: s, key: k, within: 1m }, { step: t, key: [k], within: 0s, after: x } ]\n    on_missing: [ { compensate: { payload: {} } } ]\n    late: 3\n  - name: c\n    trigger: { key: k }\n    expect: [ { step: [p], key: k, within: 1m }, { step: q, key: k, within: 1m, after: p }, { step: x, key: k, within: 1m, after: y }, { step: y, key: k, within: 1m, after: x } ]\n",
    );
    let (code, out, _) = sagawatch(&["validate", &f], None);
    assert_eq!(code, 1);
    let want = [
        "2:5: rules[0]: missing field \"trigger\"",
        "3:53: rules[0].expect[0].where: expected a mapping, found an integer",
        "4:15: rules[0].cancel[0]: missing field \"key\"",
        "4:49: rules[0].cancel[1].within: unknown field \"within\"",
        "5:12: rules[0].dedup: invalid duration \"5\"",
        "8:64: rules[1].expect[1].key: expected a string, found a sequence",
        "8:77: rules[1].expect[1].within: duration \"0s\" must be positive",
        "8:88: rules[1].expect[1].after: unknown step \"x\"",
        "9:33: rules[1].on_missing[0].compensate: missing field \"sink\"",
        "10:11: rules[1].late: invalid duration \"3\"",
        // Not also an unknown step "p" for the `after` naming the broken one.
        "13:23: rules[2].expect[0].step: expected a string, found a sequence",
        // But the other `after` problems of that rule.
        "13:131: rules[2].expect[2].after: cyclic `after`: x -> y -> x",
    ];
    for w in want {
        assert!(
            out.contains(&format!("{f}:{w}")),
            "missing {w:?} in:\n{out}"
        );
    }
    assert_eq!(out.lines().count(), want.len(), "{out}");
}

/// JSON has no infinity or NaN: such a `where` value or payload value would silently be
/// `null` (and match a present null), so it is refused where it is written.
#[test]
fn validate_refuses_numbers_json_cannot_hold() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        &dir,
        "r.yaml",
        &format!(
            "{RULE}    cancel: [ {{ where: {{ v: .inf, w: 1e400 }}, key: id }} ]\n    on_missing: [ {{ compensate: {{ sink: s, payload: {{ n: .nan }} }} }} ]\n"
        ),
    );
    let (code, out, _) = sagawatch(&["validate", &f], None);
    assert_eq!(code, 1, "{out}");
    for w in [
        "6:29: rules[0].cancel[0].where.v: .inf is not a number JSON can hold",
        "6:38: rules[0].cancel[0].where.w: 1e400 is not a number JSON can hold",
        "7:58: rules[0].on_missing[0].compensate.payload.n: .nan is not a number JSON can hold",
    ] {
        assert!(
            out.contains(&format!("{f}:{w}")),
            "missing {w:?} in:\n{out}"
        );
    }
    assert_eq!(out.lines().count(), 3, "{out}");
}

/// A directory's hidden files are not rules (an editor's lock or backup of one); a link
/// to a file that is gone is reported; FIFOs and devices are passed over.
#[test]
fn hidden_files_in_a_rules_directory_are_not_read() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir, "a.yaml", RULE);
    write(&dir, ".a.yaml", "not: [rules");
    let (code, out, _) = sagawatch(&["validate", &dir.path().display().to_string()], None);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("ok: 1 rule(s)"), "{out}");
    // A rules file linked to one that is gone is not skipped: its rules would vanish.
    std::os::unix::fs::symlink("/nonexistent/b.yaml", dir.path().join("b.yaml")).unwrap();
    let (code, out, _) = sagawatch(&["validate", &dir.path().display().to_string()], None);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("b.yaml") && out.contains("No such file"),
        "{out}"
    );
    // A link to /dev/null switches a file off; a FIFO is not read (it would block).
    std::fs::remove_file(dir.path().join("b.yaml")).unwrap();
    std::os::unix::fs::symlink("/dev/null", dir.path().join("c.yaml")).unwrap();
    let fifo = dir.path().join("d.yaml");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let (code, out, _) = sagawatch(&["validate", &dir.path().display().to_string()], None);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("ok: 1 rule(s)"), "{out}");
}

#[test]
fn validate_reports_duplicates_cycles_templates_and_names() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir, "a.yaml", RULE);
    write(
        &dir,
        "b.yml",
        r#"rules:
  - name: r
    trigger: { where: { type: A }, key: id }
    expect:
      - { step: b, key: id, within: 1m, after: c }
      - { step: c, key: id, within: 1m, after: b }
      - { step: c, key: id, within: 1m }
  - name: Bad_Name
    trigger: { key: "a..b" }
    expect:
      - { step: x, key: id, within: 1m }
    on_missing:
      - alert: { summary: "{{kee}} {{trigger.}}" }
  - name: paging
    trigger: { key: id }
    expect:
      - { step: x, key: id, within: 1m }
    on_missing:
      - page: { to: me }
      - alert: { summary: s, sinks: [] }
      - alert: { summary: s, sinks: [a, b, a] }
"#,
    );
    write(
        &dir,
        "c.yaml",
        r#"rules:
  - name: labelled
    trigger: { key: id }
    labels: { severity: high, __meta: x }
    expect:
      - { step: x, key: id, within: 1m }
"#,
    );
    let (code, out, _) = sagawatch(&["validate", &dir.path().display().to_string()], None);
    assert_eq!(code, 1);
    for want in [
        "b.yml:2:11: rules[0].name: duplicate rule name \"r\" (first defined at ",
        "rules[0].expect[0].after: cyclic `after`: b -> c -> b",
        "rules[0].expect[2].step: duplicate step name \"c\"",
        "rules[1].name: invalid rule name \"Bad_Name\"",
        "rules[1].trigger.key: invalid dot path \"a..b\"",
        "rules[2].on_missing[0]: unknown kind \"page\", expected one of alert, compensate",
        "rules[2].on_missing[1].alert.sinks: an empty list: leave `sinks` out for the default alert sinks",
        "rules[2].on_missing[2].alert.sinks[2]: sink \"a\" listed twice",
        "c.yaml:4:25: rules[0].labels.severity: label \"severity\" is set by sagawatch itself",
        "rules[0].labels.__meta: label \"__meta\": names starting with __ are reserved",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    assert!(
        out.contains("unknown template placeholder \"{{kee}}\" (did you mean \"key\"?)"),
        "{out}"
    );
    // Every bad placeholder of one string, not only the first.
    assert!(
        out.contains(
            "rules[1].on_missing[0].alert.summary: template placeholder \"{{trigger.}}\": empty dot path"
        ),
        "{out}"
    );
    // A key written twice says where, as every other problem does.
    let f = write(
        &dir,
        "d.yaml",
        "rules:\n  - name: d\n    trigger: { key: id, key: id2 }\n    expect: [ { step: s, key: id, within: 1s } ]\n",
    );
    let (code, out, _) = sagawatch(&["validate", &f], None);
    assert_eq!(code, 1);
    assert!(
        out.contains("d.yaml:3:25: rules[0].trigger.key: duplicate key \"key\" in this mapping"),
        "{out}"
    );
}

#[test]
fn validate_reports_yaml_syntax_errors_with_position() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(&dir, "x.yaml", "rules:\n  - name: [unclosed\n");
    let (code, out, _) = sagawatch(&["validate", &f], None);
    assert_eq!(code, 1);
    assert!(
        out.starts_with(&format!("{f}:")) && out.contains("invalid YAML"),
        "{out}"
    );
}

#[test]
fn replay_skips_bad_lines_with_line_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let rules = write(&dir, "r.yaml", RULE);
    // A form feed around a line is whitespace to the daemon's sources, as here.
    let input = "\x0c{\"type\":\"A\",\"id\":\"k\",\"time\":\"2026-01-01T00:00:00Z\"}\x0c\nnot json\n[1,2]\n{\"type\":\"B\"}\n\n{\"type\":\"X\",\"time\":\"2026-01-01T00:05:00Z\"}\n";
    let (code, out, err) = sagawatch(&["replay", "--rules", &rules], Some(input));
    assert_eq!(code, 0, "{err}");
    // The position within the line, not serde_json's own line count.
    assert!(
        err.contains("<stdin>:2: invalid JSON: expected ident at column 2"),
        "{err}"
    );
    assert!(err.contains("<stdin>:3: not a JSON object"), "{err}");
    assert!(err.contains("<stdin>:4: no time field \"time\""), "{err}");
    assert!(err.contains("replayed 2 events (3 skipped)"), "{err}");
    assert!(err.contains("missing=1"), "{err}");
    let v: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(v["outcome"], "missing");
    assert_eq!(v["rule"], "r");
    assert_eq!(v["step"], "b");
    assert_eq!(v["key"], "k");
    assert_eq!(v["deadline"], "2026-01-01T00:01:00Z");
}

#[test]
fn replay_strict_fails_on_first_bad_line() {
    let dir = tempfile::tempdir().unwrap();
    let rules = write(&dir, "r.yaml", RULE);
    let (code, _, err) = sagawatch(
        &["replay", "--strict", "--rules", &rules],
        Some("{\"time\":\"x\"}\n"),
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("error: <stdin>:1: time field \"time\" is not an RFC 3339 timestamp"),
        "{err}"
    );
}

#[test]
fn replay_merges_named_inputs_by_time() {
    let dir = tempfile::tempdir().unwrap();
    let rules = write(
        &dir,
        "r.yaml",
        "rules:\n  - name: r\n    trigger: { source: a, where: { type: A }, key: id }\n    expect:\n      - { step: b, source: b, where: { type: B }, key: id, within: 1m }\n",
    );
    let a = write(
        &dir,
        "a.jsonl",
        "{\"type\":\"A\",\"id\":\"1\",\"time\":\"2026-01-01T00:00:00Z\"}\n{\"type\":\"A\",\"id\":\"2\",\"time\":\"2026-01-01T00:02:00Z\"}\n",
    );
    let b = write(
        &dir,
        "b.jsonl",
        "{\"type\":\"B\",\"id\":\"1\",\"time\":\"2026-01-01T00:00:30Z\"}\n{\"type\":\"B\",\"id\":\"2\",\"time\":\"2026-01-01T00:09:00Z\"}\n",
    );
    let (code, out, err) = sagawatch(
        &[
            "replay",
            "--rules",
            &rules,
            &format!("a={a}"),
            &format!("b={b}"),
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let outs: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(outs.len(), 2, "{out}");
    assert_eq!(outs[0]["outcome"], "missing");
    assert_eq!(outs[0]["key"], "2");
    assert_eq!(outs[1]["outcome"], "late");
}

#[test]
fn replay_with_broken_rules_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let rules = write(&dir, "r.yaml", "rules:\n  - name: r\n");
    let (code, _, err) = sagawatch(&["replay", "--rules", &rules], Some(""));
    assert_eq!(code, 2);
    assert!(err.contains("missing field \"trigger\""), "{err}");
}

#[test]
fn replay_of_a_missing_file_is_a_one_line_error() {
    let (code, _, err) = sagawatch(
        &["replay", "--rules", "rules", "/nonexistent/x.jsonl"],
        None,
    );
    assert_eq!(code, 1);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("cannot open /nonexistent/x.jsonl"), "{err}");
    // A source name that is no name: said so (exit 2), not taken for a file name.
    let (code, _, err) = sagawatch(&["replay", "--rules", "rules", "Orders=x.jsonl"], None);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("invalid source name \"Orders\" in \"Orders=x.jsonl\""),
        "{err}"
    );
    // A path with `=` in a directory's name is a path (missing here: exit 1).
    let (code, _, err) = sagawatch(
        &["replay", "--rules", "rules", "/data/dt=2024/x.jsonl"],
        None,
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot open /data/dt=2024/x.jsonl"), "{err}");
}

#[test]
fn test_command_prints_a_diff_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir, "r.yaml", RULE);
    let t = write(
        &dir,
        "t.yaml",
        "rules: r.yaml\ntests:\n  - name: wrong\n    events:\n      - { at: +0s, event: { type: A, id: k } }\n      - { at: +5m, event: { type: X } }\n    expect:\n      - { outcome: missing, key: other }\n",
    );
    let (code, out, _) = sagawatch(&["test", &t], None);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAIL"), "{out}");
    assert!(
        out.contains("  - {\"key\":\"other\",\"outcome\":\"missing\"}"),
        "{out}"
    );
    assert!(out.contains("  + {"), "{out}");
    assert!(out.trim_end().ends_with("0 passed, 1 failed"), "{out}");
    // A misspelt field is said, not left to fail as a mismatch.
    let t = write(
        &dir,
        "t2.yaml",
        "rules: r.yaml\ntests:\n  - name: typo\n    events:\n      - { at: +0s, event: { type: A, id: k } }\n    expect:\n      - { outcome: missing, stepp: b }\n",
    );
    let (code, out, err) = sagawatch(&["test", &t], None);
    assert_eq!(code, 1, "{out}");
    let all = format!("{out}{err}");
    assert!(
        all.contains("expect[0].stepp: not a field of an outcome (did you mean \"step\"?)"),
        "{all}"
    );
    // Problems of a test are named where they are written.
    let t = write(
        &dir,
        "t3.yaml",
        "rules: r.yaml\ntests:\n  - name: start\n    start: soon\n    events: []\n  \
         - name: outcome\n    events: []\n    expect:\n      - { outcome: mising }\n      - { outcome: opened }\n  \
         - name: lifecycle\n    events: []\n    expect:\n      - { outcome: opened }\n  \
         - name: event\n    events:\n      - { at: +0s, source: Bad Name, event: { type: A } }\n      - { at: +0s, event: [1] }\n",
    );
    let (code, out, _) = sagawatch(&["test", &t], None);
    assert_eq!(code, 1, "{out}");
    for want in [
        "t3.yaml:4:12: tests[0].start: \"soon\" is not an RFC 3339 time",
        "t3.yaml:9:20: tests[1].expect[0].outcome: \"mising\" is not an outcome: one of missing, late, alert, compensate (did you mean \"missing\"?)",
        "t3.yaml:14:20: tests[2].expect[0].outcome: \"opened\" is a lifecycle outcome: reported only with `lifecycle: true`",
        "t3.yaml:17:28: tests[3].events[0].source: invalid source name \"Bad Name\"",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    assert!(out.trim_end().ends_with("0 passed, 4 failed"), "{out}");
    // A key written as a number is the key an event's number gives: text.
    let t4 = write(
        &dir,
        "t4.yaml",
        "rules: r.yaml\ntests:\n  - name: number key\n    events:\n      - { at: +0s, event: { type: A, id: 42 } }\n      - { at: +5m, event: { type: X } }\n    expect:\n      - { outcome: missing, key: 42 }\n",
    );
    let (code, out, _) = sagawatch(&["test", &t4], None);
    assert_eq!(code, 0, "{out}");
    assert!(out.trim_end().ends_with("1 passed, 0 failed"), "{out}");
    // So are names and texts written bare in the rules: `step: 1` is the step "1".
    let t5 = write(
        &dir,
        "t5.yaml",
        "rules:\n  - name: r\n    trigger: { where: { type: A }, key: id }\n    expect: [{ step: 1, where: { type: B }, key: id, within: 1m }]\n    \
         on_missing: [{ alert: { severity: 3, summary: 7, description: 1e3, labels: { code: 500, ok: true } } }]\n\
         tests:\n  - name: bare names\n    events:\n      - { at: +0s, event: { type: A, id: k } }\n      - { at: +5m, event: { type: X } }\n    \
         expect:\n      - { outcome: missing, step: 1 }\n      - { outcome: alert, step: 1, severity: 3, summary: 7, description: 1e3, labels: { code: 500, ok: true } }\n",
    );
    let (code, out, _) = sagawatch(&["test", &t5], None);
    assert_eq!(code, 0, "{out}");
    // As the text they are written as: `010` is "010", not 10.
    let t5b = std::fs::read_to_string(dir.path().join("t5.yaml"))
        .unwrap()
        .replace("severity: 3", "severity: 010");
    let (code, out, _) = sagawatch(&["test", &write(&dir, "t5b.yaml", &t5b)], None);
    assert_eq!(code, 0, "{out}");
    // An actual line in a diff reads as `replay` prints it: its fields in that order.
    let t6 = std::fs::read_to_string(dir.path().join("t5.yaml"))
        .unwrap()
        .replace("step: 1, severity: 3", "step: 1, severity: 4");
    let (_, out, _) = sagawatch(&["test", &write(&dir, "t6.yaml", &t6)], None);
    assert!(
        out.contains("  + {\"outcome\":\"alert\",\"rule\":\"r\",\"step\":\"1\""),
        "{out}"
    );
    // A file that tests nothing, or names no valid time field, fails.
    let t7 = write(&dir, "t7.yaml", "rules: r.yaml\ntests: []\n");
    let (code, out, _) = sagawatch(&["test", &t7], None);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("t7.yaml:2:8: tests: no tests"), "{out}");
    let t8 = write(
        &dir,
        "t8.yaml",
        "rules: r.yaml\ntime_field: a..b\ntests:\n  - { name: x, events: [] }\n",
    );
    let (code, out, _) = sagawatch(&["test", &t8], None);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("t8.yaml:2:13: time_field: "), "{out}");
    // A directory linked into itself is not walked again and again.
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    std::fs::copy(dir.path().join("t4.yaml"), sub.join("t4.yaml")).unwrap();
    std::fs::copy(dir.path().join("r.yaml"), sub.join("r.yaml")).unwrap();
    std::os::unix::fs::symlink(".", sub.join("loop")).unwrap();
    let (_, out, _) = sagawatch(&["test", &sub.join("t4.yaml").display().to_string()], None);
    assert_eq!(out.matches("t4.yaml").count(), 1, "{out}");
    let (_, out, _) = sagawatch(&["test", &sub.display().to_string()], None);
    assert!(out.trim_end().ends_with("1 passed, 1 failed"), "{out}");
    // A path that does not exist stops the run before any test ran.
    let (code, out, err) = sagawatch(&["test", &t, "nope.yaml"], None);
    assert_eq!(code, 2, "{out}");
    assert_eq!(out, "", "{out}");
    assert!(err.contains("nope.yaml"), "{err}");
}

#[test]
fn quickstart_example_reports_missing_steps() {
    let (code, out, err) = sagawatch(
        &[
            "replay",
            "--rules",
            "rules",
            "orders=examples/events/orders.jsonl",
            "payments=examples/events/payments.jsonl",
            "shipments=examples/events/shipments.jsonl",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let kinds: Vec<(String, String)> = out
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["outcome"].as_str().unwrap().to_string(),
                v["key"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for want in [
        ("missing", "1002"),
        ("compensate", "1002"),
        ("late", "1005"),
        ("missing", "1003"),
        ("missing", "r-77"),
    ] {
        assert!(
            kinds.contains(&(want.0.to_string(), want.1.to_string())),
            "{want:?} not in {kinds:?}"
        );
    }
    assert!(
        !kinds
            .iter()
            .any(|(_, k)| k == "1001" || k == "1004" || k == "1006"),
        "{kinds:?}"
    );
}

#[test]
fn validate_config_reports_config_and_rules_problems_in_one_run() {
    let (code, out, err) = sagawatch(&["validate", "--config", "examples/sagawatch.yaml"], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("examples/sagawatch.yaml: ok ("), "{out}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("rules")).unwrap();
    std::fs::write(
        dir.path().join("rules/r.yaml"),
        "rules:\n  - name: r\n    trigger: { source: ordrs, key: id }\n    expect:\n      - { step: s, key: id, within: 1m }\n",
    )
    .unwrap();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(
        &cfg,
        "rules: rules\nlisten: nowhere\nsources: { orders: { type: stdin } }\nsinks: { out: { type: stdout } }\n",
    )
    .unwrap();
    let (code, _, err) = sagawatch(&["validate", "--config", &cfg.display().to_string()], None);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("c.yaml:2:9: listen: \"nowhere\" is not an IP:port address"),
        "{err}"
    );
    assert!(
        err.contains("r.yaml:3:24: rules[0].trigger.source: unknown source \"ordrs\" (did you mean \"orders\"?)"),
        "{err}"
    );
    // A sink whose definition is broken is still declared: the rule naming it gets no
    // follow-on "unknown sink" error, only the sink's own problem is reported.
    std::fs::write(
        dir.path().join("rules/r.yaml"),
        "rules:\n  - name: r\n    trigger: { key: id }\n    expect:\n      - { step: s, key: id, within: 1m }\n    on_missing:\n      - compensate: { sink: hook, payload: { k: '{{key}}' } }\n",
    )
    .unwrap();
    std::fs::write(
        &cfg,
        "rules: rules\nsources: { orders: { type: stdin } }\nsinks: { out: { type: stdout }, hook: { type: webhok } }\n",
    )
    .unwrap();
    let (code, _, err) = sagawatch(&["validate", "--config", &cfg.display().to_string()], None);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("sinks.hook.type: unknown sink type \"webhok\""),
        "{err}"
    );
    assert!(!err.contains("unknown sink \"hook\""), "{err}");
    assert!(!err.contains("rules were not checked"), "{err}");
    // A sink's type of the wrong type leaves the sinks unknown: the rules are not checked
    // against them, and that is said.
    std::fs::write(
        &cfg,
        "rules: rules\nsources: { orders: { type: stdin } }\nsinks: { out: { type: stdout }, hook: { type: [webhook] } }\n",
    )
    .unwrap();
    let (code, _, err) = sagawatch(&["validate", "--config", &cfg.display().to_string()], None);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("sinks.hook.type: expected a string, found a sequence"),
        "{err}"
    );
    assert!(err.contains("note: the rules were not checked"), "{err}");
}

/// What librdkafka checks only across properties, when a client is created, `validate`
/// finds too, offline (no broker runs here): SASL without a mechanism means GSSAPI, which
/// this build lacks; a CA file that is not there. Secrets are not repeated; a config
/// with a mechanism the build has passes.
#[test]
fn validate_config_checks_kafka_clients_offline() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("rules")).unwrap();
    std::fs::write(
        dir.path().join("rules/r.yaml"),
        "rules:\n  - name: r\n    trigger: { source: orders, key: id }\n    expect:\n      - { step: s, key: id, within: 1m }\n    on_missing:\n      - compensate: { sink: cmds, payload: { k: '{{key}}' } }\n",
    )
    .unwrap();
    let cfg = dir.path().join("c.yaml");
    let check = |props: &str| {
        std::fs::write(
            &cfg,
            format!("rules: rules\nkafka:\n  brokers: 127.0.0.1:1\n  properties: {{ security.protocol: SASL_SSL, sasl.username: u, sasl.password: hunter2secret{props} }}\nsources: {{ orders: {{ type: kafka, topic: orders }} }}\nsinks: {{ cmds: {{ type: kafka, topic: cmds }} }}\n"),
        )
        .unwrap();
        sagawatch(&["validate", "--config", &cfg.display().to_string()], None)
    };
    let (code, _, err) = check("");
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("c.yaml: kafka (`kafka.properties`, both clients): Client creation error: No provider for SASL mechanism GSSAPI"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    let (code, _, err) =
        check(", sasl.mechanism: SCRAM-SHA-512, ssl.ca.location: /nonexistent/ca.pem");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("ssl.ca.location failed"), "{err}");
    let (code, out, err) = check(", sasl.mechanism: SCRAM-SHA-512");
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("c.yaml: ok (1 sources, 1 sinks, 1 rules)"),
        "{out}"
    );
    assert!(!format!("{out}{err}").contains("hunter2"));
}

/// Output into a pipe closed early (`| head`) ends the command quietly, as replay does:
/// no panic, no backtrace. 3000 problems are more than a pipe holds, so the write fails.
#[test]
fn validate_into_a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::from("rules:\n");
    for i in 0..3000 {
        text.push_str(&format!("  - {{ name: r{i}, bogus: 1 }}\n"));
    }
    let f = write(&dir, "many.yaml", &text);
    let (code, err) = into_closed_stdout(&["validate", &f]);
    assert!(!err.contains("panicked"), "{err}");
    // The output ended, not the check: its exit code still says the rules are invalid.
    assert_eq!(code, Some(1), "{err}");
    // So for `test`: 3000 failing cases read by a reader that stopped early.
    let mut text = String::from("rules: r.yaml\ntests:\n");
    for i in 0..3000 {
        text.push_str(&format!(
            "  - {{ name: t{i}, events: [{{ at: +0s, event: {{ type: A, id: x }} }}], expect: [{{ outcome: missing }}] }}\n"
        ));
    }
    write(&dir, "r.yaml", RULE);
    let t = write(&dir, "t.yaml", &text);
    let (code, err) = into_closed_stdout(&["test", &t]);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(code, Some(1), "{err}");
}

/// `replay` into a reader that is gone (`| head`) ends quietly too, however much it had
/// left to write; stdin is refused as two inputs; a line longer than 4 MiB is skipped
/// (as the daemon's sources skip it) and named, not read into memory whole.
#[test]
fn replay_into_a_closed_pipe_twice_from_stdin_and_an_oversized_line() {
    let dir = tempfile::tempdir().unwrap();
    let rules = write(&dir, "r.yaml", RULE);
    let mut text = String::new();
    for i in 0..20_000 {
        text.push_str(&format!(
            "{{\"time\":\"2026-01-01T00:00:00Z\",\"type\":\"A\",\"id\":\"{i}\"}}\n"
        ));
    }
    let events = write(&dir, "e.jsonl", &text);
    let (code, err) = into_closed_stdout(&["replay", "--lifecycle", "--rules", &rules, &events]);
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("error"), "{err}");
    // With --strict, a bad line past where the reader stopped still fails the run.
    let strict = write(&dir, "strict.jsonl", &format!("{text}not json\n"));
    let (code, err) = into_closed_stdout(&[
        "replay",
        "--strict",
        "--lifecycle",
        "--rules",
        &rules,
        &strict,
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("strict.jsonl:20001:"), "{err}");

    let (code, _, err) = sagawatch(&["replay", "--rules", &rules, "-", "a=-"], Some(""));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("stdin (-) can be given once only"), "{err}");

    let big = format!(
        "{{\"time\":\"2026-01-01T00:00:00Z\",\"type\":\"A\",\"id\":\"big\",\"pad\":\"{}\"}}\n{{\"time\":\"2026-01-01T00:00:00Z\",\"type\":\"A\",\"id\":\"small\"}}\n",
        "x".repeat(5 << 20)
    );
    let events = write(&dir, "big.jsonl", &big);
    let (code, out, err) = sagawatch(&["replay", "--lifecycle", "--rules", &rules, &events], None);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("skipped") && err.contains("big.jsonl:1: line longer than 4 MiB"),
        "{err}"
    );
    assert!(err.contains("replayed 1 events (1 skipped)"), "{err}");
    assert!(
        out.contains("\"key\":\"small\"") && !out.contains("\"key\":\"big\""),
        "{out}"
    );

    // A line that is not UTF-8 is skipped, as the daemon's sources skip it, even where
    // the bad bytes are in a field no rule reads; the bad byte is counted from the line
    // as written (leading blanks too).
    let bad = dir.path().join("bad.jsonl");
    let first: &[u8] =
        b"  {\"time\":\"2026-01-01T00:00:00Z\",\"type\":\"A\",\"id\":\"1\",\"junk\":\"\xc3\"}\n";
    let at = 1 + first.iter().position(|&b| b == 0xc3).unwrap();
    let mut text = first.to_vec();
    text.extend_from_slice(b"{\"time\":\"2026-01-01T00:00:00Z\",\"type\":\"A\",\"id\":\"2\"}\n");
    std::fs::write(&bad, text).unwrap();
    let (code, out, err) = sagawatch(
        &[
            "replay",
            "--lifecycle",
            "--rules",
            &rules,
            bad.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(&format!(
            "bad.jsonl:1: not UTF-8 (at byte {at} of the line)"
        )),
        "{err}"
    );
    assert!(
        out.contains("\"key\":\"2\"") && !out.contains("\"key\":\"1\""),
        "{out}"
    );

    // Skipped lines said to a stderr that is closed (`2>&1 | head`): no panic.
    let mut text = String::new();
    for _ in 0..100_000 {
        text.push_str("not json\n");
    }
    let junk = write(&dir, "junk.jsonl", &text);
    let mut child = Command::new(env!("CARGO_BIN_EXE_sagawatch"))
        .args(["replay", "--rules", &rules, &junk])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

/// A byte order mark at the start of a file is not part of its first event.
#[test]
fn replay_skips_a_byte_order_mark() {
    let dir = tempfile::tempdir().unwrap();
    let rules = write(&dir, "r.yaml", RULE);
    let events = write(
        &dir,
        "e.jsonl",
        "\u{feff}{\"time\":\"2026-01-01T00:00:00Z\",\"type\":\"A\",\"id\":\"x\"}\n",
    );
    let (code, out, err) = sagawatch(&["replay", "--lifecycle", "--rules", &rules, &events], None);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("replayed 1 events (0 skipped)"), "{err}");
    assert!(out.contains("\"outcome\":\"opened\""), "{out}");
}

/// One id never carries two payloads: a trigger repeated with the same time after `dedup`
/// ran out opens a second instance, whose compensation differs by the trigger field it
/// renders, and so does its id. Without such a difference the ids agree (same payload).
#[test]
fn one_id_never_carries_two_payloads() {
    let dir = tempfile::tempdir().unwrap();
    let rules = write(
        &dir,
        "r.yaml",
        "rules:\n  - name: r\n    trigger: { where: { type: A }, key: k }\n    expect: [ { step: s0, where: { type: B }, key: k, within: 10s } ]\n    on_missing:\n      - compensate: { sink: cmds, payload: { key: \"{{key}}\", amount: \"{{trigger.amt}}\" } }\n    dedup: 30s\n",
    );
    let run = |second_amt: u32| {
        let events = write(
            &dir,
            "e.jsonl",
            &format!(
                "{{\"time\":\"2026-01-01T00:00:00Z\",\"type\":\"A\",\"k\":\"1\",\"amt\":1}}\n{{\"time\":\"2026-01-01T00:01:00Z\",\"type\":\"Z\"}}\n{{\"time\":\"2026-01-01T00:02:00Z\",\"type\":\"Z\"}}\n{{\"time\":\"2026-01-01T00:00:00Z\",\"type\":\"A\",\"k\":\"1\",\"amt\":{second_amt}}}\n{{\"time\":\"2099-01-01T00:00:00Z\",\"type\":\"Z\"}}\n"
            ),
        );
        let (code, out, err) = sagawatch(&["replay", "--rules", &rules, &events], None);
        assert_eq!(code, 0, "{err}");
        let comps: Vec<(String, String)> = out
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["outcome"] == "compensate")
            .map(|v| {
                (
                    v["id"].as_str().unwrap().to_string(),
                    v["payload"].to_string(),
                )
            })
            .collect();
        assert_eq!(comps.len(), 2, "{out}");
        comps
    };
    let differ = run(2);
    assert_ne!(differ[0].0, differ[1].0, "{differ:?}");
    let same = run(1);
    assert_eq!(same[0], same[1]);
    // Nor by a deadline that follows from an earlier step's correlate (here the second
    // instance's payment comes 4 s later, so its shipment is due 4 s later).
    let rules = write(
        &dir,
        "r2.yaml",
        "rules:\n  - name: r\n    trigger: { where: { type: A }, key: k }\n    expect:\n      - { step: p, where: { type: P }, key: k, within: 100s }\n      - { step: s, where: { type: S }, key: k, after: p, within: 10s }\n    on_missing:\n      - compensate: { sink: cmds, payload: { due: \"{{deadline}}\" } }\n    dedup: 1s\n",
    );
    let at = |s: u32, kind: &str| {
        format!(
            "{{\"time\":\"2026-01-01T{:02}:{:02}:{:02}Z\",\"type\":\"{kind}\",\"k\":\"1\"}}\n",
            s / 3600,
            s / 60 % 60,
            s % 60
        )
    };
    let events = write(
        &dir,
        "e2.jsonl",
        &[
            at(0, "A"),
            at(1, "P"),
            at(1020, "Z"),
            at(1030, "Z"),
            at(0, "A"),
            at(5, "P"),
            at(9000, "Z"),
        ]
        .concat(),
    );
    let (code, out, err) = sagawatch(
        &["replay", "--rules", &rules, "--lateness", "1000s", &events],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let comps: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["outcome"] == "compensate")
        .collect();
    assert_eq!(comps.len(), 2, "{out}");
    assert_ne!(comps[0]["payload"], comps[1]["payload"], "{out}");
    assert_ne!(comps[0]["id"], comps[1]["id"], "{out}");
}
