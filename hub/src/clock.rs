//! Time on a box without a battery clock.
//!
//! A Pi boots after a power cut at a stale time. The hub keeps a floor: the newest
//! of its build time and a last-known-good time saved on the data partition (every
//! few minutes and at shutdown); a clock behind the floor is known to be wrong. It
//! measures the clock against NTP_SERVERS with SNTP (several answers, the median,
//! dropping kiss-o'-death, stratum 0, unsynchronised and slow answers). As the init
//! process (`CLOCK_SET=on`) it steps the system clock and clears the kernel's
//! unsynchronised flag; as a plain service it only measures and reports.
//! The trust state (`synced`, `floor`, `unknown`) is in `/status`.
//!
//! SNTP stays our own 48-byte packet: the crates (sntpc, rsntp) use the echoed transmit
//! timestamp as t1, so it cannot carry random low bits against off-path spoofing without
//! skewing the offset, and rsntp fails on the first stray datagram instead of waiting.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;

use crate::util::{now_ms, write_atomic};

/// Seconds since the epoch when this hub was built.
pub const BUILD_TIME: i64 = match i64::from_str_radix(env!("POS_HUB_BUILD_TIME"), 10) {
    Ok(v) => v,
    Err(_) => 0,
};

/// What `/status` shows.
#[derive(Debug, Clone, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ClockStatus {
    pub state: &'static str,
    pub floor_secs: i64,
    pub offset_ms: Option<i64>,
    pub last_sync_ms: Option<i64>,
    pub source: Option<String>,
    pub sets_system_clock: bool,
    pub last_error: Option<String>,
}

/// The hub's view of time.
pub struct Clock {
    file: PathBuf,
    set_system: bool,
    status: Mutex<ClockStatus>,
}

/// The floor: the newest of the build time and the saved last-known-good time.
pub fn floor(build: i64, saved: Option<i64>) -> i64 {
    build.max(saved.unwrap_or(0))
}

/// Reads the saved time; a corrupt file is reported, never fatal.
fn read_saved(path: &std::path::Path) -> Result<Option<i64>, String> {
    match std::fs::read_to_string(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        Ok(t) => t
            .trim()
            .parse::<i64>()
            .ok()
            .filter(|v| *v > 0)
            .map(Some)
            .ok_or_else(|| {
                format!(
                    "{} is corrupt (ignored; it is rewritten at the next save)",
                    path.display()
                )
            }),
    }
}

