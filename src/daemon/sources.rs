//! Line sources that run on their own threads: a JSON-lines file followed like `tail -F`
//! (appends, truncation, rename-and-recreate rotation; resumes from the committed offset)
//! and stdin. Each sends batches of complete lines to the core, which stores the file
//! position in the same transaction as the lines' effects.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::time::Duration;

use crate::daemon::core::Msg;
use crate::store::Position;

/// Lines per message to the core.
const CHUNK: usize = 1000;
/// How often a followed file is checked for growth or rotation at its end.
const POLL: Duration = Duration::from_millis(100);
/// The longest line accepted; longer ones are skipped with a warning.
const MAX_LINE: usize = 4 << 20;

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
    /// Lines skipped for being longer than the limit.
    pub oversized: prometheus::IntCounter,
}

struct Open {
    reader: BufReader<File>,
    id: String,
    offset: u64,
}

impl FileSource {
    /// Runs until stopped (or, without `follow`, until the end of the file).
    pub fn run(self) {
        let mut warned_missing = false;
        let mut cur: Option<Open> = None;
        let mut resume = self.start.clone();
        let mut partial: Vec<u8> = Vec::new();
        while !self.stop.load(Ordering::Relaxed) {
            if cur.is_none() {
                // The stored position is used until a file is open: a failed attempt
                // must not make a later one start the same file from its beginning.
                match self.open(resume.clone()) {
                    Ok(o) => {
                        resume = None;
                        warned_missing = false;
                        partial.clear();
                        cur = Some(o);
                    }
                    Err(e) => {
                        if !warned_missing {
                            tracing::warn!(source = &*self.name, path = %self.path.display(), error = %e, "cannot open; will retry");
                            warned_missing = true;
                        }
                        if !self.follow {
                            return;
                        }
                        std::thread::sleep(POLL);
                        continue;
                    }
                }
            }
            let Some(o) = cur.as_mut() else { continue };
            let mut lines = Vec::new();
            let mut consumed = o.offset;
            let mut eof = false;
            while lines.len() < CHUNK {
                let before = partial.len();
                match o.reader.read_until(b'\n', &mut partial) {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(n) => {
                        let _ = before;
                        if partial.ends_with(b"\n") {
                            consumed += partial.len() as u64;
                            if partial.len() > MAX_LINE {
                                self.oversized.inc();
                                tracing::warn!(
                                    source = &*self.name,
                                    bytes = partial.len(),
                                    "skipped an oversized line"
                                );
                            } else {
                                let text = String::from_utf8_lossy(&partial);
                                let t = text.trim();
                                if !t.is_empty() {
                                    lines.push(t.to_string());
                                }
                            }
                            partial.clear();
                        } else {
                            // A line still being written: keep it until its newline.
                            let _ = n;
                            eof = true;
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(source = &*self.name, error = %e, "read failed; reopening");
                        // Reopen where the last sent line ended (what this chunk read so
                        // far was not sent and is read again).
                        resume = Some(Position {
                            file_id: o.id.clone(),
                            offset: o.offset,
                        });
                        cur = None;
                        break;
                    }
                }
            }
            let Some(o) = cur.as_mut() else { continue };
            if let Ok(m) = o.reader.get_ref().metadata() {
                self.lag.set(m.len().saturating_sub(consumed) as i64);
            }
            if consumed != o.offset || !lines.is_empty() {
                o.offset = consumed;
                let msg = Msg::Lines {
                    source: Arc::clone(&self.name),
                    lines,
                    position: Some(Position {
                        file_id: o.id.clone(),
                        offset: consumed,
                    }),
                    atomic: false,
                    done: None,
                };
                if self.tx.send(msg).is_err() {
                    return;
                }
            }
            if !eof {
                continue;
            }
            if !self.follow {
                if !partial.is_empty() {
                    // A finished file whose last line has no newline.
                    let text = String::from_utf8_lossy(&partial).trim().to_string();
                    let offset = o.offset + partial.len() as u64;
                    let _ = self.tx.send(Msg::Lines {
                        source: Arc::clone(&self.name),
                        lines: vec![text],
                        position: Some(Position {
                            file_id: o.id.clone(),
                            offset,
                        }),
                        atomic: false,
                        done: None,
                    });
                }
                tracing::info!(source = &*self.name, "reached the end of the file");
                return;
            }
            // At the end: look for truncation or rotation, else wait for more.
            match std::fs::metadata(&self.path) {
                Ok(m) if file_id(&m) != o.id => {
                    // Rotated: the old handle was read to its end; switch to the new file.
                    tracing::info!(source = &*self.name, "file rotated; following the new one");
                    cur = None;
                    continue;
                }
                Ok(m) if m.len() < o.offset + partial.len() as u64 => {
                    tracing::info!(
                        source = &*self.name,
                        "file truncated; reading from the start"
                    );
                    partial.clear();
                    if o.reader.seek(SeekFrom::Start(0)).is_ok() {
                        o.offset = 0;
                    } else {
                        cur = None;
                    }
                    continue;
                }
                _ => {}
            }
            std::thread::sleep(POLL);
        }
    }

    fn open(&self, resume: Option<Position>) -> std::io::Result<Open> {
        let mut f = File::open(&self.path)?;
        let meta = f.metadata()?;
        let id = file_id(&meta);
        let mut offset = 0;
        if let Some(p) = resume {
            if p.file_id == id && p.offset <= meta.len() {
                offset = p.offset;
            } else if p.file_id == id {
                tracing::info!(
                    source = &*self.name,
                    "file shorter than the stored offset (truncated); reading from the start"
                );
            } else {
                tracing::info!(
                    source = &*self.name,
                    "a different file than the stored position (rotated); reading from the start"
                );
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

/// Reads stdin to its end.
pub fn run_stdin(name: Arc<str>, tx: SyncSender<Msg>, stop: Arc<AtomicBool>) {
    let mut reader = BufReader::with_capacity(1 << 16, std::io::stdin());
    let mut buf = Vec::new();
    let mut lines = Vec::new();
    loop {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        buf.clear();
        let n = match read_line_limited(&mut reader, &mut buf) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(source = &*name, error = %e, "stdin read failed");
                0
            }
        };
        if n > 0 {
            let t = String::from_utf8_lossy(&buf).trim().to_string();
            if !t.is_empty() {
                lines.push(t);
            }
        }
        // Send at the chunk size, at the end, or when no more input is buffered.
        if n == 0 || lines.len() >= CHUNK || reader.buffer().is_empty() {
            if !lines.is_empty() {
                let msg = Msg::Lines {
                    source: Arc::clone(&name),
                    lines: std::mem::take(&mut lines),
                    position: None,
                    atomic: false,
                    done: None,
                };
                if tx.send(msg).is_err() {
                    return;
                }
            }
            if n == 0 {
                tracing::info!(source = &*name, "stdin closed");
                return;
            }
        }
    }
}

fn read_line_limited(
    r: &mut BufReader<std::io::Stdin>,
    buf: &mut Vec<u8>,
) -> std::io::Result<usize> {
    r.by_ref().take(MAX_LINE as u64 + 1).read_until(b'\n', buf)
}
