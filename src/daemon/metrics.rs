//! The daemon's Prometheus metrics: one registry, names `sagawatch_*`, bounded labels
//! (rule, step, source, sink, outcome, reason; never a correlation key).

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub events_received: IntCounterVec,
    pub events_rejected: IntCounterVec,
    pub events_ahead: IntCounterVec,
    pub events_decoded: IntCounterVec,
    pub instances_opened: IntCounterVec,
    pub instances_closed: IntCounterVec,
    pub steps: IntCounterVec,
    pub oldest_deadline_age: Gauge,
    pub source_lag_bytes: IntGaugeVec,
    pub outcomes: IntCounterVec,
    pub open_instances: IntGaugeVec,
    pub outbox_backlog: IntGaugeVec,
    pub outbox_oldest_age: prometheus::GaugeVec,
    pub deliveries: IntCounterVec,
    pub commit_seconds: Histogram,
    pub clock_lag: Gauge,
    /// `time.lateness` (ns), for `clock_lag`.
    lateness: std::sync::atomic::AtomicI64,
    pub engine_clock: Gauge,
    pub rules_reloads: IntCounterVec,
    pub rules_loaded_at: Gauge,
    pub step_latency: HistogramVec,
    pub ready: IntGauge,
    pub kafka_lag: IntGaugeVec,
    pub kafka_committed: IntGaugeVec,
    pub kafka_errors: IntCounterVec,
    pub kafka_rebalances: IntCounterVec,
    pub kafka_assigned: IntGauge,
    pub kafka_up: IntGauge,
}

