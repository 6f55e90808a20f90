//! `pos-hub flash IMAGE TARGET`: write a firmware image to a card (or an image file) and
//! put the store's settings into it, so the box comes up as that store's hub.
//!
//! The steps, each refusing before anything is written when something is off:
//!
//! 1. the settings from the flags are checked (realm, key, URL, channel, network);
//! 2. the image is opened (raw `.img`, or `.img.xz` through `xz -dc`), its MBR read and its
//!    partition 1 checked to be the FAT settings partition `POSHUB-CFG`; its `hub.env`
//!    is read with `mtype` for the comment header;
//! 3. the target is checked: not the image itself, not this machine's system disk, not
//!    mounted (nor any of its partitions or anything built on them), not attached to a
//!    loop device, writable, and at least as big as the image;
//! 4. the user confirms (or passed `--yes`);
//! 5. the image is written with a progress bar, fsynced, the target's page cache dropped,
//!    and the written bytes read back and hashed (SHA-256) against the image's hash;
//! 6. `hub.env` is written into partition 1 with `mcopy` (no mounting), synced, and read
//!    back with `mtype`.
//!
//! Exit codes: 0 done, 2 bad usage or a refusal (nothing written), 1 an I/O failure.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, IsTerminal, Read, Seek, SeekFrom, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use sha2::{Digest, Sha256};

/// The label of the settings partition (partition 1) in a pos-hub image.
pub const SETTINGS_LABEL: &str = "POSHUB-CFG";
/// The settings file in that partition.
pub const SETTINGS_FILE: &str = "hub.env";
/// The hub's port, written to every `hub.env`.
pub const PORT: u16 = 4001;

const MIB: u64 = 1024 * 1024;
/// How much of the image (MBR up to the end of partition 1) is read before writing.
const MAX_PREFIX: u64 = 256 * MIB;
const BUF: usize = 4 * MIB as usize;
/// A block device is flushed this often while writing, so the progress shows the card's pace.
const SYNC_EVERY: u64 = 64 * MIB;

/// `pos-hub flash`: write a firmware image to a card with this store's settings.
#[derive(clap::Args, Debug, Clone)]
pub struct FlashArgs {
    /// The firmware image: a raw `.img`, or an `.img.xz` (needs the `xz` command).
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,
    /// Where to write it: a block device (e.g. /dev/sdb, the whole card) or a file
    /// (an existing file is written in place like a device; a missing one is created).
    #[arg(value_name = "TARGET")]
    pub target: PathBuf,
    /// The store this box serves, `tenantId:storeId` (e.g. t-abc:s-001). Without it
    /// (and without --dev) the box starts unclaimed and is claimed on first boot.
    #[arg(long, value_name = "TENANT:STORE")]
    pub realm: Option<String>,
    /// The cloud's public key (PEM), base64-encoded (`base64 -w0 key.pub.pem`). Without
    /// --realm it becomes the claim key of an unclaimed box (CLAIM_PUBLIC_KEY_BASE64).
    #[arg(long, value_name = "B64", conflicts_with = "cluster_key_file")]
    pub cluster_key_base64: Option<String>,
    /// The cloud's public key as a PEM file.
    #[arg(long, value_name = "PEM")]
    pub cluster_key_file: Option<PathBuf>,
    /// The cloud bridge's ingest URL (http:// or https://).
    #[arg(long, value_name = "URL")]
    pub cloud_url: Option<String>,
    /// The token the hub presents to the cloud bridge.
    #[arg(long, value_name = "TOKEN")]
    pub cloud_token: Option<String>,
    /// stable, canary, or a version to pin (e.g. 1.4.2).
    #[arg(long, value_name = "CHANNEL", default_value = "stable")]
    pub update_channel: String,
    /// A static address with its prefix, e.g. 192.168.1.20/24 (default: DHCP).
    #[arg(long, value_name = "A.B.C.D/NN")]
    pub address: Option<String>,
    /// The default gateway for --address.
    #[arg(long, value_name = "IP")]
    pub gateway: Option<String>,
    /// DNS servers for --address, comma-separated (up to 3).
    #[arg(long, value_name = "IP,IP")]
    pub dns: Option<String>,
    /// Development box: DEV=on (the dev realm t-dev:s-dev with a generated key).
    #[arg(long)]
    pub dev: bool,
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    pub yes: bool,
}

