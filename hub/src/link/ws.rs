//! Engine.IO over a WebSocket opened straight away (`/socket.io/?EIO=4&transport=websocket`
//! without a session id): how the SDK, native apps and `socket.io-client` with
//! `transports: ["websocket"]` connect. Long-polling, and the upgrade from it, stay
//! with engineioxide.
//!
//! Our own code instead of engineioxide's WebSocket transport: engineioxide copies
//! every packet into a new string per socket and hands packets one by one through a
//! channel. Here a socket's whole batch goes into its queue under one lock, its
//! writer wakes once, writes the shared bytes of each packet (no copy, no allocation
//! per delivery) and flushes once. The frames themselves are tungstenite's.
//!
//! One connection is two tasks: the reader (device -> handler, in arrival order,
//! never waiting on a write) and the writer (queue -> socket, and Engine.IO's
//! heartbeat: a ping every `ping_interval`, its pong due within `ping_timeout`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

use super::{DisconnectReason, Packet, SendError, Sock, Socket};

/// What the layer above does with a connection's traffic.
pub trait Handler: Send + Sync + 'static {
    /// A connection opened (before anything is read from it).
    fn open(&self, s: &Sock);
    /// One Socket.IO packet (an Engine.IO message without its `4`).
    fn text(&self, s: &Sock, msg: &str);
    /// One binary message.
    fn binary(&self, s: &Sock);
    /// The connection is gone (called once, after both tasks ended).
    fn close(&self, s: &Sock, reason: DisconnectReason);
}

/// The limits of one connection.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Packets queued for the device before a send fails with [`SendError::Full`].
    pub queue: usize,
    pub max_message: usize,
    pub read_buffer: usize,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
}

/// A device's outgoing queue, shared by the senders and the connection's writer.
pub struct Queue {
    st: Mutex<State>,
    cap: usize,
    /// Wakes the writer: packets were queued, or the connection is closing.
    wake: tokio::sync::Notify,
    /// 0 open, 1 closing, 2 ended.
    phase: tokio::sync::watch::Sender<u8>,
}

#[derive(Default)]
struct State {
    q: VecDeque<Packet>,
    closing: Option<DisconnectReason>,
}

impl Queue {
    fn new(cap: usize) -> Self {
        Self {
            st: Mutex::new(State::default()),
            cap,
            wake: tokio::sync::Notify::new(),
            phase: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Queues packets in order, as many as fit; wakes the writer once.
    pub fn push_all<'a>(
        &self,
        msgs: impl Iterator<Item = &'a Packet>,
    ) -> Result<usize, (usize, SendError)> {
        let mut st = self.st.lock();
        if st.closing.is_some() {
            return Err((0, SendError::Closed));
        }
        let mut n = 0;
        let mut full = false;
        for m in msgs {
            if st.q.len() >= self.cap {
                full = true;
                break;
            }
            st.q.push_back(m.clone());
            n += 1;
        }
        drop(st);
        if n > 0 {
            self.wake.notify_one();
        }
        if full {
            Err((n, SendError::Full))
        } else {
            Ok(n)
        }
    }

    /// Stops taking packets; the writer writes what is queued, then closes.
    pub fn close(&self, reason: DisconnectReason) {
        let mut st = self.st.lock();
        if st.closing.is_none() {
            st.closing = Some(reason);
            drop(st);
            self.phase.send_if_modified(|p| {
                let was = *p;
                *p = (*p).max(1);
                was != *p
            });
            self.wake.notify_one();
        }
    }

    fn closing(&self) -> Option<DisconnectReason> {
        self.st.lock().closing.clone()
    }

    /// Resolves once the connection has ended.
    pub async fn closed(&self) {
        let mut rx = self.phase.subscribe();
        let _ = rx.wait_for(|p| *p >= 2).await;
    }
}

/// Whether `query` asks for a new Engine.IO v4 session over WebSocket (no `sid`).
pub fn is_direct(query: Option<&str>) -> bool {
    let Some(q) = query else { return false };
    let (mut eio4, mut ws, mut sid) = (false, false, false);
    for kv in q.split('&') {
        match kv.split_once('=') {
            Some(("EIO", "4")) => eio4 = true,
            Some(("transport", "websocket")) => ws = true,
            Some(("sid", _)) => sid = true,
            _ => {}
        }
    }
    eio4 && ws && !sid
}

/// The `Sec-WebSocket-Accept` of a valid WebSocket upgrade request, or `None`.
pub fn accept_key(method: &axum::http::Method, h: &HeaderMap) -> Option<String> {
    let has = |name: header::HeaderName, token: &str| {
        h.get_all(name).iter().any(|v| {
            v.to_str()
                .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
                .unwrap_or(false)
        })
    };
    if method != axum::http::Method::GET
        || !has(header::UPGRADE, "websocket")
        || !has(header::CONNECTION, "upgrade")
        || h.get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13")
    {
        return None;
    }
    let key = h.get(header::SEC_WEBSOCKET_KEY)?;
    Some(tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes()))
}

