//! The hub's and init's logs as an operator reads them: one line format for both
//! (`TIME LEVEL SOURCE message`), the tracing layer that writes the hub's lines, the
//! hub's own rotated file when no init keeps one, and reading the last lines of the
//! files and following new ones for `GET /admin/logs`.
//!
//! Where the files are: under the appliance's init, `/data/log/hub.log` (init copies
//! the hub's stderr there) and `/data/log/boot.log` (init's own lines), each rotated
//! to `.1` (hub 4 MiB, boot 1 MiB); init tells the hub with `POS_HUB_LOG_DIR`. Run
//! directly, the hub writes `<data>/log/hub.log` itself (same format, same rotation):
//! files survive a restart and are what `/admin/logs` reads in both cases.
//!
//! Secrets never reach a line: engineioxide (and socketioxide, should it come back) is
//! capped at INFO here whatever `LOG_LEVEL` says (its DEBUG lines carry whole packets:
//! the handshake's `auth` token, event payloads); the hub itself never logs tokens,
//! keys or passwords.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use parking_lot::Mutex;
use serde::Serialize;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

/// The hub's log file.
pub const HUB_LOG: &str = "hub.log";
/// Init's log file (only on the appliance).
pub const BOOT_LOG: &str = "boot.log";
/// The hub's file is rotated to `.1` beyond this (init uses the same figure).
pub const HUB_LOG_MAX: u64 = 4 << 20;

/// The directory of the log files, and whether the hub writes `hub.log` itself.
#[derive(Debug, Clone)]
pub struct LogDir {
    pub dir: PathBuf,
    pub init_keeps_files: bool,
}

impl LogDir {
    /// `POS_HUB_LOG_DIR` (set by init, which keeps the files), else `<data>/log`.
    pub fn for_data_dir(data_dir: &Path) -> Self {
        match std::env::var_os("POS_HUB_LOG_DIR").filter(|v| !v.is_empty()) {
            Some(d) => LogDir {
                dir: PathBuf::from(d),
                init_keeps_files: true,
            },
            None => LogDir {
                dir: data_dir.join("log"),
                init_keeps_files: false,
            },
        }
    }

    /// The files to read, oldest first within each source: (source, path).
    pub fn files(&self) -> Vec<(&'static str, PathBuf)> {
        let p = |n: &str| self.dir.join(n);
        vec![
            ("init", p("boot.log.1")),
            ("init", p(BOOT_LOG)),
            ("hub", p("hub.log.1")),
            ("hub", p(HUB_LOG)),
        ]
    }
}

/// One line: `2026-12-01T10:24:42.123Z INFO  hub/serve message key=value`.
pub fn format_line(ts: SystemTime, level: &str, source: &str, msg: &str) -> String {
    let mut s = String::with_capacity(40 + msg.len());
    let _ = write!(
        s,
        "{} {:<5} {} {}",
        humantime::format_rfc3339_millis(ts),
        level,
        source,
        msg
    );
    s
}

/// Whether a raw line starts with a time in [`format_line`]'s format.
pub fn is_stamped(line: &[u8]) -> bool {
    let head = &line[..line.len().min(40)];
    let t = head.split(|b| *b == b' ').next().unwrap_or(&[]);
    std::str::from_utf8(t).is_ok_and(|t| humantime::parse_rfc3339_weak(t).is_ok())
}

/// A parsed log line.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    /// Milliseconds since the epoch (lines without a time of their own take the
    /// previous line's).
    pub time_ms: i64,
    pub time: String,
    pub level: String,
    pub source: String,
    pub message: String,
}

impl Entry {
    pub fn text(&self) -> String {
        format!(
            "{} {:<5} {} {}",
            self.time, self.level, self.source, self.message
        )
    }
}

const LEVELS: [&str; 5] = ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"];

/// Parses a line in [`format_line`]'s format; anything else (a panic message, an
/// older line) becomes a message of `source` at the previous line's time.
pub fn parse_line(line: &str, source: &str, prev_ms: i64) -> Entry {
    let mut it = line.splitn(2, ' ');
    let (t, rest) = (it.next().unwrap_or(""), it.next().unwrap_or(""));
    if let Ok(ts) = humantime::parse_rfc3339_weak(t) {
        let rest = rest.trim_start();
        let mut it = rest.splitn(2, ' ');
        let (lvl, rest) = (it.next().unwrap_or(""), it.next().unwrap_or(""));
        if LEVELS.contains(&lvl) {
            let rest = rest.trim_start();
            let mut it = rest.splitn(2, ' ');
            let (src, msg) = (it.next().unwrap_or(""), it.next().unwrap_or(""));
            let ms = ts
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0);
            return Entry {
                time_ms: ms,
                time: t.to_string(),
                level: lvl.to_string(),
                source: src.to_string(),
                message: msg.to_string(),
            };
        }
    }
    Entry {
        time_ms: prev_ms,
        time: humantime::format_rfc3339_millis(
            SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(prev_ms.max(0) as u64),
        )
        .to_string(),
        level: "INFO".into(),
        source: source.to_string(),
        message: line.to_string(),
    }
}

