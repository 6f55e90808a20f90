//! The store CA: created once on first start (ECDSA P-256, CA with path length 0,
//! keyCertSign + cRLSign, name constraints limited to `.local`, `localhost` and the
//! private address ranges), kept under `<data>/ca/` with its key mode 0600 and
//! written atomically, and loaded on every later start, never re-created: devices
//! that trust it keep trusting the hub across restarts, updates and reboots.
//!
//! It signs the hub's leaf certificates (serverAuth, at most 397 days) and, in
//! tenant root mode, carries a chain up to the tenant's root.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    NameConstraints, PublicKeyData, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};

use crate::util::write_atomic;

/// Days a leaf is valid (Apple and browsers cap TLS leaves at 397 days).
pub const LEAF_DAYS: i64 = 396;
/// Renew the leaf this many days before it expires.
pub const RENEW_DAYS: i64 = 30;
/// Years the store CA is valid.
pub const CA_YEARS: i64 = 20;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(
        "cannot write {path}: {source} (is the data partition mounted read-write and not full?)"
    )]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is corrupt: {why}. The hub will not silently make a new CA (devices trust the old one): restore the file from a backup, or move {dir} aside to create a new CA and have every device trust it again")]
    Corrupt {
        path: PathBuf,
        dir: PathBuf,
        why: String,
    },
    #[error("only one of {present} and {missing} exists in {dir}; restore the missing file, or move the directory aside to create a new CA")]
    HalfMissing {
        present: String,
        missing: String,
        dir: PathBuf,
    },
    #[error("the store CA in {path} expired on {when}; move {dir} aside to create a new one, then have every device trust it again")]
    Expired {
        path: PathBuf,
        dir: PathBuf,
        when: String,
    },
    #[error("{path}: {why}")]
    BadChain { path: PathBuf, why: String },
    #[error("the leaf key cannot be used for TLS: {0}")]
    LeafKey(String),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// The names a leaf certificate must cover.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LeafNames {
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
}

impl LeafNames {
    /// `<hostname>.local`, `localhost`, loopback, and every address of the box
    /// that the CA's name constraints allow (others would make clients reject
    /// the whole certificate).
    pub fn current(extra: &[String]) -> Self {
        let mut dns = vec!["localhost".to_string()];
        if let Ok(h) = nix::unistd::gethostname() {
            let h = h.to_string_lossy().to_string();
            let h = h.split('.').next().unwrap_or("").to_string();
            if !h.is_empty() && h != "localhost" {
                dns.push(format!("{h}.local"));
            }
        }
        let mut ips: Vec<IpAddr> = vec![
            "127.0.0.1".parse().unwrap_or(IpAddr::from([127, 0, 0, 1])),
            IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]),
        ];
        if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
            for a in addrs {
                let Some(addr) = a.address else { continue };
                let ip = if let Some(v4) = addr.as_sockaddr_in() {
                    IpAddr::V4(v4.ip())
                } else if let Some(v6) = addr.as_sockaddr_in6() {
                    IpAddr::V6(v6.ip())
                } else {
                    continue;
                };
                if permitted_ip(&ip) && !ips.contains(&ip) {
                    ips.push(ip);
                }
            }
        }
        for e in extra {
            match e.parse::<IpAddr>() {
                Ok(ip) => {
                    if !ips.contains(&ip) {
                        ips.push(ip)
                    }
                }
                Err(_) => {
                    if !e.contains('/') && !dns.contains(e) {
                        dns.push(e.clone())
                    }
                }
            }
        }
        ips.sort();
        dns.sort();
        LeafNames { dns, ips }
    }
}

fn v4(a: [u8; 4], p: u8) -> CidrSubnet {
    CidrSubnet::from_v4_prefix(a, p)
}

/// The private ranges the CA may name: 10/8, 172.16/12, 192.168/16, 169.254/16,
/// 127/8, fd00::/8, fe80::/10, ::1.
pub fn permitted_ip(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v) => {
            let o = v.octets();
            o[0] == 10
                || (o[0] == 172 && (16..32).contains(&o[1]))
                || (o[0] == 192 && o[1] == 168)
                || (o[0] == 169 && o[1] == 254)
                || o[0] == 127
        }
        IpAddr::V6(v) => {
            let s = v.segments();
            v.is_loopback() || (s[0] & 0xff00) == 0xfd00 || (s[0] & 0xffc0) == 0xfe80
        }
    }
}

