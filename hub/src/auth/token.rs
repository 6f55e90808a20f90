//! Claims, verification with stable error codes, minting.
//!
//! Time checks (`exp`, `nbf`) are done here rather than by jsonwebtoken so the hub
//! can tell "expired by 3 h" (offline grace may still admit the device) from
//! "bad signature", and so they run against the hub's own view of the clock.

use jsonwebtoken::{decode, decode_header, encode, Header, Validation};
use serde::{Deserialize, Serialize};

use super::keys::{KeySet, SigningKey};

/// Why a token was refused. `code()` is the stable string sent to devices.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("no token in the handshake auth ({{token}})")]
    MissingToken,
    #[error("the token is not a well-formed JWT")]
    Malformed,
    #[error("the token names a key id the hub does not know")]
    UnknownKey,
    #[error("the token's signature does not verify against the realm's key")]
    BadSignature,
    #[error("the token is missing required claims: {0}")]
    MissingClaims(String),
    #[error("the token expired {0} s ago")]
    Expired(i64),
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token is for another realm")]
    WrongRealm,
    #[error("the token's issuer is not accepted")]
    BadIssuer,
    #[error("the token's audience is not accepted")]
    BadAudience,
}

impl TokenError {
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::MissingToken => "missing_token",
            TokenError::Malformed => "malformed_token",
            TokenError::UnknownKey => "unknown_key",
            TokenError::BadSignature => "bad_signature",
            TokenError::MissingClaims(_) => "missing_claims",
            TokenError::Expired(_) => "expired",
            TokenError::NotYetValid => "not_yet_valid",
            TokenError::WrongRealm => "wrong_realm",
            TokenError::BadIssuer => "bad_issuer",
            TokenError::BadAudience => "bad_audience",
        }
    }
}

/// The claims of a cluster token as they arrive (everything optional, so a missing
/// claim is reported as `missing_claims` rather than a parse error).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawClaims {
    tenant_id: Option<String>,
    store_id: Option<String>,
    device_id: Option<String>,
    role: Option<String>,
    exp: Option<i64>,
    iat: Option<i64>,
    nbf: Option<i64>,
    iss: Option<String>,
    aud: Option<Audience>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

/// Verified claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Claims {
    pub tenant_id: String,
    pub store_id: String,
    pub device_id: String,
    pub role: String,
    pub exp: i64,
    pub iat: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

/// What a realm requires of a token beyond a good signature.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// Tolerance for clock differences on `exp`, `nbf` and `iat`, in seconds.
    pub leeway_secs: i64,
}

/// A token whose signature and claims check out. `expired_by` is set when only its
/// `exp` lies in the past (the caller decides whether offline grace applies).
#[derive(Debug, Clone)]
pub struct Verified {
    pub claims: Claims,
    pub expired_by: Option<i64>,
}

/// Verifies `token` against `keys`: signature, required claims, issuer and audience,
/// `nbf`. Expiry is reported in [`Verified::expired_by`], not as an error.
pub fn verify(
    keys: &KeySet,
    token: &str,
    now: i64,
    policy: &Policy,
) -> Result<Verified, TokenError> {
    if token.is_empty() {
        return Err(TokenError::MissingToken);
    }
    let header = decode_header(token).map_err(|_| TokenError::Malformed)?;
    let candidates: Vec<_> = match &header.kid {
        Some(kid) => keys
            .keys()
            .iter()
            .filter(|k| {
                k.kid.as_deref() == Some(kid.as_str())
                    || (k.kid.is_none() && keys.keys().len() == 1)
            })
            .collect(),
        None => keys.keys().iter().collect(),
    };
    if candidates.is_empty() {
        return Err(TokenError::UnknownKey);
    }
    let mut last = TokenError::BadSignature;
    for key in candidates {
        // The algorithm comes from the key. A token whose header names another
        // algorithm fails here as a bad signature, whatever it claims.
        let mut v = Validation::new(key.alg);
        v.validate_exp = false;
        v.validate_nbf = false;
        v.validate_aud = false;
        v.required_spec_claims.clear();
        match decode::<RawClaims>(token, &key.key, &v) {
            Ok(data) => return check_claims(data.claims, now, policy),
            Err(e) => {
                use jsonwebtoken::errors::ErrorKind as K;
                last = match e.kind() {
                    K::InvalidSignature
                    | K::InvalidAlgorithm
                    | K::InvalidEcdsaKey
                    | K::InvalidRsaKey(_) => TokenError::BadSignature,
                    K::Json(_) => TokenError::MissingClaims(
                        "claims are not a JSON object of the expected shape".into(),
                    ),
                    _ => TokenError::Malformed,
                };
                if last != TokenError::BadSignature {
                    return Err(last);
                }
            }
        }
    }
    Err(last)
}

