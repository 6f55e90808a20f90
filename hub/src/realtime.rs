//! Socket.IO for store devices, over Engine.IO (engineioxide): the handshake
//! (token, realm, catch-up cursor) and the `event`, `events` and `sync` messages.
//!
//! Ordering: Engine.IO hands a connection's messages to [`Hub`] one at a time, in
//! arrival order, on the connection's own task; each event is validated and queued
//! to the realm's writer right there, synchronously. One device's events are
//! therefore stored in the order it sent them, and no task is spawned per event.
//!
//! Hostile input: nothing a connection sends can hold more than a few words of
//! state or wait on anything shared. A packet that is not Socket.IO closes that
//! connection; binary attachments are counted and skipped, never kept; a
//! connection that has not completed the Socket.IO handshake within
//! [`CONNECT_TIMEOUT`], or fails it [`MAX_REFUSED`] times, is closed. The limits
//! of the layers below are set in [`build`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use engineioxide::config::EngineIoConfig;
use engineioxide::handler::EngineIoHandler;
use engineioxide::layer::EngineIoLayer;
use parking_lot::Mutex;
use serde::Deserialize;

use crate::auth::token::{self, TokenError};
use crate::auth::Policy;
use crate::conn::Cut;
use crate::link::sio::{self, EventArgs, Packet};
use crate::link::{self, ws, Device, DisconnectReason, EioSocket, Sid, Sock, Socket, Why};
use crate::log::event::{batch_from_arg, event_from_arg, push_json_str, EventError, NewEvent};
use crate::log::{Appended, Origin, WriteReq};
use crate::realm::{AckErr, AckReply, DeviceEntry, Realm, Realms, PAGE};
use crate::util::now_ms;

/// What the Socket.IO side needs to admit devices.
pub struct Gate {
    pub realms: Arc<Realms>,
    pub policy: Policy,
    pub grace_secs: i64,
    pub clock: Arc<crate::clock::Clock>,
}

/// The largest WebSocket message (and HTTP long-polling body) accepted: a full
/// `events` batch of small events. A single event's payload is limited to 64 KiB.
pub const MAX_MESSAGE: usize = 8 << 20;
/// The WebSocket read buffer per connection (grows for larger messages).
pub const WS_READ_BUFFER: usize = 1024;
/// A connection must complete the Socket.IO handshake within this.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Refused CONNECTs on one connection before it is closed.
pub const MAX_REFUSED: u8 = 3;
/// Engine.IO heartbeat: a ping every interval, a pong due within the timeout
/// (a connection stuck in a half-sent frame cannot answer and is closed).
pub const PING_INTERVAL: Duration = Duration::from_secs(25);
pub const PING_TIMEOUT: Duration = Duration::from_secs(20);
/// A polling-to-WebSocket upgrade must finish within this.
pub const UPGRADE_TIMEOUT: Duration = Duration::from_secs(10);

/// The Engine.IO handler: every device connection of every realm.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    gate: Arc<Gate>,
    /// Every open connection (for shutdown and for upgrades to find theirs).
    sockets: Mutex<HashMap<Sid, Weak<Socket>>>,
    stopping: AtomicBool,
    /// The limits of a direct WebSocket connection (the same as engineioxide's).
    limits: ws::Limits,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("connections", &self.inner.sockets.lock().len())
            .finish()
    }
}

/// Builds the Engine.IO layer for `/socket.io/` and the handle to stop it.
pub fn build(
    gate: Arc<Gate>,
    socket_buffer: usize,
    socket_buffer_bytes: usize,
) -> (EngineIoLayer<Hub>, Hub) {
    let config = EngineIoConfig::builder()
        .req_path("/socket.io")
        .max_buffer_size(socket_buffer + link::HEADROOM)
        .max_payload(MAX_MESSAGE as u64)
        .ws_max_message_size(MAX_MESSAGE)
        .ws_max_frame_size(MAX_MESSAGE)
        .ws_read_buffer_size(WS_READ_BUFFER)
        .ping_interval(PING_INTERVAL)
        .ping_timeout(PING_TIMEOUT)
        .upgrade_timeout(UPGRADE_TIMEOUT)
        .build();
    let hub = Hub {
        inner: Arc::new(Inner {
            gate,
            sockets: Mutex::new(HashMap::new()),
            stopping: AtomicBool::new(false),
            limits: ws::Limits {
                queue: socket_buffer,
                queue_bytes: socket_buffer_bytes,
                max_message: MAX_MESSAGE,
                read_buffer: WS_READ_BUFFER,
                ping_interval: PING_INTERVAL,
                ping_timeout: PING_TIMEOUT,
            },
        }),
    };
    (
        EngineIoLayer::from_config(Arc::new(hub.clone()), config),
        hub,
    )
}

