//! Settings: the old Docker hub's `.env` keys, from the process environment and an
//! optional env file (the environment wins), plus an optional realms file or
//! directory for several realms on one box. Everything is validated at start; every
//! bad value stops start-up with one message naming the key and what is wrong.
//!
//! The settings types of every concern live here, below the modules that use them, so
//! config imports none of its users: [`bridge`] (the cloud bridge's knobs), [`update`]
//! (channel, window, polling), [`claim`] (the claim key of an unclaimed box); the
//! realms, TLS, mDNS, clock, UPS and log settings are in this file.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;

use crate::auth::keys::VerifyKey;
use crate::auth::{KeySet, Policy};

pub mod bridge;
pub mod claim;
pub mod nats;
pub mod update;

pub use bridge::Tuning;
pub use claim::{claim_key, ClaimKey};
pub use update::{UpdateChannel, UpdateConfig};

/// A bad setting. Printed as `KEY: what is wrong (what to do)`.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

pub(crate) fn err(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.to_string(),
        message: message.into(),
    }
}

/// One realm `{tenantId, storeId}` with the keys its devices' tokens are checked against.
#[derive(Debug, Clone)]
pub struct RealmConfig {
    pub tenant_id: String,
    pub store_id: String,
    pub keys: Arc<KeySet>,
    pub cloud_bridge_url: Option<String>,
    pub cloud_bridge_token: Option<String>,
    /// The feed URL, if not derived from the push URL.
    pub cloud_feed_url: Option<String>,
}

impl RealmConfig {
    pub fn key(&self) -> String {
        format!("{}:{}", self.tenant_id, self.store_id)
    }
}

/// Everything `pos-hub serve` needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub bind: IpAddr,
    /// Whether BIND was given (otherwise the hub listens on IPv4 and IPv6).
    pub bind_explicit: bool,
    pub port: u16,
    pub realms: Vec<RealmConfig>,
    pub token_offline_grace: Duration,
    pub token_policy: Policy,
    pub update_channel: UpdateChannel,
    /// UPDATE_URL, UPDATE_WINDOW and friends (see crate::update).
    pub update: UpdateConfig,
    /// Set when no realm is configured and a claim key is known: the box is unclaimed.
    pub claim: Option<ClaimKey>,
    pub mdns: bool,
    /// Interfaces to advertise on (MDNS_INTERFACES, comma-separated; empty = all).
    pub mdns_interfaces: Vec<String>,
    pub dev: bool,
    /// The most events one transaction may carry (group commit).
    pub group_commit_max: usize,
    /// Serve TLS (HTTPS/WSS) from the store CA; `TLS=off` serves plain HTTP only
    /// (tests, benchmarks, or behind another TLS terminator).
    pub tls: bool,
    /// Extra names (DNS names, IPs or CIDRs) the store CA may certify and the
    /// leaf covers (TLS_EXTRA_NAMES, comma-separated).
    pub tls_extra_names: Vec<String>,
    /// How often the leaf is checked for expiry and address changes.
    pub tls_check_interval: Duration,
    /// NTP servers to measure the clock against (`host` or `host:port`); empty = none.
    pub ntp_servers: Vec<String>,
    pub ntp_interval: Duration,
    /// Step the system clock (the hub is the init process of the appliance).
    pub clock_set: bool,
    /// The UPS watcher, when a power source is configured.
    pub power: Option<crate::power::PowerConfig>,
    /// Per-socket outgoing queue, in packets; a device that falls this far behind is
    /// disconnected and resumes from its cursor.
    pub socket_buffer: usize,
    /// SOCKET_BUFFER_MIB: what the hub may hold for one device, in bytes (queued or
    /// being written, a shared commit counted whole); past it the device is cut like
    /// one whose queue is full.
    pub socket_buffer_bytes: usize,
    /// The cloud bridge's knobs (CLOUD_TIMEOUT, CLOUD_PUSH_BATCH, ...), for every realm.
    pub bridge: Tuning,
    /// LOG_RETENTION: events older than this (and pushed, when a cloud is configured)
    /// are pruned; `None` (`off`) keeps everything.
    pub log_retention: Option<Duration>,
    /// LOG_PRUNE_INTERVAL: how often each realm looks for events to prune.
    pub log_prune_interval: Duration,
}

/// The default LOG_RETENTION: 90 days.
pub const DEFAULT_LOG_RETENTION: Duration = Duration::from_secs(90 * 86_400);

/// Raw key/value settings: the env file overlaid by the process environment.
#[derive(Debug, Default, Clone)]
pub struct Settings {
    map: HashMap<String, String>,
}

