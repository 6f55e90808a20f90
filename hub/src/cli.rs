//! The `pos-hub` command line: each subcommand is a short function calling the
//! module that owns the work.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::auth::keys::SigningKey;
use crate::auth::token::{mint, Claims};
use crate::config::{Config, Settings};
use crate::util::now_secs;

#[derive(Parser)]
#[command(name = "pos-hub", version = crate::VERSION, about = "Store hub for point-of-sale devices")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the hub.
    Serve(ServeArgs),
    /// Cluster tokens.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Find hubs on the LAN by mDNS; with --realm, check the hub's CA against its advertised fingerprint.
    Discover {
        /// How long to listen.
        #[arg(long, default_value = "3s")]
        timeout: String,
        /// Only this realm, `tenantId:storeId`; fetch its /ca.crt and compare fingerprints.
        #[arg(long)]
        realm: Option<String>,
    },
    /// The store CA (created by the first `serve` with TLS on).
    Ca {
        /// The hub's data directory (DATA_DIR; /data on the device).
        #[arg(long, value_name = "DIR", global = true)]
        data_dir: Option<PathBuf>,
        #[command(subcommand)]
        cmd: CaCmd,
    },
    /// Update bundles: create (build machine) and inspect.
    Bundle {
        #[command(subcommand)]
        cmd: crate::update::cmd::BundleCmd,
    },
    /// OTA updates of a hub, through its admin API: status, check, install, rollback.
    Update(crate::update::cmd::UpdateArgs),
    /// Write a firmware image to a card (or file) with this store's settings in hub.env.
    Flash(crate::provision::flash::FlashArgs),
    /// Factory reset: wipe the data (keeping the store CA unless --wipe-ca), back to unclaimed.
    Reset(crate::provision::reset::ResetArgs),
    /// A hub's logs (hub and init), newest last, through its admin API; -f follows.
    Logs(crate::ops::cmd::LogsArgs),
    /// Download a hub's support bundle (.tar.gz: status, logs, versions, partitions,
    /// update history, clock and power, realms with event counts; no event contents
    /// or secrets).
    SupportBundle(crate::ops::cmd::BundleArgs),
}

#[derive(Subcommand)]
enum CaCmd {
    /// Print the store CA certificate (PEM, or DER with --der).
    Export {
        #[arg(long)]
        der: bool,
    },
    /// Print the SHA-256 fingerprint of the store CA certificate.
    Fingerprint,
    /// Print a CSR for the store CA, for the tenant root to sign (the key stays here).
    Csr,
    /// Install the chain the tenant root signed: store CA first, then up to the root.
    InstallChain { chain: PathBuf },
}

#[derive(Args)]
struct ServeArgs {
    /// Development mode: data in ./data, a generated dev key, realm t-dev:s-dev,
    /// a dev device token printed and written to <data-dir>/dev-token.txt.
    #[arg(long)]
    dev: bool,
    /// A .env file with the hub's settings (the environment overrides it).
    #[arg(long, value_name = "PATH")]
    env_file: Option<PathBuf>,
    /// Where databases and keys live (DATA_DIR; /data on the device).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// A realms file (JSON array) or directory of realm JSON files (REALMS_FILE).
    #[arg(long, value_name = "PATH")]
    realms: Option<PathBuf>,
    /// The port for HTTP and Socket.IO (PORT, default 4001).
    #[arg(long)]
    port: Option<u16>,
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Sign a device token (for tests, and for operators standing in for the cloud).
    Mint(MintArgs),
}

#[derive(Args)]
struct MintArgs {
    /// Private key, PKCS#8 PEM (Ed25519, EC P-256 or RSA).
    #[arg(long, value_name = "PEM")]
    key: PathBuf,
    #[arg(long)]
    tenant: String,
    #[arg(long)]
    store: String,
    #[arg(long)]
    device: String,
    #[arg(long, default_value = "till")]
    role: String,
    /// Lifetime, e.g. 1h, 30d; a negative value (--ttl=-1h) makes an expired token.
    #[arg(long, default_value = "1h", allow_hyphen_values = true)]
    ttl: String,
    /// Key id to put in the header (for JWKS key rotation).
    #[arg(long)]
    kid: Option<String>,
    #[arg(long)]
    iss: Option<String>,
    #[arg(long)]
    aud: Option<String>,
    /// Not valid before now + this duration (e.g. 10m).
    #[arg(long)]
    nbf_in: Option<String>,
}

