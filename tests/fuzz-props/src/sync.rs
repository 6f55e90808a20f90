//! `sync {since, limit?}` requests: a page limit within 1-1000 whatever was asked.

use pos_hub::realtime::parse_sync;

use crate::util::text;

pub fn run(data: &[u8]) {
    let Some(s) = text(data) else { return };
    match parse_sync(s) {
        Ok((since, limit)) => {
            assert!((1..=1000).contains(&limit), "page limit {limit}");
            let Some(v) = crate::util::accepted_json(s.as_bytes(), "sync") else {
                return;
            };
            assert_eq!(v.get("since").and_then(|x| x.as_u64()).unwrap_or(0), since);
        }
        Err(e) => assert_eq!(e.code(), "invalid_event"),
    }
}
