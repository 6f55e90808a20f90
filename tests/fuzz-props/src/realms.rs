//! The realms file (`REALMS_FILE`, a JSON array of realms): every accepted realm has
//! valid ids (they name directories under the data dir), exactly one key and
//! http(s) cloud URLs with a token. Key files are looked up beside the realms file,
//! where the target puts the real public key as `key.pem`.

use std::path::PathBuf;
use std::sync::OnceLock;

use pos_hub::config::{load_realms, valid_realm_part};

use crate::util::{keys, text};

fn dir() -> &'static PathBuf {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let d = crate::util::scratch_path("realms");
        std::fs::create_dir_all(&d).expect("temp dir");
        std::fs::write(d.join("key.pem"), &keys().public_pem).expect("key file");
        d
    })
}

/// Removes this process's realms directory, if it made one.
pub fn remove_scratch() {
    let _ = std::fs::remove_dir_all(dir());
}

pub fn run(data: &[u8]) {
    let Some(s) = text(data) else { return };
    // Only files beside the realms file: no absolute paths or `..` (a fuzzer that
    // names /dev/zero would only find that reading it never ends).
    if s.contains('/') || s.contains("..") || s.contains('\\') {
        return;
    }
    let path = dir().join("realms.json");
    std::fs::write(&path, s).expect("write realms file");
    match load_realms(&path) {
        Ok(realms) => {
            for r in &realms {
                assert!(valid_realm_part(&r.tenant_id), "tenant {:?}", r.tenant_id);
                assert!(valid_realm_part(&r.store_id), "store {:?}", r.store_id);
                assert!(!r.keys.keys().is_empty());
                for u in [&r.cloud_bridge_url, &r.cloud_feed_url]
                    .into_iter()
                    .flatten()
                {
                    assert!(
                        u.starts_with("http://") || u.starts_with("https://"),
                        "url {u:?}"
                    );
                }
                if r.cloud_bridge_url.is_some() {
                    assert!(r.cloud_bridge_token.is_some());
                }
            }
        }
        Err(e) => {
            assert!(!e.key.is_empty() && !e.message.is_empty(), "{e:?}");
        }
    }
}
