//! The image to flash: a raw `.img`, or an `.img.xz` decoded on the fly ([`super::xz`]).
//! Before anything is written it must prove to be a pos-hub image: an MBR whose
//! partition 1 is the FAT settings partition `POSHUB-CFG`. That partition (and the MBR)
//! is read into memory up front, so its `hub.env` can be read and the first bytes
//! written without reading the image twice.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::error::io;
use super::fat::{self, SETTINGS_LABEL};
use super::progress::human;
use super::settings::{comment_header, DEFAULT_HEADER};
use super::xz;
use super::FlashError;

const MIB: u64 = 1024 * 1024;
/// How much of the image (MBR up to the end of partition 1) is read before writing.
const MAX_PREFIX: u64 = 256 * MIB;

/// Partition 1 (the settings partition) of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Byte offset of partition 1.
    pub p1_offset: u64,
    /// Its length in bytes.
    pub p1_len: u64,
}

/// Partition 1 from an MBR (first sector): start sector at 446+8, sector count at
/// 446+12, both little endian, 512-byte sectors.
pub fn parse_mbr(mbr: &[u8]) -> Result<Layout, String> {
    if mbr.len() < 512 {
        return Err("shorter than one sector".into());
    }
    if mbr[510] != 0x55 || mbr[511] != 0xAA {
        return Err("no MBR partition table (boot signature 55 AA missing)".into());
    }
    let e = &mbr[446..462];
    let ptype = e[4];
    if ptype == 0xEE {
        return Err("it has a GPT partition table; pos-hub images use an MBR".into());
    }
    if ptype == 0 {
        return Err("partition 1 is empty".into());
    }
    let start = u32::from_le_bytes([e[8], e[9], e[10], e[11]]);
    let count = u32::from_le_bytes([e[12], e[13], e[14], e[15]]);
    if start == 0 || count == 0 {
        return Err("partition 1 has no start or no size".into());
    }
    Ok(Layout {
        p1_offset: u64::from(start) * 512,
        p1_len: u64::from(count) * 512,
    })
}

/// An opened image: its size (uncompressed), where it came from, and a reader
/// positioned after the bytes already taken into `prefix`.
pub struct ImageSource {
    pub path: PathBuf,
    /// Uncompressed size in bytes.
    pub size: u64,
    pub xz: bool,
    /// Device and inode of the file, so the image itself is refused as a target.
    pub dev_ino: (u64, u64),
    reader: Box<dyn Read>,
    /// The first bytes (MBR to the end of partition 1), read before writing.
    prefix: Vec<u8>,
}

