//! Our own Socket.IO v5 packet parser (`link::sio`), as a device's message reaches
//! it: every text frame goes through `sio::parse`, then the hub's dispatch of an
//! event packet (`Inner::event` in `realtime.rs`: `EventArgs`, then `event` /
//! `events` / `sync` by name) and of a CONNECT's auth object (`parse_auth`).
//!
//! Input: `packet [0xFF name [0xFF json]]`. The packet is parsed; `name` and `json`
//! feed the encoders (the hub's own packets must parse back to what was encoded).
//!
//! Properties: a packet that parses re-encodes to text that parses to the same
//! packet; namespaces start with `/` and hold no `,`; an event's data is a JSON
//! array whose name and first argument `EventArgs` reads exactly as serde_json
//! does; binary packets announce 1-16 attachments and a binary ack has an id;
//! refusals are the documented codes; an ack for any id the parser accepts parses
//! back to that id; `event`, `connect_error`, `connect_ok` and `push_u64` encode
//! what they were given.

use pos_hub::link::sio::{self, EventArgs, Packet, MAX_ATTACHMENTS};
use pos_hub::log::event::{batch_from_arg, event_from_arg, MAX_BATCH};
use pos_hub::realtime;
use serde_json::Value;

use crate::event::{check_accepted, check_refused, PARSE_CODES};
use crate::util::{split, text};

/// The largest ack id the parser takes (15 digits).
const MAX_ID: u64 = 999_999_999_999_999;

pub fn run(data: &[u8]) {
    let parts = split(data, 3);
    let Some(packet) = text(parts[0]) else { return };
    let name = text(parts[1]).unwrap_or("event");
    let json = text(parts[2]).unwrap_or("{}");
    let parsed = sio::parse(packet);
    if let Ok(p) = &parsed {
        check_packet(packet, p);
        let again = encode(p);
        assert_eq!(
            sio::parse(&again).as_ref(),
            Ok(p),
            "{packet:?} re-encoded as {again:?}"
        );
        if let Packet::Event { id: Some(id), .. } | Packet::Binary { id: Some(id), .. } = p {
            check_ack(*id);
        }
        check_connect_error(p, name);
    }
    check_encoders(name, json, parts[1]);
}

/// `ns` with the separator the wire needs (`/` is left out, as socket.io-client does).
fn push_ns(out: &mut String, ns: &str) {
    if ns != "/" {
        out.push_str(ns);
        out.push(',');
    }
}

/// The packet as a Socket.IO v5 sender writes it (the data the parser drops is `[]`).
fn encode(p: &Packet) -> String {
    let mut out = String::new();
    match p {
        Packet::Connect { ns, auth } => {
            out.push('0');
            push_ns(&mut out, ns);
            out.push_str(auth.unwrap_or(""));
        }
        Packet::Disconnect { ns } => {
            out.push('1');
            push_ns(&mut out, ns);
        }
        Packet::Event { ns, id, data } => {
            out.push('2');
            push_ns(&mut out, ns);
            if let Some(id) = id {
                sio::push_u64(&mut out, *id);
            }
            out.push_str(data);
        }
        Packet::Ack { ns, id } => {
            out.push('3');
            push_ns(&mut out, ns);
            sio::push_u64(&mut out, *id);
            out.push_str("[]");
        }
        Packet::Binary {
            ns,
            id,
            attachments,
            ack,
        } => {
            out.push(if *ack { '6' } else { '5' });
            sio::push_u64(&mut out, u64::from(*attachments));
            out.push('-');
            push_ns(&mut out, ns);
            if let Some(id) = id {
                sio::push_u64(&mut out, *id);
            }
            out.push_str("[{\"_placeholder\":true,\"num\":0}]");
        }
    }
    out
}

fn check_ns(ns: &str) {
    assert!(ns.starts_with('/'), "namespace {ns:?}");
    assert!(!ns.contains(','), "namespace {ns:?} holds the separator");
}

fn check_packet(text: &str, p: &Packet) {
    match p {
        Packet::Connect { ns, auth } => {
            check_ns(ns);
            if let Some(a) = auth {
                assert!(a.starts_with('{'), "connect auth {a:?}");
                assert!(text.ends_with(a));
                // The handshake's auth object, as `Inner::connect` reads it.
                crate::auth::run(a.as_bytes());
            }
        }
        Packet::Disconnect { ns } => check_ns(ns),
        Packet::Ack { ns, id } => {
            check_ns(ns);
            assert!(*id <= MAX_ID);
        }
        Packet::Binary {
            ns,
            id,
            attachments,
            ack,
        } => {
            check_ns(ns);
            assert!((1..=MAX_ATTACHMENTS).contains(attachments));
            assert!(!ack || id.is_some(), "binary ack without an id");
            assert!(id.is_none_or(|i| i <= MAX_ID));
        }
        Packet::Event { ns, id, data } => {
            check_ns(ns);
            assert!(id.is_none_or(|i| i <= MAX_ID));
            assert!(data.starts_with('['), "event data {data:?}");
            assert!(text.ends_with(data));
            check_event_data(data);
        }
    }
}

