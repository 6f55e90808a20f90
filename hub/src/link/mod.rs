//! The hub's side of one device connection: its transport (Engine.IO through
//! engineioxide for long-polling and its upgrade, or our own [`ws`] for a device that
//! opens a WebSocket straight away), the little state the hub keeps per device, and
//! the one way anything is sent to it.
//!
//! Promises kept here:
//! * **Nothing is dropped silently.** A send either lands in the device's queue or
//!   the device is cut: its TCP connection reset at once (see [`crate::conn`]), its
//!   session closed, one log line. It reconnects and resumes from its cursor.
//! * **A burst never costs a well-behaved device its connection.** engineioxide's
//!   heartbeat shares the queue and closes the socket if it finds it full, so every
//!   send there keeps [`HEADROOM`] slots free; only the hub's own sends can overflow.
//!   The [`ws`] transport sends its pings beside the queue.
//! * **Encode once.** A packet is a [`Packet`] (shared bytes, framed as an Engine.IO
//!   message): the same buffer goes to every socket, a reference count each.
//! * **A device's memory is bounded.** What the hub holds for one device is counted
//!   in packets and in bytes (a shared commit counted whole on [`ws`]; on
//!   engineioxide, copies that give their size back when it drops them: [`Held`]);
//!   past either limit the device is cut.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};

pub use engineioxide::socket::DisconnectReason;
pub use engineioxide::socket::Sid;
use engineioxide::Str;
use parking_lot::Mutex;

use crate::conn::Cut;

pub mod sio;
pub mod ws;

/// A device connection, whichever transport carries it.
pub struct Socket {
    pub id: Sid,
    pub data: Session,
    out: Out,
}
/// A shared handle to it.
pub type Sock = Arc<Socket>;

/// The transport under a [`Socket`].
enum Out {
    /// Engine.IO long-polling, and the WebSocket it may upgrade to (engineioxide),
    /// with the bytes of the packets engineioxide holds for it.
    Eio(Weak<EioSocket>, Arc<Held>),
    /// A device that opened a WebSocket straight away ([`ws`]).
    Ws(Arc<ws::Queue>),
}

/// engineioxide's socket; its data is the [`Socket`] it carries.
pub type EioSocket = engineioxide::Socket<Slot>;

/// The [`Socket`] of an engineioxide connection, set when it opens.
#[derive(Debug, Default)]
pub struct Slot(OnceLock<Sock>);

impl Slot {
    pub fn get(&self) -> Option<&Sock> {
        self.0.get()
    }
}

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Socket")
            .field("id", &self.id)
            .field("ws", &matches!(self.out, Out::Ws(_)))
            .finish()
    }
}

impl Socket {
    /// The [`Socket`] of a new engineioxide connection (kept in its [`Slot`]); a send
    /// fails with [`SendError::Full`] once engineioxide holds `max_bytes` of its packets.
    pub fn of_eio(eio: &Arc<EioSocket>, max_bytes: usize) -> Sock {
        let held = Arc::new(Held {
            bytes: AtomicUsize::new(0),
            cap: max_bytes,
        });
        let s = Arc::new(Socket {
            id: eio.id,
            data: Session::default(),
            out: Out::Eio(Arc::downgrade(eio), held),
        });
        let _ = eio.data.0.set(s.clone());
        s
    }

    /// The [`Socket`] of a direct WebSocket whose writer drains `queue`.
    pub fn of_ws(queue: Arc<ws::Queue>) -> Sock {
        Arc::new(Socket {
            id: Sid::new(),
            data: Session::default(),
            out: Out::Ws(queue),
        })
    }

    /// Closes the transport (queued packets are still written if it can).
    pub fn close(&self, reason: DisconnectReason) {
        match &self.out {
            Out::Eio(w, _) => {
                if let Some(s) = w.upgrade() {
                    s.close(reason);
                }
            }
            Out::Ws(q) => q.close(reason),
        }
    }

    /// The bytes the hub holds for this device and has not written yet.
    pub fn held_bytes(&self) -> usize {
        match &self.out {
            Out::Eio(_, held) => held.bytes(),
            Out::Ws(q) => q.held_bytes(),
        }
    }