impl Hub {
    /// Closes every connection (devices reconnect to the next hub) and waits up to
    /// `within` for their queues to flush.
    pub async fn close(&self, within: Duration) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        let socks: Vec<Sock> = self
            .inner
            .sockets
            .lock()
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        for s in &socks {
            link::cut(s, Why::Shutdown);
        }
        let all = futures_util::future::join_all(socks.iter().map(|s| s.closed()));
        let _ = tokio::time::timeout(within, all).await;
    }

    /// How many connections are open (devices and handshakes).
    pub fn connections(&self) -> usize {
        self.inner.sockets.lock().len()
    }
}

/// Request middleware for `/socket.io/`: copies the request's URI and headers out of
/// hyper's read buffer, and gives an upgrading WebSocket's connection to its session.
///
/// hyper parses the URI and header values as slices of its 8 KiB connection read
/// buffer, and Engine.IO keeps the handshake request's parts for the life of the
/// socket, so without the copy every connected device pins that buffer. Other
/// requests pass untouched.
pub async fn prepare(
    axum::extract::State(hub): axum::extract::State<Hub>,
    req: axum::extract::Request,
) -> axum::extract::Request {
    if !req.uri().path().starts_with("/socket.io") {
        return req;
    }
    let req = detach_request(req);
    // A polling session upgrading to WebSocket: the WebSocket runs on this request's
    // connection, which is the one to cut if the device stops reading.
    if let (Some(sid), Some(cut)) = (upgrade_sid(req.uri()), req.extensions().get::<Arc<Cut>>()) {
        let sock = hub.inner.sockets.lock().get(&sid).and_then(Weak::upgrade);
        if let Some(s) = sock {
            s.data.set_cut(cut.clone());
        }
    }
    req
}

fn upgrade_sid(uri: &axum::http::Uri) -> Option<Sid> {
    let q = uri.query()?;
    let mut sid = None;
    let mut ws = false;
    for kv in q.split('&') {
        match kv.split_once('=') {
            Some(("sid", v)) => sid = v.parse::<Sid>().ok(),
            Some(("transport", "websocket")) => ws = true,
            _ => {}
        }
    }
    sid.filter(|_| ws)
}

