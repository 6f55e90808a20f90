//! Kernel modules: Debian's kernel builds the card, Ethernet, watchdog and file-system
//! drivers as modules; the image builder lists the ones the board needs in
//! /etc/modules.load, dependencies first, and init loads each with finit_module.

use super::bootlog::BootLog;

/// Loads the modules listed (dependencies first) in /etc/modules.load.
pub fn load(log: &BootLog) {
    let Ok(list) = std::fs::read_to_string("/etc/modules.load") else {
        log.line("no /etc/modules.load: loading no modules");
        return;
    };
    let mut loaded = 0;
    for path in list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        match std::fs::File::open(path) {
            Ok(f) => {
                use std::os::fd::AsRawFd;
                let empty = c"";
                // SAFETY: finit_module(fd, params, flags) with a valid fd and C string.
                let rc = unsafe {
                    libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), empty.as_ptr(), 0)
                };
                let err = std::io::Error::last_os_error();
                if rc == 0 || err.raw_os_error() == Some(libc::EEXIST) {
                    loaded += 1;
                } else if err.raw_os_error() != Some(libc::ENODEV) {
                    log.line(format!("module {path}: {err}"));
                }
            }
            Err(e) => log.line(format!("module {path}: {e}")),
        }
    }
    log.line(format!("{loaded} kernel modules loaded"));
}
