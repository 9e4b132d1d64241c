//! The SQLite file that holds everything the daemon must not lose: open instances and
//! their deadlines, early correlates, cancels, the clock, source positions and the outbox.
//! One writer (the core thread) changes it in batch transactions; readers (the outbox
//! dispatcher, the HTTP API) use their own connections thanks to WAL.

mod outbox;
mod rows;
mod sqlite_state;

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration as StdDuration;

use anyhow::{Context, Result, bail};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

pub use outbox::{AlertRow, Delivery, NewMessage, Outbox, OutboxStats, Pending};
pub use sqlite_state::SqliteState;

/// The schema version this build writes (the number of migrations).
pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

/// Schema migrations, applied in order; `PRAGMA user_version` is the number applied.
const MIGRATIONS: &[&str] = &[
    // 1: initial schema.
    "
    CREATE TABLE meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL) WITHOUT ROWID;
    CREATE TABLE rule_shapes (rule TEXT PRIMARY KEY, steps TEXT NOT NULL) WITHOUT ROWID;
    CREATE TABLE instances (
        rule TEXT NOT NULL,
        key TEXT NOT NULL,
        opened_at INTEGER NOT NULL,
        closed_at INTEGER,
        expires_at INTEGER NOT NULL,
        next_deadline INTEGER,
        steps BLOB NOT NULL,
        captures TEXT NOT NULL,
        PRIMARY KEY (rule, key)
    ) WITHOUT ROWID;
    CREATE INDEX instances_deadline ON instances (next_deadline)
        WHERE next_deadline IS NOT NULL;
    CREATE INDEX instances_expiry ON instances (expires_at) WHERE closed_at IS NOT NULL;
    CREATE TABLE early (
        rule TEXT NOT NULL, key TEXT NOT NULL, step INTEGER NOT NULL,
        time INTEGER NOT NULL, expires INTEGER NOT NULL,
        PRIMARY KEY (rule, key, step)
    ) WITHOUT ROWID;
    CREATE INDEX early_expiry ON early (expires);
    CREATE TABLE cancels (
        rule TEXT NOT NULL, key TEXT NOT NULL, expires INTEGER NOT NULL,
        PRIMARY KEY (rule, key)
    ) WITHOUT ROWID;
    CREATE INDEX cancels_expiry ON cancels (expires);
    CREATE TABLE positions (
        source TEXT PRIMARY KEY, file_id TEXT NOT NULL, offset INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL,
        sink TEXT NOT NULL,
        kind TEXT NOT NULL,
        rule TEXT NOT NULL,
        key TEXT NOT NULL,
        step TEXT NOT NULL,
        body TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        next_ms INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        state INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        done_ms INTEGER
    );
    CREATE INDEX outbox_pending ON outbox (next_ms) WHERE state = 0;
    CREATE INDEX outbox_instance ON outbox (rule, key);
    CREATE TABLE alerts (
        id TEXT NOT NULL,
        sink TEXT NOT NULL,
        rule TEXT NOT NULL,
        key TEXT NOT NULL,
        step TEXT NOT NULL,
        body TEXT NOT NULL,
        active_until_ms INTEGER NOT NULL,
        PRIMARY KEY (rule, key, step, sink, id)
    ) WITHOUT ROWID;
    CREATE INDEX alerts_active ON alerts (active_until_ms);
    ",
    // 2: listing instances by status from indexes (the timeline API).
    "
    ALTER TABLE instances ADD COLUMN missing_at INTEGER;
    ALTER TABLE instances ADD COLUMN late_at INTEGER;
    CREATE INDEX instances_open ON instances (opened_at, rule, key) WHERE closed_at IS NULL;
    CREATE INDEX instances_missing ON instances (missing_at, rule, key) WHERE missing_at IS NOT NULL;
    CREATE INDEX instances_late ON instances (late_at, rule, key) WHERE late_at IS NOT NULL;
    ",
    // 3: the events behind a timeline: the trigger and each step's correlate, appended
    // to their own table (cheap inserts at the end of a B-tree) and referenced by seq.
    "
    CREATE TABLE events (seq INTEGER PRIMARY KEY, time INTEGER NOT NULL, text TEXT NOT NULL);
    ALTER TABLE instances ADD COLUMN refs BLOB;
    ALTER TABLE early ADD COLUMN event TEXT;
    ",
    // 4: the Kafka partition a row's events came from, so that each partition's state can
    // be told apart (and later moved between instances). NULL for other sources.
    "
    ALTER TABLE instances ADD COLUMN part INTEGER;
    ALTER TABLE early ADD COLUMN part INTEGER;
    ALTER TABLE cancels ADD COLUMN part INTEGER;
    ",
    // 5: Alertmanager label sets (canonical JSON), so "does another alert with these labels
    // still fire" is one index lookup, and a pending resolve can be found by its labels (as
    // a pending firing alert by its id): each is one lookup even when thousands wait.
    "
    ALTER TABLE alerts ADD COLUMN fp TEXT;
    CREATE INDEX alerts_labels ON alerts (sink, rule, step, fp);
    ALTER TABLE outbox ADD COLUMN fp TEXT;
    CREATE INDEX outbox_resolves ON outbox (sink, rule, step, fp)
        WHERE state = 0 AND kind = 'resolve';
    CREATE INDEX outbox_firing ON outbox (id, sink) WHERE state = 0 AND kind = 'alert';
    ",
    // 6: the open-instance listing reads an index of every row by opening time and skips
    // the closed ones. The partial index of open rows it replaces lost its entry when the
    // row closed: a write to a page long cold (the row opened hours before), the costliest
    // write of a close (about a sixth of the core thread's CPU in the checkout benchmark).
    "
    DROP INDEX instances_open;
    CREATE INDEX instances_opened ON instances (opened_at, rule, key);
    ",
    // 7: the dispatcher fetches due messages sink by sink, so that a hanging receiver's
    // backlog does not hide the messages of the others.
    "
    CREATE INDEX outbox_due ON outbox (sink, next_ms) WHERE state = 0;
    ",
    // 8: which rules the daemon runs now. A removed rule's shape and rows stay (it may
    // come back), but the rule listing shows only the loaded ones.
    "
    ALTER TABLE rule_shapes ADD COLUMN loaded INTEGER NOT NULL DEFAULT 1;
    ",
    // 9: the trigger fields a rule's stored captures hold, in order (a JSON array of dot
    // paths; NULL when written before this column: taken to be the rule's at the next
    // load). A reload whose templates read other fields re-captures the stored instances.
    "
    ALTER TABLE rule_shapes ADD COLUMN captures TEXT;
    ",
    // 10: the windows a rule's stored expiries were computed with (dedup, late, each
    // step's within; NULL when written before this column: taken to be the rule's at the
    // next load). A reload that widens them extends the stored expiries, so what is
    // remembered does not depend on whether a purge ran before the reload.
    "
    ALTER TABLE rule_shapes ADD COLUMN windows TEXT;
    ",
    // 11: each step's `after` (likewise): a reload that removes or changes one opens the
    // steps of stored instances that the new rules let open. And finished messages by
    // when they finished, so that purging them a chunk at a time reads only those.
    "
    ALTER TABLE rule_shapes ADD COLUMN afters TEXT;
    CREATE INDEX outbox_done ON outbox (done_ms) WHERE state != 0;
    ",
    // 12: the instance (its trigger time) an outbox message and a firing alert belong to:
    // messages wait for the older ones of their own instance only, so one a receiver keeps
    // refusing does not hold back a later instance of the same key (NULL: written before).
    "
    ALTER TABLE outbox ADD COLUMN opened INTEGER;
    ALTER TABLE alerts ADD COLUMN opened INTEGER;
    ",
];