impl Settings {
    /// Reads `env_file` (if any), then the process environment on top.
    pub fn load(env_file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut s = Settings::default();
        if let Some(path) = env_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| err("--env-file", format!("cannot read {}: {e}", path.display())))?;
            s.map = parse_env_file(&text).map_err(|(line, m)| {
                err("--env-file", format!("{} line {line}: {m}", path.display()))
            })?;
        }
        for (k, v) in std::env::vars() {
            s.map.insert(k, v);
        }
        Ok(s)
    }

    pub fn from_pairs<I: IntoIterator<Item = (String, String)>>(pairs: I) -> Self {
        Settings {
            map: pairs.into_iter().collect(),
        }
    }

    /// A value, treating an empty string as unset.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.map
            .get(key)
            .map(|s| s.as_str())
            .filter(|s| !s.is_empty())
    }

    pub fn set(&mut self, key: &str, value: &str) {
        self.map.insert(key.to_string(), value.to_string());
    }
}

/// Parses `KEY=VALUE` lines (`#` comments, optional `export `, single or double quotes).
pub fn parse_env_file(text: &str) -> Result<HashMap<String, String>, (usize, String)> {
    let mut map = HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((k, v)) = line.split_once('=') else {
            return Err((
                i + 1,
                format!("expected KEY=VALUE, found {:?}", truncate(line, 40)),
            ));
        };
        let k = k.trim();
        if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err((i + 1, format!("bad key name {:?}", truncate(k, 40))));
        }
        let v = v.trim();
        let v = if v.len() >= 2
            && ((v.starts_with('"') && v.ends_with('"'))
                || (v.starts_with('\'') && v.ends_with('\'')))
        {
            &v[1..v.len() - 1]
        } else {
            // Unquoted: drop a trailing ` # comment`.
            v.split(" #").next().unwrap_or(v).trim()
        };
        map.insert(k.to_string(), v.to_string());
    }
    Ok(map)
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// Checks a tenant or store id: 1-64 chars of `[A-Za-z0-9._-]`, not `.`/`..`
/// (they name directories under the data dir).
pub fn valid_realm_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// A bridge URL: http(s), or a comma-separated nats:// / tls:// server list.
fn check_bridge_url(key: &str, url: &str) -> Result<(), ConfigError> {
    if nats::is_nats_url(url) {
        return nats::parse_servers(url)
            .map(|_| ())
            .map_err(|e| err(key, e));
    }
    check_url(key, url)
}

fn check_url(key: &str, url: &str) -> Result<(), ConfigError> {
    if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() < 10 {
        return Err(err(key, format!("{url:?} is not an http(s) URL")));
    }
    Ok(())
}

/// A whole number from `min` to `max`, `default` when unset.
pub(crate) fn number(
    s: &Settings,
    key: &str,
    default: usize,
    min: usize,
    max: usize,
) -> Result<usize, ConfigError> {
    match s.get(key) {
        None => Ok(default),
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (min..=max).contains(n))
            .ok_or_else(|| err(key, format!("{v:?} is not a number from {min} to {max}"))),
    }
}

/// An on/off setting (`on|off|true|false|yes|no|1|0`); anything else is an error.
fn switch(s: &Settings, key: &str, default: bool) -> Result<bool, ConfigError> {
    match s.get(key).map(|v| v.to_ascii_lowercase()) {
        None => Ok(default),
        Some(v) if matches!(v.as_str(), "on" | "1" | "true" | "yes") => Ok(true),
        Some(v) if matches!(v.as_str(), "off" | "0" | "false" | "no") => Ok(false),
        Some(v) => Err(err(key, format!("{v:?} is not on or off"))),
    }
}

pub(crate) fn parse_duration(key: &str, v: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(v).map_err(|e| {
        err(
            key,
            format!("{v:?} is not a duration like 72h or 30m ({e})"),
        )
    })
}

/// A realm as written in a realms file.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RealmEntry {
    tenant_id: String,
    store_id: String,
    #[serde(default)]
    public_key_pem: Option<String>,
    #[serde(default)]
    public_key_base64: Option<String>,
    #[serde(default)]
    public_key_file: Option<PathBuf>,
    #[serde(default)]
    jwks_file: Option<PathBuf>,
    #[serde(default)]
    cloud_bridge_url: Option<String>,
    #[serde(default)]
    cloud_bridge_token: Option<String>,
    #[serde(default)]
    cloud_feed_url: Option<String>,
}

fn keys_from_pem(key: &str, pem: &str) -> Result<Arc<KeySet>, ConfigError> {
    VerifyKey::from_pem(pem, None)
        .map(|k| Arc::new(KeySet::single(k)))
        .map_err(|e| err(key, e.to_string()))
}

pub(crate) fn keys_from_base64(key: &str, b64: &str) -> Result<Arc<KeySet>, ConfigError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| err(key, format!("not valid base64 ({e}); encode the PEM public key with `base64 -w0 key.pub.pem`")))?;
    let pem =
        String::from_utf8(bytes).map_err(|_| err(key, "decodes to bytes that are not PEM text"))?;
    keys_from_pem(key, &pem)
}

