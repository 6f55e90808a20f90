//! The hub's side of one device connection: its Engine.IO socket, the little
//! state the hub keeps per device, and the one way anything is sent to it.
//!
//! Promises kept here:
//! * **Nothing is dropped silently.** A send either lands in the device's queue or
//!   the device is cut: its TCP connection reset at once (see [`crate::conn`]), its
//!   session closed, one log line. It reconnects and resumes from its cursor.
//! * **A burst never costs a well-behaved device its connection.** Engine.IO's own
//!   heartbeat shares the queue and closes the socket if it finds it full, so every
//!   send keeps [`HEADROOM`] slots free; only the hub's own sends can overflow.
//! * **Encode once.** A packet is a [`Str`] (shared bytes): the same buffer goes to
//!   every socket, a reference count each.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

use engineioxide::socket::DisconnectReason;
pub use engineioxide::socket::Sid;
pub use engineioxide::Str;
use parking_lot::Mutex;

use crate::conn::Cut;

pub mod sio;

/// One device's Engine.IO socket.
pub type Socket = engineioxide::Socket<Session>;
/// A shared handle to it.
pub type Sock = Arc<Socket>;

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

/// Queues one packet, keeping [`HEADROOM`] free.
pub fn try_send(s: &Socket, msg: Str) -> Result<(), SendError> {
    let _h1 = s.reserve().map_err(map)?;
    let _h2 = s.reserve().map_err(map)?;
    s.reserve().map_err(map)?.emit(msg);
    Ok(())
}

/// Queues several packets, all or as many as fit: returns how many were queued
/// before the queue was full (each keeps [`HEADROOM`] free).
pub fn try_send_all<'a>(
    s: &Socket,
    msgs: impl Iterator<Item = &'a Str>,
) -> Result<usize, (usize, SendError)> {
    let _h1 = s.reserve().map_err(|e| (0, map(e)))?;
    let _h2 = s.reserve().map_err(|e| (0, map(e)))?;
    let mut n = 0;
    for m in msgs {
        match s.reserve() {
            Ok(p) => p.emit(m.clone()),
            Err(e) => return Err((n, map(e))),
        }
        n += 1;
    }
    Ok(n)
}

/// Sends or cuts: a packet that cannot be queued ends the connection.
pub fn send_or_cut(s: &Socket, msg: Str) {
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
        Why::QueueFull | Why::CatchUpStalled => tracing::warn!(
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

/// Builds a [`Str`] from an encoded packet (no copy).
pub fn str_of(s: String) -> Str {
    Str::from(s)
}
