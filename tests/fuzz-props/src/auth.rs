//! The handshake `auth` object `{token, since?}` and the realm peeked from the token
//! before any key is chosen: each refusal is one of the documented codes.

use pos_hub::auth::token::peek_realm;
use pos_hub::realtime::parse_auth;

use crate::util::text;

pub fn run(data: &[u8]) {
    let Some(s) = text(data) else { return };
    match parse_auth(s) {
        Ok((token, since)) => {
            assert!(!token.is_empty());
            let Some(v) = crate::util::accepted_json(s.as_bytes(), "auth") else {
                return;
            };
            assert_eq!(v["token"].as_str(), Some(token.as_str()));
            match &v["since"] {
                serde_json::Value::Null => assert_eq!(since, None),
                serde_json::Value::Number(n) => assert_eq!(n.as_u64(), since),
                serde_json::Value::String(x) => {
                    assert_eq!(x.parse::<u64>().ok(), since);
                }
                other => panic!("since {other} accepted"),
            }
            match peek_realm(&token) {
                Ok((t, st)) => {
                    let _ = (t, st);
                }
                Err(e) => assert!(
                    ["malformed_token", "missing_claims"].contains(&e.code()),
                    "peek refused with {:?}",
                    e.code()
                ),
            }
        }
        Err(e) => assert!(
            ["missing_token", "invalid_since"].contains(&e.0),
            "auth refused with {:?}",
            e.0
        ),
    }
}
