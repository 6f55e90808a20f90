//! Device tokens: header, claims and signature paths. The first byte picks how the
//! rest becomes a token: as text (any string a device may send), or as a header and
//! claims (split at 0xFF) signed with the realm's real key, so the claim checks are
//! reached; a correctly signed token must never be refused as a bad signature or
//! unknown key, one with a flipped signature byte must never verify, and what
//! verifies must agree with the realm peeked before verification.

use pos_hub::auth::token::{peek_realm, verify};
use pos_hub::auth::{Policy, TokenError};

use crate::util::{keys, sign_jwt, split, text, NOW};

pub const CODES: &[&str] = &[
    "missing_token",
    "malformed_token",
    "unknown_key",
    "bad_signature",
    "missing_claims",
    "expired",
    "not_yet_valid",
    "wrong_realm",
    "bad_issuer",
    "bad_audience",
];

pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let policy = match mode >> 4 {
        0 => Policy {
            leeway_secs: 60,
            ..Default::default()
        },
        1 => Policy {
            issuer: Some("https://cloud".into()),
            audience: Some("pos-hub".into()),
            leeway_secs: 60,
        },
        _ => Policy {
            leeway_secs: 0,
            ..Default::default()
        },
    };
    match mode & 3 {
        0 => {
            let Some(t) = text(rest) else { return };
            let _ = check(t, &policy, false);
        }
        m => {
            let parts = split(rest, 2);
            let token = sign_jwt(parts[0], parts[1]);
            let header: Option<serde_json::Value> = serde_json::from_slice(parts[0]).ok();
            let plain_eddsa = header.as_ref().is_some_and(|h| {
                h.as_object()
                    .is_some_and(|o| o.keys().all(|k| k == "alg" || k == "typ" || k == "kid"))
                    && h["alg"] == "EdDSA"
                    && (h["typ"].is_null() || h["typ"] == "JWT")
                    && (h["kid"].is_null() || h["kid"].is_string())
            });
            let r = check(&token, &policy, plain_eddsa);
            if m == 2 {
                // The same token with one signature byte changed never verifies.
                let mut t = token.into_bytes();
                let last = t.len() - 2;
                t[last] = if t[last] == b'A' { b'B' } else { b'A' };
                let t = String::from_utf8(t).expect("ascii");
                if let Ok(v) = verify(&keys().set, &t, NOW, &policy) {
                    panic!(
                        "a token with a changed signature verified: {:?} (first try: {r:?})",
                        v.claims
                    );
                }
            }
        }
    }
}

fn check(token: &str, policy: &Policy, signed_right: bool) -> Result<(), TokenError> {
    let r = verify(&keys().set, token, NOW, policy);
    // Deterministic: the same token gets the same answer.
    let again = verify(&keys().set, token, NOW, policy);
    assert_eq!(
        r.as_ref().map(|v| v.claims.clone()).map_err(|e| e.code()),
        again
            .as_ref()
            .map(|v| v.claims.clone())
            .map_err(|e| e.code())
    );
    match r {
        Ok(v) => {
            let c = &v.claims;
            for (k, x) in [
                ("tenantId", &c.tenant_id),
                ("storeId", &c.store_id),
                ("deviceId", &c.device_id),
                ("role", &c.role),
            ] {
                assert!(!x.is_empty(), "verified with an empty {k}");
            }
            if let Some(by) = v.expired_by {
                assert!(by > policy.leeway_secs, "expired_by {by} within the leeway");
            }
            if let Some(nbf) = c.nbf {
                assert!(
                    nbf <= NOW + policy.leeway_secs,
                    "nbf {nbf} in the future accepted"
                );
            }
            if let Some(iss) = &policy.issuer {
                assert_eq!(c.iss.as_ref(), Some(iss));
            }
            // The realm picked before verification is the realm verified.
            let (t, s) = peek_realm(token).expect("a verified token's realm peeks");
            assert_eq!(
                (t.as_str(), s.as_str()),
                (c.tenant_id.as_str(), c.store_id.as_str())
            );
            Ok(())
        }
        Err(e) => {
            assert!(CODES.contains(&e.code()));
            if signed_right {
                assert!(
                    !matches!(e, TokenError::BadSignature | TokenError::UnknownKey),
                    "a token signed with the realm's key refused as {e:?}"
                );
            }
            Err(e)
        }
    }
}
