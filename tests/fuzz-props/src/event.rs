//! `event` packets as the extractor sees them: `["event", {id, type, payload, ts?}]`.
//! A stored event must encode to JSON devices can read back field for field, and
//! re-sending what was accepted must be accepted as the same event.

use pos_hub::log::event::{encode_stored, parse_event_packet, push_json_str, MAX_PAYLOAD};
use pos_hub::log::{EventError, NewEvent, Origin};

use crate::util::{json, text};

/// The codes an event's own parse may refuse with (the others come from the writer).
pub const PARSE_CODES: &[&str] = &[
    "invalid_event",
    "invalid_id",
    "invalid_type",
    "invalid_payload",
    "payload_too_large",
    "invalid_ts",
];

pub fn run(data: &[u8]) {
    let Some(s) = text(data) else { return };
    match parse_event_packet(s) {
        Ok(ev) => check_accepted(&ev),
        Err(e) => check_refused(&e, PARSE_CODES),
    }
}

pub fn check_refused(e: &EventError, allowed: &[&str]) {
    assert!(
        allowed.contains(&e.code()),
        "unexpected refusal code {:?}",
        e.code()
    );
    assert!(!e.to_string().is_empty());
}

/// Everything that must hold of an accepted event.
pub fn check_accepted(ev: &NewEvent) {
    assert!(
        pos_hub::log::event::valid_id(ev.id()),
        "accepted a bad id {:?}",
        ev.id()
    );
    let n = ev.typ().chars().count();
    assert!((1..=64).contains(&n), "accepted a type of {n} characters");
    assert!(
        ev.payload().len() <= MAX_PAYLOAD,
        "accepted an oversized payload"
    );
    let payload = json(ev.payload(), "an accepted payload");
    let ts = ev.ts().map(|t| json(t, "an accepted ts"));
    if let Some(t) = &ts {
        assert!(t.is_number() || t.is_string(), "accepted ts {t}");
    }
    // What devices receive parses back to the same fields.
    let wire = encode_stored(
        7,
        ev.id(),
        ev.typ(),
        ev.payload(),
        "till-1",
        ev.ts(),
        123,
        Origin::Lan,
    );
    let v = json(&wire, "an encoded event");
    assert_eq!(v["seq"], 7);
    assert_eq!(v["id"].as_str(), Some(ev.id()));
    assert_eq!(v["type"].as_str(), Some(ev.typ()));
    assert_eq!(v["payload"], payload);
    assert_eq!(v["deviceId"], "till-1");
    assert_eq!(v["ts"], ts.clone().unwrap_or(serde_json::Value::Null));
    assert_eq!(v["origin"], "lan");
    // Sending the accepted event again yields the same event.
    let mut again = String::from("[\"event\",{\"id\":");
    push_json_str(&mut again, ev.id());
    again.push_str(",\"type\":");
    push_json_str(&mut again, ev.typ());
    again.push_str(",\"payload\":");
    again.push_str(ev.payload());
    if let Some(t) = ev.ts() {
        again.push_str(",\"ts\":");
        again.push_str(t);
    }
    again.push_str("}]");
    assert_eq!(
        parse_event_packet(&again).as_ref(),
        Ok(ev),
        "re-sent event differs: {again}"
    );
}
