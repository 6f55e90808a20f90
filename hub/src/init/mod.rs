//! PID 1: the boot story of the appliance, top to bottom (nerves-project/erlinit is
//! the model). When the kernel starts `pos-hub` as init, this module:
//!
//!  1. mounts /proc, /sys, /dev, /run, /tmp and attaches the console;
//!  2. loads the kernel modules the board needs (list written by the image builder);
//!  3. finds the boot disk by its settings partition's label, grows the data
//!     partition to fill the card on first boot, formats it if blank, checks it
//!     (e2fsck) and mounts it read-write at /data, the settings partition read-only
//!     at /config, and remounts the root read-only;
//!  4. sets the hostname, brings up loopback and Ethernet (DHCP or static);
//!  5. starts `pos-hub serve` as its child (the async hub never runs as PID 1),
//!     copies its output to the console and /data/log/hub.log;
//!  6. loops: reaps zombies, pets the watchdog only while the hub answers /healthz,
//!     restarts a hub that died, maps SIGTERM/SIGINT -> reboot, SIGUSR2 -> power off,
//!     SIGUSR1/SIGPWR -> halt;
//!  7. on the way down: stops the hub gracefully, syncs, unmounts, reboots.
//!
//! It never exits and never panics silently: a failure is logged to the console and
//! /data/log/boot.log, and the box reboots after a pause.
//!
//! Each duty has its own file ([`mounts`], [`modules`], [`disk`], [`reset`],
//! [`hubenv`], [`lan`] with [`net`], [`watchdog`], [`child`], [`supervise`], [`down`],
//! and [`bootlog`] for the log they all write); this one only tells the story, in
//! boot order.

mod bootlog;
mod child;
pub mod disk;
mod down;
mod hubenv;
mod lan;
mod modules;
mod mounts;
pub mod net;
mod reset;
mod supervise;
pub mod watchdog;

use std::path::Path;
use std::time::Duration;

use bootlog::BootLog;
use down::Down;

pub use crate::system::{CONFIG_DIR, DATA_DIR};

/// Runs the init flow. Never returns.
pub fn run_as_pid1() -> ! {
    let log = BootLog::default();
    let hook_log = log.clone();
    std::panic::set_hook(Box::new(move |info| {
        hook_log.line(format!("PANIC: {info}"));
    }));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| boot(&log)));
    let down = match result {
        Ok(Ok(down)) => down,
        Ok(Err(e)) => {
            log.line(format!("FAILED: {e}; rebooting in 10 s"));
            std::thread::sleep(Duration::from_secs(10));
            Down::Reboot
        }
        Err(_) => {
            log.line("init panicked; rebooting in 10 s");
            std::thread::sleep(Duration::from_secs(10));
            Down::Reboot
        }
    };
    down::finish(&log, down)
}

/// Everything from the first mount to the main loop's end; returns how to go down.
fn boot(log: &BootLog) -> Result<Down, String> {
    // 1. The kernel's file systems and a console.
    mounts::early()?;
    mounts::attach_console();
    log.line(format!(
        "pos-hub {} starting as PID 1",
        crate::system::firmware_version()
    ));
    // Signals are taken synchronously by the main loop; block them before any thread
    // or child exists (children get them unblocked again).
    let signals = supervise::signals();
    signals
        .thread_block()
        .map_err(|e| format!("block signals: {e}"))?;

    // 2. Drivers.
    modules::load(log);

    // 3. The card: find it, grow and mount its partitions, reset if asked.
    let disk =
        crate::system::disk::find_boot_disk(Duration::from_secs(20)).map_err(|e| e.to_string())?;
    log.line(format!(
        "boot disk /dev/{} (settings {}, data {})",
        disk.name,
        disk.settings.display(),
        disk.data.display()
    ));
    match disk::grow_data_partition(&disk) {
        Ok(Some(bytes)) => log.line(format!(
            "first boot on this card: data partition grown to {} MiB",
            bytes >> 20
        )),
        Ok(None) => {}
        Err(e) => log.line(format!(
            "could not grow the data partition (keeps its size): {e}"
        )),
    }
    mounts::config(log, &disk);
    mounts::data(log, &disk)?;
    reset::if_asked(log);
    log.attach(&Path::new(DATA_DIR).join("log/boot.log"));

    // 4. The box on the LAN, then nothing writable left outside /data, /run, /tmp.
    let settings = hubenv::read_settings(log);
    let hostname = lan::set_hostname(log, &settings);
    lan::up(log, &settings, &hostname);
    mounts::root_read_only(log);

    // 5-6. The hub as a child, supervised, the watchdog petted while it answers.
    let mut dog = watchdog::arm(log, &settings);
    let port: u16 = settings
        .get("PORT")
        .and_then(|p| p.parse().ok())
        .unwrap_or(4001);
    let down = supervise::run(log, &signals, &mut dog, port);
    if let Some(w) = dog {
        w.disarm();
    }
    // 7. The way down is down::finish, called by run_as_pid1.
    Ok(down)
}