/// Answers a direct WebSocket request (see [`is_direct`], [`accept_key`]) with 101
/// and runs the connection on the upgraded stream.
pub fn serve<H: Handler>(
    h: Arc<H>,
    mut req: axum::extract::Request,
    accept: String,
    cut: Option<Arc<crate::conn::Cut>>,
    limits: Limits,
) -> axum::response::Response {
    let on = hyper::upgrade::on(&mut req);
    drop(req);
    tokio::spawn(async move {
        let Ok(upgraded) = on.await else { return };
        let cfg = WebSocketConfig::default()
            .read_buffer_size(limits.read_buffer)
            .write_buffer_size(16 << 10)
            .max_message_size(Some(limits.max_message))
            .max_frame_size(Some(limits.max_message));
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(cfg)).await;
        run(h, ws, cut, limits).await;
    });
    let mut r = Response::new(axum::body::Body::empty());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let hd = r.headers_mut();
    hd.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    hd.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        hd.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    r
}

/// The Engine.IO open packet.
fn open_packet(sid: &str, l: &Limits) -> String {
    format!(
        "0{{\"sid\":\"{sid}\",\"upgrades\":[],\"pingInterval\":{},\"pingTimeout\":{},\"maxPayload\":{}}}",
        l.ping_interval.as_millis(),
        l.ping_timeout.as_millis(),
        l.max_message
    )
}

async fn run<H: Handler, S>(
    h: Arc<H>,
    ws: WebSocketStream<S>,
    cut: Option<Arc<crate::conn::Cut>>,
    l: Limits,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let queue = Arc::new(Queue::new(l.queue));
    let sock = Socket::of_ws(queue.clone());
    if let Some(c) = cut {
        sock.data.set_cut(c);
    }
    let (sink, mut stream) = ws.split();
    let awaiting_pong = Arc::new(AtomicBool::new(false));
    let open = open_packet(&sock.id.to_string(), &l);
    let writer = tokio::spawn(write_loop(
        sink,
        queue.clone(),
        awaiting_pong.clone(),
        open,
        l,
    ));
    h.open(&sock);
    let mut phase = queue.phase.subscribe();
    let reason = loop {
        let msg = tokio::select! {
            m = stream.next() => m,
            _ = phase.wait_for(|p| *p >= 1) => break None,
        };
        match msg {
            Some(Ok(Message::Text(t))) => match t.as_bytes().first() {
                Some(b'4') => h.text(&sock, &t[1..]),
                Some(b'3') => awaiting_pong.store(false, Ordering::Release),
                Some(b'1') => break Some(DisconnectReason::TransportClose),
                Some(b'6') => {}
                _ => break Some(DisconnectReason::PacketParsingError),
            },
            Some(Ok(Message::Binary(_))) => h.binary(&sock),
            Some(Ok(Message::Close(_))) | None => break Some(DisconnectReason::TransportClose),
            Some(Ok(_)) => {} // WebSocket ping/pong: tungstenite answers them
            Some(Err(_)) => break Some(DisconnectReason::TransportError),
        }
    };
    if let Some(r) = reason {
        queue.close(r);
    }
    drop(phase);
    // The writer ends once it has written what was queued (or the connection broke).
    let _ = writer.await;
    drop(stream);
    let reason = queue.closing().unwrap_or(DisconnectReason::TransportClose);
    h.close(&sock, reason);
    queue.phase.send_replace(2);
}