/// Takes the state file for this process: an exclusive lock on `<state>.lock` beside it,
/// held while the returned file is open. A second daemon on the same state would break the
/// single-writer rule (each believes its own counts and positions), so it is refused.
pub fn lock(path: &Path) -> Result<std::fs::File> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = std::path::PathBuf::from(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::PermissionDenied if !lock_path.exists() => anyhow::anyhow!(
                "state file {}: its directory is not writable by this user (the lock file {} \
                 is created there, and SQLite's -wal and -shm files)",
                path.display(),
                lock_path.display()
            ),
            _ => anyhow::Error::new(e).context(format!(
                "state file {}: cannot open its lock file {}",
                path.display(),
                lock_path.display()
            )),
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "state file {}: in use by another sagawatch ({} is locked)",
            path.display(),
            lock_path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("state file {}: cannot lock", path.display()))
        }
    }
}

/// The state path is usable: its directory exists, and it is a regular file if it exists.
pub fn check_path(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.is_dir()
    {
        let what = if dir.exists() {
            "is not a directory"
        } else {
            "does not exist"
        };
        bail!(
            "state file {}: directory {} {what}",
            path.display(),
            dir.display()
        );
    }
    // SQLite would "open" a device or a directory and fail later with a bare I/O error (and
    // put its journal beside it, in /dev say).
    if let Ok(meta) = std::fs::metadata(path)
        && !meta.is_file()
    {
        bail!("state file {}: not a regular file", path.display());
    }
    Ok(())
}

/// Turns between the daemon's two writers, the core (a transaction per batch, the next
/// begun right after a commit) and the outbox dispatcher (short ones recording deliveries).
/// SQLite's busy handler polls with sleeps, so a writer waiting for the core almost never
/// hits the moment between two batches: it starved for as long as intake went on (alerts
/// recorded minutes late, or after the busy timeout not at all, and sent again). Here a
/// waiting dispatcher goes first at the core's next batch.
#[derive(Default)]
pub struct WriteGate {
    state: std::sync::Mutex<GateState>,
    turn: std::sync::Condvar,
}

#[derive(Default)]
struct GateState {
    held: bool,
    waiting: usize,
}

/// The longest the gate is waited for: past it, SQLite's own locking decides (a writer
/// stuck in its transaction must not stop the other for good).
const GATE_WAIT: StdDuration = StdDuration::from_secs(30);

impl WriteGate {
    /// Waits for a turn; false when `GATE_WAIT` passed first (then the turn is not taken,
    /// and SQLite's locking decides).
    fn wait(&self, mut until_free: impl FnMut(&GateState) -> bool, waiting: bool) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if waiting {
            s.waiting += 1;
        }
        let deadline = std::time::Instant::now() + GATE_WAIT;
        let mut free = until_free(&s);
        while !free {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            s = self
                .turn
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            free = until_free(&s);
        }
        if waiting {
            s.waiting -= 1;
        }
        if free {
            s.held = true;
        }
        free
    }

    /// The core, before a batch's transaction: after any writer waiting for its turn.
    /// Whether the turn was taken (to be ended with [`leave`](Self::leave)).
    pub fn enter_core(&self) -> bool {
        self.wait(|s| !s.held && s.waiting == 0, false)
    }

    /// Any other writer, before its transaction: waits for the core's commit. The turn
    /// ends when the guard is dropped.
    pub fn enter(&self) -> GateGuard<'_> {
        let took = self.wait(|s| !s.held, true);
        GateGuard(took.then_some(self))
    }

    /// A standing request for a turn, for a writer that must not block while it waits
    /// (see [`Want::take_within`]): the core lets it go first from its next batch on, for
    /// as long as the request stands.
    pub fn want(&self) -> Want<'_> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).waiting += 1;
        Want {
            gate: self,
            since: std::time::Instant::now(),
        }
    }

    /// Ends the holder's turn.
    pub fn leave(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).held = false;
        self.turn.notify_all();
    }
}

/// See [`WriteGate::want`]; withdrawn on drop.
pub struct Want<'a> {
    gate: &'a WriteGate,
    since: std::time::Instant,
}

impl<'a> Want<'a> {
    /// The turn, if it comes within `d`; past `GATE_WAIT` since the request, a turn still
    /// held is not waited for (a guard without a turn: SQLite's locking decides, as for
    /// [`WriteGate::enter`]).
    pub fn take_within(&self, d: StdDuration) -> Option<GateGuard<'a>> {
        let g = self.gate;
        let mut s = g.state.lock().unwrap_or_else(|e| e.into_inner());
        let deadline = std::time::Instant::now() + d;
        while s.held {
            if self.since.elapsed() >= GATE_WAIT {
                return Some(GateGuard(None));
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            s = g
                .turn
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        s.held = true;
        Some(GateGuard(Some(g)))
    }
}

impl Drop for Want<'_> {
    fn drop(&mut self) {
        let mut s = self.gate.state.lock().unwrap_or_else(|e| e.into_inner());
        s.waiting = s.waiting.saturating_sub(1);
        drop(s);
        self.gate.turn.notify_all();
    }
}

