//! The data partition on first boot and after a power cut, init's part of the disk:
//! growing partition 4 to fill the card (MBR rewrite + BLKRRPART), the ext4 superblock
//! checks (blank? needs fsck? smaller than its partition?), and e2fsprogs to format,
//! check and grow it. Which disk and partition that is comes from
//! [`crate::system::disk`].

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use crate::system::disk::DiskError;
use crate::system::disk::{parse_mbr, BootDisk};

/// ext4 label given to the data partition when init formats it.
pub const DATA_LABEL: &str = "posdata";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DiskError + '_ {
    move |source| DiskError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// If partition 4 ends more than 4 MiB before the end of a disk of `disk_sectors`,
/// rewrites its entry in `sector` to reach the end (1 MiB aligned) and returns the
/// new length. CHS fields are left as the image builder wrote them (LBA is used).
pub fn grow_last_entry(
    sector: &mut [u8; 512],
    disk_sectors: u64,
) -> Result<Option<u32>, DiskError> {
    let parts = parse_mbr(sector)?;
    let p4 = parts[3];
    if p4.kind == 0 || p4.start == 0 {
        return Err(DiskError::Table(
            "partition 4 (data) is missing from the MBR".into(),
        ));
    }
    let end = p4.start as u64 + p4.sectors as u64;
    let limit = disk_sectors.min(u32::MAX as u64);
    let target = (limit & !2047).saturating_sub(p4.start as u64);
    if end + 8192 > limit || target <= p4.sectors as u64 {
        return Ok(None);
    }
    let len = target as u32;
    sector[446 + 48 + 12..446 + 48 + 16].copy_from_slice(&len.to_le_bytes());
    Ok(Some(len))
}

/// Grows partition 4 to fill the disk (first boot on a bigger card), re-reading the
/// partition table. Must run before any partition of the disk is mounted.
pub fn grow_data_partition(disk: &BootDisk) -> Result<Option<u64>, DiskError> {
    let dev = disk.dev();
    let size_path = PathBuf::from(format!("/sys/block/{}/size", disk.name));
    let disk_sectors: u64 = std::fs::read_to_string(&size_path)
        .map_err(io(&size_path))?
        .trim()
        .parse()
        .map_err(|_| DiskError::Table(format!("{} is not a number", size_path.display())))?;
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&dev)
        .map_err(io(&dev))?;
    let mut sector = [0u8; 512];
    f.read_exact_at(&mut sector, 0).map_err(io(&dev))?;
    let Some(len) = grow_last_entry(&mut sector, disk_sectors)? else {
        return Ok(None);
    };
    f.seek(SeekFrom::Start(0)).map_err(io(&dev))?;
    f.write_all(&sector).map_err(io(&dev))?;
    f.sync_all().map_err(io(&dev))?;
    // BLKRRPART: the kernel re-reads the table (nothing on the disk is mounted yet).
    const BLKRRPART: libc::c_ulong = 0x125F;
    use std::os::fd::AsRawFd;
    // SAFETY: ioctl without argument on an open block device.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), BLKRRPART as _) };
    if rc != 0 {
        return Err(DiskError::Io {
            path: dev,
            source: std::io::Error::last_os_error(),
        });
    }
    // udev is absent: devtmpfs recreates the partition nodes; wait for p4 to come back.
    let start = Instant::now();
    while !disk.data.exists() && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Some(len as u64 * 512))
}

/// The ext4 superblock facts init needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ext4Info {
    pub bytes: u64,
    /// The filesystem was not cleanly unmounted or has errors recorded.
    pub needs_check: bool,
}

/// Reads the ext4 superblock of `dev`; `None` when there is no ext2/3/4 filesystem.
pub fn ext4_info(dev: &Path) -> Result<Option<Ext4Info>, DiskError> {
    let mut sb = [0u8; 1024];
    File::open(dev)
        .and_then(|f| f.read_exact_at(&mut sb, 1024))
        .map_err(io(dev))?;
    Ok(ext4_info_of(&sb))
}

#[doc(hidden)]
pub fn ext4_info_of(sb: &[u8; 1024]) -> Option<Ext4Info> {
    let le32 = |o: usize| u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]);
    if u16::from_le_bytes([sb[56], sb[57]]) != 0xEF53 {
        return None;
    }
    let blocks = le32(4) as u64 | ((le32(0x150) as u64) << 32);
    let block_size = 1024u64 << le32(24).min(6);
    let state = u16::from_le_bytes([sb[58], sb[59]]);
    let incompat = le32(0x60);
    Some(Ext4Info {
        bytes: blocks.saturating_mul(block_size),
        // state bit 0 = cleanly unmounted, bit 1 = errors detected; incompat RECOVER
        // (0x4) = the journal holds transactions to replay (mounted when power went).
        needs_check: state & 1 == 0 || state & 2 != 0 || incompat & 0x4 != 0,
    })
}

/// Runs an e2fsprogs tool carried in the image; returns its exit code and output.
pub fn run_tool(tool: &'static str, args: &[&str]) -> Result<(i32, String), DiskError> {
    let path = format!("/sbin/{tool}");
    let out = std::process::Command::new(&path)
        .args(args)
        .output()
        .map_err(|e| DiskError::Tool {
            tool,
            dev: args.last().copied().unwrap_or("").to_string(),
            message: format!("cannot run {path}: {e}"),
        })?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok((out.status.code().unwrap_or(-1), text.trim().to_string()))
}

