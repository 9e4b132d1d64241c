//! The command line: `replay`, `validate` and `test`, their flags, and what each exits with.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::replay::{self, Input};
use crate::rules;
use crate::testing;
use crate::time::Duration;

/// Exit code for bad usage, bad config or bad rules given to a command that runs them.
pub const EXIT_CONFIG: i32 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "sagawatch",
    version,
    about = "An observer for choreographed sagas: flags the steps that never happen"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run recorded events through the rules and print the outcomes as JSON lines.
    Replay {
        /// Rules file or directory of *.yaml / *.yml files.
        #[arg(long, value_name = "PATH")]
        rules: PathBuf,
        /// How far behind the largest event time the clock runs (e.g. 30s).
        #[arg(long, value_name = "DUR")]
        lateness: Option<String>,
        /// Dot path of the event time field (RFC 3339).
        #[arg(long, value_name = "PATH", default_value = "time")]
        time_field: String,
        /// Source name for inputs given without NAME=.
        #[arg(long, value_name = "NAME")]
        source: Option<String>,
        /// Stop at the first bad line (exit 1) instead of skipping it.
        #[arg(long)]
        strict: bool,
        /// Also print lifecycle outcomes: opened, satisfied, closed, cancelled.
        #[arg(long)]
        lifecycle: bool,
        /// Inputs: FILE, - (stdin) or NAME=FILE; several are merged by event time.
        /// Default: stdin.
        #[arg(value_name = "INPUT")]
        inputs: Vec<String>,
    },
    /// Check rules, or a daemon config and its rules (--config); print every problem
    /// with file:line:column. Exit 1 if any.
    Validate {
        /// Rules file or directory.
        #[arg(
            value_name = "PATH",
            required_unless_present = "config",
            conflicts_with = "config"
        )]
        path: Option<PathBuf>,
        /// A daemon config file: checks it, its rules and their source and sink references.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Show one instance's timeline from a daemon's state file: each step's status,
    /// deadline or satisfaction time, and every alert and compensation with its delivery
    /// state. Exit 1 if the instance is not there.
    Inspect {
        /// The daemon's config file (names the state file).
        #[arg(long, value_name = "FILE", default_value = "sagawatch.yaml")]
        config: PathBuf,
        /// Rule name.
        rule: String,
        /// Correlation key.
        key: String,
    },
    /// Run the daemon: follow the configured sources, keep state in SQLite, deliver alerts
    /// and compensations through the outbox, serve /metrics and /v1/events.
    Run {
        /// The config file (see docs/config.md).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Log format on stderr.
        #[arg(long, value_enum, default_value = "text")]
        log_format: crate::daemon::LogFormat,
    },
    /// Run rule unit tests (YAML). Exit 1 if any fails (an invalid test file, or invalid
    /// rules, fail too), 2 if a path does not exist.
    Test {
        /// Test files or directories of them.
        #[arg(value_name = "PATH", required = true)]
        paths: Vec<PathBuf>,
    },
}

