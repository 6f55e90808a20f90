//! The load generator's own WebSocket client, for the devices that carry the load
//! (throughput, ack latency, fan-out readers). It shares the 2 cores with the hub being
//! measured, and tungstenite's per-frame allocation, copy, UTF-8 check and buffer
//! zeroing had been a fifth of the machine; this reads each frame in place from one
//! buffer. Written here rather than taken from a crate because only a generator needs
//! this little: it takes what both hubs send (unmasked, unfragmented frames: text,
//! ping, close) and refuses anything else loudly.

use std::io;
use std::ops::Range;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The read buffer's size; a larger frame grows it.
const BUF: usize = 64 << 10;
/// Read only into at least this much free space (else move the unread bytes first).
const MIN_READ: usize = 16 << 10;
/// The largest frame taken (both hubs send a catch-up page of 1,000 events at most).
const MAX_FRAME: usize = 16 << 20;

/// One server frame, as a range of [`RawWs::bytes`].
pub enum In {
    Text(Range<usize>),
    /// The peer closed (a close frame or end of stream).
    Closed,
}

/// A client WebSocket over TCP or TLS.
pub struct RawWs {
    io: Box<dyn Io>,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    out: Vec<u8>,
    mask: u32,
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

impl RawWs {
    /// Upgrades `tcp` (TLS with `tls`, naming `localhost`) to a WebSocket at `path`.
    pub async fn open(
        tcp: tokio::net::TcpStream,
        tls: Option<std::sync::Arc<rustls::ClientConfig>>,
        host: &str,
        path: &str,
    ) -> io::Result<RawWs> {
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = match tls {
            Some(cfg) => {
                let name = rustls::pki_types::ServerName::try_from("localhost")
                    .map_err(|_| bad("localhost is not a DNS name"))?;
                Box::new(
                    tokio_rustls::TlsConnector::from(cfg)
                        .connect(name, tcp)
                        .await?,
                )
            }
            None => Box::new(tcp),
        };
        let mut ws = RawWs {
            io,
            buf: vec![0; BUF],
            start: 0,
            end: 0,
            out: Vec::with_capacity(16 << 10),
            mask: 0x9E37_79B9,
        };
        // 16 bytes, base64 (RFC 6455's sample); the generator does not check the accept hash.
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        ws.io.write_all(req.as_bytes()).await?;
        ws.io.flush().await?;
        loop {
            if let Some(i) = ws.buf[..ws.end].windows(4).position(|w| w == b"\r\n\r\n") {
                if !ws.buf.starts_with(b"HTTP/1.1 101") {
                    let head = String::from_utf8_lossy(&ws.buf[..i]).into_owned();
                    return Err(bad(&format!("the upgrade was refused: {head}")));
                }
                ws.start = i + 4;
                return Ok(ws);
            }
            if ws.end == ws.buf.len() || ws.read_more().await? == 0 {
                return Err(bad("no complete upgrade response"));
            }
        }
    }

    /// The bytes a [`In::Text`] range points into (valid until the next read).
    pub fn bytes(&self, r: Range<usize>) -> &[u8] {
        &self.buf[r]
    }

    /// The next frame already read, if a whole one is; answers WebSocket pings.
    pub fn buffered(&mut self) -> io::Result<Option<In>> {
        loop {
            let b = &self.buf[self.start..self.end];
            if b.len() < 2 {
                return Ok(None);
            }
            let (fin, op, masked, len7) =
                (b[0] & 0x80 != 0, b[0] & 0x0f, b[1] & 0x80 != 0, b[1] & 0x7f);
            if !fin || op == 0 {
                return Err(bad(
                    "a fragmented frame (the load generator takes whole frames only)",
                ));
            }
            if masked {
                return Err(bad("a masked frame from the server"));
            }
            let (head, len) = match len7 {
                126 if b.len() >= 4 => (4, u16::from_be_bytes([b[2], b[3]]) as usize),
                127 if b.len() >= 10 => {
                    let mut n = [0u8; 8];
                    n.copy_from_slice(&b[2..10]);
                    (10, u64::from_be_bytes(n) as usize)
                }
                126 | 127 => return Ok(None),
                n => (2, n as usize),
            };
            if len > MAX_FRAME {
                return Err(bad("a frame larger than 16 MiB"));
            }
            if b.len() < head + len {
                return Ok(None);
            }
            let body = self.start + head..self.start + head + len;
            self.start = body.end;
            match op {
                1 | 2 => return Ok(Some(In::Text(body))),
                8 => return Ok(Some(In::Closed)),
                9 => {
                    let ping = self.buf[body].to_vec();
                    self.frame(0xA, &ping);
                }
                _ => {} // pong
            }
        }
    }

