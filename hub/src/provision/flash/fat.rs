//! The settings partition (partition 1, FAT, label `POSHUB-CFG`): its label and its
//! `hub.env`, read and written with the `fatfs` crate inside the binary, so a flash
//! needs no mtools and no mount. Writing overwrites the file's existing directory
//! entry, unmounts (clearing the dirty flag), fsyncs the target, drops its page cache
//! and reads the file back from the medium.

use std::fs::{File, OpenOptions};
use std::io::{Cursor, Read, Seek, Write};
use std::path::Path;

use super::write::drop_cache;
use super::FlashError;

/// The label of the settings partition (partition 1) in a pos-hub image.
pub const SETTINGS_LABEL: &str = "POSHUB-CFG";
/// The settings file in that partition.
pub const SETTINGS_FILE: &str = "hub.env";

/// File times in UTC: a laptop's time zone is not known here, and the box keeps UTC.
#[derive(Debug)]
struct UtcNow;

impl fatfs::TimeProvider for UtcNow {
    fn get_current_date(&self) -> fatfs::Date {
        self.get_current_date_time().date
    }
    fn get_current_date_time(&self) -> fatfs::DateTime {
        let t = time::OffsetDateTime::now_utc();
        fatfs::DateTime {
            date: fatfs::Date {
                // FAT dates run from 1980 to 2107.
                year: t.year().clamp(1980, 2107) as u16,
                month: u8::from(t.month()) as u16,
                day: t.day() as u16,
            },
            time: fatfs::Time {
                hour: t.hour() as u16,
                min: t.minute() as u16,
                sec: t.second() as u16,
                millis: t.millisecond(),
            },
        }
    }
}

static UTC_NOW: UtcNow = UtcNow;

fn options() -> fatfs::FsOptions {
    fatfs::FsOptions::new().time_provider(&UTC_NOW)
}

/// The volume label of the FAT file system in `partition` (its first bytes, at least
/// the boot sector); `None` when it is not a FAT file system.
pub fn label(partition: &[u8]) -> Option<String> {
    let fs = fatfs::FileSystem::new(Cursor::new(partition.to_vec()), options()).ok()?;
    Some(fs.volume_label().trim_end().to_string())
}

/// `hub.env` of the FAT file system held in memory (an image's partition 1);
/// `None` if it has none.
pub fn read_hub_env_in(partition: &[u8]) -> std::io::Result<Option<String>> {
    read_hub_env(Cursor::new(partition.to_vec()))
}

fn read_hub_env<T: Read + Write + Seek>(disk: T) -> std::io::Result<Option<String>> {
    let fs = fatfs::FileSystem::new(disk, options())?;
    let mut f = match fs.root_dir().open_file(SETTINGS_FILE) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)?;
    drop(f);
    fs.unmount()?;
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

/// The partition `offset..offset + len` of the open `file`, as a stream of its own.
fn partition(file: File, offset: u64, len: u64) -> std::io::Result<fscommon::StreamSlice<File>> {
    fscommon::StreamSlice::new(file, offset, offset + len)
}

/// Writes `hub.env` into the FAT partition at `offset` (of `len` bytes) of `target`,
/// syncs, and reads it back from the medium.
pub fn write_settings(target: &Path, offset: u64, len: u64, text: &str) -> Result<(), FlashError> {
    let fat_err = |what: &'static str| {
        move |source| FlashError::SettingsFat {
            path: target.to_path_buf(),
            what,
            source,
        }
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(target)
        .map_err(fat_err("cannot open the target"))?;
    {
        let disk = partition(file, offset, len).map_err(fat_err("cannot seek to it"))?;
        let fs = fatfs::FileSystem::new(disk, options())
            .map_err(fat_err("it is not a FAT file system any more"))?;
        {
            let mut f = fs
                .root_dir()
                .create_file(SETTINGS_FILE)
                .map_err(fat_err("cannot create hub.env"))?;
            f.truncate().map_err(fat_err("cannot truncate hub.env"))?;
            f.write_all(text.as_bytes())
                .map_err(fat_err("cannot write hub.env"))?;
            f.flush().map_err(fat_err("cannot write hub.env"))?;
        }
        fs.unmount().map_err(fat_err("cannot finish writing"))?;
    }
    let f = File::open(target).map_err(super::error::io(
        "cannot open the target to flush it",
        target,
    ))?;
    f.sync_all()
        .map_err(super::error::io("cannot flush the target", target))?;
    drop_cache(&f);
    let back = File::open(target)
        .and_then(|f| {
            drop_cache(&f);
            partition(f, offset, len)
        })
        .and_then(read_hub_env)
        .map_err(fat_err("cannot read hub.env back"))?;
    match back {
        Some(back) if back == text => Ok(()),
        _ => Err(FlashError::SettingsMismatch {
            path: target.to_path_buf(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 16 MiB FAT16 volume labelled like the settings partition, at byte `offset` of a
    /// file, with `hub.env` holding `text` (made with fatfs's own formatter).
    fn card(offset: u64, text: &str) -> tempfile::NamedTempFile {
        let len = 16u64 << 20;
        let mut vol = Cursor::new(vec![0u8; len as usize]);
        fatfs::format_volume(
            &mut vol,
            fatfs::FormatVolumeOptions::new().volume_label(*b"POSHUB-CFG "),
        )
        .unwrap();
        vol.set_position(0);
        {
            let fs = fatfs::FileSystem::new(&mut vol, options()).unwrap();
            let mut f = fs.root_dir().create_file(SETTINGS_FILE).unwrap();
            f.write_all(text.as_bytes()).unwrap();
            drop(f);
            fs.unmount().unwrap();
        }
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.as_file_mut().set_len(offset + len).unwrap();
        file.seek(std::io::SeekFrom::Start(offset)).unwrap();
        file.write_all(vol.get_ref()).unwrap();
        file
    }

    #[test]
    fn label_read_write_and_read_back() {
        let offset = 1 << 20;
        let old = "# a long comment line, longer than one would think, to span a bit\nDEV=on\n"
            .repeat(40);
        let file = card(offset, &old);
        let bytes = std::fs::read(file.path()).unwrap();
        let p1 = &bytes[offset as usize..];
        assert_eq!(label(p1).as_deref(), Some(SETTINGS_LABEL));
        assert_eq!(read_hub_env_in(p1).unwrap().as_deref(), Some(old.as_str()));
        assert_eq!(label(&[0u8; 4096]), None, "not a FAT file system");

        // Shorter than before: the file is truncated, not left with the old tail.
        let new = "PORT=4001\nUPDATE_CHANNEL=canary\n";
        write_settings(file.path(), offset, 16 << 20, new).unwrap();
        let bytes = std::fs::read(file.path()).unwrap();
        assert_eq!(
            read_hub_env_in(&bytes[offset as usize..])
                .unwrap()
                .as_deref(),
            Some(new)
        );
        assert!(
            bytes[..offset as usize].iter().all(|b| *b == 0),
            "outside partition 1 untouched"
        );
    }

    #[test]
    fn a_partition_without_hub_env_reads_as_none() {
        let mut vol = Cursor::new(vec![0u8; 16 << 20]);
        fatfs::format_volume(&mut vol, fatfs::FormatVolumeOptions::new()).unwrap();
        assert_eq!(read_hub_env_in(vol.get_ref()).unwrap(), None);
        let e = write_settings(Path::new("/nonexistent/card.img"), 0, 1 << 20, "x").unwrap_err();
        assert!(matches!(e, FlashError::SettingsFat { .. }), "{e}");
    }
}
