//! The Socket.IO v5 packet format, as much of it as the hub speaks: parse what a
//! device sends (borrowing from the frame, no allocation) and encode what the hub
//! sends (one buffer per packet, built once however many sockets it goes to).
//!
//! Our own code instead of socketioxide: socketioxide encodes every emit once per
//! socket, runs handlers concurrently (reordering a device's events), keeps waiting
//! binary attachments per socket, and cannot close a socket whose queue is full.
//! The wire format below is the published protocol (socket.io-protocol v5):
//! `<type>[<attachments>-][<namespace>,][<ack id>][<JSON>]`.

use std::fmt::Write as _;

use serde::de::{self, Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// The most binary attachments a packet may announce (the hub refuses them all,
/// but must skip them without keeping anything).
pub const MAX_ATTACHMENTS: u32 = 16;

/// One packet from a device.
#[derive(Debug, PartialEq, Eq)]
pub enum Packet<'a> {
    /// `0[/ns,][{auth}]`
    Connect { ns: &'a str, auth: Option<&'a str> },
    /// `1[/ns,]`
    Disconnect { ns: &'a str },
    /// `2[/ns,][id][name, args..]`; `data` is the JSON array.
    Event {
        ns: &'a str,
        id: Option<u64>,
        data: &'a str,
    },
    /// `3[/ns,]id[args..]` (the hub asks no acks; ignored).
    Ack { ns: &'a str, id: u64 },
    /// `5n-[/ns,][id][..]` / `6n-...`: `n` binary frames follow.
    Binary {
        ns: &'a str,
        id: Option<u64>,
        attachments: u32,
        ack: bool,
    },
}

/// Why a packet could not be read; the device is disconnected (the protocol
/// gives no way to answer a packet that cannot be parsed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("empty packet")]
    Empty,
    #[error("unknown packet type")]
    BadType,
    #[error("bad attachment count")]
    BadAttachments,
    #[error("bad ack id")]
    BadAckId,
    #[error("bad payload")]
    BadPayload,
}

/// Parses one Socket.IO packet (the text of one Engine.IO message).
pub fn parse(s: &str) -> Result<Packet<'_>, ParseError> {
    let b = s.as_bytes();
    let Some(&t) = b.first() else {
        return Err(ParseError::Empty);
    };
    // The type first: everything after it is sliced at byte 1, which must be a char
    // boundary (a frame starting with a non-ASCII character panicked here).
    if !matches!(t, b'0' | b'1' | b'2' | b'3' | b'5' | b'6') {
        return Err(ParseError::BadType);
    }
    let mut i = 1;
    let binary = matches!(t, b'5' | b'6');
    let mut attachments = 0u32;
    if binary {
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start || i - start > 3 || i >= b.len() || b[i] != b'-' {
            return Err(ParseError::BadAttachments);
        }
        attachments = s[start..i]
            .parse()
            .map_err(|_| ParseError::BadAttachments)?;
        if attachments == 0 || attachments > MAX_ATTACHMENTS {
            return Err(ParseError::BadAttachments);
        }
        i += 1;
    }
    let mut ns = "/";
    if i < b.len() && b[i] == b'/' {
        let start = i;
        while i < b.len() && b[i] != b',' {
            i += 1;
        }
        ns = &s[start..i];
        if i < b.len() {
            i += 1; // the ','
        }
    }
    let start = i;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    let id = if i > start {
        if i - start > 15 {
            return Err(ParseError::BadAckId);
        }
        Some(
            s[start..i]
                .parse::<u64>()
                .map_err(|_| ParseError::BadAckId)?,
        )
    } else {
        None
    };
    let data = &s[i..];
    match t {
        b'0' => {
            if id.is_some() {
                return Err(ParseError::BadAckId);
            }
            let auth = match data {
                "" => None,
                d if d.starts_with('{') => Some(d),
                _ => return Err(ParseError::BadPayload),
            };
            Ok(Packet::Connect { ns, auth })
        }
        b'1' if id.is_none() && data.is_empty() => Ok(Packet::Disconnect { ns }),
        b'1' => Err(ParseError::BadPayload),
        b'2' => {
            if !data.starts_with('[') {
                return Err(ParseError::BadPayload);
            }
            Ok(Packet::Event { ns, id, data })
        }
        b'3' => match id {
            Some(id) if data.starts_with('[') => Ok(Packet::Ack { ns, id }),
            Some(_) => Err(ParseError::BadPayload),
            None => Err(ParseError::BadAckId),
        },
        b'5' | b'6' => {
            if !data.starts_with('[') {
                return Err(ParseError::BadPayload);
            }
            if t == b'6' && id.is_none() {
                return Err(ParseError::BadAckId);
            }
            Ok(Packet::Binary {
                ns,
                id,
                attachments,
                ack: t == b'6',
            })
        }
        _ => Err(ParseError::BadType),
    }
}