/// Everything that can stop a flash; each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum FlashError {
    // ---- settings (exit 2) ----
    #[error("--realm {0:?}: expected TENANT:STORE, e.g. t-abc:s-001; each part 1-64 characters of A-Z a-z 0-9 . _ -")]
    BadRealm(String),
    #[error("--realm needs the cloud's public key, to check device tokens offline: pass --cluster-key-file key.pub.pem or --cluster-key-base64 \"$(base64 -w0 key.pub.pem)\"")]
    MissingKey,
    #[error("--dev runs the dev realm t-dev:s-dev with its own key: drop --realm and --cluster-key-* for a dev box, or drop --dev for a store's box")]
    DevWithRealm,
    #[error("cannot read the cluster key file {path}: {source}")]
    KeyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: {reason}")]
    BadKey { what: String, reason: String },
    #[error("--cloud-url {0:?} is not an http:// or https:// URL (e.g. https://api.example.com/v1/events/ingest)")]
    BadUrl(String),
    #[error("--cloud-url needs --cloud-token (the token the hub presents to the cloud bridge)")]
    UrlWithoutToken,
    #[error("--cloud-token needs --cloud-url")]
    TokenWithoutUrl,
    #[error("--cloud-url/--cloud-token need --realm (or --dev): an unclaimed box gets its cloud settings from its claim token")]
    CloudWithoutRealm,
    #[error("--cloud-token: expected printable text without spaces, quotes or '#'")]
    BadToken,
    #[error("--update-channel {0:?}: expected stable, canary or a version like 1.4.2")]
    BadChannel(String),
    #[error("--address {value:?}: {reason}")]
    BadAddress { value: String, reason: String },
    #[error("--gateway {value:?}: {reason}")]
    BadGateway { value: String, reason: String },
    #[error("--dns {value:?}: {reason}")]
    BadDns { value: String, reason: String },
    #[error(
        "--gateway and --dns need --address (without it the box uses DHCP, which provides both)"
    )]
    NetWithoutAddress,

    // ---- the image (exit 2, except I/O) ----
    #[error("the image {0} does not exist")]
    ImageMissing(PathBuf),
    #[error("the image {0} is not a regular file; IMAGE is a pos-hub .img or .img.xz file")]
    ImageNotFile(PathBuf),
    #[error("the image {path} is compressed with {format}: decompress it first ({hint}) and flash the .img, or use the .img.xz")]
    ImageCompressed {
        path: PathBuf,
        format: &'static str,
        hint: String,
    },
    #[error("cannot decompress {path}: {reason}; install xz (apt-get install xz-utils), or decompress it yourself with `xz -dk {path}` and flash the .img")]
    Xz { path: PathBuf, reason: String },
    #[error("{path} is not a pos-hub image: {reason}")]
    NotPosHubImage { path: PathBuf, reason: String },

    // ---- the target (exit 2: nothing has been written) ----
    #[error("the target {0} is the image itself; give the card's device (e.g. /dev/sdb, see lsblk) or another file")]
    TargetIsImage(PathBuf),
    #[error("the target {0} does not exist: is the card in the reader? list disks with lsblk")]
    TargetMissingDevice(PathBuf),
    #[error("cannot create the target {path}: the directory {dir} does not exist")]
    TargetNoDir { path: PathBuf, dir: PathBuf },
    #[error("the target {0} is neither a block device nor a regular file")]
    TargetKind(PathBuf),
    #[error("the target {path} ({target}) is smaller than the image ({image}); use a bigger card")]
    TargetTooSmall {
        path: PathBuf,
        target: String,
        image: String,
    },
    #[error("the target {path} is a partition; flash the whole card instead ({disk})")]
    TargetPartition { path: PathBuf, disk: String },
    #[error("the target {path} is this machine's system disk ({why}); refusing to overwrite it. Pick the card's device with lsblk")]
    SystemDisk { path: PathBuf, why: String },
    #[error("the target {path} is mounted ({what}); unmount it first (umount), then flash again")]
    Mounted { path: PathBuf, what: String },
    #[error("the target {path} is in use by the system ({what}); stop using it first")]
    InUse { path: PathBuf, what: String },
    #[error("the target {path} is attached to {loopdev}; detach it first (losetup -d {loopdev})")]
    LoopAttached { path: PathBuf, loopdev: String },
    #[error("the target {0} is read-only (is the card's write-protect switch on?)")]
    ReadOnly(PathBuf),
    #[error("the target {0} has no medium (size 0): insert the card")]
    NoMedium(PathBuf),
    #[error("not confirmed; nothing was written")]
    NotConfirmed,
    #[error(
        "this erases {0}: pass --yes to confirm (stdin is not a terminal, so there is no prompt)"
    )]
    NeedYes(PathBuf),

    // ---- I/O (exit 1) ----
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the image ended early: {got} bytes of the {want} expected; the image file is damaged or was still being downloaded")]
    ShortImage { got: u64, want: u64 },
    #[error("verification failed: read back sha256 {got} from {path}, the image is {want}; the card may be failing, try another one")]
    VerifyMismatch {
        path: PathBuf,
        got: String,
        want: String,
    },
    #[error("`{cmd}` is not installed; install mtools (apt-get install mtools)")]
    MtoolsMissing { cmd: &'static str },
    #[error("`{cmd}` failed: {stderr}")]
    Mtools { cmd: String, stderr: String },
    #[error("hub.env read back from {path} differs from what was written; the card may be failing, try another one")]
    SettingsMismatch { path: PathBuf },
}

impl FlashError {
    /// 2 for bad usage and refusals (nothing written), 1 for I/O failures.
    pub fn exit_code(&self) -> i32 {
        use FlashError::*;
        match self {
            Io { .. }
            | ShortImage { .. }
            | VerifyMismatch { .. }
            | MtoolsMissing { .. }
            | Mtools { .. }
            | SettingsMismatch { .. }
            | Xz { .. } => 1,
            _ => 2,
        }
    }
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> FlashError + 'a {
    move |source| FlashError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Runs `pos-hub flash`; returns the process exit code.
pub fn run(args: FlashArgs) -> i32 {
    match flash(&args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("pos-hub flash: {e}");
            e.exit_code()
        }
    }
}

/// The whole flash: check, confirm, write, verify, write the settings.
pub fn flash(args: &FlashArgs) -> Result<(), FlashError> {
    let settings = StoreSettings::from_args(args)?;
    let mut image = ImageSource::open(&args.image)?;
    let layout = image.read_layout()?;
    let header = image.settings_header(&layout)?;
    let target = Target::inspect(&args.target, &image)?;

    eprintln!("pos-hub flash");
    eprintln!(
        "  image   {} ({}{})",
        image.path.display(),
        human(image.size),
        if image.xz { ", xz" } else { "" }
    );
    eprintln!(
        "  target  {} ({})",
        target.path.display(),
        target.describe()
    );
    eprintln!("  store   {}", settings.describe());
    confirm(args.yes, &image, &target)?;

    let created = matches!(target.kind, TargetKind::NewFile);
    let result = write_and_configure(&mut image, &layout, &target, &settings, &header);
    if result.is_err() && created {
        let _ = std::fs::remove_file(&target.path);
    }
    result
}

fn write_and_configure(
    image: &mut ImageSource,
    layout: &Layout,
    target: &Target,
    settings: &StoreSettings,
    header: &str,
) -> Result<(), FlashError> {
    let image_hash = write_image(image, target)?;
    let target_hash = read_back(&target.path, image.size)?;
    println!("image  sha256 {image_hash}");
    println!("target sha256 {target_hash}");
    if image_hash != target_hash {
        return Err(FlashError::VerifyMismatch {
            path: target.path.clone(),
            got: target_hash,
            want: image_hash,
        });
    }
    eprintln!(
        "verified: the target holds the image ({})",
        human(image.size)
    );

    let text = settings.hub_env(header);
    write_settings(&target.path, layout.p1_offset, &text)?;
    eprintln!(
        "{SETTINGS_FILE} written to partition 1 ({SETTINGS_LABEL}): {}",
        settings.keys_summary()
    );
    println!(
        "done: {} is ready for {}",
        target.path.display(),
        settings.describe()
    );
    Ok(())
}

// ================================================================ settings

/// The store's settings, checked, as they go into `hub.env`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSettings {
    pub realm: Option<(String, String)>,
    pub key_b64: Option<String>,
    pub cloud: Option<(String, String)>,
    pub channel: String,
    pub net: Option<StaticNet>,
    pub dev: bool,
}

/// A static IPv4 configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticNet {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
}