async fn write_loop<S>(
    mut sink: futures_util::stream::SplitSink<WebSocketStream<S>, Message>,
    queue: Arc<Queue>,
    awaiting_pong: Arc<AtomicBool>,
    open: String,
    l: Limits,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    if sink.send(Message::Text(open.into())).await.is_err() {
        return queue.close(DisconnectReason::TransportError);
    }
    // Engine.IO's heartbeat on one timer: the next ping, or the pong's deadline.
    let hb = tokio::time::sleep(l.ping_interval);
    tokio::pin!(hb);
    let mut pinged_at: Option<tokio::time::Instant> = None;
    let mut batch = VecDeque::new();
    loop {
        let mut send_ping = false;
        tokio::select! {
            biased;
            _ = queue.wake.notified() => {}
            _ = &mut hb => {
                let now = tokio::time::Instant::now();
                match pinged_at.take() {
                    None => {
                        send_ping = true;
                        awaiting_pong.store(true, Ordering::Release);
                        pinged_at = Some(now);
                        hb.as_mut().reset(now + l.ping_timeout);
                    }
                    Some(_) if awaiting_pong.load(Ordering::Acquire) => {
                        queue.close(DisconnectReason::HeartbeatTimeout);
                        hb.as_mut().reset(now + l.ping_interval);
                    }
                    Some(at) => hb.as_mut().reset(at + l.ping_interval),
                }
            }
        }
        let closing = {
            let mut st = queue.st.lock();
            std::mem::swap(&mut st.q, &mut batch);
            st.closing.clone()
        };
        let mut ok = true;
        for p in batch.drain(..) {
            // SAFETY: a Packet is built from a String (UTF-8) and never changed.
            let text = unsafe { Utf8Bytes::from_bytes_unchecked(p.into_bytes()) };
            if sink.feed(Message::Text(text)).await.is_err() {
                ok = false;
                break;
            }
        }
        if batch.capacity() > 256 {
            batch = VecDeque::new(); // a burst's buffer is not kept by an idle device
        }
        if ok && send_ping {
            ok = sink
                .feed(Message::Text(Utf8Bytes::from_static("2")))
                .await
                .is_ok();
        }
        if ok {
            ok = sink.flush().await.is_ok();
        }
        if !ok {
            queue.close(DisconnectReason::TransportError);
            return;
        }
        if closing.is_some() {
            let _ = sink.close().await;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_new_v4_websocket_sessions_are_direct() {
        assert!(is_direct(Some("EIO=4&transport=websocket")));
        assert!(is_direct(Some("transport=websocket&EIO=4&t=x")));
        assert!(!is_direct(Some("EIO=4&transport=websocket&sid=abc")));
        assert!(!is_direct(Some("EIO=3&transport=websocket")));
        assert!(!is_direct(Some("EIO=4&transport=polling")));
        assert!(!is_direct(None));
    }

    #[test]
    fn the_accept_key_is_rfc_6455s() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        h.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        // The example of RFC 6455, section 1.3.
        assert_eq!(
            accept_key(&axum::http::Method::GET, &h).as_deref(),
            Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        );
        assert_eq!(accept_key(&axum::http::Method::POST, &h), None);
        h.remove(header::UPGRADE);
        assert_eq!(accept_key(&axum::http::Method::GET, &h), None);
    }

    #[test]
    fn a_full_queue_takes_what_fits_and_a_closed_one_nothing() {
        let q = Queue::new(3);
        let p = crate::link::str_of(crate::link::sio::event("event", "{}"));
        let four = [p.clone(), p.clone(), p.clone(), p.clone()];
        assert_eq!(q.push_all(four[..2].iter()), Ok(2));
        assert_eq!(q.push_all(four.iter()), Err((1, SendError::Full)));
        q.close(DisconnectReason::ClosingServer);
        assert_eq!(q.push_all(four[..1].iter()), Err((0, SendError::Closed)));
    }
}
