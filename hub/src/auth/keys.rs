//! Verification keys (PEM or JWKS, several by `kid` for rotation) and signing keys
//! (for `pos-hub token mint` and the dev realm). The algorithm is derived from the
//! key material: Ed25519 -> EdDSA, EC P-256 -> ES256, RSA -> RS256.

use std::path::Path;

use jsonwebtoken::{jwk::JwkSet, Algorithm, DecodingKey, EncodingKey};

/// A key could not be loaded; the message says which and what to do.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("not a PEM key ({0}); expected '-----BEGIN PUBLIC KEY-----' (SPKI) or a private key in PKCS#8 PEM")]
    NotPem(String),
    #[error("unsupported key type: {0}; use Ed25519 (EdDSA), EC P-256 (ES256) or RSA (RS256)")]
    Unsupported(String),
    #[error("invalid key: {0}")]
    Invalid(String),
    #[error("invalid JWKS: {0}")]
    Jwks(String),
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
}

const OID_ED25519: &[u8] = &[0x06, 0x03, 0x2B, 0x65, 0x70];
const OID_EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x02, 0x01];
const OID_P256: &[u8] = &[0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07];
const OID_RSA: &[u8] = &[
    0x06, 0x09, 0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x01,
];

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Detects the JWT algorithm from the AlgorithmIdentifier at the start of an SPKI or
/// PKCS#8 structure.
fn detect_alg(der: &[u8]) -> Result<Algorithm, KeyError> {
    let head = &der[..der.len().min(48)];
    if contains(head, OID_ED25519) {
        Ok(Algorithm::EdDSA)
    } else if contains(head, OID_EC_PUBLIC_KEY) {
        if contains(head, OID_P256) {
            Ok(Algorithm::ES256)
        } else {
            Err(KeyError::Unsupported(
                "EC key on a curve other than P-256".into(),
            ))
        }
    } else if contains(head, OID_RSA) {
        Ok(Algorithm::RS256)
    } else {
        Err(KeyError::Unsupported("unknown algorithm identifier".into()))
    }
}

/// One key that can verify tokens.
pub struct VerifyKey {
    pub kid: Option<String>,
    pub alg: Algorithm,
    pub(crate) key: DecodingKey,
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish()
    }
}

impl VerifyKey {
    /// Parses a public key in PEM: SPKI (`PUBLIC KEY`) or PKCS#1 (`RSA PUBLIC KEY`).
    pub fn from_pem(pem_text: &str, kid: Option<String>) -> Result<Self, KeyError> {
        let p = pem::parse(pem_text.trim()).map_err(|e| KeyError::NotPem(e.to_string()))?;
        let (alg, key) = match p.tag() {
            "PUBLIC KEY" => {
                let alg = detect_alg(p.contents())?;
                let bytes = pem_text.trim().as_bytes();
                let key = match alg {
                    Algorithm::EdDSA => DecodingKey::from_ed_pem(bytes),
                    Algorithm::ES256 => DecodingKey::from_ec_pem(bytes),
                    _ => DecodingKey::from_rsa_pem(bytes),
                }
                .map_err(|e| KeyError::Invalid(e.to_string()))?;
                (alg, key)
            }
            "RSA PUBLIC KEY" => (
                Algorithm::RS256,
                DecodingKey::from_rsa_pem(pem_text.trim().as_bytes())
                    .map_err(|e| KeyError::Invalid(e.to_string()))?,
            ),
            other if other.contains("PRIVATE") => return Err(KeyError::Invalid(
                "this is a PRIVATE key; the hub needs only the PUBLIC half (openssl pkey -pubout)"
                    .into(),
            )),
            other => return Err(KeyError::NotPem(format!("PEM label '{other}'"))),
        };
        Ok(Self { kid, alg, key })
    }
}

/// The keys a realm accepts tokens from.
#[derive(Debug)]
pub struct KeySet {
    pub(crate) keys: Vec<VerifyKey>,
}

impl KeySet {
    pub fn single(key: VerifyKey) -> Self {
        Self { keys: vec![key] }
    }