    /// Resolves once the connection is closed.
    pub async fn closed(&self) {
        match &self.out {
            Out::Eio(w, _) => {
                let s = w.upgrade();
                if let Some(s) = s {
                    s.closed().await;
                }
            }
            Out::Ws(q) => q.closed().await,
        }
    }
}

/// One packet for devices: `4` (an Engine.IO message) and the Socket.IO packet,
/// encoded once; every socket it goes to shares the bytes.
#[derive(Debug, Clone)]
pub struct Packet(Str);

impl Packet {
    /// The Socket.IO packet (what engineioxide frames as a message).
    fn sio(&self) -> Str {
        self.0.slice(1..)
    }
    /// The whole Engine.IO packet (the text of one WebSocket message).
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

/// A commit's events for the fan-out, each tagged with the socket that sent it (so
/// that socket is skipped), shared by every socket it goes to.
#[derive(Clone)]
pub struct Batch(Arc<BatchInner>);

struct BatchInner {
    packets: Vec<(Option<Sid>, Packet)>,
    /// How many of the packets each sender sent (counted once, not per socket).
    senders: Vec<(Sid, usize)>,
    /// The packets' bytes.
    bytes: usize,
    /// The packets as WebSocket frames, made once by the first WebSocket writer that
    /// needs them; every socket writes runs of the same bytes.
    framed: std::sync::OnceLock<Framed>,
}

/// A batch's packets as consecutive WebSocket text frames.
struct Framed {
    buf: Vec<u8>,
    /// Where each packet's frame ends in `buf`.
    ends: Vec<usize>,
}

impl Batch {
    pub fn new(packets: Vec<(Option<Sid>, Packet)>) -> Self {
        let mut senders: Vec<(Sid, usize)> = Vec::new();
        for sid in packets.iter().filter_map(|(t, _)| *t) {
            match senders.iter_mut().find(|(s, _)| *s == sid) {
                Some((_, n)) => *n += 1,
                None => senders.push((sid, 1)),
            }
        }
        let bytes = packets.iter().map(|(_, p)| p.as_bytes().len()).sum();
        Batch(Arc::new(BatchInner {
            packets,
            senders,
            bytes,
            framed: std::sync::OnceLock::new(),
        }))
    }

    /// The batch's packets as consecutive WebSocket frames (made on first use).
    pub fn framed_bytes(&self) -> &[u8] {
        &self.framed().buf
    }

    /// Calls `f` with the byte range, in [`Self::framed_bytes`], of each run of
    /// consecutive frames that go to `sid` (all but its own packets), in order: one
    /// run unless `sid` sent some of the batch.
    pub fn framed_runs(&self, sid: Sid, mut f: impl FnMut(std::ops::Range<usize>)) {
        let fr = self.framed();
        let mut start = 0;
        if self.0.senders.iter().any(|(s, _)| *s == sid) {
            for (i, (tag, _)) in self.0.packets.iter().enumerate() {
                if *tag == Some(sid) {
                    let own = if i == 0 { 0 } else { fr.ends[i - 1] };
                    if own > start {
                        f(start..own);
                    }
                    start = fr.ends[i];
                }
            }
        }
        if start < fr.buf.len() {
            f(start..fr.buf.len());
        }
    }