/// The name and first argument of an event's JSON array `["name", arg, ..]`,
/// borrowed from the frame. Further arguments are skipped.
#[derive(Debug)]
pub struct EventArgs<'a> {
    pub name: std::borrow::Cow<'a, str>,
    pub arg: Option<&'a RawValue>,
}

impl<'a> EventArgs<'a> {
    pub fn parse(data: &'a str) -> Option<Self> {
        serde_json::from_str(data).ok()
    }
}

impl<'de: 'a, 'a> serde::Deserialize<'de> for EventArgs<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = EventArgs<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an array [name, args..]")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let name: CowStr<'a> = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::custom("an event needs a name"))?;
                let name = name.0;
                let arg: Option<&'a RawValue> = seq.next_element()?;
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(EventArgs { name, arg })
            }
        }
        d.deserialize_seq(V(std::marker::PhantomData))
    }
}

/// A string borrowed from the frame unless it has escapes (serde's own `Cow`
/// always copies).
struct CowStr<'a>(std::borrow::Cow<'a, str>);

impl<'de: 'a, 'a> serde::Deserialize<'de> for CowStr<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = CowStr<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(CowStr(std::borrow::Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(CowStr(std::borrow::Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(CowStr(std::borrow::Cow::Owned(v)))
            }
        }
        d.deserialize_str(V(std::marker::PhantomData))
    }
}

/// Writes the decimal digits of `n` (the formatter is not needed for integers).
pub fn push_u64(out: &mut String, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // The digits are ASCII.
    out.push_str(std::str::from_utf8(&buf[i..]).unwrap_or("0"));
}

/// `0{"sid":"<sid>"}`: the device is connected to `/`.
///
/// Every encoder here writes the Engine.IO message type `4` first, so one buffer is
/// the whole WebSocket message of a direct connection ([`super::ws`]) and, from its
/// second byte, what engineioxide frames itself.
pub fn connect_ok(sid: &str) -> String {
    let mut out = String::with_capacity(13 + sid.len());
    out.push_str("40{\"sid\":\"");
    out.push_str(sid);
    out.push_str("\"}");
    out
}

/// `4[/ns,]{"message":"<code>"}`: the connection is refused with a stable code.
pub fn connect_error(ns: &str, message: &str) -> String {
    let mut out = String::with_capacity(24 + ns.len() + message.len());
    out.push_str("44");
    if ns != "/" {
        out.push_str(ns);
        out.push(',');
    }
    out.push_str("{\"message\":");
    crate::log::event::push_json_str(&mut out, message);
    out.push('}');
    out
}

/// Starts an event packet `2["<name>",` into `out`; the caller writes the
/// argument and then calls [`event_end`].
pub fn event_start(out: &mut String, name: &str) {
    out.push_str("42[");
    crate::log::event::push_json_str(out, name);
    out.push(',');
}

pub fn event_end(out: &mut String) {
    out.push(']');
}

/// `2["<name>",<json>]`.
pub fn event(name: &str, json: &str) -> String {
    let mut out = String::with_capacity(8 + name.len() + json.len());
    event_start(&mut out, name);
    out.push_str(json);
    event_end(&mut out);
    out
}

/// Starts an ack packet `3<id>[` into `out`; the caller writes the answer and
/// then calls [`ack_end`].
pub fn ack_start(out: &mut String, id: u64) {
    out.push_str("43");
    push_u64(out, id);
    out.push('[');
}

pub fn ack_end(out: &mut String) {
    out.push(']');
}

/// `3<id>[<json>]`.
pub fn ack(id: u64, json: &str) -> String {
    let mut out = String::with_capacity(24 + json.len());
    ack_start(&mut out, id);
    out.push_str(json);
    ack_end(&mut out);
    out
}

