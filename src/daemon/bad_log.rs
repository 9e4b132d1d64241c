//! A rate limit for warnings that come in floods, so that a source of garbage or a dead
//! receiver with a large backlog cannot fill the log: each source (or sink) logs at most
//! `BURST` of them in a `WINDOW`, and one line when the window ends says how many more
//! there were (each is still counted in its metric: `sagawatch_events_rejected_total`,
//! `sagawatch_deliveries_total`).

use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bad lines each source may log in one window.
const BURST: u32 = 10;
const WINDOW: Duration = Duration::from_secs(10);

pub struct BadLog {
    /// What the lines are, for the summary: "lines that are not events", say.
    what: &'static str,
    /// Whether the names are sinks' (else sources').
    sinks: bool,
    since: Instant,
    /// (source, logged, not logged) in this window.
    by_source: Vec<(Arc<str>, u32, u64)>,
}

/// The last window's count is not lost when a source or the core stops.
impl Drop for BadLog {
    fn drop(&mut self) {
        self.flush(true);
    }
}

impl BadLog {
    pub fn new(what: &'static str) -> BadLog {
        BadLog {
            what,
            sinks: false,
            since: Instant::now(),
            by_source: Vec::new(),
        }
    }

    /// The same, for warnings about sinks.
    pub fn for_sinks(what: &'static str) -> BadLog {
        let mut log = BadLog::new(what);
        log.sinks = true;
        log
    }

    /// Whether a bad line of `source` may be logged now; counts it if not.
    pub fn allow(&mut self, source: &str) -> bool {
        self.flush(false);
        if self.by_source.is_empty() {
            // The first bad line after a quiet time opens a window.
            self.since = Instant::now();
        }
        let i = match self.by_source.iter().position(|s| &*s.0 == source) {
            Some(i) => i,
            None => {
                self.by_source.push((Arc::from(source), 0, 0));
                self.by_source.len() - 1
            }
        };
        let s = &mut self.by_source[i];
        if s.1 < BURST {
            s.1 += 1;
            true
        } else {
            s.2 += 1;
            false
        }
    }

    /// Ends the window if it is over, or if `now` (at shutdown, at the end of the input):
    /// logs how many bad lines of each source went unlogged.
    pub fn flush(&mut self, now: bool) {
        if self.by_source.is_empty() || !(now || self.since.elapsed() >= WINDOW) {
            return;
        }
        let secs = self.since.elapsed().as_secs();
        for (source, _, skipped) in self.by_source.drain(..) {
            if skipped == 0 {
                continue;
            }
            let what = self.what;
            if self.sinks {
                tracing::warn!(
                    sink = &*source,
                    not_logged = skipped,
                    "{skipped} more {what} in the last {secs}s, not logged each"
                );
            } else {
                tracing::warn!(
                    source = &*source,
                    not_logged = skipped,
                    "skipped {skipped} more {what} in the last {secs}s without logging each"
                );
            }
        }
        self.since = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_source_logs_a_burst_per_window() {
        let mut log = BadLog::new("bad lines");
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        let allowed = (0..25).filter(|_| log.allow(&a)).count();
        assert_eq!(allowed, BURST as usize);
        assert!(log.allow(&b), "another source has a burst of its own");
        assert_eq!(log.by_source[0].2, 15);
        log.flush(true);
        assert!(log.by_source.is_empty());
        assert!(log.allow(&a), "a new window starts after the flush");
    }
}
