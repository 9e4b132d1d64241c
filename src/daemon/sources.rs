//! Line sources that run on their own threads: a JSON-lines file followed like `tail -F`
//! (appends, truncation, rename-and-recreate rotation; resumes from the committed offset)
//! and stdin. Each sends batches of complete lines to the core, which stores the file
//! position in the same transaction as the lines' effects.

use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::time::{Duration, Instant};

use crate::daemon::bad_log::BadLog;
use crate::daemon::core::{LineAt, Msg};
use crate::store::Position;

/// Lines per message to the core, and bytes: what the core's queue holds (64 messages)
/// stays small with long lines too.
const CHUNK: usize = 1000;
const CHUNK_BYTES: usize = 256 << 10;
/// How often a followed file is checked for growth or rotation at its end.
const POLL: Duration = Duration::from_millis(100);
/// The longest line accepted; longer ones are skipped with a warning.
const MAX_LINE: usize = 4 << 20;
/// Bytes read (skipped lines included) after which a message goes to the core even with
/// few lines in it, so a long run of blank or oversized lines stores its position and
/// looks at the stop flag on the way.
const SCAN_BYTES: u64 = 8 << 20;
/// After a rotation, how long the old file must have stopped growing before the new one
/// is read: a writer may still be finishing lines in the old one until it reopens (after
/// logrotate's `postrotate`, say, or when a buffered writer flushes).
pub const ROTATE_WAIT: Duration = Duration::from_secs(2);
/// How many times [`ROTATE_WAIT`] the old file is read, however it grows, before the new
/// one: a writer that never reopens the path (no `postrotate` signal) and appends to the
/// old file more often than that would otherwise keep the new file unread for good.
const ROTATE_WAITS_AT_MOST: u32 = 10;

/// Identity of a file, so a rotation (a new file under the same name) is noticed.
pub fn file_id(meta: &std::fs::Metadata) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        format!("{}:{}", meta.dev(), meta.ino())
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        String::from("0:0")
    }
}

pub struct FileSource {
    pub name: Arc<str>,
    pub path: PathBuf,
    pub follow: bool,
    pub start: Option<Position>,
    pub tx: SyncSender<Msg>,
    pub stop: Arc<AtomicBool>,
    /// Bytes of the file not yet read.
    pub lag: prometheus::IntGauge,
    /// Counts the lines skipped here.
    pub skips: Skips,
    /// See [`ROTATE_WAIT`].
    pub rotate_wait: Duration,
    /// Set while the file holds lines this source cannot read yet (a file it may not
    /// open, a read that fails, a rotated-in file waiting for the old one): the stream is
    /// not idle then, and the idle fallback of the clock waits.
    pub holding: Arc<AtomicBool>,
}

/// The lines a source skips itself (longer than the limit, not UTF-8): counted as
/// received and as rejected, and logged with where they were.
pub struct Skips {
    pub name: Arc<str>,
    /// Lines are told by number (stdin), not by byte offset (files).
    pub by_line: bool,
    pub received: prometheus::IntCounter,
    pub oversized: prometheus::IntCounter,
    pub not_utf8: prometheus::IntCounter,
    pub log: BadLog,
}

impl Skips {
    pub fn new(metrics: &crate::daemon::metrics::Metrics, name: &str) -> Skips {
        Skips {
            name: Arc::from(name),
            by_line: false,
            received: metrics.events_received.with_label_values(&[name]),
            oversized: metrics
                .events_rejected
                .with_label_values(&[name, "oversized"]),
            not_utf8: metrics
                .events_rejected
                .with_label_values(&[name, "invalid_json"]),
            log: BadLog::new("oversized or non-UTF-8 lines"),
        }
    }

    /// The log fields for where a line starts: its offset, or its line number.
    fn place(&self, at: u64) -> (Option<u64>, Option<u64>) {
        if self.by_line {
            (None, Some(at))
        } else {
            (Some(at), None)
        }
    }

    /// Counts the lines skipped in the stretch `lines` holds, as it is sent. Not before:
    /// a stretch read again after a read error must not count its skipped lines twice.
    fn settle(&self, lines: &mut Lines) {
        let (oversized, not_utf8) = std::mem::take(&mut lines.skipped);
        self.received.inc_by(oversized + not_utf8);
        self.oversized.inc_by(oversized);
        self.not_utf8.inc_by(not_utf8);
    }

    /// `at`: where the line starts (see [`Skips::place`]). Counted with `lines`.
    fn oversized(&mut self, lines: &mut Lines, bytes: u64, at: u64) {
        lines.skipped.0 += 1;
        if !self.log.allow(&self.name) {
            return;
        }
        let (offset, line) = self.place(at);
        tracing::warn!(
            source = &*self.name,
            bytes,
            offset,
            line,
            "skipped an oversized line"
        );
    }

    /// Adds a line's text and where it starts, unless it is blank; a line that is not
    /// UTF-8 is skipped (its bytes would otherwise become a key no event could ever match).
    fn push(&mut self, lines: &mut Lines, raw: &[u8], at: u64) {
        // A byte order mark at the start of the input is not part of its first line.
        let first = at == u64::from(self.by_line);
        let raw = match raw.strip_prefix(crate::event::BOM) {
            Some(rest) if first => rest,
            _ => raw,
        };
        match push_line(&mut lines.text, raw) {
            Some(true) => {
                lines.at.push(at);
                lines.bytes += raw.len();
            }
            Some(false) => {}
            None => {
                lines.skipped.1 += 1;
                if self.log.allow(&self.name) {
                    let (offset, line) = self.place(at);
                    tracing::warn!(
                        source = &*self.name,
                        offset,
                        line,
                        "skipped a line that is not UTF-8"
                    );
                }
            }
        }
    }
}

/// Lines read and not sent yet, with where each starts.
#[derive(Default)]
struct Lines {
    text: Vec<String>,
    at: Vec<u64>,
    bytes: usize,
    /// Lines skipped in the same stretch, not counted yet: oversized, not UTF-8.
    skipped: (u64, u64),
}

impl Lines {
    /// Whether they make a whole message.
    fn full(&self) -> bool {
        self.text.len() >= CHUNK || self.bytes >= CHUNK_BYTES
    }

    fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    /// Takes them for a message: `by_line` says what `at` holds.
    fn take(&mut self, by_line: bool) -> (Vec<String>, LineAt) {
        self.bytes = 0;
        let at = std::mem::take(&mut self.at);
        let at = if by_line {
            LineAt::Numbers(at)
        } else {
            LineAt::Offsets(at)
        };
        (std::mem::take(&mut self.text), at)
    }
}

struct Open {
    reader: BufReader<File>,
    id: String,
    offset: u64,
}

/// How many of a file's first bytes, and of the bytes just before the stored offset, tell
/// it apart beside its inode: a file deleted and another created while the daemon was
/// stopped may get the same inode number, and one rewritten in place keeps it.
const PRINT_BYTES: u64 = 256;

