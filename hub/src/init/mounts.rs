//! The file systems of the box: the kernel's own (/proc, /sys, /dev, /run, /tmp), the
//! console when the kernel gave init no stdio, the settings partition read-only at
//! /config, the data partition read-write at /data (formatted on first boot, checked
//! after a power cut, grown to its partition), the root remounted read-only, and the
//! unmounts on the way down.

use std::path::Path;
use std::time::Instant;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::bootlog::BootLog;
use super::disk;
use super::{CONFIG_DIR, DATA_DIR};
use crate::system::disk::BootDisk;

/// /proc, /sys, /dev, /run and /tmp (an EBUSY means already mounted: fine).
pub fn early() -> Result<(), String> {
    let m = |src: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>| {
        let _ = std::fs::create_dir_all(target);
        match mount(Some(src), target, Some(fstype), flags, data) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::EBUSY) => Ok(()),
            Err(e) => Err(format!("mount {fstype} on {target}: {e}")),
        }
    };
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    m("proc", "/proc", "proc", nodev, None)?;
    m("sysfs", "/sys", "sysfs", nodev, None)?;
    m(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    m("tmpfs", "/run", "tmpfs", nodev, Some("mode=0755,size=16m"))?;
    m(
        "tmpfs",
        "/tmp",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777,size=64m"),
    )?;
    Ok(())
}

/// Without /dev/console in the initramfs the kernel gives init no stdio; open it now.
pub fn attach_console() {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl(F_GETFD) only queries a descriptor.
    let has_stdout = unsafe { libc::fcntl(1, libc::F_GETFD) } != -1;
    if has_stdout {
        return;
    }
    if let Ok(c) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors.
            unsafe { libc::dup2(c.as_raw_fd(), fd) };
        }
    }
}

/// The settings partition, read-only at /config; the box runs on defaults without it.
pub fn config(log: &BootLog, d: &BootDisk) {
    let _ = std::fs::create_dir_all(CONFIG_DIR);
    let flags = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    if let Err(e) = mount(
        Some(&d.settings),
        CONFIG_DIR,
        Some("vfat"),
        flags,
        Some("umask=0022,shortname=mixed"),
    ) {
        log.line(format!(
            "settings partition {}: cannot mount: {e} (running on defaults)",
            d.settings.display()
        ));
    }
}

/// The data partition at /data: created when blank, checked (e2fsck) otherwise, grown
/// to its partition when smaller.
pub fn data(log: &BootLog, d: &BootDisk) -> Result<(), String> {
    let dev = &d.data;
    match disk::ext4_info(dev).map_err(|e| e.to_string())? {
        None => {
            log.line(format!(
                "data partition {} is blank: creating its filesystem",
                dev.display()
            ));
            let t = Instant::now();
            disk::format_data(dev).map_err(|e| e.to_string())?;
            log.line(format!(
                "data filesystem created in {:.1} s",
                t.elapsed().as_secs_f64()
            ));
        }
        Some(info) => {
            if info.needs_check {
                log.line("data filesystem was not cleanly unmounted: checking it");
            }
            match disk::check_data(dev) {
                Ok(None) => {}
                Ok(Some(report)) => {
                    log.line(format!("e2fsck repaired the data filesystem: {report}"))
                }
                Err(e) => log.line(format!("{e} (mounting anyway)")),
            }
        }
    }
    let _ = std::fs::create_dir_all(DATA_DIR);
    mount(
        Some(dev.as_path()),
        DATA_DIR,
        Some("ext4"),
        MsFlags::MS_NOATIME | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("errors=remount-ro"),
    )
    .map_err(|e| format!("mount data partition {}: {e}", dev.display()))?;
    if let (Ok(Some(fs)), Some(part)) = (disk::ext4_info(dev), crate::system::disk::dev_bytes(dev))
    {
        if part > fs.bytes + (8 << 20) {
            match disk::grow_data_fs(dev) {
                Ok(()) => log.line(format!(
                    "data filesystem grown from {} MiB to {} MiB",
                    fs.bytes >> 20,
                    part >> 20
                )),
                Err(e) => log.line(format!("could not grow the data filesystem: {e}")),
            }
        }
    }
    for sub in ["log", "hub"] {
        let _ = std::fs::create_dir_all(Path::new(DATA_DIR).join(sub));
    }
    Ok(())
}

/// Everything writable now lives on /data, /run or /tmp: the root goes read-only.
pub fn root_read_only(log: &BootLog) {
    match mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    ) {
        Ok(()) => log.line("root filesystem is read-only"),
        Err(e) => log.line(format!("could not make the root read-only: {e}")),
    }
}

/// Unmounts /data and /config (read-only and lazily if busy) on the way down.
pub fn unmount_all() {
    for m in [DATA_DIR, CONFIG_DIR] {
        if umount2(m, MntFlags::empty()).is_err() {
            let _ = mount(
                None::<&str>,
                m,
                None::<&str>,
                MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            );
            let _ = umount2(m, MntFlags::MNT_DETACH);
        }
    }
}