/// What `Inner::event` does with an event packet's JSON array.
fn check_event_data(data: &str) {
    // Its one-pass read of `["event",{..}]` answers as the general parse, for the
    // input as it is and as the argument of an `event` packet.
    for d in [data.to_string(), format!("[\"event\",{data}]")] {
        assert_eq!(
            format!("{:?}", realtime::request(&d)),
            format!("{:?}", realtime::request_general(&d)),
            "the one-pass read of {d:?}"
        );
    }
    let args = EventArgs::parse(data);
    // EventArgs reads the array exactly as serde_json does (where serde_json can:
    // it refuses numbers out of f64 range that EventArgs only skips).
    if let Ok(v) = serde_json::from_str::<Vec<Value>>(data) {
        match v.first() {
            Some(Value::String(n)) => {
                let a = args
                    .as_ref()
                    .unwrap_or_else(|| panic!("EventArgs refused {data:?}"));
                assert_eq!(&*a.name, n.as_str());
                let arg = a
                    .arg
                    .map(|r| serde_json::from_str::<Value>(r.get()).expect("argument was JSON"));
                assert_eq!(arg.as_ref(), v.get(1), "first argument of {data:?}");
            }
            _ => assert!(args.is_none(), "EventArgs took {data:?}"),
        }
    }
    let Some(args) = args else { return }; // the hub cuts the connection
    match &*args.name {
        "event" => match event_from_arg(args.arg) {
            Ok(ev) => check_accepted(&ev),
            Err(e) => check_refused(&e, PARSE_CODES),
        },
        "events" => match batch_from_arg(args.arg) {
            Ok(list) => {
                assert!((1..=MAX_BATCH).contains(&list.len()));
                for r in &list {
                    match r {
                        Ok(ev) => check_accepted(ev),
                        Err(e) => check_refused(e, PARSE_CODES),
                    }
                }
            }
            Err(e) => check_refused(&e, &["invalid_event", "too_many_events"]),
        },
        "sync" => {
            if let Some(a) = args.arg {
                crate::sync::run(a.get().as_bytes());
            }
        }
        _ => {}
    }
    if let (Some(a), Ok(Some(raw))) = (
        args.arg,
        serde_json::from_str::<Vec<&serde_json::value::RawValue>>(data).map(|v| v.get(1).copied()),
    ) {
        assert_eq!(a.get(), raw.get(), "argument text of {data:?}");
    }
}

/// The encoders write the Engine.IO message type `4` first; the rest is Socket.IO.
fn sio_of(e: &str) -> &str {
    assert!(e.starts_with('4'), "not an Engine.IO message: {e:?}");
    &e[1..]
}

/// The hub answers an event with id `id` with `3<id>[..]`: it parses back to that id.
fn check_ack(id: u64) {
    let a = sio::ack(id, "{\"ok\":true}");
    assert_eq!(
        sio::parse(sio_of(&a)),
        Ok(Packet::Ack { ns: "/", id }),
        "ack {a:?}"
    );
}

/// A refused CONNECT (`4[ns,]{"message":..}`) names the namespace and carries the message.
fn check_connect_error(p: &Packet, message: &str) {
    let Packet::Connect { ns, .. } = p else {
        return;
    };
    let e = sio::connect_error(ns, message);
    assert!(sio_of(&e).starts_with('4'));
    // The same packet as a CONNECT (type 0) lets the parser read its parts back.
    let as_connect = format!("0{}", &e[2..]);
    match sio::parse(&as_connect) {
        Ok(Packet::Connect {
            ns: n,
            auth: Some(j),
        }) => {
            assert_eq!(n, *ns);
            let v: Value = serde_json::from_str(j).expect("connect_error is JSON");
            assert_eq!(v, serde_json::json!({ "message": message }));
        }
        other => panic!("connect_error {e:?} reads back as {other:?}"),
    }
}

fn check_encoders(name: &str, json: &str, raw: &[u8]) {
    // `2["<name>",<json>]`: the fan-out's and the hub notices' event packets.
    if let Ok(want) = serde_json::from_str::<Value>(json) {
        let e = sio::event(name, json);
        match sio::parse(sio_of(&e)) {
            Ok(Packet::Event {
                ns: "/",
                id: None,
                data,
            }) => {
                let a = EventArgs::parse(data).unwrap_or_else(|| panic!("{e:?}"));
                assert_eq!(&*a.name, name);
                let got: Value = serde_json::from_str(a.arg.expect("an argument").get())
                    .expect("argument is JSON");
                assert_eq!(got, want);
            }
            other => panic!("event {e:?} parses as {other:?}"),
        }
    }
    // `0{"sid":".."}` with a session id (engineioxide's are base64url).
    let sid: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(20)
        .collect();
    let ok = sio::connect_ok(&sid);
    match sio::parse(sio_of(&ok)) {
        Ok(Packet::Connect {
            ns: "/",
            auth: Some(j),
        }) => {
            let v: Value = serde_json::from_str(j).expect("connect_ok is JSON");
            assert_eq!(v, serde_json::json!({ "sid": sid }));
        }
        other => panic!("connect_ok {ok:?} parses as {other:?}"),
    }
    // Decimal digits, and acks for ids up to the parser's limit.
    let mut b = [0u8; 8];
    let n = raw.len().min(8);
    b[..n].copy_from_slice(&raw[..n]);
    let n = u64::from_le_bytes(b);
    let mut s = String::new();
    sio::push_u64(&mut s, n);
    assert_eq!(s, n.to_string());
    check_ack(n % (MAX_ID + 1));
}
