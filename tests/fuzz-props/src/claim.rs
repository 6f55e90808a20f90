//! Claim tokens pasted on /setup: signed with the tenant's key (the input is the
//! claims, signed here, so the checks behind the signature are reached). A claim
//! that verifies names a valid realm, and `claimed.env` written from it reads back
//! (as the hub does on every start) to exactly the claim's settings.

use pos_hub::config::{parse_env_file, valid_realm_part};
use pos_hub::provision::claim::{claimed_env_text, verify, ClaimKey};

use crate::util::{keys, sign_jwt, NOW};

pub fn run(data: &[u8]) {
    let key = ClaimKey {
        keys: std::sync::Arc::new(pos_hub::auth::KeySet::single(
            pos_hub::auth::keys::VerifyKey::from_pem(&keys().public_pem, None).expect("key"),
        )),
        b64: "S0VZ".into(),
    };
    let token = sign_jwt(br#"{"alg":"EdDSA","typ":"JWT"}"#, data);
    let Ok(c) = verify(&key, &token, NOW) else {
        return;
    };
    assert!(
        valid_realm_part(&c.tenant_id),
        "claimed tenant {:?}",
        c.tenant_id
    );
    assert!(
        valid_realm_part(&c.store_id),
        "claimed store {:?}",
        c.store_id
    );
    let text = claimed_env_text(&key.b64, &c);
    let map =
        parse_env_file(&text).unwrap_or_else(|e| panic!("claimed.env unreadable {e:?}: {text:?}"));
    assert_eq!(map.get("TENANT_ID"), Some(&c.tenant_id), "{text:?}");
    assert_eq!(map.get("STORE_ID"), Some(&c.store_id), "{text:?}");
    assert_eq!(
        map.get("CLUSTER_PUBLIC_KEY_BASE64").map(String::as_str),
        Some("S0VZ")
    );
    assert_eq!(map.get("DEV").map(String::as_str), Some("off"));
    for (k, v) in &c.extra {
        assert_eq!(
            map.get(k),
            Some(v),
            "{k} reads back differently from {text:?}"
        );
    }
    let expected = 4 + c.extra.len();
    assert_eq!(
        map.len(),
        expected,
        "claimed.env has other settings: {text:?}"
    );
}