fn gauge_vec(reg: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    reg.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn int_gauge(reg: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    reg.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn counter(reg: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    reg.register(Box::new(c.clone())).expect("unique metric");
    c
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let reg = &registry;
        let events_received = counter(
            reg,
            "sagawatch_events_received_total",
            "Events read from a source, before decoding.",
            &["source"],
        );
        let events_rejected = counter(
            reg,
            "sagawatch_events_rejected_total",
            "Events that could not be decoded (bad JSON, not an object, no time).",
            &["source", "reason"],
        );
        let events_ahead = counter(
            reg,
            "sagawatch_events_ahead_total",
            "Events dated more than time.max_ahead ahead of the wall clock (applied; their times did not move the clock).",
            &["source"],
        );
        let events_decoded = counter(
            reg,
            "sagawatch_events_decoded_total",
            "Events decoded and applied to the rules.",
            &["source"],
        );
        let instances_opened = counter(
            reg,
            "sagawatch_instances_opened_total",
            "Instances opened by a trigger.",
            &["rule"],
        );
        let instances_closed = counter(
            reg,
            "sagawatch_instances_closed_total",
            "Instances closed: finished (no step open or able to open) or cancelled.",
            &["rule", "outcome"],
        );
        let steps = counter(
            reg,
            "sagawatch_steps_total",
            "Step outcomes: satisfied, missing, late.",
            &["rule", "step", "outcome"],
        );
        let source_lag_bytes = IntGaugeVec::new(
            Opts::new(
                "sagawatch_source_lag_bytes",
                "Bytes of a file source not yet read (file size minus the offset read to).",
            ),
            &["source"],
        )
        .expect("valid metric");
        reg.register(Box::new(source_lag_bytes.clone()))
            .expect("unique metric");
        let outcomes = counter(
            reg,
            "sagawatch_outcomes_total",
            "Engine outcomes by rule and kind (opened, satisfied, closed, cancelled, missing, late, alert, compensate).",
            &["rule", "outcome"],
        );
        let outbox_oldest_age = prometheus::GaugeVec::new(
            Opts::new(
                "sagawatch_outbox_oldest_age_seconds",
                "How long the oldest message waiting for a sink has waited (0 when none waits).",
            ),
            &["sink"],
        )
        .expect("valid metric");
        reg.register(Box::new(outbox_oldest_age.clone()))
            .expect("unique metric");
        let open_instances = IntGaugeVec::new(
            Opts::new("sagawatch_open_instances", "Open instances by rule."),
            &["rule"],
        )
        .expect("valid metric");
        reg.register(Box::new(open_instances.clone()))
            .expect("unique metric");
        let outbox_backlog = IntGaugeVec::new(
            Opts::new(
                "sagawatch_outbox_backlog",
                "Messages waiting in the outbox by sink.",
            ),
            &["sink"],
        )
        .expect("valid metric");
        reg.register(Box::new(outbox_backlog.clone()))
            .expect("unique metric");
        let deliveries = counter(
            reg,
            "sagawatch_outbox_deliveries_total",
            "Delivery attempts by sink and result (delivered, retry, given_up).",
            &["sink", "result"],
        );
        let commit_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "sagawatch_state_commit_duration_seconds",
                "Time to commit one batch to the SQLite state file.",
            )
            // Up to a minute: `batch.sync: full`, long batches and mass expiries take
            // seconds, and are the commits the question "is the disk keeping up" is about.
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0,
            ]),
        )
        .expect("valid metric");
        reg.register(Box::new(commit_seconds.clone()))
            .expect("unique metric");
        let step_latency = HistogramVec::new(
            HistogramOpts::new(
                "sagawatch_step_latency_seconds",
                "Time from an instance's trigger to the correlate that satisfied a step.",
            )
            // 10 ms to 31 days: windows of days (a 48h shipment) stay measurable.
            .buckets(prometheus::exponential_buckets(0.01, 2.0, 29).expect("buckets")),
            &["rule", "step"],
        )
        .expect("valid metric");
        reg.register(Box::new(step_latency.clone()))
            .expect("unique metric");
        let gauge = |name: &str, help: &str| {
            let g = Gauge::new(name, help).expect("valid metric");
            reg.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let clock_lag = gauge(
            "sagawatch_clock_lag_seconds",
            "Wall time minus lateness minus the engine clock: how far the clock is behind where it could be.",
        );
        let engine_clock = gauge(
            "sagawatch_engine_clock_seconds",
            "The engine clock as a Unix time.",
        );
        let oldest_deadline_age = gauge(
            "sagawatch_oldest_open_deadline_age_seconds",
            "Engine clock minus the earliest open step deadline (negative: time left until it is due).",
        );
        let rules_loaded_at = gauge(
            "sagawatch_rules_last_reload_timestamp_seconds",
            "When the running rule set was loaded.",
        );
        let rules_reloads = counter(
            reg,
            "sagawatch_rules_reloads_total",
            "Rule reloads by result (success, failure).",
            &["result"],
        );
        let ready = IntGauge::new("sagawatch_ready", "1 when the daemon is consuming.")
            .expect("valid metric");
        reg.register(Box::new(ready.clone()))
            .expect("unique metric");
        let build = IntGaugeVec::new(
            Opts::new("sagawatch_build_info", "Build information; always 1."),
            &["version"],
        )
        .expect("valid metric");
        reg.register(Box::new(build.clone()))
            .expect("unique metric");
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            let _ = reg.register(Box::new(ProcessMetrics(pc)));
        }
        let kafka_lag = gauge_vec(
            reg,
            "sagawatch_kafka_consumer_lag",
            "Messages between a partition's high watermark and the offset committed in the state file.",
            &["topic", "partition"],
        );
        let kafka_committed = gauge_vec(
            reg,
            "sagawatch_kafka_committed_offset",
            "Next offset to read, as committed in the state file with the state it caused.",
            &["topic", "partition"],
        );
        let kafka_errors = counter(
            reg,
            "sagawatch_kafka_errors_total",
            "Errors reported by the Kafka client, by kind (all_brokers_down, transport, commit, consume, …).",
            &["kind"],
        );
        let kafka_rebalances = counter(
            reg,
            "sagawatch_kafka_rebalances_total",
            "Consumer group rebalances seen, by kind (assign, revoke, error).",
            &["kind"],
        );
        let kafka_assigned = int_gauge(
            reg,
            "sagawatch_kafka_assigned_partitions",
            "Partitions currently assigned to this instance.",
        );
        let kafka_up = int_gauge(
            reg,
            "sagawatch_kafka_up",
            "1 while a broker answers the consumer, 0 during an outage (only with kafka sources).",
        );
        Metrics {
            registry,
            events_received,
            events_rejected,
            events_ahead,
            events_decoded,
            instances_opened,
            instances_closed,
            steps,
            oldest_deadline_age,
            source_lag_bytes,
            outcomes,
            open_instances,
            outbox_backlog,
            outbox_oldest_age,
            deliveries,
            commit_seconds,
            clock_lag,
            lateness: Default::default(),
            engine_clock,
            rules_reloads,
            rules_loaded_at,
            step_latency,
            ready,
            kafka_lag,
            kafka_committed,
            kafka_errors,
            kafka_rebalances,
            kafka_assigned,
            kafka_up,
        }
    }

    /// The Prometheus text exposition of everything registered.
    pub fn render(&self) -> String {
        // At each scrape, not at each commit: a clock that stopped moving (no events, no
        // idle fallback, a source holding it) commits nothing, and the lag must grow.
        let clock = self.engine_clock.get();
        if clock != 0.0 {
            let could = crate::daemon::core::wall_nanos()
                .saturating_sub(self.lateness.load(std::sync::atomic::Ordering::Relaxed));
            self.clock_lag.set(could as f64 / 1e9 - clock);
        }
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Metrics {
    /// Fits the series to the config: the counters alerting rules watch with `increase()`
    /// exist at 0 from the start (a series born at 1 shows no increase, so the first given-up
    /// delivery or failed reload would not alert), and the Kafka gauges are left out without
    /// Kafka sources (a `sagawatch_kafka_up 0` there would read as an outage).
    pub fn prepare(&self, cfg: &crate::config::Config) {
        self.lateness
            .store(cfg.time.lateness, std::sync::atomic::Ordering::Relaxed);
        for result in ["success", "failure"] {
            self.rules_reloads.with_label_values(&[result]);
        }
        for s in &cfg.sinks {
            for result in ["delivered", "retry", "given_up"] {
                self.deliveries.with_label_values(&[&s.name, result]);
            }
        }
        // Alerts watch it with increase(): a series born at 1 would show no increase.
        if cfg.time.max_ahead.is_some() {
            for s in &cfg.sources {
                self.events_ahead.with_label_values(&[&s.name]);
            }
        }
        let kafka = cfg
            .sources
            .iter()
            .any(|s| matches!(s.kind, crate::config::SourceKind::Kafka { .. }));
        if !kafka {
            let _ = self.registry.unregister(Box::new(self.kafka_up.clone()));
            let _ = self
                .registry
                .unregister(Box::new(self.kafka_assigned.clone()));
        }
    }

    /// Creates every step's outcome counters at 0: alerts compare `rate()` with an
    /// earlier baseline, which a series born at its first missing step would lack.
    pub fn prepare_rules(&self, rules: &crate::rules::RuleSet) {
        for rule in &rules.rules {
            for step in &rule.steps {
                for outcome in ["satisfied", "missing", "late"] {
                    self.steps
                        .with_label_values(&[&rule.name, &step.name, outcome]);
                }
            }
        }
    }

    /// Drops the series of rules and steps the new set no longer has, so a dashboard
    /// does not show them at their last values for as long as the process lives.
    pub fn forget_rules(&self, old: &crate::rules::RuleSet, new: &crate::rules::RuleSet) {
        for rule in &old.rules {
            let kept = new.rules.iter().find(|r| r.name == rule.name);
            for step in &rule.steps {
                if kept.is_some_and(|k| k.steps.iter().any(|s| s.name == step.name)) {
                    continue;
                }
                for outcome in ["satisfied", "missing", "late"] {
                    let _ = self
                        .steps
                        .remove_label_values(&[&rule.name, &step.name, outcome]);
                }
                let _ = self
                    .step_latency
                    .remove_label_values(&[&rule.name, &step.name]);
            }
            if kept.is_some() {
                continue;
            }
            let name = rule.name.as_str();
            let _ = self.open_instances.remove_label_values(&[name]);
            let _ = self.instances_opened.remove_label_values(&[name]);
            for how in ["finished", "cancelled"] {
                let _ = self.instances_closed.remove_label_values(&[name, how]);
            }
            for kind in crate::engine::Kind::NAMES {
                let _ = self.outcomes.remove_label_values(&[name, kind]);
            }
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The process metrics of the `prometheus` crate, with `process_cpu_seconds_total` in
/// clock ticks rather than whole seconds (the crate truncates it: a daemon using a tenth
/// of a core read 0 for its first ten seconds, and `rate()` moved in steps of 1).
#[cfg(target_os = "linux")]
struct ProcessMetrics(prometheus::process_collector::ProcessCollector);

#[cfg(target_os = "linux")]
impl prometheus::core::Collector for ProcessMetrics {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let mut mfs = self.0.collect();
        if let Some(secs) = cpu_seconds() {
            for mf in &mut mfs {
                if mf.name() == "process_cpu_seconds_total" {
                    for m in mf.mut_metric() {
                        let mut c = prometheus::proto::Counter::default();
                        c.set_value(secs);
                        m.set_counter(c);
                    }
                }
            }
        }
        mfs
    }
}

/// User plus system CPU time of this process, from `/proc/self/stat`.
#[cfg(target_os = "linux")]
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    cpu_seconds_of(&stat, auxv_clock_ticks().unwrap_or(100))
}

/// utime + stime of a `/proc/PID/stat` line, in seconds at `hz` ticks per second.
#[cfg(target_os = "linux")]
fn cpu_seconds_of(stat: &str, hz: u64) -> Option<f64> {
    // Fields after the command name (which may hold spaces and parentheses), from the
    // state (field 3): utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace().skip(11);
    let ticks = f.next()?.parse::<u64>().ok()? + f.next()?.parse::<u64>().ok()?;
    Some(ticks as f64 / hz.max(1) as f64)
}

/// Clock ticks per second (what `sysconf(_SC_CLK_TCK)` answers), from the kernel's
/// auxiliary vector (`AT_CLKTCK`).
#[cfg(target_os = "linux")]
fn auxv_clock_ticks() -> Option<u64> {
    const AT_CLKTCK: u64 = 17;
    let word = |b: &[u8]| u64::from_ne_bytes(b.try_into().unwrap_or_default());
    std::fs::read("/proc/self/auxv")
        .ok()?
        .chunks_exact(16)
        .find(|e| word(&e[..8]) == AT_CLKTCK)
        .map(|e| word(&e[8..]))
        .filter(|&hz| hz > 0)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[test]
    fn cpu_seconds_count_ticks_not_whole_seconds() {
        let stat = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 123 45 0 0 20 0 9 0";
        assert_eq!(super::cpu_seconds_of(stat, 100), Some(1.68));
        assert!(super::auxv_clock_ticks().is_some_and(|hz| hz > 0));
        use prometheus::core::Collector;
        let pc = super::ProcessMetrics(prometheus::process_collector::ProcessCollector::for_self());
        let mfs = pc.collect();
        let reported = mfs
            .iter()
            .find(|m| m.name() == "process_cpu_seconds_total")
            .map(|m| m.get_metric()[0].get_counter().get_value())
            .unwrap();
        let now = super::cpu_seconds().unwrap();
        assert!(reported <= now && now - reported < 0.5, "{reported} {now}");
    }
}
