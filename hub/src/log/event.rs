//! One event: what a device sends, how it is checked, and its wire JSON.

use std::borrow::Cow;
use std::fmt::Write as _;

use serde::Deserialize;
use serde_json::value::RawValue;

/// The largest payload accepted, in bytes of JSON.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// The most events in one `events` batch.
pub const MAX_BATCH: usize = 500;

/// Where an event came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Lan = 0,
    Cloud = 1,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Lan => "lan",
            Origin::Cloud => "cloud",
        }
    }
    pub fn from_i64(v: i64) -> Self {
        if v == 1 {
            Origin::Cloud
        } else {
            Origin::Lan
        }
    }
}

/// Why one event was refused. `code()` is the stable string in `{ok:false, error}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("an event must be a JSON object {{id, type, payload, ts?}}")]
    Invalid,
    #[error("id must be 1-64 characters of A-Z a-z 0-9 . _ : -")]
    BadId,
    #[error("type must be a string of 1-64 characters")]
    BadType,
    #[error("payload is required (any JSON value)")]
    MissingPayload,
    #[error("payload is larger than 64 KiB")]
    PayloadTooLarge,
    #[error("payload must be JSON every reader can take: numbers within the range of a double, no unpaired \\u surrogate escapes")]
    BadPayload,
    #[error("ts must be a number or a string of at most 64 characters")]
    BadTs,
    #[error("events takes an array of 1 to 500 events")]
    TooMany,
    #[error("binary attachments are not accepted; send JSON")]
    Binary,
    #[error("unknown message: the hub takes event, events and sync")]
    UnknownEvent,
    #[error("the hub is busy; retry shortly")]
    Busy,
    #[error("the hub is shutting down; retry after it restarts")]
    ShuttingDown,
    #[error("the event log could not be written: {0}")]
    Storage(String),
    #[error("the hub's data partition is full: the event was NOT stored; retry later (an administrator must free space on the box)")]
    StorageFull,
}

impl EventError {
    pub fn code(&self) -> &'static str {
        match self {
            EventError::Invalid => "invalid_event",
            EventError::BadId => "invalid_id",
            EventError::BadType => "invalid_type",
            EventError::MissingPayload | EventError::BadPayload => "invalid_payload",
            EventError::PayloadTooLarge => "payload_too_large",
            EventError::BadTs => "invalid_ts",
            EventError::TooMany => "too_many_events",
            EventError::Binary => "binary_not_supported",
            EventError::UnknownEvent => "unknown_event",
            EventError::Busy => "busy",
            EventError::ShuttingDown => "shutting_down",
            EventError::Storage(_) => "storage_error",
            EventError::StorageFull => "storage_full",
        }
    }
}

#[derive(Deserialize)]
struct EventIn<'a> {
    #[serde(borrow)]
    id: Option<Text<'a>>,
    #[serde(rename = "type", borrow)]
    typ: Option<Text<'a>>,
    #[serde(borrow, default, deserialize_with = "present")]
    payload: Option<&'a RawValue>,
    #[serde(borrow)]
    ts: Option<&'a RawValue>,
}

/// A JSON string, borrowed from the packet unless it has escapes. serde borrows a
/// `Cow` only when it is the field's whole type: an `Option<Cow>` always allocated
/// (two allocations per event, for id and type).
#[derive(Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

/// Keeps an explicit `null` as `Some("null")` (only an absent field is `None`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// A checked event waiting to be stored. Its four text fields live in one buffer
/// (one allocation per event on the hot path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    buf: String,
    id_end: u32,
    type_end: u32,
    payload_end: u32,
}

/// Whether `raw` is one JSON value that every reader of the log takes (the cloud's,
/// the bridge's, serde_json's `Value`): the grammar, numbers within the range of a
/// double and no unpaired UTF-16 surrogate in a `\u` escape. `RawValue`, which the
/// event parse borrows its fields with, only skips over numbers and escapes, so a
/// device could store `1e400` or `"\ud800"`, which readers of the log then refuse
/// (found by the fuzz targets `event` and `events`). No allocation beyond
/// serde_json's scratch buffer for strings with escapes.
pub fn strict_json(raw: &str) -> bool {
    use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
    struct Strict;
    impl<'de> Visitor<'de> for Strict {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("JSON")
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
            if v.is_finite() {
                Ok(())
            } else {
                Err(E::custom("number out of range"))
            }
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while seq.next_element_seed(Strict)?.is_some() {}
            Ok(())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            while map.next_key_seed(Key)?.is_some() {
                map.next_value_seed(Strict)?;
            }
            Ok(())
        }
    }
    /// An object key: any string but serde_json's private RawValue marker, which makes an
    /// object read back as something else (found by the fuzz target `feed`).
    struct Key;
    impl<'de> Visitor<'de> for Key {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object key")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
            if v == "$serde_json::private::RawValue" {
                Err(E::custom("reserved key"))
            } else {
                Ok(())
            }
        }
    }
    impl<'de> DeserializeSeed<'de> for Key {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_str(self)
        }
    }
    impl<'de> DeserializeSeed<'de> for Strict {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }
    let mut de = serde_json::Deserializer::from_str(raw);
    Strict.deserialize(&mut de).is_ok() && de.end().is_ok()
}

pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

impl NewEvent {
    /// Builds an event from its parts, checking each.
    pub fn new(id: &str, typ: &str, payload: &str, ts: Option<&str>) -> Result<Self, EventError> {
        if !valid_id(id) {
            return Err(EventError::BadId);
        }
        if typ.is_empty() || typ.chars().count() > 64 {
            return Err(EventError::BadType);
        }
        if payload.len() > MAX_PAYLOAD {
            return Err(EventError::PayloadTooLarge);
        }
        if !strict_json(payload) {
            return Err(EventError::BadPayload);
        }
        let ts = match ts {
            None | Some("null") => "",
            Some(t) => {
                let ok = ((t.starts_with('"') && t.len() <= 66)
                    || (t.len() <= 32 && t.parse::<f64>().is_ok_and(f64::is_finite)))
                    && strict_json(t);
                if !ok {
                    return Err(EventError::BadTs);
                }
                t
            }
        };
        let mut buf = String::with_capacity(id.len() + typ.len() + payload.len() + ts.len());
        buf.push_str(id);
        buf.push_str(typ);
        buf.push_str(payload);
        buf.push_str(ts);
        Ok(Self {
            id_end: id.len() as u32,
            type_end: (id.len() + typ.len()) as u32,
            payload_end: (id.len() + typ.len() + payload.len()) as u32,
            buf,
        })
    }

    /// Parses one event object as a device sends it.
    pub fn from_json(raw: &str) -> Result<Self, EventError> {
        // An object only: serde's derive also reads `[id, type, payload, ts]`.
        if !raw.trim_start().starts_with('{') {
            return Err(EventError::Invalid);
        }
        let e: EventIn = serde_json::from_str(raw).map_err(|_| EventError::Invalid)?;
        let id =
            e.id.map(|t| t.0)
                .filter(|i| valid_id(i))
                .ok_or(EventError::BadId)?;
        let typ = e.typ.map(|t| t.0).ok_or(EventError::BadType)?;
        let payload = e.payload.ok_or(EventError::MissingPayload)?;
        Self::new(&id, &typ, payload.get(), e.ts.map(|t| t.get()))
    }

    pub fn id(&self) -> &str {
        &self.buf[..self.id_end as usize]
    }
    pub fn typ(&self) -> &str {
        &self.buf[self.id_end as usize..self.type_end as usize]
    }
    /// The payload as JSON text.
    pub fn payload(&self) -> &str {
        &self.buf[self.type_end as usize..self.payload_end as usize]
    }
    /// The device's timestamp as JSON text (number or string), if it gave one.
    pub fn ts(&self) -> Option<&str> {
        let t = &self.buf[self.payload_end as usize..];
        (!t.is_empty()).then_some(t)
    }
}

/// Parses the arguments of an `event` packet: `["event", {..}]`.
pub fn parse_event_packet(packet: &str) -> Result<NewEvent, EventError> {
    let args: Vec<&RawValue> = serde_json::from_str(packet).map_err(|_| EventError::Invalid)?;
    event_from_arg(args.get(1).copied())
}

/// The event in an `event` packet's argument.
pub fn event_from_arg(arg: Option<&RawValue>) -> Result<NewEvent, EventError> {
    match arg {
        Some(raw) => NewEvent::from_json(raw.get()),
        None => Err(EventError::Invalid),
    }
}

/// The events in an `events` packet's argument (an array of 1 to 500 events).
pub fn batch_from_arg(
    arg: Option<&RawValue>,
) -> Result<Vec<Result<NewEvent, EventError>>, EventError> {
    let list = arg.ok_or(EventError::TooMany)?;
    let items: Vec<&RawValue> =
        serde_json::from_str(list.get()).map_err(|_| EventError::TooMany)?;
    if items.is_empty() || items.len() > MAX_BATCH {
        return Err(EventError::TooMany);
    }
    Ok(items
        .into_iter()
        .map(|r| NewEvent::from_json(r.get()))
        .collect())
}

