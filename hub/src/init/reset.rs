//! Factory reset at boot, before anything opens the data partition.

use std::path::Path;

use nix::mount::{mount, MsFlags};

use super::bootlog::BootLog;
use super::{CONFIG_DIR, DATA_DIR};

/// Factory reset, asked for by a file named `RESET` on the settings partition (a person
/// with the card in a laptop) or `/data/RESET` (written by the admin API). Wipes the
/// data partition's contents, keeping the store CA (devices keep trusting the box)
/// unless the file says `wipe-ca`. The box then starts unclaimed (unless hub.env
/// names a realm).
pub fn if_asked(log: &BootLog) {
    let cfg_marker = Path::new(CONFIG_DIR).join("RESET");
    let data_marker = Path::new(DATA_DIR).join("RESET");
    let text = match (
        std::fs::read_to_string(&cfg_marker),
        std::fs::read_to_string(&data_marker),
    ) {
        (Ok(a), _) => a,
        (_, Ok(b)) => b,
        _ => return,
    };
    let wipe_ca = text.to_ascii_lowercase().contains("wipe-ca");
    log.line(format!(
        "FACTORY RESET requested: wiping the data partition{}",
        if wipe_ca {
            " including the store CA"
        } else {
            " (keeping the store CA)"
        }
    ));
    let keep_ca = Path::new(DATA_DIR).join("hub/ca");
    let (mut removed, mut failed) = (0, 0);
    let mut wipe = |p: &Path| {
        let r = if p.is_dir() && !p.is_symlink() {
            std::fs::remove_dir_all(p)
        } else {
            std::fs::remove_file(p)
        };
        match r {
            Ok(()) => removed += 1,
            Err(e) => {
                failed += 1;
                log.line(format!("reset: {}: {e}", p.display()));
            }
        }
    };
    if let Ok(rd) = std::fs::read_dir(DATA_DIR) {
        for e in rd.flatten() {
            let p = e.path();
            let name = e.file_name();
            // The marker goes last (below): a power cut mid-wipe must leave it, so the
            // next boot wipes again instead of starting on half a data partition.
            if name == "lost+found" || name == "RESET" {
                continue;
            }
            if name == "hub" && !wipe_ca {
                if let Ok(inner) = std::fs::read_dir(&p) {
                    for i in inner.flatten() {
                        if i.path() != keep_ca {
                            wipe(&i.path());
                        }
                    }
                }
                continue;
            }
            wipe(&p);
        }
    }
    for sub in ["log", "hub"] {
        let _ = std::fs::create_dir_all(Path::new(DATA_DIR).join(sub));
    }
    // The wipe is on disk before either marker goes.
    nix::unistd::sync();
    if cfg_marker.exists() {
        let remount = |flags: MsFlags| {
            mount(
                None::<&str>,
                CONFIG_DIR,
                None::<&str>,
                MsFlags::MS_REMOUNT
                    | MsFlags::MS_NOSUID
                    | MsFlags::MS_NODEV
                    | MsFlags::MS_NOEXEC
                    | flags,
                None::<&str>,
            )
        };
        let gone = remount(MsFlags::empty()).is_ok() && std::fs::remove_file(&cfg_marker).is_ok();
        nix::unistd::sync();
        let _ = remount(MsFlags::MS_RDONLY);
        if !gone {
            log.line("reset: could not remove RESET from the settings partition: remove it by hand or the box resets at every boot");
        }
    }
    if let Err(e) = std::fs::remove_file(&data_marker) {
        if e.kind() != std::io::ErrorKind::NotFound {
            failed += 1;
            log.line(format!("reset: {}: {e}", data_marker.display()));
        }
    }
    nix::unistd::sync();
    log.line(format!(
        "factory reset done: {removed} entries removed, {failed} failures"
    ));
}
