//! The init log: every line goes to the console at once and, from the moment the data
//! partition is mounted, to /data/log/boot.log as well (lines logged before that are
//! kept and written first), each stamped with the kernel's uptime.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// The init log: console always, /data/log/boot.log once data is mounted.
#[derive(Clone, Default)]
pub struct BootLog {
    inner: Arc<Mutex<BootLogInner>>,
}

#[derive(Default)]
struct BootLogInner {
    pending: Vec<String>,
    file: Option<std::fs::File>,
}

impl BootLog {
    /// The console gets `[uptime] pos-hub init: msg`; boot.log the hub's line format
    /// (time, level, source `init`) so `GET /admin/logs` merges it with the hub's.
    pub fn line(&self, msg: impl AsRef<str>) {
        let up = uptime();
        let msg = msg.as_ref();
        eprintln!("[{up:>8.3}] pos-hub init: {msg}");
        let level = if msg.starts_with("FAILED") || msg.starts_with("PANIC") {
            "ERROR"
        } else {
            "INFO"
        };
        let line = crate::ops::logs::format_line(
            std::time::SystemTime::now(),
            level,
            "init",
            &format!("[{up:.3}] {msg}"),
        );
        let mut g = match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        match g.file.as_mut() {
            Some(f) => {
                let _ = writeln!(f, "{line}");
            }
            None => g.pending.push(line),
        }
    }

    /// Copies what was logged so far into `path` and appends there from now on.
    pub fn attach(&self, path: &Path) {
        rotate(path, 1 << 20);
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let mut g = match self.inner.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            let _ = writeln!(
                f,
                "{}",
                crate::ops::logs::format_line(
                    std::time::SystemTime::now(),
                    "INFO",
                    "init",
                    "---- boot ----"
                )
            );
            for l in g.pending.drain(..) {
                let _ = writeln!(f, "{l}");
            }
            g.file = Some(f);
        }
    }

    /// Syncs and closes the log file (before unmounting /data).
    pub fn detach(&self) {
        if let Ok(mut g) = self.inner.lock() {
            if let Some(f) = g.file.take() {
                let _ = f.sync_all();
            }
        }
    }
}

/// Seconds since the kernel started (for the console timestamps).
fn uptime() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|t| t.parse().ok()))
        .unwrap_or(0.0)
}

/// Keeps a log file under `max` bytes by moving it to `<name>.1`.
pub fn rotate(path: &Path, max: u64) {
    if std::fs::metadata(path)
        .map(|m| m.len() > max)
        .unwrap_or(false)
    {
        let _ = std::fs::rename(path, path.with_extension("log.1"));
    }
}