impl ImageSource {
    /// Opens `path`, refusing what is not a raw or xz image (gzip, zstd, zip are named).
    pub fn open(path: &Path) -> Result<Self, FlashError> {
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(FlashError::ImageMissing(path.to_path_buf()))
            }
            Err(e) => return Err(io("cannot read the image", path)(e)),
        };
        if !meta.is_file() {
            return Err(FlashError::ImageNotFile(path.to_path_buf()));
        }
        let mut f = File::open(path).map_err(io("cannot open the image", path))?;
        let mut magic = [0u8; 6];
        let n = read_full(&mut f, &mut magic).map_err(io("cannot read the image", path))?;
        let magic = &magic[..n];
        let compressed = |format: &'static str, hint: String| FlashError::ImageCompressed {
            path: path.to_path_buf(),
            format,
            hint,
        };
        let p = path.display();
        if magic.starts_with(&[0x1f, 0x8b]) {
            return Err(compressed("gzip", format!("gunzip -k {p}")));
        }
        if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            return Err(compressed("zstd", format!("zstd -d {p}")));
        }
        if magic.starts_with(b"PK\x03\x04") {
            return Err(compressed("zip", format!("unzip {p}")));
        }
        let dev_ino = (meta.dev(), meta.ino());
        f.seek(SeekFrom::Start(0))
            .map_err(io("cannot read the image", path))?;
        let xz = magic == xz::MAGIC;
        let (size, reader): (u64, Box<dyn Read>) = if xz {
            let xz_err = |reason: String| FlashError::Xz {
                path: path.to_path_buf(),
                reason,
            };
            let size = xz::uncompressed_size(&mut f, meta.len()).map_err(xz_err)?;
            f.seek(SeekFrom::Start(0))
                .map_err(io("cannot read the image", path))?;
            (size, Box::new(xz::decoder(f)))
        } else {
            (meta.len(), Box::new(f))
        };
        Ok(Self {
            path: path.to_path_buf(),
            size,
            xz,
            dev_ino,
            reader,
            prefix: Vec::new(),
        })
    }

    fn not_ours(&self, reason: impl Into<String>) -> FlashError {
        FlashError::NotPosHubImage {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    /// Reads the MBR and partition 1 into memory and checks it is the settings partition.
    pub fn read_layout(&mut self) -> Result<Layout, FlashError> {
        let mut mbr = vec![0u8; 512];
        let n = self.read_some(&mut mbr)?;
        if n < 512 {
            return Err(self.not_ours("it is shorter than one sector"));
        }
        let layout = parse_mbr(&mbr).map_err(|r| self.not_ours(r))?;
        let end = layout.p1_offset + layout.p1_len;
        if end > self.size {
            return Err(self.not_ours(format!(
                "partition 1 ends at byte {end}, past the end of the image ({} bytes)",
                self.size
            )));
        }
        if end > MAX_PREFIX {
            return Err(self.not_ours(format!(
                "partition 1 ends at {}, past the first {}; the settings partition is small",
                human(end),
                human(MAX_PREFIX)
            )));
        }
        let mut prefix = mbr;
        prefix.resize(end as usize, 0);
        let got = self.read_some(&mut prefix[512..])?;
        if got < (end - 512) as usize {
            return Err(FlashError::ShortImage {
                got: 512 + got as u64,
                want: self.size,
            });
        }
        match fat::label(&prefix[layout.p1_offset as usize..]) {
            Some(l) if l == SETTINGS_LABEL => {}
            Some(l) => {
                return Err(self.not_ours(format!(
                    "partition 1 is a FAT file system labelled {l:?}, not {SETTINGS_LABEL}"
                )))
            }
            None => {
                return Err(self.not_ours(format!(
                    "partition 1 is not a FAT file system (the settings partition {SETTINGS_LABEL})"
                )))
            }
        }
        self.prefix = prefix;
        Ok(layout)
    }

    /// The comment header of the image's own `hub.env` (a default one if it has none).
    pub fn settings_header(&self, layout: &Layout) -> Result<String, FlashError> {
        let p1 = &self.prefix[layout.p1_offset as usize..];
        let text = fat::read_hub_env_in(p1).map_err(|source| FlashError::SettingsFat {
            path: self.path.clone(),
            what: "cannot read hub.env",
            source,
        })?;
        Ok(match text.map(|t| comment_header(&t)) {
            Some(h) if !h.is_empty() => h,
            _ => DEFAULT_HEADER.into(),
        })
    }

    /// Hands over the bytes read up front (the writer writes them first).
    pub fn take_prefix(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.prefix)
    }

    /// Reads as much as fits in `buf` (less only at the end of the image).
    pub fn read_some(&mut self, buf: &mut [u8]) -> Result<usize, FlashError> {
        read_full(&mut self.reader, buf).map_err(|e| self.read_err(e))
    }

    fn read_err(&self, e: std::io::Error) -> FlashError {
        if self.xz {
            FlashError::Xz {
                path: self.path.clone(),
                reason: e.to_string(),
            }
        } else {
            io("cannot read the image", &self.path)(e)
        }
    }

    /// After the last byte: no more data (an xz stream also ends cleanly, its checks
    /// verified by the decoder).
    pub fn finish(&mut self) -> Result<(), FlashError> {
        let mut extra = [0u8; 1];
        let more = self.read_some(&mut extra)?;
        if more > 0 {
            return Err(self.not_ours("it decompresses to more bytes than its index says"));
        }
        Ok(())
    }
}

/// Reads until `buf` is full or the input ends; returns how much was read.
pub fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mbr_with(ptype: u8, start: u32, count: u32) -> Vec<u8> {
        let mut m = vec![0u8; 512];
        m[446 + 4] = ptype;
        m[446 + 8..446 + 12].copy_from_slice(&start.to_le_bytes());
        m[446 + 12..446 + 16].copy_from_slice(&count.to_le_bytes());
        m[510] = 0x55;
        m[511] = 0xAA;
        m
    }

    #[test]
    fn mbr_offsets() {
        let l = parse_mbr(&mbr_with(0x0e, 2048, 32768)).unwrap();
        assert_eq!(l.p1_offset, 1024 * 1024);
        assert_eq!(l.p1_len, 16 * 1024 * 1024);
        // Little endian, and sectors beyond 2^24.
        let l = parse_mbr(&mbr_with(0x0c, 0x0100_0001, 8)).unwrap();
        assert_eq!(l.p1_offset, 0x0100_0001u64 * 512);
        assert!(parse_mbr(&mbr_with(0xee, 1, 100))
            .unwrap_err()
            .contains("GPT"));
        assert!(parse_mbr(&mbr_with(0, 2048, 100)).is_err());
        assert!(parse_mbr(&mbr_with(0x0e, 0, 100)).is_err());
        assert!(parse_mbr(&mbr_with(0x0e, 2048, 0)).is_err());
        let mut no_sig = mbr_with(0x0e, 2048, 100);
        no_sig[511] = 0;
        assert!(parse_mbr(&no_sig).is_err());
        assert!(parse_mbr(&[0u8; 100]).is_err());
    }
}
