//! `sagawatch run`: wires the config, the state file, the core thread, the sources, the
//! outbox dispatcher and the HTTP server together, and runs the lifecycle (SIGHUP and
//! `/-/reload` reload rules; SIGTERM/SIGINT stop intake, commit, drain, exit 0).

pub mod bad_log;
pub mod core;
pub mod dispatch;
pub mod kafka;
pub mod metrics;
pub mod proxy;
pub mod server;
pub mod sources;

use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::sync_channel;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;

use crate::config::{self, Config, SourceKind};
use crate::store::{self, SqliteState};

/// Exit code for bad config or an unusable state path.
pub const EXIT_CONFIG: i32 = 2;

/// How long in-flight deliveries get after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("SAGAWATCH_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: journald and log files get plain text.
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => b.json().try_init(),
        LogFormat::Text => b.try_init(),
    };
}

/// Prints an error that stops the start: as it is on a terminal, one JSON log line per
/// line with `--log-format json` (so a log pipeline parses it like every other line).
fn startup_error(format: LogFormat, text: &str) {
    match format {
        LogFormat::Text => crate::stderr!("{text}"),
        LogFormat::Json => {
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                tracing::error!("{}", line.strip_prefix("error: ").unwrap_or(line));
            }
        }
    }
}

/// Validates a config file and its rules; prints every problem. Returns the exit code.
/// The rules are checked even when the config has problems (as far as it could be read),
/// so one run shows everything to fix.
pub fn validate(path: &Path) -> i32 {
    let (cfg, config_error) = config::check_file(path);
    if let Some(e) = &config_error {
        crate::stderr!("{e}");
    }
    let Some(cfg) = cfg else {
        // Said, so that a clean next run is not taken for rules that passed.
        crate::stderr!(
            "note: the rules were not checked: they are checked against sources, sinks and \
             alerts, which the problems above leave unknown"
        );
        return 1;
    };
    let mut failed = config_error.is_some();
    if let Err(problems) = proxy::resolve(&cfg.sinks, &|n| std::env::var(n).ok()) {
        for p in &problems {
            crate::stderr!("error: {p}");
        }
        failed = true;
    }
    let kafka_section_ok = config_error.as_ref().is_none_or(|e| {
        !e.diags
            .iter()
            .any(|d| d.diag.path == "kafka" || d.diag.path.starts_with("kafka."))
    });
    if kafka_section_ok {
        // The clients only once every property passed: each is reported once, at its place.
        for p in kafka::check_clients(&cfg) {
            // The config file's own path is not from the environment: not masked.
            crate::stderr!("error: {}: {}", path.display(), cfg.masked(&p.to_string()));
            failed = true;
        }
    }
    if !cfg.rules_path.exists() {
        return 1; // reported with the config's problems
    }
    match cfg.load_rules() {
        Err(e) => {
            crate::stderr!("{e}");
            1
        }
        Ok(_) if failed => 1,
        Ok(set) => {
            writeln!(
                std::io::stdout(),
                "{}: ok ({} sources, {} sinks, {} rules)",
                path.display(),
                cfg.sources.len(),
                cfg.sinks.len(),
                set.rules.len()
            )
            .ok();
            0
        }
    }
}