/// Reads at most the last `max_bytes` of a file, from the start of a line.
fn read_tail(path: &Path, max_bytes: u64) -> std::io::Result<(String, u64)> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    let start = len.saturating_sub(max_bytes);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::with_capacity((len - start) as usize);
    (&mut f).take(len - start).read_to_end(&mut buf)?;
    let mut text = String::from_utf8_lossy(&buf).into_owned();
    if start > 0 {
        match text.find('\n') {
            Some(i) => {
                text.drain(..=i);
            }
            None => text.clear(),
        }
    }
    Ok((text, len))
}

/// What to read.
#[derive(Debug, Clone, Copy)]
pub struct Query {
    /// The last this many lines (after `since`).
    pub lines: usize,
    /// Only lines at or after this time (ms since the epoch).
    pub since_ms: Option<i64>,
}

/// Where each file was read up to, so a follower starts exactly there.
pub struct Cursor {
    files: Vec<(&'static str, PathBuf, Option<File>, u64, i64)>,
    partial: Vec<String>,
}

/// The newest lines of all the log files, merged by time (newest last), and a
/// cursor at their ends for [`Cursor::poll`].
pub fn read(dir: &LogDir, q: Query) -> (Vec<Entry>, Cursor) {
    // Each file is in time order; the merge is a stable sort by time. Without `since`,
    // each file's last `lines` lines are enough (read about 1 KiB a line, at least
    // 256 KiB); with it, up to 8 MiB of each file.
    let per_file = match q.since_ms {
        Some(_) => 8u64 << 20,
        None => ((q.lines as u64).saturating_mul(1024)).clamp(256 << 10, 8 << 20),
    };
    let mut all: Vec<(usize, Entry)> = Vec::new();
    let mut cursor = Cursor {
        files: Vec::new(),
        partial: Vec::new(),
    };
    for (i, (src, path)) in dir.files().into_iter().enumerate() {
        let handle = File::open(&path).ok();
        let mut prev = 0i64;
        let mut end = 0u64;
        if let Ok((text, len)) = read_tail(&path, per_file) {
            // Only whole lines; a half-written last line is left to the follower.
            let whole = match text.rfind('\n') {
                Some(k) => {
                    end = len - (text.len() - k - 1) as u64;
                    &text[..=k]
                }
                None => {
                    end = len - text.len() as u64;
                    ""
                }
            };
            for line in whole.lines().filter(|l| !l.is_empty()) {
                let e = parse_line(line, src, prev);
                prev = e.time_ms;
                all.push((i, e));
            }
        }
        cursor.files.push((src, path, handle, end, prev));
    }
    all.sort_by_key(|(i, e)| (e.time_ms, *i));
    let mut out: Vec<Entry> = all
        .into_iter()
        .map(|(_, e)| e)
        .filter(|e| q.since_ms.is_none_or(|s| e.time_ms >= s))
        .collect();
    if out.len() > q.lines {
        out.drain(..out.len() - q.lines);
    }
    cursor.partial = vec![String::new(); cursor.files.len()];
    (out, cursor)
}

impl Cursor {
    /// New whole lines since the last call, in time order. Follows a file across its
    /// rotation: the rest of the renamed file is read through the open handle, then
    /// the new file from its start.
    pub fn poll(&mut self) -> Vec<Entry> {
        let mut out = Vec::new();
        for (k, (src, path, handle, pos, prev)) in self.files.iter_mut().enumerate() {
            if path.extension().is_some_and(|e| e == "1") {
                continue; // rotated files only ever shrink into history
            }
            let mut read_from = |f: &mut File, pos: &mut u64, out: &mut Vec<Entry>| {
                if f.seek(SeekFrom::Start(*pos)).is_err() {
                    return;
                }
                let mut buf = Vec::new();
                if let Ok(n) = f.take(1 << 20).read_to_end(&mut buf) {
                    *pos += n as u64;
                    let partial = &mut self.partial[k];
                    partial.push_str(&String::from_utf8_lossy(&buf));
                    while let Some(i) = partial.find('\n') {
                        let line: String = partial.drain(..=i).collect();
                        let line = line.trim_end_matches(['\n', '\r']);
                        if !line.is_empty() {
                            let e = parse_line(line, src, *prev);
                            *prev = e.time_ms;
                            out.push(e);
                        }
                    }
                }
            };
            if let Some(f) = handle.as_mut() {
                read_from(f, pos, &mut out);
            }
            // Rotated or created since: switch to the file now at the path.
            let same = match (handle.as_ref(), std::fs::metadata(&*path)) {
                (Some(f), Ok(m)) => f.metadata().is_ok_and(|fm| {
                    use std::os::unix::fs::MetadataExt;
                    fm.ino() == m.ino() && fm.dev() == m.dev() && m.len() >= *pos
                }),
                (None, Ok(_)) => false,
                (_, Err(_)) => true,
            };
            if !same {
                if let Ok(mut f) = File::open(&*path) {
                    *pos = 0;
                    read_from(&mut f, pos, &mut out);
                    *handle = Some(f);
                }
            }
        }
        out.sort_by_key(|e| e.time_ms);
        out
    }
}

/// The sink of the hub's own lines: stderr always (init copies it to hub.log on the
/// appliance), plus `<data>/log/hub.log` once [`attach`] was called.
struct Sink {
    file: Option<(PathBuf, File, u64)>,
    /// Lines logged before the file was attached (bounded).
    pending: Vec<String>,
    attached: bool,
    write_errors: u64,
}

static SINK: Mutex<Sink> = Mutex::new(Sink {
    file: None,
    pending: Vec::new(),
    attached: false,
    write_errors: 0,
});

const PENDING_MAX: usize = 2000;

fn open_append(path: &Path) -> std::io::Result<(File, u64)> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    Ok((f, len))
}