/// Parses the arguments of an `events` packet: `["events", [{..}, ..]]`. The outer
/// error refuses the whole batch; inner errors refuse single events.
pub fn parse_batch_packet(packet: &str) -> Result<Vec<Result<NewEvent, EventError>>, EventError> {
    let args: Vec<&RawValue> = serde_json::from_str(packet).map_err(|_| EventError::Invalid)?;
    batch_from_arg(args.get(1).copied())
}

/// Writes `s` as a JSON string literal.
pub fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The one JSON shape of a stored event, as devices receive it:
/// `{seq, id, type, payload, deviceId, ts, hubTs, origin}`.
#[allow(clippy::too_many_arguments)]
pub fn encode_stored(
    seq: u64,
    id: &str,
    typ: &str,
    payload: &str,
    device_id: &str,
    ts: Option<&str>,
    hub_ts: i64,
    origin: Origin,
) -> String {
    let mut out =
        String::with_capacity(96 + id.len() + typ.len() + payload.len() + device_id.len());
    encode_stored_into(
        &mut out, seq, id, typ, payload, device_id, ts, hub_ts, origin,
    );
    out
}

/// [`encode_stored`] appended to `out` (the fan-out builds the whole packet in
/// one buffer).
#[allow(clippy::too_many_arguments)]
pub fn encode_stored_into(
    out: &mut String,
    seq: u64,
    id: &str,
    typ: &str,
    payload: &str,
    device_id: &str,
    ts: Option<&str>,
    hub_ts: i64,
    origin: Origin,
) {
    let _ = write!(out, "{{\"seq\":{seq},\"id\":");
    push_json_str(out, id);
    out.push_str(",\"type\":");
    push_json_str(out, typ);
    out.push_str(",\"payload\":");
    out.push_str(payload);
    out.push_str(",\"deviceId\":");
    push_json_str(out, device_id);
    out.push_str(",\"ts\":");
    out.push_str(ts.unwrap_or("null"));
    let _ = write!(
        out,
        ",\"hubTs\":{hub_ts},\"origin\":\"{}\"}}",
        origin.as_str()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_id_and_type_are_read_too() {
        // Borrowed from the packet when plain, decoded into a copy when escaped.
        let e = NewEvent::from_json(r#"{"id":"a\u002db","type":"x\"y","payload":1}"#).unwrap();
        assert_eq!((e.id(), e.typ(), e.payload()), ("a-b", "x\"y", "1"));
        let e = NewEvent::from_json(r#"{"id":"a-b","type":"t","payload":[]}"#).unwrap();
        assert_eq!((e.id(), e.typ(), e.payload()), ("a-b", "t", "[]"));
        assert_eq!(
            NewEvent::from_json(r#"{"id":"a\u0020b","type":"t","payload":1}"#),
            Err(EventError::BadId)
        );
        assert_eq!(
            NewEvent::from_json(r#"{"id":7,"type":"t","payload":1}"#),
            Err(EventError::Invalid)
        );
    }

    #[test]
    fn parses_and_checks() {
        let e = parse_event_packet(
            r#"["event",{"id":"a-1","type":"order.created","payload":{"x":[1,2]},"ts":17}]"#,
        )
        .unwrap();
        assert_eq!(
            (e.id(), e.typ(), e.payload(), e.ts()),
            ("a-1", "order.created", r#"{"x":[1,2]}"#, Some("17"))
        );
        let e = parse_event_packet(r#"["event",{"id":"a","type":"t","payload":null}]"#).unwrap();
        assert_eq!((e.payload(), e.ts()), ("null", None));
        let bad = |p: &str| parse_event_packet(p).unwrap_err();
        assert_eq!(bad(r#"["event","str"]"#), EventError::Invalid);
        assert_eq!(bad(r#"["event"]"#), EventError::Invalid);
        assert_eq!(
            bad(r#"["event",{"id":"a b","type":"t","payload":1}]"#),
            EventError::BadId
        );
        assert_eq!(
            bad(r#"["event",{"id":"","type":"t","payload":1}]"#),
            EventError::BadId
        );
        assert_eq!(
            bad(r#"["event",{"type":"t","payload":1}]"#),
            EventError::BadId
        );
        assert_eq!(
            bad(r#"["event",{"id":"a","type":"","payload":1}]"#),
            EventError::BadType
        );
        assert_eq!(
            bad(r#"["event",{"id":"a","type":7,"payload":1}]"#),
            EventError::Invalid
        );
        assert_eq!(
            bad(r#"["event",{"id":"a","type":"t"}]"#),
            EventError::MissingPayload
        );
        assert_eq!(
            bad(r#"["event",{"id":"a","type":"t","payload":1,"ts":{}}]"#),
            EventError::BadTs
        );
        let big = format!(
            r#"["event",{{"id":"a","type":"t","payload":"{}"}}]"#,
            "x".repeat(MAX_PAYLOAD)
        );
        assert_eq!(bad(&big), EventError::PayloadTooLarge);
        assert_eq!(bad("garbage"), EventError::Invalid);
    }

    /// Found by the fuzz targets `event` and `events`: a payload or ts that
    /// serde_json's `Value` (the cloud's and the bridge's reader) refuses was stored:
    /// numbers beyond a double (`2.1e4005`, ts `1e400`) and unpaired surrogate
    /// escapes (`"\ud800"`).
    #[test]
    fn only_json_every_reader_takes_is_stored() {
        let ev = |payload: &str, ts: &str| {
            parse_event_packet(&format!(
                r#"["event",{{"id":"a","type":"t","payload":{payload}{ts}}}]"#
            ))
        };
        for p in [
            r#"{"t/tal":2.1e4005}"#,
            "-1e400",
            r#""\ud800""#,
            r#"{"\udc00x":1}"#,
            r#"["a\ud800\u0041"]"#,
        ] {
            assert_eq!(ev(p, ""), Err(EventError::BadPayload), "{p}");
            assert!(serde_json::from_str::<serde_json::Value>(p).is_err());
        }
        for t in ["1e400", r#""2026-11-24T10\ud800:00:00Z""#] {
            assert_eq!(
                ev("1", &format!(r#","ts":{t}"#)),
                Err(EventError::BadTs),
                "{t}"
            );
        }
        // A paired surrogate, big but finite numbers and ordinary escapes still pass.
        for p in [
            r#""\ud83d\ude00""#,
            "1.7976931348623157e308",
            "18446744073709551616",
            r#"{"a":[true,null,"\n\u0041"]}"#,
        ] {
            assert!(ev(p, "").is_ok(), "{p}");
        }
        assert!(ev("1", r#","ts":"\ud83d\ude00""#).is_ok());
        assert_eq!(EventError::BadPayload.code(), "invalid_payload");
        assert!(!strict_json("1 2") && !strict_json("") && strict_json(" 1 "));
        assert!(!strict_json(
            r#"{"a":{"$serde_json::private::RawValue":1}}"#
        ));
        assert!(strict_json(
            r#"{"$serde_json":1,"k":"$serde_json::private::RawValue"}"#
        ));
        // Callers other than the device parse are checked too.
        assert_eq!(
            NewEvent::new("a", "t", "1", Some("NaN")),
            Err(EventError::BadTs)
        );
        assert_eq!(
            NewEvent::new("a", "t", "{", None),
            Err(EventError::BadPayload)
        );
    }

    /// Found while fixing what the fuzz target `sync` found: serde's derive reads a
    /// struct from an array too, so `["event",["a","t",1]]` was stored as an event.
    #[test]
    fn an_event_is_an_object() {
        assert_eq!(
            parse_event_packet(r#"["event",["a","t",1]]"#),
            Err(EventError::Invalid)
        );
        let b = parse_batch_packet(r#"["events",[["a","t",1],{"id":"b","type":"t","payload":1}]]"#)
            .unwrap();
        assert_eq!(b[0], Err(EventError::Invalid));
        assert!(b[1].is_ok());
    }

    #[test]
    fn batches() {
        let b = parse_batch_packet(r#"["events",[{"id":"a","type":"t","payload":1},{"id":"??"}]]"#)
            .unwrap();
        assert!(b[0].is_ok());
        assert_eq!(b[1], Err(EventError::BadId));
        assert_eq!(
            parse_batch_packet(r#"["events",[]]"#).unwrap_err(),
            EventError::TooMany
        );
        let many = format!(
            r#"["events",[{}]]"#,
            vec![r#"{"id":"a","type":"t","payload":1}"#; 501].join(",")
        );
        assert_eq!(parse_batch_packet(&many).unwrap_err(), EventError::TooMany);
    }

    #[test]
    fn encoding_is_valid_json() {
        let s = encode_stored(
            7,
            "a",
            "t\"q",
            r#"{"k":1}"#,
            "dev\n1",
            Some("12"),
            99,
            Origin::Lan,
        );
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["seq"], 7);
        assert_eq!(v["type"], "t\"q");
        assert_eq!(v["deviceId"], "dev\n1");
        assert_eq!(v["payload"]["k"], 1);
        assert_eq!(v["ts"], 12);
        assert_eq!(v["origin"], "lan");
        let s = encode_stored(1, "a", "t", "1", "d", None, 5, Origin::Cloud);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert!(v["ts"].is_null());
    }
}