impl RealmEntry {
    fn into_config(self, base: &Path, origin: &str) -> Result<RealmConfig, ConfigError> {
        let key = |field: &str| {
            format!(
                "{origin} realm {}:{} {field}",
                self.tenant_id, self.store_id
            )
        };
        if !valid_realm_part(&self.tenant_id) {
            return Err(err(
                &format!("{origin} tenantId"),
                format!(
                    "{:?} must be 1-64 chars of A-Z a-z 0-9 . _ -",
                    self.tenant_id
                ),
            ));
        }
        if !valid_realm_part(&self.store_id) {
            return Err(err(
                &format!("{origin} storeId"),
                format!(
                    "{:?} must be 1-64 chars of A-Z a-z 0-9 . _ -",
                    self.store_id
                ),
            ));
        }
        let sources = [
            self.public_key_pem.is_some(),
            self.public_key_base64.is_some(),
            self.public_key_file.is_some(),
            self.jwks_file.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if sources != 1 {
            return Err(err(
                &key("key"),
                "give exactly one of publicKeyPem, publicKeyBase64, publicKeyFile, jwksFile",
            ));
        }
        let keys = if let Some(pem) = &self.public_key_pem {
            keys_from_pem(&key("publicKeyPem"), pem)?
        } else if let Some(b64) = &self.public_key_base64 {
            keys_from_base64(&key("publicKeyBase64"), b64)?
        } else if let Some(f) = &self.public_key_file {
            let p = base.join(f);
            let pem = std::fs::read_to_string(&p).map_err(|e| {
                err(
                    &key("publicKeyFile"),
                    format!("cannot read {}: {e}", p.display()),
                )
            })?;
            keys_from_pem(&key("publicKeyFile"), &pem)?
        } else {
            let p = base.join(self.jwks_file.as_deref().unwrap_or(Path::new("")));
            Arc::new(KeySet::from_jwks_file(&p).map_err(|e| err(&key("jwksFile"), e.to_string()))?)
        };
        if let Some(u) = &self.cloud_bridge_url {
            check_bridge_url(&key("cloudBridgeUrl"), u)?;
            if self.cloud_bridge_token.is_none() && !nats::is_nats_url(u) {
                return Err(err(
                    &key("cloudBridgeToken"),
                    "is not set but cloudBridgeUrl is",
                ));
            }
        }
        if let Some(u) = &self.cloud_feed_url {
            check_url(&key("cloudFeedUrl"), u)?;
        }
        Ok(RealmConfig {
            tenant_id: self.tenant_id,
            store_id: self.store_id,
            keys,
            cloud_bridge_url: self.cloud_bridge_url,
            cloud_bridge_token: self.cloud_bridge_token,
            cloud_feed_url: self.cloud_feed_url,
        })
    }
}

/// Loads realms from a JSON file (an array of realm objects) or a directory of
/// `*.json` files (one realm object each).
pub fn load_realms(path: &Path) -> Result<Vec<RealmConfig>, ConfigError> {
    let key = "REALMS_FILE";
    let meta = std::fs::metadata(path)
        .map_err(|e| err(key, format!("cannot read {}: {e}", path.display())))?;
    let mut out = Vec::new();
    if meta.is_dir() {
        let mut files: Vec<_> = std::fs::read_dir(path)
            .map_err(|e| err(key, format!("cannot list {}: {e}", path.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f)
                .map_err(|e| err(key, format!("cannot read {}: {e}", f.display())))?;
            let entry: RealmEntry = serde_json::from_str(&text)
                .map_err(|e| err(key, format!("{}: {e}", f.display())))?;
            out.push(entry.into_config(path, &f.display().to_string())?);
        }
    } else {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err(key, format!("cannot read {}: {e}", path.display())))?;
        let entries: Vec<RealmEntry> = serde_json::from_str(&text).map_err(|e| {
            err(
                key,
                format!("{}: {e} (expected a JSON array of realms)", path.display()),
            )
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for e in entries {
            out.push(e.into_config(base, &path.display().to_string())?);
        }
    }
    Ok(out)
}

impl Config {
    /// Builds and validates the configuration. `realms_file` comes from `--realms`
    /// or REALMS_FILE; `data_dir` from `--data-dir` or DATA_DIR.
    pub fn from_settings(
        s: &Settings,
        data_dir: Option<PathBuf>,
        realms_file: Option<PathBuf>,
        port: Option<u16>,
    ) -> Result<Self, ConfigError> {
        let port = match port {
            Some(p) => p,
            None => match s.get("PORT") {
                None => 4001,
                Some(v) => v
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| err("PORT", format!("{v:?} is not a TCP port (1-65535)")))?,
            },
        };
        let bind = match s.get("BIND") {
            None => IpAddr::from([0, 0, 0, 0]),
            Some(v) => v
                .parse()
                .map_err(|_| err("BIND", format!("{v:?} is not an IP address")))?,
        };
        let data_dir = data_dir
            .or_else(|| s.get("DATA_DIR").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("/data"));
        // Token times are i64 seconds: more than 100 years is a typo, not a setting.
        let token_span = |key: &str, v: &str| -> Result<Duration, ConfigError> {
            let d = parse_duration(key, v)?;
            if d.as_secs() > 100 * 365 * 86400 {
                return Err(err(key, format!("{v:?} is longer than 100 years")));
            }
            Ok(d)
        };
        let token_offline_grace = match s.get("TOKEN_OFFLINE_GRACE") {
            None => Duration::from_secs(72 * 3600),
            Some(v) => token_span("TOKEN_OFFLINE_GRACE", v)?,
        };
        let log_retention = match s.get("LOG_RETENTION") {
            None => Some(DEFAULT_LOG_RETENTION),
            Some("off") => None,
            Some(v) => {
                let d = parse_duration("LOG_RETENTION", v)?;
                if d < Duration::from_secs(1) {
                    return Err(err(
                        "LOG_RETENTION",
                        format!(
                            "{v:?} is too short: give a duration like 90d (at least 1s), or off"
                        ),
                    ));
                }
                Some(d)
            }
        };
        let log_prune_interval = match s.get("LOG_PRUNE_INTERVAL") {
            None => Duration::from_secs(60),
            Some(v) => {
                let d = parse_duration("LOG_PRUNE_INTERVAL", v)?;
                if d < Duration::from_millis(100) || d > Duration::from_secs(86_400) {
                    return Err(err(
                        "LOG_PRUNE_INTERVAL",
                        format!("{v:?} must be between 100ms and 24h"),
                    ));
                }
                d
            }
        };
        let leeway_secs = match s.get("TOKEN_LEEWAY") {
            None => 60,
            Some(v) => token_span("TOKEN_LEEWAY", v)?.as_secs() as i64,
        };
        let update_channel = match s.get("UPDATE_CHANNEL") {
            None => UpdateChannel::Stable,
            Some(v) => UpdateChannel::parse(v).ok_or_else(|| {
                err(
                    "UPDATE_CHANNEL",
                    format!("{v:?} is not stable, canary or a version like 1.4.2"),
                )
            })?,
        };
        let mdns = switch(s, "MDNS", true)?;
        let num =
            |key: &str, default: usize, min: usize, max: usize| number(s, key, default, min, max);
        let tls = switch(s, "TLS", true)?;
        let mut tls_extra_names = Vec::new();
        for n in s
            .get("TLS_EXTRA_NAMES")
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
        {
            let ok = n.parse::<IpAddr>().is_ok()
                || n.split_once('/').is_some_and(|(a, p)| {
                    a.parse::<IpAddr>().is_ok() && p.parse::<u8>().is_ok_and(|p| p <= 128)
                })
                || (n.len() <= 253
                    && n.split('.').all(|l| {
                        !l.is_empty()
                            && l.len() <= 63
                            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    }));
            if !ok {
                return Err(err(
                    "TLS_EXTRA_NAMES",
                    format!("{n:?} is not a DNS name, IP address or CIDR"),
                ));
            }
            tls_extra_names.push(n.to_string());
        }
        let tls_check_interval = match s.get("TLS_CHECK_INTERVAL") {
            None => Duration::from_secs(60),
            Some(v) => parse_duration("TLS_CHECK_INTERVAL", v)?.max(Duration::from_secs(1)),
        };
        let mut sources = Vec::new();
        if let Some(v) = s.get("UPS_NUT") {
            sources.push(
                crate::power::Source::parse_nut(
                    v,
                    s.get("UPS_NUT_USER").map(String::from),
                    s.get("UPS_NUT_PASSWORD").map(String::from),
                )
                .ok_or_else(|| err("UPS_NUT", format!("{v:?} is not ups@host or ups@host:port")))?,
            );
        }
        if let Some(v) = s.get("UPS_POWER_SUPPLY") {
            if !Path::new(v).is_dir() {
                return Err(err(
                    "UPS_POWER_SUPPLY",
                    format!("{v:?} is not a directory (e.g. /sys/class/power_supply)"),
                ));
            }
            sources.push(crate::power::Source::PowerSupply(PathBuf::from(v)));
        }
        if let Some(v) = s.get("UPS_GPIO") {
            let low = switch(s, "UPS_GPIO_ACTIVE_LOW", false)?;
            sources.push(crate::power::Source::parse_gpio(v, low).ok_or_else(|| {
                err(
                    "UPS_GPIO",
                    format!("{v:?} is not gpiochipN:LINE (e.g. gpiochip0:17)"),
                )
            })?);
        }
        let dur = |key: &str, default: u64| -> Result<Duration, ConfigError> {
            match s.get(key) {
                None => Ok(Duration::from_secs(default)),
                Some(v) => parse_duration(key, v),
            }
        };
        // Validated even without a source, so a typo is caught before it matters.
        let shutdown_after = dur("UPS_SHUTDOWN_AFTER", 300)?;
        let poll = dur("UPS_POLL", 2)?.max(Duration::from_millis(100));
        let deadtime = dur("UPS_DEADTIME", 15)?;
        let low_capacity = num("UPS_LOW_CAPACITY", 20, 1, 99)? as u8;
        let power = (!sources.is_empty()).then_some(crate::power::PowerConfig {
            sources,
            shutdown_after,
            poll,
            deadtime,
            low_capacity,
        });
        let ntp_servers = match s.get("NTP_SERVERS") {
            Some("off") | Some("none") => Vec::new(),
            Some(v) => crate::clock::parse_servers(v),
            None => vec!["pool.ntp.org".to_string()],
        };
        let ntp_interval = dur("NTP_INTERVAL", 900)?.max(Duration::from_secs(1));
        let clock_set = switch(s, "CLOCK_SET", false)?;
        let group_commit_max = num("GROUP_COMMIT_MAX", 4096, 1, 100_000)?;
        let socket_buffer = num("SOCKET_BUFFER", 32768, 64, 1_000_000)?;
        let socket_buffer_bytes = num("SOCKET_BUFFER_MIB", 64, 1, 4096)? << 20;
        let bridge = Tuning::from_settings(s)?;
        let token_policy = Policy {
            issuer: s.get("TOKEN_ISSUER").map(String::from),
            audience: s.get("TOKEN_AUDIENCE").map(String::from),
            leeway_secs,
        };

        let mut realms = Vec::new();
        let realms_file = realms_file.or_else(|| s.get("REALMS_FILE").map(PathBuf::from));
        if let Some(f) = &realms_file {
            realms.extend(load_realms(f)?);
        }
        // The single realm of the old `.env`.
        let tenant = s.get("TENANT_ID");
        let store = s.get("STORE_ID");
        // No realm anywhere but a claim key: the box starts unclaimed (setup page only).
        let claim = if tenant.is_none() && store.is_none() && realms.is_empty() {
            claim_key(s)?
        } else {
            None
        };
        if tenant.is_some() || store.is_some() || (realms.is_empty() && claim.is_none()) {
            let tenant = tenant.ok_or_else(|| {
                err(
                    "TENANT_ID",
                    "is not set (or give --realms FILE, or run with --dev)",
                )
            })?;
            let store = store.ok_or_else(|| err("STORE_ID", "is not set"))?;
            if !valid_realm_part(tenant) {
                return Err(err(
                    "TENANT_ID",
                    format!("{tenant:?} must be 1-64 chars of A-Z a-z 0-9 . _ -"),
                ));
            }
            if !valid_realm_part(store) {
                return Err(err(
                    "STORE_ID",
                    format!("{store:?} must be 1-64 chars of A-Z a-z 0-9 . _ -"),
                ));
            }
            let keys =
                match (
                    s.get("CLUSTER_PUBLIC_KEY_BASE64"),
                    s.get("CLUSTER_JWKS_FILE"),
                ) {
                    (Some(b64), None) => keys_from_base64("CLUSTER_PUBLIC_KEY_BASE64", b64)?,
                    (None, Some(f)) => Arc::new(
                        KeySet::from_jwks_file(Path::new(f))
                            .map_err(|e| err("CLUSTER_JWKS_FILE", e.to_string()))?,
                    ),
                    (Some(_), Some(_)) => {
                        return Err(err(
                            "CLUSTER_JWKS_FILE",
                            "set either it or CLUSTER_PUBLIC_KEY_BASE64, not both",
                        ))
                    }
                    (None, None) => return Err(err(
                        "CLUSTER_PUBLIC_KEY_BASE64",
                        "is not set: the hub needs the cloud's public key to check device tokens",
                    )),
                };
            let url = s.get("CLOUD_BRIDGE_URL").map(String::from);
            if let Some(f) = s.get("CLOUD_FEED_URL") {
                check_url("CLOUD_FEED_URL", f)?;
            }
            if let Some(u) = &url {
                check_bridge_url("CLOUD_BRIDGE_URL", u)?;
                let nats = nats::is_nats_url(u);
                if nats && s.get("CLOUD_FEED_URL").is_some() {
                    return Err(err(
                        "CLOUD_FEED_URL",
                        "is not used with a nats:// CLOUD_BRIDGE_URL (the down subject is the feed); unset it",
                    ));
                }
                if s.get("CLOUD_BRIDGE_TOKEN").is_none() && !nats {
                    return Err(err(
                        "CLOUD_BRIDGE_TOKEN",
                        "is not set but CLOUD_BRIDGE_URL is",
                    ));
                }
            }
            realms.push(RealmConfig {
                tenant_id: tenant.to_string(),
                store_id: store.to_string(),
                keys,
                cloud_bridge_url: url,
                cloud_bridge_token: s.get("CLOUD_BRIDGE_TOKEN").map(String::from),
                cloud_feed_url: s.get("CLOUD_FEED_URL").map(String::from),
            });
        }
        for r in &realms {
            if let Some(u) = r
                .cloud_bridge_url
                .as_deref()
                .filter(|u| nats::is_nats_url(u))
            {
                nats::check_target(
                    "CLOUD_BRIDGE_URL",
                    u,
                    r.cloud_bridge_token.as_deref(),
                    &bridge.nats,
                )?;
            }
        }
        // A creds file or CA for NATS with no NATS target: the URL is probably wrong.
        let any_nats = realms
            .iter()
            .any(|r| r.cloud_bridge_url.as_deref().is_some_and(nats::is_nats_url));
        for key in ["CLOUD_NATS_CREDS", "CLOUD_NATS_CA"] {
            if !any_nats && s.get(key).is_some() {
                return Err(err(
                    key,
                    "is set but no CLOUD_BRIDGE_URL (or realm cloudBridgeUrl) is a nats:// or tls:// URL; fix the URL or unset it",
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for r in &realms {
            if !seen.insert(r.key()) {
                return Err(err(
                    "realms",
                    format!("realm {} is configured twice", r.key()),
                ));
            }
        }
        Ok(Config {
            data_dir,
            bind,
            bind_explicit: s.get("BIND").is_some(),
            port,
            realms,
            token_offline_grace,
            token_policy,
            update_channel,
            update: UpdateConfig::from_settings(s)?,
            claim,
            mdns,
            mdns_interfaces: s
                .get("MDNS_INTERFACES")
                .map(|v| {
                    v.split(',')
                        .map(str::trim)
                        .filter(|x| !x.is_empty())
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default(),
            dev: false,
            log_retention,
            log_prune_interval,
            group_commit_max,
            socket_buffer,
            socket_buffer_bytes,
            bridge,
            tls,
            tls_extra_names,
            tls_check_interval,
            power,
            ntp_servers,
            ntp_interval,
            clock_set,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pub_b64() -> String {
        let (_, public) = crate::auth::keys::generate_ed25519().unwrap();
        base64::engine::general_purpose::STANDARD.encode(public)
    }

    fn settings(pairs: &[(&str, &str)]) -> Settings {
        Settings::from_pairs(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn env_file_parsing() {
        let m =
            parse_env_file("# c\nexport A=1\nB=\"two words\"\nC='x'\nD=plain # note\n\n").unwrap();
        assert_eq!(m["A"], "1");
        assert_eq!(m["B"], "two words");
        assert_eq!(m["C"], "x");
        assert_eq!(m["D"], "plain");
        assert_eq!(parse_env_file("ok=1\nnonsense line\n").unwrap_err().0, 2);
    }

    #[test]
    fn single_realm_from_env() {
        let b64 = pub_b64();
        let c = Config::from_settings(
            &settings(&[
                ("TENANT_ID", "t-abc"),
                ("STORE_ID", "s-001"),
                ("CLUSTER_PUBLIC_KEY_BASE64", &b64),
            ]),
            None,
            None,
            None,
        )
        .unwrap();
        assert_eq!(c.port, 4001);
        assert_eq!(c.realms[0].key(), "t-abc:s-001");
        assert_eq!(c.token_offline_grace, Duration::from_secs(72 * 3600));
        assert_eq!(c.log_retention, Some(Duration::from_secs(90 * 86_400)));
        assert_eq!(c.log_prune_interval, Duration::from_secs(60));
    }

    /// The bridge's knobs come from the same settings (the env file too), not only
    /// from the process environment.
    #[test]
    fn bridge_tuning_from_settings() {
        let b64 = pub_b64();
        let mut s = settings(&[
            ("TENANT_ID", "t"),
            ("STORE_ID", "s"),
            ("CLUSTER_PUBLIC_KEY_BASE64", b64.as_str()),
        ]);
        let c = Config::from_settings(&s, None, None, None).unwrap();
        assert_eq!(c.bridge, Tuning::default());
        s.set("CLOUD_TIMEOUT", "2s");
        s.set("CLOUD_PUSH_BUSY_RATE", "250");
        let c = Config::from_settings(&s, None, None, None).unwrap();
        assert_eq!(c.bridge.timeout, Duration::from_secs(2));
        assert_eq!(c.bridge.busy_rate, 250.0);
    }

    #[test]
    fn every_bad_value_names_its_key() {
        let b64 = pub_b64();
        let base = [
            ("TENANT_ID", "t"),
            ("STORE_ID", "s"),
            ("CLUSTER_PUBLIC_KEY_BASE64", b64.as_str()),
        ];
        let cases: &[(&str, &str)] = &[
            ("PORT", "99999"),
            ("PORT", "abc"),
            ("TENANT_ID", "../etc"),
            ("STORE_ID", "a b"),
            ("CLUSTER_PUBLIC_KEY_BASE64", "!!!"),
            ("CLUSTER_PUBLIC_KEY_BASE64", "aGVsbG8="),
            ("UPDATE_CHANNEL", "nightly!"),
            ("TOKEN_OFFLINE_GRACE", "forever"),
            ("MDNS", "maybe"),
            ("CLOUD_BRIDGE_URL", "ftp://x"),
            ("GROUP_COMMIT_MAX", "0"),
            ("SOCKET_BUFFER_MIB", "0"),
            ("SOCKET_BUFFER_MIB", "64M"),
            ("TLS", "sometimes"),
            ("UPS_NUT", "nohost"),
            ("UPS_SHUTDOWN_AFTER", "soon"),
            ("UPS_POWER_SUPPLY", "/nonexistent/dir"),
            ("UPS_GPIO", "pin17"),
            ("CLOCK_SET", "sometimes"),
            ("TLS_EXTRA_NAMES", "bad name!"),
            ("CLOUD_TIMEOUT", "a while"),
            ("CLOUD_FEED_WAIT", "5m"),
            ("CLOUD_BACKOFF_MAX", "-1s"),
            ("CLOUD_PUSH_BATCH", "501"),
            ("CLOUD_PUSH_MAX_RATE", "fast"),
            ("CLOUD_PUSH_BUSY_RATE", "0"),
            ("LOG_RETENTION", "a season"),
            ("LOG_RETENTION", "0s"),
            ("LOG_PRUNE_INTERVAL", "1ms"),
            ("LOG_PRUNE_INTERVAL", "2d"),
            ("CLOUD_BRIDGE_URL", "nats://a:4222,http://b"),
            ("CLOUD_BRIDGE_URL", "nats://"),
            ("CLOUD_NATS_CREDS", "/nonexistent/user.creds"),
            ("CLOUD_NATS_CA", "/nonexistent/ca.pem"),
            ("CLOUD_NATS_STREAM", "POS.HUB"),
        ];
        for (k, v) in cases {
            let mut s = settings(&base);
            s.set(k, v);
            let e = Config::from_settings(&s, None, None, None).unwrap_err();
            assert_eq!(&e.key, k, "{e}");
        }
        let e = Config::from_settings(&settings(&[]), None, None, None).unwrap_err();
        assert_eq!(e.key, "TENANT_ID");
    }

    /// A nats:// list selects JetStream: no token needed, one way to log in, no
    /// feed URL, the NATS keys validated.
    #[test]
    fn nats_target_settings() {
        let b64 = pub_b64();
        let base = [
            ("TENANT_ID", "t"),
            ("STORE_ID", "s"),
            ("CLUSTER_PUBLIC_KEY_BASE64", b64.as_str()),
            ("CLOUD_BRIDGE_URL", "nats://127.0.0.1:4222, tls://n2:4222"),
        ];
        let c = Config::from_settings(&settings(&base), None, None, None).unwrap();
        assert_eq!(c.bridge.nats.stream, "POSHUB");
        assert!(c.realms[0].cloud_bridge_url.is_some());
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk");
        std::fs::write(&junk, "not a creds file").unwrap();
        let with = |extra: &[(&str, &str)]| {
            let mut s = settings(&base);
            for (k, v) in extra {
                s.set(k, v);
            }
            Config::from_settings(&s, None, None, None)
        };
        let j = junk.to_str().unwrap();
        assert_eq!(
            with(&[("CLOUD_NATS_CREDS", j)]).unwrap_err().key,
            "CLOUD_NATS_CREDS"
        );
        assert_eq!(
            with(&[("CLOUD_NATS_CA", j)]).unwrap_err().key,
            "CLOUD_NATS_CA"
        );
        assert_eq!(
            with(&[("CLOUD_FEED_URL", "http://x/feed")])
                .unwrap_err()
                .key,
            "CLOUD_FEED_URL"
        );
        let e = with(&[
            ("CLOUD_BRIDGE_URL", "nats://u:p@127.0.0.1:4222"),
            ("CLOUD_BRIDGE_TOKEN", "tok"),
        ])
        .unwrap_err();
        assert!(e.message.contains("one way"), "{e}");
        let c = with(&[("CLOUD_NATS_STREAM", "CHAIN_1")]).unwrap();
        assert_eq!(c.bridge.nats.stream, "CHAIN_1");
        // Different logins in one server list; NATS keys without a NATS target; a
        // PEM "certificate" that is not one.
        let e = with(&[("CLOUD_BRIDGE_URL", "nats://u:p@a:4222,nats://u:q@b:4222")]).unwrap_err();
        assert_eq!(e.key, "CLOUD_BRIDGE_URL", "{e}");
        let ca = dir.path().join("ca.pem");
        std::fs::write(
            &ca,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = with(&[("CLOUD_NATS_CA", ca.to_str().unwrap())]).unwrap_err();
        assert_eq!(e.key, "CLOUD_NATS_CA", "{e}");
        let cert = rcgen::generate_simple_self_signed(vec!["nats.example".into()]).unwrap();
        std::fs::write(&ca, cert.cert.pem()).unwrap();
        with(&[("CLOUD_NATS_CA", ca.to_str().unwrap())]).unwrap();
        let e = with(&[
            ("CLOUD_BRIDGE_URL", "https://cloud.example/v1/events/ingest"),
            ("CLOUD_BRIDGE_TOKEN", "tok"),
            ("CLOUD_NATS_CA", ca.to_str().unwrap()),
        ])
        .unwrap_err();
        assert_eq!(e.key, "CLOUD_NATS_CA", "{e}");
    }

    #[test]
    fn realms_file_with_two_realms() {
        let dir = tempfile::tempdir().unwrap();
        let (_, public) = crate::auth::keys::generate_ed25519().unwrap();
        std::fs::write(dir.path().join("k.pem"), &public).unwrap();
        let json = serde_json::json!([
            {"tenantId": "t1", "storeId": "s1", "publicKeyFile": "k.pem"},
            {"tenantId": "t2", "storeId": "s2", "publicKeyPem": public},
        ]);
        let f = dir.path().join("realms.json");
        std::fs::write(&f, json.to_string()).unwrap();
        let c = Config::from_settings(&settings(&[]), None, Some(f.clone()), None).unwrap();
        assert_eq!(c.realms.len(), 2);
        std::fs::write(&f, r#"[{"tenantId":"t1","storeId":"s1"}]"#).unwrap();
        let e = Config::from_settings(&settings(&[]), None, Some(f), None).unwrap_err();
        assert!(e.message.contains("exactly one"), "{e}");
    }

    #[test]
    fn realms_directory_and_jwks_file() {
        let dir = tempfile::tempdir().unwrap();
        let (_, public) = crate::auth::keys::generate_ed25519().unwrap();
        // An Ed25519 JWKS with a kid, as a cloud would publish it.
        let der = pem::parse(public.trim()).unwrap();
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&der.contents()[12..]);
        let jwks = serde_json::json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "k1", "alg": "EdDSA", "use": "sig"}]});
        std::fs::write(dir.path().join("keys.jwks"), jwks.to_string()).unwrap();
        let realms = dir.path().join("realms.d");
        std::fs::create_dir(&realms).unwrap();
        std::fs::write(
            realms.join("a.json"),
            serde_json::json!({"tenantId": "t1", "storeId": "s1", "jwksFile": "../keys.jwks"})
                .to_string(),
        )
        .unwrap();
        std::fs::write(
            realms.join("b.json"),
            serde_json::json!({"tenantId": "t1", "storeId": "s2", "publicKeyPem": public})
                .to_string(),
        )
        .unwrap();
        std::fs::write(realms.join("notes.txt"), "ignored").unwrap();
        let c = Config::from_settings(&settings(&[]), None, Some(realms.clone()), None).unwrap();
        assert_eq!(
            c.realms.iter().map(|r| r.key()).collect::<Vec<_>>(),
            vec!["t1:s1", "t1:s2"]
        );
        assert_eq!(c.realms[0].keys.keys()[0].kid.as_deref(), Some("k1"));
        // A duplicate realm is refused.
        std::fs::write(
            realms.join("c.json"),
            serde_json::json!({"tenantId": "t1", "storeId": "s2", "publicKeyPem": public})
                .to_string(),
        )
        .unwrap();
        let e = Config::from_settings(&settings(&[]), None, Some(realms), None).unwrap_err();
        assert!(e.message.contains("twice"), "{e}");
    }

    #[test]
    fn update_channels() {
        assert_eq!(UpdateChannel::parse("stable"), Some(UpdateChannel::Stable));
        assert_eq!(
            UpdateChannel::parse("v1.4.2"),
            Some(UpdateChannel::Pinned("1.4.2".into()))
        );
        assert_eq!(UpdateChannel::parse("latest"), None);
    }

    /// Found while writing fuzz/ (env): TOKEN_LEEWAY of 500000000000y became a
    /// negative leeway (`as i64`), and such a grace overflowed the token checks.
    #[test]
    fn token_spans_past_a_century_are_refused() {
        for key in ["TOKEN_LEEWAY", "TOKEN_OFFLINE_GRACE"] {
            let s = Settings::from_pairs([
                ("TENANT_ID".to_string(), "t".to_string()),
                (key.to_string(), "500000000000y".to_string()),
            ]);
            let e = Config::from_settings(&s, None, None, None).unwrap_err();
            assert_eq!(e.key, key);
        }
    }
}
