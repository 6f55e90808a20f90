//! The target: a block device (the whole card) or a file. Every refusal happens here,
//! before anything is opened for writing: the image itself, a missing device, a
//! partition, the system disk, anything mounted or in use ([`super::disks`]), a file
//! attached to a loop device, too small; then the user confirms.

use std::fs::File;
use std::io::{BufRead, IsTerminal, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::disks::{check_block_device, loop_device_of};
use super::error::io;
use super::image::ImageSource;
use super::progress::human;
use super::FlashError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetKind {
    NewFile,
    File,
    Block { model: Option<String> },
}

#[derive(Debug)]
pub struct Target {
    pub path: PathBuf,
    pub kind: TargetKind,
    /// Its size (the image's size for a new file).
    pub size: u64,
}

impl Target {
    /// One line for the plan: what kind of target and how big.
    pub fn describe(&self) -> String {
        match &self.kind {
            TargetKind::NewFile => format!("new file, {}", human(self.size)),
            TargetKind::File => format!("existing file, {}", human(self.size)),
            TargetKind::Block { model: Some(m) } => {
                format!("block device, {}, {m}", human(self.size))
            }
            TargetKind::Block { model: None } => format!("block device, {}", human(self.size)),
        }
    }

    /// Every refusal about the target, before anything is opened for writing.
    pub fn inspect(path: &Path, image: &ImageSource) -> Result<Self, FlashError> {
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Self::new_file(path, image.size)
            }
            Err(e) => return Err(io("cannot look at the target", path)(e)),
        };
        if (meta.dev(), meta.ino()) == image.dev_ino {
            return Err(FlashError::TargetIsImage(path.to_path_buf()));
        }
        let ft = meta.file_type();
        let (kind, size) = if ft.is_file() {
            if let Some(loopdev) = loop_device_of(path) {
                return Err(FlashError::LoopAttached {
                    path: path.to_path_buf(),
                    loopdev,
                });
            }
            (TargetKind::File, meta.len())
        } else if ft.is_block_device() {
            let model = check_block_device(path, meta.rdev())?;
            let mut f = File::open(path).map_err(io("cannot open the target", path))?;
            let size = f
                .seek(SeekFrom::End(0))
                .map_err(io("cannot get the size of the target", path))?;
            if size == 0 {
                return Err(FlashError::NoMedium(path.to_path_buf()));
            }
            (TargetKind::Block { model }, size)
        } else {
            return Err(FlashError::TargetKind(path.to_path_buf()));
        };
        if size < image.size {
            return Err(FlashError::TargetTooSmall {
                path: path.to_path_buf(),
                target: human(size),
                image: human(image.size),
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            kind,
            size,
        })
    }

    fn new_file(path: &Path, size: u64) -> Result<Self, FlashError> {
        let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        if abs.starts_with("/dev") {
            return Err(FlashError::TargetMissingDevice(path.to_path_buf()));
        }
        let dir = match abs.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !dir.is_dir() {
            return Err(FlashError::TargetNoDir {
                path: path.to_path_buf(),
                dir,
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            kind: TargetKind::NewFile,
            size,
        })
    }
}

/// Asks at a terminal before erasing the target (`--yes` skips it; no terminal and no
/// `--yes` is a refusal).
pub fn confirm(yes: bool, image: &ImageSource, target: &Target) -> Result<(), FlashError> {
    if yes {
        return Ok(());
    }
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(FlashError::NeedYes(target.path.clone()));
    }
    eprint!(
        "Write {} to {} ({})? all data on it will be lost [y/N] ",
        image.path.display(),
        target.path.display(),
        human(target.size)
    );
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    stdin
        .lock()
        .read_line(&mut line)
        .map_err(io("cannot read the answer from", Path::new("stdin")))?;
    match line.trim().to_ascii_lowercase().as_str() {
        "y" | "yes" => Ok(()),
        _ => Err(FlashError::NotConfirmed),
    }
}