/// Runs the daemon; returns the process exit code.
pub fn run(path: &Path, format: LogFormat) -> i32 {
    let say = |text: &str| startup_error(format, text);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            say(&format!("error: cannot start the async runtime: {e}"));
            return 1;
        }
    };
    // SIGHUP first: its default action kills the process, so a reload sent while the
    // daemon starts (a systemd ExecReload, say) is held and carried out once it runs.
    // SIGTERM and SIGINT keep their default until then: stopping a start that hangs (an
    // unreachable broker) must work, and nothing is committed yet.
    let hup = match rt.block_on(async { signal(SignalKind::hangup()) }) {
        Ok(s) => s,
        Err(e) => {
            say(&format!("error: cannot install the SIGHUP handler: {e}"));
            return 1;
        }
    };
    // A file-size limit (`ulimit -f`) would kill the process at the first write past it,
    // with nothing logged: handled, that write fails (EFBIG) and the failed commit stops
    // the daemon as a full disk does, naming the state file.
    let _xfsz = match rt
        .block_on(async { signal(SignalKind::from_raw(rustix::process::Signal::XFSZ.as_raw())) })
    {
        Ok(s) => s,
        Err(e) => {
            say(&format!("error: cannot install the SIGXFSZ handler: {e}"));
            return 1;
        }
    };
    let cfg = match config::load(path) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            // One line per problem, each naming its file and position: one problem, one
            // line.
            for line in e.to_string().lines() {
                say(&format!("error: {line}"));
            }
            return EXIT_CONFIG;
        }
    };
    let rules = match cfg.load_rules() {
        Ok(r) => Arc::new(r),
        Err(e) => {
            for line in e.to_string().lines() {
                say(&format!("error: {line}"));
            }
            return EXIT_CONFIG;
        }
    };
    let proxies = match proxy::resolve(&cfg.sinks, &|n| std::env::var(n).ok()) {
        Ok(p) => p,
        Err(problems) => {
            for p in &problems {
                say(&format!("error: {p}"));
            }
            return EXIT_CONFIG;
        }
    };
    let gate = Arc::new(store::WriteGate::default());
    let opened = (|| -> Result<_> {
        // The lock first: a second daemon must not touch the file at all.
        store::check_path(&cfg.state)?;
        let lock = store::lock(&cfg.state)?;
        let mut conn = store::open(&cfg.state)?;
        store::require_writable(&conn, &cfg.state)?;
        store::migrate(&mut conn, &cfg.state)?;
        store::writer_settings(&conn, cfg.batch_sync == crate::config::BatchSync::Full)?;
        let mut positions = Vec::new();
        for s in &cfg.sources {
            positions.push(store::load_position(&conn, &s.name)?);
        }
        let state = SqliteState::open(conn, &rules, &cfg.state)?
            .with_lateness(cfg.time.lateness)
            .with_gate(Arc::clone(&gate));
        Ok((state, positions, lock))
    })();
    // The lock is held until the process exits.
    // Named as the config's own messages are: the file, the key, values from the
    // environment as `${NAME}`.
    let (state, positions, _lock) = match opened {
        Ok(v) => v,
        Err(e) => {
            say(&format!(
                "error: {}: state: {}",
                path.display(),
                cfg.masked(&format!("{e:#}"))
            ));
            return EXIT_CONFIG;
        }
    };
    let listener = match rt.block_on(server::bind(cfg.listen)) {
        Ok(l) => l,
        Err(e) => {
            say(&format!(
                "error: {}: {}",
                path.display(),
                cfg.masked(&format!("{e:#}"))
            ));
            return EXIT_CONFIG;
        }
    };
    let metrics = Arc::new(metrics::Metrics::new());
    metrics.prepare(&cfg);
    let (starting_stop, starting_rx) = tokio::sync::oneshot::channel();
    let starting = rt.spawn(server::serve_starting(
        listener,
        starting_rx,
        Arc::clone(&metrics),
        cfg.allowed_hosts.clone().into(),
    ));
    // As PID 1 (the process of a container) SIGTERM and SIGINT at their default are
    // ignored, and a pod being deleted would wait for the Kafka check to give up: here
    // they end the start the way the default does elsewhere.
    // The signal streams are handed on to the running daemon afterwards: once tokio's
    // handler is installed it stays, and a signal arriving with no stream would be lost.
    let init_stop = rustix::process::getpid().is_init().then(|| {
        let (done, until) = tokio::sync::oneshot::channel::<()>();
        let task = rt.spawn(async {
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return None;
            };
            let sig = tokio::select! {
                biased;
                _ = term.recv() => 15,
                _ = int.recv() => 2,
                _ = until => return Some((term, int)),
            };
            std::process::exit(128 + sig);
        });
        (done, task)
    });
    let checked = kafka::check_topics(&cfg, &rules);
    let stops = init_stop.and_then(|(done, task)| {
        let _ = done.send(());
        rt.block_on(task).ok().flatten()
    });
    let _ = starting_stop.send(());
    let listener = match rt.block_on(starting) {
        Ok(l) => l,
        Err(e) => {
            say(&format!("error: the startup listener failed: {e}"));
            return 1;
        }
    };
    let partitions = match checked {
        Ok(p) => p,
        // Values from the environment (a broker list, a SASL mechanism) are named, not shown.
        Err(kafka::CheckError::Unreachable(e)) => {
            say(&cfg.masked(&format!("error: {e}")));
            return 1;
        }
        Err(kafka::CheckError::Config(problems)) => {
            for p in &problems {
                say(&format!(
                    "error: {}: {}",
                    path.display(),
                    cfg.masked(&p.to_string())
                ));
            }
            return EXIT_CONFIG;
        }
    };
    let code = match run_with(
        cfg,
        rules,
        (state, positions),
        (listener, metrics),
        &rt,
        (hup, stops),
        (partitions, proxies),
    ) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "stopped");
            if format == LogFormat::Text {
                crate::stderr!("error: {e:#}");
            }
            1
        }
    };
    // A timeline API query still running on the blocking pool holds nothing the exit
    // needs (everything is committed): do not wait for it.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    code
}

