//! Update channel files `<UPDATE_URL>/<channel>.json`: what parses names a version
//! and a bundle URL under the update server (or an absolute http(s) one).

use pos_hub::update::agent::{bundle_url, parse_channel};

use crate::util::text;

pub fn run(data: &[u8]) {
    let Some(s) = text(data) else { return };
    match parse_channel(s) {
        Ok(ch) => {
            let base = "http://updates.local/pos-hub";
            let url = bundle_url(base, &ch.url);
            assert!(
                url.starts_with("http://") || url.starts_with("https://"),
                "bundle url {url:?}"
            );
            if let Some(r) = ch.rollout {
                assert!(r.is_finite());
                let _ = pos_hub::update::in_wave("s-1", r);
            }
            let _ = pos_hub::update::bundle::version_cmp(&ch.version, "0.1.0");
        }
        Err(e) => assert!(!e.is_empty()),
    }
}