/// The hub's log lines (see `ops::logs`): one format on stderr and in hub.log.
fn init_logging() {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::EnvFilter;
    // async-nats logs every failed connection attempt itself (a retry every few
    // seconds); the bridge reports each incident once with what to do, so the
    // client's own lines are off unless asked for by name (RUST_LOG=async_nats=debug).
    let quiet = |d: String| {
        if d.contains("async_nats") {
            d
        } else {
            format!("{d},async_nats=off")
        }
    };
    let filter = std::env::var("RUST_LOG")
        .map_err(|_| ())
        .and_then(|d| EnvFilter::try_new(quiet(d)).map_err(|_| ()))
        .or_else(|_| {
            EnvFilter::try_new(quiet(
                std::env::var("LOG_LEVEL").unwrap_or_else(|_| "info".into()),
            ))
        })
        .unwrap_or_else(|_| EnvFilter::new("info,async_nats=off"));
    let _ = tracing_subscriber::registry()
        .with(crate::ops::logs::LineLayer::new(true).with_filter(filter))
        .try_init();
}

/// A note for the person at the console that must not go into a log file (dev
/// tokens): under init, straight to /dev/console (init copies the hub's stderr into
/// hub.log); otherwise stderr, which the hub never writes to a file itself.
fn console_only(msg: &str) {
    if crate::system::under_init() {
        if let Ok(mut c) = std::fs::OpenOptions::new().write(true).open("/dev/console") {
            use std::io::Write;
            let _ = writeln!(c, "{msg}");
        }
        return;
    }
    eprintln!("{msg}");
}

/// Runs the CLI; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Serve(a) => serve(a),
        Cmd::Ca { data_dir, cmd } => ca(data_dir, cmd),
        Cmd::Bundle { cmd } => crate::update::cmd::bundle_main(cmd),
        Cmd::Update(a) => crate::update::cmd::update_main(a),
        Cmd::Flash(a) => crate::provision::flash::run(a),
        Cmd::Reset(a) => crate::provision::reset::main(a),
        Cmd::Logs(a) => crate::ops::cmd::logs_main(a),
        Cmd::SupportBundle(a) => crate::ops::cmd::bundle_main(a),
        Cmd::Discover { timeout, realm } => discover(&timeout, realm.as_deref()),
        Cmd::Token {
            cmd: TokenCmd::Mint(a),
        } => match token_mint(a) {
            Ok(t) => {
                println!("{t}");
                0
            }
            Err(e) => {
                eprintln!("pos-hub token mint: {e}");
                2
            }
        },
    }
}

fn serve(a: ServeArgs) -> i32 {
    init_logging();
    let mut settings = match Settings::load(a.env_file.as_deref()) {
        Ok(s) => s,
        Err(e) => return config_error(&a, None, &e.to_string()),
    };
    // DEV=on in the settings file is the same as --dev (the firmware image's default
    // hub.env uses it, so a newcomer's box works with a printed dev token).
    let dev = a.dev
        || match settings.get("DEV").map(str::trim) {
            None | Some("") | Some("off") | Some("false") | Some("0") | Some("no") => false,
            Some("on") | Some("true") | Some("1") | Some("yes") => true,
            Some(other) => {
                let msg = format!("DEV={other}: expected on or off");
                return config_error(&a, Some(&settings), &msg);
            }
        };
    let data_dir = a
        .data_dir
        .clone()
        .or_else(|| settings.get("DATA_DIR").map(PathBuf::from))
        .or_else(|| dev.then(|| PathBuf::from("./data")));
    // A box claimed on first boot keeps its realm on the data partition.
    if let Some(dir) = &data_dir {
        if let Err(e) = crate::provision::claim::merge_claimed(&mut settings, dir) {
            return config_error(&a, Some(&settings), &e.to_string());
        }
    }
    if dev {
        let dir = data_dir.clone().unwrap_or_else(|| PathBuf::from("./data"));
        // --dev talks to no NTP server unless one is named.
        if settings.get("NTP_SERVERS").is_none() {
            settings.set("NTP_SERVERS", "off");
        }
        match crate::serve::prepare_dev(&dir, &mut settings) {
            Ok(token) => {
                console_only(&format!(
                    "pos-hub --dev: realm {}:{}; device token (also in {}):\n{token}",
                    crate::serve::DEV_TENANT,
                    crate::serve::DEV_STORE,
                    dir.join("dev-token.txt").display()
                ));
                if let Ok(admin) = std::fs::read_to_string(dir.join("dev-admin-token.txt")) {
                    console_only(&format!(
                        "pos-hub --dev: admin token (also in {}):\n{}",
                        dir.join("dev-admin-token.txt").display(),
                        admin.trim()
                    ));
                }
            }
            Err(e) => {
                eprintln!("pos-hub: {e}");
                return 1;
            }
        }
    }
    let cfg = match Config::from_settings(&settings, data_dir, a.realms.clone(), a.port) {
        Ok(mut c) => {
            c.dev = dev;
            c
        }
        Err(e) => return config_error(&a, Some(&settings), &e.to_string()),
    };
    if let Some(after) = settings.get("TEST_HANG_AFTER") {
        test_hang_after(after);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pos-hub: cannot start the runtime: {e}");
            return 1;
        }
    };
    match rt.block_on(crate::serve::run(cfg)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("pos-hub: {e}");
            tracing::error!(error = %e, "hub stopped");
            1
        }
    }
}

