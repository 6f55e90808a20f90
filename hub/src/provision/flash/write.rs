//! Writing the image and proving it arrived: the bytes go out in 4 MiB writes (a block
//! device is flushed every 64 MiB so the progress shows the card's own pace), fsynced,
//! the page cache dropped, then everything is read back from the medium and its
//! SHA-256 compared with the image's.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::error::io;
use super::image::{read_full, ImageSource};
use super::progress::Progress;
use super::target::{Target, TargetKind};
use super::FlashError;

const MIB: u64 = 1024 * 1024;
const BUF: usize = 4 * MIB as usize;
/// A block device is flushed this often while writing, so the progress shows the card's pace.
const SYNC_EVERY: u64 = 64 * MIB;

fn open_for_write(target: &Target) -> Result<File, FlashError> {
    let path = &target.path;
    let mut o = OpenOptions::new();
    o.write(true);
    match target.kind {
        TargetKind::NewFile => {
            o.create_new(true);
        }
        TargetKind::File => {}
        // O_EXCL on a block device: the kernel refuses it while mounted or otherwise held.
        TargetKind::Block { .. } => {
            o.custom_flags(libc::O_EXCL);
        }
    }
    o.open(path).map_err(|e| {
        if e.raw_os_error() == Some(libc::EBUSY) {
            FlashError::InUse {
                path: path.clone(),
                what: "the kernel holds it: mounted, swap, or part of a RAID/LVM".into(),
            }
        } else {
            io("cannot open the target for writing", path)(e)
        }
    })
}

/// Writes the image; returns its SHA-256 (hex).
pub fn write_image(image: &mut ImageSource, target: &Target) -> Result<String, FlashError> {
    let path = &target.path;
    let mut out = open_for_write(target)?;
    if target.kind == TargetKind::NewFile {
        out.set_len(image.size)
            .map_err(io("cannot size the new file", path))?;
    }
    let block = matches!(target.kind, TargetKind::Block { .. });
    let mut hasher = Sha256::new();
    let mut progress = Progress::new("writing", image.size);
    let prefix = image.take_prefix();
    let mut done = 0u64;
    for chunk in prefix.chunks(BUF) {
        out.write_all(chunk)
            .map_err(io("cannot write to the target", path))?;
        hasher.update(chunk);
        done += chunk.len() as u64;
        progress.update(done);
    }
    drop(prefix);
    let mut buf = vec![0u8; BUF];
    let mut since_sync = done;
    while done < image.size {
        let want = BUF.min((image.size - done) as usize);
        let n = image.read_some(&mut buf[..want])?;
        if n == 0 {
            return Err(FlashError::ShortImage {
                got: done,
                want: image.size,
            });
        }
        out.write_all(&buf[..n])
            .map_err(io("cannot write to the target", path))?;
        hasher.update(&buf[..n]);
        done += n as u64;
        since_sync += n as u64;
        if block && since_sync >= SYNC_EVERY {
            out.sync_data()
                .map_err(io("cannot flush the target", path))?;
            since_sync = 0;
        }
        progress.update(done);
    }
    image.finish()?;
    out.sync_all()
        .map_err(io("cannot flush the target", path))?;
    progress.finish(done);
    drop_cache(&out);
    Ok(hex(&hasher.finalize()))
}

/// Asks the kernel to forget its cached pages of `f`, so a read-back comes from the medium.
pub fn drop_cache(f: &File) {
    // SAFETY: a plain syscall on a file descriptor we own; it reads no memory of ours.
    unsafe {
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

/// Reads the first `len` bytes of the target; returns their SHA-256 (hex).
pub fn read_back(path: &Path, len: u64) -> Result<String, FlashError> {
    let mut f = File::open(path).map_err(io("cannot open the target to verify", path))?;
    drop_cache(&f);
    let mut hasher = Sha256::new();
    let mut progress = Progress::new("verifying", len);
    let mut buf = vec![0u8; BUF];
    let mut done = 0u64;
    while done < len {
        let want = BUF.min((len - done) as usize);
        let n = read_full(&mut f, &mut buf[..want]).map_err(io("cannot read back", path))?;
        if n == 0 {
            return Err(FlashError::Io {
                what: "the target ended early while reading back",
                path: path.to_path_buf(),
                source: std::io::ErrorKind::UnexpectedEof.into(),
            });
        }
        hasher.update(&buf[..n]);
        done += n as u64;
        progress.update(done);
    }
    progress.finish(done);
    Ok(hex(&hasher.finalize()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