impl Open {
    /// The position to store for `offset`: the file's id, a hash of its first bytes (at
    /// most `PRINT_BYTES`; they do not change as the file grows) and one of the
    /// `PRINT_BYTES` before the offset (nor do they, in a file that is only appended to).
    /// Both are read again each time: a file rewritten in place under the reader must not
    /// pair its old first bytes with its new ones before the offset (a restart would take
    /// that for another file and read it all again).
    fn position(&mut self, offset: u64) -> Position {
        let n = offset.min(PRINT_BYTES);
        let head = (n > 0)
            .then(|| print_at(self.reader.get_ref(), 0, n).map(|h| (n, h)))
            .flatten();
        let tail = print_at(self.reader.get_ref(), offset - n, n);
        let file_id = match (&head, tail) {
            (Some((n, h)), Some(t)) => format!("{}:{n}:{h}:{t}", self.id),
            (Some((n, h)), None) => format!("{}:{n}:{h}", self.id),
            _ => self.id.clone(),
        };
        Position { file_id, offset }
    }
}

/// The hex of the first 8 bytes of SHA-256 over `n` bytes of a file from `from`.
fn print_at(f: &File, from: u64, n: u64) -> Option<String> {
    use sha2::Digest;
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0; usize::try_from(n).ok()?];
    f.read_exact_at(&mut buf, from).ok()?;
    let d = sha2::Sha256::digest(&buf);
    Some(d[..8].iter().map(|b| format!("{b:02x}")).collect())
}

/// A stored file id, taken apart: `dev:ino`, then (when the offset was past 0) how many
/// first bytes were hashed and their hash, then the hash of as many bytes before the
/// offset (positions stored by older versions have fewer parts).
#[derive(Debug, PartialEq, Eq)]
struct StoredId<'a> {
    dev: &'a str,
    ino: &'a str,
    head: Option<(u64, &'a str)>,
    tail: Option<&'a str>,
}

fn parse_id(file_id: &str) -> Option<StoredId<'_>> {
    let parts: Vec<&str> = file_id.split(':').collect();
    let (dev, ino) = (*parts.first()?, *parts.get(1)?);
    let head = match parts.get(2..4) {
        Some([n, h]) => Some((n.parse().ok()?, *h)),
        _ => None,
    };
    match parts.len() {
        2 | 4 | 5 => Some(StoredId {
            dev,
            ino,
            head,
            tail: parts.get(4).copied(),
        }),
        _ => None,
    }
}

/// Whether a stored position belongs to the file open as `f` (identity `id`, `dev:ino`),
/// and the offset to resume at if it does. The inode must be the same, and so must the
/// hashed bytes at the start and before the offset; the device number may differ when
/// the bytes say it is the same file (it changes when a volume is mounted again, after a
/// reboot or a container's restart, with LVM, overlay or network file systems).
fn same_file(f: &File, len: u64, id: &str, stored: &Position) -> Resume {
    let Some(s) = parse_id(&stored.file_id) else {
        return Resume::Different;
    };
    let Some((dev, ino)) = id.split_once(':') else {
        return Resume::Different;
    };
    if s.ino != ino {
        return Resume::Different;
    }
    if stored.offset > len {
        return Resume::Shorter;
    }
    // (A read that fails proves nothing: the inode decides.)
    let head = s
        .head
        .is_none_or(|(n, h)| n <= len && print_at(f, 0, n).is_none_or(|x| x == h));
    let n = stored.offset.min(PRINT_BYTES);
    let tail = s
        .tail
        .is_none_or(|t| print_at(f, stored.offset - n, n).is_none_or(|x| x == t));
    let printed = s.head.is_some() && s.tail.is_some();
    match (head && tail, s.dev == dev) {
        (true, true) => Resume::At(stored.offset),
        // Another device: only the bytes can say it is the same file.
        (true, false) if printed || stored.offset == 0 => Resume::Moved(stored.offset),
        _ => Resume::Different,
    }
}

/// What [`same_file`] found.
#[derive(Debug, PartialEq, Eq)]
enum Resume {
    At(u64),
    /// The same file, found on another device number.
    Moved(u64),
    /// The same inode, shorter than the stored offset.
    Shorter,
    Different,
}

