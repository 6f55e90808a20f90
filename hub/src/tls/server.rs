//! One port for everything. The first byte of a connection decides: 0x16 (a TLS
//! ClientHello) is HTTPS/WSS with the hub's leaf certificate; anything else is
//! plain HTTP, which answers only `GET /healthz` and `GET /ca.crt` (the old
//! runbook's `curl http://localhost:4001/healthz` keeps working, and a device can
//! fetch the CA to trust) and redirects or refuses the rest, never serving data.
//!
//! The leaf is swapped in place (a rustls `ResolvesServerCert` over a lock) when
//! it nears expiry or the box's addresses change; open connections keep theirs.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, Request, Response, StatusCode};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::{Mutex, RwLock};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tower::ServiceExt;

use super::ca::{CaError, LeafNames, StoreCa, RENEW_DAYS};
use crate::conn::{Cut, Cuttable};

/// The current leaf, swappable while serving. None while the clock is known to be
/// wrong: TLS handshakes then fail until a leaf can be dated correctly.
#[derive(Debug)]
pub struct Resolver {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().clone()
    }
}

/// The store CA, the leaf it issued, and the rustls configuration serving it.
pub struct Tls {
    ca: Mutex<StoreCa>,
    resolver: Arc<Resolver>,
    names: Mutex<LeafNames>,
    not_after: AtomicI64,
    extra: Vec<String>,
    pub config: Arc<rustls::ServerConfig>,
    pub ca_pem: String,
    pub fingerprint: String,
}

fn certified(
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
) -> Result<Arc<CertifiedKey>, CaError> {
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| CaError::LeafKey(e.to_string()))?;
    Ok(Arc::new(CertifiedKey::new(chain, signer)))
}

impl Tls {
    /// Takes the store CA and issues the first leaf, unless `clock_ok` is false
    /// (the clock is known to be wrong): then the leaf waits for the renewal check.
    pub fn start(
        ca: StoreCa,
        extra: Vec<String>,
        now: i64,
        clock_ok: bool,
    ) -> Result<Arc<Self>, CaError> {
        let names = LeafNames::current(&extra);
        let (current, not_after) = if clock_ok {
            let (chain, key, not_after) = ca.issue_leaf(&names, now)?;
            tracing::info!(dns = ?names.dns, ips = ?names.ips, "issued the hub's TLS certificate");
            (Some(certified(chain, key)?), not_after)
        } else {
            tracing::error!("the clock is known to be wrong (behind its floor, no NTP answer yet): no TLS certificate is issued until it is right; plain /healthz and /ca.crt still answer");
            (None, 0)
        };
        let resolver = Arc::new(Resolver {
            current: RwLock::new(current),
        });
        let mut provider = rustls::crypto::ring::default_provider();
        provider.cipher_suites = preferred_suites(aes_in_hardware());
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| CaError::LeafKey(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        // The hub's order, not the device's: the cipher costs the hub once per byte
        // it sends to every device.
        config.ignore_client_order = true;
        Ok(Arc::new(Tls {
            ca_pem: ca.cert_pem.clone(),
            fingerprint: ca.fingerprint(),
            ca: Mutex::new(ca),
            resolver,
            names: Mutex::new(names),
            not_after: AtomicI64::new(not_after),
            extra,
            config: Arc::new(config),
        }))
    }

    /// Re-issues the leaf if it expires within [`RENEW_DAYS`] or the box's
    /// addresses changed. Returns true if it did.
    pub fn renew_if_needed(&self, now: i64) -> Result<bool, CaError> {
        let names = LeafNames::current(&self.extra);
        let expiring = self.not_after.load(Ordering::Relaxed) - now < RENEW_DAYS * 86400;
        let changed = *self.names.lock() != names;
        if !expiring && !changed {
            return Ok(false);
        }
        let (chain, key, not_after) = self.ca.lock().issue_leaf(&names, now)?;
        *self.resolver.current.write() = Some(certified(chain, key)?);
        self.not_after.store(not_after, Ordering::Relaxed);
        tracing::info!(dns = ?names.dns, ips = ?names.ips, expiring, changed, "renewed the hub's TLS certificate");
        *self.names.lock() = names;
        Ok(true)
    }

    /// The names the current leaf covers.
    pub fn names(&self) -> LeafNames {
        self.names.lock().clone()
    }
}

/// Checks the leaf every `every` (address changes are picked up within it).
pub async fn renew_loop(tls: Arc<Tls>, every: Duration, clock: Arc<crate::clock::Clock>) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        // No certificate is dated from a clock known to be wrong.
        if !clock.trusted_for_issuing() {
            continue;
        }
        let t = tls.clone();
        let now = clock.now_secs();
        match tokio::task::spawn_blocking(move || t.renew_if_needed(now)).await {
            Ok(Err(e)) => {
                tracing::error!(error = %e, "could not renew the TLS certificate; keeping the current one")
            }
            Err(e) => tracing::error!(error = %e, "certificate renewal task failed"),
            Ok(Ok(_)) => {}
        }
    }
}

