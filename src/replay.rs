//! `sagawatch replay`: runs recorded events through the rules with in-memory state and
//! prints the outcomes as JSON lines. Several `NAME=FILE` inputs are merged by event time.

use std::fs::File;
use std::io::{self, BufRead, BufReader, IsTerminal, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant as WallInstant;

use crate::engine::{Engine, MemoryState, Outcome};
use crate::event::{BOM, Decoder};
use crate::output::Line;
use crate::rules::{RuleSet, valid_name};
use crate::time::Instant;

/// Where events come from: a file or standard input, with the source name its events carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Input {
    pub source: Option<String>,
    /// `None` is standard input.
    pub path: Option<PathBuf>,
}

impl Input {
    /// Parses `-`, `FILE` or `NAME=FILE`; `default_source` applies to the first two.
    pub fn parse(arg: &str, default_source: Option<&str>) -> Input {
        if let Some((name, file)) = arg.split_once('=')
            && valid_name(name)
            && !file.is_empty()
        {
            return Input {
                source: Some(name.to_string()),
                path: (file != "-").then(|| PathBuf::from(file)),
            };
        }
        Input {
            source: default_source.map(str::to_string),
            path: (arg != "-").then(|| PathBuf::from(arg)),
        }
    }

    fn label(&self) -> String {
        match &self.path {
            Some(p) => p.display().to_string(),
            None => "<stdin>".into(),
        }
    }
}

pub struct Options {
    pub inputs: Vec<Input>,
    pub lateness: i64,
    pub time_field: String,
    pub strict: bool,
    pub lifecycle: bool,
    pub progress: bool,
}

/// Counts reported at the end.
#[derive(Default, Debug)]
pub struct Summary {
    pub events: u64,
    pub skipped: u64,
    pub by_kind: std::collections::BTreeMap<&'static str, u64>,
    pub seconds: f64,
}

/// A bad line under `--strict`.
#[derive(Debug)]
pub struct StrictError(pub String);

impl std::fmt::Display for StrictError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StrictError {}

struct Reader {
    input: Input,
    label: String,
    reader: Box<dyn BufRead>,
    line_no: u64,
    buf: Vec<u8>,
    /// Time of the event in `buf`, when one is loaded.
    head: Option<Instant>,
    done: bool,
    bytes_read: u64,
    /// The line just read was longer than [`MAX_LINE`] (this many bytes), and skipped.
    oversized: Option<usize>,
    /// How many bytes were trimmed from the start of the line in `buf` (a byte order mark,
    /// whitespace): positions within it are reported from the line as written.
    lead: usize,
}

/// The longest line read, as the daemon's file and stdin sources take it: a longer one is
/// skipped (and a file without newlines is not read into memory whole).
const MAX_LINE: usize = 4 << 20;

impl Reader {
    fn open(input: Input) -> anyhow::Result<Reader> {
        let reader: Box<dyn Read> = match &input.path {
            Some(p) => Box::new(
                File::open(p).map_err(|e| anyhow::anyhow!("cannot open {}: {e}", p.display()))?,
            ),
            None => Box::new(io::stdin()),
        };
        Ok(Reader {
            label: input.label(),
            input,
            reader: Box::new(BufReader::with_capacity(1 << 20, reader)),
            line_no: 0,
            buf: Vec::with_capacity(1024),
            head: None,
            done: false,
            bytes_read: 0,
            oversized: None,
            lead: 0,
        })
    }