impl FileSource {
    /// Runs until stopped (or, without `follow`, until the end of the file).
    pub fn run(mut self) {
        let mut warned_missing = false;
        // A read error is logged once until a read succeeds again.
        let mut warned_read = false;
        let mut cur: Option<Open> = None;
        let mut resume = self.start.clone();
        // The start of a line still being written, or the length of an oversized line
        // being skipped.
        let mut partial: Vec<u8> = Vec::new();
        let mut skipping = 0u64;
        // The path names a new file: the old one is read until it has stopped growing
        // (since when it has not grown).
        let mut rotated: Option<Instant> = None;
        // When that rotation was first seen.
        let mut rotated_at: Option<Instant> = None;
        // The file the path named when the rotation was seen, opened then: read next even
        // if it is rotated away in turn before the old one is finished.
        let mut next: Option<File> = None;
        // Since when reads have failed, one after another.
        let mut failing: Option<Instant> = None;
        while !self.stop.load(Ordering::Relaxed) {
            self.skips.log.flush(false);
            if cur.is_none() {
                // The stored position is used until a file is open: a failed attempt
                // must not make a later one start the same file from its beginning.
                let stored = resume.clone();
                match self.open(resume.clone(), next.take()) {
                    Ok(mut o) => {
                        // A file the stored position does not name (the new one after a
                        // rotation, one replaced while stopped; by its identity, not only
                        // its offset: both may be at 0): its position is stored at once,
                        // so a restart before its first line resumes it, not the old one
                        // (with a false warning that lines were not read).
                        let here = o.position(o.offset);
                        if stored.as_ref() != Some(&here) {
                            let msg = Msg::Lines {
                                source: Arc::clone(&self.name),
                                lines: Vec::new(),
                                at: LineAt::Unknown,
                                position: Some(here),
                                atomic: false,
                                done: None,
                                hold: None,
                            };
                            if self.tx.send(msg).is_err() {
                                return;
                            }
                        }
                        self.holding.store(false, Ordering::Relaxed);
                        failing = None;
                        resume = None;
                        warned_missing = false;
                        partial.clear();
                        skipping = 0;
                        rotated = None;
                        rotated_at = None;
                        cur = Some(o);
                    }
                    Err(e) => {
                        if !self.follow {
                            tracing::warn!(source = &*self.name, path = %self.path.display(), error = %e, "cannot open; nothing read from it (follow: false reads a file once, without waiting for it)");
                            return;
                        }
                        if !warned_missing {
                            tracing::warn!(source = &*self.name, path = %self.path.display(), error = %e, "cannot open; will retry");
                            warned_missing = true;
                        }
                        // A file there that cannot be opened (its permissions): what it
                        // holds past the stored position is not read, and the lag (and its
                        // alert) says so instead of a healthy 0.
                        if let Ok(m) = std::fs::metadata(&self.path)
                            && m.is_file()
                        {
                            let id = file_id(&m);
                            let done = resume
                                .as_ref()
                                .filter(|p| {
                                    parse_id(&p.file_id)
                                        .is_some_and(|s| id == format!("{}:{}", s.dev, s.ino))
                                })
                                .map_or(0, |p| p.offset);
                            let lag = m.len().saturating_sub(done);
                            self.lag.set(lag as i64);
                            self.holding.store(lag > 0, Ordering::Relaxed);
                        } else {
                            self.holding.store(false, Ordering::Relaxed);
                        }
                        std::thread::sleep(POLL);
                        continue;
                    }
                }
            }
            let Some(o) = cur.as_mut() else { continue };
            let mut lines = Lines::default();
            let mut consumed = o.offset;
            let before = consumed + partial.len() as u64 + skipping;
            let mut eof = false;
            // Bounded by what was read, not what was consumed: an oversized line being
            // skipped consumes nothing until its end, which may be gigabytes away.
            while !lines.full() && consumed + partial.len() as u64 + skipping - before < SCAN_BYTES
            {
                match next_line(&mut o.reader, &mut partial, &mut skipping) {
                    Ok(Step::Line) => {
                        warned_read = false;
                        self.skips.push(&mut lines, &partial, consumed);
                        consumed += partial.len() as u64;
                        partial.clear();
                    }
                    Ok(Step::Oversized(n)) => {
                        self.skips.oversized(&mut lines, n, consumed);
                        consumed += n;
                    }
                    Ok(Step::More) => {}
                    Ok(Step::End) => {
                        eof = true;
                        break;
                    }
                    Err(e) => {
                        if !warned_read {
                            tracing::warn!(source = &*self.name, error = %e, "read failed; reopening");
                            warned_read = true;
                        }
                        let unread = o
                            .reader
                            .get_ref()
                            .metadata()
                            .map_or(true, |m| m.len() > o.offset);
                        self.holding.store(unread, Ordering::Relaxed);
                        // A failure that repeats must not spin: retry at the poll rate.
                        std::thread::sleep(POLL);
                        // Read again from where the last sent line ended (what this chunk
                        // read so far was not sent). A file being finished after a
                        // rotation is read on through its handle: its path names the new
                        // one. Any other is opened again by its path.
                        let at = o.offset;
                        let since = *failing.get_or_insert_with(Instant::now);
                        if rotated.is_some() && since.elapsed() >= self.rotate_wait {
                            // Not for good: the new file waits, and the clock with it.
                            let left = o.reader.get_ref().metadata().map_or(0, |m| m.len());
                            tracing::warn!(
                                source = &*self.name,
                                error = %e,
                                unread_bytes = left.saturating_sub(at),
                                "the rotated file cannot be read to its end; its rest is not read, following the new one"
                            );
                            failing = None;
                            resume = None;
                            cur = None;
                            break;
                        }
                        if rotated.is_some() && o.reader.seek(SeekFrom::Start(at)).is_ok() {
                            partial.clear();
                            skipping = 0;
                            lines = Lines::default();
                            consumed = at;
                            break;
                        }
                        resume = Some(o.position(at));
                        cur = None;
                        break;
                    }
                }
            }
            let Some(o) = cur.as_mut() else { continue };
            // A file cut back under what was read is handled below, its lag with it.
            if let Ok(m) = o.reader.get_ref().metadata()
                && m.len() >= consumed + partial.len() as u64 + skipping
            {
                self.lag.set((m.len() - consumed) as i64);
            }
            if rotated.is_some() && consumed + partial.len() as u64 + skipping != before {
                rotated = Some(Instant::now());
            }
            if consumed != o.offset || !lines.is_empty() {
                // Reading got on (a read that fails is retried from the last line sent):
                // failures count one after another only.
                failing = None;
                o.offset = consumed;
                self.skips.settle(&mut lines);
                let (lines, at) = lines.take(false);
                let msg = Msg::Lines {
                    source: Arc::clone(&self.name),
                    lines,
                    at,
                    position: Some(o.position(consumed)),
                    atomic: false,
                    done: None,
                    hold: None,
                };
                if self.tx.send(msg).is_err() {
                    return;
                }
            }
            if !eof {
                continue;
            }
            // Still written to, by its modification time: not by this reader's progress,
            // which a core too busy to take lines for a while also makes look recent.
            let overdue = rotated_at
                .is_some_and(|t| t.elapsed() >= self.rotate_wait * ROTATE_WAITS_AT_MOST)
                && written_within(o.reader.get_ref(), self.rotate_wait);
            if let Some(t) = rotated
                && t.elapsed() < self.rotate_wait
                && !overdue
            {
                // What waits in the new file is behind too.
                let waiting = next
                    .as_ref()
                    .and_then(|f| f.metadata().ok())
                    .map_or(0, |m| m.len());
                if let Ok(m) = o.reader.get_ref().metadata() {
                    self.lag
                        .set((m.len().saturating_sub(o.offset) + waiting) as i64);
                }
                self.holding.store(waiting > 0, Ordering::Relaxed);
                std::thread::sleep(POLL);
                continue;
            }
            if overdue && rotated.is_some_and(|t| t.elapsed() < self.rotate_wait) {
                tracing::warn!(
                    source = &*self.name,
                    waited = ?self.rotate_wait * ROTATE_WAITS_AT_MOST,
                    unfinished_line_bytes = partial.len() as u64 + skipping,
                    "the rotated file is still being written to (by a writer that has not \
                     reopened the path?); following the new one: what is written to the old \
                     one from now on, and the start of a line still being written, is not read"
                );
                // Being written: not a last line without a newline, but the start of one.
                partial.clear();
                skipping = 0;
            }
            self.holding.store(false, Ordering::Relaxed);
            if !self.follow || rotated.is_some() {
                // A finished file: a last line without a newline is still a line.
                let last = std::mem::take(&mut partial);
                let end = o.offset + last.len() as u64 + skipping;
                let mut lines = Lines::default();
                if skipping > 0 {
                    self.skips
                        .oversized(&mut lines, skipping + last.len() as u64, o.offset);
                } else {
                    self.skips.push(&mut lines, &last, o.offset);
                }
                if end != o.offset {
                    o.offset = end;
                    self.skips.settle(&mut lines);
                    let (lines, at) = lines.take(false);
                    let _ = self.tx.send(Msg::Lines {
                        source: Arc::clone(&self.name),
                        lines,
                        at,
                        position: Some(o.position(end)),
                        atomic: false,
                        done: None,
                        hold: None,
                    });
                }
                if let Ok(m) = o.reader.get_ref().metadata() {
                    self.lag.set(m.len().saturating_sub(end) as i64);
                }
                if !self.follow {
                    tracing::info!(source = &*self.name, "reached the end of the file");
                    return;
                }
                tracing::info!(source = &*self.name, "file rotated; following the new one");
                cur = None;
                continue;
            }
            // At the end: look for truncation or rotation, else wait for more.
            match std::fs::metadata(&self.path) {
                Ok(m) if file_id(&m) != o.id => {
                    // Rotated: what is written to the old file until it stops growing is
                    // read first, then the new file.
                    tracing::info!(
                        source = &*self.name,
                        wait = ?self.rotate_wait,
                        "file rotated; reading the old one until it has stopped growing"
                    );
                    rotated = Some(Instant::now());
                    rotated_at = rotated;
                    // Only a regular file: opening a FIFO blocks until a writer comes.
                    next = m
                        .is_file()
                        .then(|| File::open(&self.path).ok())
                        .flatten()
                        .filter(|f| {
                            f.metadata()
                                .is_ok_and(|m| m.is_file() && file_id(&m) != o.id)
                        });
                    continue;
                }
                Ok(m)
                    if m.len() >= o.offset
                        && m.len() < o.offset + partial.len() as u64 + skipping =>
                {
                    // Only the unfinished last line was cut (a writer trimming its torn
                    // tail after a crash): what was read before it stands.
                    tracing::info!(
                        source = &*self.name,
                        offset = o.offset,
                        "file cut back within its unfinished last line; that part is dropped"
                    );
                    partial.clear();
                    skipping = 0;
                    self.lag.set((m.len() - o.offset) as i64);
                    if o.reader.seek(SeekFrom::Start(o.offset)).is_err() {
                        resume = Some(o.position(o.offset));
                        cur = None;
                    }
                    continue;
                }
                Ok(m) if m.len() < o.offset + partial.len() as u64 + skipping => {
                    tracing::info!(
                        source = &*self.name,
                        "file truncated; reading from the start"
                    );
                    partial.clear();
                    skipping = 0;
                    if o.reader.seek(SeekFrom::Start(0)).is_err() {
                        cur = None;
                        continue;
                    }
                    // Stored at once: a restart must not resume this file at the old
                    // offset once it has grown past it again.
                    o.offset = 0;
                    let msg = Msg::Lines {
                        source: Arc::clone(&self.name),
                        lines: Vec::new(),
                        at: LineAt::Unknown,
                        position: Some(o.position(0)),
                        atomic: false,
                        done: None,
                        hold: None,
                    };
                    if self.tx.send(msg).is_err() {
                        return;
                    }
                    continue;
                }
                _ => {}
            }
            std::thread::sleep(POLL);
        }
    }