fn check_claims(raw: RawClaims, now: i64, policy: &Policy) -> Result<Verified, TokenError> {
    let mut missing = Vec::new();
    let nonempty = |v: &Option<String>| v.as_deref().is_some_and(|s| !s.is_empty());
    if !nonempty(&raw.tenant_id) {
        missing.push("tenantId");
    }
    if !nonempty(&raw.store_id) {
        missing.push("storeId");
    }
    if !nonempty(&raw.device_id) {
        missing.push("deviceId");
    }
    if !nonempty(&raw.role) {
        missing.push("role");
    }
    if raw.exp.is_none() {
        missing.push("exp");
    }
    if raw.iat.is_none() {
        missing.push("iat");
    }
    if policy.issuer.is_some() && raw.iss.is_none() {
        missing.push("iss");
    }
    if policy.audience.is_some() && raw.aud.is_none() {
        missing.push("aud");
    }
    if !missing.is_empty() {
        return Err(TokenError::MissingClaims(missing.join(", ")));
    }
    if let Some(want) = &policy.issuer {
        if raw.iss.as_deref() != Some(want.as_str()) {
            return Err(TokenError::BadIssuer);
        }
    }
    let aud = match raw.aud {
        Some(Audience::One(a)) => Some(vec![a]),
        Some(Audience::Many(v)) => Some(v),
        None => None,
    };
    if let Some(want) = &policy.audience {
        if !aud.as_ref().is_some_and(|v| v.iter().any(|a| a == want)) {
            return Err(TokenError::BadAudience);
        }
    }
    let (exp, iat) = (raw.exp.unwrap_or_default(), raw.iat.unwrap_or_default());
    // Saturating: exp and nbf are whatever the token says (i64::MAX is "never").
    if let Some(nbf) = raw.nbf {
        if nbf > now.saturating_add(policy.leeway_secs) {
            return Err(TokenError::NotYetValid);
        }
    }
    let expired_by =
        (exp.saturating_add(policy.leeway_secs) < now).then_some(now.saturating_sub(exp));
    Ok(Verified {
        claims: Claims {
            tenant_id: raw.tenant_id.unwrap_or_default(),
            store_id: raw.store_id.unwrap_or_default(),
            device_id: raw.device_id.unwrap_or_default(),
            role: raw.role.unwrap_or_default(),
            exp,
            iat,
            nbf: raw.nbf,
            iss: raw.iss,
            aud: aud.and_then(|v| v.into_iter().next()),
        },
        expired_by,
    })
}

/// Reads the realm a token claims to be for, WITHOUT checking it, so the hub can
/// pick the realm whose keys then verify it.
pub fn peek_realm(token: &str) -> Result<(String, String), TokenError> {
    use base64::Engine as _;
    let mut parts = token.split('.');
    let (Some(_), Some(body), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(body.trim_end_matches('='))
        .map_err(|_| TokenError::Malformed)?;
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Realm {
        tenant_id: Option<String>,
        store_id: Option<String>,
    }
    let r: Realm = serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed)?;
    match (r.tenant_id, r.store_id) {
        (Some(t), Some(s)) => Ok((t, s)),
        (None, _) => Err(TokenError::MissingClaims("tenantId".into())),
        (_, None) => Err(TokenError::MissingClaims("storeId".into())),
    }
}

