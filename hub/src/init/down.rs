//! The way down: sync, unmount, then reboot (with the argument init was asked for in
//! /run/reboot-param, e.g. `0 tryboot` for the Pi firmware's one-shot trial of the
//! other slot), power off or halt; retried every 5 s, never returning.

use std::ffi::CString;
use std::time::Duration;

use super::bootlog::BootLog;
use super::mounts;

/// What the box does when init is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Down {
    Reboot,
    PowerOff,
    Halt,
}

/// Sync, unmount, and reboot / power off / halt. Never returns.
pub fn finish(log: &BootLog, down: Down) -> ! {
    nix::unistd::sync();
    log.line(format!("unmounting and {down:?}"));
    log.detach();
    mounts::unmount_all();
    nix::unistd::sync();
    let param = std::fs::read_to_string("/run/reboot-param").unwrap_or_default();
    loop {
        match down {
            Down::PowerOff => {
                let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
            }
            Down::Halt => {
                let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_HALT_SYSTEM);
            }
            Down::Reboot if !param.trim().is_empty() => {
                // The Pi firmware takes "0 tryboot" as a one-shot trial of the other slot.
                if let Ok(arg) = CString::new(param.trim()) {
                    // SAFETY: reboot(2) RESTART2 with a NUL-terminated argument.
                    unsafe {
                        libc::syscall(
                            libc::SYS_reboot,
                            libc::LINUX_REBOOT_MAGIC1,
                            libc::LINUX_REBOOT_MAGIC2,
                            libc::LINUX_REBOOT_CMD_RESTART2,
                            arg.as_ptr(),
                        );
                    }
                }
                let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
            }
            Down::Reboot => {
                let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
            }
        }
        std::thread::sleep(Duration::from_secs(5));
    }
}