    /// Reads the next non-blank line into `buf`; false at end of input.
    fn next_line(&mut self) -> anyhow::Result<bool> {
        loop {
            self.buf.clear();
            let failed = |e: io::Error| anyhow::anyhow!("cannot read {}: {e}", self.label);
            // At most MAX_LINE bytes, newline included, as the daemon's sources count.
            let mut n = (&mut self.reader)
                .take(MAX_LINE as u64)
                .read_until(b'\n', &mut self.buf)
                .map_err(failed)?;
            if n == 0 {
                self.done = true;
                return Ok(false);
            }
            // Cut short by the limit, not by the end of the input.
            if n == MAX_LINE
                && self.buf.last() != Some(&b'\n')
                && !self.reader.fill_buf().map_err(failed)?.is_empty()
            {
                n += self.reader.skip_until(b'\n').map_err(failed)?;
                self.buf.clear();
                self.bytes_read += n as u64;
                self.line_no += 1;
                self.oversized = Some(n);
                return Ok(true);
            }
            self.bytes_read += n as u64;
            self.line_no += 1;
            self.lead = 0;
            if self.line_no == 1 && self.buf.starts_with(BOM) {
                self.buf.drain(..BOM.len());
                self.lead = BOM.len();
            }
            if !self.buf.iter().all(u8::is_ascii_whitespace) {
                // Trimmed of ASCII whitespace, as the daemon's sources take lines (JSON
                // itself does not take a form feed around a value).
                let end = self.buf.len()
                    - self
                        .buf
                        .iter()
                        .rev()
                        .take_while(|b| b.is_ascii_whitespace())
                        .count();
                self.buf.truncate(end);
                let start = self
                    .buf
                    .iter()
                    .take_while(|b| b.is_ascii_whitespace())
                    .count();
                self.buf.drain(..start);
                self.lead += start;
                return Ok(true);
            }
        }
    }

    /// Decodes the line just read: an oversized one is an error of its own.
    fn decode<'a>(
        &'a mut self,
        decoder: &Decoder,
        source: Option<&'a str>,
    ) -> Result<crate::event::Event<'a>, String> {
        if let Some(n) = self.oversized.take() {
            return Err(format!(
                "line longer than {} MiB ({n} bytes)",
                MAX_LINE >> 20
            ));
        }
        // As the daemon's sources: a line that is not UTF-8 is not an event, even where
        // the fields the rules read are.
        if let Err(e) = std::str::from_utf8(&self.buf) {
            return Err(format!(
                "not UTF-8 (at byte {} of the line)",
                self.lead + e.valid_up_to() + 1
            ));
        }
        decoder.decode(&self.buf, source).map_err(|e| e.to_string())
    }

    /// Reports a bad line (or fails under `--strict`).
    fn bad_line(&self, e: String, summary: &mut Summary, strict: bool) -> anyhow::Result<()> {
        let msg = format!("{}:{}: {e}", self.label, self.line_no);
        if strict {
            return Err(StrictError(msg).into());
        }
        crate::stderr!("skipped {msg}");
        summary.skipped += 1;
        Ok(())
    }

    /// Reads lines until one decodes (loading it as the head) or input ends.
    fn advance(
        &mut self,
        decoder: &Decoder,
        summary: &mut Summary,
        strict: bool,
    ) -> anyhow::Result<()> {
        self.head = None;
        while !self.done && self.next_line()? {
            match self.decode(decoder, None) {
                Ok(ev) => {
                    self.head = Some(ev.time);
                    return Ok(());
                }
                Err(e) => self.bad_line(e, summary, strict)?,
            }
        }
        Ok(())
    }
}