impl StoreSettings {
    pub fn from_args(a: &FlashArgs) -> Result<Self, FlashError> {
        let realm = a.realm.as_deref().map(parse_realm).transpose()?;
        let key_b64 = match (&a.cluster_key_base64, &a.cluster_key_file) {
            (Some(b64), _) => Some(check_key_base64(b64, "--cluster-key-base64")?),
            (None, Some(path)) => {
                let bytes = std::fs::read(path).map_err(|source| FlashError::KeyFile {
                    path: path.clone(),
                    source,
                })?;
                let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
                Some(check_key_base64(
                    &b64,
                    &format!("--cluster-key-file {}", path.display()),
                )?)
            }
            (None, None) => None,
        };
        if a.dev && (realm.is_some() || key_b64.is_some()) {
            return Err(FlashError::DevWithRealm);
        }
        if realm.is_some() && key_b64.is_none() {
            return Err(FlashError::MissingKey);
        }
        // Without a realm the tenant's cluster key is the claim key: the box starts
        // unclaimed and accepts a claim token signed with it (see provision::claim).
        let cloud = match (&a.cloud_url, &a.cloud_token) {
            (None, None) => None,
            (Some(_), None) => return Err(FlashError::UrlWithoutToken),
            (None, Some(_)) => return Err(FlashError::TokenWithoutUrl),
            (Some(u), Some(t)) => {
                if realm.is_none() && !a.dev {
                    return Err(FlashError::CloudWithoutRealm);
                }
                Some((check_url(u)?, check_token(t)?))
            }
        };
        let channel = check_channel(&a.update_channel)?;
        let net = match &a.address {
            Some(addr) => Some(parse_net(addr, a.gateway.as_deref(), a.dns.as_deref())?),
            None if a.gateway.is_some() || a.dns.is_some() => {
                return Err(FlashError::NetWithoutAddress)
            }
            None => None,
        };
        Ok(Self {
            realm,
            key_b64,
            cloud,
            channel,
            net,
            dev: a.dev,
        })
    }

    /// One line for the plan and the final message.
    pub fn describe(&self) -> String {
        let who = match (&self.realm, self.dev) {
            (Some((t, s)), _) => format!("{t}:{s}"),
            (None, true) => "dev box (DEV=on, realm t-dev:s-dev)".to_string(),
            (None, false) => "unclaimed (claimed on first boot)".to_string(),
        };
        let cloud = match &self.cloud {
            Some((u, _)) => format!(", cloud bridge {u}"),
            None => String::new(),
        };
        let net = match &self.net {
            Some(n) => format!(", address {}/{}", n.address, n.prefix),
            None => ", DHCP".to_string(),
        };
        format!("{who}{cloud}, update channel {}{net}", self.channel)
    }

