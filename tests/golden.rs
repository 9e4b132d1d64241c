//! Golden cases: every YAML file under tests/golden (rules, events, expected outcomes, one
//! per semantic point of docs/rules.md) and the shipped rules' own tests must pass.

use std::path::Path;

use sagawatch::testing;

fn check(dir: &str) {
    let files = testing::test_files(Path::new(dir)).expect("test files");
    let mut failures = Vec::new();
    let mut count = 0;
    for f in files {
        match testing::run_file(&f) {
            Err(e) => failures.push(format!("{}: {e}", f.display())),
            Ok(results) => {
                for r in results {
                    count += 1;
                    if let Some(report) = r.failure {
                        failures.push(format!("{}: {}\n{report}", r.file.display(), r.name));
                    }
                }
            }
        }
    }
    assert!(count > 0, "no cases in {dir}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn golden_cases_pass() {
    check("tests/golden");
}

#[test]
fn shipped_rules_tests_pass() {
    check("rules/tests");
}
