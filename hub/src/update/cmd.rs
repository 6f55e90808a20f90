//! Command-line side of updates: `pos-hub bundle create|inspect` (on a build machine)
//! and `pos-hub update status|check|install|rollback` (against a hub's admin API, since
//! the box itself has no shell).

use std::io::Read;
use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::bundle;

#[derive(Subcommand)]
pub enum BundleCmd {
    /// Turn a built image into a signed update bundle (slot A's partition, gzip).
    Create(CreateArgs),
    /// Verify a bundle's signature and print its manifest.
    Inspect {
        bundle: PathBuf,
        /// Directory of trusted keys (`<key id>.pub`).
        #[arg(long, default_value = "certs/bundle-keys")]
        keys: PathBuf,
    },
}

#[derive(Args)]
pub struct CreateArgs {
    /// The image (out/pos-hub-<version>-<board>.img).
    #[arg(long)]
    pub image: PathBuf,
    /// Version of that image.
    #[arg(long)]
    pub version: String,
    /// Ed25519 signing key, PKCS#8 PEM (certs/bundle-dev.key.pem for development).
    #[arg(long)]
    pub key: PathBuf,
    /// Key id (the name of the matching `<id>.pub` built into images).
    #[arg(long, default_value = "dev-2026")]
    pub key_id: String,
    /// The image's board: rpi (Pi 4 and Pi 5 families), rpi4 or rpi5 (one family).
    #[arg(long, default_value = "rpi")]
    pub board: String,
    /// The hardware boards this bundle may be installed on (comma-separated).
    #[arg(long, default_value = "rpi4,rpi400,cm4,rpi5")]
    pub compatible: String,
    /// The lowest running version this bundle may replace.
    #[arg(long)]
    pub min_version: Option<String>,
    #[arg(long, short)]
    pub out: PathBuf,
}

pub fn bundle_main(cmd: BundleCmd) -> i32 {
    match cmd {
        BundleCmd::Create(a) => match create(&a) {
            Ok(m) => {
                println!("{}", serde_json::to_string_pretty(&m).unwrap_or_default());
                eprintln!("wrote {}", a.out.display());
                0
            }
            Err(e) => {
                eprintln!("pos-hub bundle create: {e}");
                1
            }
        },
        BundleCmd::Inspect { bundle: path, keys } => {
            let res = (|| -> Result<bundle::Manifest, String> {
                let keys = bundle::load_keys(&keys).map_err(|e| e.to_string())?;
                let f =
                    std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                bundle::read_header(&mut std::io::BufReader::new(f), &keys)
                    .map_err(|e| e.to_string())
            })();
            match res {
                Ok(m) => {
                    println!("{}", serde_json::to_string_pretty(&m).unwrap_or_default());
                    0
                }
                Err(e) => {
                    eprintln!("pos-hub bundle inspect: {e}");
                    1
                }
            }
        }
    }
}

fn create(a: &CreateArgs) -> Result<bundle::Manifest, String> {
    let pem_text =
        std::fs::read_to_string(&a.key).map_err(|e| format!("{}: {e}", a.key.display()))?;
    let der =
        pem::parse(&pem_text).map_err(|e| format!("{}: not a PEM key: {e}", a.key.display()))?;
    let mut img =
        std::fs::File::open(&a.image).map_err(|e| format!("{}: {e}", a.image.display()))?;
    let mut mbr = [0u8; 512];
    img.read_exact(&mut mbr)
        .map_err(|e| format!("{}: {e}", a.image.display()))?;
    let parts =
        crate::system::disk::parse_mbr(&mbr).map_err(|e| format!("{}: {e}", a.image.display()))?;
    let slot = parts[1];
    if slot.sectors == 0 {
        return Err(format!(
            "{}: no boot slot A (partition 2)",
            a.image.display()
        ));
    }
    use std::io::{Seek, SeekFrom};
    img.seek(SeekFrom::Start(slot.start as u64 * 512))
        .map_err(|e| e.to_string())?;
    let slot_reader = img.take(slot.sectors as u64 * 512);
    let tmp = a.out.with_extension("partial");
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?,
    );
    let m = bundle::create(
        slot_reader,
        &bundle::CreateOptions {
            version: &a.version,
            board: &a.board,
            compatible: a
                .compatible
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
            min_version: a.min_version.clone(),
            key_id: &a.key_id,
            key_pkcs8: der.contents(),
            created: super::now_rfc3339(),
        },
        &mut out,
    )
    .map_err(|e| e.to_string())?;
    use std::io::Write;
    out.flush().map_err(|e| e.to_string())?;
    drop(out);
    std::fs::rename(&tmp, &a.out).map_err(|e| format!("{}: {e}", a.out.display()))?;
    Ok(m)
}

