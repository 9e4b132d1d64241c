//! The outbox table: every alert, resolve and compensation is inserted in the transaction
//! that decided it and leaves only when a sink acknowledged it (or it is given up, which
//! is logged and counted). Also the table of firing alerts, for resends and resolves.

use anyhow::Result;
use rusqlite::{Connection, OptionalExtension, params};

/// A message to enqueue.
#[derive(Clone, Debug)]
pub struct NewMessage<'a> {
    /// Stable id receivers dedupe on (the action id; `…-resolved` for a resolve).
    pub id: &'a str,
    pub sink: &'a str,
    /// `alert`, `resolve` or `compensate`.
    pub kind: &'a str,
    pub rule: &'a str,
    pub key: &'a str,
    pub step: &'a str,
    pub body: &'a str,
    /// The Alertmanager label set of an alert or resolve for an Alertmanager sink.
    pub fp: Option<&'a str>,
    /// The instance's trigger time (engine nanos): one instance's messages keep their
    /// order, other instances of the key do not wait for them.
    pub opened: Option<i64>,
}

/// A message waiting for delivery.
#[derive(Clone, Debug)]
pub struct Pending {
    pub seq: i64,
    pub id: String,
    pub sink: String,
    pub kind: String,
    pub body: String,
    pub attempts: i64,
    pub created_ms: i64,
    pub rule: String,
    /// The correlation key (the Kafka message key of a command).
    pub key: String,
    pub step: String,
    /// An Alertmanager alert's or resolve's label set.
    pub fp: Option<String>,
    /// When it is (or was) due.
    pub next_ms: i64,
    /// Its instance's trigger time; `None` if written by a version that did not record it.
    pub opened: Option<i64>,
}

fn pending_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Pending> {
    Ok(Pending {
        seq: r.get(0)?,
        id: r.get(1)?,
        sink: r.get(2)?,
        kind: r.get(3)?,
        body: r.get(4)?,
        attempts: r.get(5)?,
        created_ms: r.get(6)?,
        rule: r.get(7)?,
        key: r.get(8)?,
        step: r.get(9)?,
        fp: r.get(10)?,
        next_ms: r.get(11)?,
        opened: r.get(12)?,
    })
}

/// The result of one delivery attempt.
#[derive(Clone, Debug)]
pub enum Delivery {
    Delivered,
    Retry { next_ms: i64, error: String },
    GiveUp { error: String },
}

/// A firing alert as sent to one sink.
#[derive(Clone, Debug)]
pub struct AlertRow {
    pub id: String,
    pub sink: String,
    pub rule: String,
    pub key: String,
    pub step: String,
    pub body: String,
    /// Engine clock (ms) after which no late correlate can resolve it: its step's deadline
    /// plus the rule's `late`.
    pub active_until_ms: i64,
    /// The Alertmanager label set, for Alertmanager sinks.
    pub fp: Option<String>,
    /// Its instance's trigger time; `None` if written by a version that did not record it.
    pub opened: Option<i64>,
}

#[derive(Clone, Debug, Default)]
pub struct OutboxStats {
    /// (sink, pending messages).
    pub pending: Vec<(String, i64)>,
    /// (sink, when its oldest pending message was written, wall ms).
    pub oldest: Vec<(String, i64)>,
}

/// Outbox operations on a connection (inside the caller's transaction, if any).
pub struct Outbox;