    /// The keys written, with secrets left out.
    pub fn keys_summary(&self) -> String {
        self.entries()
            .iter()
            .map(|(k, v)| match *k {
                "CLOUD_BRIDGE_TOKEN" | "CLUSTER_PUBLIC_KEY_BASE64" => format!("{k}=..."),
                _ => format!("{k}={v}"),
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn entries(&self) -> Vec<(&'static str, String)> {
        let mut e = Vec::new();
        if let Some((t, s)) = &self.realm {
            e.push(("TENANT_ID", t.clone()));
            e.push(("STORE_ID", s.clone()));
        }
        match (&self.key_b64, &self.realm) {
            (Some(k), Some(_)) => e.push(("CLUSTER_PUBLIC_KEY_BASE64", k.clone())),
            (Some(k), None) => {
                e.push(("CLAIM_PUBLIC_KEY_BASE64", k.clone()));
                e.push(("DEV", "off".to_string()));
            }
            (None, _) => {}
        }
        if let Some((u, t)) = &self.cloud {
            e.push(("CLOUD_BRIDGE_URL", u.clone()));
            e.push(("CLOUD_BRIDGE_TOKEN", t.clone()));
        }
        if self.realm.is_some() || self.dev {
            e.push(("DEV", if self.dev { "on" } else { "off" }.to_string()));
        }
        e.push(("PORT", PORT.to_string()));
        e.push(("UPDATE_CHANNEL", self.channel.clone()));
        if let Some(n) = &self.net {
            e.push(("NET_ADDRESS", format!("{}/{}", n.address, n.prefix)));
            if let Some(g) = n.gateway {
                e.push(("NET_GATEWAY", g.to_string()));
            }
            if !n.dns.is_empty() {
                let dns: Vec<String> = n.dns.iter().map(Ipv4Addr::to_string).collect();
                e.push(("NET_DNS", dns.join(",")));
            }
        }
        e
    }

    /// The `hub.env` text: the image's comment header, a note, then the settings.
    pub fn hub_env(&self, header: &str) -> String {
        let mut out = String::new();
        for line in header.lines() {
            out.push_str(line.trim_end());
            out.push('\n');
        }
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&format!(
            "# Written by pos-hub flash {} on {}.\n",
            crate::VERSION,
            httpdate::fmt_http_date(std::time::SystemTime::now())
        ));
        if self.realm.is_none() && !self.dev {
            out.push_str(
                "# No store yet: this box starts unclaimed and serves its setup page, where an\n\
                 # admin pastes a claim token from the cloud.\n",
            );
        }
        for (k, v) in self.entries() {
            out.push_str(&format!("{k}={v}\n"));
        }
        if self.net.is_none() {
            out.push_str(
                "# Network: DHCP unless NET_ADDRESS is set, e.g. NET_ADDRESS=192.168.1.20/24\n",
            );
        }
        out
    }
}

/// The leading comment lines of an image's `hub.env` (without an earlier flash's note).
pub fn comment_header(hub_env: &str) -> String {
    let mut out = String::new();
    for line in hub_env.lines() {
        let line = line.trim_end_matches('\r');
        if !line.trim_start().starts_with('#') {
            break;
        }
        if line.starts_with("# Written by pos-hub flash") {
            break;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

const DEFAULT_HEADER: &str =
    "# pos-hub store settings. Edit with any text editor (this partition is readable on\n\
# Windows and Mac), then put the card back and power the box on.\n";

/// `t-abc:s-001` -> (`t-abc`, `s-001`).
pub fn parse_realm(s: &str) -> Result<(String, String), FlashError> {
    let bad = || FlashError::BadRealm(s.to_string());
    let (t, st) = s.split_once(':').ok_or_else(bad)?;
    if !crate::config::valid_realm_part(t) || !crate::config::valid_realm_part(st) {
        return Err(bad());
    }
    Ok((t.to_string(), st.to_string()))
}

/// Checks that `b64` is base64 of a PEM public key the hub accepts; returns it trimmed.
pub fn check_key_base64(b64: &str, what: &str) -> Result<String, FlashError> {
    let bad = |reason: String| FlashError::BadKey {
        what: what.to_string(),
        reason,
    };
    let b64 = b64.trim();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| {
            bad(format!(
                "not valid base64 ({e}); encode the PEM public key with `base64 -w0 key.pub.pem`"
            ))
        })?;
    let pem = String::from_utf8(bytes)
        .map_err(|_| bad("not PEM text; expected a '-----BEGIN PUBLIC KEY-----' file".into()))?;
    crate::auth::keys::VerifyKey::from_pem(&pem, None).map_err(|e| bad(e.to_string()))?;
    Ok(b64.to_string())
}

/// An http(s) URL without spaces or characters that would break `hub.env`.
pub fn check_url(u: &str) -> Result<String, FlashError> {
    let bad = || FlashError::BadUrl(u.to_string());
    let rest = u
        .strip_prefix("https://")
        .or_else(|| u.strip_prefix("http://"))
        .ok_or_else(bad)?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_ok = !host.is_empty() && !host.starts_with(':') && !host.contains('@');
    let chars_ok = u
        .chars()
        .all(|c| c.is_ascii_graphic() && !matches!(c, '"' | '\'' | '\\'))
        && !u.contains(" #");
    if !host_ok || !chars_ok {
        return Err(bad());
    }
    Ok(u.to_string())
}

/// A token for `hub.env`: printable ASCII without spaces, quotes or `#`.
pub fn check_token(t: &str) -> Result<String, FlashError> {
    let ok = !t.is_empty()
        && t.len() <= 4096
        && t.chars()
            .all(|c| c.is_ascii_graphic() && !matches!(c, '"' | '\'' | '\\' | '#'));
    if !ok {
        return Err(FlashError::BadToken);
    }
    Ok(t.to_string())
}

/// `stable`, `canary` or a version (as the hub's `UPDATE_CHANNEL` accepts it).
pub fn check_channel(c: &str) -> Result<String, FlashError> {
    let c = c.trim();
    crate::config::UpdateChannel::parse(c)
        .map(|ch| match ch {
            crate::config::UpdateChannel::Pinned(_) => c.to_string(),
            other => other.as_str().to_string(),
        })
        .ok_or_else(|| FlashError::BadChannel(c.to_string()))
}

/// `--address a.b.c.d/nn [--gateway ip] [--dns ip,ip]`.
pub fn parse_net(
    addr: &str,
    gateway: Option<&str>,
    dns: Option<&str>,
) -> Result<StaticNet, FlashError> {
    let bad = |reason: &str| FlashError::BadAddress {
        value: addr.to_string(),
        reason: reason.to_string(),
    };
    let (ip, prefix) = addr
        .split_once('/')
        .ok_or_else(|| bad("expected an address with a prefix length, e.g. 192.168.1.20/24"))?;
    let address: Ipv4Addr = ip
        .parse()
        .map_err(|_| bad("not an IPv4 address with a prefix length, e.g. 192.168.1.20/24"))?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| (1..=32).contains(p))
        .ok_or_else(|| bad("the prefix length must be a number from 1 to 32"))?;
    if address.is_unspecified()
        || address.is_multicast()
        || address.is_broadcast()
        || address.is_loopback()
    {
        return Err(bad("not an address a box can have"));
    }
    let mask = prefix_mask(prefix);
    let a = u32::from(address);
    if prefix <= 30 && (a & !mask == 0 || a & !mask == !mask) {
        return Err(bad(
            "that is the network's own address or its broadcast address; pick a host address",
        ));
    }
    let gateway = match gateway {
        None => None,
        Some(g) => {
            let bad_gw = |reason: String| FlashError::BadGateway {
                value: g.to_string(),
                reason,
            };
            let gw: Ipv4Addr = g
                .trim()
                .parse()
                .map_err(|_| bad_gw("not an IPv4 address".into()))?;
            if u32::from(gw) & mask != a & mask {
                return Err(bad_gw(format!("not in the network of {addr}")));
            }
            if gw == address {
                return Err(bad_gw("the box's own address".into()));
            }
            Some(gw)
        }
    };
    let mut servers = Vec::new();
    if let Some(d) = dns {
        for part in d.split(',').map(str::trim) {
            let ip: Ipv4Addr = part.parse().map_err(|_| FlashError::BadDns {
                value: d.to_string(),
                reason: format!(
                    "{part:?} is not an IPv4 address; give addresses separated by commas"
                ),
            })?;
            servers.push(ip);
        }
        if servers.len() > 3 {
            return Err(FlashError::BadDns {
                value: d.to_string(),
                reason: "at most 3 servers".into(),
            });
        }
    }
    Ok(StaticNet {
        address,
        prefix,
        gateway,
        dns: servers,
    })
}

fn prefix_mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

// ================================================================ the image

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

/// The volume label of a FAT boot sector (FAT12/16 at 0x2B, FAT32 at 0x47).
pub fn fat_label(bs: &[u8]) -> Option<String> {
    if bs.len() < 512 || bs[510] != 0x55 || bs[511] != 0xAA {
        return None;
    }
    let at = if &bs[0x52..0x57] == b"FAT32" {
        0x47
    } else if &bs[0x36..0x39] == b"FAT" {
        0x2B
    } else {
        return None;
    };
    Some(
        String::from_utf8_lossy(&bs[at..at + 11])
            .trim_end()
            .to_string(),
    )
}

/// Parses `xz --robot --list` output: the uncompressed size from the `totals` line.
pub fn parse_xz_list(out: &str) -> Option<u64> {
    out.lines()
        .find(|l| l.starts_with("totals\t"))
        .and_then(|l| l.split('\t').nth(4))
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
}

struct ImageSource {
    path: PathBuf,
    size: u64,
    xz: bool,
    dev_ino: (u64, u64),
    reader: Box<dyn Read>,
    child: Option<Child>,
    /// The first bytes (MBR to the end of partition 1), read before writing.
    prefix: Vec<u8>,
}

impl Drop for ImageSource {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl ImageSource {
    fn open(path: &Path) -> Result<Self, FlashError> {
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
        if magic == [0xfd, b'7', b'z', b'X', b'Z', 0] {
            return Self::open_xz(path, dev_ino);
        }
        f.seek(SeekFrom::Start(0))
            .map_err(io("cannot read the image", path))?;
        Ok(Self {
            path: path.to_path_buf(),
            size: meta.len(),
            xz: false,
            dev_ino,
            reader: Box::new(f),
            child: None,
            prefix: Vec::new(),
        })
    }

    fn open_xz(path: &Path, dev_ino: (u64, u64)) -> Result<Self, FlashError> {
        let xz_err = |reason: String| FlashError::Xz {
            path: path.to_path_buf(),
            reason,
        };
        let spawn_err = |e: std::io::Error| {
            if e.kind() == std::io::ErrorKind::NotFound {
                xz_err("the xz command is not installed".into())
            } else {
                xz_err(format!("cannot run xz: {e}"))
            }
        };
        let list = Command::new("xz")
            .args(["--robot", "--list", "--"])
            .arg(path)
            .stdin(Stdio::null())
            .output()
            .map_err(spawn_err)?;
        if !list.status.success() {
            return Err(xz_err(
                String::from_utf8_lossy(&list.stderr).trim().to_string(),
            ));
        }
        let size = parse_xz_list(&String::from_utf8_lossy(&list.stdout))
            .ok_or_else(|| xz_err("xz --list does not give its uncompressed size".into()))?;
        let mut child = Command::new("xz")
            .args(["-dc", "--"])
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_err)?;
        let out = child
            .stdout
            .take()
            .ok_or_else(|| xz_err("no output pipe".into()))?;
        Ok(Self {
            path: path.to_path_buf(),
            size,
            xz: true,
            dev_ino,
            reader: Box::new(out),
            child: Some(child),
            prefix: Vec::new(),
        })
    }

    fn not_ours(&self, reason: impl Into<String>) -> FlashError {
        FlashError::NotPosHubImage {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    /// Reads the MBR and partition 1 into `prefix` and checks it is the settings partition.
    fn read_layout(&mut self) -> Result<Layout, FlashError> {
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
        let bs = &prefix[layout.p1_offset as usize..];
        match fat_label(bs) {
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
    fn settings_header(&self, layout: &Layout) -> Result<String, FlashError> {
        let tmp = TempFile::new("image-head")?;
        std::fs::write(&tmp.0, &self.prefix).map_err(io("cannot write", &tmp.0))?;
        match mtools_read(&tmp.0, layout.p1_offset)? {
            Some(text) => {
                let h = comment_header(&text);
                Ok(if h.is_empty() {
                    DEFAULT_HEADER.into()
                } else {
                    h
                })
            }
            None => Ok(DEFAULT_HEADER.into()),
        }
    }

    fn read_some(&mut self, buf: &mut [u8]) -> Result<usize, FlashError> {
        read_full(&mut self.reader, buf).map_err(io("cannot read the image", &self.path))
    }

    /// After the last byte: no more data, and xz (if any) exited cleanly.
    fn finish(&mut self) -> Result<(), FlashError> {
        let mut extra = [0u8; 1];
        let more = self.read_some(&mut extra)?;
        if let Some(mut c) = self.child.take() {
            if more > 0 {
                let _ = c.kill();
            }
            let status = c.wait().map_err(io("waiting for xz on", &self.path))?;
            let mut err = String::new();
            if let Some(mut e) = c.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            if more == 0 && !status.success() {
                return Err(FlashError::Xz {
                    path: self.path.clone(),
                    reason: format!("xz -dc failed ({status}): {}", err.trim()),
                });
            }
        }
        if more > 0 {
            return Err(self.not_ours("it decompresses to more bytes than its index says"));
        }
        Ok(())
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
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

// ================================================================ the target

#[derive(Debug, Clone, PartialEq, Eq)]
enum TargetKind {
    NewFile,
    File,
    Block { model: Option<String> },
}

#[derive(Debug)]
struct Target {
    path: PathBuf,
    kind: TargetKind,
    /// Its size (the image's size for a new file).
    size: u64,
}

impl Target {
    fn describe(&self) -> String {
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
    fn inspect(path: &Path, image: &ImageSource) -> Result<Self, FlashError> {
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

/// Linux `dev_t` -> (major, minor).
pub fn dev_major_minor(dev: u64) -> (u64, u64) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major, minor)
}

/// One line of /proc/self/mountinfo that matters here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub devno: String,
    pub mount_point: String,
    pub source: String,
}

/// Parses /proc/self/mountinfo.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            Some(Mount {
                devno: f.get(2)?.to_string(),
                mount_point: unescape_mount(f.get(4)?),
                source: unescape_mount(f.get(sep + 2).unwrap_or(&"")),
            })
        })
        .collect()
}

/// Undoes the octal escapes (`\040` for a space) of mountinfo fields.
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c));
        if b[i] == b'\\' && octal {
            let v = u32::from(b[i + 1] - b'0') * 64
                + u32::from(b[i + 2] - b'0') * 8
                + u32::from(b[i + 3] - b'0');
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

const SYS_MOUNTS: &[&str] = &["/", "/boot", "/boot/efi", "/boot/firmware", "/usr"];

/// The sysfs directory of a block device number, e.g. .../block/sdb or .../block/sdb/sdb1.
fn sys_dir(devno: &str) -> Option<PathBuf> {
    std::fs::canonicalize(format!("/sys/dev/block/{devno}")).ok()
}

fn is_partition(dir: &Path) -> bool {
    dir.join("partition").exists()
}

fn name_of(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn devno_of(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join("dev"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// The whole disks under a block device: itself or its disk if a partition, or the
/// disks under a device-mapper / md device (through `slaves`).
fn disks_under(dir: &Path, depth: u32, out: &mut BTreeSet<PathBuf>) {
    let slaves: Vec<PathBuf> = std::fs::read_dir(dir.join("slaves"))
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| std::fs::canonicalize(e.path()).ok())
                .collect()
        })
        .unwrap_or_default();
    if !slaves.is_empty() && depth < 8 {
        for s in slaves {
            disks_under(&s, depth + 1, out);
        }
        return;
    }
    if is_partition(dir) {
        if let Some(p) = dir.parent() {
            out.insert(p.to_path_buf());
        }
    } else {
        out.insert(dir.to_path_buf());
    }
}

/// A disk, its partitions, and everything built on them (`holders`, e.g. LVM, dm-crypt).
fn family(disk: &Path, depth: u32, out: &mut Vec<PathBuf>) {
    if out.iter().any(|d| d == disk) {
        return;
    }
    out.push(disk.to_path_buf());
    let mut next = Vec::new();
    if let Ok(rd) = std::fs::read_dir(disk) {
        for e in rd.filter_map(Result::ok) {
            let p = e.path();
            if p.is_dir() && p.join("partition").exists() {
                next.push(p);
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(disk.join("holders")) {
        for e in rd.filter_map(Result::ok) {
            if let Ok(p) = std::fs::canonicalize(e.path()) {
                next.push(p);
            }
        }
    }
    if depth < 8 {
        for p in next {
            family(&p, depth + 1, out);
        }
    }
}

/// Refusals for a block device: a partition, the system disk, mounted, swap, read-only.
/// Returns the device's model, if sysfs knows it.
fn check_block_device(path: &Path, rdev: u64) -> Result<Option<String>, FlashError> {
    let (ma, mi) = dev_major_minor(rdev);
    let devno = format!("{ma}:{mi}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse_mountinfo(&t))
        .map_err(io("cannot read", Path::new("/proc/self/mountinfo")))?;
    let Some(dir) = sys_dir(&devno) else {
        // No sysfs entry: only the direct mount check is possible.
        if let Some(m) = mounts.iter().find(|m| m.devno == devno) {
            return Err(mounted_err(path, m));
        }
        return Ok(None);
    };
    let disk = if is_partition(&dir) {
        let disk = dir.parent().map(Path::to_path_buf).unwrap_or(dir.clone());
        return Err(FlashError::TargetPartition {
            path: path.to_path_buf(),
            disk: format!("/dev/{}", name_of(&disk)),
        });
    } else {
        dir
    };

    // The system disk: whatever holds /, /boot (and /boot/efi, /boot/firmware, /usr).
    for m in mounts
        .iter()
        .filter(|m| SYS_MOUNTS.contains(&m.mount_point.as_str()))
    {
        let Some(mdir) = sys_dir(&m.devno) else {
            continue;
        };
        let mut disks = BTreeSet::new();
        disks_under(&mdir, 0, &mut disks);
        if disks.contains(&disk) {
            return Err(FlashError::SystemDisk {
                path: path.to_path_buf(),
                why: format!("{} is mounted from {}", m.mount_point, m.source),
            });
        }
    }

    let mut fam = Vec::new();
    family(&disk, 0, &mut fam);
    let devnos: Vec<(String, String)> = fam
        .iter()
        .filter_map(|d| devno_of(d).map(|n| (n, name_of(d))))
        .collect();
    for m in &mounts {
        if devnos.iter().any(|(n, _)| *n == m.devno) {
            return Err(mounted_err(path, m));
        }
    }
    if let Ok(swaps) = std::fs::read_to_string("/proc/swaps") {
        for line in swaps.lines().skip(1) {
            let Some(dev) = line.split_whitespace().next() else {
                continue;
            };
            let name = dev.trim_start_matches("/dev/");
            if devnos.iter().any(|(_, n)| n == name) {
                return Err(FlashError::InUse {
                    path: path.to_path_buf(),
                    what: format!("{dev} is swap; swapoff {dev}"),
                });
            }
        }
    }
    let ro = std::fs::read_to_string(disk.join("ro")).unwrap_or_default();
    if ro.trim() == "1" {
        return Err(FlashError::ReadOnly(path.to_path_buf()));
    }
    let model = std::fs::read_to_string(disk.join("device/model"))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    Ok(model)
}

fn mounted_err(path: &Path, m: &Mount) -> FlashError {
    FlashError::Mounted {
        path: path.to_path_buf(),
        what: format!("{} is mounted on {}", m.source, m.mount_point),
    }
}

/// The loop device a regular file is attached to, if any.
fn loop_device_of(path: &Path) -> Option<String> {
    let want = std::fs::canonicalize(path).ok()?;
    for e in std::fs::read_dir("/sys/block").ok()?.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue;
        };
        if Path::new(b.trim()) == want {
            return Some(format!("/dev/{name}"));
        }
    }
    None
}

// ================================================================ confirm, write, verify

fn confirm(yes: bool, image: &ImageSource, target: &Target) -> Result<(), FlashError> {
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
fn write_image(image: &mut ImageSource, target: &Target) -> Result<String, FlashError> {
    let path = &target.path;
    let mut out = open_for_write(target)?;
    if target.kind == TargetKind::NewFile {
        out.set_len(image.size)
            .map_err(io("cannot size the new file", path))?;
    }
    let block = matches!(target.kind, TargetKind::Block { .. });
    let mut hasher = Sha256::new();
    let mut progress = Progress::new("writing", image.size);
    let prefix = std::mem::take(&mut image.prefix);
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
fn drop_cache(f: &File) {
    // SAFETY: a plain syscall on a file descriptor we own; it reads no memory of ours.
    unsafe {
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

/// Reads the first `len` bytes of the target; returns their SHA-256 (hex).
fn read_back(path: &Path, len: u64) -> Result<String, FlashError> {
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

/// Writes `hub.env` into partition 1 with mcopy, syncs, and reads it back.
fn write_settings(target: &Path, offset: u64, text: &str) -> Result<(), FlashError> {
    let tmp = TempFile::new("hub.env")?;
    std::fs::write(&tmp.0, text).map_err(io("cannot write", &tmp.0))?;
    let image = mtools_image(target, offset);
    let out = Command::new("mcopy")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-o", "-i"])
        .arg(&image)
        .arg(&tmp.0)
        .arg(format!("::{SETTINGS_FILE}"))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| mtools_spawn_err("mcopy", e))?;
    if !out.status.success() {
        return Err(FlashError::Mtools {
            cmd: format!(
                "mcopy -o -i {} ... ::{SETTINGS_FILE}",
                image.to_string_lossy()
            ),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let f = File::open(target).map_err(io("cannot open the target to flush it", target))?;
    f.sync_all()
        .map_err(io("cannot flush the target", target))?;
    drop_cache(&f);
    match mtools_read(target, offset)? {
        Some(back) if back == text => Ok(()),
        _ => Err(FlashError::SettingsMismatch {
            path: target.to_path_buf(),
        }),
    }
}

fn mtools_image(file: &Path, offset: u64) -> std::ffi::OsString {
    let mut s = file.as_os_str().to_os_string();
    s.push(format!("@@{offset}"));
    s
}

fn mtools_spawn_err(cmd: &'static str, e: std::io::Error) -> FlashError {
    if e.kind() == std::io::ErrorKind::NotFound {
        FlashError::MtoolsMissing { cmd }
    } else {
        FlashError::Mtools {
            cmd: cmd.to_string(),
            stderr: e.to_string(),
        }
    }
}

/// `hub.env` from the FAT file system at `offset` in `file`; None if it has none.
fn mtools_read(file: &Path, offset: u64) -> Result<Option<String>, FlashError> {
    let image = mtools_image(file, offset);
    let out = Command::new("mtype")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(&image)
        .arg(format!("::{SETTINGS_FILE}"))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| mtools_spawn_err("mtype", e))?;
    if out.status.success() {
        return Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()));
    }
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("not found") {
        return Ok(None);
    }
    Err(FlashError::Mtools {
        cmd: format!("mtype -i {} ::{SETTINGS_FILE}", image.to_string_lossy()),
        stderr: err.trim().to_string(),
    })
}

/// A file in the temp directory, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(what: &str) -> Result<Self, FlashError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!(
            "pos-hub-flash-{}-{nanos}-{what}",
            std::process::id()
        ));
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)
            .map_err(io("cannot create a temporary file", &p))?;
        Ok(Self(p))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

// ================================================================ progress

/// Bytes done / total and MiB/s on stderr: a redrawn bar on a terminal, otherwise one
/// line every 10%.
struct Progress {
    label: &'static str,
    total: u64,
    tty: bool,
    start: Instant,
    last_draw: Option<Instant>,
    next_pct: u64,
}

impl Progress {
    fn new(label: &'static str, total: u64) -> Self {
        Self {
            label,
            total,
            tty: std::io::stderr().is_terminal(),
            start: Instant::now(),
            last_draw: None,
            next_pct: 10,
        }
    }

    fn rate(&self, done: u64) -> f64 {
        let secs = self.start.elapsed().as_secs_f64().max(0.001);
        done as f64 / MIB as f64 / secs
    }

    fn pct(&self, done: u64) -> u64 {
        done.saturating_mul(100)
            .checked_div(self.total)
            .unwrap_or(100)
    }

    fn update(&mut self, done: u64) {
        if self.tty {
            let due = self
                .last_draw
                .is_none_or(|t| t.elapsed() >= Duration::from_millis(150));
            if due || done >= self.total {
                self.draw(done);
            }
        } else {
            while self.next_pct <= 100 && self.pct(done) >= self.next_pct {
                eprintln!(
                    "{} {:3}%  {:.1} / {:.1} MiB  {:.1} MiB/s",
                    self.label,
                    self.next_pct,
                    done as f64 / MIB as f64,
                    self.total as f64 / MIB as f64,
                    self.rate(done)
                );
                self.next_pct += 10;
            }
        }
    }

    fn draw(&mut self, done: u64) {
        let pct = self.pct(done);
        let width = 30;
        let filled = (pct as usize * width / 100).min(width);
        eprint!(
            "\r{:9} [{}{}] {:3}%  {:.1} / {:.1} MiB  {:.1} MiB/s\x1b[K",
            self.label,
            "#".repeat(filled),
            ".".repeat(width - filled),
            pct,
            done as f64 / MIB as f64,
            self.total as f64 / MIB as f64,
            self.rate(done)
        );
        let _ = std::io::stderr().flush();
        self.last_draw = Some(Instant::now());
    }

    fn finish(&mut self, done: u64) {
        self.update(done);
        if self.tty {
            self.draw(done);
            eprintln!();
        }
    }
}

/// 241.0 MiB, 29.7 GiB.
pub fn human(bytes: u64) -> String {
    const GIB: u64 = 1024 * MIB;
    if bytes >= GIB {
        format!("{:.1} GiB", bytes as f64 / GIB as f64)
    } else if bytes >= MIB {
        format!("{:.1} MiB", bytes as f64 / MIB as f64)
    } else {
        format!("{bytes} bytes")
    }
}

// ================================================================ tests

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> FlashArgs {
        FlashArgs {
            image: "a.img".into(),
            target: "b.img".into(),
            realm: None,
            cluster_key_base64: None,
            cluster_key_file: None,
            cloud_url: None,
            cloud_token: None,
            update_channel: "stable".into(),
            address: None,
            gateway: None,
            dns: None,
            dev: false,
            yes: false,
        }
    }

    fn pub_b64() -> String {
        let (_private, public) = crate::auth::keys::generate_ed25519().unwrap();
        base64::engine::general_purpose::STANDARD.encode(public.as_bytes())
    }

    #[test]
    fn realms() {
        assert_eq!(
            parse_realm("t-abc:s-001").unwrap(),
            ("t-abc".to_string(), "s-001".to_string())
        );
        for bad in [
            "", ":", "t-abc", "t-abc:", ":s-001", "t abc:s", "t/x:s", "..:s", "a:b:c",
        ] {
            assert!(
                matches!(parse_realm(bad), Err(FlashError::BadRealm(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn urls_tokens_channels() {
        assert!(check_url("https://api.example.com/v1/events/ingest").is_ok());
        assert!(check_url("http://10.0.0.2:8080/x").is_ok());
        for bad in [
            "ftp://x.example",
            "https://",
            "example.com",
            "https:// x",
            "https://a\"b",
        ] {
            assert!(check_url(bad).is_err(), "{bad:?}");
        }
        assert!(check_token("abc.DEF_123-xyz").is_ok());
        for bad in ["", "a b", "a#b", "a\"b", "a\nb"] {
            assert!(check_token(bad).is_err(), "{bad:?}");
        }
        assert_eq!(check_channel("stable").unwrap(), "stable");
        assert_eq!(check_channel("canary").unwrap(), "canary");
        assert_eq!(check_channel("1.4.2").unwrap(), "1.4.2");
        assert!(check_channel("nightly!").is_err());
        assert!(check_channel("").is_err());
    }

    #[test]
    fn networks() {
        let n = parse_net(
            "192.168.1.20/24",
            Some("192.168.1.1"),
            Some("1.1.1.1, 9.9.9.9"),
        )
        .unwrap();
        assert_eq!(n.address, Ipv4Addr::new(192, 168, 1, 20));
        assert_eq!(n.prefix, 24);
        assert_eq!(n.gateway, Some(Ipv4Addr::new(192, 168, 1, 1)));
        assert_eq!(n.dns.len(), 2);
        assert!(parse_net("10.0.0.5/32", None, None).is_ok());
        for bad in [
            "192.168.1.20",
            "192.168.1.20/33",
            "192.168.1.20/0",
            "192.168.1/24",
            "192.168.1.256/24",
            "192.168.1.0/24",
            "192.168.1.255/24",
            "0.0.0.0/8",
            "224.0.0.1/4",
            "fe80::1/64",
        ] {
            assert!(
                matches!(
                    parse_net(bad, None, None),
                    Err(FlashError::BadAddress { .. })
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            parse_net("192.168.1.20/24", Some("10.0.0.1"), None),
            Err(FlashError::BadGateway { .. })
        ));
        assert!(matches!(
            parse_net("192.168.1.20/24", Some("router"), None),
            Err(FlashError::BadGateway { .. })
        ));
        assert!(matches!(
            parse_net("192.168.1.20/24", None, Some("1.1.1.1,dns.example")),
            Err(FlashError::BadDns { .. })
        ));
        assert!(matches!(
            parse_net(
                "192.168.1.20/24",
                None,
                Some("1.1.1.1,1.0.0.1,8.8.8.8,9.9.9.9")
            ),
            Err(FlashError::BadDns { .. })
        ));
    }

    #[test]
    fn keys() {
        let b64 = pub_b64();
        assert_eq!(check_key_base64(&format!(" {b64}\n"), "k").unwrap(), b64);
        assert!(check_key_base64("not base64!", "k").is_err());
        let junk = base64::engine::general_purpose::STANDARD.encode("hello");
        assert!(check_key_base64(&junk, "k").is_err());
        let (private, _) = crate::auth::keys::generate_ed25519().unwrap();
        let private = base64::engine::general_purpose::STANDARD.encode(private.as_bytes());
        let e = check_key_base64(&private, "k").unwrap_err().to_string();
        assert!(e.contains("PRIVATE"), "{e}");
    }

    #[test]
    fn settings_from_flags() {
        let b64 = pub_b64();
        // Unclaimed: only PORT and UPDATE_CHANNEL.
        let s = StoreSettings::from_args(&args()).unwrap();
        let keys: Vec<_> = s.entries().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["PORT", "UPDATE_CHANNEL"]);
        // A store.
        let mut a = args();
        a.realm = Some("t-abc:s-001".into());
        a.cluster_key_base64 = Some(b64.clone());
        a.cloud_url = Some("https://cloud.example/v1/events/ingest".into());
        a.cloud_token = Some("tok123".into());
        a.update_channel = "canary".into();
        a.address = Some("10.1.2.3/16".into());
        a.gateway = Some("10.1.0.1".into());
        a.dns = Some("10.1.0.1".into());
        let s = StoreSettings::from_args(&a).unwrap();
        let env = s.hub_env("# header line\n");
        assert!(env.starts_with("# header line\n\n# Written by pos-hub flash"));
        for line in [
            "TENANT_ID=t-abc",
            "STORE_ID=s-001",
            &format!("CLUSTER_PUBLIC_KEY_BASE64={b64}"),
            "CLOUD_BRIDGE_URL=https://cloud.example/v1/events/ingest",
            "CLOUD_BRIDGE_TOKEN=tok123",
            "DEV=off",
            "PORT=4001",
            "UPDATE_CHANNEL=canary",
            "NET_ADDRESS=10.1.2.3/16",
            "NET_GATEWAY=10.1.0.1",
            "NET_DNS=10.1.0.1",
        ] {
            assert!(env.lines().any(|l| l == line), "{line} missing in\n{env}");
        }
        // The hub's own parser reads it back.
        let map = crate::config::parse_env_file(&env).unwrap();
        assert_eq!(map["CLUSTER_PUBLIC_KEY_BASE64"], b64);
        assert!(!s.keys_summary().contains("tok123"));

        // Dev box.
        let mut d = args();
        d.dev = true;
        let s = StoreSettings::from_args(&d).unwrap();
        assert!(s.hub_env("").lines().any(|l| l == "DEV=on"));

        // Combinations that make no sense.
        let mut x = args();
        x.realm = Some("t:s".into());
        assert!(matches!(
            StoreSettings::from_args(&x),
            Err(FlashError::MissingKey)
        ));
        // A key without a realm: the box starts unclaimed with it as its claim key.
        let mut x = args();
        x.cluster_key_base64 = Some(b64.clone());
        let st = StoreSettings::from_args(&x).unwrap();
        let env = st.hub_env("");
        assert!(
            env.contains("CLAIM_PUBLIC_KEY_BASE64=")
                && env.contains("DEV=off")
                && !env.contains("TENANT_ID")
        );
        let mut x = a.clone();
        x.dev = true;
        assert!(matches!(
            StoreSettings::from_args(&x),
            Err(FlashError::DevWithRealm)
        ));
        let mut x = a.clone();
        x.cloud_token = None;
        assert!(matches!(
            StoreSettings::from_args(&x),
            Err(FlashError::UrlWithoutToken)
        ));
        let mut x = args();
        x.cloud_url = Some("https://cloud.example/x".into());
        x.cloud_token = Some("t".into());
        assert!(matches!(
            StoreSettings::from_args(&x),
            Err(FlashError::CloudWithoutRealm)
        ));
        let mut x = args();
        x.gateway = Some("10.0.0.1".into());
        assert!(matches!(
            StoreSettings::from_args(&x),
            Err(FlashError::NetWithoutAddress)
        ));
        let mut x = args();
        x.cluster_key_file = Some("/nonexistent/key.pem".into());
        assert!(matches!(
            StoreSettings::from_args(&x),
            Err(FlashError::KeyFile { .. })
        ));
    }

    #[test]
    fn header_keeps_leading_comments_only() {
        let env = "# one\r\n# two\n#   TENANT_ID=t-abc\nDEV=on\n# later\n";
        assert_eq!(comment_header(env), "# one\n# two\n#   TENANT_ID=t-abc\n");
        let flashed = "# one\n\n# Written by pos-hub flash 0.1.0 on x.\nPORT=4001\n";
        assert_eq!(comment_header(flashed), "# one\n");
        let flashed = "# one\n# Written by pos-hub flash 0.1.0 on x.\nPORT=4001\n";
        assert_eq!(comment_header(flashed), "# one\n");
        assert_eq!(comment_header("PORT=1\n"), "");
    }

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

    #[test]
    fn fat_labels() {
        let mut bs = vec![0u8; 512];
        bs[510] = 0x55;
        bs[511] = 0xAA;
        assert_eq!(fat_label(&bs), None);
        bs[0x36..0x3E].copy_from_slice(b"FAT16   ");
        bs[0x2B..0x2B + 11].copy_from_slice(b"POSHUB-CFG ");
        assert_eq!(fat_label(&bs).as_deref(), Some("POSHUB-CFG"));
        let mut bs32 = vec![0u8; 512];
        bs32[510] = 0x55;
        bs32[511] = 0xAA;
        bs32[0x52..0x5A].copy_from_slice(b"FAT32   ");
        bs32[0x47..0x47 + 11].copy_from_slice(b"BOOT-A     ");
        assert_eq!(fat_label(&bs32).as_deref(), Some("BOOT-A"));
    }

    #[test]
    fn xz_list() {
        let out = "name\tx.img.xz\nfile\t1\t1\t3000212\t3000000\t1.000\tCRC64\t0\ntotals\t1\t1\t3000212\t3000000\t1.000\tCRC64\t0\t1\n";
        assert_eq!(parse_xz_list(out), Some(3_000_000));
        assert_eq!(parse_xz_list("totals\t0\t0\t0\t0\t---\tNone\t0\t0\n"), None);
        assert_eq!(parse_xz_list(""), None);
    }

    #[test]
    fn mountinfo_and_devnos() {
        let text = "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
                    43 27 8:17 / /media/my\\040card rw - vfat /dev/sdb1 rw\n\
                    22 27 0:21 / /proc rw,relatime - proc proc rw\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].devno, "254:0");
        assert_eq!(m[0].mount_point, "/");
        assert_eq!(m[0].source, "/dev/vda");
        assert_eq!(m[1].mount_point, "/media/my card");
        assert_eq!(m[1].source, "/dev/sdb1");
        assert_eq!(dev_major_minor(libc::makedev(8, 17)), (8, 17));
        assert_eq!(
            dev_major_minor(libc::makedev(259, 1_048_577)),
            (259, 1_048_577)
        );
    }

    /// The disk holding / is refused whatever else is true (the check runs before any write).
    #[test]
    fn system_disk_is_refused() {
        let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
            return;
        };
        let Some(root) = parse_mountinfo(&text)
            .into_iter()
            .find(|m| m.mount_point == "/" && m.source.starts_with("/dev/"))
        else {
            return;
        };
        let Some(dir) = sys_dir(&root.devno) else {
            return;
        };
        let mut disks = BTreeSet::new();
        disks_under(&dir, 0, &mut disks);
        for disk in disks {
            let dev = PathBuf::from(format!("/dev/{}", name_of(&disk)));
            let Ok(meta) = std::fs::metadata(&dev) else {
                continue;
            };
            let e = check_block_device(&dev, meta.rdev()).unwrap_err();
            assert!(matches!(e, FlashError::SystemDisk { .. }), "{e}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(human(512), "512 bytes");
        assert_eq!(human(241 * MIB), "241.0 MiB");
        assert_eq!(human(30 * 1024 * MIB), "30.0 GiB");
        assert_eq!(prefix_mask(24), 0xffff_ff00);
        assert_eq!(prefix_mask(32), u32::MAX);
    }
}
