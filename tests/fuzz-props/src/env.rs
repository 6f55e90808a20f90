//! The env file (`hub.env` on the settings partition, edited on any laptop) and every
//! setting in it: what parses writes back (quoted) to the same settings, and the
//! configuration built from them is either refused naming a key or holds values the
//! hub can use (token times that do not overflow the clock arithmetic, ports, sizes).

use std::collections::HashMap;
use std::path::PathBuf;

use pos_hub::config::{parse_env_file, Config, Settings};

use crate::util::{keys, text, B64};
use base64::Engine as _;

pub fn run(data: &[u8]) {
    let Some(s) = text(data) else { return };
    let map = match parse_env_file(s) {
        Ok(m) => m,
        Err((line, msg)) => {
            assert!(line >= 1 && line <= s.lines().count(), "line {line}");
            assert!(!msg.is_empty());
            return;
        }
    };
    for k in map.keys() {
        assert!(
            !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "key {k:?}"
        );
    }
    // Written back quoted, the settings read the same.
    let mut again = String::new();
    for (k, v) in &map {
        assert!(!v.contains('\n'), "value with a line break");
        again.push_str(&format!("{k}=\"{v}\"\n"));
    }
    assert_eq!(
        parse_env_file(&again).as_ref(),
        Ok(&map),
        "written back: {again:?}"
    );
    config(map);
}

fn config(mut map: HashMap<String, String>) {
    // Nothing that reads other files or names the data dir; a realm and a key of
    // our own so validation goes on past them, unless the input sets its own.
    map.retain(|k, _| {
        !k.ends_with("_FILE")
            && !k.ends_with("_DIR")
            && !k.starts_with("UPS_POWER")
            && k != "UPS_GPIO"
    });
    map.entry("TENANT_ID".into())
        .or_insert_with(|| "t-1".into());
    map.entry("STORE_ID".into()).or_insert_with(|| "s-1".into());
    map.entry("CLUSTER_PUBLIC_KEY_BASE64".into())
        .or_insert_with(|| B64.encode(&keys().public_pem));
    let s = Settings::from_pairs(map);
    let data = PathBuf::from("/nonexistent/pos-hub-fuzz");
    match Config::from_settings(&s, Some(data), None, None) {
        Ok(c) => {
            assert!(c.port > 0);
            assert!(
                c.token_policy.leeway_secs >= 0,
                "TOKEN_LEEWAY became {}",
                c.token_policy.leeway_secs
            );
            assert!(
                c.token_offline_grace.as_secs() <= i64::MAX as u64 / 2,
                "TOKEN_OFFLINE_GRACE of {} s overflows the token checks",
                c.token_offline_grace.as_secs()
            );
            assert!(c.group_commit_max >= 1 && c.socket_buffer >= 1);
            assert!(c.socket_buffer_bytes >= 1 << 20);
            assert!(!c.realms.is_empty() || c.claim.is_some() || c.dev);
            for r in &c.realms {
                assert!(pos_hub::config::valid_realm_part(&r.tenant_id));
                assert!(pos_hub::config::valid_realm_part(&r.store_id));
            }
        }
        Err(e) => assert!(!e.key.is_empty() && !e.message.is_empty(), "{e:?}"),
    }
}