impl Clock {
    /// Loads the floor; moves a clock that is behind it up to it (as init) or
    /// reports it as known wrong (as a service).
    pub fn open(data_dir: &std::path::Path, set_system: bool) -> Arc<Self> {
        let file = data_dir.join("clock.txt");
        let mut st = ClockStatus {
            state: "unknown",
            sets_system_clock: set_system,
            ..Default::default()
        };
        let saved = match read_saved(&file) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "clock file");
                st.last_error = Some(e);
                None
            }
        };
        st.floor_secs = floor(BUILD_TIME, saved);
        let now = now_ms() / 1000;
        if now < st.floor_secs {
            st.state = "floor";
            if set_system {
                match step_to(st.floor_secs * 1000) {
                    Ok(()) => tracing::warn!(
                        from = now,
                        to = st.floor_secs,
                        "the clock was behind its floor; moved it up"
                    ),
                    Err(e) => st.last_error = Some(format!("cannot set the clock: {e}")),
                }
            } else {
                tracing::warn!(now, floor = st.floor_secs, "the system clock is behind the floor (build or last-known-good time): known wrong");
            }
        }
        Arc::new(Clock {
            file,
            set_system,
            status: Mutex::new(st),
        })
    }

    pub fn status(&self) -> ClockStatus {
        self.status.lock().clone()
    }

    /// The best estimate of now, in seconds: never below the floor, corrected by
    /// the measured offset when the hub may not set the clock itself.
    pub fn now_secs(&self) -> i64 {
        let st = self.status.lock();
        let mut ms = now_ms();
        if !self.set_system {
            ms += st.offset_ms.unwrap_or(0);
        }
        (ms / 1000).max(st.floor_secs)
    }

    /// True while the system clock is known to be wrong (behind the floor).
    pub fn known_wrong(&self) -> bool {
        now_ms() / 1000 < self.status.lock().floor_secs
    }

    /// True when certificates may be issued: the clock is not behind its floor, or
    /// it has been measured against NTP (or the cloud's Date).
    pub fn trusted_for_issuing(&self) -> bool {
        self.status.lock().state == "synced" || !self.known_wrong()
    }

    /// Uses the cloud's HTTP `Date` (1 s resolution) when NTP has not answered.
    pub fn observe_http_date(&self, date: &str) {
        if self
            .status
            .lock()
            .source
            .as_deref()
            .is_some_and(|s| !s.starts_with("http"))
        {
            return; // NTP is better
        }
        let Ok(t) = httpdate::parse_http_date(date) else {
            return;
        };
        let Ok(d) = t.duration_since(std::time::UNIX_EPOCH) else {
            return;
        };
        let offset = d.as_millis() as i64 - now_ms();
        if self.set_system && offset.abs() > 2000 {
            if let Err(e) = step_to(now_ms() + offset) {
                self.status.lock().last_error = Some(format!("cannot set the clock: {e}"));
                return;
            }
            self.record(0, "http-date".into());
        } else {
            self.record(offset, "http-date".into());
        }
    }

    /// Saves the current time as last-known-good (only a trusted one).
    pub fn save(&self) {
        let (ok, floor_secs) = {
            let st = self.status.lock();
            (
                st.state == "synced" || now_ms() / 1000 >= st.floor_secs,
                st.floor_secs,
            )
        };
        if !ok {
            return;
        }
        let t = self.now_secs().max(floor_secs);
        if let Err(e) = write_atomic(&self.file, format!("{t}\n").as_bytes(), 0o644) {
            self.status.lock().last_error =
                Some(format!("cannot save {}: {e}", self.file.display()));
        }
    }

    fn record(&self, offset_ms: i64, source: String) {
        let mut st = self.status.lock();
        st.offset_ms = Some(offset_ms);
        st.last_sync_ms = Some(now_ms());
        st.source = Some(source);
        st.state = "synced";
        st.last_error = None;
    }
}

/// One SNTP answer.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub offset_ms: i64,
    pub delay_ms: i64,
    pub stratum: u8,
}

const NTP_EPOCH_OFFSET: u64 = 2_208_988_800;

fn to_ntp(ms: i64) -> u64 {
    let secs = (ms / 1000) as u64 + NTP_EPOCH_OFFSET;
    let frac = (((ms % 1000) as u64) << 32) / 1000;
    (secs << 32) | frac
}

fn from_ntp(t: u64) -> i64 {
    let secs = (t >> 32) as i64 - NTP_EPOCH_OFFSET as i64;
    let frac = ((t & 0xffff_ffff) * 1000) >> 32;
    secs * 1000 + frac as i64
}

/// Checks an SNTP answer and computes offset and delay. `t1`/`t4` are our send and
/// receive times (ms), `sent` the transmit timestamp we put in the request.
pub fn parse_answer(buf: &[u8], sent: u64, t1: i64, t4: i64) -> Result<Sample, String> {
    if buf.len() < 48 {
        return Err("short answer".into());
    }
    let li = buf[0] >> 6;
    let mode = buf[0] & 7;
    let stratum = buf[1];
    if mode != 4 {
        return Err(format!("not a server answer (mode {mode})"));
    }
    if stratum == 0 {
        let code = String::from_utf8_lossy(&buf[12..16]).to_string();
        return Err(format!("kiss-o'-death {code}"));
    }
    if stratum > 15 || li == 3 {
        return Err("the server is not synchronised".into());
    }
    let be = |i: usize| u64::from_be_bytes(buf[i..i + 8].try_into().unwrap_or([0; 8]));
    if be(24) != sent {
        return Err("answer does not match our request".into());
    }
    let (t2, t3) = (from_ntp(be(32)), from_ntp(be(40)));
    let offset_ms = ((t2 - t1) + (t3 - t4)) / 2;
    let delay_ms = (t4 - t1) - (t3 - t2);
    Ok(Sample {
        offset_ms,
        delay_ms,
        stratum,
    })
}