/// Runs the replay, writing outcome lines to `out`.
pub fn run(rules: Arc<RuleSet>, opts: Options, out: &mut dyn Write) -> anyhow::Result<Summary> {
    let started = WallInstant::now();
    let decoder = Decoder::new(&rules, &opts.time_field);
    let mut engine = Engine::new(Arc::clone(&rules), MemoryState::new(), opts.lateness)
        .with_lifecycle(opts.lifecycle);
    let mut summary = Summary::default();
    let mut readers = Vec::new();
    let mut total_bytes = 0u64;
    for input in &opts.inputs {
        if let Some(p) = &input.path {
            total_bytes += std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        }
        readers.push(Reader::open(input.clone())?);
    }
    let progress = opts.progress
        && total_bytes > 16 << 20
        && io::stderr().is_terminal()
        && opts.inputs.iter().all(|i| i.path.is_some());
    let mut outcomes: Vec<Outcome> = Vec::new();
    let mut last_draw = WallInstant::now();
    let mut draw = |summary: &Summary, readers: &[Reader]| {
        if progress
            && summary.events.is_multiple_of(65_536)
            && last_draw.elapsed().as_millis() >= 200
        {
            last_draw = WallInstant::now();
            let read: u64 = readers.iter().map(|r| r.bytes_read).sum();
            draw_progress(
                read,
                total_bytes,
                summary.events,
                started.elapsed().as_secs_f64(),
            );
        }
    };
    let result: anyhow::Result<()> = (|| {
        if readers.len() == 1 {
            // One input: decode each line once, in order.
            let r = &mut readers[0];
            let source = r.input.source.clone();
            while r.next_line()? {
                match r.decode(&decoder, source.as_deref()) {
                    Ok(ev) => {
                        engine.process(&ev, &mut outcomes);
                        summary.events += 1;
                        write_outcomes(&rules, &mut outcomes, &mut summary, out)?;
                    }
                    Err(e) => r.bad_line(e, &mut summary, opts.strict)?,
                }
                draw(&summary, std::slice::from_ref(r));
            }
        } else {
            for r in &mut readers {
                r.advance(&decoder, &mut summary, opts.strict)?;
            }
        }
        loop {
            // The reader whose head event is earliest; ties go to the earlier input.
            let mut pick: Option<usize> = None;
            for (i, r) in readers.iter().enumerate() {
                if let Some(t) = r.head
                    && pick.is_none_or(|p| t < readers[p].head.unwrap_or(Instant::MAX))
                {
                    pick = Some(i);
                }
            }
            let Some(i) = pick else { break };
            {
                let r = &readers[i];
                let ev = decoder
                    .decode(&r.buf, r.input.source.as_deref())
                    .map_err(|e| anyhow::anyhow!("{}:{}: {e}", r.label, r.line_no))?;
                engine.process(&ev, &mut outcomes);
            }
            summary.events += 1;
            write_outcomes(&rules, &mut outcomes, &mut summary, out)?;
            readers[i].advance(&decoder, &mut summary, opts.strict)?;
            draw(&summary, &readers);
        }
        engine.finish(&mut outcomes);
        write_outcomes(&rules, &mut outcomes, &mut summary, out)?;
        Ok(())
    })();
    if progress {
        eprint!("\r\x1b[2K");
    }
    result?;
    out.flush()?;
    summary.seconds = started.elapsed().as_secs_f64();
    // Freeing a million rows one by one takes longer than the OS takes at exit: drop the
    // state off the caller's path (a process that exits meanwhile skips it entirely).
    std::thread::spawn(move || drop(engine));
    Ok(summary)
}

fn write_outcomes(
    rules: &RuleSet,
    outcomes: &mut Vec<Outcome>,
    summary: &mut Summary,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    for o in outcomes.drain(..) {
        *summary.by_kind.entry(o.kind.name()).or_default() += 1;
        // As an io::Error: a reader gone (`| head`) must be told apart, and serde_json's
        // own error does not chain to it.
        serde_json::to_writer(&mut *out, &Line::new(rules, &o)).map_err(io::Error::from)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

fn draw_progress(read: u64, total: u64, events: u64, secs: f64) {
    let frac = if total == 0 {
        0.0
    } else {
        read as f64 / total as f64
    };
    let width = 30;
    let filled = ((frac * width as f64) as usize).min(width);
    eprint!(
        "\r\x1b[2K[{}{}] {:>3.0}% {} events, {:.0} events/s",
        "#".repeat(filled),
        " ".repeat(width - filled),
        frac * 100.0,
        events,
        events as f64 / secs.max(1e-9)
    );
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rate = self.events as f64 / self.seconds.max(1e-9);
        write!(
            f,
            "replayed {} events ({} skipped) in {:.3}s, {:.0} events/s; outcomes:",
            self.events, self.skipped, self.seconds, rate
        )?;
        if self.by_kind.is_empty() {
            write!(f, " none")?;
        }
        for (k, n) in &self.by_kind {
            write!(f, " {k}={n}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_parse() {
        assert_eq!(
            Input::parse("orders=a.jsonl", None),
            Input {
                source: Some("orders".into()),
                path: Some("a.jsonl".into())
            }
        );
        assert_eq!(
            Input::parse("-", Some("x")),
            Input {
                source: Some("x".into()),
                path: None
            }
        );
        assert_eq!(
            Input::parse("./a=b.jsonl", None),
            Input {
                source: None,
                path: Some("./a=b.jsonl".into())
            }
        );
    }
}