/// A turn at the [`WriteGate`] (none if the wait timed out), ended on drop.
pub struct GateGuard<'a>(Option<&'a WriteGate>);

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        if let Some(g) = self.0 {
            g.leave();
        }
    }
}

/// How long a connection waits for a lock another one holds before SQLITE_BUSY.
pub const BUSY_TIMEOUT: StdDuration = StdDuration::from_secs(10);

/// A failure of the first reads of a state file: "not a usable SQLite file" only when
/// SQLite says the bytes are not a database, or a damaged one; otherwise (a full disk, no
/// file descriptors left, a read-only file system) what happened.
fn unusable(path: &Path, e: rusqlite::Error) -> anyhow::Error {
    let what = match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt) => {
            "not a usable SQLite file"
        }
        _ => "cannot read",
    };
    anyhow::Error::new(e).context(format!("state file {}: {what}", path.display()))
}

/// Refuses an existing state file, `-wal` or `-shm` file this user may not write, before
/// SQLite opens it: SQLite would open it read-only, and read it, creating a `-wal` and a
/// `-shm` with the file's read-only mode that a later start refuses even once the state
/// file itself is writable again.
fn require_write_access(path: &Path) -> Result<()> {
    for (p, what) in [
        (path.to_path_buf(), String::new()),
        (sidecar(path, "-wal"), " (its write-ahead log)".to_string()),
        (
            sidecar(path, "-shm"),
            " (its shared-memory index)".to_string(),
        ),
    ] {
        // access(2), not an open: closing any descriptor of a file drops every POSIX lock
        // the process holds on it, SQLite's own included (this runs for each connection,
        // while the daemon's first one holds its locks).
        match rustix::fs::access(&p, rustix::fs::Access::WRITE_OK) {
            Ok(()) => {}
            Err(rustix::io::Errno::NOENT) => {}
            Err(rustix::io::Errno::ACCESS | rustix::io::Errno::PERM) => {
                if p == path {
                    bail!(
                        "state file {}: not writable by this user (read-only)",
                        path.display()
                    );
                }
                bail!(
                    "state file {}: {}{what} is not writable by this user; give it the state \
                     file's owner and mode, or remove it while no sagawatch runs",
                    path.display(),
                    p.display()
                );
            }
            // A read-only file system, say: SQLite's open says what is wrong.
            Err(_) => {}
        }
    }
    // SQLite creates the `-wal` and `-shm` files beside the state file when they are not
    // there: it would fail with "attempt to write a readonly database", which names
    // neither the directory nor what it needs there.
    if !sidecar(path, "-wal").exists() || !sidecar(path, "-shm").exists() {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if let Err(rustix::io::Errno::ACCESS | rustix::io::Errno::PERM) =
            rustix::fs::access(dir, rustix::fs::Access::WRITE_OK)
        {
            bail!(
                "state file {}: its directory {} is not writable by this user (SQLite \
                 creates the state file's -wal and -shm files there)",
                path.display(),
                dir.display()
            );
        }
    }
    Ok(())
}

/// Opens (creating if needed) the state file with the settings every connection uses.
pub fn open(path: &Path) -> Result<Connection> {
    open_as(path, true)
}

fn open_as(path: &Path, create: bool) -> Result<Connection> {
    check_path(path)?;
    // The state holds every event's contents and the outbox bodies: a new file is for its
    // owner only, whatever the umask (SQLite gives `-wal` and `-shm` the database file's
    // mode). An existing file keeps the mode it was given.
    if create {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(_) => {}
            // A symbolic link to a file not there yet: that file is created, for its owner
            // only too (SQLite would create it with the umask's mode).
            // (Without O_EXCL the open follows the links, however many, to the file.)
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && !path.exists() => {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .mode(0o600)
                    .open(path)
                    .with_context(|| {
                        format!(
                            "state file {}: cannot create the file it links to",
                            path.display()
                        )
                    })?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => require_write_access(path)?,
            // It exists (a read-only file system says so first): SQLite's open says what is
            // wrong.
            Err(_) if path.exists() => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("state file {}: cannot create", path.display()));
            }
        }
    }
    // Without CREATE for the daemon's other connections: a file deleted since (even
    // between a look and this open) is an error, not created again empty.
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let conn = Connection::open_with_flags(path, flags)
        .with_context(|| format!("state file {}: cannot open", path.display()))?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // Room for the writer's statements, including one UPDATE per changed-column set.
    conn.set_prepared_statement_cache_capacity(64);
    let unusable = |e: rusqlite::Error| unusable(path, e);
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(unusable)?;
    if version == 0 {
        // A new file is empty; another program's database is not ours to change (not even
        // to WAL mode).
        let tables: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name LIMIT 3")
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .map_err(unusable)?;
        if !tables.is_empty() {
            bail!(
                "state file {}: not a sagawatch state file (it holds other tables: {})",
                path.display(),
                tables.join(", ")
            );
        }
    }
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(unusable)?;
    if !mode.eq_ignore_ascii_case("wal") {
        bail!(
            "state file {}: cannot switch to WAL mode (got {mode})",
            path.display()
        );
    }
    // The WAL file keeps up to 512 MiB after a restart instead of being cut back: a WAL
    // regrown after each restart cost the writer fresh file blocks, zeroed by the kernel
    // (about a sixth of the time spent writing WAL frames).
    conn.execute_batch(
        "PRAGMA synchronous = NORMAL;
         PRAGMA foreign_keys = OFF;
         PRAGMA cache_size = -16384;
         PRAGMA temp_store = MEMORY;
         PRAGMA journal_size_limit = 536870912;",
    )?;
    Ok(conn)
}

/// [`open`] for the daemon's other connections, once its core has opened the file: a
/// file deleted meanwhile is an error, not created again empty.
pub fn open_existing(path: &Path) -> Result<Connection> {
    if !path.exists() {
        bail!(
            "state file {}: no longer exists (deleted while sagawatch was running?)",
            path.display()
        );
    }
    open_as(path, false)
}