    fn framed(&self) -> &Framed {
        self.0.framed.get_or_init(|| {
            let bytes = self
                .0
                .packets
                .iter()
                .map(|(_, p)| p.as_bytes().len() + 10)
                .sum();
            let mut buf = Vec::with_capacity(bytes);
            let mut ends = Vec::with_capacity(self.0.packets.len());
            for (_, p) in &self.0.packets {
                ws::frame(&mut buf, p.as_bytes());
                ends.push(buf.len());
            }
            Framed { buf, ends }
        })
    }
    /// The packets with their senders, in order.
    pub fn iter(&self) -> impl Iterator<Item = &(Option<Sid>, Packet)> {
        self.0.packets.iter()
    }
    /// The bytes the batch keeps alive while any socket has it queued: its packets
    /// and (once a WebSocket writer made them) their frames.
    pub fn weight(&self) -> usize {
        2 * self.0.bytes + self.0.packets.len() * (std::mem::size_of::<(Option<Sid>, Packet)>() + 8)
    }
    /// How many packets go to `sid` (all but its own).
    pub fn len_for(&self, sid: Sid) -> usize {
        let own = self.0.senders.iter().find(|(s, _)| *s == sid);
        self.0.packets.len() - own.map_or(0, |(_, n)| *n)
    }
}

/// Queue slots every send leaves free for Engine.IO's ping.
pub const HEADROOM: usize = 2;

/// Who the device is, once its CONNECT was accepted.
#[derive(Debug)]
pub struct Device {
    /// Index of its realm in the hub's realm list.
    pub realm: usize,
    pub device_id: Arc<str>,
    pub role: Arc<str>,
    pub in_grace: bool,
}

/// Why the hub ended a connection (for the log and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Why {
    None = 0,
    /// Its send queue was full: it stopped reading or fell too far behind.
    QueueFull = 1,
    /// It read nothing of its catch-up for too long.
    CatchUpStalled = 2,
    /// It sent a packet that is not Socket.IO.
    BadPacket = 3,
    /// It never completed the Socket.IO handshake in time, or kept failing it.
    NoHandshake = 4,
    /// The hub is stopping.
    Shutdown = 5,
    /// Reading its catch-up from the log failed.
    ReadFailed = 6,
    /// It took no byte of what the hub had for it for [`crate::conn::WRITE_STALL`].
    WriteStalled = 7,
}

impl Why {
    pub fn as_str(self) -> &'static str {
        match self {
            Why::None => "none",
            Why::QueueFull => "queue_full",
            Why::CatchUpStalled => "catch_up_stalled",
            Why::BadPacket => "bad_packet",
            Why::NoHandshake => "no_handshake",
            Why::Shutdown => "shutdown",
            Why::ReadFailed => "read_failed",
            Why::WriteStalled => "write_stalled",
        }
    }
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Why::QueueFull,
            2 => Why::CatchUpStalled,
            3 => Why::BadPacket,
            4 => Why::NoHandshake,
            5 => Why::Shutdown,
            6 => Why::ReadFailed,
            7 => Why::WriteStalled,
            _ => Why::None,
        }
    }
}

/// What the hub keeps per connection: a few words, whatever the device sends.
#[derive(Debug, Default)]
pub struct Session {
    /// Set once, when the device's CONNECT is accepted.
    pub device: OnceLock<Device>,
    /// CONNECT attempts refused on this connection.
    pub refused: AtomicU8,
    /// Binary attachments announced and still to be skipped (never kept).
    pub skip_binaries: AtomicU32,
    /// Why the hub closed it (once set, the device is on its way out).
    closing: AtomicU8,
    /// The connection carrying its WebSocket (set at the handshake or the upgrade).
    cut: Mutex<Option<Arc<Cut>>>,
    /// The device has been handed to the live fan-out.
    pub live: AtomicBool,
}

impl Session {
    pub fn set_cut(&self, cut: Arc<Cut>) {
        *self.cut.lock() = Some(cut);
    }
    /// Why the hub closed this connection, if it did.
    pub fn closed_by_hub(&self) -> Option<Why> {
        match Why::from_u8(self.closing.load(Ordering::Acquire)) {
            Why::None => None,
            w => Some(w),
        }
    }
}

/// A send that did not land.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// The queue is full (the caller cuts the device, or waits during catch-up).
    Full,
    /// The connection is gone already.
    Closed,
}

fn map(e: tokio::sync::mpsc::error::TrySendError<()>) -> SendError {
    match e {
        tokio::sync::mpsc::error::TrySendError::Full(()) => SendError::Full,
        tokio::sync::mpsc::error::TrySendError::Closed(()) => SendError::Closed,
    }
}

/// The bytes engineioxide holds for one device: every packet handed to it is a copy
/// that gives its size back when engineioxide drops it (written to the WebSocket, or
/// taken by a poll, or the connection gone), so the count is exact without a hook
/// into engineioxide's queue.
pub struct Held {
    bytes: AtomicUsize,
    cap: usize,
}