    /// Loads a JWKS document (`{"keys":[...]}`); every key needs a `kid`.
    pub fn from_jwks(json: &str) -> Result<Self, KeyError> {
        let set: JwkSet = serde_json::from_str(json).map_err(|e| KeyError::Jwks(e.to_string()))?;
        let mut keys = Vec::new();
        for jwk in &set.keys {
            let kid = jwk.common.key_id.clone();
            let alg = match &jwk.algorithm {
                jsonwebtoken::jwk::AlgorithmParameters::OctetKeyPair(p) => {
                    if p.curve != jsonwebtoken::jwk::EllipticCurve::Ed25519 {
                        return Err(KeyError::Unsupported(format!(
                            "JWKS key {kid:?}: OKP curve other than Ed25519"
                        )));
                    }
                    Algorithm::EdDSA
                }
                jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(p) => {
                    if p.curve != jsonwebtoken::jwk::EllipticCurve::P256 {
                        return Err(KeyError::Unsupported(format!(
                            "JWKS key {kid:?}: EC curve other than P-256"
                        )));
                    }
                    Algorithm::ES256
                }
                jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
                jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_) => {
                    return Err(KeyError::Unsupported(format!(
                        "JWKS key {kid:?} is a shared secret; the hub accepts only public keys"
                    )))
                }
            };
            let key = DecodingKey::from_jwk(jwk)
                .map_err(|e| KeyError::Jwks(format!("key {kid:?}: {e}")))?;
            keys.push(VerifyKey { kid, alg, key });
        }
        if keys.is_empty() {
            return Err(KeyError::Jwks("the key set is empty".into()));
        }
        Ok(Self { keys })
    }

    pub fn from_jwks_file(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_jwks(&text)
    }

    pub fn keys(&self) -> &[VerifyKey] {
        &self.keys
    }
}

/// A private key that signs tokens (`pos-hub token mint`, the dev realm).
pub struct SigningKey {
    pub alg: Algorithm,
    pub(crate) key: EncodingKey,
}

impl SigningKey {
    /// Parses a private key in PEM: PKCS#8 (`PRIVATE KEY`) for all three algorithms,
    /// or PKCS#1 (`RSA PRIVATE KEY`).
    pub fn from_pem(pem_text: &str) -> Result<Self, KeyError> {
        let p = pem::parse(pem_text.trim()).map_err(|e| KeyError::NotPem(e.to_string()))?;
        let bytes = pem_text.trim().as_bytes();
        let invalid = |e: jsonwebtoken::errors::Error| KeyError::Invalid(e.to_string());
        match p.tag() {
            "PRIVATE KEY" => {
                let alg = detect_alg(p.contents())?;
                if alg == Algorithm::EdDSA {
                    // PKCS#8 v1 (OpenSSL's form) or v2 (ring's, with the public key).
                    ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(p.contents())
                        .map_err(|e| {
                            KeyError::Invalid(format!("not a usable Ed25519 PKCS#8 key: {e}"))
                        })?;
                }
                let key = match alg {
                    Algorithm::EdDSA => EncodingKey::from_ed_pem(bytes),
                    Algorithm::ES256 => EncodingKey::from_ec_pem(bytes),
                    _ => EncodingKey::from_rsa_pem(bytes),
                }
                .map_err(invalid)?;
                Ok(Self { alg, key })
            }
            "RSA PRIVATE KEY" => Ok(Self {
                alg: Algorithm::RS256,
                key: EncodingKey::from_rsa_pem(bytes).map_err(invalid)?,
            }),
            "EC PRIVATE KEY" => Err(KeyError::Invalid(
                "SEC1 EC key; convert it to PKCS#8: openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY8".into(),
            )),
            other => Err(KeyError::NotPem(format!("PEM label '{other}'"))),
        }
    }

    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_pem(&text)
    }
}