/// Copies a request's URI and headers into buffers of their own.
pub fn detach_request(req: axum::extract::Request) -> axum::extract::Request {
    use axum::http::{HeaderMap, HeaderName, HeaderValue, Uri};
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

#[derive(Debug, Deserialize, Default)]
struct AuthIn {
    #[serde(default)]
    token: Option<serde_json::Value>,
    #[serde(default)]
    since: Option<serde_json::Value>,
    /// The log the device's cursor belongs to (the `logId` of an earlier `synced`).
    #[serde(default, rename = "logId")]
    log_id: Option<serde_json::Value>,
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

/// The token and catch-up cursor of a handshake `auth` object, or the refusal.
fn auth_fields(auth: &AuthIn) -> Result<(&str, Option<u64>), Refused> {
    let token = match &auth.token {
        Some(serde_json::Value::String(t)) if !t.is_empty() => t.as_str(),
        _ => return Err(Refused(TokenError::MissingToken.code())),
    };
    Ok((token, parse_since(auth.since.as_ref())?))
}

/// The handshake `auth` object as JSON text -> token and cursor (fuzz/ entry point;
/// a handshake whose auth does not deserialize counts as one without a token).
#[doc(hidden)]
pub fn parse_auth(json: &str) -> Result<(String, Option<u64>), Refused> {
    auth_fields(&auth_in(json)).map(|(t, s)| (t.to_string(), s))
}

/// The handshake `auth` as sent: an object only (serde's derive also takes an array,
/// `["tok"]` as `{token: "tok"}`; found by the fuzz target `auth`), anything else none.
fn auth_in(json: &str) -> AuthIn {
    if !json.trim_start().starts_with('{') {
        return AuthIn::default();
    }
    serde_json::from_str(json).unwrap_or_default()
}

/// An admitted device: who it is, where, and from which seq it catches up.
struct Admitted {
    device: Device,
    since: Option<u64>,
}

impl Inner {
    /// Checks the handshake's token and picks the realm.
    fn authenticate(&self, sid: Sid, auth: &AuthIn) -> Result<Admitted, Refused> {
        let gate = &self.gate;
        let (token, since) = auth_fields(auth)?;
        let (tenant, store) = token::peek_realm(token).map_err(|e| Refused(e.code()))?;
        let Some((index, realm)) = gate.realms.find(&tenant, &store) else {
            return Err(Refused(TokenError::WrongRealm.code()));
        };
        if realm.is_shutting_down() || self.stopping.load(Ordering::Relaxed) {
            return Err(Refused("shutting_down"));
        }
        let v = token::verify(&realm.cfg.keys, token, gate.clock.now_secs(), &gate.policy)
            .map_err(|e| {
                tracing::debug!(%sid, realm = %realm.key(), code = e.code(), "connection refused");
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
        Ok(Admitted {
            device: Device {
                realm: index,
                device_id: Arc::from(c.device_id.as_str()),
                role: Arc::from(c.role.as_str()),
                in_grace,
            },
            since,
        })
    }

    fn connect(&self, s: &Sock, ns: &str, auth: Option<&str>) {
        if ns != "/" {
            return send(s, sio::connect_error(ns, "Invalid namespace"));
        }
        if s.data.device.get().is_some() {
            return; // a second CONNECT on a connected socket is ignored
        }
        let auth = auth.map(auth_in).unwrap_or_default();
        let admitted = match self.authenticate(s.id, &auth) {
            Ok(a) => a,
            Err(Refused(code)) => return refuse(s, code, sio::connect_error("/", code)),
        };
        let Some(realm) = self.gate.realms.at(admitted.device.realm).cloned() else {
            return;
        };
        match (&auth.log_id, &realm.log_id) {
            (None | Some(serde_json::Value::Null), _) => {}
            (Some(serde_json::Value::String(theirs)), Some(ours)) if **theirs != **ours => {
                // The device's cursor numbers another log (this hub was reset or
                // replaced): refuse rather than replay from a seq of that other log; it
                // starts this one from 0. This log's id and last seq go in `data`.
                tracing::info!(sid = %s.id, realm = %realm.key(), since = ?admitted.since, "a device's cursor belongs to another log; it is told to start this one from 0");
                let mut p = String::from("44{\"message\":\"log_changed\",\"data\":{\"logId\":");
                push_json_str(&mut p, ours);
                p.push_str(",\"lastSeq\":");
                sio::push_u64(&mut p, realm.fanned_seq());
                p.push_str("}}");
                return refuse(s, "log_changed", p);
            }
            (Some(serde_json::Value::String(_)), _) => {}
            (Some(_), _) => {
                let code = "invalid_log_id";
                return refuse(s, code, sio::connect_error("/", code));
            }
        }
        if let Some(oldest) = admitted.since.and_then(|n| realm.cursor_expired(n)) {
            // Retention deleted events after this cursor: refuse rather than replay with
            // a gap; the oldest seq still kept goes in the CONNECT_ERROR's `data`.
            tracing::debug!(sid = %s.id, since = ?admitted.since, oldest, "cursor expired");
            let mut p = String::from("44{\"message\":\"cursor_expired\",\"data\":{\"oldestSeq\":");
            sio::push_u64(&mut p, oldest);
            p.push_str("}}");
            return refuse(s, "cursor_expired", p);
        }
        let entry = DeviceEntry {
            device_id: admitted.device.device_id.to_string(),
            role: admitted.device.role.to_string(),
            connected_since: now_ms(),
            in_grace: admitted.device.in_grace,
            send_buffer_bytes: 0,
            sock: Arc::downgrade(s),
        };
        let device_id = admitted.device.device_id.clone();
        if s.data.device.set(admitted.device).is_err() {
            return;
        }
        crate::metrics::device_connected(&entry.role);
        realm.device_connected(s.id, entry);
        send(s, sio::connect_ok(&s.id.to_string()));
        tracing::debug!(sid = %s.id, device = %device_id, realm = %realm.key(), since = ?admitted.since, "device connected");
        tokio::spawn(realm.catch_up(s.clone(), admitted.since));
    }

    fn event(&self, s: &Sock, id: Option<u64>, data: &str) {
        let Some(dev) = s.data.device.get() else {
            return; // not connected to "/": Socket.IO ignores it
        };
        let Some(realm) = self.gate.realms.at(dev.realm) else {
            return;
        };
        match request(data) {
            Request::Append(events) => append(s, dev, realm, id, events),
            Request::Sync(arg) => sync(realm.clone(), reply_to(s, id), arg),
            Request::Bad => link::cut(s, Why::BadPacket),
        }
    }
}

/// Sends a CONNECT_ERROR; a socket refused [`MAX_REFUSED`] times is cut.
fn refuse(s: &Sock, code: &'static str, packet: String) {
    crate::metrics::device_refused(code);
    send(s, packet);
    if s.data.refused.fetch_add(1, Ordering::Relaxed) + 1 >= MAX_REFUSED {
        link::cut(s, Why::NoHandshake);
    }
}

/// What a device's EVENT packet asks for.
#[derive(Debug)]
pub enum Request<'a> {
    Append(Result<Appended, EventError>),
    Sync(Option<&'a serde_json::value::RawValue>),
    /// Not a JSON array with an event name first: the connection is cut.
    Bad,
}

/// Reads an EVENT packet's `[name, arg, ..]`. The common packet, `["event",{..}]` as
/// socket.io-client writes it, is read in one pass over the event; anything else,
/// or an argument that is not one valid JSON object, takes [`request_general`],
/// which answers the same (a test holds them to it).
pub fn request(data: &str) -> Request<'_> {
    if let Some(obj) = data
        .strip_prefix("[\"event\",")
        .and_then(|r| r.strip_suffix(']'))
    {
        match NewEvent::from_json(obj) {
            Err(EventError::Invalid) => {}
            r => return Request::Append(r.map(Appended::One)),
        }
    }
    request_general(data)
}

/// [`request`] for any packet: the array first, then its argument.
pub fn request_general(data: &str) -> Request<'_> {
    let Some(args) = EventArgs::parse(data) else {
        return Request::Bad;
    };
    Request::Append(match &*args.name {
        "event" => event_from_arg(args.arg).map(Appended::One),
        "events" => batch_from_arg(args.arg).map(Appended::Many),
        "sync" => return Request::Sync(args.arg),
        _ => Err(EventError::UnknownEvent),
    })
}

/// How a device's packet with ack `id` is answered.
fn reply_to(s: &Sock, id: Option<u64>) -> AckReply {
    match id {
        Some(id) => AckReply::Socket {
            sock: s.clone(),
            id,
            at: std::time::Instant::now(),
        },
        None => AckReply::None,
    }
}

/// Hands a device's events to its realm's writer, or answers why they were refused.
fn append(
    s: &Sock,
    dev: &Device,
    realm: &Realm,
    id: Option<u64>,
    events: Result<Appended, EventError>,
) {
    let reply = reply_to(s, id);
    match events {
        Ok(events) => realm.submit(WriteReq::Append {
            events,
            device: dev.device_id.clone(),
            origin: Origin::Lan,
            tag: Some(s.id),
            reply,
            meta: None,
        }),
        Err(e) => reply.send_json(&AckErr::json(&e)),
    }
}

fn send(s: &Socket, packet: String) {
    link::send_or_cut(s, link::str_of(packet));
}

impl Inner {
    /// A connection opened, on either transport.
    fn opened(&self, s: &Sock) {
        self.sockets.lock().insert(s.id, Arc::downgrade(s));
        if self.stopping.load(Ordering::Relaxed) {
            return link::cut(s, Why::Shutdown);
        }
        let weak = Arc::downgrade(s);
        tokio::spawn(async move {
            tokio::time::sleep(CONNECT_TIMEOUT).await;
            if let Some(s) = weak.upgrade() {
                if s.data.device.get().is_none() {
                    link::cut(&s, Why::NoHandshake);
                }
            }
        });
    }

    fn closed(&self, s: &Sock, reason: DisconnectReason) {
        self.sockets.lock().remove(&s.id);
        if let Some(dev) = s.data.device.get() {
            if let Some(realm) = self.gate.realms.at(dev.realm) {
                realm.device_left(s.id);
            }
            tracing::debug!(sid = %s.id, device = %dev.device_id, ?reason, by_hub = ?s.data.closed_by_hub(), "device disconnected");
            crate::metrics::device_disconnected(match s.data.closed_by_hub() {
                Some(why) => why.as_str(),
                None => crate::metrics::disconnect_label(reason),
            });
        }
    }

    /// One Socket.IO packet from a device.
    fn message(&self, s: &Sock, msg: &str) {
        let packet = match sio::parse(msg) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(sid = %s.id, error = %e, "not a Socket.IO packet; closing the connection");
                return link::cut(s, Why::BadPacket);
            }
        };
        if s.data.skip_binaries.load(Ordering::Relaxed) > 0 {
            // Attachments must follow their packet at once.
            return link::cut(s, Why::BadPacket);
        }
        match packet {
            Packet::Connect { ns, auth } => self.connect(s, ns, auth),
            Packet::Disconnect { ns: "/" } => s.close(DisconnectReason::TransportClose),
            Packet::Disconnect { .. } | Packet::Ack { .. } => {}
            Packet::Event { ns: "/", id, data } => self.event(s, id, data),
            Packet::Event { .. } => {}
            Packet::Binary {
                id,
                attachments,
                ack,
                ..
            } => {
                s.data.skip_binaries.store(attachments, Ordering::Relaxed);
                if let (Some(id), false, Some(_)) = (id, ack, s.data.device.get()) {
                    send(s, sio::ack(id, &AckErr::json(&EventError::Binary)));
                }
            }
        }
    }

    fn binary(&self, s: &Sock) {
        let left = s.data.skip_binaries.load(Ordering::Relaxed);
        if left == 0 {
            return link::cut(s, Why::BadPacket);
        }
        s.data.skip_binaries.store(left - 1, Ordering::Relaxed);
    }
}