/// Signs `claims` with `key` (header `alg` from the key, optional `kid`).
pub fn mint(key: &SigningKey, claims: &Claims, kid: Option<String>) -> Result<String, String> {
    let mut header = Header::new(key.alg);
    header.kid = kid;
    encode(&header, claims, &key.key).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::keys::{generate_ed25519, VerifyKey};

    fn pair() -> (SigningKey, KeySet) {
        let (private, public) = generate_ed25519().unwrap();
        (
            SigningKey::from_pem(&private).unwrap(),
            KeySet::single(VerifyKey::from_pem(&public, None).unwrap()),
        )
    }

    fn claims(exp: i64) -> Claims {
        Claims {
            tenant_id: "t".into(),
            store_id: "s".into(),
            device_id: "d".into(),
            role: "till".into(),
            exp,
            iat: 1000,
            nbf: None,
            iss: None,
            aud: None,
        }
    }

    #[test]
    fn good_token_verifies() {
        let (sk, keys) = pair();
        let t = mint(&sk, &claims(5000), None).unwrap();
        let v = verify(&keys, &t, 2000, &Policy::default()).unwrap();
        assert_eq!(v.claims.device_id, "d");
        assert_eq!(v.expired_by, None);
    }

    #[test]
    fn expired_token_reports_how_long_ago() {
        let (sk, keys) = pair();
        let t = mint(&sk, &claims(5000), None).unwrap();
        let v = verify(&keys, &t, 5100, &Policy::default()).unwrap();
        assert_eq!(v.expired_by, Some(100));
    }

    #[test]
    fn other_key_is_bad_signature() {
        let (sk, _) = pair();
        let (_, other) = pair();
        let t = mint(&sk, &claims(5000), None).unwrap();
        assert_eq!(
            verify(&other, &t, 2000, &Policy::default()).unwrap_err(),
            TokenError::BadSignature
        );
    }

    #[test]
    fn algorithm_none_and_hs256_are_refused() {
        let (_, keys) = pair();
        // alg=none token with the right claims.
        let body = base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            serde_json::to_vec(&claims(5000)).unwrap(),
        );
        let none = format!("eyJhbGciOiJub25lIn0.{body}.");
        assert!(verify(&keys, &none, 2000, &Policy::default()).is_err());
        let hs = encode(
            &Header::new(jsonwebtoken::Algorithm::HS256),
            &claims(5000),
            &jsonwebtoken::EncodingKey::from_secret(b"secret"),
        )
        .unwrap();
        assert_eq!(
            verify(&keys, &hs, 2000, &Policy::default()).unwrap_err(),
            TokenError::BadSignature
        );
    }

    #[test]
    fn missing_claims_are_named() {
        let (sk, keys) = pair();
        #[derive(Serialize)]
        struct Partial {
            exp: i64,
        }
        let t = encode(&Header::new(sk.alg), &Partial { exp: 5000 }, &sk.key).unwrap();
        match verify(&keys, &t, 2000, &Policy::default()).unwrap_err() {
            TokenError::MissingClaims(m) => {
                assert!(m.contains("tenantId") && m.contains("iat"), "{m}")
            }
            e => panic!("unexpected {e:?}"),
        }
    }

    #[test]
    fn nbf_in_future_and_garbage() {
        let (sk, keys) = pair();
        let mut c = claims(9000);
        c.nbf = Some(3000);
        let t = mint(&sk, &c, None).unwrap();
        assert_eq!(
            verify(&keys, &t, 2000, &Policy::default()).unwrap_err(),
            TokenError::NotYetValid
        );
        assert_eq!(
            verify(&keys, "not.a.jwt", 2000, &Policy::default()).unwrap_err(),
            TokenError::Malformed
        );
        assert_eq!(
            verify(&keys, "", 2000, &Policy::default()).unwrap_err(),
            TokenError::MissingToken
        );
    }

    #[test]
    fn issuer_and_audience_required_when_configured() {
        let (sk, keys) = pair();
        let policy = Policy {
            issuer: Some("cloud".into()),
            audience: Some("hub".into()),
            leeway_secs: 0,
        };
        let t = mint(&sk, &claims(5000), None).unwrap();
        assert!(matches!(
            verify(&keys, &t, 2000, &policy).unwrap_err(),
            TokenError::MissingClaims(_)
        ));
        let mut c = claims(5000);
        c.iss = Some("cloud".into());
        c.aud = Some("other".into());
        let t = mint(&sk, &c, None).unwrap();
        assert_eq!(
            verify(&keys, &t, 2000, &policy).unwrap_err(),
            TokenError::BadAudience
        );
    }

    #[test]
    fn kid_selects_key() {
        let (sk1, _) = pair();
        let (_, public2) = generate_ed25519().unwrap();
        let (private1, public1) = generate_ed25519().unwrap();
        let _ = sk1;
        let sk = SigningKey::from_pem(&private1).unwrap();
        let keys = KeySet {
            keys: vec![
                VerifyKey::from_pem(&public2, Some("k2".into())).unwrap(),
                VerifyKey::from_pem(&public1, Some("k1".into())).unwrap(),
            ],
        };
        let t = mint(&sk, &claims(5000), Some("k1".into())).unwrap();
        assert!(verify(&keys, &t, 2000, &Policy::default()).is_ok());
        let t = mint(&sk, &claims(5000), Some("k9".into())).unwrap();
        assert_eq!(
            verify(&keys, &t, 2000, &Policy::default()).unwrap_err(),
            TokenError::UnknownKey
        );
    }

    /// Found by fuzz/ (token): `exp + leeway` overflowed for a far-future `exp`
    /// (a panic with overflow checks, "expired" otherwise), as did `now - exp`.
    #[test]
    fn extreme_times_do_not_overflow() {
        let (sk, keys) = pair();
        let p = Policy {
            leeway_secs: 60,
            ..Default::default()
        };
        let t = mint(&sk, &claims(i64::MAX), None).unwrap();
        assert_eq!(verify(&keys, &t, 2000, &p).unwrap().expired_by, None);
        let t = mint(&sk, &claims(i64::MIN), None).unwrap();
        assert_eq!(
            verify(&keys, &t, 2000, &p).unwrap().expired_by,
            Some(i64::MAX)
        );
        let mut c = claims(5000);
        c.nbf = Some(i64::MAX);
        let t = mint(&sk, &c, None).unwrap();
        assert_eq!(
            verify(&keys, &t, 2000, &p).unwrap_err(),
            TokenError::NotYetValid
        );
        let far = Policy {
            leeway_secs: i64::MAX,
            ..Default::default()
        };
        let t = mint(&sk, &claims(5000), None).unwrap();
        assert_eq!(verify(&keys, &t, i64::MAX, &far).unwrap().expired_by, None);
    }
}