impl Outbox {
    pub fn insert(conn: &Connection, m: &NewMessage<'_>, now_ms: i64) -> Result<()> {
        conn.prepare_cached(
            "INSERT INTO outbox
             (id, sink, kind, rule, key, step, body, created_ms, next_ms, fp, opened)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?9, ?10)",
        )?
        .execute(params![
            m.id, m.sink, m.kind, m.rule, m.key, m.step, m.body, now_ms, m.fp, m.opened
        ])?;
        Ok(())
    }

    /// Up to `limit` messages for `sink` due at `now_ms`, oldest first.
    pub fn due_for(
        conn: &Connection,
        sink: &str,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<Pending>> {
        let mut stmt = conn.prepare_cached(
            "SELECT seq, id, sink, kind, body, attempts, created_ms, rule, key, step, fp, next_ms,
                    opened
             FROM outbox INDEXED BY outbox_due
             WHERE state = 0 AND sink = ?1 AND next_ms <= ?2 ORDER BY next_ms, seq LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![sink, now_ms, limit as i64], pending_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The oldest pending message of `p`'s instance step to `p`'s sink (`p` itself, or one
    /// waiting for a retry that `p` must not overtake).
    pub fn lane_head(conn: &Connection, p: &Pending) -> Result<Option<Pending>> {
        Ok(conn
            .prepare_cached(
                "SELECT seq, id, sink, kind, body, attempts, created_ms, rule, key, step, fp,
                        next_ms, opened
                 FROM outbox INDEXED BY outbox_instance
                 WHERE rule = ?1 AND key = ?2 AND state = 0 AND sink = ?3 AND step = ?4
                   AND opened IS ?6 AND seq <= ?5
                 ORDER BY seq LIMIT 1",
            )?
            .query_row(
                params![p.rule, p.key, p.sink, p.step, p.seq, p.opened],
                pending_row,
            )
            .optional()?)
    }

    /// When the next pending message not yet due at `now_ms` becomes due, if any.
    pub fn next_due_after_ms(conn: &Connection, now_ms: i64) -> Result<Option<i64>> {
        Ok(conn
            .prepare_cached("SELECT MIN(next_ms) FROM outbox WHERE state = 0 AND next_ms > ?1")?
            .query_row([now_ms], |r| r.get(0))?)
    }

    /// Makes a pending message due no sooner than `until_ms` (one held behind an older
    /// message of its lane that waits for a retry until then).
    pub fn defer(conn: &Connection, seq: i64, until_ms: i64) -> Result<()> {
        conn.prepare_cached(
            "UPDATE outbox SET next_ms = ?2 WHERE seq = ?1 AND state = 0 AND next_ms < ?2",
        )?
        .execute(params![seq, until_ms])?;
        Ok(())
    }

    pub fn record(conn: &Connection, seq: i64, result: &Delivery, now_ms: i64) -> Result<()> {
        match result {
            Delivery::Delivered => conn
                .prepare_cached(
                    "UPDATE outbox SET state = 1, attempts = attempts + 1, done_ms = ?2,
                     last_error = NULL WHERE seq = ?1",
                )?
                .execute(params![seq, now_ms])?,
            Delivery::Retry { next_ms, error } => conn
                .prepare_cached(
                    "UPDATE outbox SET attempts = attempts + 1, next_ms = ?2, last_error = ?3
                     WHERE seq = ?1 AND state = 0",
                )?
                .execute(params![seq, next_ms, error])?,
            Delivery::GiveUp { error } => conn
                .prepare_cached(
                    "UPDATE outbox SET state = 2, attempts = attempts + 1, done_ms = ?2,
                     last_error = ?3 WHERE seq = ?1 AND state = 0",
                )?
                .execute(params![seq, now_ms, error])?,
        };
        Ok(())
    }

    pub fn stats(conn: &Connection) -> Result<OutboxStats> {
        // From the index alone (seq is in every index, and follows created_ms): reading
        // created_ms here would read every pending row, bodies and all.
        let mut stmt = conn.prepare_cached(
            "SELECT sink, COUNT(*), MIN(seq) FROM outbox WHERE state = 0 GROUP BY sink",
        )?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get(1)?, r.get::<_, i64>(2)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let mut created = conn.prepare_cached("SELECT created_ms FROM outbox WHERE seq = ?1")?;
        let mut oldest = Vec::with_capacity(rows.len());
        for (sink, _, seq) in &rows {
            oldest.push((sink.clone(), created.query_row(params![seq], |r| r.get(0))?));
        }
        Ok(OutboxStats {
            pending: rows.into_iter().map(|(s, n, _)| (s, n)).collect(),
            oldest,
        })
    }

    /// Forgets at most `limit` delivered and given-up messages finished before `before_ms`
    /// (those finished first; read from the `outbox_done` index); returns how many.
    pub fn purge_done(conn: &Connection, before_ms: i64, limit: usize) -> Result<usize> {
        Ok(conn
            .prepare_cached(
                "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox
                 WHERE state != 0 AND done_ms < ?1 ORDER BY done_ms LIMIT ?2)",
            )?
            .execute(params![before_ms, limit as i64])?)
    }

    /// The engine clock last committed, in ms (`i64::MIN` before any): what alerts'
    /// `active_until_ms` (a step's deadline plus its rule's `late`) is measured against.
    pub fn clock_ms(conn: &Connection) -> Result<i64> {
        let nanos: Option<i64> = conn
            .prepare_cached("SELECT v FROM meta WHERE k = 'clock.now'")?
            .query_row([], |r| r.get(0))
            .optional()?;
        Ok(nanos.map_or(i64::MIN, |n| n.div_euclid(1_000_000)))
    }

    /// Forgets alerts no late correlate can resolve any more, the engine clock (`clock_ms`)
    /// being past their deadline plus `late` (for every sink: only Alertmanager's re-sends
    /// read them, but alerts to any sink are recorded).
    /// At most `limit` of them (a mass expiry's alerts end together): returns how many.
    pub fn purge_alerts(conn: &Connection, clock_ms: i64, limit: usize) -> Result<usize> {
        Ok(conn
            .prepare_cached(
                "DELETE FROM alerts WHERE (rule, key, step, sink, id) IN
                 (SELECT rule, key, step, sink, id FROM alerts INDEXED BY alerts_active
                  WHERE active_until_ms < ?1 LIMIT ?2)",
            )?
            .execute(params![clock_ms, limit as i64])?)
    }

    pub fn record_alert(conn: &Connection, a: &AlertRow) -> Result<()> {
        conn.prepare_cached(
            "INSERT OR REPLACE INTO alerts
             (id, sink, rule, key, step, body, active_until_ms, fp, opened)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?
        .execute(params![
            a.id,
            a.sink,
            a.rule,
            a.key,
            a.step,
            a.body,
            a.active_until_ms,
            a.fp,
            a.opened
        ])?;
        Ok(())
    }

    /// Removes and returns the firing alerts of (rule, key, step) of the instance opened
    /// at `opened` (and those written before instances were recorded): a late correlate
    /// ends its own instance's alert, not an earlier instance's of the key still firing.
    pub fn take_alerts(
        conn: &Connection,
        rule: &str,
        key: &str,
        step: &str,
        opened: i64,
    ) -> Result<Vec<AlertRow>> {
        let rows = {
            let mut stmt = conn.prepare_cached(
                "SELECT id, sink, body, active_until_ms, fp, opened FROM alerts
                 WHERE rule = ?1 AND key = ?2 AND step = ?3 AND (opened = ?4 OR opened IS NULL)",
            )?;
            stmt.query_map(params![rule, key, step, opened], |r| {
                Ok(AlertRow {
                    id: r.get(0)?,
                    sink: r.get(1)?,
                    rule: rule.to_string(),
                    key: key.to_string(),
                    step: step.to_string(),
                    body: r.get(2)?,
                    active_until_ms: r.get(3)?,
                    fp: r.get(4)?,
                    opened: r.get(5)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?
        };
        if !rows.is_empty() {
            conn.prepare_cached(
                "DELETE FROM alerts
                 WHERE rule = ?1 AND key = ?2 AND step = ?3 AND (opened = ?4 OR opened IS NULL)",
            )?
            .execute(params![rule, key, step, opened])?;
        }
        Ok(rows)
    }

    /// Marks a firing alert still waiting for delivery as superseded by its resolve, so it
    /// cannot reach the sink after the resolve and fire the alert again.
    pub fn supersede(conn: &Connection, id: &str, sink: &str, now_ms: i64) -> Result<usize> {
        Ok(conn
            .prepare_cached(
                "UPDATE outbox SET state = 3, done_ms = ?3, last_error = 'superseded by its resolve'
                 WHERE id = ?1 AND sink = ?2 AND kind = 'alert' AND state = 0",
            )?
            .execute(params![id, sink, now_ms])?)
    }

    /// Whether an alert of (sink, rule, step) with label set `fp` still fires at engine
    /// clock `now_ms`.
    pub fn labels_firing(
        conn: &Connection,
        sink: &str,
        rule: &str,
        step: &str,
        fp: &str,
        now_ms: i64,
    ) -> Result<bool> {
        Ok(conn
            .prepare_cached(
                // Without statistics the planner prefers the primary key's `rule` prefix,
                // which scans every alert of the rule.
                "SELECT EXISTS (SELECT 1 FROM alerts INDEXED BY alerts_labels
                 WHERE sink = ?1 AND rule = ?2 AND step = ?3 AND fp = ?4
                 AND active_until_ms >= ?5)",
            )?
            .query_row(params![sink, rule, step, fp, now_ms], |r| r.get(0))?)
    }

    /// Marks the pending resolves of (sink, rule, step) with label set `fp` superseded by a
    /// new firing alert with the same labels: delivered after it, they would end it.
    pub fn supersede_resolves(
        conn: &Connection,
        sink: &str,
        rule: &str,
        step: &str,
        fp: &str,
        now_ms: i64,
    ) -> Result<usize> {
        Ok(conn
            .prepare_cached(
                "UPDATE outbox SET state = 3, done_ms = ?5,
                 last_error = 'superseded by a new alert with the same labels'
                 WHERE state = 0 AND kind = 'resolve' AND sink = ?1 AND rule = ?2 AND step = ?3
                 AND fp = ?4",
            )?
            .execute(params![sink, rule, step, fp, now_ms])?)
    }

    /// Calls `f` with each firing alert of `sink` (for periodic re-sends) whose late window
    /// is not over at engine clock `clock_ms`, one row at a time (a mass expiry leaves a
    /// million). Reads only: the purge of the others takes its turn at writing.
    pub fn for_each_active(
        conn: &Connection,
        sink: &str,
        clock_ms: i64,
        mut f: impl FnMut(AlertRow),
    ) -> Result<()> {
        let mut stmt = conn.prepare_cached(
            "SELECT id, rule, key, step, body, active_until_ms, fp, opened FROM alerts
             WHERE sink = ?1 AND active_until_ms >= ?2",
        )?;
        let rows = stmt.query_map(params![sink, clock_ms], |r| {
            Ok(AlertRow {
                id: r.get(0)?,
                sink: sink.to_string(),
                rule: r.get(1)?,
                key: r.get(2)?,
                step: r.get(3)?,
                body: r.get(4)?,
                active_until_ms: r.get(5)?,
                fp: r.get(6)?,
                opened: r.get(7)?,
            })
        })?;
        for row in rows {
            f(row?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Alerts past their late window are forgotten a chunk at a time; the others stay.
    #[test]
    fn purge_alerts_forgets_a_chunk_of_those_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let mut conn = super::super::open(&path).unwrap();
        super::super::migrate(&mut conn, &path).unwrap();
        for (i, until) in [10, 20, 30, 40, 50].into_iter().enumerate() {
            let a = AlertRow {
                id: format!("a{i}"),
                sink: "s".into(),
                rule: "r".into(),
                key: format!("k{i}"),
                step: "x".into(),
                body: "{}".into(),
                active_until_ms: until,
                fp: None,
                opened: Some(0),
            };
            Outbox::record_alert(&conn, &a).unwrap();
        }
        assert_eq!(Outbox::purge_alerts(&conn, 35, 2).unwrap(), 2);
        assert_eq!(Outbox::purge_alerts(&conn, 35, 2).unwrap(), 1);
        assert_eq!(Outbox::purge_alerts(&conn, 35, 2).unwrap(), 0);
        let left: Vec<String> = conn
            .prepare("SELECT id FROM alerts ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(left, ["a3", "a4"]);
    }

    /// Finished messages are forgotten a chunk at a time, oldest first; pending ones and
    /// those finished later stay.
    #[test]
    fn purge_done_forgets_a_chunk_of_the_oldest_finished() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let mut conn = super::super::open(&path).unwrap();
        super::super::migrate(&mut conn, &path).unwrap();
        let id: Vec<String> = (0..6).map(|i| format!("m{i}")).collect();
        for i in &id {
            let m = NewMessage {
                id: i,
                sink: "s",
                kind: "alert",
                rule: "r",
                key: "k",
                step: "x",
                body: "{}",
                fp: None,
                opened: Some(0),
            };
            Outbox::insert(&conn, &m, 0).unwrap();
        }
        // m0..m3 delivered at 10, 20, 30, 40; m4 at 1000; m5 pending.
        for (seq, done) in [(1, 10), (2, 20), (3, 30), (4, 40), (5, 1000)] {
            conn.execute(
                "UPDATE outbox SET state = 1, done_ms = ?2 WHERE seq = ?1",
                params![seq, done],
            )
            .unwrap();
        }
        let left = |c: &Connection| -> Vec<String> {
            c.prepare("SELECT id FROM outbox ORDER BY seq")
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .map(Result::unwrap)
                .collect()
        };
        assert_eq!(Outbox::purge_done(&conn, 500, 3).unwrap(), 3);
        assert_eq!(left(&conn), ["m3", "m4", "m5"]);
        assert_eq!(Outbox::purge_done(&conn, 500, 3).unwrap(), 1);
        assert_eq!(left(&conn), ["m4", "m5"]);
        assert_eq!(Outbox::purge_done(&conn, 500, 3).unwrap(), 0);
    }
}