impl Held {
    /// A copy of `s` counted against the limit, or `None` if it does not fit. Something
    /// always fits when nothing is held, so one packet larger than the limit still
    /// reaches a device that reads.
    fn copy(self: &Arc<Self>, s: &Str) -> Option<Str> {
        let w = s.len();
        let before = self.bytes.fetch_add(w, Ordering::AcqRel);
        if before > 0 && before + w > self.cap {
            self.bytes.fetch_sub(w, Ordering::AcqRel);
            return None;
        }
        let owner = HeldCopy {
            buf: s.as_bytes().into(),
            held: self.clone(),
        };
        // SAFETY: the bytes are a copy of a `Str`'s, which are valid UTF-8.
        Some(unsafe { Str::from_bytes_unchecked(bytes::Bytes::from_owner(owner)) })
    }

    /// The bytes held now.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }
}

/// One packet's copy for engineioxide; gives its size back to [`Held`] when dropped.
struct HeldCopy {
    buf: Box<[u8]>,
    held: Arc<Held>,
}

impl AsRef<[u8]> for HeldCopy {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for HeldCopy {
    fn drop(&mut self) {
        self.held.bytes.fetch_sub(self.buf.len(), Ordering::AcqRel);
    }
}

/// Queues one packet (on engineioxide keeping [`HEADROOM`] free).
pub fn try_send(s: &Socket, msg: Packet) -> Result<(), SendError> {
    match &s.out {
        Out::Eio(w, held) => {
            let s = w.upgrade().ok_or(SendError::Closed)?;
            let _h1 = s.reserve().map_err(map)?;
            let _h2 = s.reserve().map_err(map)?;
            let p = s.reserve().map_err(map)?;
            p.emit(held.copy(&msg.sio()).ok_or(SendError::Full)?);
            Ok(())
        }
        Out::Ws(q) => q.push_one(msg),
    }
}

/// Queues several packets, all or as many as fit: returns how many were queued
/// before the queue was full (on engineioxide each keeps [`HEADROOM`] free; on [`ws`]
/// the whole batch goes in under one lock and wakes the writer once).
pub fn try_send_all<'a>(
    s: &Socket,
    msgs: impl Iterator<Item = &'a Packet>,
) -> Result<usize, (usize, SendError)> {
    match &s.out {
        Out::Eio(w, held) => {
            let s = w.upgrade().ok_or((0, SendError::Closed))?;
            let _h1 = s.reserve().map_err(|e| (0, map(e)))?;
            let _h2 = s.reserve().map_err(|e| (0, map(e)))?;
            let mut n = 0;
            for m in msgs {
                let p = s.reserve().map_err(|e| (n, map(e)))?;
                p.emit(held.copy(&m.sio()).ok_or((n, SendError::Full))?);
                n += 1;
            }
            Ok(n)
        }
        Out::Ws(q) => q.push_all(msgs, usize::MAX),
    }
}

/// [`try_send_all`], but on [`ws`] stops once `ahead` packets are queued: a
/// catch-up read from the log (unshared packets, a copy each) waits for the
/// device instead of filling its whole queue.
pub fn try_send_paced<'a>(
    s: &Socket,
    msgs: impl Iterator<Item = &'a Packet>,
    ahead: usize,
) -> Result<usize, (usize, SendError)> {
    match &s.out {
        Out::Eio(..) => try_send_all(s, msgs),
        Out::Ws(q) => q.push_all(msgs, ahead),
    }
}

/// Queues a shared [`Batch`] for `s` but the events `s` sent itself: all of it, or
/// (if its queue is full) the caller cuts it. On [`ws`] one entry for the lot.
pub fn try_send_batch(s: &Socket, b: &Batch) -> Result<(), SendError> {
    let own = Some(s.id);
    match &s.out {
        // Each packet is copied ([`Held::copy`]): engineioxide keeps it until a poll
        // takes it, and a slice would keep the commit's whole buffer for as long.
        Out::Eio(..) => try_send_all(s, b.iter().filter(|(t, _)| *t != own).map(|(_, p)| p))
            .map(|_| ())
            .map_err(|(_, e)| e),
        Out::Ws(q) => q.push_batch(b, s.id),
    }
}

