//! Small shared helpers: durable file writes and wall-clock time.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

/// Writes `data` to `path` so that it survives a power cut: write a temporary file
/// beside it, fsync it, rename it over the old one, fsync the directory.
/// `mode` sets the Unix permission bits of the new file (e.g. 0o600 for keys).
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."));
    fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        // A full partition (ENOSPC) or an I/O error: the old file is untouched;
        // do not leave a partial temporary file taking the space.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// Size and free bytes of the filesystem holding `path`. Free is what this process
/// may use: root may also write into ext4's reserved blocks.
// statvfs field types differ between targets (u64 here, u32 on some 32-bit ones).
#[allow(clippy::unnecessary_cast)]
pub fn fs_space(path: &Path) -> Option<(u64, u64)> {
    let s = nix::sys::statvfs::statvfs(path).ok()?;
    let frag = s.fragment_size() as u64;
    let free = if nix::unistd::geteuid().is_root() {
        s.blocks_free() as u64
    } else {
        s.blocks_available() as u64
    };
    Some((s.blocks() as u64 * frag, free * frag))
}

/// Milliseconds since the Unix epoch by the system clock.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Seconds since the Unix epoch by the system clock.
pub fn now_secs() -> i64 {
    now_ms() / 1000
}

/// Raises RLIMIT_NOFILE to its hard limit, so a hub can hold thousands of devices.
pub fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return want.rlim_cur;
            }
        }
        lim.rlim_cur
    }
}

/// An HTTP client for a hub's admin API (`pos-hub update|logs|support-bundle --hub URL`):
/// over https it trusts only the store CA, from `ca` or fetched from the hub's plain
/// `/ca.crt`. Returns the client and the base URL without a trailing slash.
pub async fn hub_client(
    hub: &str,
    ca: Option<&std::path::Path>,
) -> Result<(reqwest::Client, String), String> {
    let base = hub.trim_end_matches('/').to_string();
    let mut b = reqwest::Client::builder().connect_timeout(std::time::Duration::from_secs(10));
    if base.starts_with("https://") {
        let ca_pem = match ca {
            Some(p) => std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?,
            None => {
                let plain = base.replacen("https://", "http://", 1);
                reqwest::get(format!("{plain}/ca.crt"))
                    .await
                    .map_err(|e| format!("fetching the store CA from {plain}/ca.crt: {e}"))?
                    .bytes()
                    .await
                    .map_err(|e| e.to_string())?
                    .to_vec()
            }
        };
        let cert = reqwest::Certificate::from_pem(&ca_pem)
            .map_err(|e| format!("the store CA is not a PEM certificate: {e}"))?;
        b = b.add_root_certificate(cert).tls_built_in_root_certs(false);
    }
    Ok((b.build().map_err(|e| e.to_string())?, base))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write that fails half way (here at the file-size limit, as it does with
    /// ENOSPC on a full partition) leaves the old file whole and no temporary file.
    /// The limit is per process, so the write runs in a copy of this test binary.
    #[test]
    fn failed_atomic_write_keeps_the_old_file() {
        if let Some(p) = std::env::var_os("POS_HUB_FSIZE_CHILD") {
            let r = write_atomic(Path::new(&p), &vec![b'x'; 64 * 1024], 0o644);
            assert!(r.is_err(), "a 64 KiB write under a 4 KiB limit succeeded");
            return;
        }
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        write_atomic(&p, b"old", 0o644).unwrap();
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "util::tests::failed_atomic_write_keeps_the_old_file",
            "--exact",
            "--test-threads=1",
        ])
        .env("POS_HUB_FSIZE_CHILD", &p)
        .stdout(std::process::Stdio::null());
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                let lim = libc::rlimit {
                    rlim_cur: 4096,
                    rlim_max: 4096,
                };
                libc::setrlimit(libc::RLIMIT_FSIZE, &lim);
                Ok(())
            });
        }
        let st = cmd.status().unwrap();
        assert!(st.success(), "child: {st}");
        assert_eq!(fs::read(&p).unwrap(), b"old");
        assert!(!dir.path().join(".state.json.tmp").exists());
    }

    #[test]
    fn atomic_write_replaces_and_sets_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/key.pem");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!dir.path().join("sub/.key.pem.tmp").exists());
    }
}
