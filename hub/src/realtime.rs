//! Socket.IO for store devices: the handshake (token check, realm, catch-up cursor)
//! and the `event`, `events` and `sync` messages.
//!
//! Ordering: socketioxide runs a socket's async handlers concurrently, so the
//! hub does its work in the *extractor* ([`SubmitOne`], [`SubmitMany`]), which
//! socketioxide calls synchronously, in arrival order, for each packet. The event
//! is validated and queued to the realm's writer right there; one device's events
//! are therefore stored in the order it sent them.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use socketioxide::adapter::LocalAdapter;
use socketioxide::extract::{AckSender, SocketRef, State, TryData};
use socketioxide::handler::{ConnectHandler, FromMessageParts};
use socketioxide::socket::Socket;
use socketioxide::{SocketIo, SocketIoConfig};
use socketioxide_core::Value;

use crate::auth::token::{self, TokenError};
use crate::auth::Policy;
use crate::log::event::{parse_batch_packet, parse_event_packet, push_json_str, EventError};
use crate::log::{Appended, Origin, WriteReq};
use crate::realm::{AckErr, AckReply, DeviceEntry, RawJson, Realm, Realms, PAGE};
use crate::util::now_ms;

/// What the Socket.IO side needs to admit devices.
pub struct Gate {
    pub realms: Arc<Realms>,
    pub policy: Policy,
    pub grace_secs: i64,
    pub clock: Arc<crate::clock::Clock>,
}

/// The largest WebSocket message accepted: a full `events` batch of small events.
/// A single event's payload is limited separately to 64 KiB.
pub const MAX_MESSAGE: usize = 8 << 20;

/// The WebSocket read buffer per connection (grows for larger messages).
pub const WS_READ_BUFFER: usize = 1024;

/// Builds the Socket.IO layer for `/socket.io/`.
pub fn build(
    gate: Arc<Gate>,
    socket_buffer: usize,
) -> (socketioxide::layer::SocketIoLayer, SocketIo) {
    let mut config = SocketIoConfig::default();
    config.engine_config.max_buffer_size = socket_buffer;
    let (layer, io) = SocketIo::builder()
        .max_buffer_size(socket_buffer)
        .max_payload(MAX_MESSAGE as u64)
        .ws_max_message_size(MAX_MESSAGE)
        .ws_max_frame_size(MAX_MESSAGE)
        .connect_timeout(Duration::from_secs(20))
        .ws_read_buffer_size(WS_READ_BUFFER)
        .with_state(gate)
        .build_layer();
    io.ns("/", on_connect.with(authenticate));
    (layer, io)
}

/// Copies a Socket.IO request's URI and headers out of hyper's connection read buffer.
///
/// hyper parses them as slices of its 8 KiB read buffer, and socketioxide keeps the
/// handshake request's parts for the life of the socket, so without this every connected
/// device pins that buffer: about a third of an idle connection's memory. Other requests
/// pass untouched.
pub async fn detach_request(req: axum::extract::Request) -> axum::extract::Request {
    use axum::http::{HeaderMap, HeaderName, HeaderValue, Uri};
    if !req.uri().path().starts_with("/socket.io") {
        return req;
    }
    let (mut parts, body) = req.into_parts();
    if let Ok(uri) = parts.uri.to_string().parse::<Uri>() {
        parts.uri = uri;
    }
    let mut headers = HeaderMap::with_capacity(parts.headers.len());
    for (name, value) in &parts.headers {
        let name =
            HeaderName::from_bytes(name.as_str().as_bytes()).unwrap_or_else(|_| name.clone());
        let mut copy = HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
        copy.set_sensitive(value.is_sensitive());
        headers.append(name, copy);
    }
    parts.headers = headers;
    axum::extract::Request::from_parts(parts, body)
}

/// Per-socket state, kept in the socket's extensions.
pub struct DeviceCtx {
    pub realm: Arc<Realm>,
    pub device_id: Arc<str>,
    pub role: String,
    pub since: Option<u64>,
    pub in_grace: bool,
}

#[derive(Debug, Deserialize, Default)]
struct AuthIn {
    #[serde(default)]
    token: Option<serde_json::Value>,
    #[serde(default)]
    since: Option<serde_json::Value>,
}

/// A refused connection; its Display is the stable code devices see.
#[derive(Debug)]
pub struct Refused(pub &'static str);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}
impl std::error::Error for Refused {}

fn parse_since(v: Option<&serde_json::Value>) -> Result<Option<u64>, Refused> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Number(n)) => n.as_u64().map(Some).ok_or(Refused("invalid_since")),
        Some(serde_json::Value::String(s)) => s
            .parse::<u64>()
            .map(Some)
            .map_err(|_| Refused("invalid_since")),
        Some(_) => Err(Refused("invalid_since")),
    }
}