/// Sends or cuts: a packet that cannot be queued ends the connection.
pub fn send_or_cut(s: &Socket, msg: Packet) {
    if let Err(SendError::Full) = try_send(s, msg) {
        cut(s, Why::QueueFull);
    }
}

/// Ends the connection now: the TCP connection is reset (so a device that stopped
/// reading cannot hold it), the session is closed (its state dropped, the realm
/// told). One log line per device, whatever else was still queued for it.
pub fn cut(s: &Socket, why: Why) {
    if s.data
        .closing
        .compare_exchange(0, why as u8, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return;
    }
    let device = s.data.device.get().map(|d| d.device_id.clone());
    match why {
        Why::Shutdown => {}
        Why::QueueFull | Why::CatchUpStalled | Why::WriteStalled => tracing::warn!(
            sid = %s.id,
            device = %device.as_deref().unwrap_or("-"),
            reason = why.as_str(),
            "device disconnected: it is not reading what the hub sends; it resumes from its cursor when it reconnects"
        ),
        _ => tracing::info!(
            sid = %s.id,
            device = %device.as_deref().unwrap_or("-"),
            reason = why.as_str(),
            "connection closed by the hub"
        ),
    }
    if why != Why::Shutdown {
        if let Some(c) = s.data.cut.lock().clone() {
            c.cut();
        }
    }
    let reason = match why {
        Why::Shutdown => DisconnectReason::ClosingServer,
        Why::BadPacket => DisconnectReason::PacketParsingError,
        _ => DisconnectReason::TransportError,
    };
    s.close(reason);
}

/// A packet copied into an allocation of its exact size: one allocation, where
/// [`str_of`] of a `String` with spare capacity makes two (`Bytes` boxes its
/// bookkeeping beside a buffer it cannot take whole).
pub fn str_copy(s: &str) -> Packet {
    debug_assert!(
        s.starts_with('4') && s.len() > 1,
        "not an Engine.IO message: {s:?}"
    );
    Packet(Str::copy_from_slice(s))
}

/// Packets cut from one buffer that holds them back to back, `ends[i]` being where
/// packet `i` ends: a commit's whole fan-out in one allocation, each packet a
/// reference to its part.
pub fn strs_of(s: String, ends: &[usize]) -> Vec<Packet> {
    let all = Str::from(s);
    let mut start = 0;
    ends.iter()
        .map(|&end| {
            let p = Packet(all.slice(start..end));
            debug_assert!(
                p.as_bytes().first() == Some(&b'4') && end - start > 1,
                "not an Engine.IO message"
            );
            start = end;
            p
        })
        .collect()
}

/// Builds a [`Packet`] from an encoded one (no copy): `4` and a Socket.IO packet,
/// as every encoder of [`sio`] writes it.
pub fn str_of(s: String) -> Packet {
    debug_assert!(
        s.starts_with('4') && s.len() > 1,
        "not an Engine.IO message: {s:?}"
    );
    Packet(Str::from(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A copy counts its bytes while anything holds it and gives them back when the
    /// last holder drops it; past the limit a copy is refused, unless nothing is held.
    #[test]
    fn held_copies_count_their_bytes_until_dropped() {
        let held = Arc::new(Held {
            bytes: AtomicUsize::new(0),
            cap: 100,
        });
        let p = Str::from("x".repeat(60));
        let a = held.copy(&p).expect("the first copy fits");
        assert_eq!((a.as_str(), held.bytes()), (p.as_str(), 60));
        assert!(
            held.copy(&p).is_none(),
            "120 bytes would pass the limit of 100"
        );
        assert_eq!(held.bytes(), 60, "a refused copy counts nothing");
        let shared = a.clone();
        drop(a);
        assert_eq!(held.bytes(), 60, "a clone still holds the bytes");
        drop(shared);
        assert_eq!(held.bytes(), 0);
        let big = Str::from("y".repeat(500));
        let b = held
            .copy(&big)
            .expect("one packet larger than the limit still goes");
        assert_eq!(held.bytes(), 500);
        assert!(held.copy(&Str::from("z".to_string())).is_none());
        drop(b);
        assert_eq!(held.bytes(), 0);
    }
}
