//! What the hub knows of the box it runs on when it is the appliance (started by
//! init with POS_HUB_INIT=1): which disk and partitions it boots from ([`disk`]), the
//! firmware version written into the image, the running boot slot, whether
//! the root is really read-only, how full the data partition is, and asking init to
//! reboot or power off. Outside the appliance (`serve` on a workstation) it reports
//! `appliance: false`. Init and the update agent both stand on this module; it
//! imports neither.

pub mod disk;

use std::path::Path;

use serde::Serialize;

pub use disk::{CONFIG_DIR, DATA_DIR};

/// The firmware version: /etc/pos-hub-version in the image, else the crate version.
pub fn firmware_version() -> String {
    std::fs::read_to_string("/etc/pos-hub-version")
        .map(|v| v.trim().to_string())
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| crate::VERSION.to_string())
}

/// True when PID 1 is our init (set by init in the hub's environment).
pub fn under_init() -> bool {
    std::env::var_os("POS_HUB_INIT").is_some_and(|v| v == "1")
        && nix::unistd::getppid().as_raw() == 1
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SystemStatus {
    pub appliance: bool,
    /// Boot partition number the firmware (or the QEMU harness) booted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_partition: Option<u32>,
    /// A write outside the data partition fails (checked by trying one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root_read_only: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_bytes_total: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_bytes_free: Option<u64>,
    /// How full the data partition is, in percent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_used_percent: Option<f64>,
    /// Set once the data partition passes [`DATA_WARN_PERCENT`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_warning: Option<String>,
    pub kernel: String,
}

/// The data partition's fill above which `/status` and `/metrics` warn.
pub const DATA_WARN_PERCENT: f64 = 80.0;

/// Percent used of a partition of `total` bytes with `free` left.
pub fn used_percent(total: u64, free: u64) -> f64 {
    if total == 0 {
        return 0.0;
    }
    let p = 100.0 * total.saturating_sub(free) as f64 / total as f64;
    (p * 10.0).round() / 10.0
}

/// The booted partition: the Pi firmware's device-tree property, or
/// `poshub.boot_partition=N` on the kernel command line (the QEMU harness sets it).
pub fn boot_partition() -> Option<u32> {
    if let Ok(b) = std::fs::read("/proc/device-tree/chosen/bootloader/partition") {
        if b.len() >= 4 {
            return Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        }
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").ok()?;
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("poshub.boot_partition="))
        .and_then(|v| v.parse().ok())
}

/// Tries to create a file in /etc: true when the filesystem refuses (EROFS).
pub fn root_read_only() -> bool {
    let probe = Path::new("/etc/.pos-hub-rw-probe");
    match std::fs::File::create(probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(probe);
            false
        }
        Err(e) => e.raw_os_error() == Some(libc::EROFS),
    }
}

// statvfs field types differ between targets (u64 here, u32 on some 32-bit ones).
#[allow(clippy::unnecessary_cast)]
pub fn status(data_dir: &Path) -> SystemStatus {
    let appliance = under_init();
    let (total, free) = match nix::sys::statvfs::statvfs(data_dir) {
        Ok(s) => (
            Some(s.blocks() as u64 * s.fragment_size() as u64),
            Some(s.blocks_available() as u64 * s.fragment_size() as u64),
        ),
        Err(_) => (None, None),
    };
    let used = total.zip(free).map(|(t, f)| used_percent(t, f));
    let data_warning = used.filter(|p| *p >= DATA_WARN_PERCENT).map(|p| {
        format!("the data partition is {p}% full (warning above {DATA_WARN_PERCENT}%): free space or lower LOG_RETENTION before events are refused")
    });
    SystemStatus {
        appliance,
        boot_partition: if appliance { boot_partition() } else { None },
        root_read_only: appliance.then(root_read_only),
        data_bytes_total: total,
        data_bytes_free: free,
        data_used_percent: used,
        data_warning,
        kernel: nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
    }
}

/// How the box should go down.
#[derive(Debug, Clone, Copy)]
pub enum Down {
    Reboot,
    PowerOff,
}

/// Asks init to take the box down (it stops the hub gracefully first).
pub fn request(down: Down) -> Result<(), String> {
    if !under_init() {
        return Err("not running under pos-hub init (reboot the machine yourself)".into());
    }
    let sig = match down {
        Down::Reboot => nix::sys::signal::Signal::SIGTERM,
        Down::PowerOff => nix::sys::signal::Signal::SIGUSR2,
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(1), sig).map_err(|e| e.to_string())
}

/// Like [`request`], after `delay` (so an HTTP answer can leave first).
pub fn request_after(down: Down, delay: std::time::Duration) -> Result<(), String> {
    if !under_init() {
        return Err("not running under pos-hub init (reboot the machine yourself)".into());
    }
    std::thread::Builder::new()
        .name("go-down".into())
        .spawn(move || {
            std::thread::sleep(delay);
            let _ = request(down);
        })
        .map(|_| ())
        .map_err(|e| e.to_string())
}