/// Opens an existing state file for reading only (`inspect`): nothing is written to it,
/// and a file that is not a sagawatch state file (empty, another program's database,
/// newer) is refused by name.
pub fn open_read_only(path: &Path) -> Result<Connection> {
    check_path(path)?;
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    // No WAL: no daemon has the file open. Read-only, SQLite would still create a `-wal`
    // and `-shm` with this user as owner, which a daemon running as another user then
    // cannot write: opened as immutable, it creates nothing (and locks nothing).
    let conn = if sidecar(path, "-wal").exists() {
        Connection::open_with_flags(path, flags)
    } else {
        Connection::open_with_flags(
            format!("file:{}?immutable=1", uri_path(path)),
            flags | OpenFlags::SQLITE_OPEN_URI,
        )
    }
    .with_context(|| format!("state file {}: cannot open", path.display()))?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| unusable(path, e))?;
    if version == 0 {
        bail!(
            "state file {}: not a sagawatch state file (no sagawatch schema in it)",
            path.display()
        );
    }
    if version as usize > MIGRATIONS.len() {
        bail!(
            "state file {}: schema version {version} is newer than this sagawatch understands ({})",
            path.display(),
            MIGRATIONS.len()
        );
    }
    if (version as usize) < MIGRATIONS.len() {
        // Read as it is (nothing is written here), it would lack what the timeline reads.
        bail!(
            "state file {}: schema version {version} is older than this sagawatch reads ({}): run this version's daemon on it once to bring it up to date, or inspect it with the version that wrote it",
            path.display(),
            MIGRATIONS.len()
        );
    }
    Ok(conn)
}

/// The writer's check at startup: SQLite opens a file it may not write read-only, and says
/// so only at the first write (after the daemon said it was ready).
pub fn require_writable(conn: &Connection, path: &Path) -> Result<()> {
    if conn.is_readonly(rusqlite::MAIN_DB)? {
        bail!(
            "state file {}: not writable by this user (read-only)",
            path.display()
        );
    }
    Ok(())
}

/// For the single writer: checkpoints are left to [`checkpoint_loop`] on another thread,
/// so commits only append to the WAL. With `sync_each_commit`, a commit returns only once
/// the WAL is on disk (`synchronous = FULL`; else `NORMAL`, which syncs at checkpoints:
/// a commit then survives a crash of the process, not one of the machine).
pub fn writer_settings(conn: &Connection, sync_each_commit: bool) -> Result<()> {
    if sync_each_commit {
        conn.pragma_update(None, "synchronous", "FULL")?;
    }
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    // The writer's page cache (96 MiB): the B-tree interior and the pages around the rows
    // the row cache holds.
    conn.pragma_update(None, "cache_size", -98304)?;
    Ok(())
}

/// WAL size (in 4 KiB frames, 256 MiB) above which the checkpointer makes the writer start
/// the WAL over; below it, checkpoints never block the writer. A page changed by several
/// commits between two checkpoints is copied into the database once, so a roomy WAL and
/// checkpoints a second apart write about a quarter less than 32 MiB and 100 ms did (the
/// README's benchmarks count bytes written per event). Crash recovery reads the WAL once:
/// 256 MiB takes well under a second.
const WAL_RESTART_FRAMES: i64 = 65536;

/// Copies committed WAL frames into the database file every `every` until `stop`, on its
/// own connection, so the writer pays only for the rare restart below. Passive checkpoints cannot
/// make a busy writer start the WAL over, so when it has grown past a limit this sets
/// `restart`, and the writer runs a RESTART checkpoint between two batches (cheap: most
/// frames are already copied by then).
pub fn checkpoint_loop(
    path: &Path,
    ids: &FileIds,
    every: StdDuration,
    stop: &std::sync::atomic::AtomicBool,
    restart: &std::sync::atomic::AtomicBool,
) -> Result<()> {
    let conn = open_existing(path)?;
    let checkpoint = |mode: &str| -> rusqlite::Result<(i64, i64, i64)> {
        conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
    };
    // Sleeps in short ticks so a stop is seen promptly whatever `every` is.
    let tick = every.min(StdDuration::from_millis(100));
    let mut last = std::time::Instant::now();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::sleep(tick);
        if last.elapsed() < every {
            continue;
        }
        last = std::time::Instant::now();
        // Writes to a deleted (or replaced) file go on silently, into an inode that
        // disappears at exit with all state: stop loudly instead.
        ids.check(path)?;
        match checkpoint("PASSIVE") {
            Ok((_, log, _)) if log > WAL_RESTART_FRAMES => {
                restart.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed"),
        }
    }
    // A reader still running (a timeline API query) would hold the exit for the whole busy
    // timeout: the WAL is recovered at the next start anyway.
    let _ = conn.busy_timeout(StdDuration::from_millis(500));
    let _ = checkpoint("TRUNCATE");
    Ok(())
}

/// A path as the path of a `file:` URI: bytes other than unreserved ones and `/`
/// percent-encoded.
fn uri_path(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut out = String::new();
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Where SQLite keeps the WAL of the database at `path`.
fn wal_path(path: &Path) -> std::path::PathBuf {
    sidecar(path, "-wal")
}

/// The path of one of SQLite's files beside the state file: `suffix` appended.
fn sidecar(path: &Path, suffix: &str) -> std::path::PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    p.into()
}

/// The (device, inode) of the state file and its WAL, taken while the daemon's connection
/// is open (the WAL exists as long as one is), so that [`checkpoint_loop`] sees them
/// deleted or replaced.
pub struct FileIds([std::io::Result<(u64, u64)>; 2]);

impl FileIds {
    pub fn of(path: &Path) -> FileIds {
        FileIds([file_identity(path), file_identity(&wal_path(path))])
    }

    /// An error naming the file if the state file at `path` or its WAL is no longer the
    /// one these were taken from.
    pub fn check(&self, path: &Path) -> Result<()> {
        for (f, id) in [path.to_path_buf(), wal_path(path)].iter().zip(&self.0) {
            // (A stat that fails otherwise, on a network file system say, proves nothing.)
            let now = match file_identity(f) {
                Ok(now) => Some(now),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(_) => continue,
            };
            if let Ok(was) = id
                && now.as_ref() != Some(was)
            {
                bail!(
                    "{} was deleted or replaced while sagawatch was running; what was committed since is only in the old file, which is lost when the daemon exits",
                    f.display()
                );
            }
        }
        Ok(())
    }
}