/// Creates the data filesystem on a blank partition.
pub fn format_data(dev: &Path) -> Result<(), DiskError> {
    let d = dev.to_string_lossy();
    let (code, out) = run_tool(
        "mke2fs",
        &[
            "-t",
            "ext4",
            "-F",
            "-q",
            "-L",
            DATA_LABEL,
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1",
            &d,
        ],
    )?;
    if code != 0 {
        return Err(DiskError::Tool {
            tool: "mke2fs",
            dev: d.into_owned(),
            message: out,
        });
    }
    Ok(())
}

/// Checks the data filesystem before mounting (`e2fsck -p`, then `-y` if the
/// preen pass asks for a person). Returns e2fsck's report when it fixed anything.
pub fn check_data(dev: &Path) -> Result<Option<String>, DiskError> {
    let d = dev.to_string_lossy();
    let (code, out) = run_tool("e2fsck", &["-p", &d])?;
    match code {
        0 => Ok(None),
        1 | 2 => Ok(Some(out)),
        _ => {
            let (code2, out2) = run_tool("e2fsck", &["-y", &d])?;
            if code2 <= 2 {
                Ok(Some(format!("{out}\n{out2}")))
            } else {
                Err(DiskError::Tool {
                    tool: "e2fsck",
                    dev: d.into_owned(),
                    message: format!("exit {code2}: {out2}"),
                })
            }
        }
    }
}

/// Grows a mounted ext4 filesystem to its partition (online resize).
pub fn grow_data_fs(dev: &Path) -> Result<(), DiskError> {
    let d = dev.to_string_lossy();
    let (code, out) = run_tool("resize2fs", &[&d])?;
    if code != 0 {
        return Err(DiskError::Tool {
            tool: "resize2fs",
            dev: d.into_owned(),
            message: out,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::disk::MbrPart;

    fn mbr(parts: &[(u8, u32, u32)]) -> [u8; 512] {
        let mut s = [0u8; 512];
        s[510] = 0x55;
        s[511] = 0xAA;
        for (i, (k, start, n)) in parts.iter().enumerate() {
            let e = 446 + 16 * i;
            s[e + 4] = *k;
            s[e + 8..e + 12].copy_from_slice(&start.to_le_bytes());
            s[e + 12..e + 16].copy_from_slice(&n.to_le_bytes());
        }
        s
    }

    #[test]
    fn grows_data_partition_to_end_of_bigger_disk_only() {
        let mut s = mbr(&[
            (0x0c, 2048, 32768),
            (0x0c, 34816, 131072),
            (0x0c, 165888, 131072),
            (0x83, 296960, 131072),
        ]);
        // Same size as the image: nothing to do.
        assert_eq!(grow_last_entry(&mut s, 296960 + 131072).unwrap(), None);
        // An 8 GB card.
        let disk = 15_523_840u64;
        let len = grow_last_entry(&mut s, disk).unwrap().unwrap();
        let p = parse_mbr(&s).unwrap();
        assert_eq!(p[3].sectors, len);
        assert_eq!((p[3].start as u64 + len as u64) % 2048, 0);
        assert!(p[3].start as u64 + len as u64 <= disk);
        assert_eq!(
            p[0],
            MbrPart {
                kind: 0x0c,
                start: 2048,
                sectors: 32768
            }
        );
        // Second run: already grown.
        assert_eq!(grow_last_entry(&mut s, disk).unwrap(), None);
    }

    #[test]
    fn refuses_table_without_signature_or_data_partition() {
        let mut s = [0u8; 512];
        assert!(grow_last_entry(&mut s, 1 << 20).is_err());
        let mut s = mbr(&[(0x0c, 2048, 32768)]);
        assert!(grow_last_entry(&mut s, 1 << 20).is_err());
    }

    #[test]
    fn reads_ext4_superblock() {
        let mut sb = [0u8; 1024];
        assert_eq!(ext4_info_of(&sb), None);
        sb[56] = 0x53;
        sb[57] = 0xEF;
        sb[4..8].copy_from_slice(&1000u32.to_le_bytes());
        sb[24] = 2; // 4 KiB blocks
        sb[58] = 1; // clean
        assert_eq!(
            ext4_info_of(&sb),
            Some(Ext4Info {
                bytes: 4_096_000,
                needs_check: false
            })
        );
        sb[0x60] = 0x4; // journal needs recovery
        assert!(ext4_info_of(&sb).unwrap().needs_check);
        sb[0x60] = 0;
        sb[58] = 0;
        assert!(ext4_info_of(&sb).unwrap().needs_check);
    }

    /// Found while writing fuzz/ (ext4): blocks x block size overflowed u64 for a
    /// garbled superblock (a panic with overflow checks, in PID 1).
    #[test]
    fn garbled_superblock_size_saturates() {
        let mut sb = [0u8; 1024];
        sb[56..58].copy_from_slice(&0xEF53u16.to_le_bytes());
        sb[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        sb[0x150..0x154].copy_from_slice(&u32::MAX.to_le_bytes());
        sb[24..28].copy_from_slice(&6u32.to_le_bytes());
        assert_eq!(ext4_info_of(&sb).unwrap().bytes, u64::MAX);
    }
}
