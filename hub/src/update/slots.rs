//! Boot slots as the Pi firmware sees them: `autoboot.txt` on the settings partition
//! names the default slot (`[all] boot_partition`) and the one a `0 tryboot` reboot
//! tries once (`[tryboot] boot_partition`). The running OS is on a trial boot when
//! the partition it booted is not the default (as Rugix decides). Commit rewrites
//! autoboot.txt with the booted slot as default, in one write + fsync (FAT has no
//! atomic rename), the settings partition remounted read-write for that moment.
//! Our own write through the kernel's vfat, not a FAT crate: the new text has the old
//! one's length, so the FAT and the file's size stay as they are and the data is one
//! sector (no cluster allocation a power cut could leave half done).

use std::path::{Path, PathBuf};

/// Slot A and B partition numbers.
pub const SLOT_A: u32 = 2;
pub const SLOT_B: u32 = 3;

pub fn other(slot: u32) -> u32 {
    if slot == SLOT_A {
        SLOT_B
    } else {
        SLOT_A
    }
}

pub fn slot_name(slot: u32) -> &'static str {
    if slot == SLOT_A {
        "A"
    } else {
        "B"
    }
}

/// The two partition numbers of autoboot.txt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Autoboot {
    pub default: u32,
    pub tryboot: u32,
}

pub fn parse_autoboot(text: &str) -> Option<Autoboot> {
    let mut section = "all";
    let (mut default, mut tryboot) = (None, None);
    for line in text.lines().map(str::trim) {
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = if s == "tryboot" { "tryboot" } else { "all" };
        } else if let Some(v) = line.strip_prefix("boot_partition=") {
            let n = v.trim().parse().ok();
            if section == "tryboot" {
                tryboot = n;
            } else {
                default = n;
            }
        }
    }
    let default = default?;
    Some(Autoboot {
        default,
        tryboot: tryboot.unwrap_or_else(|| other(default)),
    })
}

pub fn format_autoboot(a: Autoboot) -> String {
    format!(
        "[all]\ntryboot_a_b=1\nboot_partition={}\n[tryboot]\nboot_partition={}\n",
        a.default, a.tryboot
    )
}

/// Where the slots live on this box.
#[derive(Debug, Clone)]
pub struct Slots {
    /// Mount point of the settings partition (holds autoboot.txt).
    pub config_dir: PathBuf,
}

impl Slots {
    pub fn appliance() -> Self {
        Slots {
            config_dir: PathBuf::from(crate::system::CONFIG_DIR),
        }
    }

    pub fn autoboot(&self) -> Result<Autoboot, String> {
        let p = self.config_dir.join("autoboot.txt");
        let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        parse_autoboot(&text).ok_or_else(|| format!("{}: no boot_partition", p.display()))
    }

    /// Writes autoboot.txt so that `slot` is the default and the other the trial slot.
    pub fn make_default(&self, slot: u32) -> Result<(), String> {
        let text = format_autoboot(Autoboot {
            default: slot,
            tryboot: other(slot),
        });
        with_writable(&self.config_dir, || {
            use std::io::Write;
            let p = self.config_dir.join("autoboot.txt");
            // Same length as before (only the digits swap): overwrite in place, one
            // sector, no FAT size change, so a power cut leaves the old or the new file.
            let same_len = std::fs::metadata(&p)
                .map(|m| m.len() == text.len() as u64)
                .unwrap_or(false);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .truncate(!same_len)
                .create(true)
                .open(&p)
                .map_err(|e| format!("{}: {e}", p.display()))?;
            f.write_all(text.as_bytes())
                .map_err(|e| format!("{}: {e}", p.display()))?;
            f.sync_all().map_err(|e| format!("{}: {e}", p.display()))
        })
    }

    /// The block device of partition `slot` on the boot disk.
    pub fn device(&self, slot: u32) -> Result<PathBuf, String> {
        let d = crate::system::disk::find_boot_disk(std::time::Duration::from_secs(1))
            .map_err(|e| e.to_string())?;
        Ok(if slot == SLOT_A { d.slot_a } else { d.slot_b })
    }
}

/// Runs `f` with `dir` (a mount point) remounted read-write, then read-only again.
/// Outside the appliance (a plain directory) it just runs `f`.
fn with_writable<T>(dir: &Path, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    use nix::mount::{mount, MsFlags};
    let is_mount = std::fs::read_to_string("/proc/self/mounts")
        .map(|m| {
            m.lines()
                .any(|l| l.split_whitespace().nth(1) == Some(&*dir.to_string_lossy()))
        })
        .unwrap_or(false);
    if !is_mount {
        return f();
    }
    let base = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_REMOUNT | base,
        None::<&str>,
    )
    .map_err(|e| format!("remount {} read-write: {e}", dir.display()))?;
    let r = f();
    nix::unistd::sync();
    let _ = mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | base,
        None::<&str>,
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn autoboot_round_trip_and_swap() {
        let a =
            parse_autoboot("[all]\ntryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=3\n")
                .unwrap();
        assert_eq!(
            a,
            Autoboot {
                default: 2,
                tryboot: 3
            }
        );
        let b = parse_autoboot(&format_autoboot(Autoboot {
            default: 3,
            tryboot: 2,
        }))
        .unwrap();
        assert_eq!(
            b,
            Autoboot {
                default: 3,
                tryboot: 2
            }
        );
        assert!(
            format_autoboot(b).len() < 512,
            "the firmware reads at most 512 bytes"
        );
        assert_eq!(
            parse_autoboot("[all]\nboot_partition=3\n").unwrap().tryboot,
            2
        );
        assert!(parse_autoboot("garbage").is_none());
    }

    #[test]
    fn make_default_writes_a_plain_dir() {
        let d = tempfile::tempdir().unwrap();
        let s = Slots {
            config_dir: d.path().into(),
        };
        s.make_default(3).unwrap();
        assert_eq!(
            s.autoboot().unwrap(),
            Autoboot {
                default: 3,
                tryboot: 2
            }
        );
    }
}