impl EngineIoHandler for Hub {
    type Data = link::Slot;

    fn on_connect(self: Arc<Self>, eio: Arc<EioSocket>) {
        let s = Socket::of_eio(&eio, self.inner.limits.queue_bytes);
        if let Some(cut) = eio.req_parts.extensions.get::<Arc<Cut>>() {
            s.data.set_cut(cut.clone());
        }
        self.inner.opened(&s);
    }

    fn on_disconnect(&self, eio: Arc<EioSocket>, reason: DisconnectReason) {
        if let Some(s) = eio.data.get() {
            self.inner.closed(s, reason);
        }
    }

    fn on_message(self: &Arc<Self>, msg: engineioxide::Str, eio: Arc<EioSocket>) {
        if let Some(s) = eio.data.get() {
            self.inner.message(s, &msg);
        }
    }

    fn on_binary(self: &Arc<Self>, _data: Bytes, eio: Arc<EioSocket>) {
        if let Some(s) = eio.data.get() {
            self.inner.binary(s);
        }
    }
}

impl ws::Handler for Inner {
    fn open(&self, s: &Sock) {
        self.opened(s);
    }
    fn text(&self, s: &Sock, msg: &str) {
        self.message(s, msg);
    }
    fn binary(&self, s: &Sock) {
        Inner::binary(self, s);
    }
    fn close(&self, s: &Sock, reason: DisconnectReason) {
        self.closed(s, reason);
    }
}