    /// Reads what the peer sent since (at least one byte, or 0 at end of stream).
    /// Cancel-safe: dropping it before it is ready loses nothing.
    pub async fn read_more(&mut self) -> io::Result<usize> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.buf.len() - self.end < MIN_READ {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.buf.len() - self.end < MIN_READ {
                let n = self.buf.len() * 2;
                self.buf.resize(n, 0);
            }
        }
        let n = self.io.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n)
    }

    /// Queues a text frame (sent by [`RawWs::flush`]).
    pub fn text(&mut self, s: &[u8]) {
        self.frame(0x1, s);
    }

    fn frame(&mut self, op: u8, s: &[u8]) {
        self.out.push(0x80 | op);
        match s.len() {
            n if n < 126 => self.out.push(0x80 | n as u8),
            n if n <= 0xffff => {
                self.out.push(0x80 | 126);
                self.out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                self.out.push(0x80 | 127);
                self.out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        // A client must mask; xorshift keys, not secrets.
        self.mask ^= self.mask << 13;
        self.mask ^= self.mask >> 17;
        self.mask ^= self.mask << 5;
        let key = self.mask.to_be_bytes();
        self.out.extend_from_slice(&key);
        self.out
            .extend(s.iter().enumerate().map(|(i, c)| c ^ key[i & 3]));
    }

    /// Sends the queued frames.
    pub async fn flush(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            self.io.write_all(&self.out).await?;
            self.out.clear();
        }
        self.io.flush().await
    }

    /// Sends a close frame (best effort).
    pub async fn close(&mut self) {
        self.frame(0x8, &1000u16.to_be_bytes());
        let _ = self.flush().await;
        let _ = self.io.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame claiming a gigabyte is refused, not waited for with a growing buffer.
    #[tokio::test]
    async fn a_huge_frame_is_refused() {
        use tokio::io::AsyncWriteExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut head = b"HTTP/1.1 101 Switching Protocols\r\n\r\n".to_vec();
            head.extend_from_slice(&[0x81, 127, 0, 0, 0, 0, 0x40, 0, 0, 0]);
            s.write_all(&head).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        });
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let mut ws = RawWs::open(tcp, None, "x", "/").await.unwrap();
        loop {
            match ws.buffered() {
                Err(e) => break assert!(e.to_string().contains("16 MiB"), "{e}"),
                Ok(Some(_)) => panic!("a frame from nothing"),
                Ok(None) => assert!(ws.read_more().await.unwrap() > 0),
            }
        }
    }

    /// Against a real server: tungstenite's, which unmasks with the client's key and
    /// checks the frames.
    #[tokio::test]
    async fn frames_round_trip_through_tungstenite() {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(s).await.unwrap();
            let big = "y".repeat(70_000);
            for t in ["hi", &"x".repeat(300), &big] {
                ws.send(Message::text(t)).await.unwrap();
            }
            ws.send(Message::Ping(vec![7u8].into())).await.unwrap();
            let mut got = Vec::new();
            while let Some(Ok(m)) = ws.next().await {
                match m {
                    Message::Text(t) => got.push(t.as_str().len()),
                    Message::Pong(p) => got.push(1000 + p[0] as usize),
                    _ => break,
                }
            }
            got
        });
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let mut ws = RawWs::open(tcp, None, "x", "/").await.unwrap();
        let mut lens = Vec::new();
        while lens.len() < 3 {
            match ws.buffered().unwrap() {
                Some(In::Text(r)) => lens.push(ws.bytes(r).len()),
                Some(In::Closed) => panic!("closed"),
                None => assert!(ws.read_more().await.unwrap() > 0),
            }
        }
        assert_eq!(lens, [2, 300, 70_000]);
        // The ping after them is answered while looking for more.
        while ws.buffered().unwrap().is_none() && ws.out.is_empty() {
            ws.read_more().await.unwrap();
        }
        ws.text(b"a");
        ws.text("z".repeat(200).as_bytes());
        ws.text("w".repeat(66_000).as_bytes());
        ws.close().await;
        assert_eq!(server.await.unwrap(), [1007, 1, 200, 66_000]);
    }
}
