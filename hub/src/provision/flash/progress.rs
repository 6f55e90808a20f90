//! Progress on stderr: at a terminal an `indicatif` bar redrawn in place (what cargo and
//! rustup users already see); otherwise (a script, a log) one plain line every 10%, so
//! a log shows the pace without carriage returns.

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

const MIB: u64 = 1024 * 1024;

/// Bytes done / total and MiB/s of one pass (writing, verifying).
pub struct Progress {
    label: &'static str,
    total: u64,
    start: Instant,
    next_pct: u64,
    /// The bar, at a terminal. Kept inside a `MultiProgress` that redraws by moving the
    /// cursor back (`\r`) instead of clearing the line first.
    bar: Option<(MultiProgress, ProgressBar)>,
}

impl Progress {
    pub fn new(label: &'static str, total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            multi.set_move_cursor(true);
            let style = ProgressStyle::with_template(
                "{msg:9} [{bar:30}] {percent:>3}%  {binary_bytes} / {binary_total_bytes}  {binary_bytes_per_sec}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("#>.");
            let bar = multi.add(ProgressBar::new(total).with_style(style).with_message(label));
            (multi, bar)
        });
        Self {
            label,
            total,
            start: Instant::now(),
            next_pct: 10,
            bar,
        }
    }

    fn rate(&self, done: u64) -> f64 {
        let secs = self.start.elapsed().as_secs_f64().max(0.001);
        done as f64 / MIB as f64 / secs
    }

    fn pct(&self, done: u64) -> u64 {
        done.saturating_mul(100)
            .checked_div(self.total)
            .unwrap_or(100)
    }

    pub fn update(&mut self, done: u64) {
        if let Some((_, bar)) = &self.bar {
            bar.set_position(done);
            return;
        }
        while self.next_pct <= 100 && self.pct(done) >= self.next_pct {
            eprintln!(
                "{} {:3}%  {:.1} / {:.1} MiB  {:.1} MiB/s",
                self.label,
                self.next_pct,
                done as f64 / MIB as f64,
                self.total as f64 / MIB as f64,
                self.rate(done)
            );
            self.next_pct += 10;
        }
    }

    pub fn finish(&mut self, done: u64) {
        self.update(done);
        if let Some((multi, bar)) = self.bar.take() {
            bar.finish();
            drop(multi);
            eprintln!();
        }
    }
}

/// 241.0 MiB, 29.7 GiB.
pub fn human(bytes: u64) -> String {
    const GIB: u64 = 1024 * MIB;
    if bytes >= GIB {
        format!("{:.1} GiB", bytes as f64 / GIB as f64)
    } else if bytes >= MIB {
        format!("{:.1} MiB", bytes as f64 / MIB as f64)
    } else {
        format!("{bytes} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(human(512), "512 bytes");
        assert_eq!(human(241 * MIB), "241.0 MiB");
        assert_eq!(human(30 * 1024 * MIB), "30.0 GiB");
    }
}