/// Writes the hub's lines to `<dir>/hub.log` from now on (and those logged before).
/// Not called under init, which keeps hub.log from the hub's stderr.
pub fn attach(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(HUB_LOG);
    let (mut f, mut len) = open_append(&path)?;
    let mut s = SINK.lock();
    for l in s.pending.drain(..) {
        if f.write_all(l.as_bytes()).is_ok() {
            len += l.len() as u64;
        }
    }
    s.file = Some((path, f, len));
    s.attached = true;
    Ok(())
}

/// The hub keeps no file of its own (init does): stop buffering lines for one.
pub fn no_file() {
    let mut s = SINK.lock();
    s.pending = Vec::new();
    s.attached = true;
}

fn sink_write(line: &str) {
    let mut s = SINK.lock();
    let s = &mut *s;
    if !s.attached {
        if s.pending.len() < PENDING_MAX {
            s.pending.push(line.to_string());
        }
        return;
    }
    let Some((path, f, len)) = s.file.as_mut() else {
        return;
    };
    if *len + line.len() as u64 > HUB_LOG_MAX {
        let _ = std::fs::rename(&*path, path.with_extension("log.1"));
        match open_append(path) {
            Ok((nf, nl)) => {
                *f = nf;
                *len = nl;
            }
            Err(_) => s.write_errors += 1,
        }
    }
    match f.write_all(line.as_bytes()) {
        Ok(()) => *len += line.len() as u64,
        Err(_) => s.write_errors += 1,
    }
}

/// The tracing layer writing every event as one line (stderr, and the file).
pub struct LineLayer {
    stderr: bool,
}

impl LineLayer {
    pub fn new(stderr: bool) -> Self {
        LineLayer { stderr }
    }
}

/// Libraries whose DEBUG/TRACE lines carry tokens or event contents.
const CAPPED: [&str; 2] = ["socketioxide", "engineioxide"];

struct Fields {
    message: String,
    rest: String,
    /// A `log` crate record's own target (bridged by tracing-log).
    log_target: Option<String>,
}

/// Fields tracing-log adds to bridged `log` records: the target is used, the rest dropped.
const LOG_FIELDS: [&str; 3] = ["log.module_path", "log.file", "log.line"];

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "log.target" {
            self.log_target = Some(value.to_string());
        } else if LOG_FIELDS.contains(&field.name()) {
        } else if field.name() == "message" {
            self.message.push_str(value);
        } else if value.is_empty() || value.contains(char::is_whitespace) || value.contains('"') {
            let _ = write!(self.rest, " {}={:?}", field.name(), value);
        } else {
            let _ = write!(self.rest, " {}={}", field.name(), value);
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "log.target" {
            self.log_target = Some(format!("{value:?}"));
        } else if LOG_FIELDS.contains(&field.name()) {
        } else if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.rest, " {}={:?}", field.name(), value);
        }
    }
}

