//! Engine.IO over a WebSocket opened straight away (`/socket.io/?EIO=4&transport=websocket`
//! without a session id): how the SDK, native apps and `socket.io-client` with
//! `transports: ["websocket"]` connect. Long-polling, and the upgrade from it, stay
//! with engineioxide.
//!
//! Our own code instead of engineioxide's WebSocket transport: engineioxide copies
//! every packet into a new string per socket and hands packets one by one through a
//! channel. Here a commit's whole fan-out goes into a socket's queue as ONE shared
//! [`Batch`] (one reference count per socket, not one per event), framed as WebSocket
//! frames once for every socket; its writer wakes once and hands the runs of those
//! shared bytes that are not the device's own to the stream in vectored writes (one
//! run of TLS records and one syscall each, no copy of ours). Reading, with its control
//! frames, is tungstenite's; writing is ours, because server frames are only a
//! length header before the bytes (RFC 6455 5.2, never masked), and tungstenite's
//! Sink costs a lock and a frame object per message.
//!
//! One connection is two tasks: the reader (device -> handler, in arrival order,
//! never waiting on a write) and the writer (queue -> socket, and Engine.IO's
//! heartbeat: a ping every `ping_interval`, its pong due within `ping_timeout`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::StreamExt;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::{Batch, DisconnectReason, Packet, SendError, Sid, Sock, Socket};

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
    /// Bytes the hub may hold for the device (queued or being written, a shared
    /// batch counted whole) before a send fails with [`SendError::Full`].
    pub queue_bytes: usize,
    pub max_message: usize,
    pub read_buffer: usize,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
}

/// A device's outgoing queue, shared by the senders and the connection's writer.
pub struct Queue {
    st: Mutex<State>,
    cap: usize,
    cap_bytes: usize,
    /// Wakes the writer: packets were queued, or the connection is closing.
    wake: tokio::sync::Notify,
    /// 0 open, 1 closing, 2 ended.
    phase: tokio::sync::watch::Sender<u8>,
}

#[derive(Default)]
struct State {
    q: VecDeque<Item>,
    /// Packets in `q` (a batch counts all of its packets).
    len: usize,
    /// What the items in `q` keep in memory: a packet's bytes, or a shared batch's
    /// whole [`Batch::weight`] (kept for as long as any device has it queued,
    /// whatever share of it that device gets).
    bytes: usize,
    /// What the items the writer took and is still writing keep in memory.
    writing: usize,
    /// Control frames tungstenite wrote while reading (pongs), written first.
    ctl: Vec<u8>,
    closing: Option<DisconnectReason>,
}

/// What a device's queue holds.
enum Item {
    One(Packet),
    /// A commit's fan-out, shared by every socket: all of it but the events the
    /// device itself sent (tagged with its id).
    Batch(Batch, Sid),
}

impl State {
    /// Whether `w` more bytes may be held for the device. Something always fits in
    /// an empty queue, so one commit larger than the limit still reaches a device
    /// that reads.
    fn fits(&self, w: usize, cap_bytes: usize) -> bool {
        self.bytes == 0 || self.bytes + self.writing + w <= cap_bytes
    }
}

