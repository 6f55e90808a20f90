//! Helpers shared by the targets: a fixed clock, one Ed25519 key pair made at start
//! (so inputs can carry valid signatures and reach the checks behind them), JWT
//! assembly.

use std::sync::OnceLock;

use base64::Engine as _;
use pos_hub::auth::keys::VerifyKey;
use pos_hub::auth::KeySet;

/// The hub's clock in the targets (2026-12-01).
pub const NOW: i64 = 1_796_083_200;

pub const B64URL: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;
pub const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

pub struct Keys {
    pub pair: ring::signature::Ed25519KeyPair,
    /// The private key, PKCS#8 DER.
    pub pkcs8: Vec<u8>,
    /// The public key in PEM (SPKI).
    pub public_pem: String,
    pub raw_public: Vec<u8>,
    pub set: KeySet,
}

pub fn keys() -> &'static Keys {
    static K: OnceLock<Keys> = OnceLock::new();
    K.get_or_init(|| {
        use ring::signature::KeyPair;
        let (private, public) = pos_hub::auth::keys::generate_ed25519().expect("key pair");
        let der = pem::parse(private.trim()).expect("private pem");
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der.contents())
            .expect("pkcs8");
        let raw_public = pair.public_key().as_ref().to_vec();
        let set = KeySet::single(VerifyKey::from_pem(&public, None).expect("public pem"));
        Keys {
            pair,
            pkcs8: der.contents().to_vec(),
            public_pem: public,
            raw_public,
            set,
        }
    })
}

/// `header.claims.signature`, signed with [`keys`] over the exact bytes given.
pub fn sign_jwt(header: &[u8], claims: &[u8]) -> String {
    let input = format!("{}.{}", B64URL.encode(header), B64URL.encode(claims));
    let sig = keys().pair.sign(input.as_bytes());
    format!("{input}.{}", B64URL.encode(sig.as_ref()))
}

/// Splits fuzz bytes into `n` parts at 0xFF bytes (missing parts are empty).
pub fn split(data: &[u8], n: usize) -> Vec<&[u8]> {
    let mut out: Vec<&[u8]> = data.splitn(n, |b| *b == 0xFF).collect();
    while out.len() < n {
        out.push(&[]);
    }
    out
}

/// The bytes as text, or `None` when they are not UTF-8 (most parsers take `&str`).
pub fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

/// Parses `s` as any JSON value, panicking with `what` when it is not JSON.
pub fn json(s: &str, what: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{what} is not valid JSON ({e}): {s:?}"))
}

/// An input the hub accepted, as a `serde_json::Value` to compare against, or `None`
/// when `Value` refuses it only for what serde_json skips without checking in fields
/// the hub ignores (a number beyond a double, an unpaired `\u` surrogate): the hub
/// reads its known fields strictly, so such input is fine. Any other refusal of
/// accepted input panics.
pub fn accepted_json(s: &[u8], what: &str) -> Option<serde_json::Value> {
    match serde_json::from_slice(s) {
        Ok(v) => Some(v),
        Err(e) => {
            let m = e.to_string();
            let lenient = [
                "number out of range",
                "hex escape",
                "unicode code point",
                "surrogate",
            ];
            // serde_json's private RawValue marker as an object key: `Value` cannot hold
            // it and fails with one of several messages ("expected raw value", "expected
            // ident", ...); the hub refuses an event carrying it (`strict_json`).
            let marker = String::from_utf8_lossy(s).contains("$serde_json::private::RawValue");
            assert!(
                marker || lenient.iter().any(|l| m.contains(l)),
                "accepted {what} is not JSON ({m}): {:?}",
                String::from_utf8_lossy(s)
            );
            None
        }
    }
}

/// A scratch path of this process for `name` (the `power_supply` and `realms` targets):
/// under /dev/shm when there is one (memory: libFuzzer writes it thousands of times a
/// second), else the temp dir. Not created here.
pub fn scratch_path(name: &str) -> std::path::PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        std::path::PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    base.join(format!("pos-hub-fuzz-{name}-{}", std::process::id()))
}