/// Accepts connections until `stop` fires; each is served on its own task.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    tls: Option<Arc<Tls>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let acceptor = tls
        .as_ref()
        .map(|t| tokio_rustls::TlsAcceptor::from(t.config.clone()));
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            match acceptor {
                None => serve_http(Cuttable::new(stream), router, peer, Mode::Plain).await,
                Some(acceptor) => {
                    let mut first = [0u8; 1];
                    match tokio::time::timeout(Duration::from_secs(10), stream.peek(&mut first))
                        .await
                    {
                        Ok(Ok(1)) if first[0] == 0x16 => {
                            match tokio::time::timeout(
                                Duration::from_secs(10),
                                acceptor.accept(Cuttable::new(stream)),
                            )
                            .await
                            {
                                Ok(Ok(tls)) => serve_http(tls, router, peer, Mode::Https).await,
                                Ok(Err(e)) => {
                                    tracing::debug!(%peer, error = %e, "TLS handshake failed")
                                }
                                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                            }
                        }
                        Ok(Ok(1)) => {
                            serve_http(Cuttable::new(stream), router, peer, Mode::PlainLimited)
                                .await
                        }
                        _ => {}
                    }
                }
            }
        });
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// TLS is off (TLS=off): everything over plain HTTP.
    Plain,
    /// Plain HTTP beside TLS: `/healthz` and `/ca.crt` only.
    PlainLimited,
    Https,
}

/// A stream that knows the [`Cut`] of its TCP connection.
trait Conn: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {
    fn cut(&self) -> Arc<Cut>;
}
impl Conn for Cuttable {
    fn cut(&self) -> Arc<Cut> {
        self.handle()
    }
}
impl Conn for tokio_rustls::server::TlsStream<Cuttable> {
    fn cut(&self) -> Arc<Cut> {
        self.get_ref().0.handle()
    }
}

async fn serve_http<I: Conn>(io: I, router: Router, peer: SocketAddr, mode: Mode) {
    let cut = io.cut();
    let svc = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        req.extensions_mut().insert(cut.clone());
        let router = router.clone();
        async move {
            if mode == Mode::PlainLimited {
                let path = req.uri().path();
                if path != "/healthz" && path != "/ca.crt" {
                    return Ok::<_, std::convert::Infallible>(plain_refusal(&req));
                }
            }
            let resp = router.oneshot(req.map(Body::new)).await;
            Ok(resp.unwrap_or_else(|e| match e {}))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::trace!(%peer, error = %e, "connection ended with an error");
    }
}

/// Plain HTTP for anything but `/healthz` and `/ca.crt`: a redirect to HTTPS for
/// simple GETs, 426 otherwise. Never data.
fn plain_refusal<B>(req: &Request<B>) -> Response<Body> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    let is_upgrade = req.headers().contains_key(header::UPGRADE);
    let mut b = Response::builder();
    if (req.method() == "GET" || req.method() == "HEAD") && !is_upgrade {
        let loc = format!(
            "https://{host}{}",
            req.uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/")
        );
        b = b
            .status(StatusCode::PERMANENT_REDIRECT)
            .header(header::LOCATION, loc);
    } else {
        b = b
            .status(StatusCode::UPGRADE_REQUIRED)
            .header(header::UPGRADE, "TLS/1.3, HTTP/1.1")
            .header(header::CONNECTION, "Upgrade");
    }
    b.header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from(
            "this hub serves HTTPS/WSS on this port; fetch /ca.crt to trust its CA\n",
        ))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

/// Whether this CPU has AES and carry-less multiply instructions (AES-GCM in
/// hardware): a Pi 5 and x86 do, a Pi 4 does not.
fn aes_in_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// rustls's cipher suites, cheapest first for this CPU: AES-128-GCM where AES is
/// in hardware (fewer rounds than AES-256), ChaCha20-Poly1305 where it is not
/// (several times faster than AES in software on a Pi 4's cores).
fn preferred_suites(aes_hw: bool) -> Vec<rustls::SupportedCipherSuite> {
    use rustls::CipherSuite as C;
    let rank = |s: &rustls::SupportedCipherSuite| {
        let aead = match s.suite() {
            C::TLS13_AES_128_GCM_SHA256
            | C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => u8::from(!aes_hw),
            C::TLS13_CHACHA20_POLY1305_SHA256
            | C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
            | C::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => 2 * u8::from(aes_hw),
            _ => 1 + u8::from(!aes_hw), // AES-256-GCM
        };
        // TLS 1.3 before 1.2, then the cheaper AEAD (the sort is stable).
        (matches!(s, rustls::SupportedCipherSuite::Tls12(_)), aead)
    };
    let mut v = rustls::crypto::ring::DEFAULT_CIPHER_SUITES.to_vec();
    v.sort_by_key(rank);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::CipherSuite as C;

    #[test]
    fn the_cheapest_cipher_for_the_cpu_comes_first_and_none_is_lost() {
        let all = rustls::crypto::ring::DEFAULT_CIPHER_SUITES.len();
        let hw = preferred_suites(true);
        let sw = preferred_suites(false);
        assert_eq!((hw.len(), sw.len()), (all, all));
        assert_eq!(hw[0].suite(), C::TLS13_AES_128_GCM_SHA256);
        assert_eq!(hw[2].suite(), C::TLS13_CHACHA20_POLY1305_SHA256);
        assert_eq!(sw[0].suite(), C::TLS13_CHACHA20_POLY1305_SHA256);
        assert_eq!(sw[1].suite(), C::TLS13_AES_128_GCM_SHA256);
        for v in [&hw, &sw] {
            let first12 = v
                .iter()
                .position(|s| matches!(s, rustls::SupportedCipherSuite::Tls12(_)))
                .unwrap_or(all);
            assert!(v[first12..]
                .iter()
                .all(|s| matches!(s, rustls::SupportedCipherSuite::Tls12(_))));
        }
    }
}