impl Queue {
    fn new(cap: usize, cap_bytes: usize) -> Self {
        Self {
            st: Mutex::new(State::default()),
            cap,
            cap_bytes,
            wake: tokio::sync::Notify::new(),
            phase: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Queues packets in order, as many as fit below `limit` (at most the queue's
    /// own size); wakes the writer once.
    pub fn push_all<'a>(
        &self,
        msgs: impl Iterator<Item = &'a Packet>,
        limit: usize,
    ) -> Result<usize, (usize, SendError)> {
        let limit = limit.min(self.cap);
        let mut st = self.st.lock();
        if st.closing.is_some() {
            return Err((0, SendError::Closed));
        }
        let mut n = 0;
        let mut full = false;
        for m in msgs {
            let w = m.as_bytes().len();
            if st.len >= limit || !st.fits(w, self.cap_bytes) {
                full = true;
                break;
            }
            st.q.push_back(Item::One(m.clone()));
            st.len += 1;
            st.bytes += w;
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

    /// Queues one packet, taking it (no reference count to add: a packet made for
    /// one socket, like an ack, stays a buffer of its own); wakes the writer.
    pub fn push_one(&self, msg: Packet) -> Result<(), SendError> {
        let mut st = self.st.lock();
        if st.closing.is_some() {
            return Err(SendError::Closed);
        }
        let w = msg.as_bytes().len();
        if st.len >= self.cap || !st.fits(w, self.cap_bytes) {
            return Err(SendError::Full);
        }
        st.q.push_back(Item::One(msg));
        st.len += 1;
        st.bytes += w;
        drop(st);
        self.wake.notify_one();
        Ok(())
    }

    /// Queues a shared batch, all of it or (if it does not fit) nothing; `own` is
    /// the device's id, whose own events it skips (and does not count).
    pub fn push_batch(&self, b: &Batch, own: Sid) -> Result<(), SendError> {
        let n = b.len_for(own);
        let mut st = self.st.lock();
        if st.closing.is_some() {
            return Err(SendError::Closed);
        }
        if n == 0 {
            return Ok(()); // all of it is the device's own
        }
        let w = b.weight();
        if st.len + n > self.cap || !st.fits(w, self.cap_bytes) {
            return Err(SendError::Full);
        }
        st.q.push_back(Item::Batch(b.clone(), own));
        st.len += n;
        st.bytes += w;
        drop(st);
        self.wake.notify_one();
        Ok(())
    }

    /// The bytes held for the device: queued, or taken by the writer and not yet
    /// written (what [`Limits::queue_bytes`] bounds).
    pub fn held_bytes(&self) -> usize {
        let st = self.st.lock();
        st.bytes + st.writing
    }

    /// Bytes tungstenite writes while reading (whole control frames). Refused once
    /// [`CTL_MAX`] bytes wait: the device sends pings faster than it reads pongs.
    fn push_ctl(&self, bytes: &[u8]) -> std::io::Result<()> {
        let mut st = self.st.lock();
        if st.ctl.len() + bytes.len() > CTL_MAX {
            return Err(std::io::Error::other(
                "the device sends WebSocket pings faster than it reads the pongs",
            ));
        }
        st.ctl.extend_from_slice(bytes);
        drop(st);
        self.wake.notify_one();
        Ok(())
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
        run(h, TokioIo::new(upgraded), cut, limits).await;
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

async fn run<H: Handler, S>(h: Arc<H>, io: S, cut: Option<Arc<crate::conn::Cut>>, l: Limits)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let queue = Arc::new(Queue::new(l.queue, l.queue_bytes));
    let sock = Socket::of_ws(queue.clone());
    if let Some(c) = cut {
        sock.data.set_cut(c);
    }
    let (rd, wr) = tokio::io::split(io);
    let cfg = WebSocketConfig::default()
        .read_buffer_size(l.read_buffer)
        .write_buffer_size(0)
        .max_message_size(Some(l.max_message))
        .max_frame_size(Some(l.max_message));
    let side = ReadSide {
        rd,
        queue: queue.clone(),
    };
    let mut stream = WebSocketStream::from_raw_socket(side, Role::Server, Some(cfg)).await;
    let awaiting_pong = Arc::new(AtomicBool::new(false));
    let open = open_packet(&sock.id.to_string(), &l);
    let writer = tokio::spawn(write_loop(
        wr,
        sock.clone(),
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

/// The stream tungstenite reads from: the connection's read half. What tungstenite
/// writes while reading (pongs) goes to the writer, which owns the write half.
struct ReadSide<R> {
    rd: R,
    queue: Arc<Queue>,
}

impl<R: AsyncRead + Unpin> AsyncRead for ReadSide<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.rd).poll_read(cx, buf)
    }
}

impl<R: Unpin> AsyncWrite for ReadSide<R> {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(self.queue.push_ctl(buf).map(|()| buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Appends one unmasked, unfragmented text frame (RFC 6455 5.2) holding `payload`.
pub(super) fn frame(out: &mut Vec<u8>, payload: &[u8]) {
    let n = payload.len();
    out.push(0x81); // FIN, text
    if n < 126 {
        out.push(n as u8);
    } else if n <= 0xFFFF {
        out.push(126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    out.extend_from_slice(payload);
}

/// A close frame with status 1000 (normal closure).
const CLOSE_FRAME: [u8; 4] = [0x88, 0x02, 0x03, 0xE8];

async fn write_loop<W>(
    mut wr: W,
    sock: Sock,
    queue: Arc<Queue>,
    awaiting_pong: Arc<AtomicBool>,
    open: String,
    l: Limits,
) where
    W: AsyncWrite + Unpin,
{
    let mut first = Vec::with_capacity(open.len() + 4);
    frame(&mut first, open.as_bytes());
    if wr.write_all(&first).await.is_err() || wr.flush().await.is_err() {
        return queue.close(DisconnectReason::TransportError);
    }
    drop(first);
    let mut out = Vec::new();
    // Engine.IO's heartbeat on one timer: the next ping, or the pong's deadline.
    let hb = tokio::time::sleep(l.ping_interval);
    tokio::pin!(hb);
    let mut pinged_at: Option<tokio::time::Instant> = None;
    let mut batch = VecDeque::new();
    let mut segs = Vec::new();
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
            st.len = 0;
            st.writing = std::mem::take(&mut st.bytes);
            out.extend_from_slice(&st.ctl); // whole frames, first
            st.ctl.clear();
            st.closing.clone()
        };
        let r = write_items(&mut wr, &mut out, &mut segs, &batch, send_ping).await;
        batch.clear();
        queue.st.lock().writing = 0;
        if batch.capacity() > 256 {
            batch = VecDeque::new(); // a burst's queue is not kept by an idle device
        }
        if segs.capacity() > 4 * MAX_IOV {
            segs = Vec::new();
        }
        if out.capacity() > 2 * WRITE_CHUNK {
            out = Vec::new(); // nor a burst's buffer
        }
        if let Err(e) = r {
            if e.kind() == std::io::ErrorKind::TimedOut {
                // The connection cut it: the device took no byte for a while.
                super::cut(&sock, super::Why::WriteStalled);
            }
            queue.close(DisconnectReason::TransportError);
            return;
        }
        if closing.is_some() {
            let _ = wr.write_all(&CLOSE_FRAME).await;
            let _ = wr.shutdown().await;
            return;
        }
    }
}

/// Control replies (pongs) that may wait for the writer; past this the connection
/// ends, so a device that pings and never reads cannot grow the hub's memory.
const CTL_MAX: usize = 64 << 10;

/// The writer hands its own buffer (single packets: catch-up, acks, pings) to the
/// stream once it holds this much.
const WRITE_CHUNK: usize = 64 << 10;

/// Slices handed to the stream in one vectored write (below any IOV_MAX).
const MAX_IOV: usize = 64;

/// Where a piece of a write comes from: `out` (a byte range of it), or a run of a
/// shared batch's frames (the queued item at `item`, a byte range of its frames).
#[derive(Clone, Copy)]
struct Seg {
    item: usize,
    start: usize,
    end: usize,
}

const OUT: usize = usize::MAX;

impl Seg {
    /// Covers what `out` gained since `mark` (if anything) with a segment.
    fn push_out(segs: &mut Vec<Seg>, mark: &mut usize, out_len: usize) {
        if out_len > *mark {
            segs.push(Seg {
                item: OUT,
                start: *mark,
                end: out_len,
            });
            *mark = out_len;
        }
    }
}

/// Writes what `out` holds (whole frames: control replies), then `items` and a
/// ping, then flushes. Single packets are framed into `out`; a shared batch's
/// frames, made once for every socket, are written straight from its bytes (the
/// runs that are not the device's own), so the only copy on the way is TLS's
/// into its records. Everything goes out in vectored writes of up to [`MAX_IOV`]
/// slices: one run of records and one syscall for each.
async fn write_items<W: AsyncWrite + Unpin>(
    wr: &mut W,
    out: &mut Vec<u8>,
    segs: &mut Vec<Seg>,
    items: &VecDeque<Item>,
    ping: bool,
) -> std::io::Result<()> {
    segs.clear();
    let mut mark = 0; // the start of what `out` holds that no segment covers yet
    for (i, item) in items.iter().enumerate() {
        match item {
            Item::One(p) => {
                frame(out, p.as_bytes());
                if out.len() >= WRITE_CHUNK {
                    Seg::push_out(segs, &mut mark, out.len());
                    write_segs(wr, out, segs, items).await?;
                    out.clear();
                    mark = 0;
                }
            }
            Item::Batch(b, own) => {
                Seg::push_out(segs, &mut mark, out.len());
                b.framed_runs(*own, |run| {
                    segs.push(Seg {
                        item: i,
                        start: run.start,
                        end: run.end,
                    });
                });
            }
        }
    }
    if ping {
        frame(out, b"2");
    }
    Seg::push_out(segs, &mut mark, out.len());
    write_segs(wr, out, segs, items).await?;
    out.clear();
    wr.flush().await
}

/// Writes every segment, in order, in vectored writes; empties `segs`.
async fn write_segs<W: AsyncWrite + Unpin>(
    wr: &mut W,
    out: &[u8],
    segs: &mut Vec<Seg>,
    items: &VecDeque<Item>,
) -> std::io::Result<()> {
    let bytes = |s: &Seg| -> &[u8] {
        match items.get(s.item) {
            Some(Item::Batch(b, _)) => &b.framed_bytes()[s.start..s.end],
            _ => &out[s.start..s.end],
        }
    };
    for chunk in segs.chunks(MAX_IOV) {
        let mut arr = [std::io::IoSlice::new(&[]); MAX_IOV];
        for (slot, s) in arr.iter_mut().zip(chunk) {
            *slot = std::io::IoSlice::new(bytes(s));
        }
        let mut bufs = &mut arr[..chunk.len()];
        std::io::IoSlice::advance_slices(&mut bufs, 0);
        while !bufs.is_empty() {
            let n = wr.write_vectored(bufs).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            std::io::IoSlice::advance_slices(&mut bufs, n);
        }
    }
    segs.clear();
    Ok(())
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
        let q = Queue::new(3, usize::MAX);
        let p = crate::link::str_of(crate::link::sio::event("event", "{}"));
        let four = [p.clone(), p.clone(), p.clone(), p.clone()];
        assert_eq!(q.push_all(four[..1].iter(), 1), Ok(1));
        assert_eq!(q.push_all(four[..1].iter(), 1), Err((0, SendError::Full)));
        assert_eq!(q.push_all(four[..1].iter(), usize::MAX), Ok(1));
        assert_eq!(
            q.push_all(four.iter(), usize::MAX),
            Err((1, SendError::Full))
        );
        let b = Batch::new(vec![(None, p.clone()), (None, p.clone())]);
        assert_eq!(q.push_batch(&b, Sid::new()), Err(SendError::Full));
        // A device's own events do not count: a batch of them never fills its queue.
        let q2 = Queue::new(1, usize::MAX);
        let me = Sid::new();
        let mine = Batch::new(vec![(Some(me), p.clone()); 10]);
        assert_eq!(q2.push_batch(&mine, me), Ok(()));
        let mixed = Batch::new(vec![(Some(me), p.clone()), (None, p.clone())]);
        assert_eq!(q2.push_batch(&mixed, me), Ok(()));
        assert_eq!(q2.st.lock().len, 1);
        assert_eq!(q2.push_batch(&mixed, me), Err(SendError::Full));
        let q3 = Queue::new(1, usize::MAX);
        assert_eq!(q3.push_one(p.clone()), Ok(()));
        assert_eq!(q3.push_one(p.clone()), Err(SendError::Full));
        q.close(DisconnectReason::ClosingServer);
        assert_eq!(q.push_all(four[..1].iter(), 3), Err((0, SendError::Closed)));
        assert_eq!(q.push_batch(&b, Sid::new()), Err(SendError::Closed));
        assert_eq!(q.push_one(p.clone()), Err(SendError::Closed));
    }

    /// The byte limit counts what a queued item keeps alive: a shared batch whole, even
    /// when the device gets one packet of it (its own events skipped). An empty queue
    /// always takes one item, so a commit larger than the limit still goes out.
    #[test]
    fn the_byte_limit_counts_a_shared_batch_whole() {
        let me = Sid::new();
        let big = crate::link::str_of(format!("4{}", "x".repeat(10_000)));
        let small = crate::link::str_of("4y".to_string());
        // 10 of my events and one of someone else's: 1 packet for me, ~20 KB kept.
        let mut v = vec![(Some(me), big.clone()); 10];
        v.push((None, small.clone()));
        let b = Batch::new(v);
        assert_eq!(b.len_for(me), 1);
        assert!(b.weight() > 2 * 10 * 10_000);
        let q = Queue::new(1000, 3 * b.weight());
        for _ in 0..3 {
            assert_eq!(q.push_batch(&b, me), Ok(()));
        }
        assert_eq!(q.st.lock().len, 3, "only 3 packets are counted...");
        assert_eq!(
            q.push_batch(&b, me),
            Err(SendError::Full),
            "...but 3 batches fill it"
        );
        assert_eq!(q.push_one(big.clone()), Err(SendError::Full));
        // What the writer still holds counts too, until it is written.
        {
            let mut st = q.st.lock();
            st.q.clear();
            st.len = 0;
            st.writing = std::mem::take(&mut st.bytes);
        }
        assert_eq!(
            q.push_batch(&b, me),
            Ok(()),
            "an empty queue takes one item"
        );
        assert_eq!(q.push_one(small.clone()), Err(SendError::Full));
        q.st.lock().writing = 0;
        assert_eq!(q.push_one(small.clone()), Ok(()));
        // One item larger than the whole limit still reaches an empty queue.
        let tiny = Queue::new(1000, 100);
        assert_eq!(tiny.push_batch(&b, me), Ok(()));
        assert_eq!(tiny.push_one(small.clone()), Err(SendError::Full));
        assert_eq!(
            tiny.push_all([small.clone()].iter(), 10),
            Err((0, SendError::Full))
        );
    }

    /// What the writer puts on the wire is every queued packet but the device's own,
    /// framed, in order, whatever mix of single packets, shared batches (with the
    /// device's own events between runs, more runs than one vectored write takes)
    /// and catch-up pages larger than the writer's chunk.
    #[tokio::test]
    async fn the_writer_sends_every_packet_but_the_devices_own_in_order() {
        let pkt = |i: usize| {
            crate::link::str_of(crate::link::sio::event("event", &format!("{{\"i\":{i}}}")))
        };
        let me = Sid::new();
        let other = Sid::new();
        let mut items = VecDeque::new();
        let mut want = Vec::new();
        let mut n = 0;
        let one = |items: &mut VecDeque<Item>, want: &mut Vec<u8>, n: &mut usize| {
            let p = pkt(*n);
            frame(want, p.as_bytes());
            items.push_back(Item::One(p));
            *n += 1;
        };
        one(&mut items, &mut want, &mut n);
        // 300 packets, every third the device's own: 100 runs, more than MAX_IOV.
        let mut b = Vec::new();
        for i in 0..300 {
            let p = pkt(n);
            n += 1;
            if i % 3 == 1 {
                b.push((Some(me), p));
            } else {
                frame(&mut want, p.as_bytes());
                b.push((if i % 3 == 0 { Some(other) } else { None }, p));
            }
        }
        items.push_back(Item::Batch(Batch::new(b), me));
        // A catch-up page larger than WRITE_CHUNK, then a batch all of others'.
        for _ in 0..(2 * WRITE_CHUNK / 16) {
            one(&mut items, &mut want, &mut n);
        }
        let p = pkt(n);
        frame(&mut want, p.as_bytes());
        items.push_back(Item::Batch(Batch::new(vec![(Some(other), p)]), me));
        frame(&mut want, b"2");
        let mut out = b"ctl".to_vec();
        let mut wire: Vec<u8> = Vec::new();
        let mut segs = Vec::new();
        write_items(&mut wire, &mut out, &mut segs, &items, true)
            .await
            .unwrap();
        assert_eq!(&wire[..3], b"ctl", "control replies first");
        assert!(
            wire[3..] == want[..],
            "every packet but the device's own, in order"
        );
        assert!(out.is_empty() && segs.is_empty());
    }

    #[test]
    fn control_replies_that_pile_up_end_the_connection() {
        let q = Queue::new(4, usize::MAX);
        let pong = [0x8A, 125]
            .iter()
            .chain(&[0u8; 125])
            .copied()
            .collect::<Vec<_>>();
        let fit = CTL_MAX / pong.len();
        for _ in 0..fit {
            assert!(q.push_ctl(&pong).is_ok());
        }
        assert!(q.push_ctl(&pong).is_err());
        assert_eq!(q.st.lock().ctl.len(), fit * pong.len());
    }

    #[test]
    fn frames_carry_their_length_as_rfc_6455_says() {
        for (n, head) in [
            (0usize, vec![0x81, 0]),
            (125, vec![0x81, 125]),
            (126, vec![0x81, 126, 0, 126]),
            (65535, vec![0x81, 126, 0xFF, 0xFF]),
            (65536, vec![0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]),
        ] {
            let payload = vec![b'x'; n];
            let mut out = Vec::new();
            frame(&mut out, &payload);
            assert_eq!(&out[..head.len()], &head[..], "length {n}");
            assert_eq!(out.len(), head.len() + n);
        }
    }

    #[tokio::test]
    async fn a_batch_skips_the_devices_own_events_and_keeps_order() {
        let me = Sid::new();
        let other = Sid::new();
        let pk = |s: &str| crate::link::str_of(format!("4{s}"));
        let b = Batch::new(vec![
            (Some(other), pk("a")),
            (Some(me), pk("b")),
            (None, pk("c")),
        ]);
        assert_eq!(
            (b.len_for(me), b.len_for(other), b.len_for(Sid::new())),
            (2, 2, 3)
        );
        let mut sink = Vec::new();
        let mut out = b"pong".to_vec();
        let items = VecDeque::from([Item::One(pk("0")), Item::Batch(b, me)]);
        assert!(
            write_items(&mut sink, &mut out, &mut Vec::new(), &items, true)
                .await
                .is_ok()
        );
        assert!(out.is_empty());
        assert_eq!(
            sink,
            [
                &b"pong"[..],
                &[0x81, 2, b'4', b'0'],
                &[0x81, 2, b'4', b'a'],
                &[0x81, 2, b'4', b'c'],
                &[0x81, 1, b'2'],
            ]
            .concat()
        );
    }
}