/// A file's (device, inode), to see it replaced.
fn file_identity(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// Brings the schema up to date; refuses a file written by a newer sagawatch.
pub fn migrate(conn: &mut Connection, path: &Path) -> Result<()> {
    let version: usize = conn
        .query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
        .with_context(|| format!("state file {}: cannot read", path.display()))?
        as usize;
    if version > MIGRATIONS.len() {
        bail!(
            "state file {}: schema version {version} is newer than this sagawatch understands ({})",
            path.display(),
            MIGRATIONS.len()
        );
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)
            .with_context(|| format!("state file {}: migration {}", path.display(), i + 1))?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

/// A source's stored read position: which file (device:inode) and the byte offset of the
/// first line not yet committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Position {
    pub file_id: String,
    pub offset: u64,
}

pub fn load_position(conn: &Connection, source: &str) -> Result<Option<Position>> {
    Ok(conn
        .query_row(
            "SELECT file_id, offset FROM positions WHERE source = ?1",
            params![source],
            |r| {
                Ok(Position {
                    file_id: r.get(0)?,
                    offset: r.get::<_, i64>(1)? as u64,
                })
            },
        )
        .optional()?)
}

/// The positions-table key of a Kafka partition (no source name contains `/`).
pub fn kafka_position_key(topic: &str, partition: i32) -> String {
    format!("kafka/{topic}/{partition}")
}

pub fn save_position(conn: &Connection, source: &str, pos: &Position) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO positions (source, file_id, offset) VALUES (?1, ?2, ?3)
         ON CONFLICT (source) DO UPDATE SET file_id = excluded.file_id, offset = excluded.offset",
    )?
    .execute(params![source, pos.file_id, pos.offset as i64])?;
    Ok(())
}

fn step_status(s: crate::engine::state::StepStatus) -> &'static str {
    use crate::engine::state::StepStatus::*;
    match s {
        Pending => "not yet open",
        Open => "open",
        Satisfied => "satisfied",
        Missing => "missing",
        Late => "late",
        Cancelled => "cancelled",
    }
}

fn rfc(t: i64) -> serde_json::Value {
    crate::time::format_rfc3339(t).into()
}

fn ms(t: Option<i64>) -> serde_json::Value {
    t.map(|t| rfc(t.saturating_mul(1_000_000)))
        .unwrap_or(serde_json::Value::Null)
}

/// The timeline of one instance: its steps with status, deadline or satisfaction time,
/// and every alert, resolve and compensation with its delivery state. `None` if the
/// state holds no row for (rule, key).
pub fn timeline(conn: &Connection, rule: &str, key: &str) -> Result<Option<serde_json::Value>> {
    use serde_json::json;
    let row = conn
        .query_row(
            "SELECT opened_at, closed_at, steps, refs FROM instances WHERE rule = ?1 AND key = ?2",
            params![rule, key],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, Option<i64>>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                    r.get::<_, Option<Vec<u8>>>(3)?,
                ))
            },
        )
        .optional()?;
    let Some((opened_at, closed_at, steps, refs)) = row else {
        return Ok(None);
    };
    let refs = sqlite_state::decode_refs(refs.as_deref().unwrap_or_default());
    // An event referenced by the row, with its event time.
    let event = |i: usize| -> Result<Option<(i64, serde_json::Value)>> {
        let Some(&seq) = refs.get(i).filter(|&&s| s != 0) else {
            return Ok(None);
        };
        let row: Option<(i64, String)> = conn
            .query_row(
                "SELECT time, text FROM events WHERE seq = ?1",
                params![seq],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        Ok(row.map(|(time, t)| {
            (
                time,
                crate::event::parse_json(&t).unwrap_or_else(|_| t.into()),
            )
        }))
    };
    let trigger = event(0)?.map(|(_, e)| e);
    let mut step_events = Vec::new();
    for i in 0..steps.len() / 9 {
        step_events.push(event(i + 1)?);
    }
    let names: Vec<String> = conn
        .query_row(
            "SELECT steps FROM rule_shapes WHERE rule = ?1",
            params![rule],
            |r| r.get::<_, String>(0),
        )
        .optional()?
        .map(|s| s.split(',').map(str::to_string).collect())
        .unwrap_or_default();
    let steps: Vec<serde_json::Value> = sqlite_state::decode_steps(&steps)
        .iter()
        .enumerate()
        .map(|(i, s)| {
            use crate::engine::state::StepStatus::*;
            let mut v = json!({
                "step": names.get(i).cloned().unwrap_or_else(|| i.to_string()),
                "status": step_status(s.status),
            });
            match s.status {
                Satisfied => {
                    v["satisfied_at"] = rfc(s.at);
                    if let Some(Some((_, e))) = step_events.get(i) {
                        v["event"] = e.clone();
                    }
                }
                Late => {
                    v["deadline"] = rfc(s.at);
                    // The late correlate (none for rows from before it was kept).
                    if let Some(Some((time, e))) = step_events.get(i) {
                        v["late_at"] = rfc(*time);
                        v["event"] = e.clone();
                    }
                }
                Open | Missing | Cancelled => v["deadline"] = rfc(s.at),
                Pending => {}
            }
            v
        })
        .collect();
    let mut stmt = conn.prepare(
        "SELECT id, kind, sink, step, state, attempts, last_error, created_ms, done_ms, body
         FROM outbox WHERE rule = ?1 AND key = ?2 ORDER BY seq",
    )?;
    let opened = rfc(opened_at);
    let actions = stmt
        .query_map(params![rule, key], |r| {
            let state: i64 = r.get(4)?;
            let body: String = r.get(9)?;
            let data = crate::event::parse_json(&body)
                .ok()
                .and_then(|v| v.get("data").cloned())
                .unwrap_or_default();
            // Outbox rows outlive instance rows (`outbox.retain`): those of an earlier
            // instance of the same key are not this one's.
            if data.get("opened_at").is_some_and(|o| *o != opened) {
                return Ok(None);
            }
            Ok(Some(json!({
                "id": r.get::<_, String>(0)?,
                "kind": r.get::<_, String>(1)?,
                "sink": r.get::<_, String>(2)?,
                "step": r.get::<_, String>(3)?,
                "delivery": match state { 0 => "pending", 1 => "delivered", 3 => "superseded", _ => "given_up" },
                "attempts": r.get::<_, i64>(5)?,
                "last_error": r.get::<_, Option<String>>(6)?,
                "created": ms(Some(r.get(7)?)),
                "done": ms(r.get(8)?),
                "summary": data.get("summary").cloned(),
                "payload": data.get("payload").cloned(),
            })))
        })?
        .filter_map(Result::transpose)
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(Some(json!({
        "rule": rule,
        "key": key,
        "status": if closed_at.is_some() { "closed" } else { "open" },
        "opened_at": rfc(opened_at),
        "closed_at": closed_at.map(rfc),
        "trigger": trigger,
        "steps": steps,
        "actions": actions,
    })))
}