/// Connect middleware: checks the token and picks the realm. Runs before the
/// device is told it is connected, so handlers are in place before its first event.
async fn authenticate(
    s: SocketRef,
    State(gate): State<Arc<Gate>>,
    auth: TryData<AuthIn>,
) -> Result<(), Refused> {
    let auth = auth.0.unwrap_or_default();
    let token = match &auth.token {
        Some(serde_json::Value::String(t)) if !t.is_empty() => t.as_str(),
        _ => return Err(Refused(TokenError::MissingToken.code())),
    };
    let since = parse_since(auth.since.as_ref())?;
    let (tenant, store) = token::peek_realm(token).map_err(|e| Refused(e.code()))?;
    let Some(realm) = gate.realms.get(&tenant, &store) else {
        return Err(Refused(TokenError::WrongRealm.code()));
    };
    if realm.is_shutting_down() {
        return Err(Refused("shutting_down"));
    }
    let v = token::verify(&realm.cfg.keys, token, gate.clock.now_secs(), &gate.policy).map_err(|e| {
        tracing::debug!(sid = %s.id, realm = %realm.key(), code = e.code(), "connection refused");
        Refused(e.code())
    })?;
    let c = v.claims;
    if c.tenant_id != realm.cfg.tenant_id || c.store_id != realm.cfg.store_id {
        return Err(Refused(TokenError::WrongRealm.code()));
    }
    let in_grace = match v.expired_by {
        None => {
            realm.admit(&c.device_id, &c.role, c.exp);
            false
        }
        Some(by) if by <= gate.grace_secs && realm.is_admitted(&c.device_id) => {
            tracing::info!(device = %c.device_id, realm = %realm.key(), expired_secs = by, "admitted in offline grace");
            true
        }
        Some(by) => {
            tracing::debug!(device = %c.device_id, expired_secs = by, "expired token refused");
            return Err(Refused(TokenError::Expired(by).code()));
        }
    };
    s.extensions.insert(Arc::new(DeviceCtx {
        realm: realm.clone(),
        device_id: Arc::from(c.device_id.as_str()),
        role: c.role,
        since,
        in_grace,
    }));
    s.on("event", async |_: SubmitOne| {});
    s.on("events", async |_: SubmitMany| {});
    s.on("sync", on_sync);
    s.on_disconnect(async |s: SocketRef| {
        if let Some(ctx) = s.extensions.get::<Arc<DeviceCtx>>() {
            ctx.realm.device_left(s.id);
        }
    });
    Ok(())
}

async fn on_connect(s: SocketRef) {
    let Some(ctx) = s.extensions.get::<Arc<DeviceCtx>>() else {
        return;
    };
    ctx.realm.device_connected(
        s.id,
        DeviceEntry {
            device_id: ctx.device_id.to_string(),
            role: ctx.role.clone(),
            connected_since: now_ms(),
            in_grace: ctx.in_grace,
        },
    );
    tracing::debug!(sid = %s.id, device = %ctx.device_id, realm = %ctx.realm.key(), since = ?ctx.since, "device connected");
    ctx.realm.clone().catch_up(s, ctx.since).await;
}

type Sock = Arc<Socket<LocalAdapter>>;

fn reply_for(s: &Sock, v: &mut Value, ack_id: &Option<i64>) -> AckReply {
    if ack_id.is_none() {
        return AckReply::None;
    }
    match (
        AckSender::from_message_parts(s, v, ack_id),
        SocketRef::from_message_parts(s, v, ack_id),
    ) {
        (Ok(ack), Ok(sock)) => AckReply::Socket { ack, sock },
        _ => AckReply::None,
    }
}

fn text(v: &Value) -> Result<&str, EventError> {
    match v {
        Value::Str(s, bins) if bins.as_ref().is_none_or(|b| b.is_empty()) => Ok(s.as_str()),
        _ => Err(EventError::Binary),
    }
}

fn refuse_now(reply: AckReply, e: &EventError) {
    if let AckReply::Socket { ack, .. } = reply {
        let _ = ack.send(&AckErr::new(e));
    }
}

/// Validates one packet with `parse` and queues it to the realm's writer, right
/// here in the extractor (synchronous, in arrival order); refusals are acked now.
fn submit(
    s: &Sock,
    v: &mut Value,
    ack_id: &Option<i64>,
    parse: fn(&str) -> Result<Appended, EventError>,
) {
    let Some(ctx) = s.extensions.get::<Arc<DeviceCtx>>() else {
        return;
    };
    let reply = reply_for(s, v, ack_id);
    match text(v).and_then(parse) {
        Ok(events) => ctx.realm.submit(WriteReq::Append {
            events,
            device: ctx.device_id.clone(),
            origin: Origin::Lan,
            tag: Some(s.id),
            reply,
            meta: None,
        }),
        Err(e) => refuse_now(reply, &e),
    }
}