/// A configuration error: exit 78 (EX_CONFIG) normally; under the appliance's init
/// the hub stays up instead (no boot loop) and answers /healthz and /status with the
/// error on plain HTTP until the settings are fixed and the box restarted.
fn config_error(a: &ServeArgs, settings: Option<&Settings>, message: &str) -> i32 {
    eprintln!("pos-hub: configuration error: {message}");
    if !crate::system::under_init() {
        return 78; // EX_CONFIG
    }
    let port = a
        .port
        .or_else(|| {
            settings
                .and_then(|s| s.get("PORT"))
                .and_then(|p| p.trim().parse().ok())
        })
        .unwrap_or(4001);
    let file = a
        .env_file
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pos-hub: cannot start the runtime: {e}");
            return 78;
        }
    };
    let data_dir = a.data_dir.clone().unwrap_or_else(|| PathBuf::from("/data"));
    match rt.block_on(crate::serve::run_config_error(
        port,
        format!("{file}: {message}"),
        data_dir,
    )) {
        Ok(()) => 78,
        Err(e) => {
            eprintln!("pos-hub: {e}");
            78
        }
    }
}

/// TEST_HANG_AFTER=<duration>: a test-only switch that freezes the whole hub process
/// (SIGSTOP) after that long, so the watchdog test can see a real hang.
fn test_hang_after(after: &str) {
    let Ok(d) = humantime::parse_duration(after.trim()) else {
        eprintln!("pos-hub: TEST_HANG_AFTER={after}: not a duration, ignored");
        return;
    };
    let spawned = std::thread::Builder::new()
        .name("test-hang".into())
        .spawn(move || {
            std::thread::sleep(d);
            eprintln!("pos-hub: TEST_HANG_AFTER reached: freezing this process now (test switch)");
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
        });
    if let Err(e) = spawned {
        eprintln!("pos-hub: TEST_HANG_AFTER: {e}");
    }
}

fn ca(data_dir: Option<PathBuf>, cmd: CaCmd) -> i32 {
    use std::io::Write;
    let dir = data_dir
        .or_else(|| std::env::var_os("DATA_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/data"));
    let ca_dir = crate::tls::StoreCa::dir_in(&dir);
    if !ca_dir.exists() {
        eprintln!(
            "pos-hub ca: no store CA in {} yet; it is created by the first `pos-hub serve` with TLS on (give --data-dir)",
            ca_dir.display()
        );
        return 2;
    }
    let mut ca = match crate::tls::StoreCa::load_or_create(&dir, &[], now_secs()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pos-hub ca: {e}");
            return 1;
        }
    };
    let r = match cmd {
        CaCmd::Export { der: true } => std::io::stdout()
            .write_all(&ca.cert_der)
            .map_err(|e| e.to_string()),
        CaCmd::Export { der: false } => {
            print!("{}", ca.cert_pem);
            Ok(())
        }
        CaCmd::Fingerprint => {
            println!("{}", ca.fingerprint());
            Ok(())
        }
        CaCmd::Csr => ca
            .csr_pem()
            .map(|p| print!("{p}"))
            .map_err(|e| e.to_string()),
        CaCmd::InstallChain { chain } => std::fs::read_to_string(&chain)
            .map_err(|e| format!("cannot read {}: {e}", chain.display()))
            .and_then(|text| ca.install_chain(&text, &chain).map_err(|e| e.to_string()))
            .map(|_| eprintln!("installed; restart the hub to serve the new chain")),
    };
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("pos-hub ca: {e}");
            1
        }
    }
}