/// Request middleware for `/socket.io/`: a device opening a WebSocket straight away
/// is served by our own transport ([`link::ws`]); everything else (long-polling, its
/// upgrade, bad requests) goes on to engineioxide.
pub async fn direct(
    axum::extract::State(hub): axum::extract::State<Hub>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if req.uri().path().starts_with("/socket.io") && ws::is_direct(req.uri().query()) {
        if let Some(accept) = ws::accept_key(req.method(), req.headers()) {
            let cut = req.extensions().get::<Arc<Cut>>().cloned();
            return ws::serve(hub.inner.clone(), req, accept, cut, hub.inner.limits);
        }
    }
    next.run(req).await
}

#[derive(Debug, Deserialize)]
struct SyncReq {
    #[serde(default)]
    since: u64,
    #[serde(default)]
    limit: Option<usize>,
}

impl SyncReq {
    fn page_limit(&self) -> usize {
        self.limit.unwrap_or(500).clamp(1, PAGE)
    }
}

/// A `sync` request's argument as JSON text -> (since, page limit) (fuzz/ entry point).
#[doc(hidden)]
pub fn parse_sync(json: &str) -> Result<(u64, usize), EventError> {
    let r = sync_req(json)?;
    Ok((r.since, r.page_limit()))
}

/// A `sync` argument: an object only (serde's derive also takes the array
/// `[since, limit]`, which the protocol does not have; found by the fuzz target `sync`).
fn sync_req(json: &str) -> Result<SyncReq, EventError> {
    if !json.trim_start().starts_with('{') {
        return Err(EventError::Invalid);
    }
    serde_json::from_str(json).map_err(|_| EventError::Invalid)
}