/// The fixed start of a PKCS#8 v1 (RFC 8410) Ed25519 private key; the 32-byte seed follows.
const ED25519_PKCS8_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// Generates an Ed25519 key pair: (private PKCS#8 PEM, public SPKI PEM).
///
/// The private key is written in the 48-byte PKCS#8 v1 form (RFC 8410), the one
/// OpenSSL 3.0, Node's crypto and python-cryptography read; ring's own generator
/// writes v2 (with the public key attached), which those tools refuse. Reading
/// accepts both (`SigningKey::from_pem`).
pub fn generate_ed25519() -> Result<(String, String), KeyError> {
    use ring::rand::SecureRandom;
    use ring::signature::KeyPair;
    let rng = ring::rand::SystemRandom::new();
    let mut seed = [0u8; 32];
    rng.fill(&mut seed)
        .map_err(|_| KeyError::Invalid("the system random generator failed".into()))?;
    let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(&seed)
        .map_err(|e| KeyError::Invalid(e.to_string()))?;
    let mut pkcs8 = ED25519_PKCS8_V1_PREFIX.to_vec();
    pkcs8.extend_from_slice(&seed);
    let mut spki = vec![
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
    ];
    spki.extend_from_slice(pair.public_key().as_ref());
    let private = pem::encode(&pem::Pem::new("PRIVATE KEY", pkcs8));
    let public = pem::encode(&pem::Pem::new("PUBLIC KEY", spki));
    Ok((private, public))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ed25519_round_trips() {
        let (private, public) = generate_ed25519().unwrap();
        assert_eq!(
            SigningKey::from_pem(&private).unwrap().alg,
            Algorithm::EdDSA
        );
        assert_eq!(
            VerifyKey::from_pem(&public, None).unwrap().alg,
            Algorithm::EdDSA
        );
    }

    /// The dev key is written as PKCS#8 v1 (48 bytes, what OpenSSL 3.0 writes for
    /// `genpkey -algorithm ed25519`), and both v1 and ring's v2 are read and sign tokens
    /// the matching public key verifies.
    #[test]
    fn ed25519_private_key_is_pkcs8_v1_and_both_versions_are_read() {
        use ring::signature::KeyPair;
        let (private, public) = generate_ed25519().unwrap();
        let der = pem::parse(private.trim()).unwrap().into_contents();
        assert_eq!(der.len(), 48, "PKCS#8 v1 Ed25519 is 48 bytes");
        assert_eq!(der[..16], ED25519_PKCS8_V1_PREFIX);
        // The SPKI's key is the one the seed derives.
        let spki = pem::parse(public.trim()).unwrap().into_contents();
        let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(&der[16..]).unwrap();
        assert_eq!(&spki[12..], pair.public_key().as_ref());

        // A v2 key as ring generates it (and as earlier `serve --dev` wrote it).
        let rng = ring::rand::SystemRandom::new();
        let v2 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        assert_ne!(v2.as_ref().len(), 48);
        let v2_pem = pem::encode(&pem::Pem::new("PRIVATE KEY", v2.as_ref().to_vec()));
        let v2_pair = ring::signature::Ed25519KeyPair::from_pkcs8(v2.as_ref()).unwrap();
        let mut v2_spki = spki[..12].to_vec();
        v2_spki.extend_from_slice(v2_pair.public_key().as_ref());
        let v2_public = pem::encode(&pem::Pem::new("PUBLIC KEY", v2_spki));

        for (private, public) in [(private, public), (v2_pem, v2_public)] {
            let sk = SigningKey::from_pem(&private).unwrap();
            assert_eq!(sk.alg, Algorithm::EdDSA);
            let token = jsonwebtoken::encode(
                &jsonwebtoken::Header::new(Algorithm::EdDSA),
                &serde_json::json!({"sub": "x"}),
                &sk.key,
            )
            .unwrap();
            let vk = VerifyKey::from_pem(&public, None).unwrap();
            let mut v = jsonwebtoken::Validation::new(Algorithm::EdDSA);
            v.required_spec_claims.clear();
            v.validate_exp = false;
            jsonwebtoken::decode::<serde_json::Value>(&token, &vk.key, &v).unwrap();
        }
    }

    #[test]
    fn truncated_ed25519_private_key_is_refused_at_load() {
        let mut der = ED25519_PKCS8_V1_PREFIX.to_vec();
        der.extend_from_slice(&[7u8; 16]); // half a seed
        let text = pem::encode(&pem::Pem::new("PRIVATE KEY", der));
        assert!(matches!(
            SigningKey::from_pem(&text),
            Err(KeyError::Invalid(_))
        ));
    }

    #[test]
    fn private_key_given_as_public_is_refused_clearly() {
        let (private, _) = generate_ed25519().unwrap();
        let err = VerifyKey::from_pem(&private, None).unwrap_err().to_string();
        assert!(err.contains("PUBLIC half"), "{err}");
    }

    #[test]
    fn garbage_is_not_pem() {
        assert!(matches!(
            VerifyKey::from_pem("hello", None),
            Err(KeyError::NotPem(_))
        ));
    }

    /// Found while writing fuzz/ (jwks): an OKP key on another curve was taken as
    /// an Ed25519 key.
    #[test]
    fn okp_keys_must_be_ed25519() {
        let doc = r#"{"keys":[{"kty":"OKP","crv":"P-256","kid":"k","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#;
        assert!(matches!(
            KeySet::from_jwks(doc),
            Err(KeyError::Unsupported(_))
        ));
        let ok = r#"{"keys":[{"kty":"OKP","crv":"Ed25519","kid":"k","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#;
        assert!(KeySet::from_jwks(ok).is_ok());
    }
}
