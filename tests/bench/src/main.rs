//! `pos-hub-bench`: drives a real `pos-hub` over Socket.IO (a minimal Engine.IO v4 /
//! Socket.IO v5 client over WebSocket, or WSS with `--tls`) and prints the figures of
//! issue 2: durable events/s with 50 devices, ack latency at 1,000 events/s, fan-out
//! latency to 200 devices, RSS per idle connection, and replay speed. With
//! `--reference node` it runs the same scenarios against the older design's hub
//! (`node-ref/`: socket.io 4 + better-sqlite3 with group commit) in the same run,
//! interleaved, and prints both side by side with the DEVELOPERS.md aims.
//! Figures only: no assertions on speed (shared machines are noisy); correctness (no
//! lost ack, no reordering, no gap in replay) is checked and reported.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

mod nats;
mod rawws;
mod soak;

use rawws::{In, RawWs};

#[derive(Parser, Clone)]
#[command(about = "Load generator for pos-hub")]
struct Args {
    /// all | throughput | latency | fanout | idle | replay | offline | retention | soak, nats (not in all)
    #[arg(long, default_value = "all")]
    scenario: String,
    /// Small sizes, a few seconds in all (CI smoke run).
    #[arg(long)]
    quick: bool,
    /// The hub binary (default: target/release/pos-hub beside this binary).
    #[arg(long)]
    hub_bin: Option<PathBuf>,
    #[arg(long, default_value_t = 50)]
    devices: usize,
    #[arg(long, default_value_t = 32)]
    in_flight: usize,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    #[arg(long, default_value_t = 1000)]
    idle: usize,
    #[arg(long, default_value_t = 100_000)]
    replay: usize,
    #[arg(long, default_value_t = 200)]
    fanout: usize,
    /// Length of `--scenario soak` (not part of `all`), in minutes.
    #[arg(long, default_value_t = 30.0)]
    minutes: f64,
    /// Serve TLS on the hub (its store CA) and speak WSS, trusting that CA (GET /ca.crt).
    #[arg(long)]
    tls: bool,
    /// Also run every scenario against a reference hub in the same run, interleaved:
    /// `node` (tests/bench/node-ref, `npm ci` there first; scripts/bench does it).
    #[arg(long, value_parser = ["node"])]
    reference: Option<String>,
    /// With --reference: how many rounds of every scenario on both hubs (medians printed).
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// The Node reference hub's folder (default: tests/bench/node-ref of this source tree).
    #[arg(long)]
    node_ref: Option<PathBuf>,
}

/// Which hub a scenario starts, and how devices reach it.
#[derive(Clone)]
struct HubSpec {
    kind: Kind,
    /// pos-hub's binary, or the Node reference's folder.
    path: PathBuf,
    tls: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Kind {
    PosHub,
    Node,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::PosHub => "pos-hub",
            Kind::Node => "Node",
        }
    }
}

impl HubSpec {
    fn transport(&self) -> &'static str {
        if self.tls {
            "wss"
        } else {
            "ws"
        }
    }
}

/// The TLS client setup of every hub started with TLS, by port: `connect` and the HTTP
/// helpers look it up, so callers keep passing just a port.
static TLS_BY_PORT: Mutex<Option<HashMap<u16, Arc<rustls::ClientConfig>>>> = Mutex::new(None);

fn tls_for(port: u16) -> Option<Arc<rustls::ClientConfig>> {
    TLS_BY_PORT.lock().ok()?.as_ref()?.get(&port).cloned()
}

/// A rustls client that trusts only `ca_pem` (a hub's store CA).
fn client_config(ca_pem: &str) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let c = c.map_err(|e| format!("the hub's /ca.crt is not PEM: {e}"))?;
        roots
            .add(c)
            .map_err(|e| format!("the hub's CA is not usable: {e}"))?;
    }
    if roots.is_empty() {
        return Err("the hub's /ca.crt holds no certificate".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// The 1-minute load average (the machine is shared: figures are recorded beside it).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------- the hub

struct Hub {
    child: tokio::process::Child,
    port: u16,
    dir: PathBuf,
    key: pos_hub::auth::SigningKey,
}

impl Hub {
    /// pos-hub over plain ws (TLS=off), with extra settings in `env`.
    async fn start_with(bin: &Path, tag: &str, env: &[(&str, String)]) -> Hub {
        let spec = HubSpec {
            kind: Kind::PosHub,
            path: bin.to_path_buf(),
            tls: false,
        };
        Self::launch(&spec, tag, env).await
    }

    /// Starts the hub `spec` names on a free loopback port with a fresh data dir and
    /// waits until it answers /healthz (and, with TLS, until its CA is fetched).
    async fn launch(spec: &HubSpec, tag: &str, env: &[(&str, String)]) -> Hub {
        let dir = std::env::temp_dir().join(format!(
            "poshub-bench-{tag}-{}-{}",
            spec.kind.name(),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let port = free_port();
        let mut cmd = match spec.kind {
            Kind::PosHub => {
                let mut c = tokio::process::Command::new(&spec.path);
                c.args(["serve", "--dev", "--data-dir"])
                    .arg(&dir)
                    .args(["--port", &port.to_string()])
                    .env("MDNS", "off")
                    .env("NTP_SERVERS", "off")
                    .env("RUST_LOG", "warn");
                c
            }
            Kind::Node => {
                let mut c = tokio::process::Command::new("node");
                c.arg(spec.path.join("server.mjs"))
                    .arg("--data-dir")
                    .arg(&dir)
                    .args(["--port", &port.to_string()]);
                c
            }
        };
        let child = cmd
            .env("TLS", if spec.tls { "on" } else { "off" })
            .env("BIND", "127.0.0.1")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", spec.path.display()));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let _ = s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").await;
                let mut b = vec![0; 64];
                if let Ok(n) = s.read(&mut b).await {
                    if String::from_utf8_lossy(&b[..n]).contains("200") {
                        break;
                    }
                }
            }
            assert!(Instant::now() < deadline, "hub did not become healthy");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if spec.tls {
            // Plain HTTP answers /ca.crt beside TLS on the same port (both hubs).
            let resp = http_get(port, "/ca.crt").await;
            let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
            let cfg = client_config(body)
                .unwrap_or_else(|e| panic!("{} on port {port}: {e}", spec.kind.name()));
            if let Ok(mut m) = TLS_BY_PORT.lock() {
                m.get_or_insert_with(HashMap::new).insert(port, cfg);
            }
        }
        let key = pos_hub::auth::SigningKey::from_file(&dir.join("dev/cluster-key.pem"))
            .expect("dev key");
        Hub {
            child,
            port,
            dir,
            key,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    fn token(&self, device: &str) -> String {
        let now = pos_hub::util::now_secs();
        let c = pos_hub::auth::Claims {
            tenant_id: "t-dev".into(),
            store_id: "s-dev".into(),
            device_id: device.into(),
            role: "till".into(),
            exp: now + 3600,
            iat: now,
            nbf: None,
            iss: None,
            aud: None,
        };
        pos_hub::auth::token::mint(&self.key, &c, None).expect("mint")
    }

    /// CPU time (user + system) of the hub, in microseconds.
    fn cpu_us(&self) -> u64 {
        proc_cpu_us(&self.pid().to_string())
    }

    /// A counter from the hub's `/metrics` (localhost may read it; over HTTPS when
    /// the hub serves TLS). None from a hub without it (the Node reference).
    /// The hub's `poshub_device_disconnects_total` by reason (pos-hub only).
    async fn disconnects(&self) -> String {
        let body = http_get(self.port, "/metrics").await;
        let v: Vec<String> = body
            .lines()
            .filter_map(|l| l.strip_prefix("poshub_device_disconnects_total{reason=\""))
            .filter_map(|l| l.split_once("\"} "))
            .map(|(r, n)| format!("{r} {n}"))
            .collect();
        if v.is_empty() {
            "none reported".into()
        } else {
            v.join(", ")
        }
    }

    async fn metric(&self, name: &str) -> Option<f64> {
        let body = http_get(self.port, "/metrics").await;
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
    }

    fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                l.strip_prefix("VmRSS:")
                    .map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0))
            })
            .unwrap_or(0)
    }

    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Ok(mut m) = TLS_BY_PORT.lock() {
            if let Some(m) = m.as_mut() {
                m.remove(&self.port);
            }
        }
    }
}