/// Which instances to list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListStatus {
    /// Open, oldest first.
    Open,
    /// With a missing step, most recent deadline first.
    Missing,
    /// With a late step, most recent deadline first.
    Late,
}

impl ListStatus {
    pub fn parse(s: &str) -> Option<ListStatus> {
        match s {
            "open" => Some(ListStatus::Open),
            "missing" => Some(ListStatus::Missing),
            "late" => Some(ListStatus::Late),
            _ => None,
        }
    }

    /// The name `parse` reads.
    pub fn name(self) -> &'static str {
        match self {
            ListStatus::Open => "open",
            ListStatus::Missing => "missing",
            ListStatus::Late => "late",
        }
    }
}

/// The listing query of one status: the page after the cursor (?3..?5) of the rows whose
/// sort time is before ?1, of rule ?2 when given, at most ?6.
fn list_sql(status: ListStatus) -> String {
    let (col, filter, order, cmp, index) = match status {
        ListStatus::Open => (
            "opened_at",
            "closed_at IS NULL",
            "ASC",
            ">",
            "instances_opened",
        ),
        ListStatus::Missing => (
            "missing_at",
            "missing_at IS NOT NULL",
            "DESC",
            "<",
            "instances_missing",
        ),
        ListStatus::Late => (
            "late_at",
            "late_at IS NOT NULL",
            "DESC",
            "<",
            "instances_late",
        ),
    };
    // The hint: with a rule filter SQLite may prefer the primary key (ordered by rule)
    // and sort every instance of the rule.
    format!(
        "SELECT rule, key, opened_at, closed_at, {col}, steps FROM instances INDEXED BY {index}
         WHERE {filter} AND {col} < ?1 AND (?2 IS NULL OR rule = ?2)
           AND rule IN (SELECT rule FROM rule_shapes WHERE loaded)
           AND (?3 IS NULL OR ({col}, rule, key) {cmp} (?3, ?4, ?5))
         ORDER BY {col} {order}, rule {order}, key {order} LIMIT ?6"
    )
}

/// Where a listing page starts: the sort key (time, rule, key) after which it goes on.
pub type Cursor = (i64, String, String);

/// Reads a listing's cursor (see [`list_instances`]): `None` for an empty one; an error,
/// the caller's, for one that is not a cursor or is another status's.
pub fn parse_cursor(c: &str, status: ListStatus) -> Result<Option<Cursor>> {
    if c.is_empty() {
        return Ok(None);
    }
    let bytes = (0..c.len())
        .step_by(2)
        .map(|i| c.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect::<Option<Vec<u8>>>();
    let (of, t, r, k): (String, i64, String, String) = bytes
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| anyhow::anyhow!("invalid cursor"))?;
    // A page position in one status order means nothing in another's.
    if of != status.name() {
        anyhow::bail!(
            "cursor of a status={of} listing: use it with status={of}, or start this listing without a cursor"
        );
    }
    Ok(Some((t, r, k)))
}

/// A page of instances from the status indexes, and the cursor of the next page.
/// `older_than` (ns) keeps those whose sort time is more than that before the engine
/// clock. The cursor is opaque to callers (hex of the status and the last row's sort key);
/// a cursor of another status's listing is refused.
pub fn list_instances(
    conn: &Connection,
    status: ListStatus,
    rule: Option<&str>,
    older_than: Option<i64>,
    limit: usize,
    cursor: Option<&str>,
) -> Result<serde_json::Value> {
    use serde_json::json;
    let clock: Option<i64> = conn
        .query_row("SELECT v FROM meta WHERE k = 'clock.now'", [], |r| r.get(0))
        .optional()?;
    let bound = match (older_than, clock) {
        (Some(d), Some(c)) => c.saturating_sub(d),
        (Some(_), None) => i64::MIN,
        (None, _) => i64::MAX,
    };
    let after = match cursor {
        None => None,
        Some(c) => parse_cursor(c, status)?,
    };
    let sql = list_sql(status);
    let (ct, cr, ck) = match &after {
        Some((t, r, k)) => (Some(*t), Some(r.as_str()), Some(k.as_str())),
        None => (None, None, None),
    };
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt
        .query_map(
            params![bound, rule, ct, cr, ck, (limit.clamp(1, 1000)) as i64],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            },
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let next = (rows.len() == limit.clamp(1, 1000))
        .then(|| rows.last())
        .flatten()
        .map(|(r, k, _, _, t, ..)| {
            serde_json::to_vec(&(status.name(), t, r, k))
                .unwrap_or_default()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        });
    let items: Vec<serde_json::Value> = rows
        .into_iter()
        .map(|(r, k, opened, closed, t, ..)| {
            let mut v = json!({
                "rule": r,
                "key": k,
                "status": if closed.is_some() { "closed" } else { "open" },
                "opened_at": rfc(opened),
            });
            match status {
                ListStatus::Open => {}
                ListStatus::Missing => v["missing_deadline"] = rfc(t),
                ListStatus::Late => v["late_deadline"] = rfc(t),
            }
            v
        })
        .collect();
    Ok(json!({ "items": items, "next_cursor": next }))
}

