//! Which block devices may not be written, from /proc/self/mountinfo, /proc/swaps and
//! sysfs: the disk behind /, /boot, /boot/efi, /boot/firmware or /usr (through
//! device-mapper and md `slaves`), a disk any of whose partitions or anything built on
//! them (`holders`: LVM, dm-crypt) is mounted or swap, a read-only disk, and the loop
//! device a regular file is attached to.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::error::io;
use super::FlashError;

/// Linux `dev_t` -> (major, minor).
pub fn dev_major_minor(dev: u64) -> (u64, u64) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major, minor)
}

/// One line of /proc/self/mountinfo that matters here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub devno: String,
    pub mount_point: String,
    pub source: String,
}

/// Parses /proc/self/mountinfo.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            Some(Mount {
                devno: f.get(2)?.to_string(),
                mount_point: unescape_mount(f.get(4)?),
                source: unescape_mount(f.get(sep + 2).unwrap_or(&"")),
            })
        })
        .collect()
}

/// Undoes the octal escapes (`\040` for a space) of mountinfo fields.
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c));
        if b[i] == b'\\' && octal {
            let v = u32::from(b[i + 1] - b'0') * 64
                + u32::from(b[i + 2] - b'0') * 8
                + u32::from(b[i + 3] - b'0');
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

const SYS_MOUNTS: &[&str] = &["/", "/boot", "/boot/efi", "/boot/firmware", "/usr"];

/// The sysfs directory of a block device number, e.g. .../block/sdb or .../block/sdb/sdb1.
fn sys_dir(devno: &str) -> Option<PathBuf> {
    std::fs::canonicalize(format!("/sys/dev/block/{devno}")).ok()
}

fn is_partition(dir: &Path) -> bool {
    dir.join("partition").exists()
}

fn name_of(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn devno_of(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join("dev"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// The whole disks under a block device: itself or its disk if a partition, or the
/// disks under a device-mapper / md device (through `slaves`).
fn disks_under(dir: &Path, depth: u32, out: &mut BTreeSet<PathBuf>) {
    let slaves: Vec<PathBuf> = std::fs::read_dir(dir.join("slaves"))
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| std::fs::canonicalize(e.path()).ok())
                .collect()
        })
        .unwrap_or_default();
    if !slaves.is_empty() && depth < 8 {
        for s in slaves {
            disks_under(&s, depth + 1, out);
        }
        return;
    }
    if is_partition(dir) {
        if let Some(p) = dir.parent() {
            out.insert(p.to_path_buf());
        }
    } else {
        out.insert(dir.to_path_buf());
    }
}

/// A disk, its partitions, and everything built on them (`holders`, e.g. LVM, dm-crypt).
fn family(disk: &Path, depth: u32, out: &mut Vec<PathBuf>) {
    if out.iter().any(|d| d == disk) {
        return;
    }
    out.push(disk.to_path_buf());
    let mut next = Vec::new();
    if let Ok(rd) = std::fs::read_dir(disk) {
        for e in rd.filter_map(Result::ok) {
            let p = e.path();
            if p.is_dir() && p.join("partition").exists() {
                next.push(p);
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(disk.join("holders")) {
        for e in rd.filter_map(Result::ok) {
            if let Ok(p) = std::fs::canonicalize(e.path()) {
                next.push(p);
            }
        }
    }
    if depth < 8 {
        for p in next {
            family(&p, depth + 1, out);
        }
    }
}

/// Refusals for a block device: a partition, the system disk, mounted, swap, read-only.
/// Returns the device's model, if sysfs knows it.
pub fn check_block_device(path: &Path, rdev: u64) -> Result<Option<String>, FlashError> {
    let (ma, mi) = dev_major_minor(rdev);
    let devno = format!("{ma}:{mi}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse_mountinfo(&t))
        .map_err(io("cannot read", Path::new("/proc/self/mountinfo")))?;
    let Some(dir) = sys_dir(&devno) else {
        // No sysfs entry: only the direct mount check is possible.
        if let Some(m) = mounts.iter().find(|m| m.devno == devno) {
            return Err(mounted_err(path, m));
        }
        return Ok(None);
    };
    let disk = if is_partition(&dir) {
        let disk = dir.parent().map(Path::to_path_buf).unwrap_or(dir.clone());
        return Err(FlashError::TargetPartition {
            path: path.to_path_buf(),
            disk: format!("/dev/{}", name_of(&disk)),
        });
    } else {
        dir
    };

    // The system disk: whatever holds /, /boot (and /boot/efi, /boot/firmware, /usr).
    for m in mounts
        .iter()
        .filter(|m| SYS_MOUNTS.contains(&m.mount_point.as_str()))
    {
        let Some(mdir) = sys_dir(&m.devno) else {
            continue;
        };
        let mut disks = BTreeSet::new();
        disks_under(&mdir, 0, &mut disks);
        if disks.contains(&disk) {
            return Err(FlashError::SystemDisk {
                path: path.to_path_buf(),
                why: format!("{} is mounted from {}", m.mount_point, m.source),
            });
        }
    }

    let mut fam = Vec::new();
    family(&disk, 0, &mut fam);
    let devnos: Vec<(String, String)> = fam
        .iter()
        .filter_map(|d| devno_of(d).map(|n| (n, name_of(d))))
        .collect();
    for m in &mounts {
        if devnos.iter().any(|(n, _)| *n == m.devno) {
            return Err(mounted_err(path, m));
        }
    }
    if let Ok(swaps) = std::fs::read_to_string("/proc/swaps") {
        for line in swaps.lines().skip(1) {
            let Some(dev) = line.split_whitespace().next() else {
                continue;
            };
            let name = dev.trim_start_matches("/dev/");
            if devnos.iter().any(|(_, n)| n == name) {
                return Err(FlashError::InUse {
                    path: path.to_path_buf(),
                    what: format!("{dev} is swap; swapoff {dev}"),
                });
            }
        }
    }
    let ro = std::fs::read_to_string(disk.join("ro")).unwrap_or_default();
    if ro.trim() == "1" {
        return Err(FlashError::ReadOnly(path.to_path_buf()));
    }
    let model = std::fs::read_to_string(disk.join("device/model"))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    Ok(model)
}

fn mounted_err(path: &Path, m: &Mount) -> FlashError {
    FlashError::Mounted {
        path: path.to_path_buf(),
        what: format!("{} is mounted on {}", m.source, m.mount_point),
    }
}

/// The loop device a regular file is attached to, if any.
pub fn loop_device_of(path: &Path) -> Option<String> {
    let want = std::fs::canonicalize(path).ok()?;
    for e in std::fs::read_dir("/sys/block").ok()?.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue;
        };
        if Path::new(b.trim()) == want {
            return Some(format!("/dev/{name}"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn mountinfo_and_devnos() {
        let text = "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
                    43 27 8:17 / /media/my\\040card rw - vfat /dev/sdb1 rw\n\
                    22 27 0:21 / /proc rw,relatime - proc proc rw\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].devno, "254:0");
        assert_eq!(m[0].mount_point, "/");
        assert_eq!(m[0].source, "/dev/vda");
        assert_eq!(m[1].mount_point, "/media/my card");
        assert_eq!(m[1].source, "/dev/sdb1");
        assert_eq!(dev_major_minor(libc::makedev(8, 17)), (8, 17));
        assert_eq!(
            dev_major_minor(libc::makedev(259, 1_048_577)),
            (259, 1_048_577)
        );
    }

    /// The disk holding / is refused whatever else is true (the check runs before any write).
    #[test]
    fn system_disk_is_refused() {
        let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
            return;
        };
        let Some(root) = parse_mountinfo(&text)
            .into_iter()
            .find(|m| m.mount_point == "/" && m.source.starts_with("/dev/"))
        else {
            return;
        };
        let Some(dir) = sys_dir(&root.devno) else {
            return;
        };
        let mut disks = BTreeSet::new();
        disks_under(&dir, 0, &mut disks);
        for disk in disks {
            let dev = PathBuf::from(format!("/dev/{}", name_of(&disk)));
            let Ok(meta) = std::fs::metadata(&dev) else {
                continue;
            };
            let e = check_block_device(&dev, meta.rdev()).unwrap_err();
            assert!(matches!(e, FlashError::SystemDisk { .. }), "{e}");
        }
    }
}