fn permitted_subtrees(extra: &[String]) -> Vec<GeneralSubtree> {
    let mut v = vec![
        GeneralSubtree::DnsName("local".into()),
        GeneralSubtree::DnsName("localhost".into()),
        GeneralSubtree::IpAddress(v4([10, 0, 0, 0], 8)),
        GeneralSubtree::IpAddress(v4([172, 16, 0, 0], 12)),
        GeneralSubtree::IpAddress(v4([192, 168, 0, 0], 16)),
        GeneralSubtree::IpAddress(v4([169, 254, 0, 0], 16)),
        GeneralSubtree::IpAddress(v4([127, 0, 0, 0], 8)),
        GeneralSubtree::IpAddress(CidrSubnet::from_v6_prefix(
            [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            8,
        )),
        GeneralSubtree::IpAddress(CidrSubnet::from_v6_prefix(
            [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            10,
        )),
        GeneralSubtree::IpAddress(CidrSubnet::from_v6_prefix(
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            128,
        )),
    ];
    for e in extra {
        if let Some((addr, p)) = e.split_once('/') {
            if let (Ok(a), Ok(p)) = (addr.parse::<IpAddr>(), p.parse::<u8>()) {
                v.push(GeneralSubtree::IpAddress(CidrSubnet::from_addr_prefix(
                    a, p,
                )));
                continue;
            }
        }
        match e.parse::<IpAddr>() {
            Ok(a) => v.push(GeneralSubtree::IpAddress(CidrSubnet::from_addr_prefix(
                a,
                if a.is_ipv4() { 32 } else { 128 },
            ))),
            Err(_) => v.push(GeneralSubtree::DnsName(e.clone())),
        }
    }
    v
}

fn offset(secs: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// SHA-256 of a certificate's DER as `AB:CD:...` (the form `openssl x509
/// -fingerprint -sha256` prints).
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The store CA, loaded.
pub struct StoreCa {
    dir: PathBuf,
    key: KeyPair,
    /// The self-signed store CA certificate (what `/ca.crt` serves).
    pub cert_pem: String,
    pub cert_der: CertificateDer<'static>,
    /// In tenant root mode: the store CA signed by the tenant, then the rest of the
    /// chain; served after the leaf.
    pub chain: Vec<CertificateDer<'static>>,
    pub not_after: i64,
}

const KEY_FILE: &str = "store-ca.key.pem";
const CERT_FILE: &str = "store-ca.crt.pem";
const CHAIN_FILE: &str = "chain.pem";

impl StoreCa {
    pub fn dir_in(data_dir: &Path) -> PathBuf {
        data_dir.join("ca")
    }

    /// Loads the CA from `<data>/ca/`, creating it only if neither file exists.
    pub fn load_or_create(
        data_dir: &Path,
        extra_names: &[String],
        now: i64,
    ) -> Result<Self, CaError> {
        let dir = Self::dir_in(data_dir);
        let (kp, cp) = (dir.join(KEY_FILE), dir.join(CERT_FILE));
        match (kp.exists(), cp.exists()) {
            (false, false) => Self::create(&dir, extra_names, now),
            (true, true) => Self::load(&dir, now),
            (k, _) => Err(CaError::HalfMissing {
                present: if k { KEY_FILE } else { CERT_FILE }.into(),
                missing: if k { CERT_FILE } else { KEY_FILE }.into(),
                dir,
            }),
        }
    }

    fn create(dir: &Path, extra: &[String], now: i64) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        let host = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().to_string())
            .unwrap_or_else(|_| "hub".into());
        dn.push(
            DnType::CommonName,
            format!("pos-hub store CA {host} {}", now),
        );
        dn.push(DnType::OrganizationName, "pos-hub");
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.name_constraints = Some(NameConstraints {
            permitted_subtrees: permitted_subtrees(extra),
            excluded_subtrees: vec![],
        });
        p.not_before = offset(now - 3600);
        p.not_after = offset(now + CA_YEARS * 365 * 86400);
        // RFC 5280's SHA-1 key identifier, as OpenSSL computes it (`hash`), so a
        // tenant root signing this CA's CSR gives it the same identifier and leaves'
        // authority key identifiers match both versions of the store CA.
        let ski = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, key.der_bytes());
        p.key_identifier_method = KeyIdMethod::PreSpecified(ski.as_ref().to_vec());
        let cert = p.self_signed(&key)?;
        let kp = dir.join(KEY_FILE);
        let cp = dir.join(CERT_FILE);
        // Key first: a cut between the two writes leaves a key without a cert,
        // which load_or_create reports instead of silently replacing.
        write_atomic(&kp, key.serialize_pem().as_bytes(), 0o600).map_err(|source| {
            CaError::Write {
                path: kp.clone(),
                source,
            }
        })?;
        write_atomic(&cp, cert.pem().as_bytes(), 0o644).map_err(|source| CaError::Write {
            path: cp.clone(),
            source,
        })?;
        tracing::info!(dir = %dir.display(), fingerprint = %fingerprint(cert.der()), "created the store CA");
        Self::load(dir, now)
    }

    fn load(dir: &Path, now: i64) -> Result<Self, CaError> {
        let (kp, cp) = (dir.join(KEY_FILE), dir.join(CERT_FILE));
        let corrupt = |path: &Path, why: String| CaError::Corrupt {
            path: path.to_path_buf(),
            dir: dir.to_path_buf(),
            why,
        };
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| CaError::Read {
                path: p.to_path_buf(),
                source,
            })
        };
        let key_pem = read(&kp)?;
        let cert_pem = read(&cp)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| corrupt(&kp, e.to_string()))?;
        let parsed = pem::parse(cert_pem.trim()).map_err(|e| corrupt(&cp, e.to_string()))?;
        let cert_der = CertificateDer::from(parsed.contents().to_vec());
        let (_, x) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| corrupt(&cp, e.to_string()))?;
        if x.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(corrupt(
                &cp,
                format!("the certificate does not match the key in {}", kp.display()),
            ));
        }
        let not_after = x.validity().not_after.timestamp();
        if not_after < now {
            return Err(CaError::Expired {
                path: cp,
                dir: dir.to_path_buf(),
                when: x.validity().not_after.to_string(),
            });
        }
        let chain_path = dir.join(CHAIN_FILE);
        let chain = if chain_path.exists() {
            let text = read(&chain_path)?;
            parse_chain(&text, &key, &chain_path)?
        } else {
            Vec::new()
        };
        Ok(StoreCa {
            dir: dir.to_path_buf(),
            key,
            cert_pem,
            cert_der: cert_der.clone().into_owned(),
            chain,
            not_after,
        })
    }

    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert_der)
    }

    /// Issues a leaf for `names`, valid from an hour ago for [`LEAF_DAYS`].
    /// Returns the chain to serve (leaf first) and the leaf's private key.
    pub fn issue_leaf(
        &self,
        names: &LeafNames,
        now: i64,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>, i64), CaError> {
        let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names
                .dns
                .first()
                .cloned()
                .unwrap_or_else(|| "pos-hub".into()),
        );
        p.distinguished_name = dn;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.use_authority_key_identifier_extension = true;
        for d in &names.dns {
            if let Ok(s) = d.clone().try_into() {
                p.subject_alt_names.push(SanType::DnsName(s));
            }
        }
        for ip in &names.ips {
            p.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        let not_after = now + LEAF_DAYS * 86400;
        p.not_before = offset(now - 3600);
        p.not_after = offset(not_after);
        let issuer = Issuer::from_ca_cert_der(&self.cert_der, &self.key)?;
        let leaf = p.signed_by(&leaf_key, &issuer)?;
        let mut chain = vec![leaf.der().clone()];
        chain.extend(self.chain.iter().cloned());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        Ok((chain, key, not_after))
    }

    /// A CSR for the store CA (same key and subject) for the tenant root to sign.
    pub fn csr_pem(&self) -> Result<String, CaError> {
        let (_, x) =
            x509_parser::parse_x509_certificate(&self.cert_der).map_err(|e| CaError::Corrupt {
                path: self.dir.join(CERT_FILE),
                dir: self.dir.clone(),
                why: e.to_string(),
            })?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        for cn in x
            .subject()
            .iter_common_name()
            .filter_map(|a| a.as_str().ok())
        {
            dn.push(DnType::CommonName, cn);
        }
        for o in x
            .subject()
            .iter_organization()
            .filter_map(|a| a.as_str().ok())
        {
            dn.push(DnType::OrganizationName, o);
        }
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Ok(p.serialize_request(&self.key)?.pem()?)
    }

    /// Installs a chain from the tenant root: the first certificate must be the
    /// store CA (same key) signed by the tenant; the rest follow up to the root.
    pub fn install_chain(&mut self, chain_pem: &str, source: &Path) -> Result<(), CaError> {
        let chain = parse_chain(chain_pem, &self.key, source)?;
        let path = self.dir.join(CHAIN_FILE);
        write_atomic(&path, chain_pem.as_bytes(), 0o644)
            .map_err(|source| CaError::Write { path, source })?;
        self.chain = chain;
        Ok(())
    }
}