fn discover(timeout: &str, realm: Option<&str>) -> i32 {
    let t = match humantime::parse_duration(timeout) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("pos-hub discover: --timeout {timeout:?}: {e}");
            return 2;
        }
    };
    let want = match realm.map(|r| r.split_once(':')) {
        None => None,
        Some(Some((t, s))) => Some((t.to_string(), s.to_string())),
        Some(None) => {
            eprintln!("pos-hub discover: --realm takes tenantId:storeId (e.g. t-abc:s-001)");
            return 2;
        }
    };
    let found = match crate::discovery::browse(t) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("pos-hub discover: {e}");
            return 1;
        }
    };
    let mut matched = 0;
    let mut bad = 0;
    for f in &found {
        if let Some((t, s)) = &want {
            if &f.tenant_id != t || &f.store_id != s {
                continue;
            }
        }
        matched += 1;
        let addrs: Vec<String> = f.addresses.iter().map(|a| a.to_string()).collect();
        println!(
            "{}:{}  {}  port {}  {}  tls={}  caFp={}",
            f.tenant_id,
            f.store_id,
            f.host,
            f.port,
            addrs.join(","),
            f.tls,
            f.ca_fp.as_deref().unwrap_or("-")
        );
        if want.is_some() {
            let Some(expected) = &f.ca_fp else {
                println!("  no caFp advertised: cannot check the CA");
                bad += 1;
                continue;
            };
            let mut checked = false;
            for a in &f.addresses {
                match crate::discovery::fetch_ca_fingerprint(*a, f.port) {
                    Ok(fp) if &fp == expected => {
                        println!("  {a}: /ca.crt matches the advertised fingerprint");
                        checked = true;
                        break;
                    }
                    Ok(fp) => {
                        println!("  {a}: /ca.crt has fingerprint {fp}: MISMATCH, do not trust it");
                        bad += 1;
                        checked = true;
                        break;
                    }
                    Err(e) => println!("  {a}: {e}"),
                }
            }
            if !checked {
                bad += 1;
            }
        }
    }
    if matched == 0 {
        eprintln!(
            "pos-hub discover: no hub{} answered within {timeout}",
            realm.map(|r| format!(" for {r}")).unwrap_or_default()
        );
        return 1;
    }
    if bad > 0 {
        1
    } else {
        0
    }
}

fn parse_signed_duration(s: &str) -> Result<i64, String> {
    let (neg, body) = match s.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, s),
    };
    let d = humantime::parse_duration(body)
        .map_err(|e| format!("{s:?} is not a duration like 1h or 30d ({e})"))?;
    let secs = d.as_secs() as i64;
    Ok(if neg { -secs } else { secs })
}

fn token_mint(a: MintArgs) -> Result<String, String> {
    let key = SigningKey::from_file(&a.key).map_err(|e| format!("{}: {e}", a.key.display()))?;
    let ttl = parse_signed_duration(&a.ttl)?;
    for (name, v) in [("--tenant", &a.tenant), ("--store", &a.store)] {
        if !crate::config::valid_realm_part(v) {
            return Err(format!(
                "{name} {v:?} must be 1-64 chars of A-Z a-z 0-9 . _ -"
            ));
        }
    }
    if a.device.is_empty() || a.role.is_empty() {
        return Err("--device and --role must not be empty".into());
    }
    let now = now_secs();
    let nbf = match &a.nbf_in {
        Some(v) => Some(now + parse_signed_duration(v)?),
        None => None,
    };
    let claims = Claims {
        tenant_id: a.tenant,
        store_id: a.store,
        device_id: a.device,
        role: a.role,
        exp: now + ttl,
        iat: now,
        nbf,
        iss: a.iss,
        aud: a.aud,
    };
    mint(&key, &claims, a.kid)
}