// ---------------------------------------------------------------- a device

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connects, authenticates; returns the socket once `synced` arrived (and how many
/// events were replayed before it).
/// Over WSS when the hub on `port` was started with TLS (trusting its CA only).
async fn connect(port: u16, token: &str, since: Option<u64>) -> (Ws, u64, Vec<u64>) {
    let tls = tls_for(port);
    let url = match tls {
        // The leaf certificate names localhost; the TCP connection goes to 127.0.0.1.
        Some(_) => format!("wss://localhost:{port}/socket.io/?EIO=4&transport=websocket"),
        None => format!("ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket"),
    };
    let (mut ws, _) = tokio::time::timeout(Duration::from_secs(20), async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(tokio_tungstenite::tungstenite::Error::Io)?;
        // tungstenite zeroes `read_buffer_size` bytes before every read (128 KiB by
        // default, 8% of the load generator's CPU); a TLS read brings at most a few
        // records.
        let cfg = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(32 << 10);
        tokio_tungstenite::client_async_tls_with_config(
            url.as_str(),
            tcp,
            Some(cfg),
            tls.map(tokio_tungstenite::Connector::Rustls),
        )
        .await
    })
    .await
    .expect("connect timeout")
    .expect("connect");
    let auth = match since {
        Some(s) => format!("40{{\"token\":\"{token}\",\"since\":{s}}}"),
        None => format!("40{{\"token\":\"{token}\"}}"),
    };
    let mut sent_auth = false;
    let mut replayed = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let m = tokio::time::timeout_at(deadline.into(), ws.next())
            .await
            .expect("handshake timeout");
        let Some(Ok(Message::Text(t))) = m else {
            panic!("connection closed during handshake")
        };
        let t = t.as_str();
        if t.starts_with('0') && !sent_auth {
            ws.send(Message::text(auth.clone()))
                .await
                .expect("send auth");
            sent_auth = true;
        } else if t == "2" {
            ws.send(Message::text("3")).await.expect("pong");
        } else if t.starts_with("44") {
            panic!("refused: {t}");
        } else if let Some(rest) = t.strip_prefix("42[\"synced\",") {
            let seq = num_after(rest, "\"seq\":").unwrap_or(0);
            return (ws, seq, replayed);
        } else if t.starts_with("42[\"event\",") {
            replayed.push(num_after(t, "\"seq\":").unwrap_or(0));
        }
    }
}

/// What a device sending events reads next from the hub.
enum Frame {
    /// Nothing within the wait (or a frame that is not text): time to send again.
    Idle,
    /// The connection ended.
    Closed,
    /// `43<id>[...]`: the ack of the event sent with ack id `id`, and the whole frame.
    Ack(u64, Utf8Bytes),
    /// A fanned-out event (`42["event",...`), the whole frame.
    Event(Utf8Bytes),
    /// Engine.IO's ping, already answered.
    Ping,
    Other,
}

/// Waits up to `wait` for the hub's next frame and sorts it; answers pings.
async fn next_frame(
    tx: &mut futures_util::stream::SplitSink<Ws, Message>,
    rx: &mut futures_util::stream::SplitStream<Ws>,
    wait: Duration,
) -> Frame {
    let f = match tokio::time::timeout(wait, rx.next()).await {
        Err(_) => return Frame::Idle,
        Ok(None) | Ok(Some(Err(_))) => return Frame::Closed,
        Ok(Some(Ok(m))) => sort_frame(m),
    };
    if let Frame::Ping = f {
        let _ = tx.send(Message::text("3")).await;
    }
    f
}

/// Sorts one message of the hub.
fn sort_frame(m: Message) -> Frame {
    let Message::Text(t) = m else {
        return Frame::Idle;
    };
    if let Some(rest) = t.strip_prefix("43") {
        Frame::Ack(ack_id(rest.as_bytes()), t)
    } else if t.starts_with("42[\"event\"") {
        Frame::Event(t)
    } else if t == "2" {
        Frame::Ping
    } else {
        Frame::Other
    }
}

