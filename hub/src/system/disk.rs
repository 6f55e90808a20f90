//! Which disk and which partition this box is: the boot disk is found by its settings
//! partition's FAT label, never by a fixed device name, so the same image boots from
//! `/dev/mmcblk0` on a Pi and `/dev/vda` under QEMU; its MBR gives the four
//! partitions, and where init mounts them is fixed here. Init (mounting, growing) and
//! the update agent (writing a slot) both ask this module.
//!
//! Layout (see `buildroot-config/image.conf`): 1 settings (FAT, label `POSHUB-CFG`),
//! 2 boot slot A, 3 boot slot B (FAT), 4 data (ext4, label `posdata`).
//!
//! The MBR is read by hand (four 16-byte entries) rather than with a partition crate:
//! init's growth of partition 4 must change one length field and rewrite one sector, in
//! place, so that a power cut leaves the old table or the new one.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where the settings partition is mounted; the hub reads `hub.env` there.
pub const CONFIG_DIR: &str = "/config";
/// Where the data partition is mounted.
pub const DATA_DIR: &str = "/data";
/// FAT volume label of partition 1, the settings partition.
pub const SETTINGS_LABEL: &str = "POSHUB-CFG";

/// Why a disk step failed.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("no disk with a settings partition labelled {SETTINGS_LABEL} appeared within {0:?} (is the SD card inserted and flashed with a pos-hub image?)")]
    NotFound(Duration),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Table(String),
    #[error("{tool} on {dev} failed: {message}")]
    Tool {
        tool: &'static str,
        dev: String,
        message: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DiskError + '_ {
    move |source| DiskError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The boot disk: its device name and the device paths of its four partitions.
#[derive(Debug, Clone)]
pub struct BootDisk {
    /// Kernel name of the whole disk (`vda`, `mmcblk0`).
    pub name: String,
    pub settings: PathBuf,
    pub slot_a: PathBuf,
    pub slot_b: PathBuf,
    pub data: PathBuf,
}

impl BootDisk {
    pub fn dev(&self) -> PathBuf {
        PathBuf::from(format!("/dev/{}", self.name))
    }
}

/// Partition `n` of disk `name` (`vda` + 4 = `vda4`, `mmcblk0` + 4 = `mmcblk0p4`).
pub fn part_name(name: &str, n: u32) -> String {
    if name.ends_with(|c: char| c.is_ascii_digit()) {
        format!("{name}p{n}")
    } else {
        format!("{name}{n}")
    }
}

/// Waits (block drivers probe asynchronously) for the disk whose partition 1 carries
/// the settings label.
pub fn find_boot_disk(timeout: Duration) -> Result<BootDisk, DiskError> {
    let start = Instant::now();
    loop {
        if let Ok(dir) = std::fs::read_dir("/sys/block") {
            let mut names: Vec<String> = dir
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with("loop") && !n.starts_with("ram"))
                .collect();
            names.sort();
            for name in names {
                let p1 = PathBuf::from(format!("/dev/{}", part_name(&name, 1)));
                if let Ok(label) = fat_label(&p1) {
                    if label == SETTINGS_LABEL {
                        let p = |n| PathBuf::from(format!("/dev/{}", part_name(&name, n)));
                        return Ok(BootDisk {
                            settings: p(1),
                            slot_a: p(2),
                            slot_b: p(3),
                            data: p(4),
                            name,
                        });
                    }
                }
            }
        }
        if start.elapsed() > timeout {
            return Err(DiskError::NotFound(timeout));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The volume label of a FAT12/16/32 filesystem (boot sector), trimmed.
pub fn fat_label(dev: &Path) -> Result<String, DiskError> {
    let mut bs = [0u8; 512];
    File::open(dev)
        .and_then(|mut f| f.read_exact(&mut bs))
        .map_err(io(dev))?;
    Ok(fat_label_of(&bs).unwrap_or_default())
}

#[doc(hidden)]
pub fn fat_label_of(bs: &[u8; 512]) -> Option<String> {
    if bs[510] != 0x55 || bs[511] != 0xAA {
        return None;
    }
    // FAT32 keeps sectors-per-FAT at 0x16 as 0 and its extended boot record at 0x40.
    let fat32 = u16::from_le_bytes([bs[0x16], bs[0x17]]) == 0;
    let (sig, label) = if fat32 { (0x42, 0x47) } else { (0x26, 0x2B) };
    if bs[sig] != 0x29 {
        return None;
    }
    Some(
        String::from_utf8_lossy(&bs[label..label + 11])
            .trim_end()
            .to_string(),
    )
}

/// One MBR partition entry (LBA start and length, in 512-byte sectors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MbrPart {
    pub kind: u8,
    pub start: u32,
    pub sectors: u32,
}

/// The four primary entries of an MBR sector.
pub fn parse_mbr(sector: &[u8; 512]) -> Result<[MbrPart; 4], DiskError> {
    if sector[510] != 0x55 || sector[511] != 0xAA {
        return Err(DiskError::Table("no MBR signature on the boot disk".into()));
    }
    let mut parts = [MbrPart {
        kind: 0,
        start: 0,
        sectors: 0,
    }; 4];
    for (i, p) in parts.iter_mut().enumerate() {
        let e = &sector[446 + 16 * i..446 + 16 * (i + 1)];
        p.kind = e[4];
        p.start = u32::from_le_bytes([e[8], e[9], e[10], e[11]]);
        p.sectors = u32::from_le_bytes([e[12], e[13], e[14], e[15]]);
    }
    Ok(parts)
}

/// Size in bytes of a block device, by sysfs.
pub fn dev_bytes(dev: &Path) -> Option<u64> {
    let name = dev.file_name()?.to_string_lossy().into_owned();
    let s = std::fs::read_to_string(format!("/sys/class/block/{name}/size")).ok()?;
    s.trim().parse::<u64>().ok().map(|n| n * 512)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names_follow_kernel_rules() {
        assert_eq!(part_name("vda", 4), "vda4");
        assert_eq!(part_name("mmcblk0", 4), "mmcblk0p4");
        assert_eq!(part_name("nvme0n1", 1), "nvme0n1p1");
    }

    #[test]
    fn reads_fat_labels() {
        let mut bs = [0u8; 512];
        bs[510] = 0x55;
        bs[511] = 0xAA;
        // FAT16: sectors per FAT non-zero, signature at 0x26, label at 0x2B.
        bs[0x16] = 32;
        bs[0x26] = 0x29;
        bs[0x2B..0x2B + 11].copy_from_slice(b"POSHUB-CFG ");
        assert_eq!(fat_label_of(&bs).as_deref(), Some("POSHUB-CFG"));
        // FAT32.
        let mut bs32 = [0u8; 512];
        bs32[510] = 0x55;
        bs32[511] = 0xAA;
        bs32[0x42] = 0x29;
        bs32[0x47..0x47 + 11].copy_from_slice(b"BOOT-A     ");
        assert_eq!(fat_label_of(&bs32).as_deref(), Some("BOOT-A"));
        assert_eq!(fat_label_of(&[0u8; 512]), None);
    }
}