/// `event {id, type, payload, ts?}`: validated and queued in arrival order.
pub struct SubmitOne;

impl FromMessageParts<LocalAdapter> for SubmitOne {
    type Error = Infallible;
    fn from_message_parts(
        s: &Sock,
        v: &mut Value,
        ack_id: &Option<i64>,
    ) -> Result<Self, Infallible> {
        submit(s, v, ack_id, |p| parse_event_packet(p).map(Appended::One));
        Ok(SubmitOne)
    }
}

/// `events [..]`: up to 500 events, stored in order, one result each.
pub struct SubmitMany;

impl FromMessageParts<LocalAdapter> for SubmitMany {
    type Error = Infallible;
    fn from_message_parts(
        s: &Sock,
        v: &mut Value,
        ack_id: &Option<i64>,
    ) -> Result<Self, Infallible> {
        submit(s, v, ack_id, |p| parse_batch_packet(p).map(Appended::Many));
        Ok(SubmitMany)
    }
}

#[derive(Debug, Deserialize)]
struct SyncReq {
    #[serde(default)]
    since: u64,
    #[serde(default)]
    limit: Option<usize>,
}

/// `sync {since, limit}` -> `{ok, events:[..], lastSeq}`: one page on request.
async fn on_sync(s: SocketRef, req: TryData<SyncReq>, ack: AckSender) {
    let Some(ctx) = s.extensions.get::<Arc<DeviceCtx>>() else {
        return;
    };
    let req = match req.0 {
        Ok(r) => r,
        Err(_) => {
            let _ = ack.send(&AckErr::new(&EventError::Invalid));
            return;
        }
    };
    let limit = req.limit.unwrap_or(500).clamp(1, PAGE);
    let realm = ctx.realm.clone();
    let since = req.since;
    let page = tokio::task::spawn_blocking(move || realm.read_page(since, limit)).await;
    let page = match page {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            let _ = ack.send(&AckErr::new(&EventError::Storage(e.to_string())));
            return;
        }
        Err(_) => return,
    };
    let mut out = String::with_capacity(64 + page.iter().map(|(_, j)| j.len() + 1).sum::<usize>());
    out.push_str("{\"ok\":true,\"events\":[");
    for (i, (_, json)) in page.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(json);
    }
    out.push_str("],\"lastSeq\":");
    out.push_str(&ctx.realm.fanned_seq().to_string());
    out.push('}');
    let _ = ack.send(&RawJson(&out));
}

/// Escapes a string for JSON (re-exported for hub notices).
pub fn json_str(s: &str) -> String {
    let mut out = String::new();
    push_json_str(&mut out, s);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Bytes;
    use axum::http::{HeaderValue, Uri};

    fn inside(buf: &[u8], part: &[u8]) -> bool {
        let (b, p) = (buf.as_ptr() as usize, part.as_ptr() as usize);
        p >= b && p < b + buf.len()
    }

    #[tokio::test]
    async fn socket_io_requests_no_longer_point_into_the_read_buffer() {
        // As hyper does: the URI and header values are slices of one connection buffer.
        let mut raw = vec![b'x'; 8192];
        raw[..40].copy_from_slice(b"/socket.io/?EIO=4&transport=websocket&a=");
        raw[40..50].copy_from_slice(b"keep-alive");
        let buf = Bytes::from(raw);
        let uri = Uri::from_maybe_shared(buf.slice(..40)).unwrap();
        let value = HeaderValue::from_maybe_shared(buf.slice(40..50)).unwrap();
        assert!(inside(&buf, value.as_bytes()));
        let req = axum::extract::Request::builder()
            .uri(uri)
            .header("connection", value)
            .header("x-till", "7")
            .body(axum::body::Body::empty())
            .unwrap();
        let out = detach_request(req).await;
        assert_eq!(out.uri(), "/socket.io/?EIO=4&transport=websocket&a=");
        assert_eq!(out.headers()["connection"], "keep-alive");
        assert_eq!(out.headers()["x-till"], "7");
        assert!(!inside(&buf, out.headers()["connection"].as_bytes()));
        assert!(!inside(&buf, out.uri().query().unwrap().as_bytes()));
    }

    #[tokio::test]
    async fn other_requests_pass_untouched() {
        let buf = Bytes::from_static(b"keep-alive");
        let req = axum::extract::Request::builder()
            .uri("/status")
            .header(
                "connection",
                HeaderValue::from_maybe_shared(buf.clone()).unwrap(),
            )
            .body(axum::body::Body::empty())
            .unwrap();
        let out = detach_request(req).await;
        assert!(inside(&buf, out.headers()["connection"].as_bytes()));
    }
}