fn run_with(
    cfg: Arc<Config>,
    rules: Arc<crate::rules::RuleSet>,
    // The state and the stored source positions, read from it.
    (state, positions): (SqliteState, Vec<Option<store::Position>>),
    // The listener and the metrics it served while the daemon started.
    (listener, metrics): (tokio::net::TcpListener, Arc<metrics::Metrics>),
    rt: &tokio::runtime::Runtime,
    // SIGHUP's stream, and SIGTERM's and SIGINT's if they were taken already (as PID 1).
    (mut hup, stops): (
        tokio::signal::unix::Signal,
        Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
    ),
    // What the startup checks found: the Kafka partitions, the HTTP sinks' proxies.
    (partitions, proxies): (
        kafka::Partitions,
        std::collections::HashMap<String, hyper_util::client::proxy::matcher::Intercept>,
    ),
) -> Result<i32> {
    // The core and the outbox dispatcher take turns at writing.
    let gate = state.gate();
    let has_kafka_source = cfg
        .sources
        .iter()
        .any(|s| matches!(s.kind, SourceKind::Kafka { .. }));
    let kafka_health = has_kafka_source.then(|| Arc::new(kafka::Health::default()));
    metrics.rules_loaded_at.set(core::wall_nanos() as f64 / 1e9);
    let (core_tx, core_rx) = sync_channel::<core::Msg>(64);
    let wake_dispatch = Arc::new(Notify::new());
    let stop_sources = Arc::new(AtomicBool::new(false));
    let stop_dispatch = Arc::new(AtomicBool::new(false));
    let core_done = Arc::new(Notify::new());
    let dispatcher_done = Arc::new(Notify::new());
    let kafka_done = Arc::new(Notify::new());

    let shared = Arc::new(server::Shared {
        kafka: kafka_health.clone(),
        cfg: Arc::clone(&cfg),
        metrics: Arc::clone(&metrics),
        core: core_tx.clone(),
        ready: AtomicBool::new(false),
        core_down: AtomicBool::new(false),
        stopping: AtomicBool::new(false),
        reload: Arc::new(Notify::new()),
        reload_result: tokio::sync::Mutex::new(Some(Vec::new())),
        readers: Arc::default(),
        ingest: Arc::new(tokio::sync::Semaphore::new(server::ingest_budget(&cfg))),
        committing: Default::default(),
    });

    // One per file source: set while it holds lines it cannot read yet.
    let file_holds: Vec<Arc<AtomicBool>> = cfg
        .sources
        .iter()
        .map(|_| Arc::new(AtomicBool::new(false)))
        .collect();
    let wal_restart = state.wal_restart_flag();
    let core_thread = {
        let c = core::Core::new(
            Arc::clone(&cfg),
            rules,
            state,
            Arc::clone(&metrics),
            Arc::clone(&wake_dispatch),
        )
        .with_kafka(kafka_health.clone())
        .with_holds(file_holds.clone())
        .with_halt(Arc::clone(&stop_sources));
        let shared = Arc::clone(&shared);
        let done = Arc::clone(&core_done);
        std::thread::Builder::new()
            .name("sagawatch-core".into())
            .spawn(move || {
                // A panic too must end the process visibly: otherwise /healthz stays 200
                // over a daemon that decides nothing any more.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.run(core_rx)))
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("the core thread panicked")));
                if let Err(e) = &r {
                    // Now, not after the shutdown that follows.
                    tracing::error!(error = format!("{e:#}"), "core stopped; shutting down");
                }
                shared.core_down.store(true, Ordering::Relaxed);
                done.notify_one();
                r
            })
            .context("spawning the core thread")?
    };

    let dispatcher = {
        let d = dispatch::Dispatcher {
            cfg: Arc::clone(&cfg),
            metrics: Arc::clone(&metrics),
            rt: rt.handle().clone(),
            wake: Arc::clone(&wake_dispatch),
            stop: Arc::clone(&stop_dispatch),
            grace: SHUTDOWN_GRACE,
            proxies,
            gate: Arc::clone(&gate),
        };
        let path = cfg.state.clone();
        let done = Arc::clone(&dispatcher_done);
        std::thread::Builder::new()
            .name("sagawatch-outbox".into())
            .spawn(move || {
                // Nothing would be delivered any more while events are still taken and
                // /readyz says ready: better a visible exit, and a restart. (Errors in its
                // loop are retried there; these are the ones it cannot go on from.)
                let why =
                    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| d.run(&path))) {
                        Ok(Ok(_)) => return,
                        Ok(Err(e)) => format!("{e:#}"),
                        Err(_) => "it panicked".to_string(),
                    };
                tracing::error!(error = why, "outbox dispatcher stopped; shutting down");
                done.notify_one();
            })
            .context("spawning the outbox dispatcher")?
    };

    let stop_checkpoint = Arc::new(AtomicBool::new(false));
    let checkpointer_done = Arc::new(Notify::new());
    // Now, while the core's connection holds the files open.
    let state_ids = store::FileIds::of(&cfg.state);
    let checkpointer = {
        let path = cfg.state.clone();
        let ids = store::FileIds::of(&path);
        let stop = Arc::clone(&stop_checkpoint);
        let done = Arc::clone(&checkpointer_done);
        std::thread::Builder::new()
            .name("sagawatch-checkpoint".into())
            .spawn(move || {
                // Without it the WAL grows without bound; its other stop is a state file
                // deleted under the daemon. Either way: a visible exit.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    store::checkpoint_loop(&path, &ids, Duration::from_secs(1), &stop, &wal_restart)
                }))
                .unwrap_or_else(|_| Err(anyhow::anyhow!("it panicked")));
                if let Err(e) = r {
                    tracing::error!(
                        error = format!("{e:#}"),
                        "WAL checkpointer stopped; shutting down"
                    );
                    done.notify_one();
                }
            })
            .context("spawning the WAL checkpointer")?
    };

    let mut source_threads = Vec::new();
    for ((s, pos), holding) in cfg.sources.iter().zip(positions).zip(file_holds) {
        let name: Arc<str> = Arc::from(s.name.as_str());
        let tx = core_tx.clone();
        let stop = Arc::clone(&stop_sources);
        match &s.kind {
            SourceKind::File { path, follow } => {
                let src = sources::FileSource {
                    name,
                    path: path.clone(),
                    follow: *follow,
                    start: pos,
                    tx,
                    stop,
                    lag: metrics.source_lag_bytes.with_label_values(&[&s.name]),
                    skips: sources::Skips::new(&metrics, &s.name),
                    rotate_wait: sources::ROTATE_WAIT,
                    holding,
                };
                source_threads.push(
                    std::thread::Builder::new()
                        .name(format!("source-{}", s.name))
                        .spawn(move || src.run())?,
                );
            }
            SourceKind::Stdin => {
                let skips = sources::Skips::new(&metrics, &s.name);
                // Joined like the others: it reads only what poll(2) says is there.
                source_threads.push(
                    std::thread::Builder::new()
                        .name(format!("source-{}", s.name))
                        .spawn(move || sources::run_stdin(name, tx, stop, skips))?,
                );
            }
            SourceKind::Http { .. } | SourceKind::Kafka { .. } => {}
        }
    }
    if let Some(health) = kafka_health {
        metrics.kafka_up.set(1);
        let src = kafka::Source {
            cfg: Arc::clone(&cfg),
            metrics: Arc::clone(&metrics),
            health: Arc::clone(&health),
            core: core_tx.clone(),
            stop: Arc::clone(&stop_sources),
        };
        let done = Arc::clone(&kafka_done);
        source_threads.push(
            std::thread::Builder::new()
                .name("source-kafka".into())
                .spawn(move || {
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| src.run()))
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("it panicked")));
                    if let Err(e) = r {
                        // The consumer's callbacks, which keep it current, are gone. So
                        // is every Kafka event from now on, and the idle clock, which
                        // waits for the consumer's statistics, would stand still for all
                        // sources: better a visible exit, and a restart.
                        metrics.kafka_up.set(0);
                        let why = format!("{e:#}");
                        tracing::error!(error = why, "kafka source stopped; shutting down");
                        health.stopped(&why);
                        done.notify_one();
                    }
                })?,
        );
    }
    drop(core_tx);

    // The address bound (`listen` may have asked for port 0: any free one).
    let listen = listener.local_addr().unwrap_or(cfg.listen);
    let stop_server = Arc::new(Notify::new());
    let server = rt.spawn(server::serve(
        listener,
        Arc::clone(&shared),
        Arc::clone(&stop_server),
    ));
    shared.ready.store(true, Ordering::Relaxed);
    tracing::info!(
        %listen,
        state = %cfg.state.display(),
        rules = %cfg.rules_path.display(),
        sources = cfg.sources.len(),
        sinks = cfg.sinks.len(),
        "sagawatch running"
    );
    if !cfg.listen.ip().is_loopback() {
        if cfg.token.is_none() {
            tracing::warn!(
                listen = %cfg.listen,
                "listening beyond loopback without a token: anyone who reaches it can post events and reload rules"
            );
        }
        tracing::warn!(
            listen = %cfg.listen,
            "the read API and /ui (event contents) take no token: keep this address behind a network policy or an authenticating proxy"
        );
    }

    // Reloads run beside the signal loop (a SIGTERM during one must stop intake at once,
    // not after the core got through the queue and the reload), one at a time, each
    // reading the files once it has its turn.
    let partitions = Arc::new(partitions);
    let reload_turn = Arc::new(tokio::sync::Mutex::new(()));
    let spawn_reload = |waiting: Vec<tokio::sync::oneshot::Sender<_>>| {
        let (cfg, shared) = (Arc::clone(&cfg), Arc::clone(&shared));
        let (partitions, turn) = (Arc::clone(&partitions), Arc::clone(&reload_turn));
        rt.spawn(async move {
            let _turn = turn.lock().await;
            if shared.stopping.load(Ordering::SeqCst) {
                // Stopping: those waiting are answered 503, as any reload from now on.
                return;
            }
            let r = reload(&cfg, &shared, &partitions).await;
            for tx in waiting {
                let _ = tx.send(r.clone());
            }
        });
    };
    // Why the daemon stops, when not for a signal.
    let failed = rt.block_on(async {
        let (mut term, mut int) = match stops {
            Some(s) => s,
            None => (
                signal(SignalKind::terminate())?,
                signal(SignalKind::interrupt())?,
            ),
        };
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); return Ok::<Option<&str>, anyhow::Error>(None) }
                _ = int.recv() => { tracing::info!("SIGINT: shutting down"); return Ok(None) }
                _ = core_done.notified() => { return Ok(Some("the core thread stopped")) }
                _ = dispatcher_done.notified() => { return Ok(Some("the outbox dispatcher stopped")) }
                _ = kafka_done.notified() => { return Ok(Some("the kafka source stopped")) }
                _ = checkpointer_done.notified() => { return Ok(Some("the WAL checkpointer stopped")) }
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading rules");
                    spawn_reload(Vec::new());
                }
                _ = shared.reload.notified() => {
                    // Taken first: a request arriving during this reload waits for the
                    // next one (its notification is kept), which reads the files after it.
                    let waiting = shared
                        .reload_result
                        .lock()
                        .await
                        .as_mut()
                        .map(std::mem::take)
                        .unwrap_or_default();
                    spawn_reload(waiting);
                }
            }
        }
    })?;

    // A state file deleted under the daemon makes the other threads' reads and writes fail
    // too (the dispatcher's may come first): the cause is the message. Looked at now,
    // while the other threads' connections keep the WAL (the last one to close removes it),
    // and also on a stop asked for: one that came before the checkpointer noticed must not
    // end in "stopped cleanly" and exit 0.
    let gone = state_ids.check(&cfg.state).err();

    // Stop intake, commit, drain the outbox for a bounded time. Reload requests still
    // waiting (and any from now on) are answered 503 instead of hanging.
    rt.block_on(shared.reload_result.lock()).take();
    shared.ready.store(false, Ordering::Relaxed);
    shared.stopping.store(true, Ordering::SeqCst);
    stop_sources.store(true, Ordering::Relaxed);
    stop_server.notify_one();
    // Requests waiting for their batch are answered now, not after `batch.interval`
    // (which may be longer than the server's grace for open requests).
    let _ = shared.core.send(core::Msg::Stopping);
    let _ = rt.block_on(server);
    for t in source_threads {
        let _ = t.join();
    }
    let _ = shared.core.send(core::Msg::Shutdown);
    let core_result = core_thread
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the core thread panicked")));
    stop_dispatch.store(true, Ordering::Relaxed);
    wake_dispatch.notify_one();
    let _ = dispatcher.join();
    stop_checkpoint.store(true, Ordering::Relaxed);
    let _ = checkpointer.join();
    if let Some(e) = gone {
        return Err(e);
    }
    match (core_result, failed) {
        (Err(e), _) => Err(e),
        (Ok(()), Some(why)) => Err(anyhow::anyhow!(why)),
        (Ok(()), None) => {
            tracing::info!("stopped cleanly");
            Ok(0)
        }
    }
}

