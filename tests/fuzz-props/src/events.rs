//! `events` batches: `["events", [{..}, ..]]`, 1-500 events, one result each.

use pos_hub::log::event::{parse_batch_packet, MAX_BATCH};

use crate::event::{check_accepted, check_refused, PARSE_CODES};
use crate::util::text;

pub fn run(data: &[u8]) {
    let Some(s) = text(data) else { return };
    match parse_batch_packet(s) {
        Ok(list) => {
            assert!(
                (1..=MAX_BATCH).contains(&list.len()),
                "batch of {}",
                list.len()
            );
            // The batch is exactly the array it came from, in order.
            let Some(v) = crate::util::accepted_json(s.as_bytes(), "batch") else {
                return;
            };
            assert_eq!(v[1].as_array().map(Vec::len), Some(list.len()));
            for r in &list {
                match r {
                    Ok(ev) => check_accepted(ev),
                    Err(e) => check_refused(e, PARSE_CODES),
                }
            }
        }
        Err(e) => check_refused(&e, &["invalid_event", "too_many_events"]),
    }
}