/// Formats `n` into `out` with the formatter (for the rare non-hot paths).
pub fn push_display(out: &mut String, v: impl std::fmt::Display) {
    let _ = write!(out, "{v}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_socket_io_client_sends() {
        assert_eq!(
            parse("0{\"token\":\"x\"}"),
            Ok(Packet::Connect {
                ns: "/",
                auth: Some("{\"token\":\"x\"}")
            })
        );
        assert_eq!(
            parse("0"),
            Ok(Packet::Connect {
                ns: "/",
                auth: None
            })
        );
        assert_eq!(
            parse("0/admin,{}"),
            Ok(Packet::Connect {
                ns: "/admin",
                auth: Some("{}")
            })
        );
        assert_eq!(parse("1"), Ok(Packet::Disconnect { ns: "/" }));
        assert_eq!(
            parse("2[\"event\",{}]"),
            Ok(Packet::Event {
                ns: "/",
                id: None,
                data: "[\"event\",{}]"
            })
        );
        assert_eq!(
            parse("212[\"event\",{}]"),
            Ok(Packet::Event {
                ns: "/",
                id: Some(12),
                data: "[\"event\",{}]"
            })
        );
        assert_eq!(
            parse("2/x,7[\"a\"]"),
            Ok(Packet::Event {
                ns: "/x",
                id: Some(7),
                data: "[\"a\"]"
            })
        );
        assert_eq!(parse("33[]"), Ok(Packet::Ack { ns: "/", id: 3 }));
        assert_eq!(
            parse("51-[\"event\",{\"_placeholder\":true,\"num\":0}]"),
            Ok(Packet::Binary {
                ns: "/",
                id: None,
                attachments: 1,
                ack: false
            })
        );
        assert_eq!(
            parse("52-4[\"e\",{}]"),
            Ok(Packet::Binary {
                ns: "/",
                id: Some(4),
                attachments: 2,
                ack: false
            })
        );
    }

    #[test]
    fn refuses_garbage_with_a_reason() {
        for (junk, why) in [
            ("", ParseError::Empty),
            ("9", ParseError::BadType),
            ("garbage", ParseError::BadType),
            ("2", ParseError::BadPayload),
            ("2{", ParseError::BadPayload),
            ("3", ParseError::BadAckId),
            ("3abc", ParseError::BadAckId),
            ("1x", ParseError::BadPayload),
            ("0x", ParseError::BadPayload),
            ("01{}", ParseError::BadAckId),
            ("5-[]", ParseError::BadAttachments),
            ("50-[]", ParseError::BadAttachments),
            ("5999-[]", ParseError::BadAttachments),
            ("517-[]", ParseError::BadAttachments),
            ("51[]", ParseError::BadAttachments),
            ("51-", ParseError::BadPayload),
            ("61-[]", ParseError::BadAckId),
            ("21234567890123456[]", ParseError::BadAckId),
            ("4{\"message\":\"x\"}", ParseError::BadType),
            // Found by the fuzz target `sio`: slicing after a multi-byte first
            // character panicked (`ÿ33[ ]`, `ÿ1`).
            ("\u{ff}33[ ]", ParseError::BadType),
            ("\u{ff}1", ParseError::BadType),
            ("\u{1F600}2[\"event\",{}]", ParseError::BadType),
            ("é", ParseError::BadType),
        ] {
            assert_eq!(parse(junk), Err(why), "{junk:?}");
        }
    }

    #[test]
    fn event_args_borrow_and_skip_the_rest() {
        let a = EventArgs::parse(r#"["event",{"id":"a"},1,[2]]"#).unwrap();
        assert_eq!(a.name, "event");
        assert!(matches!(a.name, std::borrow::Cow::Borrowed(_)));
        assert_eq!(a.arg.unwrap().get(), r#"{"id":"a"}"#);
        let a = EventArgs::parse(r#"["sync"]"#).unwrap();
        assert_eq!(a.name, "sync");
        assert!(a.arg.is_none());
        assert_eq!(
            EventArgs::parse(r#"["\u0065vent",1]"#).unwrap().name,
            "event"
        );
        for bad in ["[]", "[1]", "{}", "[\"a\",", "[\"a\"] x"] {
            assert!(EventArgs::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn encodes_what_socket_io_client_reads() {
        // Each with the Engine.IO message type `4` in front.
        assert_eq!(connect_ok("abc"), r#"40{"sid":"abc"}"#);
        assert_eq!(
            connect_error("/", "bad_signature"),
            r#"44{"message":"bad_signature"}"#
        );
        assert_eq!(
            connect_error("/x", "Invalid namespace"),
            r#"44/x,{"message":"Invalid namespace"}"#
        );
        assert_eq!(event("synced", r#"{"seq":3}"#), r#"42["synced",{"seq":3}]"#);
        assert_eq!(ack(42, r#"{"ok":true}"#), r#"4342[{"ok":true}]"#);
        for n in [0u64, 7, 10, 12345, u64::MAX] {
            let mut s = String::new();
            push_u64(&mut s, n);
            assert_eq!(s, n.to_string());
        }
    }
}