async fn reload(
    cfg: &Arc<Config>,
    shared: &Arc<server::Shared>,
    partitions: &kafka::Partitions,
) -> Result<(), server::ReloadError> {
    // Checked as at startup, with the partition counts found then.
    let checked = cfg.load_rules().map_err(|e| e.to_string()).and_then(|set| {
        let problems = kafka::copartitioning(cfg, &set, partitions);
        if problems.is_empty() {
            Ok(set)
        } else {
            Err(problems.join("\n"))
        }
    });
    let result = match checked {
        Err(e) => Err(server::ReloadError::Rejected(e)),
        Ok(set) => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let core = shared.core.clone();
            let msg = core::Msg::Reload {
                rules: Arc::new(set),
                done: tx,
            };
            let sent = tokio::task::spawn_blocking(move || core.send(msg).is_ok())
                .await
                .unwrap_or(false);
            let r = if !sent {
                Err("the core is not running".to_string())
            } else {
                rx.await
                    .unwrap_or_else(|_| Err("the core stopped during reload".into()))
            };
            // Valid rules the core could not take: its state failed, and it stops.
            r.map_err(server::ReloadError::StateFailed)
        }
    };
    match &result {
        Ok(()) => {
            shared
                .metrics
                .rules_reloads
                .with_label_values(&["success"])
                .inc();
            shared
                .metrics
                .rules_loaded_at
                .set(core::wall_nanos() as f64 / 1e9);
            tracing::info!("rules reloaded");
        }
        Err(e) => {
            shared
                .metrics
                .rules_reloads
                .with_label_values(&["failure"])
                .inc();
            // One log line, however many problems: a line-oriented log shipper would
            // take the second for a record of its own.
            let error = e.to_string().lines().collect::<Vec<_>>().join("; ");
            match e {
                server::ReloadError::StateFailed(_) => {
                    tracing::error!(error, "rules reload failed")
                }
                server::ReloadError::Rejected(_) => {
                    tracing::error!(
                        error,
                        "rules reload rejected; the previous rules keep running"
                    )
                }
            }
        }
    }
    result
}