/// [`connect`] with the generator's own client ([`RawWs`]), for devices that carry load.
async fn connect_raw(port: u16, token: &str) -> RawWs {
    let host = format!("localhost:{port}");
    let mut ws = tokio::time::timeout(Duration::from_secs(20), async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        RawWs::open(
            tcp,
            tls_for(port),
            &host,
            "/socket.io/?EIO=4&transport=websocket",
        )
        .await
    })
    .await
    .expect("connect timeout")
    .expect("connect");
    let auth = format!("40{{\"token\":\"{token}\"}}");
    let mut sent_auth = false;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = match ws.buffered().expect("a WebSocket frame") {
            Some(In::Text(r)) => r,
            Some(In::Closed) => panic!("connection closed during handshake"),
            None => {
                let n = tokio::time::timeout_at(deadline.into(), ws.read_more())
                    .await
                    .expect("handshake timeout")
                    .expect("read");
                assert!(n > 0, "connection closed during handshake");
                continue;
            }
        };
        let t = ws.bytes(r);
        if t.starts_with(b"44") {
            panic!("refused: {}", String::from_utf8_lossy(t));
        } else if t.starts_with(b"42[\"synced\",") {
            return ws;
        } else if t.starts_with(b"0") && !sent_auth {
            ws.text(auth.as_bytes());
            sent_auth = true;
        } else if t == b"2" {
            ws.text(b"3");
        } else {
            continue;
        }
        ws.flush().await.expect("send");
    }
}

/// What a device on [`RawWs`] reads next: [`Frame`] with ranges of `ws.bytes`
/// (valid until its next read) instead of owned frames.
enum Got {
    Idle,
    Closed,
    Ack(u64, std::ops::Range<usize>),
    Event(std::ops::Range<usize>),
    Other,
}

/// Waits up to `wait` for the next frame on `ws` and sorts it; answers pings. For a
/// device that reads and writes in one task: one timer re-armed only when it must fire
/// sooner (waking early is harmless: the caller just looks again), and a frame already
/// read is sorted in place, with no clock read, timer, allocation or copy. The load
/// generator shares the hub's cores, so every microsecond it spends per frame is taken
/// from the hub being measured.
async fn next_frame_raw(
    ws: &mut RawWs,
    timer: &mut std::pin::Pin<&mut tokio::time::Sleep>,
    armed: &mut Option<tokio::time::Instant>,
    wait: Duration,
) -> Got {
    loop {
        match ws.buffered() {
            Err(_) | Ok(Some(In::Closed)) => return Got::Closed,
            Ok(Some(In::Text(r))) => {
                let t = ws.bytes(r.clone());
                if let Some(rest) = t.strip_prefix(b"43") {
                    return Got::Ack(ack_id(rest), r);
                } else if t.starts_with(b"42[\"event\"") {
                    return Got::Event(r);
                } else if t == b"2" {
                    ws.text(b"3");
                    if ws.flush().await.is_err() {
                        return Got::Closed;
                    }
                }
                return Got::Other;
            }
            Ok(None) => {}
        }
        let read = match futures_util::FutureExt::now_or_never(ws.read_more()) {
            Some(r) => r,
            None => {
                let due = tokio::time::Instant::now() + wait;
                if armed.is_none_or(|a| a > due + Duration::from_micros(200)) {
                    timer.as_mut().reset(due);
                    *armed = Some(due);
                }
                tokio::select! {
                    biased;
                    r = ws.read_more() => r,
                    _ = timer.as_mut() => {
                        *armed = None;
                        return Got::Idle;
                    }
                }
            }
        };
        if !matches!(read, Ok(n) if n > 0) {
            return Got::Closed;
        }
    }
}

/// The ack id at the start of what follows `43` (`u64::MAX` if it has none).
fn ack_id(rest: &[u8]) -> u64 {
    rest.iter()
        .take_while(|c| c.is_ascii_digit())
        .try_fold(0u64, |n, c| {
            n.checked_mul(10)?.checked_add(u64::from(c - b'0'))
        })
        .unwrap_or(u64::MAX)
}

/// [`num_after`] on bytes.
fn num_after_b(s: &[u8], key: &[u8]) -> Option<u64> {
    let i = s.windows(key.len()).position(|w| w == key)? + key.len();
    let d = &s[i..];
    let n = d.iter().take_while(|c| c.is_ascii_digit()).count();
    std::str::from_utf8(&d[..n]).ok()?.parse().ok()
}

/// CPU time (user + system) of process `pid` ("self" for the load generator), in
/// microseconds.
fn proc_cpu_us(pid: &str) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    ticks * 1_000_000 / hz
}

fn num_after(s: &str, key: &str) -> Option<u64> {
    num_after_b(s.as_bytes(), key.as_bytes())
}

fn event_frame(ack: u64, id: &str, t_ns: u128, pad: &str) -> String {
    format!("42{ack}[\"event\",{{\"id\":\"{id}\",\"type\":\"order.created\",\"payload\":{{\"t\":{t_ns},\"pad\":\"{pad}\"}}}}]")
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((p / 100.0) * (v.len() as f64 - 1.0)).round() as usize;
    v[i.min(v.len() - 1)]
}

// ---------------------------------------------------------------- scenarios

struct DevResult {
    acked: u64,
    sent: u64,
    inversions: u64,
    fanout_in: u64,
    lat_ms: Vec<f64>,
}