fn parse_chain(
    text: &str,
    key: &KeyPair,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let bad = |why: String| CaError::BadChain {
        path: path.to_path_buf(),
        why,
    };
    let pems = pem::parse_many(text).map_err(|e| bad(format!("not PEM: {e}")))?;
    let certs: Vec<CertificateDer<'static>> = pems
        .iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| CertificateDer::from(p.contents().to_vec()))
        .collect();
    let first = certs
        .first()
        .ok_or_else(|| bad("no CERTIFICATE blocks found".into()))?;
    let (_, x) = x509_parser::parse_x509_certificate(first)
        .map_err(|e| bad(format!("first certificate: {e}")))?;
    if x.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(bad(
            "the first certificate is not for this hub's store CA key (sign the CSR from `pos-hub ca csr` of this box)".into(),
        ));
    }
    if !x.is_ca() {
        return Err(bad(
            "the first certificate is not a CA certificate (basicConstraints CA:TRUE needed)"
                .into(),
        ));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let now = crate::util::now_secs();
        let a = StoreCa::load_or_create(dir.path(), &[], now).unwrap();
        let b = StoreCa::load_or_create(dir.path(), &[], now).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("ca").join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (chain, _key, exp) = a.issue_leaf(&LeafNames::current(&[]), now).unwrap();
        assert_eq!(chain.len(), 1);
        assert!(exp - now <= 397 * 86400);
        let (_, x) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        let (_, ca) = x509_parser::parse_x509_certificate(&a.cert_der).unwrap();
        assert_eq!(x.issuer(), ca.subject());
        assert!(x.verify_signature(Some(ca.public_key())).is_ok());
    }

    #[test]
    fn corrupt_or_half_missing_is_refused_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let now = crate::util::now_secs();
        StoreCa::load_or_create(dir.path(), &[], now).unwrap();
        let cp = dir.path().join("ca").join(CERT_FILE);
        std::fs::write(&cp, "garbage").unwrap();
        let e = StoreCa::load_or_create(dir.path(), &[], now)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("corrupt") && e.contains("store-ca.crt.pem"),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(&cp).unwrap(), "garbage");
        std::fs::remove_file(&cp).unwrap();
        assert!(matches!(
            StoreCa::load_or_create(dir.path(), &[], now),
            Err(CaError::HalfMissing { .. })
        ));
    }

    #[test]
    fn expired_ca_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let now = crate::util::now_secs();
        StoreCa::load_or_create(dir.path(), &[], now).unwrap();
        let later = now + (CA_YEARS + 1) * 365 * 86400;
        assert!(matches!(
            StoreCa::load_or_create(dir.path(), &[], later),
            Err(CaError::Expired { .. })
        ));
    }

    #[test]
    fn chain_for_another_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let now = crate::util::now_secs();
        let mut a = StoreCa::load_or_create(dir.path(), &[], now).unwrap();
        let b = StoreCa::load_or_create(other.path(), &[], now).unwrap();
        let e = a
            .install_chain(&b.cert_pem, Path::new("chain.pem"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not for this hub"), "{e}");
        assert!(a.csr_pem().unwrap().contains("CERTIFICATE REQUEST"));
    }

    #[test]
    fn private_ranges() {
        for ok in [
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.0.1",
            "127.0.0.1",
            "::1",
            "fd12::1",
            "fe80::1",
        ] {
            assert!(permitted_ip(&ok.parse().unwrap()), "{ok}");
        }
        for bad in ["8.8.8.8", "172.32.0.1", "2001:db8::1"] {
            assert!(!permitted_ip(&bad.parse().unwrap()), "{bad}");
        }
    }
}