/// Per rule: open instances, and instances with a missing or a late step (from the
/// status indexes).
pub fn rule_summary(conn: &Connection) -> Result<serde_json::Value> {
    use std::collections::BTreeMap;
    let mut rules: BTreeMap<String, [i64; 3]> = BTreeMap::new();
    let mut stmt = conn.prepare("SELECT rule FROM rule_shapes WHERE loaded")?;
    for r in stmt.query_map([], |r| r.get::<_, String>(0))? {
        rules.entry(r?).or_default();
    }
    let loaded: std::collections::BTreeSet<String> = rules.keys().cloned().collect();
    let mut stmt = conn.prepare("SELECT substr(k, 6), v FROM meta WHERE k LIKE 'open:%'")?;
    for r in stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
        let (rule, n) = r?;
        rules.entry(rule).or_default()[0] = n;
    }
    for (i, col, index) in [
        (1, "missing_at", "instances_missing"),
        (2, "late_at", "instances_late"),
    ] {
        // The partial index holds only these rows; without the hint SQLite may prefer
        // the primary key (it is ordered by rule) and scan every instance.
        let mut stmt = conn.prepare(&format!(
            "SELECT rule, COUNT(*) FROM instances INDEXED BY {index}
             WHERE {col} IS NOT NULL GROUP BY rule"
        ))?;
        for r in stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
            let (rule, n) = r?;
            rules.entry(rule).or_default()[i] = n;
        }
    }
    // Rows of rules no longer loaded stay in the file, ignored; so are their counts here.
    rules.retain(|r, _| loaded.contains(r));
    Ok(serde_json::json!({
        "rules": rules
            .into_iter()
            .map(|(rule, [open, missing, late])| serde_json::json!({
                "rule": rule, "open": open, "missing": missing, "late": late
            }))
            .collect::<Vec<_>>()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Migrations are applied by position: one changed, moved or put between two others
    /// leaves files written before it without it (or applies another twice), and they no
    /// longer open. The digests of those released stay as they are; a new one goes last.
    #[test]
    fn migrations_are_only_ever_appended() {
        use sha2::{Digest, Sha256};
        const RELEASED: [&str; 12] = [
            "5b4d0fbdd3490c5c",
            "279634fd13cd69ed",
            "63cc05bad624507f",
            "3c87696a64553a78",
            "369a7e770d4f3bf7",
            "ba5b2f7052aeddb3",
            "ca91265e1d50e199",
            "eba867ef96ef5d8a",
            "35111774fadc4842",
            "4df04189816604ca",
            "5d5dab19fde07c02",
            "2ecaf8655abb24d5",
        ];
        let got: Vec<String> = MIGRATIONS
            .iter()
            .map(|m| {
                let d = Sha256::digest(m.as_bytes());
                d[..8].iter().map(|b| format!("{b:02x}")).collect()
            })
            .collect();
        assert!(got.len() >= RELEASED.len(), "{got:?}");
        assert_eq!(got[..RELEASED.len()], RELEASED, "{got:?}");
    }

    /// A state path that is a symbolic link to a file not there yet: the file is
    /// created, for its owner only, as a new state file is.
    #[test]
    fn a_state_file_behind_a_dangling_link_is_created_for_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (link, target) = (dir.path().join("state.db"), dir.path().join("real.db"));
        // Through two links.
        std::os::unix::fs::symlink("middle.db", &link).unwrap();
        std::os::unix::fs::symlink("real.db", dir.path().join("middle.db")).unwrap();
        let mut conn = open(&link).unwrap();
        migrate(&mut conn, &link).unwrap();
        let mode = std::fs::metadata(&target).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
    }

    /// A writer waiting at the gate goes before the core's next batch, however soon the
    /// core comes back for it; and the core waits for that turn to end.
    #[test]
    fn a_waiting_writer_goes_before_the_cores_next_batch() {
        use std::sync::Arc;
        use std::sync::mpsc::channel;
        let gate = Arc::new(WriteGate::default());
        assert!(gate.enter_core());
        let (tx, rx) = channel();
        let other = {
            let (gate, tx) = (Arc::clone(&gate), tx.clone());
            std::thread::spawn(move || {
                let _turn = gate.enter();
                tx.send("writer in").unwrap();
                std::thread::sleep(StdDuration::from_millis(50));
                tx.send("writer out").unwrap();
            })
        };
        // Until the writer waits, the core may go on with its batch.
        let end = std::time::Instant::now() + StdDuration::from_secs(10);
        while gate.state.lock().unwrap().waiting == 0 {
            assert!(std::time::Instant::now() < end, "the writer never waited");
            std::thread::yield_now();
        }
        gate.leave();
        assert!(gate.enter_core());
        tx.send("core in").unwrap();
        gate.leave();
        other.join().unwrap();
        drop(tx);
        let order: Vec<&str> = rx.iter().collect();
        assert_eq!(order, ["writer in", "writer out", "core in"]);
    }

    /// A standing request (`want`) does not block: a try that times out gives the writer
    /// its hand back (to send re-sends, say), and the request still goes before the core's
    /// next batch; once withdrawn, the core goes on.
    #[test]
    fn a_standing_request_goes_before_the_cores_next_batch_without_blocking() {
        use std::sync::Arc;
        let gate = Arc::new(WriteGate::default());
        assert!(gate.enter_core());
        let want = gate.want();
        assert!(want.take_within(StdDuration::from_millis(20)).is_none());
        // The core ends its batch; its next one waits for the request.
        gate.leave();
        let core = {
            let gate = Arc::clone(&gate);
            std::thread::spawn(move || {
                assert!(gate.enter_core());
                gate.leave();
            })
        };
        std::thread::sleep(StdDuration::from_millis(50));
        assert!(!core.is_finished(), "the core went before the request");
        let turn = want
            .take_within(StdDuration::from_secs(10))
            .expect("the turn");
        assert!(turn.0.is_some());
        drop(turn);
        drop(want);
        core.join().unwrap();
    }

    fn rule_set(names: &[&str]) -> crate::rules::RuleSet {
        let text: String = std::iter::once("rules:\n".to_string())
            .chain(names.iter().map(|n| {
                format!(
                    "  - name: {n}\n    trigger: {{ where: {{ type: A }}, key: id }}\n    \
                     expect: [{{ step: b, where: {{ type: B }}, key: id, within: 1m }}]\n"
                )
            }))
            .collect();
        crate::rules::load_sources(&[("r.yaml".into(), text)]).unwrap()
    }

    /// A removed rule's rows stay in the file (it may come back), but the rule listing
    /// shows what runs: the rules loaded now, including one loaded again.
    #[test]
    fn rule_listing_shows_the_loaded_rules_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let names = |conn: &Connection| -> Vec<String> {
            rule_summary(conn).unwrap()["rules"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["rule"].as_str().unwrap().to_string())
                .collect()
        };
        let mut conn = open(&path).unwrap();
        migrate(&mut conn, &path).unwrap();
        let mut st = SqliteState::open(conn, &rule_set(&["a", "b"]), &path).unwrap();
        assert_eq!(names(st.conn()), ["a", "b"]);
        st.set_rules(&rule_set(&["b", "c"])).unwrap();
        assert_eq!(names(st.conn()), ["b", "c"]);
        st.set_rules(&rule_set(&["a"])).unwrap();
        assert_eq!(names(st.conn()), ["a"]);
    }

    /// The open deadlines of a removed rule never fire: they leave the deadline index (or
    /// the oldest-deadline gauge would read as stuck timers) and the instance listings,
    /// and come back with the rule.
    #[test]
    fn a_removed_rules_deadlines_leave_the_index_and_come_back_with_it() {
        use crate::engine::state::{Due, Instance, State, StepState, StepStatus, Steps};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let mut conn = open(&path).unwrap();
        migrate(&mut conn, &path).unwrap();
        let mut st = SqliteState::open(conn, &rule_set(&["a", "b"]), &path).unwrap();
        st.begin().unwrap();
        let mut steps = Steps::pending(1);
        steps[0] = StepState {
            status: StepStatus::Open,
            at: 1_000,
        };
        assert_eq!(st.take(0, "k"), None);
        st.put(
            0,
            "k",
            Some(Instance {
                opened_at: 0,
                closed_at: None,
                expires_at: 0,
                steps,
                captures: Box::new([]),
            }),
        );
        st.commit().unwrap();
        let listed = |conn: &Connection| {
            list_instances(conn, ListStatus::Open, None, None, 10, None).unwrap()["items"]
                .as_array()
                .unwrap()
                .len()
        };
        assert_eq!(st.oldest_deadline().unwrap(), Some(1_000));
        assert_eq!(listed(st.conn()), 1);
        st.set_rules(&rule_set(&["b"])).unwrap();
        assert_eq!(st.oldest_deadline().unwrap(), None);
        assert_eq!(listed(st.conn()), 0);
        let mut due = Vec::new();
        st.due(2_000, usize::MAX, &mut due);
        assert!(due.is_empty());
        st.set_rules(&rule_set(&["b", "a"])).unwrap();
        assert_eq!(st.oldest_deadline().unwrap(), Some(1_000));
        assert_eq!(listed(st.conn()), 1);
        st.due(2_000, usize::MAX, &mut due);
        assert_eq!(
            due,
            [Due {
                deadline: 1_000,
                rule: 1,
                key: "k".into(),
                step: 0
            }]
        );
    }

    /// `batch.sync: full` reaches the writer's connection; the default is NORMAL.
    #[test]
    fn the_writer_syncs_each_commit_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        for (full, want) in [(false, 1), (true, 2)] {
            let conn = open(&dir.path().join("state.db")).unwrap();
            writer_settings(&conn, full).unwrap();
            let got: i64 = conn
                .query_row("PRAGMA synchronous", [], |r| r.get(0))
                .unwrap();
            assert_eq!(got, want, "full: {full}");
        }
    }

    /// A reader that holds an old snapshot (a long timeline API request) defers the WAL's
    /// restart; it neither fails the writer's commit nor holds it for the busy timeout.
    #[test]
    fn a_reader_defers_the_wal_restart_without_failing_the_commit() {
        use crate::engine::state::{Instance, State, Steps};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let mut conn = open(&path).unwrap();
        migrate(&mut conn, &path).unwrap();
        writer_settings(&conn, false).unwrap();
        let mut st = SqliteState::open(conn, &rule_set(&["a"]), &path).unwrap();
        let put = |st: &mut SqliteState, key: &str| {
            st.begin().unwrap();
            st.take(0, key);
            st.put(
                0,
                key,
                Some(Instance {
                    opened_at: 0,
                    closed_at: None,
                    expires_at: 0,
                    steps: Steps::pending(1),
                    captures: Box::new([]),
                }),
            );
        };
        put(&mut st, "k1");
        st.commit().unwrap();
        let reader = open(&path).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        let n: i64 = reader
            .query_row("SELECT count(*) FROM instances", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
        put(&mut st, "k2");
        st.wal_restart_flag()
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let t = std::time::Instant::now();
        st.commit().unwrap();
        assert!(t.elapsed() < StdDuration::from_secs(5), "{:?}", t.elapsed());
        put(&mut st, "k3");
        st.commit().unwrap();
        reader.execute_batch("COMMIT").unwrap();
        // The writer waits for locks as long as before.
        let ms: i64 = st
            .conn()
            .query_row("PRAGMA busy_timeout", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ms, BUSY_TIMEOUT.as_millis() as i64);
    }

    /// Every listing reads its status index in order: no scan of the instances, no sort.
    #[test]
    fn listings_read_their_index_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let mut conn = open(&path).unwrap();
        migrate(&mut conn, &path).unwrap();
        for status in [ListStatus::Open, ListStatus::Missing, ListStatus::Late] {
            let sql = format!("EXPLAIN QUERY PLAN {}", list_sql(status));
            let mut stmt = conn.prepare(&sql).unwrap();
            for args in [
                params![0, None::<&str>, None::<i64>, None::<&str>, None::<&str>, 10],
                params![0, "checkout", 5, "checkout", "o1", 10],
            ] {
                let plan: Vec<String> = stmt
                    .query_map(args, |r| r.get::<_, String>(3))
                    .unwrap()
                    .collect::<rusqlite::Result<_>>()
                    .unwrap();
                let plan = plan.join("; ");
                assert!(
                    plan.contains("USING INDEX instances_"),
                    "{status:?}: {plan}"
                );
                assert!(!plan.contains("TEMP B-TREE"), "{status:?}: {plan}");
            }
        }
    }
}