/// One device: keeps `window` events in flight (or paces at `rate` per second),
/// reading acks and fan-out, until `dur` has passed; then waits for its acks.
#[allow(clippy::too_many_arguments)]
async fn run_device(
    port: u16,
    token: String,
    dev: usize,
    window: usize,
    rate: Option<f64>,
    dur: Duration,
    t0: Instant,
    run: u64,
) -> DevResult {
    let mut ws = connect_raw(port, &token).await;
    let timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(timer);
    let mut armed = None;
    let pad = "x".repeat(100);
    let mut r = DevResult {
        acked: 0,
        sent: 0,
        inversions: 0,
        fanout_in: 0,
        lat_ms: Vec::new(),
    };
    let mut sent_at: std::collections::HashMap<u64, Instant> = Default::default();
    let mut last_seq = 0u64;
    let end = Instant::now() + dur;
    let mut next_send = Instant::now()
        + rate
            .map(|r| Duration::from_secs_f64(rand_unit(dev) / r))
            .unwrap_or_default();
    // The clock is read again after a wait, an ack, or 64 frames of fan-out.
    let mut now = Instant::now();
    let mut frames = 0u32;
    loop {
        let sending = now < end;
        if !sending && sent_at.is_empty() {
            break;
        }
        if now > end + Duration::from_secs(15) {
            break; // lost acks are reported
        }
        // Send what the window or the pace allows.
        let mut fed = false;
        while sending && sent_at.len() < window && (rate.is_none() || Instant::now() >= next_send) {
            let id = format!("b{run}-{dev}-{}", r.sent);
            let f = event_frame(r.sent, &id, t0.elapsed().as_nanos(), &pad);
            sent_at.insert(r.sent, Instant::now());
            r.sent += 1;
            ws.text(f.as_bytes());
            fed = true;
            if let Some(rate) = rate {
                next_send += Duration::from_secs_f64(1.0 / rate);
            }
        }
        if fed && ws.flush().await.is_err() {
            return r;
        }
        let wait = if rate.is_some() && sending {
            next_send.saturating_duration_since(Instant::now())
        } else {
            Duration::from_millis(200)
        };
        let wait = wait.max(Duration::from_micros(50));
        let f = next_frame_raw(&mut ws, &mut timer, &mut armed, wait).await;
        frames += 1;
        if frames >= 64 || !matches!(f, Got::Event(_)) || rate.is_some() {
            now = Instant::now();
            frames = 0;
        }
        match f {
            Got::Closed => break,
            Got::Ack(id, ack) => {
                if let Some(at) = sent_at.remove(&id) {
                    r.lat_ms.push(at.elapsed().as_secs_f64() * 1000.0);
                    r.acked += 1;
                    if let Some(seq) = num_after_b(ws.bytes(ack), b"\"seq\":") {
                        if seq <= last_seq {
                            r.inversions += 1;
                        }
                        last_seq = seq;
                    }
                }
            }
            Got::Event(_) => r.fanout_in += 1,
            Got::Idle | Got::Other => {}
        }
    }
    ws.close().await;
    r
}

fn rand_unit(seed: usize) -> f64 {
    ((seed as u64).wrapping_mul(0x9E3779B97F4A7C15) >> 11) as f64 / (1u64 << 53) as f64
}

