//! The hardware watchdog (bcm2835_wdt on the Pi, i6300esb under QEMU). Once opened
//! it resets the board unless petted within its timeout; init pets it only while the
//! hub answers its health check, so a hung hub (or a hung init) reboots the box.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::time::Duration;

pub struct Watchdog {
    file: File,
    pub timeout: Duration,
    pub identity: String,
}

// WDIOC_SETTIMEOUT = _IOWR('W', 6, int); WDIOC_GETSUPPORT = _IOR('W', 0, struct watchdog_info).
nix::ioctl_readwrite!(wdioc_settimeout, b'W', 6, libc::c_int);

#[repr(C)]
struct WatchdogInfo {
    options: u32,
    firmware_version: u32,
    identity: [u8; 32],
}
nix::ioctl_read!(wdioc_getsupport, b'W', 0, WatchdogInfo);

impl Watchdog {
    /// Opens `/dev/watchdog` and sets its timeout (drivers may round it; the value
    /// they chose is kept). `None` when the board has no watchdog.
    pub fn open(timeout: Duration) -> Result<Option<Watchdog>, String> {
        let path = ["/dev/watchdog0", "/dev/watchdog"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists());
        let Some(path) = path else {
            return Ok(None);
        };
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| format!("{path}: {e}"))?;
        let mut secs = timeout.as_secs().max(1) as libc::c_int;
        // SAFETY: the ioctls take a pointer to an int / a watchdog_info of the right size.
        let set = unsafe { wdioc_settimeout(file.as_raw_fd(), &mut secs) };
        let mut info = WatchdogInfo {
            options: 0,
            firmware_version: 0,
            identity: [0; 32],
        };
        // SAFETY: as above.
        let identity = match unsafe { wdioc_getsupport(file.as_raw_fd(), &mut info) } {
            Ok(_) => String::from_utf8_lossy(&info.identity)
                .trim_end_matches('\0')
                .to_string(),
            Err(_) => "unknown".into(),
        };
        let timeout = match set {
            Ok(_) => Duration::from_secs(secs as u64),
            Err(e) => return Err(format!("{path}: cannot set timeout {timeout:?}: {e}")),
        };
        Ok(Some(Watchdog {
            file,
            timeout,
            identity,
        }))
    }

    pub fn pet(&mut self) {
        let _ = self.file.write_all(b"\0");
    }

    /// Magic close: disarms the watchdog (on the way down, just before reboot(2)).
    pub fn disarm(mut self) {
        let _ = self.file.write_all(b"V");
    }
}

/// Opens the watchdog unless `WATCHDOG=off`, with `WATCHDOG_TIMEOUT` seconds
/// (default 15); logs what it found.
pub fn arm(
    log: &super::bootlog::BootLog,
    settings: &std::collections::HashMap<String, String>,
) -> Option<Watchdog> {
    if settings.get("WATCHDOG").map(String::as_str) == Some("off") {
        return None;
    }
    let secs = settings
        .get("WATCHDOG_TIMEOUT")
        .and_then(|s| s.parse().ok())
        .unwrap_or(15u64);
    match Watchdog::open(Duration::from_secs(secs)) {
        Ok(Some(w)) => {
            log.line(format!(
                "watchdog {} armed, timeout {:?}",
                w.identity, w.timeout
            ));
            Some(w)
        }
        Ok(None) => {
            log.line("no hardware watchdog found");
            None
        }
        Err(e) => {
            log.line(format!("watchdog: {e}"));
            None
        }
    }
}
