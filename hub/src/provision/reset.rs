//! Factory reset: the box forgets its store and returns to unclaimed, keeping the store
//! CA unless asked (so devices keep trusting it). On the appliance the wipe is done by
//! init at the next boot (before the hub opens anything), asked for by a file named
//! `RESET` on the settings partition or by `<data>/RESET`, which the admin API and
//! `pos-hub reset --hub` write. `pos-hub reset --data-dir` wipes a directory directly
//! (a hub run by hand, stopped first).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use clap::Args;

#[derive(Args)]
pub struct ResetArgs {
    /// Reset a running appliance through its admin API (https://<box>:4001).
    #[arg(long, conflicts_with = "data_dir")]
    pub hub: Option<String>,
    /// An admin token (with --hub).
    #[arg(long, env = "POS_HUB_ADMIN_TOKEN")]
    pub token: Option<String>,
    /// Wipe this data directory directly (the hub must be stopped).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Also wipe the store CA: every device must then trust the new one.
    #[arg(long)]
    pub wipe_ca: bool,
    /// Do not ask for confirmation.
    #[arg(long)]
    pub yes: bool,
}

/// The marker init looks for on the data partition.
pub fn data_marker() -> PathBuf {
    Path::new(crate::system::DATA_DIR).join("RESET")
}

/// Asks init (via the data partition) to reset at the next boot, then reboots.
pub fn request_on_appliance(wipe_ca: bool) -> Result<(), String> {
    if !crate::system::under_init() {
        return Err(
            "not running as the appliance: stop the hub and use `pos-hub reset --data-dir DIR`"
                .into(),
        );
    }
    let text = if wipe_ca { "wipe-ca\n" } else { "keep-ca\n" };
    crate::util::write_atomic(&data_marker(), text.as_bytes(), 0o644).map_err(|e| e.to_string())?;
    crate::system::request_after(
        crate::system::Down::Reboot,
        std::time::Duration::from_millis(500),
    )
}

/// Wipes `dir` except its `ca/` (unless `wipe_ca`). Returns how many entries went.
pub fn wipe_dir(dir: &Path, wipe_ca: bool) -> Result<usize, String> {
    let mut n = 0;
    let rd = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for e in rd.flatten() {
        if !wipe_ca && e.file_name() == "ca" {
            continue;
        }
        let p = e.path();
        let r = if p.is_dir() && !p.is_symlink() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        r.map_err(|e| format!("{}: {e}", p.display()))?;
        n += 1;
    }
    Ok(n)
}

fn confirm(what: &str, yes: bool) -> Result<(), String> {
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err("refusing without confirmation: run at a terminal, or pass --yes".into());
    }
    eprint!("{what}\nType RESET to confirm: ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    if line.trim() != "RESET" {
        return Err("not confirmed; nothing was changed".into());
    }
    Ok(())
}

pub fn main(a: ResetArgs) -> i32 {
    let ca = if a.wipe_ca {
        "including the store CA (devices must trust a new one)"
    } else {
        "keeping the store CA"
    };
    let res = match (&a.hub, &a.data_dir) {
        (Some(hub), _) => confirm(&format!("Factory reset of the hub at {hub}: every event, device and setting on its data partition is wiped, {ca}; it restarts unclaimed."), a.yes).and_then(|_| remote(hub, a.token.as_deref(), a.wipe_ca)),
        (None, Some(dir)) => confirm(&format!("Factory reset of {}: everything in it is wiped, {ca}.", dir.display()), a.yes).and_then(|_| wipe_dir(dir, a.wipe_ca).map(|n| format!("wiped {n} entries of {}", dir.display()))),
        (None, None) => Err("give --hub URL (an appliance) or --data-dir DIR (a stopped hub)".into()),
    };
    match res {
        Ok(msg) => {
            println!("{msg}");
            0
        }
        Err(e) => {
            eprintln!("pos-hub reset: {e}");
            2
        }
    }
}

fn remote(hub: &str, token: Option<&str>, wipe_ca: bool) -> Result<String, String> {
    let token = token.ok_or("an admin token is needed: --token or POS_HUB_ADMIN_TOKEN")?;
    let base = hub.trim_end_matches('/').to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let plain = base.replacen("https://", "http://", 1);
        let ca = reqwest::get(format!("{plain}/ca.crt"))
            .await
            .map_err(|e| format!("fetching the store CA: {e}"))?
            .bytes()
            .await
            .map_err(|e| e.to_string())?;
        let cert = reqwest::Certificate::from_pem(&ca).map_err(|e| format!("store CA: {e}"))?;
        let client = reqwest::Client::builder()
            .add_root_certificate(cert)
            .tls_built_in_root_certs(false)
            .build()
            .map_err(|e| e.to_string())?;
        let resp = client
            .post(format!("{base}/admin/reset"))
            .bearer_auth(token.trim())
            .json(&serde_json::json!({"wipeCa": wipe_ca, "confirm": "RESET"}))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        if status.is_success() {
            Ok(format!(
                "reset requested; the box reboots and comes back unclaimed ({body})"
            ))
        } else {
            Err(format!("HTTP {status}: {body}"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wipe_keeps_the_ca_unless_asked() {
        let d = tempfile::tempdir().unwrap();
        for p in ["ca/ca.crt", "realms/t/s.db", "claimed.env", "dev/key.pem"] {
            let f = d.path().join(p);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(&f, "x").unwrap();
        }
        assert_eq!(wipe_dir(d.path(), false).unwrap(), 3);
        assert!(d.path().join("ca/ca.crt").exists());
        assert!(!d.path().join("claimed.env").exists());
        assert_eq!(wipe_dir(d.path(), true).unwrap(), 1);
        assert!(!d.path().join("ca").exists());
    }
}