    /// Opens the file at the path, or `next` (opened when a rotation was seen).
    fn open(&self, resume: Option<Position>, next: Option<File>) -> std::io::Result<Open> {
        let mut f = match next {
            Some(f) => f,
            None => {
                // Before the open: opening a FIFO blocks until a writer comes (and so
                // would the shutdown); opening a directory succeeds, and every read of
                // it fails.
                if !std::fs::metadata(&self.path)?.is_file() {
                    return Err(std::io::Error::other("not a regular file"));
                }
                File::open(&self.path)?
            }
        };
        let meta = f.metadata()?;
        let id = file_id(&meta);
        let mut offset = 0;
        if let Some(p) = resume {
            match same_file(&f, meta.len(), &id, &p) {
                Resume::At(o) => offset = o,
                Resume::Moved(o) => {
                    tracing::info!(
                        source = &*self.name,
                        stored_offset = o,
                        "the file's device number changed (a remount, a reboot?); its inode and contents match the stored position, so reading resumes there"
                    );
                    offset = o;
                }
                Resume::Shorter => tracing::info!(
                    source = &*self.name,
                    "file shorter than the stored offset (truncated); reading from the start"
                ),
                Resume::Different => {
                    // Rotated while stopped (what the old file got after the stored
                    // offset is under another name now, and is not read), or deleted and
                    // created again, or rewritten.
                    tracing::warn!(
                        source = &*self.name,
                        stored_offset = p.offset,
                        "a different file than the stored position (rotated or replaced while stopped); reading the new one from its start, lines added to the old one after the stored offset are not read"
                    );
                }
            }
        }
        f.seek(SeekFrom::Start(offset))?;
        Ok(Open {
            reader: BufReader::with_capacity(1 << 16, f),
            id,
            offset,
        })
    }
}

/// What [`next_line`] found.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// A complete line (with its newline) is in the buffer.
    Line,
    /// A line longer than [`MAX_LINE`] ended; it was skipped: this many bytes.
    Oversized(u64),
    /// Part of a line was read; call again.
    More,
    /// Nothing more to read for now.
    End,
}

/// Reads at most one buffer's worth towards the next line: into `partial` while the line
/// fits in [`MAX_LINE`], otherwise only counting its bytes in `skipping`, so a line without
/// end never takes more memory than that. One `fill_buf` per call, so the caller can act
/// before a read that may block.
fn next_line(
    r: &mut impl BufRead,
    partial: &mut Vec<u8>,
    skipping: &mut u64,
) -> std::io::Result<Step> {
    let buf = r.fill_buf()?;
    if buf.is_empty() {
        return Ok(Step::End);
    }
    let (n, ends) = match buf.iter().position(|&b| b == b'\n') {
        Some(i) => (i + 1, true),
        None => (buf.len(), false),
    };
    let step = if *skipping > 0 || partial.len() + n > MAX_LINE {
        *skipping += (partial.len() + n) as u64;
        partial.clear();
        if ends {
            Step::Oversized(std::mem::take(skipping))
        } else {
            Step::More
        }
    } else {
        partial.extend_from_slice(&buf[..n]);
        if ends { Step::Line } else { Step::More }
    };
    r.consume(n);
    Ok(step)
}

/// Whether `file` was modified within `wait` of now (or when that cannot be told).
fn written_within(file: &File, wait: Duration) -> bool {
    file.metadata()
        .and_then(|m| m.modified())
        .map_or(true, |t| t.elapsed().map_or(true, |age| age < wait))
}

/// Adds a line's text, unless it is blank: whether it was added, `None` if it is not
/// UTF-8 (not added).
fn push_line(lines: &mut Vec<String>, raw: &[u8]) -> Option<bool> {
    let text = std::str::from_utf8(raw).ok()?;
    // ASCII whitespace only, as `replay` reads blank lines: a no-break space is text.
    let t = text.trim_ascii();
    if !t.is_empty() {
        lines.push(t.to_string());
    }
    Some(!t.is_empty())
}