/// `sync {since, limit}` -> `{ok, events:[..], lastSeq, logId}`: one page on request.
fn sync(
    realm: Arc<crate::realm::Realm>,
    reply: AckReply,
    arg: Option<&serde_json::value::RawValue>,
) {
    let req: SyncReq = match arg.map(|a| sync_req(a.get())) {
        Some(Ok(r)) => r,
        _ => return reply.send_json(&AckErr::json(&EventError::Invalid)),
    };
    if matches!(reply, AckReply::None) {
        return;
    }
    if let Some(oldest) = realm.cursor_expired(req.since) {
        return reply.send_json(&serde_json::json!({"ok": false, "error": {"code": "cursor_expired",
            "message": format!("events after {} were deleted by retention; the oldest kept is {oldest}", req.since)},
            "oldestSeq": oldest}).to_string());
    }
    let limit = req.page_limit();
    tokio::spawn(async move {
        let r = realm.clone();
        let page = tokio::task::spawn_blocking(move || r.read_page(req.since, limit)).await;
        let page = match page {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                return reply.send_json(&AckErr::json(&EventError::Storage(e.to_string())))
            }
            Err(_) => return,
        };
        let mut out =
            String::with_capacity(64 + page.iter().map(|(_, j)| j.len() + 1).sum::<usize>());
        out.push_str("{\"ok\":true,\"events\":[");
        for (i, (_, json)) in page.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(json);
        }
        out.push_str("],\"lastSeq\":");
        sio::push_u64(&mut out, realm.fanned_seq());
        if let Some(id) = &realm.log_id {
            out.push_str(",\"logId\":");
            push_json_str(&mut out, id);
        }
        out.push('}');
        reply.send_json(&out);
    });
}

/// Escapes a string for JSON (re-exported for hub notices).
pub fn json_str(s: &str) -> String {
    let mut out = String::new();
    push_json_str(&mut out, s);
    out
}

#[cfg(test)]
mod tests {

    /// The one-pass read of `["event",{..}]` answers exactly what the general parse
    /// does, for good events, bad ones, odd spacing, extra arguments and garbage.
    #[test]
    fn the_fast_event_read_answers_as_the_general_parse() {
        let cases = [
            r#"["event",{"id":"a-1","type":"order.created","payload":{"n":1,"l":[1,{"x":2}]}}]"#,
            r#"["event",{"id":"a-1","type":"t","payload":{},"ts":1700000000000}]"#,
            r#"["event",{"id":"a-1","type":"t","payload":null,"ts":"2026-12-07T10:00:00Z"}]"#,
            r#"["event",{"id":"a\u002d1","type":"t\n","payload":"x"}]"#,
            r#"["event", {"id":"a","type":"t","payload":1} ]"#,
            r#"["event",{"id":"a","type":"t","payload":1} ]"#,
            r#"["event",{"id":"a","type":"t","payload":1},{"more":1},2]"#,
            r#"["event",{"id":"a","type":"t","payload":1}]]"#,
            r#"["event",{"id":"a","type":"t","payload":1}"#,
            r#"["event",{"id":"a","type":"t","payload":1},]"#,
            r#"["event",{"id":"a","type":"t"}]"#,
            r#"["event",{"id":"","type":"t","payload":1}]"#,
            r#"["event",{"id":1,"type":"t","payload":1}]"#,
            r#"["event",{"id":"a","id":"b","type":"t","payload":1}]"#,
            r#"["event",{"id":"a","type":"t","payload":1e400}]"#,
            r#"["event",{"id":"a","type":"t","payload":1,"ts":[1]}]"#,
            r#"["event",[1,2]]"#,
            r#"["event",1]"#,
            r#"["event","{}"]"#,
            r#"["event"]"#,
            r#"["event",]"#,
            r#"["event",{}]"#,
            r#"["event",{"#,
            r#"["event",{"id":"a","type":"t","payload":1}] "#,
            r#"["ev\u0065nt",{"id":"a","type":"t","payload":1}]"#,
            r#"["events",[{"id":"a","type":"t","payload":1},{"id":2}]]"#,
            r#"["sync",{"since":3}]"#,
            r#"["other",{}]"#,
            r#"{"event":1}"#,
            "",
        ];
        for c in cases {
            assert_eq!(
                format!("{:?}", request(c)),
                format!("{:?}", request_general(c)),
                "{c}"
            );
        }
        // And the fast read is taken where it should be: one valid event is appended.
        assert!(matches!(
            request(cases[0]),
            Request::Append(Ok(Appended::One(_)))
        ));
    }

