//! The NATS JetStream target's settings (CLOUD_NATS_*, the `nats://` / `tls://` server
//! list and its logins), read and checked with the rest of the configuration. Here, below
//! the bridge, so that `config` never imports the bridge that uses them.

use std::path::PathBuf;

use super::{err, ConfigError, Settings};

/// The NATS target's settings (validated with the rest of the configuration).
#[derive(Debug, Clone, PartialEq)]
pub struct NatsSettings {
    /// A creds file: user JWT + NKey seed (CLOUD_NATS_CREDS).
    pub creds: Option<PathBuf>,
    /// CA certificate(s) the servers' TLS certificates are checked against
    /// (CLOUD_NATS_CA); setting it requires TLS.
    pub ca: Option<PathBuf>,
    /// The stream (CLOUD_NATS_STREAM).
    pub stream: String,
}

impl Default for NatsSettings {
    fn default() -> Self {
        NatsSettings {
            creds: None,
            ca: None,
            stream: "POSHUB".into(),
        }
    }
}

/// Whether a bridge URL selects the NATS target.
pub fn is_nats_url(url: &str) -> bool {
    let u = url.trim_start();
    u.starts_with("nats://") || u.starts_with("tls://")
}

/// Splits and checks a comma-separated `nats://` / `tls://` server list.
pub fn parse_servers(list: &str) -> Result<Vec<async_nats::ServerAddr>, String> {
    let mut out = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if !is_nats_url(part) {
            return Err(format!(
                "{:?} is not a nats:// or tls:// URL (do not mix them with http URLs)",
                redact(part)
            ));
        }
        let addr: async_nats::ServerAddr = part
            .parse()
            .map_err(|e| format!("{:?}: {e}", redact(part)))?;
        if addr.host().is_empty() {
            return Err(format!("{:?} has no host", redact(part)));
        }
        out.push(addr);
    }
    if out.is_empty() {
        return Err("no server given".into());
    }
    Ok(out)
}

/// The user and password of a server list (`nats://user:pass@host`), percent-decoded.
/// async-nats does not read them from the URLs, so the hub passes them itself; every
/// URL that carries them must carry the same (one login for the cluster).
pub fn user_pass(servers: &[async_nats::ServerAddr]) -> Result<Option<(String, String)>, String> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| {
                "the user:password in a NATS URL is not UTF-8 once percent-decoded".to_string()
            })
    };
    let mut found: Option<(String, String)> = None;
    for a in servers.iter().filter(|a| a.has_user_pass()) {
        let u = a.clone().into_inner();
        let this = (decode(u.username())?, decode(u.password().unwrap_or(""))?);
        match &found {
            Some(f) if *f != this => {
                return Err(
                    "the NATS URLs carry different user:password pairs; give the same login in each (or in one)"
                        .into(),
                )
            }
            _ => found = Some(this),
        }
    }
    Ok(found)
}

/// A server list without passwords, for logs and `/status`.
pub fn redact(list: &str) -> String {
    list.split(',')
        .map(|p| match url::Url::parse(p.trim()) {
            Ok(mut u) if u.password().is_some() => {
                let _ = u.set_password(Some("***"));
                u.to_string().trim_end_matches('/').to_string()
            }
            _ => p.trim().to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Reads and checks CLOUD_NATS_CREDS, CLOUD_NATS_CA and CLOUD_NATS_STREAM.
pub fn settings_from(s: &Settings) -> Result<NatsSettings, ConfigError> {
    let mut n = NatsSettings::default();
    if let Some(v) = s.get("CLOUD_NATS_STREAM") {
        if v.is_empty()
            || v.len() > 64
            || !v
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(err(
                "CLOUD_NATS_STREAM",
                format!("{v:?} must be 1-64 chars of A-Z a-z 0-9 _ -"),
            ));
        }
        n.stream = v.to_string();
    }
    if let Some(v) = s.get("CLOUD_NATS_CREDS") {
        let text = std::fs::read_to_string(v)
            .map_err(|e| err("CLOUD_NATS_CREDS", format!("cannot read {v}: {e}")))?;
        async_nats::ConnectOptions::with_credentials(&text).map_err(|e| {
            err(
                "CLOUD_NATS_CREDS",
                format!("{v} is not a NATS creds file (user JWT and NKey seed): {e}"),
            )
        })?;
        n.creds = Some(PathBuf::from(v));
    }
    if let Some(v) = s.get("CLOUD_NATS_CA") {
        let text =
            std::fs::read(v).map_err(|e| err("CLOUD_NATS_CA", format!("cannot read {v}: {e}")))?;
        let certs = pem::parse_many(&text)
            .map_err(|e| err("CLOUD_NATS_CA", format!("{v} is not PEM: {e}")))?;
        let certs: Vec<_> = certs.iter().filter(|c| c.tag() == "CERTIFICATE").collect();
        if certs.is_empty() {
            return Err(err(
                "CLOUD_NATS_CA",
                format!("{v} holds no PEM CERTIFICATE"),
            ));
        }
        for c in certs {
            x509_parser::parse_x509_certificate(c.contents()).map_err(|e| {
                err(
                    "CLOUD_NATS_CA",
                    format!("{v} holds a CERTIFICATE that is not a valid X.509 certificate: {e}"),
                )
            })?;
        }
        n.ca = Some(PathBuf::from(v));
    }
    Ok(n)
}

/// Checks a realm's NATS URL list against the ways to authenticate: at most one of a
/// creds file, a token, user/password in the URLs.
pub fn check_target(
    key: &str,
    urls: &str,
    token: Option<&str>,
    n: &NatsSettings,
) -> Result<(), ConfigError> {
    let servers = parse_servers(urls).map_err(|e| err(key, e))?;
    let user_pass = user_pass(&servers).map_err(|e| err(key, e))?.is_some();
    let ways = [n.creds.is_some(), token.is_some(), user_pass]
        .iter()
        .filter(|b| **b)
        .count();
    if ways > 1 {
        return Err(err(
            key,
            "give one way to log in to NATS: CLOUD_NATS_CREDS, CLOUD_BRIDGE_TOKEN, or user:password in the URL",
        ));
    }
    Ok(())
}