/// Reads stdin to its end, or until `stop`. Lines read are sent before any read that may
/// block, so none waits on input that has not come; and stdin is read only once poll(2)
/// says a read will not block, so a stop is seen within [`STDIN_POLL`] and nothing read
/// from the pipe is left unsent (it could not be read again after a restart).
pub fn run_stdin(name: Arc<str>, tx: SyncSender<Msg>, stop: Arc<AtomicBool>, skips: Skips) {
    let mut skips = Skips {
        by_line: true,
        ..skips
    };
    let stdin = std::io::stdin();
    // Reads of 64 KiB bypass std's own (smaller) stdin buffer, so what poll(2) does not
    // see is only ever in this one.
    let mut reader = BufReader::with_capacity(1 << 16, stdin.lock());
    let mut partial = Vec::new();
    let mut skipping = 0u64;
    let mut lines = Lines::default();
    // The number of the line being read.
    let mut number = 1u64;
    let send = |lines: &mut Lines, skips: &Skips| {
        skips.settle(lines);
        lines.is_empty() || {
            let (lines, at) = lines.take(true);
            tx.send(Msg::Lines {
                source: Arc::clone(&name),
                lines,
                at,
                position: None,
                atomic: false,
                done: None,
                hold: None,
            })
            .is_ok()
        }
    };
    loop {
        if reader.buffer().is_empty() {
            if !send(&mut lines, &skips) {
                return;
            }
            if !readable(&stdin, &stop, || skips.log.flush(false)) {
                let held = partial.len() as u64 + skipping;
                if held > 0 {
                    tracing::warn!(
                        source = &*name,
                        line = number,
                        bytes = held,
                        "stopping in the middle of a stdin line; its start is dropped"
                    );
                } else {
                    tracing::info!(source = &*name, "stdin intake stopped");
                }
                return;
            }
        } else if lines.full() && !send(&mut lines, &skips) {
            return;
        }
        let step = next_line(&mut reader, &mut partial, &mut skipping).unwrap_or_else(|e| {
            tracing::warn!(source = &*name, error = %e, "stdin read failed");
            Step::End
        });
        match step {
            Step::Line => {
                skips.push(&mut lines, &partial, number);
                partial.clear();
                number += 1;
            }
            Step::Oversized(n) => {
                skips.oversized(&mut lines, n, number);
                number += 1;
            }
            Step::More => {}
            Step::End => {
                // A last line without a newline is still a line.
                if skipping > 0 {
                    skips.oversized(&mut lines, skipping + partial.len() as u64, number);
                } else {
                    skips.push(&mut lines, &partial, number);
                }
                send(&mut lines, &skips);
                tracing::info!(source = &*name, "stdin closed");
                return;
            }
        }
    }
}

/// How long stdin is polled before `stop` is looked at again.
const STDIN_POLL: Duration = Duration::from_millis(100);

