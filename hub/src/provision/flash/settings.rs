//! The store's settings from the flags, checked before anything is opened (realm, key,
//! cloud URL and token, update channel, static network), and the `hub.env` text they
//! become: the image's own comment header, a note saying who wrote it, then the keys.

use std::net::Ipv4Addr;

use base64::Engine as _;

use super::{FlashArgs, FlashError};

/// The hub's port, written to every `hub.env`.
pub const PORT: u16 = 4001;

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

/// The header of a `hub.env` for an image whose own file has no comment lines.
pub(super) const DEFAULT_HEADER: &str =
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

    #[test]
    fn masks() {
        assert_eq!(prefix_mask(24), 0xffff_ff00);
        assert_eq!(prefix_mask(32), u32::MAX);
    }
}