/// `pos_hub::bridge::push` -> `hub/bridge::push`; other crates keep their target.
fn source_of(target: &str) -> String {
    match target.strip_prefix("pos_hub::") {
        Some(m) => format!("hub/{m}"),
        None if target == "pos_hub" => "hub".into(),
        None => format!("hub/{target}"),
    }
}

impl<S: Subscriber> Layer<S> for LineLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        let mut f = Fields {
            message: String::new(),
            rest: String::new(),
            log_target: None,
        };
        event.record(&mut f);
        let target = f.log_target.as_deref().unwrap_or(meta.target());
        if *meta.level() > Level::INFO && CAPPED.iter().any(|c| target.starts_with(c)) {
            return;
        }
        let mut msg = f.message;
        msg.push_str(&f.rest);
        let msg = msg.replace('\n', "\\n");
        let mut line = format_line(
            SystemTime::now(),
            meta.level().as_str(),
            &source_of(target),
            &msg,
        );
        line.push('\n');
        if self.stderr {
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        }
        sink_write(&line);
    }
}

/// `https://user:pass@host/path?x=y` -> `https://host/path` (for log lines).
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (s, r),
        None => return url.split('?').next().unwrap_or("").to_string(),
    };
    let rest = rest.split(['?', '#']).next().unwrap_or("");
    let (host, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let host = host.rsplit('@').next().unwrap_or(host);
    format!("{scheme}://{host}{path}")
}

/// `?since=`: an RFC 3339 time (`2026-12-01T10:00:00Z`) or a duration back from
/// now (`10m`, `2h`).
pub fn parse_since(v: &str, now_ms: i64) -> Result<i64, String> {
    let v = v.trim();
    if let Ok(t) = humantime::parse_rfc3339_weak(v) {
        return Ok(t
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0));
    }
    match humantime::parse_duration(v) {
        Ok(d) => Ok(now_ms - d.as_millis() as i64),
        Err(_) => Err(format!(
            "since={v:?}: give a time like 2026-12-01T10:00:00Z or a duration like 10m"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_764_584_682_123);
        let l = format_line(t, "WARN", "hub/serve", "cloud bridge error=\"x y\"");
        let e = parse_line(&l, "hub", 0);
        assert_eq!(e.time_ms, 1_764_584_682_123);
        assert_eq!(e.level, "WARN");
        assert_eq!(e.source, "hub/serve");
        assert_eq!(e.message, "cloud bridge error=\"x y\"");
        assert_eq!(e.text(), l);
        let raw = parse_line("thread 'main' panicked at x", "hub", 42);
        assert_eq!((raw.time_ms, raw.source.as_str()), (42, "hub"));
    }

    #[test]
    fn urls_lose_credentials_and_queries() {
        assert_eq!(
            redact_url("https://u:p@cloud.example/v1/events/ingest?k=s"),
            "https://cloud.example/v1/events/ingest"
        );
        assert_eq!(redact_url("http://h:1/x"), "http://h:1/x");
    }

    #[test]
    fn read_merges_and_follows_across_rotation() {
        let d = tempfile::tempdir().unwrap();
        let dir = LogDir {
            dir: d.path().to_path_buf(),
            init_keeps_files: true,
        };
        let at = |ms: u64| SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms);
        let w = |name: &str, lines: &[String]| {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(d.path().join(name))
                .unwrap();
            for l in lines {
                writeln!(f, "{l}").unwrap();
            }
        };
        w("boot.log", &[format_line(at(1000), "INFO", "init", "boot")]);
        w(
            "hub.log",
            &[
                format_line(at(2000), "INFO", "hub/serve", "listening"),
                format_line(at(500), "INFO", "hub/x", "older"),
            ],
        );
        let (got, mut cur) = read(
            &dir,
            Query {
                lines: 10,
                since_ms: None,
            },
        );
        let msgs: Vec<_> = got.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(msgs, ["older", "boot", "listening"]);
        let (got, _) = read(
            &dir,
            Query {
                lines: 1,
                since_ms: Some(900),
            },
        );
        assert_eq!(got[0].message, "listening");
        assert!(cur.poll().is_empty());
        w("hub.log", &[format_line(at(3000), "INFO", "hub/y", "new")]);
        assert_eq!(cur.poll()[0].message, "new");
        // Rotation: the rest of the old file, then the new one.
        w(
            "hub.log",
            &[format_line(at(3500), "INFO", "hub/y", "last old")],
        );
        std::fs::rename(d.path().join("hub.log"), d.path().join("hub.log.1")).unwrap();
        w(
            "hub.log",
            &[format_line(at(4000), "INFO", "hub/y", "first new")],
        );
        let msgs: Vec<_> = cur.poll().into_iter().map(|e| e.message).collect();
        assert_eq!(msgs, ["last old", "first new"]);
    }
}