/// Waits until a read of `fd` will not block (data, end of input or an error to report):
/// true; or until `stop`: false.
/// `idle` runs between polls (the skip warnings' summary is due even on a quiet stdin).
fn readable(fd: &impl std::os::fd::AsFd, stop: &AtomicBool, mut idle: impl FnMut()) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let timeout = Timespec {
        tv_sec: STDIN_POLL.as_secs() as _,
        tv_nsec: STDIN_POLL.subsec_nanos() as _,
    };
    loop {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        idle();
        let mut fds = [PollFd::new(fd, PollFlags::IN)];
        match poll(&mut fds, Some(&timeout)) {
            Ok(0) | Err(rustix::io::Errno::INTR) => {}
            // Readable, hung up or invalid: the read says which.
            Ok(_) => return true,
            // (Out of memory, say: a read now might block past a stop.)
            Err(_) => std::thread::sleep(STDIN_POLL),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::mpsc::{Receiver, sync_channel};
    use std::time::Instant;

    fn read_all(input: &[u8], cap: usize) -> (Vec<String>, Vec<u64>, Vec<u8>, u64) {
        let mut r = BufReader::with_capacity(cap, input);
        let (mut partial, mut skipping) = (Vec::new(), 0);
        let (mut lines, mut oversized) = (Vec::new(), Vec::new());
        loop {
            match next_line(&mut r, &mut partial, &mut skipping).unwrap() {
                Step::Line => {
                    push_line(&mut lines, &partial);
                    partial.clear();
                }
                Step::Oversized(n) => oversized.push(n),
                Step::More => assert!(partial.len() <= MAX_LINE),
                Step::End => return (lines, oversized, partial, skipping),
            }
        }
    }

    #[test]
    fn lines_are_bounded_and_oversized_ones_skipped_whole() {
        let mut input = b"{\"a\":1}\r\n\n  \n".to_vec();
        input.extend(vec![b'x'; MAX_LINE + 10]);
        input.extend(b"\n{\"b\":2}\n{\"c\":");
        let (lines, oversized, partial, skipping) = read_all(&input, 1 << 16);
        assert_eq!(lines, [r#"{"a":1}"#, r#"{"b":2}"#]);
        assert_eq!(oversized, [MAX_LINE as u64 + 11]);
        assert_eq!((partial, skipping), (b"{\"c\":".to_vec(), 0));
        // A line at the limit, newline included, is kept.
        let mut input = vec![b' '; MAX_LINE - 3];
        input.extend(b"{}\n");
        assert_eq!(read_all(&input, 4096).0, ["{}"]);
        // An endless line is counted, not held.
        let (_, oversized, partial, skipping) = read_all(&vec![b'y'; MAX_LINE + 5], 4096);
        assert_eq!((oversized.len(), partial.len()), (0, 0));
        assert_eq!(skipping, MAX_LINE as u64 + 5);
    }

    fn lines_until(rx: &Receiver<Msg>, want: usize) -> (Vec<String>, Option<Position>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let (mut got, mut pos) = (Vec::new(), None);
        while got.len() < want {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Msg::Lines {
                    lines, position, ..
                }) => {
                    got.extend(lines);
                    pos = position.or(pos);
                }
                Ok(_) => {}
                Err(e) => panic!("{e}; got {got:?}"),
            }
        }
        (got, pos)
    }

    /// A source following `path`, running on a thread of its own.
    struct Following {
        rx: Receiver<Msg>,
        stop: Arc<AtomicBool>,
        holding: Arc<AtomicBool>,
        lag: prometheus::IntGauge,
        thread: std::thread::JoinHandle<()>,
    }

    fn follow(path: &std::path::Path, rotate_wait: Duration) -> Following {
        let (tx, rx) = sync_channel(16);
        let (stop, holding) = (Arc::new(AtomicBool::new(false)), Arc::default());
        let lag = prometheus::IntGauge::new("lag", "lag").unwrap();
        let src = FileSource {
            name: Arc::from("f"),
            path: path.to_path_buf(),
            follow: true,
            start: None,
            tx,
            stop: Arc::clone(&stop),
            lag: lag.clone(),
            skips: Skips::new(&crate::daemon::metrics::Metrics::new(), "f"),
            rotate_wait,
            holding: Arc::clone(&holding),
        };
        let thread = std::thread::spawn(move || src.run());
        Following {
            rx,
            stop,
            holding,
            lag,
            thread,
        }
    }

    /// Only ASCII whitespace makes a blank line, as `replay` reads them: a line of a
    /// no-break space is a (bad) line, not skipped unseen.
    #[test]
    fn only_ascii_whitespace_is_blank() {
        let mut lines = Vec::new();
        assert_eq!(push_line(&mut lines, b" \t\r"), Some(false));
        assert_eq!(push_line(&mut lines, "\u{a0}".as_bytes()), Some(true));
        assert_eq!(push_line(&mut lines, b" {} \r"), Some(true));
        assert_eq!(lines, ["\u{a0}", "{}"]);
    }

    /// Reads a file to its end from `start`: the messages sent, (lines, position).
    fn read_messages(
        path: &std::path::Path,
        start: Option<Position>,
    ) -> Vec<(Vec<String>, Option<Position>)> {
        let (tx, rx) = sync_channel(64);
        FileSource {
            name: Arc::from("f"),
            path: path.to_path_buf(),
            follow: false,
            start,
            tx,
            stop: Arc::new(AtomicBool::new(false)),
            lag: prometheus::IntGauge::new("lag", "lag").unwrap(),
            skips: Skips::new(&crate::daemon::metrics::Metrics::new(), "f"),
            rotate_wait: ROTATE_WAIT,
            holding: Arc::default(),
        }
        .run();
        rx.try_iter()
            .filter_map(|m| match m {
                Msg::Lines {
                    lines, position, ..
                } => Some((lines, position)),
                _ => None,
            })
            .collect()
    }

    /// Reads a file to its end from `start`: its lines and the last position sent.
    fn read_from(path: &std::path::Path, start: Option<Position>) -> (Vec<String>, Position) {
        let (mut lines, mut pos) = (Vec::new(), None);
        for (l, p) in read_messages(path, start) {
            lines.extend(l);
            pos = p.or(pos);
        }
        (lines, pos.expect("a position"))
    }

    /// A file replaced while stopped by one that got the same inode (here: rewritten in
    /// place, as copytruncate does) is told apart by its first bytes and read from its
    /// start; the same file, grown, resumes at the stored offset.
    #[test]
    fn a_file_replaced_under_the_same_inode_is_read_from_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        std::fs::write(&path, "{\"n\":1}\n{\"n\":2}\n").unwrap();
        let (_, pos) = read_from(&path, None);
        assert_eq!(pos.offset, 16);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"{\"n\":3}\n").unwrap();
        let (lines, grown) = read_from(&path, Some(pos));
        assert_eq!(lines, [r#"{"n":3}"#]);
        // Rewritten in place while stopped: the same inode, longer than the offset.
        std::fs::write(&path, "{\"m\":1}\n{\"m\":2}\n{\"m\":3}\n{\"m\":4}\n").unwrap();
        let (lines, _) = read_from(&path, Some(grown));
        assert_eq!(
            lines,
            [r#"{"m":1}"#, r#"{"m":2}"#, r#"{"m":3}"#, r#"{"m":4}"#]
        );
    }

    /// The bytes before the stored offset are part of the file's identity: a file
    /// rewritten in place with the same first bytes (a constant envelope, say) and grown
    /// past the offset is read from its start, not resumed in the middle of other lines.
    #[test]
    fn a_rewrite_with_the_same_first_bytes_is_told_by_the_bytes_before_the_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let envelope = format!("{{\"specversion\":\"1.0\",\"pad\":\"{}\"", "p".repeat(300));
        let line = |n: u32| format!("{envelope},\"n\":{n}}}\n");
        std::fs::write(&path, format!("{}{}", line(1), line(2))).unwrap();
        let (_, pos) = read_from(&path, None);
        // Rewritten in place: the same inode and first 256 bytes, other lines, longer.
        std::fs::write(&path, format!("{}{}{}", line(7), line(8), line(9))).unwrap();
        let (lines, _) = read_from(&path, Some(pos.clone()));
        assert_eq!(lines.len(), 3, "{lines:?}");
        // Appended to instead: resumed at the offset.
        std::fs::write(&path, format!("{}{}{}", line(1), line(2), line(3))).unwrap();
        let (lines, _) = read_from(&path, Some(pos));
        assert_eq!(lines, [line(3).trim_end()]);
    }

    /// A file whose device number changed (a volume mounted again) but whose inode and
    /// bytes match the stored position resumes there; without hashed bytes to go by (a
    /// position stored by an older version), another device means another file.
    #[test]
    fn a_changed_device_number_alone_does_not_reread_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        std::fs::write(&path, "{\"n\":1}\n{\"n\":2}\n").unwrap();
        let (_, pos) = read_from(&path, None);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"n\":3}\n")
            .unwrap();
        let stored = parse_id(&pos.file_id).unwrap();
        let moved = |file_id: String| Position {
            file_id,
            offset: pos.offset,
        };
        let other_dev = pos.file_id.replacen(stored.dev, "4242", 1);
        assert_eq!(read_from(&path, Some(moved(other_dev))).0, [r#"{"n":3}"#]);
        // A position stored before prints were kept, on another device.
        let bare = format!("4242:{}", stored.ino);
        assert_eq!(read_from(&path, Some(moved(bare))).0.len(), 3);
        // One stored with the first bytes' print only (before the bytes before the
        // offset were printed too), on the same device: resumed.
        let (n, h) = stored.head.unwrap();
        let head_only = format!("{}:{}:{n}:{h}", stored.dev, stored.ino);
        assert_eq!(read_from(&path, Some(moved(head_only))).0, [r#"{"n":3}"#]);
        // Another inode, the same bytes: another file.
        let other_ino = format!("{}:1:{n}:{h}:{}", stored.dev, stored.tail.unwrap());
        assert_eq!(read_from(&path, Some(moved(other_ino))).0.len(), 3);
    }

    /// Messages are bounded in bytes as well as in lines: the core's queue of them must
    /// not hold gigabytes when lines are long.
    #[test]
    fn long_lines_make_small_messages() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let line = format!("{{\"pad\":\"{}\"}}\n", "x".repeat(100 << 10));
        std::fs::write(&path, line.repeat(20)).unwrap();
        let sizes: Vec<usize> = read_messages(&path, None)
            .iter()
            .map(|(lines, _)| lines.iter().map(String::len).sum())
            .collect();
        assert_eq!(
            sizes.iter().sum::<usize>(),
            20 * (line.len() - 1),
            "{sizes:?}"
        );
        assert!(
            sizes.iter().all(|&n| n < CHUNK_BYTES + line.len()),
            "{sizes:?}"
        );
    }

    /// A long run of lines that make no event (blank here) still makes messages, each
    /// with its position: a restart does not read it all again.
    #[test]
    fn a_long_run_of_blank_lines_stores_positions_on_the_way() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let blank = format!("{}\n", " ".repeat(1023)).repeat(3 * SCAN_BYTES as usize / 1024);
        std::fs::write(&path, format!("{blank}{{}}\n")).unwrap();
        let offsets: Vec<u64> = read_messages(&path, None)
            .iter()
            .filter_map(|(_, p)| p.as_ref().map(|p| p.offset))
            .collect();
        assert!(offsets.len() >= 3, "{offsets:?}");
        assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
        assert_eq!(offsets.last(), Some(&(3 * SCAN_BYTES + 3)));
    }

    /// A file rotated in and out again while the old one is being finished is still read:
    /// it was opened when the rotation was seen, and is read through that handle, between
    /// the old file and the one the path names now. Meanwhile the source holds the clock.
    #[test]
    fn a_file_rotated_away_before_its_turn_is_read_all_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        std::fs::write(&path, "{\"n\":1}\n").unwrap();
        let Following {
            rx,
            stop,
            holding,
            thread: t,
            ..
        } = follow(&path, Duration::from_secs(2));
        assert_eq!(lines_until(&rx, 1).0, [r#"{"n":1}"#]);
        std::fs::rename(&path, dir.path().join("events.jsonl.1")).unwrap();
        std::fs::write(&path, "{\"n\":2}\n").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !holding.load(Ordering::Relaxed) {
            assert!(Instant::now() < deadline, "the rotation never seen");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Rotated again before the old file's wait is over.
        std::fs::rename(&path, dir.path().join("events.jsonl.2")).unwrap();
        std::fs::write(&path, "{\"n\":3}\n").unwrap();
        assert_eq!(lines_until(&rx, 2).0, [r#"{"n":2}"#, r#"{"n":3}"#]);
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap();
    }

    /// A rotated file that a writer keeps appending to (it never reopens the path) is read
    /// for a bounded time, then the new one: its lines are not held back for good, and
    /// while they wait the lag counts them.
    #[test]
    fn a_rotated_file_still_written_to_does_not_hold_the_new_one_for_good() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        std::fs::write(&path, "{\"n\":0}\n").unwrap();
        let wait = Duration::from_millis(100);
        let Following {
            rx,
            stop,
            lag,
            thread: t,
            ..
        } = follow(&path, wait);
        assert_eq!(lines_until(&rx, 1).0, [r#"{"n":0}"#]);
        let mut old = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::fs::rename(&path, dir.path().join("events.jsonl.1")).unwrap();
        let pad = "x".repeat(1000);
        std::fs::write(&path, format!("{{\"new\":1,\"pad\":\"{pad}\"}}\n")).unwrap();
        let deadline = Instant::now() + wait * ROTATE_WAITS_AT_MOST * 5;
        let mut lagging = false;
        loop {
            assert!(Instant::now() < deadline, "the new file was never read");
            writeln!(old, "{{\"old\":1}}").unwrap();
            lagging |= lag.get() >= 1000;
            match rx.recv_timeout(wait / 4) {
                Ok(Msg::Lines { lines, .. }) if lines.iter().any(|l| l.contains("new")) => break,
                _ => {}
            }
        }
        assert!(lagging, "the new file's line was not counted as lag");
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap();
    }

    /// A rotated file whose writer stopped long ago is finished as a finished file (its
    /// last line without a newline is a line) even when a busy core kept its reader
    /// waiting past the bound on how long a rotated file still written to is read.
    #[test]
    fn a_rotated_file_read_late_behind_a_busy_core_keeps_its_last_line() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        std::fs::write(&path, "{\"n\":0}\n").unwrap();
        // Long enough for the lines below to be written before the rotated file would
        // be finished unwritten.
        let wait = Duration::from_millis(300);
        let Following {
            rx,
            stop,
            holding,
            thread: t,
            ..
        } = follow(&path, wait);
        assert_eq!(lines_until(&rx, 1).0, [r#"{"n":0}"#]);
        let mut old = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::fs::rename(&path, dir.path().join("events.jsonl.1")).unwrap();
        std::fs::write(&path, "{\"new\":1}\n").unwrap();
        // The rotation is seen (the new file's line waits behind the old one).
        let deadline = Instant::now() + Duration::from_secs(10);
        while !holding.load(Ordering::Relaxed) {
            assert!(Instant::now() < deadline, "the rotation was never seen");
            std::thread::sleep(Duration::from_millis(5));
        }
        // More than the channel holds, then a last line without a newline; then nobody
        // takes lines for longer than the bound (the busy core).
        let line = format!("{{\"old\":1,\"pad\":\"{}\"}}\n", "x".repeat(100));
        for _ in 0..30_000 {
            old.write_all(line.as_bytes()).unwrap();
        }
        write!(old, "{{\"last\":1}}").unwrap();
        drop(old);
        std::thread::sleep(wait * ROTATE_WAITS_AT_MOST + Duration::from_secs(1));
        let mut got = Vec::new();
        while !got.iter().any(|l: &String| l.contains("new")) {
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(Msg::Lines { lines, .. }) => got.extend(lines),
                Ok(_) => {}
                Err(e) => panic!("{e}: the new file was never read"),
            }
        }
        assert_eq!(got.len(), 30_002, "every line of both files, once");
        assert_eq!(got[30_000], r#"{"last":1}"#);
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap();
    }

    /// The position of the file followed after a rotation is stored as soon as it is
    /// opened, before it has a line: a restart then resumes it, not the old one.
    #[test]
    fn the_new_file_after_a_rotation_has_its_position_stored_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        std::fs::write(&path, "{\"n\":0}\n").unwrap();
        let Following {
            rx,
            stop,
            thread: t,
            ..
        } = follow(&path, Duration::from_millis(50));
        assert_eq!(lines_until(&rx, 1).0, [r#"{"n":0}"#]);
        std::fs::rename(&path, dir.path().join("events.jsonl.1")).unwrap();
        std::fs::write(&path, "").unwrap();
        let new = file_id(&std::fs::metadata(&path).unwrap());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Msg::Lines {
                    position: Some(p), ..
                }) if p.file_id == new => {
                    assert_eq!(p.offset, 0);
                    break;
                }
                Ok(_) => {}
                Err(e) => panic!("no position stored for the new file: {e}"),
            }
        }
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap();
    }

    /// A line without end (a preallocated file of zeros, say) does not keep the source
    /// from seeing the stop flag: it is skipped a bounded stretch at a time.
    #[test]
    fn a_stop_is_seen_while_an_endless_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        // Sparse: 64 GiB of zeros without a newline, taking no disk space.
        std::fs::File::create(&path)
            .unwrap()
            .set_len(64 << 30)
            .unwrap();
        // (The receiver kept: a source whose core is gone stops.)
        let Following {
            rx: _rx,
            stop,
            lag,
            thread: t,
            ..
        } = follow(&path, ROTATE_WAIT);
        // Said after each stretch read, where the stop flag is looked at too.
        let deadline = Instant::now() + Duration::from_secs(20);
        while lag.get() != 64 << 30 {
            assert!(
                Instant::now() < deadline,
                "no stretch of the line ever ended"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::Relaxed);
        while !t.is_finished() {
            assert!(Instant::now() < deadline, "the stop was not seen");
            std::thread::sleep(Duration::from_millis(10));
        }
        t.join().unwrap();
    }

    /// The first bytes are hashed anew for every position stored: after the start of the
    /// file is rewritten in place, the stored position still names this file.
    #[test]
    fn a_position_stored_after_an_in_place_rewrite_still_names_the_file() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let pad = "x".repeat(300);
        std::fs::write(&path, format!("{{\"n\":1,\"pad\":\"{pad}\"}}\n")).unwrap();
        let Following {
            rx,
            stop,
            thread: t,
            ..
        } = follow(&path, ROTATE_WAIT);
        assert_eq!(lines_until(&rx, 1).0.len(), 1);
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_at(b"{\"n\":9", 0).unwrap();
        drop(f);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"n\":2}\n")
            .unwrap();
        let (_, pos) = lines_until(&rx, 1);
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap();
        let pos = pos.unwrap();
        let f = File::open(&path).unwrap();
        let meta = f.metadata().unwrap();
        assert_eq!(
            same_file(&f, meta.len(), &file_id(&meta), &pos),
            Resume::At(pos.offset)
        );
    }

    /// A file cut back only within its unfinished last line (a writer trimming its torn
    /// tail after a crash) is read on from the last whole line, not again from the start.
    #[test]
    fn a_torn_last_line_cut_off_is_dropped_and_reading_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        std::fs::write(&path, "{\"n\":1}\n{\"n\":").unwrap();
        let Following {
            rx,
            stop,
            lag,
            thread: t,
            ..
        } = follow(&path, ROTATE_WAIT);
        assert_eq!(lines_until(&rx, 1).0, [r#"{"n":1}"#]);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(8)
            .unwrap();
        // The lag of the unfinished line goes only when the cut is handled.
        let deadline = Instant::now() + Duration::from_secs(10);
        while lag.get() != 0 {
            assert!(Instant::now() < deadline, "the cut never seen");
            std::thread::sleep(Duration::from_millis(10));
        }
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"n\":2}\n")
            .unwrap();
        assert_eq!(lines_until(&rx, 1).0, [r#"{"n":2}"#]);
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap();
    }

    /// A rotated file is read until it has stopped growing (its writer may finish a line
    /// in it after the rename), last unterminated line included, before the new one; a
    /// truncation stores the offset 0 at once.
    #[test]
    fn rotation_finishes_the_old_file_and_truncation_stores_the_new_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        std::fs::write(&path, "{\"n\":1}\n{\"n\":").unwrap();
        let mut writer = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        let Following {
            rx,
            stop,
            holding,
            thread: t,
            ..
        } = follow(&path, ROTATE_WAIT);
        assert_eq!(lines_until(&rx, 1).0, [r#"{"n":1}"#]);
        std::fs::rename(&path, dir.path().join("events.jsonl.1")).unwrap();
        std::fs::write(&path, "{\"n\":3}\n{\"n\":4}\n").unwrap();
        // The writer finishes its line in the old file after the rotation was seen (the
        // source holds the clock from then until the old file is done).
        let deadline = Instant::now() + Duration::from_secs(10);
        while !holding.load(Ordering::Relaxed) {
            assert!(Instant::now() < deadline, "the rotation never seen");
            std::thread::sleep(Duration::from_millis(10));
        }
        writer.write_all(b"2}\n{\"n\":2.5}").unwrap();
        let (got, pos) = lines_until(&rx, 4);
        assert_eq!(
            got,
            [r#"{"n":2}"#, r#"{"n":2.5}"#, r#"{"n":3}"#, r#"{"n":4}"#]
        );
        let new_id = file_id(&std::fs::metadata(&path).unwrap());
        let pos = pos.unwrap();
        let stored = parse_id(&pos.file_id).unwrap();
        assert_eq!(
            (format!("{}:{}", stored.dev, stored.ino), pos.offset),
            (new_id, 16)
        );
        // Truncated: the position goes back to 0 before anything new is read.
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap()
            .flush()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Msg::Lines { position, .. } = rx.recv_timeout(left).unwrap()
                && position.map(|p| p.offset) == Some(0)
            {
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        drop(rx);
        t.join().unwrap();
    }

    /// A line that is not UTF-8 is skipped and counted (received and rejected), not read
    /// with replacement characters into a key other bad lines would share.
    #[test]
    fn a_line_that_is_not_utf8_is_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        // A byte order mark first, then a line that is not UTF-8.
        std::fs::write(
            &path,
            b"\xEF\xBB\xBF{\"n\":1}\n{\"k\":\"\xff\xfe\"}\n{\"n\":2}",
        )
        .unwrap();
        let (tx, rx) = sync_channel(16);
        let metrics = crate::daemon::metrics::Metrics::new();
        let src = FileSource {
            name: Arc::from("f"),
            path,
            follow: false,
            start: None,
            tx,
            stop: Arc::new(AtomicBool::new(false)),
            lag: prometheus::IntGauge::new("lag", "lag").unwrap(),
            skips: Skips::new(&metrics, "f"),
            rotate_wait: ROTATE_WAIT,
            holding: Arc::default(),
        };
        let lag = src.lag.clone();
        let t = std::thread::spawn(move || src.run());
        let (got, pos) = lines_until(&rx, 2);
        assert_eq!(got, [r#"{"n":1}"#, r#"{"n":2}"#]);
        t.join().unwrap();
        // The last line has no newline: read all the same, and nothing is left to read.
        assert_eq!((pos.map(|p| p.offset), lag.get()), (Some(29), 0));
        let rejected = metrics
            .events_rejected
            .with_label_values(&["f", "invalid_json"])
            .get();
        let received = metrics.events_received.with_label_values(&["f"]).get();
        assert_eq!((rejected, received), (1, 1));
    }

    /// Skipped lines count when the stretch they were read in is sent, once: a stretch
    /// dropped to be read again (after a read error) counts nothing.
    #[test]
    fn skipped_lines_count_once_with_the_stretch_they_were_read_in() {
        let metrics = crate::daemon::metrics::Metrics::new();
        let mut skips = Skips::new(&metrics, "f");
        let counts = || {
            let rejected = |why| metrics.events_rejected.with_label_values(&["f", why]).get();
            let received = metrics.events_received.with_label_values(&["f"]).get();
            (received, rejected("oversized"), rejected("invalid_json"))
        };
        let read = |skips: &mut Skips| {
            let mut lines = Lines::default();
            skips.oversized(&mut lines, MAX_LINE as u64 + 1, 0);
            skips.push(&mut lines, b"{\"k\":\"\xff\"}", 100);
            skips.push(&mut lines, b"{}", 200);
            lines
        };
        drop(read(&mut skips));
        assert_eq!(counts(), (0, 0, 0));
        let mut lines = read(&mut skips);
        skips.settle(&mut lines);
        skips.settle(&mut lines);
        assert_eq!(counts(), (2, 1, 1));
        assert_eq!(lines.take(false).0, ["{}"]);
    }
}
