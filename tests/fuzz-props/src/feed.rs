//! A cloud feed page `{events:[..], cursor?}`: every event taken from it is valid as a
//! LAN event would be, is for this realm, and names a usable device; a page that is
//! refused as a whole is refused with a message.

use pos_hub::bridge::pull::parse_feed_page;

use crate::event::check_accepted;

pub fn run(data: &[u8]) {
    match parse_feed_page(data, "t-1", "s-1") {
        Ok((cursor, events)) => {
            let Some(v) = crate::util::accepted_json(data, "page") else {
                return;
            };
            assert_eq!(v["events"].as_array().map(Vec::len), Some(events.len()));
            assert_eq!(cursor.as_deref(), v["cursor"].as_str());
            for (e, raw) in events
                .iter()
                .zip(v["events"].as_array().into_iter().flatten())
            {
                match e {
                    Ok((device, ev)) => {
                        check_accepted(ev);
                        assert!(
                            !device.is_empty() && device.len() <= 64,
                            "device {device:?}"
                        );
                        for (k, want) in [("tenantId", "t-1"), ("storeId", "s-1")] {
                            assert!(raw[k].is_null() || raw[k] == want, "{k} {} taken", raw[k]);
                        }
                    }
                    Err(why) => assert!(!why.is_empty()),
                }
            }
        }
        Err(e) => assert!(e.starts_with("malformed page refused")),
    }
}