#[derive(Args)]
pub struct UpdateArgs {
    #[command(subcommand)]
    pub cmd: UpdateCmd,
    /// The hub's address (https://<box>:4001).
    #[arg(long, global = true, default_value = "https://localhost:4001")]
    pub hub: String,
    /// An admin token of one of the hub's realms.
    #[arg(long, global = true, env = "POS_HUB_ADMIN_TOKEN")]
    pub token: Option<String>,
    /// The store CA to trust (from /ca.crt); without it the hub's CA is fetched over
    /// plain HTTP and its fingerprint printed.
    #[arg(long, global = true)]
    pub ca: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum UpdateCmd {
    /// Running version, slots, phase, progress, history, failed versions.
    Status,
    /// Check the channel now (installs if offered; `--now` ignores the window and wave).
    Check {
        #[arg(long)]
        now: bool,
    },
    /// Install a bundle from a URL or a local file (uploaded), then reboot into its trial.
    Install {
        source: String,
        #[arg(long)]
        now: bool,
        #[arg(long)]
        force: bool,
    },
    /// Go back to the other slot's version.
    Rollback,
}

pub fn update_main(a: UpdateArgs) -> i32 {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pos-hub update: {e}");
            return 1;
        }
    };
    match rt.block_on(update_cmd(a)) {
        Ok(v) => {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            0
        }
        Err(e) => {
            eprintln!("pos-hub update: {e}");
            1
        }
    }
}

async fn update_cmd(a: UpdateArgs) -> Result<serde_json::Value, String> {
    let (client, base) = crate::util::hub_client(&a.hub, a.ca.as_deref()).await?;
    let token = a
        .token
        .ok_or("an admin token is needed: --token or POS_HUB_ADMIN_TOKEN")?;
    let q = |now: bool, force: bool| format!("now={}&force={}", now as u8, force as u8);
    let req = match a.cmd {
        UpdateCmd::Status => client.get(format!("{base}/admin/update")),
        UpdateCmd::Check { now } => {
            client.post(format!("{base}/admin/update/check?{}", q(now, false)))
        }
        UpdateCmd::Rollback => client.post(format!("{base}/admin/update/rollback")),
        UpdateCmd::Install { source, now, force } => {
            if source.starts_with("http://") || source.starts_with("https://") {
                client
                    .post(format!("{base}/admin/update/install?{}", q(now, force)))
                    .query(&[("url", source)])
            } else {
                let bytes = tokio::fs::read(&source)
                    .await
                    .map_err(|e| format!("{source}: {e}"))?;
                client
                    .post(format!("{base}/admin/update/install?{}", q(now, force)))
                    .body(bytes)
            }
        }
    };
    let resp = req
        .bearer_auth(token.trim())
        .send()
        .await
        .map_err(|e| format!("{base}: {e}"))?;
    let status = resp.status();
    let v: serde_json::Value = resp
        .json()
        .await
        .map_err(|e| format!("HTTP {status}: {e}"))?;
    if status.is_success() {
        Ok(v)
    } else {
        Err(format!(
            "HTTP {status}: {}",
            v.get("error").and_then(|e| e.as_str()).unwrap_or("")
        ))
    }
}
