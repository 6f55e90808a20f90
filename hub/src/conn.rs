//! A TCP connection the hub can cut. Every accepted stream is wrapped in a
//! [`Cuttable`] before TLS or HTTP sees it, and its [`Cut`] handle rides in every
//! request's extensions, so the layer that decides a device must go (its send queue
//! overflowed) can end the connection *for real*: a reset now, not a close_notify
//! queued behind a full send buffer that a device that stopped reading never drains.
//!
//! A connection whose peer takes no byte for [`WRITE_STALL`] while the hub has
//! something to write is cut the same way: otherwise a device that stopped reading
//! holds a task, its queue and its TCP connection for as long as it likes (the
//! WebSocket writer waits on the full socket and nothing above it can stop it).
//!
//! Our own code (no crate offers it): the cut must reach the socket underneath TLS,
//! hyper's upgrade and the WebSocket codec, which all own the stream by then.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The handle that cuts one connection. Cloned into every request of it.
#[derive(Debug, Default)]
pub struct Cut {
    /// The socket while the stream lives; `None` once it is dropped, so a stale
    /// handle can never touch a descriptor number that was reused since.
    fd: Mutex<Option<RawFd>>,
    cut: AtomicBool,
}

impl Cut {
    /// Resets the connection: pending output is discarded (SO_LINGER 0) and both
    /// directions are shut, which wakes every task blocked reading or writing it
    /// with an error. Idempotent. Returns false if it was already cut or gone.
    pub fn cut(&self) -> bool {
        if self.cut.swap(true, Ordering::AcqRel) {
            return false;
        }
        let fd = self.fd.lock();
        let Some(fd) = *fd else {
            return false;
        };
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: `fd` is the live socket of the stream (the lock keeps the stream
        // from closing it meanwhile); both calls only change its state.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                &linger as *const libc::linger as *const libc::c_void,
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
            libc::shutdown(fd, libc::SHUT_RDWR);
        }
        true
    }

    pub fn is_cut(&self) -> bool {
        self.cut.load(Ordering::Acquire)
    }
}

/// How long a peer may take no byte while the hub has output for it.
pub const WRITE_STALL: Duration = Duration::from_secs(20);

/// A TCP stream with a [`Cut`] handle. After a cut every read ends and every write
/// fails, whatever the layers above still hold.
#[derive(Debug)]
pub struct Cuttable {
    inner: TcpStream,
    cut: Arc<Cut>,
    /// Armed while a write waits for the peer (allocated at the first wait).
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    stalled: bool,
}

impl Cuttable {
    pub fn new(inner: TcpStream) -> Self {
        let cut = Arc::new(Cut {
            fd: Mutex::new(Some(inner.as_raw_fd())),
            cut: AtomicBool::new(false),
        });
        Cuttable {
            inner,
            cut,
            stall: None,
            stalled: false,
        }
    }

    /// Called with the result of every write-side poll: a `Pending` arms the stall
    /// timer (or checks it), progress disarms it. A stall past [`WRITE_STALL`] cuts.
    fn watch<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        use std::future::Future;
        if r.is_ready() {
            self.stalled = false;
            return r;
        }
        let deadline = tokio::time::Instant::now() + WRITE_STALL;
        let timer = self
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.stalled {
            timer.as_mut().reset(deadline);
            self.stalled = true;
        }
        if timer.as_mut().poll(cx).is_ready() {
            tracing::debug!(peer = ?self.inner.peer_addr().ok(), "connection cut: the peer took nothing for 20 s");
            self.cut.cut();
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer took nothing for 20 s",
            )));
        }
        Poll::Pending
    }

    pub fn handle(&self) -> Arc<Cut> {
        self.cut.clone()
    }

    pub fn get_ref(&self) -> &TcpStream {
        &self.inner
    }
}

impl Drop for Cuttable {
    fn drop(&mut self) {
        // Before the TcpStream field closes the descriptor.
        *self.cut.fd.lock() = None;
    }
}

fn broken() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "connection cut by the hub")
}

impl AsyncRead for Cuttable {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.cut.is_cut() {
            return Poll::Ready(Err(broken()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Cuttable {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.cut.is_cut() {
            return Poll::Ready(Err(broken()));
        }
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.cut.is_cut() {
            return Poll::Ready(Err(broken()));
        }
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.cut.is_cut() {
            return Poll::Ready(Err(broken()));
        }
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.cut.is_cut() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_cut_wakes_a_writer_blocked_on_a_peer_that_never_reads() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let peer = tokio::spawn(async move {
            // Connects and never reads; waits to see the reset.
            let mut s = TcpStream::connect(addr).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            let mut b = vec![0u8; 1 << 16];
            loop {
                match s.read(&mut b).await {
                    Ok(0) => return "eof",
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return "reset",
                    Err(_) => return "error",
                }
            }
        });
        let (s, _) = l.accept().await.unwrap();
        let mut c = Cuttable::new(s);
        let cut = c.handle();
        let writer = tokio::spawn(async move {
            let chunk = vec![7u8; 1 << 16];
            loop {
                if c.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!writer.is_finished(), "the writer should be blocked by now");
        assert!(cut.cut());
        assert!(!cut.cut(), "a second cut does nothing");
        tokio::time::timeout(std::time::Duration::from_secs(2), writer)
            .await
            .expect("the cut wakes the blocked writer")
            .unwrap();
        let how = tokio::time::timeout(std::time::Duration::from_secs(5), peer)
            .await
            .expect("the peer sees the end")
            .unwrap();
        assert_eq!(
            how, "reset",
            "pending output is discarded: a reset, not a FIN behind it"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_takes_nothing_is_cut_after_the_stall_limit() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _peer = TcpStream::connect(addr).await.unwrap(); // never reads
        let (s, _) = l.accept().await.unwrap();
        let mut c = Cuttable::new(s);
        let cut = c.handle();
        let chunk = vec![7u8; 1 << 16];
        let err = loop {
            if let Err(e) = c.write_all(&chunk).await {
                break e;
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(cut.is_cut());
    }

    #[tokio::test]
    async fn a_handle_outliving_its_stream_touches_nothing() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _c = TcpStream::connect(addr).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        let c = Cuttable::new(s);
        let cut = c.handle();
        drop(c);
        assert!(!cut.cut());
    }
}