/// Queries one server address once.
pub async fn query(addr: SocketAddr, timeout: Duration) -> Result<Sample, String> {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .map_err(|_| "bind")?;
    let sock = tokio::net::UdpSocket::bind(bind)
        .await
        .map_err(|e| e.to_string())?;
    sock.connect(addr).await.map_err(|e| e.to_string())?;
    let mut req = [0u8; 48];
    req[0] = (4 << 3) | 3; // version 4, client
    let t1 = now_ms();
    let sent = to_ntp(t1) ^ (rand::random::<u32>() as u64); // unpredictable low bits
    req[40..48].copy_from_slice(&sent.to_be_bytes());
    sock.send(&req).await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 512];
    let started = Instant::now();
    loop {
        let left = timeout.saturating_sub(started.elapsed());
        let n = tokio::time::timeout(left, sock.recv(&mut buf))
            .await
            .map_err(|_| format!("no answer from {addr} within {timeout:?}"))?
            .map_err(|e| e.to_string())?;
        let t4 = now_ms();
        match parse_answer(&buf[..n], sent, t1, t4) {
            Err(e) if e.contains("does not match") => continue,
            r => return r,
        }
    }
}

/// The servers to ask: `host` or `host:port`, comma-separated.
pub fn parse_servers(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// Measures the clock against `servers` every `interval` (every minute while not
/// synced), setting the system clock when allowed; saves the time every 5 minutes.
pub async fn run(clock: Arc<Clock>, servers: Vec<String>, interval: Duration) {
    let mut last_save = Instant::now();
    loop {
        let mut samples = Vec::new();
        let mut errors = Vec::new();
        for s in &servers {
            let target = if s.contains(':') && !s.starts_with('[') && s.matches(':').count() == 1 {
                s.clone()
            } else {
                format!("{s}:123")
            };
            let addrs: Vec<SocketAddr> = match tokio::time::timeout(
                Duration::from_secs(5),
                tokio::net::lookup_host(target.as_str()),
            )
            .await
            {
                Ok(Ok(a)) => a.take(4).collect(),
                Ok(Err(e)) => {
                    errors.push(format!("{s}: {e}"));
                    continue;
                }
                Err(_) => {
                    errors.push(format!("{s}: name lookup timed out"));
                    continue;
                }
            };
            for a in addrs {
                match query(a, Duration::from_secs(2)).await {
                    Ok(x) if x.delay_ms > 1000 => {
                        errors.push(format!("{a}: answer too slow ({} ms)", x.delay_ms))
                    }
                    Ok(x) => samples.push((x, a)),
                    Err(e) => errors.push(format!("{a}: {e}")),
                }
            }
        }
        if samples.is_empty() {
            let msg = format!("no usable NTP answer: {}", errors.join("; "));
            tracing::debug!(error = %msg, "clock");
            clock.status.lock().last_error = Some(msg);
        } else {
            samples.sort_by_key(|(x, _)| x.offset_ms);
            let (median, addr) = samples[samples.len() / 2];
            if clock.set_system && median.offset_ms.abs() > 500 {
                match step_to(now_ms() + median.offset_ms) {
                    Ok(()) => {
                        tracing::info!(offset_ms = median.offset_ms, "stepped the system clock")
                    }
                    Err(e) => {
                        clock.status.lock().last_error = Some(format!("cannot set the clock: {e}"))
                    }
                }
                clock.record(0, addr.to_string());
            } else {
                clock.record(median.offset_ms, addr.to_string());
            }
            tracing::debug!(
                offset_ms = median.offset_ms,
                delay_ms = median.delay_ms,
                samples = samples.len(),
                "clock measured"
            );
        }
        if last_save.elapsed() > Duration::from_secs(300) {
            clock.save();
            last_save = Instant::now();
        }
        let synced = clock.status.lock().state == "synced";
        tokio::time::sleep(if synced {
            interval
        } else {
            interval.min(Duration::from_secs(60))
        })
        .await;
    }
}

/// Sets the system clock to `ms` and marks it synchronised (CLOCK_SET=on only).
fn step_to(ms: i64) -> Result<(), String> {
    let ts = nix::sys::time::TimeSpec::new(ms / 1000, (ms % 1000) * 1_000_000);
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts).map_err(|e| e.to_string())?;
    // Clear STA_UNSYNC as systemd-timesyncd does, or the kernel keeps saying unsynced.
    // SAFETY: adjtimex reads and writes the struct we pass.
    unsafe {
        let mut tx: libc::timex = std::mem::zeroed();
        tx.modes = libc::ADJ_STATUS | libc::ADJ_MAXERROR | libc::ADJ_ESTERROR;
        tx.status = 0;
        tx.maxerror = 0;
        tx.esterror = 0;
        libc::adjtimex(&mut tx);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_is_the_newest_known_time() {
        assert_eq!(floor(100, None), 100);
        assert_eq!(floor(100, Some(50)), 100);
        assert_eq!(floor(100, Some(500)), 500);
    }

    #[test]
    fn corrupt_clock_file_is_reported_not_fatal() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("clock.txt"), "garbage\n").unwrap();
        let c = Clock::open(d.path(), false);
        let st = c.status();
        assert!(st.last_error.unwrap().contains("corrupt"));
        assert_eq!(st.floor_secs, BUILD_TIME);
        c.save();
        assert!(read_saved(&d.path().join("clock.txt")).unwrap().is_some());
    }

    #[test]
    fn saved_time_in_the_future_makes_the_clock_known_wrong() {
        let d = tempfile::tempdir().unwrap();
        let future = now_ms() / 1000 + 86_400;
        std::fs::write(d.path().join("clock.txt"), format!("{future}\n")).unwrap();
        let c = Clock::open(d.path(), false);
        assert_eq!(c.status().state, "floor");
        assert!(c.known_wrong());
        assert!(c.now_secs() >= future, "never below the floor");
    }

    #[test]
    fn sntp_answers() {
        let t1 = 1_800_000_000_000i64;
        let sent = to_ntp(t1) ^ 0x1234;
        let mut a = [0u8; 48];
        a[0] = (4 << 3) | 4;
        a[1] = 2;
        a[24..32].copy_from_slice(&sent.to_be_bytes());
        // Server is 1 s ahead; 10 ms each way.
        a[32..40].copy_from_slice(&to_ntp(t1 + 1010).to_be_bytes());
        a[40..48].copy_from_slice(&to_ntp(t1 + 1011).to_be_bytes());
        let s = parse_answer(&a, sent, t1, t1 + 21).unwrap();
        assert!((s.offset_ms - 1000).abs() <= 2, "{s:?}");
        assert!((s.delay_ms - 20).abs() <= 2, "{s:?}");
        let mut kod = a;
        kod[1] = 0;
        kod[12..16].copy_from_slice(b"RATE");
        assert!(parse_answer(&kod, sent, t1, t1 + 21)
            .unwrap_err()
            .contains("kiss"));
        assert!(parse_answer(&a, sent ^ 1, t1, t1 + 21).is_err());
        let mut unsync = a;
        unsync[0] |= 3 << 6;
        assert!(parse_answer(&unsync, sent, t1, t1 + 21).is_err());
        assert!(parse_answer(&a[..20], sent, t1, t1).is_err());
    }
}
