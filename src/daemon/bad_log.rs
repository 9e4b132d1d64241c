//! A rate limit for the warnings about bad input lines, so that a source of garbage cannot
//! flood the log: each source logs at most `BURST` bad lines in a `WINDOW`, and one line
//! when the window ends says how many more there were (every bad line is still counted in
//! `sagawatch_events_rejected_total`).

use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bad lines each source may log in one window.
const BURST: u32 = 10;
const WINDOW: Duration = Duration::from_secs(10);

pub struct BadLog {
    /// What the lines are, for the summary: "lines that are not events", say.
    what: &'static str,
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
            since: Instant::now(),
            by_source: Vec::new(),
        }
    }

    /// Whether a bad line of `source` may be logged now; counts it if not.
    pub fn allow(&mut self, source: &Arc<str>) -> bool {
        self.flush(false);
        if self.by_source.is_empty() {
            // The first bad line after a quiet time opens a window.
            self.since = Instant::now();
        }
        let i = match self.by_source.iter().position(|s| s.0 == *source) {
            Some(i) => i,
            None => {
                self.by_source.push((Arc::clone(source), 0, 0));
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
            if skipped > 0 {
                tracing::warn!(
                    source = &*source,
                    not_logged = skipped,
                    "skipped {skipped} more {} in the last {secs}s without logging each",
                    self.what
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