/// The headline figures of one scenario on one hub, by key (see `FIGURES`).
type Figs = Vec<(&'static str, f64)>;

async fn throughput(a: &Args, spec: &HubSpec, report: &mut Vec<(String, String)>, figs: &mut Figs) {
    let hub = Hub::launch(spec, "tp", &[]).await;
    let dur = Duration::from_secs(if a.quick { 2 } else { a.seconds });
    let n = if a.quick { 10 } else { a.devices };
    let t0 = Instant::now();
    let allocs0 = hub.metric("poshub_heap_allocations_total").await;
    let commits0 = hub.metric("poshub_commit_batch_events_count").await;
    let cpu0 = hub.cpu_us();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for d in 0..n {
        let tok = hub.token(&format!("till-{d}"));
        tasks.push(tokio::spawn(run_device(
            hub.port,
            tok,
            d,
            a.in_flight,
            None,
            dur,
            t0,
            1,
        )));
    }
    let mut total = DevResult {
        acked: 0,
        sent: 0,
        inversions: 0,
        fanout_in: 0,
        lat_ms: Vec::new(),
    };
    for t in tasks {
        if let Ok(r) = t.await {
            total.acked += r.acked;
            total.sent += r.sent;
            total.inversions += r.inversions;
            total.fanout_in += r.fanout_in;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = hub.cpu_us().saturating_sub(cpu0);
    let allocs1 = hub.metric("poshub_heap_allocations_total").await;
    let commits1 = hub.metric("poshub_commit_batch_events_count").await;
    let eps = total.acked as f64 / secs;
    let cpu_per = cpu as f64 / total.acked.max(1) as f64;
    report.push((
        format!("durable events/s ({n} devices, {})", spec.transport()),
        format!("{eps:.0}"),
    ));
    report.push(("hub CPU per event".into(), format!("{cpu_per:.1} us")));
    figs.push(("throughput", eps));
    figs.push(("cpu", cpu_per));
    if let (Some(a0), Some(a1)) = (allocs0, allocs1) {
        report.push((
            format!(
                "hub heap allocations per event (incl. {} fan-out sends)",
                n - 1
            ),
            format!("{:.1}", (a1 - a0) / total.acked.max(1) as f64),
        ));
    }
    if let (Some(c0), Some(c1)) = (commits0, commits1) {
        let commits = (c1 - c0).max(1.0);
        report.push((
            "commits/s (one fsync each) / events per commit".into(),
            format!(
                "{:.0} / {:.1}",
                commits / secs,
                total.acked as f64 / commits
            ),
        ));
    }
    report.push((
        "fan-out messages received/s".into(),
        format!("{:.0}", total.fanout_in as f64 / secs),
    ));
    report.push((
        "lost acks / per-device seq inversions".into(),
        format!("{} / {}", total.sent - total.acked, total.inversions),
    ));
    if total.sent > total.acked {
        // An ack in flight is lost only with its connection: say who ended it.
        report.push((
            "devices disconnected during the run, by reason".into(),
            hub.disconnects().await,
        ));
    }
    hub.stop().await;
}

async fn latency(a: &Args, spec: &HubSpec, report: &mut Vec<(String, String)>, figs: &mut Figs) {
    let hub = Hub::launch(spec, "lat", &[]).await;
    let n = if a.quick { 10 } else { a.devices };
    let dur = Duration::from_secs(if a.quick { 2 } else { a.seconds });
    let (mut lat, sent) = paced_acks_sent(hub.port, tills(&hub, n), dur, 2).await;
    let (p50, p99, max) = (
        pct(&mut lat, 50.0),
        pct(&mut lat, 99.0),
        pct(&mut lat, 100.0),
    );
    report.push((
        "ack latency at 1,000 ev/s p50 / p99 / max".into(),
        format!(
            "{p50:.2} / {p99:.2} / {max:.2} ms ({} acks of {sent} sent)",
            lat.len()
        ),
    ));
    figs.push(("ack_p99", p99));
    hub.stop().await;
}

async fn fanout(a: &Args, spec: &HubSpec, report: &mut Vec<(String, String)>, figs: &mut Figs) {
    let hub = Hub::launch(spec, "fan", &[]).await;
    let n = if a.quick { 20 } else { a.fanout };
    let t0 = Instant::now();
    let samples = Arc::new(std::sync::Mutex::new(Vec::<f64>::new()));
    let got = Arc::new(AtomicU64::new(0));
    let sender_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    for d in 0..n - 1 {
        let mut ws = connect_raw(hub.port, &hub.token(&format!("kds-{d}"))).await;
        let samples = samples.clone();
        let got = got.clone();
        let sender_done = sender_done.clone();
        readers.push(tokio::spawn(async move {
            let timer = tokio::time::sleep(Duration::ZERO);
            tokio::pin!(timer);
            let mut armed = None;
            // Until the sender is done and then 3 s of quiet: connecting 199 devices
            // over TLS to a slow hub can take longer than any fixed idle timeout.
            loop {
                let wait = Duration::from_secs(3);
                match next_frame_raw(&mut ws, &mut timer, &mut armed, wait).await {
                    Got::Idle if sender_done.load(Ordering::Relaxed) => break,
                    Got::Closed => break,
                    Got::Event(r) => {
                        if let Some(sent) = num_after_b(ws.bytes(r), b"\"t\":") {
                            let now = t0.elapsed().as_nanos() as u64;
                            samples
                                .lock()
                                .unwrap()
                                .push((now.saturating_sub(sent)) as f64 / 1e6);
                            got.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Got::Idle | Got::Ack(..) | Got::Other => {}
                }
            }
        }));
    }
    let (ws, _, _) = connect(hub.port, &hub.token("till-sender"), None).await;
    let (mut tx, mut rx) = ws.split();
    tokio::spawn(async move { while let Some(Ok(_)) = rx.next().await {} });
    let count = if a.quick { 50 } else { 500 };
    // Both sides' CPU while the events go out (the readers' 3 s of quiet costs ~0).
    let (hub0, gen0) = (hub.cpu_us(), proc_cpu_us("self"));
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    for i in 0..count {
        tick.tick().await;
        let f = event_frame(i, &format!("f-{i}"), t0.elapsed().as_nanos(), "kitchen");
        if tx.send(Message::text(f)).await.is_err() {
            break;
        }
    }
    sender_done.store(true, Ordering::Relaxed);
    for r in readers {
        let _ = r.await;
    }
    let (hub_cpu, gen_cpu) = (
        hub.cpu_us().saturating_sub(hub0),
        proc_cpu_us("self").saturating_sub(gen0),
    );
    let mut s = samples.lock().unwrap().clone();
    let expected = count * (n as u64 - 1);
    let p99 = pct(&mut s, 99.0);
    report.push((
        format!("fan-out latency to {} devices p50 / p99", n - 1),
        format!(
            "{:.2} / {:.2} ms ({} of {} delivered)",
            pct(&mut s, 50.0),
            p99,
            got.load(Ordering::Relaxed),
            expected
        ),
    ));
    // On loopback the sender's CPU also runs the receiving socket's TCP work, and
    // both processes share the machine's cores: this is where a burst's time goes.
    report.push((
        format!(
            "CPU per event sent to {} devices: hub / load generator",
            n - 1
        ),
        format!(
            "{:.2} / {:.2} ms",
            hub_cpu as f64 / 1000.0 / count as f64,
            gen_cpu as f64 / 1000.0 / count as f64
        ),
    ));
    figs.push(("fanout_p99", p99));
    hub.stop().await;
}

async fn idle(a: &Args, spec: &HubSpec, report: &mut Vec<(String, String)>, figs: &mut Figs) {
    let hub = Hub::launch(spec, "idle", &[]).await;
    let n = if a.quick { 100 } else { a.idle };
    // A few connections first, so one-off allocations are not counted per connection.
    let mut keep = Vec::new();
    for d in 0..5 {
        keep.push(
            connect(hub.port, &hub.token(&format!("warm-{d}")), None)
                .await
                .0,
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = hub.rss_kib();
    let token = hub.token("idle");
    for chunk in 0..n.div_ceil(100) {
        let mut batch = Vec::new();
        for _ in 0..100.min(n - chunk * 100) {
            let tok = token.clone();
            let port = hub.port;
            batch.push(tokio::spawn(
                async move { connect(port, &tok, None).await.0 },
            ));
        }
        for b in batch {
            if let Ok(ws) = b.await {
                keep.push(ws);
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = hub.rss_kib();
    let per = (after as f64 - before as f64) / n as f64;
    report.push((
        format!("RSS per idle connection ({n} idle, {})", spec.transport()),
        format!("{per:.1} KiB (hub RSS {before} -> {after} KiB)"),
    ));
    figs.push(("idle_kib", per));
    drop(keep);
    hub.stop().await;
}

async fn replay(a: &Args, spec: &HubSpec, report: &mut Vec<(String, String)>, figs: &mut Figs) {
    let hub = Hub::launch(spec, "replay", &[]).await;
    let n = if a.quick { 10_000 } else { a.replay };
    bulk_write(&hub, n, "r").await;
    let total = (n / 4 / 500 * 500 * 4) as u64;
    let start = Instant::now();
    let (_ws, synced, seqs) = connect(hub.port, &hub.token("reconnecting"), Some(0)).await;
    let secs = start.elapsed().as_secs_f64();
    let contiguous = seqs.iter().enumerate().all(|(i, s)| *s == i as u64 + 1);
    let rate = seqs.len() as f64 / secs;
    figs.push(("replay", rate));
    report.push((
        format!("replay to one reconnecting device ({total} events)"),
        format!(
            "{rate:.0} events/s ({} received, synced at {synced}, in order without gap: {})",
            seqs.len(),
            contiguous && seqs.len() as u64 == total
        ),
    ));
    hub.stop().await;
}

/// GET `path` (HTTP/1.0), the whole response as text; over HTTPS when the hub on
/// `port` serves TLS (except /healthz and /ca.crt, which both hubs serve plain beside it).
async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    async fn get<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, path: &str, host: &str) -> String {
        let _ = s
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
            .await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }
    let Ok(s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return String::new();
    };
    match tls_for(port) {
        Some(cfg) if path != "/healthz" && path != "/ca.crt" => {
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("a DNS name");
            match tokio_rustls::TlsConnector::from(cfg).connect(name, s).await {
                Ok(t) => get(t, path, "localhost").await,
                Err(_) => String::new(),
            }
        }
        _ => get(s, path, "x").await,
    }
}

/// Writes `n` events with `events` batches from 4 devices (pipelined). Each writer also
/// gets the other three's events; one that falls behind them may be cut by the hub (its
/// queue is bounded): it reconnects and sends again from its first unacked batch (the
/// same ids: the hub answers the ones it already has as duplicates).
async fn bulk_write(hub: &Hub, n: usize, tag: &str) {
    let writers = 4;
    let per = n / writers;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let tok = hub.token(&format!("writer-{w}"));
        let port = hub.port;
        let tag = tag.to_string();
        tasks.push(tokio::spawn(async move {
            let batches = per / 500;
            let mut acked = 0;
            let mut connections = 0u32;
            while acked < batches && connections < 20 {
                connections += 1;
                let (ws, _, _) = connect(port, &tok, None).await;
                let (mut tx, mut rx) = ws.split();
                let mut sent = acked;
                'conn: while acked < batches {
                    while sent < batches && sent - acked < 8 {
                        let evs: Vec<String> = (0..500)
                            .map(|i| format!("{{\"id\":\"{tag}{w}-{sent}-{i}\",\"type\":\"order.created\",\"payload\":{{\"n\":{i},\"pad\":\"{}\"}}}}", "y".repeat(100)))
                            .collect();
                        if tx.send(Message::text(format!("42{sent}[\"events\",[{}]]", evs.join(",")))).await.is_err() {
                            break 'conn;
                        }
                        sent += 1;
                    }
                    match tokio::time::timeout(Duration::from_secs(30), rx.next()).await {
                        Ok(Some(Ok(Message::Text(t)))) if t.as_str().starts_with("43") => acked += 1,
                        Ok(Some(Ok(Message::Text(t)))) if t.as_str() == "2" => {
                            let _ = tx.send(Message::text("3")).await;
                        }
                        Ok(Some(Ok(_))) => {}
                        _ => break 'conn,
                    }
                }
            }
            connections.saturating_sub(1)
        }));
    }
    let mut again = 0;
    for t in tasks {
        again += t.await.unwrap_or(0);
    }
    if again > 0 {
        println!("bulk write: the writers reconnected {again} time(s) (cut by the hub for falling behind their fan-out, or a timeout)");
    }
}

/// Ack latencies (ms) of one device per token, together 1,000 events/s, for `dur`.
async fn paced_acks(port: u16, tokens: Vec<String>, dur: Duration, run: u64) -> Vec<f64> {
    paced_acks_sent(port, tokens, dur, run).await.0
}

/// [`paced_acks`], and how many events were sent (an ack that never came shows).
async fn paced_acks_sent(
    port: u16,
    tokens: Vec<String>,
    dur: Duration,
    run: u64,
) -> (Vec<f64>, u64) {
    let t0 = Instant::now();
    let rate = 1000.0 / tokens.len().max(1) as f64;
    let mut tasks = Vec::new();
    for (d, tok) in tokens.into_iter().enumerate() {
        tasks.push(tokio::spawn(run_device(
            port,
            tok,
            d,
            1000,
            Some(rate),
            dur,
            t0,
            run,
        )));
    }
    let mut lat = Vec::new();
    let mut sent = 0;
    for t in tasks {
        if let Ok(r) = t.await {
            sent += r.sent;
            lat.extend(r.lat_ms);
        }
    }
    (lat, sent)
}

fn tills(hub: &Hub, n: usize) -> Vec<String> {
    (0..n).map(|d| hub.token(&format!("till-{d}"))).collect()
}

/// A free TCP port on loopback.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
    l.local_addr().expect("addr").port()
}

/// Starts the reference cloud (`pos-cloud-ref`, beside the hub binary `hub_bin`) on
/// 127.0.0.1:`port`, its database at `db`, accepting the bridge token `token`.
fn start_cloud(hub_bin: &Path, port: u16, db: &Path, token: &str) -> tokio::process::Child {
    let cloud_bin = hub_bin
        .parent()
        .map(|p| p.join("pos-cloud-ref"))
        .unwrap_or_default();
    tokio::process::Command::new(&cloud_bin)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--db"])
        .arg(db)
        .args(["--token", token])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", cloud_bin.display()))
}

/// An offline day: events written while the cloud is down, then the cloud comes back.
async fn offline_day(a: &Args, bin: &Path, report: &mut Vec<(String, String)>) {
    let port = free_port();
    let env = [
        (
            "CLOUD_BRIDGE_URL",
            format!("http://127.0.0.1:{port}/v1/events/ingest"),
        ),
        ("CLOUD_BRIDGE_TOKEN", "bench".to_string()),
        ("CLOUD_BACKOFF_MAX", "500ms".to_string()),
        ("CLOUD_FEED_WAIT", "5s".to_string()),
    ];
    let hub = Hub::start_with(bin, "offline", &env).await;
    let n = if a.quick { 10_000 } else { 200_000 };
    bulk_write(&hub, n, "off").await;
    let base = paced_acks(
        hub.port,
        tills(&hub, 50),
        Duration::from_secs(if a.quick { 2 } else { 5 }),
        7,
    )
    .await;
    // The cloud is another machine in a shop: by default its database lives in
    // memory (/dev/shm) so its fsyncs do not queue on the hub's disk; set
    // BENCH_CLOUD_DIR to put it elsewhere (e.g. beside the hub's to see that cost).
    let cloud_dir = std::env::var_os("BENCH_CLOUD_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let shm = Path::new("/dev/shm");
            if shm.is_dir() {
                shm.to_path_buf()
            } else {
                hub.dir.clone()
            }
        });
    let db = cloud_dir.join(format!("pos-hub-bench-cloud-{}.db", std::process::id()));
    let mut cloud = start_cloud(bin, port, &db, "bench");
    let start = Instant::now();
    let lat_task = tokio::spawn(paced_acks(
        hub.port,
        tills(&hub, 50),
        Duration::from_secs(5),
        8,
    ));
    let mut done = None;
    while start.elapsed() < Duration::from_secs(600) {
        let st = http_get(hub.port, "/status").await;
        if st.contains("\"outboxDepth\":0,") {
            done = Some(start.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut during = lat_task.await.unwrap_or_default();
    let mut base = base;
    match done {
        Some(d) => report.push((
            format!("bridge catch-up after an offline day ({n} events)"),
            format!(
                "{:.0} events/s to the local reference cloud ({:.1} s)",
                (n + during.len()) as f64 / d.as_secs_f64(),
                d.as_secs_f64()
            ),
        )),
        None => report.push((
            "bridge catch-up".into(),
            "did not finish within 600 s".into(),
        )),
    }
    report.push((
        "LAN ack p99 at 1,000 ev/s: cloud down / while catching up".into(),
        format!(
            "{:.2} / {:.2} ms",
            pct(&mut base, 99.0),
            pct(&mut during, 99.0)
        ),
    ));
    let _ = cloud.start_kill();
    let _ = cloud.wait().await;
    for ext in ["", "-wal", "-shm"] {
        let mut p = db.clone().into_os_string();
        p.push(ext);
        let _ = std::fs::remove_file(p);
    }
    hub.stop().await;
}

// ---------------------------------------------------------------- retention

/// A year of a store's log at 5,000 events a day with the default retention (90
/// days), on the hub's own store code: events carry simulated hub timestamps, and
/// after each simulated day the same prune and incremental vacuum the hub's
/// maintenance thread runs. Prints the database size along the way.
fn retention_year(a: &Args, report: &mut Vec<(String, String)>) {
    use pos_hub::log::{NewEvent, Origin, Store};
    const PER_DAY: u64 = 5_000;
    const DAY_MS: i64 = 86_400_000;
    let days: i64 = if a.quick { 12 } else { 365 };
    let keep_days: i64 = if a.quick { 3 } else { 90 };
    let dir = std::env::temp_dir().join(format!("poshub-bench-retention-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join("r.db");
    let mut store = match Store::open(&path) {
        Ok(s) => s,
        Err(e) => {
            println!("retention: cannot open {}: {e}", path.display());
            return;
        }
    };
    let t0: i64 = 1_767_225_600_000; // 2026-01-01
    let mut seq = 0u64;
    let mut peak = 0u64;
    let mut at = Vec::new();
    let started = Instant::now();
    for day in 0..days {
        // A till's order: a few lines, a total, a table (about 330 bytes of JSON).
        let mut batch_start = 0;
        while batch_start < PER_DAY {
            let _ = store.begin();
            let mut ins = match store.inserter() {
                Ok(i) => i,
                Err(e) => return println!("retention: cannot insert: {e}"),
            };
            for i in batch_start..(batch_start + 50).min(PER_DAY) {
                seq += 1;
                let payload = format!(
                    r#"{{"order":"o-{seq}","table":{t},"lines":[{{"sku":"coffee-{a}","qty":2,"price":3.4}},{{"sku":"croissant","qty":1,"price":2.9}},{{"sku":"juice-{b}","qty":1,"price":4.2}}],"total":13.9,"staff":"s-{c}","note":"no sugar"}}"#,
                    t = seq % 40,
                    a = seq % 7,
                    b = seq % 5,
                    c = seq % 12
                );
                let ev = NewEvent::new(
                    &format!("till{}-{seq:09}", seq % 6),
                    "order.created",
                    &payload,
                    None,
                )
                .expect("valid event");
                let ts = t0 + day * DAY_MS + (i as i64 * DAY_MS / PER_DAY as i64);
                let _ = ins.insert(seq, &ev, "till-1", ts, Origin::Lan);
            }
            drop(ins);
            let _ = store.commit();
            batch_start += 50;
        }
        // End of the day: what the maintenance thread does.
        let cutoff = t0 + (day + 1) * DAY_MS - keep_days * DAY_MS;
        while matches!(store.prune_batch(cutoff, false, 500), Ok((n, _)) if n > 0) {}
        while matches!(store.vacuum_some(256), Ok(n) if n > 0) {}
        let _ = store.checkpoint();
        let bytes = store.db_bytes();
        peak = peak.max(bytes);
        let d = day + 1;
        if d == keep_days || d == 2 * keep_days || d == days {
            at.push((
                d,
                bytes,
                store.oldest_seq().ok().flatten().unwrap_or(0),
                seq,
            ));
        }
    }
    let mib = |b: u64| b as f64 / 1_048_576.0;
    for (d, b, oldest, last) in &at {
        println!(
            "retention: day {d}: database {:.1} MiB, oldest kept seq {oldest}, last seq {last}",
            mib(*b)
        );
    }
    report.push((
        format!("database after {days} days at {PER_DAY}/day, retention {keep_days} days"),
        format!(
            "{:.1} MiB (peak {:.1} MiB; {} events written, {:.0} s to simulate)",
            mib(at.last().map(|x| x.1).unwrap_or(0)),
            mib(peak),
            seq,
            started.elapsed().as_secs_f64()
        ),
    ));
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The scenarios `--reference` runs on both hubs, in this order.
const SIDE_BY_SIDE: [&str; 5] = ["throughput", "latency", "fanout", "idle", "replay"];

async fn run_scenario(
    name: &str,
    a: &Args,
    spec: &HubSpec,
    report: &mut Vec<(String, String)>,
    figs: &mut Figs,
) {
    match name {
        "throughput" => throughput(a, spec, report, figs).await,
        "latency" => latency(a, spec, report, figs).await,
        "fanout" => fanout(a, spec, report, figs).await,
        "idle" => idle(a, spec, report, figs).await,
        "replay" => replay(a, spec, report, figs).await,
        _ => {}
    }
}

/// A compared figure: key (as scenarios push it), label, unit, whether higher is
/// better, and the DEVELOPERS.md aim as the ratio pos-hub / reference.
struct Figure {
    key: &'static str,
    label: String,
    unit: &'static str,
    higher_better: bool,
    aim: f64,
}

fn figures(a: &Args, transport: &str) -> Vec<Figure> {
    let f = |key, label: String, unit, higher_better, aim| Figure {
        key,
        label,
        unit,
        higher_better,
        aim,
    };
    let (dev, fan, idle, replay) = if a.quick {
        (10, 20, 100, 10_000)
    } else {
        (a.devices, a.fanout, a.idle, a.replay / 2000 * 2000)
    };
    vec![
        f(
            "throughput",
            format!(
                "durable events/s, {dev} devices x {} in flight, each to {} others ({transport})",
                a.in_flight,
                dev - 1
            ),
            "",
            true,
            10.0,
        ),
        f(
            "cpu",
            format!("hub CPU per durable event, incl. {} fan-out sends", dev - 1),
            "us",
            false,
            0.1,
        ),
        f(
            "ack_p99",
            format!("ack p99 at 1,000 ev/s from {dev} devices"),
            "ms",
            false,
            0.2,
        ),
        f(
            "fanout_p99",
            format!("fan-out p99 of one event to {} devices", fan - 1),
            "ms",
            false,
            0.25,
        ),
        f(
            "replay",
            format!("replay to one reconnecting device, {replay} events"),
            "events/s",
            true,
            3.0,
        ),
        f(
            "idle_kib",
            format!("RSS per idle connection, {idle} idle ({transport})"),
            "KiB",
            false,
            0.5,
        ),
    ]
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn fmt_fig(v: f64, unit: &str) -> String {
    match unit {
        "" | "events/s" => format!("{v:.0}"),
        "ms" => format!("{v:.2}"),
        _ => format!("{v:.1}"),
    }
}

/// Every scenario on both hubs, `--runs` rounds, interleaved (the order of the two
/// hubs alternates from round to round); then the medians side by side.
async fn compare(a: &Args, ours: &HubSpec, reference: &HubSpec) {
    let scen: Vec<&str> = SIDE_BY_SIDE
        .into_iter()
        .filter(|s| a.scenario == "all" || a.scenario == *s)
        .collect();
    let runs = a.runs.max(1);
    let mut vals: HashMap<(Kind, &'static str), Vec<f64>> = HashMap::new();
    let mut loads = Vec::new();
    for run in 0..runs {
        let load0 = loadavg();
        println!("round {}/{runs}: load average {load0}", run + 1);
        for sc in &scen {
            let order = if run % 2 == 0 {
                [ours, reference]
            } else {
                [reference, ours]
            };
            for spec in order {
                let mut report = Vec::new();
                let mut figs = Figs::new();
                run_scenario(sc, a, spec, &mut report, &mut figs).await;
                for (k, v) in &report {
                    println!("  {:<7} {k}: {v}", spec.kind.name());
                }
                for (k, v) in figs {
                    vals.entry((spec.kind, k)).or_default().push(v);
                }
            }
        }
        loads.push(format!("{load0} -> {}", loadavg()));
    }
    let cmd: Vec<String> = std::env::args().collect();
    println!();
    println!(
        "{} over {}, median of {runs} round(s), interleaved; load average (1/5/15 min) at the start -> end of each round: {}",
        cmd.join(" "),
        ours.transport(),
        loads.join("; ")
    );
    println!();
    println!(
        "| figure | pos-hub | {} | pos-hub / {} | aim | met |",
        reference.kind.name(),
        reference.kind.name()
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for f in figures(a, ours.transport()) {
        let (Some(p), Some(r)) = (
            vals.get(&(ours.kind, f.key)),
            vals.get(&(reference.kind, f.key)),
        ) else {
            continue;
        };
        let cell = |v: &Vec<f64>| {
            let m = fmt_fig(median(v), f.unit);
            if v.len() > 1 {
                let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                format!("{m} ({}-{})", fmt_fig(lo, f.unit), fmt_fig(hi, f.unit))
            } else {
                m
            }
        };
        let ratio = median(p) / median(r);
        let met = if f.higher_better {
            ratio >= f.aim
        } else {
            ratio <= f.aim
        };
        let unit = if f.unit.is_empty() {
            String::new()
        } else {
            format!(", {}", f.unit)
        };
        println!(
            "| {}{unit} | {} | {} | {ratio:.2}x | {} {}x | {} |",
            f.label,
            cell(p),
            cell(r),
            if f.higher_better { ">=" } else { "<=" },
            f.aim,
            if met { "yes" } else { "no" }
        );
    }
}

#[tokio::main]
async fn main() {
    let a = Args::parse();
    // SAFETY: raising our own file limit.
    unsafe {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
    let bin = a.hub_bin.clone().unwrap_or_else(|| {
        let me = std::env::current_exe().unwrap_or_default();
        me.parent()
            .map(|p| p.join("pos-hub"))
            .unwrap_or_else(|| PathBuf::from("pos-hub"))
    });
    let mut report = Vec::new();
    let want = |s: &str| a.scenario == "all" || a.scenario == s;
    println!(
        "pos-hub-bench: hub {} on {} cores{}{}",
        bin.display(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        if a.tls { ", TLS (wss)" } else { "" },
        if a.quick { " (quick)" } else { "" }
    );
    let ours = HubSpec {
        kind: Kind::PosHub,
        path: bin.clone(),
        tls: a.tls,
    };
    if a.reference.is_some() {
        let dir = a
            .node_ref
            .clone()
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("node-ref"));
        if !dir.join("node_modules/better-sqlite3").is_dir() {
            eprintln!(
                "pos-hub-bench: the Node reference in {} is not installed: run `npm ci` there (scripts/bench --reference node does)",
                dir.display()
            );
            std::process::exit(2);
        }
        let reference = HubSpec {
            kind: Kind::Node,
            path: dir,
            tls: a.tls,
        };
        compare(&a, &ours, &reference).await;
        return;
    }
    let mut figs = Figs::new();
    for sc in SIDE_BY_SIDE {
        if want(sc) {
            run_scenario(sc, &a, &ours, &mut report, &mut figs).await;
        }
    }
    if want("offline") {
        offline_day(&a, &bin, &mut report).await;
    }
    if want("retention") {
        retention_year(&a, &mut report);
    }
    if a.scenario == "soak" {
        soak::run(&a, &bin).await;
    }
    if a.scenario == "nats" {
        nats::offline_day(a.quick, &bin, &mut report).await;
    }
    let w = report.iter().map(|(k, _)| k.len()).max().unwrap_or(10);
    println!();
    for (k, v) in &report {
        println!("{k:<w$}  {v}");
    }
}