/// Runs a command; returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Replay {
            rules,
            lateness,
            time_field,
            source,
            strict,
            lifecycle,
            inputs,
        } => {
            if let Some(s) = &source
                && !rules::valid_name(s)
            {
                crate::stderr!(
                    "error: --source {s:?}: invalid source name: use [a-z0-9][a-z0-9_-]*"
                );
                return Ok(EXIT_CONFIG);
            }
            if rules::split_path(&time_field).is_err() {
                crate::stderr!("error: --time-field {time_field:?}: not a dot path");
                return Ok(EXIT_CONFIG);
            }
            let lateness = match lateness.as_deref() {
                None => 0,
                Some(l) => match Duration::parse_span(l) {
                    Ok(d) => d,
                    Err(e) => {
                        crate::stderr!("error: --lateness: {e}");
                        return Ok(EXIT_CONFIG);
                    }
                },
            };
            let set = match rules::load(&rules) {
                Ok(s) => Arc::new(s),
                Err(e) => {
                    crate::stderr!("{e}");
                    crate::stderr!(
                        "error: {} problem(s) in rules {}",
                        e.diags.len(),
                        rules.display()
                    );
                    return Ok(EXIT_CONFIG);
                }
            };
            // `NAME=FILE` whose NAME is no source name, and no file of that whole name: a
            // mistyped name, not a file name with `=` (those are written `./a=b`; a path,
            // `dir/k=v/x.jsonl`, is one too).
            for a in &inputs {
                if let Some((name, file)) = a.split_once('=')
                    && !file.is_empty()
                    && !name.contains('/')
                    && !name.starts_with('.')
                    && !crate::rules::valid_name(name)
                    && !std::path::Path::new(a).exists()
                {
                    crate::stderr!(
                        "error: invalid source name {name:?} in {a:?}: use [a-z0-9][a-z0-9_-]* \
                         (a file whose name holds `=` is given as ./{a})"
                    );
                    return Ok(EXIT_CONFIG);
                }
            }
            let inputs: Vec<Input> = if inputs.is_empty() {
                vec![Input::parse("-", source.as_deref())]
            } else {
                inputs
                    .iter()
                    .map(|a| Input::parse(a, source.as_deref()))
                    .collect()
            };
            if inputs.iter().filter(|i| i.path.is_none()).count() > 1 {
                // Two readers of one stream would each take a part, lines cut between them.
                crate::stderr!("error: stdin (-) can be given once only");
                return Ok(EXIT_CONFIG);
            }
            let stdout = std::io::stdout();
            let out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
            // With --strict a reader that stops early (| head) must not hide a bad line
            // after that point: the output ends there, the check goes on.
            let mut out: Box<dyn Write> = if strict {
                Box::new(Quiet::new(out))
            } else {
                Box::new(out)
            };
            let opts = replay::Options {
                inputs,
                lateness,
                time_field,
                strict,
                lifecycle,
                progress: true,
            };
            match replay::run(set, opts, &mut out) {
                Ok(summary) => {
                    crate::stderr!("{summary}");
                    Ok(0)
                }
                Err(e) if e.downcast_ref::<replay::StrictError>().is_some() => {
                    let _ = out.flush();
                    crate::stderr!("error: {e}");
                    Ok(1)
                }
                Err(e) => Err(e),
            }
        }
        Command::Inspect { config, rule, key } => {
            // Only the state path is needed: problems elsewhere (a secret from an
            // environment this shell lacks, say) are warnings, not a stop. What decides
            // which state is read does stop it: the `state` key, and an unknown top-level
            // key (a misspelt `state` would have the default read instead).
            let (cfg, problems) = crate::config::check_file(&config);
            let diags = problems.map(|e| e.diags).unwrap_or_default();
            let decisive = |d: &crate::rules::FileDiag| {
                d.diag.path == "state"
                    || (d.file == config
                        && !d.diag.path.contains(['.', '['])
                        && d.diag.message.starts_with("unknown field"))
            };
            let cfg = match cfg {
                Some(c) if !diags.iter().any(decisive) => {
                    for d in &diags {
                        crate::stderr!("warning: {d}");
                    }
                    c
                }
                _ => {
                    for d in &diags {
                        crate::stderr!("{d}");
                    }
                    return Ok(EXIT_CONFIG);
                }
            };
            // As `run` says them: values from the environment named, not shown.
            if !cfg.state.exists() {
                let e = format!("error: state file {} does not exist", cfg.state.display());
                crate::stderr!("{}", cfg.masked(&e));
                return Ok(EXIT_CONFIG);
            }
            let conn = match crate::store::open_read_only(&cfg.state) {
                Ok(c) => c,
                Err(e) => {
                    crate::stderr!("{}", cfg.masked(&format!("error: {e:#}")));
                    return Ok(EXIT_CONFIG);
                }
            };
            // A damaged file shows in the reads: a problem with `state`, not "no instance".
            let found = match crate::store::timeline(&conn, &rule, &key) {
                Ok(f) => f,
                Err(e) => {
                    let e = format!("error: state file {}: {e:#}", cfg.state.display());
                    crate::stderr!("{}", cfg.masked(&e));
                    return Ok(EXIT_CONFIG);
                }
            };
            match found {
                Some(v) => {
                    writeln!(std::io::stdout(), "{}", serde_json::to_string_pretty(&v)?)?;
                    Ok(0)
                }
                None => {
                    crate::stderr!(
                        "no instance of rule {rule:?} for key {key:?} in {}",
                        cfg.state.display()
                    );
                    Ok(1)
                }
            }
        }
        Command::Run { config, log_format } => {
            crate::daemon::init_logging(log_format);
            Ok(crate::daemon::run(&config, log_format))
        }
        Command::Validate {
            config: Some(config),
            ..
        } => Ok(crate::daemon::validate(&config)),
        Command::Validate { path: None, .. } => Ok(EXIT_CONFIG),
        Command::Validate {
            path: Some(path), ..
        } => match rules::load(&path) {
            Ok(set) => {
                let steps: usize = set.rules.iter().map(|r| r.steps.len()).sum();
                writeln!(
                    Quiet::new(std::io::stdout()),
                    "ok: {} rule(s), {} step(s) in {}",
                    set.rules.len(),
                    steps,
                    path.display()
                )?;
                Ok(0)
            }
            Err(e) => {
                writeln!(Quiet::new(std::io::stdout()), "{e}")?;
                crate::stderr!("{} problem(s) found", e.diags.len());
                Ok(1)
            }
        },
        Command::Test { paths } => {
            let mut passed = 0;
            let mut failed = 0;
            let stdout = std::io::stdout();
            let mut out = Quiet::new(stdout.lock());
            // Every path first: a missing one stops the run before any test ran.
            let mut files = Vec::new();
            for p in &paths {
                match testing::test_files(p) {
                    Ok(f) => files.extend(f),
                    Err(e) => {
                        crate::stderr!("error: {e}");
                        return Ok(EXIT_CONFIG);
                    }
                }
            }
            for f in files {
                match testing::run_file(&f) {
                    Err(e) => {
                        writeln!(out, "FAIL {}: cannot run tests:\n{e}", f.display())?;
                        failed += 1;
                    }
                    Ok(results) => {
                        for r in results {
                            match r.failure {
                                None => {
                                    passed += 1;
                                    writeln!(out, "ok   {}: {}", r.file.display(), r.name)?;
                                }
                                Some(report) => {
                                    failed += 1;
                                    writeln!(
                                        out,
                                        "FAIL {}: {}\n{report}",
                                        r.file.display(),
                                        r.name
                                    )?;
                                }
                            }
                        }
                    }
                }
            }
            writeln!(out, "{passed} passed, {failed} failed")?;
            Ok(if failed > 0 { 1 } else { 0 })
        }
    }
}

/// The output of a checking command (`validate`, `test`): a reader that stops reading
/// (`| head`) ends the output, not the check, whose exit code still says how it went.
struct Quiet<W> {
    inner: W,
    closed: bool,
}

impl<W: Write> Quiet<W> {
    fn new(inner: W) -> Quiet<W> {
        Quiet {
            inner,
            closed: false,
        }
    }

    fn gone(&mut self, r: std::io::Result<()>) -> std::io::Result<()> {
        match r {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(())
            }
            r => r,
        }
    }
}

impl<W: Write> Write for Quiet<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !self.closed {
            let r = self.inner.write_all(buf);
            self.gone(r)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.closed {
            return Ok(());
        }
        let r = self.inner.flush();
        self.gone(r)
    }
}