    #[test]
    fn auth_is_an_object_only() {
        assert_eq!(
            parse_auth(r#"{"token":"t","since":3}"#).unwrap(),
            ("t".into(), Some(3))
        );
        assert_eq!(parse_auth(r#"["role"]"#).unwrap_err().0, "missing_token");
    }

    use super::*;
    use axum::body::Bytes;
    use axum::http::{HeaderValue, Uri};

    /// Found by the fuzz target `sync`: `[5]` was read as `{"since":5}`.
    #[test]
    fn sync_takes_an_object_only() {
        for bad in ["[5]", "[5,10]", " [5]", "5", "\"x\"", "null"] {
            assert_eq!(parse_sync(bad), Err(EventError::Invalid), "{bad}");
        }
        assert_eq!(parse_sync(r#"{"since":5}"#), Ok((5, 500)));
        assert_eq!(parse_sync(r#" {"since":5,"limit":0}"#), Ok((5, 1)));
    }

    fn inside(buf: &[u8], part: &[u8]) -> bool {
        let (b, p) = (buf.as_ptr() as usize, part.as_ptr() as usize);
        p >= b && p < b + buf.len()
    }

    #[test]
    fn socket_io_requests_no_longer_point_into_the_read_buffer() {
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
        let out = detach_request(req);
        assert_eq!(out.uri(), "/socket.io/?EIO=4&transport=websocket&a=");
        assert_eq!(out.headers()["connection"], "keep-alive");
        assert_eq!(out.headers()["x-till"], "7");
        assert!(!inside(&buf, out.headers()["connection"].as_bytes()));
        assert!(!inside(&buf, out.uri().query().unwrap().as_bytes()));
    }

    #[test]
    fn upgrades_are_recognised_by_sid_and_transport() {
        let sid = Sid::new();
        let u: Uri = format!("/socket.io/?EIO=4&transport=websocket&sid={sid}")
            .parse()
            .unwrap();
        assert_eq!(upgrade_sid(&u), Some(sid));
        let u: Uri = format!("/socket.io/?EIO=4&transport=polling&sid={sid}")
            .parse()
            .unwrap();
        assert_eq!(upgrade_sid(&u), None);
        let u: Uri = "/socket.io/?EIO=4&transport=websocket".parse().unwrap();
        assert_eq!(upgrade_sid(&u), None);
    }

    #[test]
    fn since_accepts_only_a_cursor() {
        use serde_json::json;
        assert_eq!(parse_since(None).unwrap(), None);
        assert_eq!(parse_since(Some(&json!(null))).unwrap(), None);
        assert_eq!(parse_since(Some(&json!(42))).unwrap(), Some(42));
        assert_eq!(parse_since(Some(&json!("42"))).unwrap(), Some(42));
        for bad in [
            json!(-1),
            json!("abc"),
            json!(1e30),
            json!({}),
            json!([1]),
            json!(1.5),
        ] {
            assert_eq!(
                parse_since(Some(&bad)).unwrap_err().0,
                "invalid_since",
                "{bad}"
            );
        }
    }
}
