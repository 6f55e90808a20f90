//! `--scenario soak`: long hours at a store's busy rate. 200 devices on one realm
//! (`--quick`: 50) write a few hundred events/s in total (`SOAK_RATE`, default 300)
//! with a burst of 4x for 5 s every minute; every device reconnects every 2-5 minutes
//! and resumes from its cursor, one in ten stays away a minute first and catches up;
//! the bridge pushes to the reference cloud while its faults are switched on and off
//! through its admin API. Every 10 s it samples the hub's RSS, open descriptors,
//! threads, WAL size and the ack p99 of the last 10 s; at the end it prints the table,
//! writes it as `soak.dat` plus a PNG plot (gnuplot) and prints a verdict:
//! RSS grows < 10% after warm-up, descriptors and threads return to their idle
//! baseline, the WAL stays bounded, the ack p99 does not drift, and no ack was lost.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::{
    connect, free_port, http_get, next_frame, num_after, pct, rand_unit, start_cloud, Args, Frame,
    Hub,
};

/// Faults switched on in turn (for 45 s each, then 75 s without).
const FAULTS: &[&str] = &[
    r#"{"mode":"error500","target":"both"}"#,
    r#"{"mode":"rate_limit","retryAfter":2}"#,
    r#"{"mode":"slow","delayMs":1500}"#,
    r#"{"mode":"reset_after_commit"}"#,
    r#"{"mode":"hang","target":"both"}"#,
    r#"{"mode":"refuse"}"#,
];

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    /// Ack latencies (ms) since the last sample.
    lat: Mutex<Vec<f64>>,
    sent: AtomicU64,
    acked: AtomicU64,
    /// Acks still missing 10 s after a device stopped sending.
    lost: AtomicU64,
    refused: AtomicU64,
    connects: AtomicU64,
    connect_failures: AtomicU64,
    replayed: AtomicU64,
    connected: AtomicUsize,
    fault: Mutex<String>,
}

struct Row {
    t: f64,
    rss_kib: u64,
    /// Heap in use and held free by the allocator (`/metrics`, glibc only; 0 otherwise).
    heap_kib: u64,
    free_kib: u64,
    fds: u64,
    threads: u64,
    wal_kib: u64,
    p50: f64,
    p99: f64,
    acks: usize,
    outbox: u64,
    connected: usize,
    fault: String,
}

fn proc_status(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0))
        .unwrap_or(0)
}

fn fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

/// What each open descriptor of `pid` is (`socket:[inode]`, a path, `anon_inode:[eventpoll]`),
/// by kind, so a descriptor that did not return to baseline can be named.
fn fd_kinds(pid: u32) -> std::collections::BTreeMap<String, u64> {
    let mut kinds = std::collections::BTreeMap::new();
    if let Ok(d) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in d.flatten() {
            let target = std::fs::read_link(e.path())
                .map(|t| t.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "?".into());
            let kind = match target.split_once(":[") {
                Some((k, _)) => format!("{k}:[..]"),
                None => target,
            };
            *kinds.entry(kind).or_insert(0) += 1;
        }
    }
    kinds
}

fn file_kib(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len() / 1024).unwrap_or(0)
}

async fn post(port: u16, path: &str, body: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return;
    };
    let req = format!(
        "POST {path} HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(req.as_bytes()).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
}

/// The store's event rate at `t` seconds: 4x for the first 5 s of every minute.
fn burst(t: f64) -> f64 {
    if t % 60.0 < 5.0 {
        4.0
    } else {
        1.0
    }
}

/// The most connections a realm's database has open at once: the writer, the
/// checkpointer, the fan-out's reader and the pool's 4 readers (`realm::READERS`).
const DB_CONNECTIONS: u64 = 7;

/// The first use before the baseline: 20 acked events from one device, then a catch-up
/// from 0 by another.
async fn warm_up(hub: &Hub) {
    let (ws, _, _) = connect(hub.port, &hub.token("soak-warm-a"), None).await;
    let (mut tx, mut rx) = ws.split();
    for i in 0..20u64 {
        let f = format!(
            "42{i}[\"event\",{{\"id\":\"warm-{i}\",\"type\":\"order.created\",\"payload\":{{}}}}]"
        );
        let _ = tx.send(Message::text(f)).await;
    }
    let mut acks = 0;
    let until = Instant::now() + Duration::from_secs(20);
    while acks < 20 && Instant::now() < until {
        if let Frame::Ack(..) = next_frame(&mut tx, &mut rx, Duration::from_millis(200)).await {
            acks += 1;
        }
    }
    let _ = tx.close().await;
    let (mut ws, _, replayed) = connect(hub.port, &hub.token("soak-warm-b"), Some(0)).await;
    assert!(
        replayed.len() >= 20,
        "warm-up: the catch-up replayed {} events",
        replayed.len()
    );
    let _ = ws.close(None).await;
}

/// One device for the whole soak: sessions of 2-5 minutes, resuming from its cursor.
async fn device(port: u16, token: String, dev: usize, rate: f64, t0: Instant, sh: Arc<Shared>) {
    let mut cursor: Option<u64> = None;
    let mut session = 0u64;
    let mut n = 0u64;
    while !sh.stop.load(Ordering::Relaxed) {
        // One device in ten stays away a minute between sessions and catches up.
        if session > 0 && dev.is_multiple_of(10) {
            let away = Instant::now() + Duration::from_secs(60);
            while Instant::now() < away && !sh.stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            if sh.stop.load(Ordering::Relaxed) {
                break;
            }
        }
        let tok = token.clone();
        let since = cursor;
        let conn = tokio::spawn(async move { connect(port, &tok, since).await }).await;
        sh.connects.fetch_add(1, Ordering::Relaxed);
        let (ws, synced, replayed) = match conn {
            Ok(x) => x,
            Err(_) => {
                sh.connect_failures.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        sh.replayed
            .fetch_add(replayed.len() as u64, Ordering::Relaxed);
        sh.connected.fetch_add(1, Ordering::Relaxed);
        let mut last_seq = synced.max(cursor.unwrap_or(0));
        let (mut tx, mut rx) = ws.split();
        let len = 120.0 + 180.0 * rand_unit(dev * 7919 + session as usize);
        let end = Instant::now() + Duration::from_secs_f64(len);
        let mut pending: HashMap<u64, Instant> = HashMap::new();
        let mut next = Instant::now() + Duration::from_secs_f64(rand_unit(dev) / rate);
        let mut ack_no = 0u64;
        let pad = "p".repeat(80);
        let mut drain_until: Option<Instant> = None;
        loop {
            let now = Instant::now();
            let sending = now < end && !sh.stop.load(Ordering::Relaxed);
            if !sending {
                let d = *drain_until.get_or_insert(now + Duration::from_secs(10));
                if pending.is_empty() || now >= d {
                    break;
                }
            }
            while sending && Instant::now() >= next {
                let id = format!("s{dev}-{n}");
                n += 1;
                let f = format!(
                    "42{ack_no}[\"event\",{{\"id\":\"{id}\",\"type\":\"order.created\",\"payload\":{{\"dev\":{dev},\"pad\":\"{pad}\"}}}}]"
                );
                pending.insert(ack_no, Instant::now());
                ack_no += 1;
                sh.sent.fetch_add(1, Ordering::Relaxed);
                if tx.send(Message::text(f)).await.is_err() {
                    break;
                }
                let t = t0.elapsed().as_secs_f64();
                next += Duration::from_secs_f64(1.0 / (rate * burst(t)));
            }
            let wait = if sending {
                next.saturating_duration_since(Instant::now())
            } else {
                Duration::from_millis(200)
            };
            match next_frame(&mut tx, &mut rx, wait.max(Duration::from_micros(100))).await {
                Frame::Closed => break,
                Frame::Ack(id, ack) => {
                    if let Some(at) = pending.remove(&id) {
                        sh.lat
                            .lock()
                            .unwrap()
                            .push(at.elapsed().as_secs_f64() * 1000.0);
                        if ack.contains("\"ok\":true") {
                            sh.acked.fetch_add(1, Ordering::Relaxed);
                            if let Some(seq) = num_after(&ack, "\"seq\":") {
                                last_seq = last_seq.max(seq);
                            }
                        } else {
                            sh.refused.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Frame::Event(t) => {
                    if let Some(seq) = num_after(&t, "\"seq\":") {
                        last_seq = last_seq.max(seq);
                    }
                }
                Frame::Idle | Frame::Ping | Frame::Other => {}
            }
        }
        sh.lost.fetch_add(pending.len() as u64, Ordering::Relaxed);
        let _ = tx.close().await;
        sh.connected.fetch_sub(1, Ordering::Relaxed);
        cursor = Some(last_seq);
        session += 1;
    }
}

fn sample(hub: &Hub, wal: &Path, t0: Instant, sh: &Shared, outbox: u64, metrics: &str) -> Row {
    let pid = hub.pid();
    let mut lat = std::mem::take(&mut *sh.lat.lock().unwrap());
    Row {
        t: t0.elapsed().as_secs_f64(),
        rss_kib: proc_status(pid, "VmRSS:"),
        heap_kib: num_after(metrics, "\nposhub_heap_in_use_bytes ").unwrap_or(0) / 1024,
        free_kib: num_after(metrics, "\nposhub_heap_free_bytes ").unwrap_or(0) / 1024,
        fds: fds(pid),
        threads: proc_status(pid, "Threads:"),
        wal_kib: file_kib(wal),
        acks: lat.len(),
        p50: pct(&mut lat, 50.0),
        p99: pct(&mut lat, 99.0),
        outbox,
        connected: sh.connected.load(Ordering::Relaxed),
        fault: sh.fault.lock().unwrap().clone(),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    pct(&mut v, 50.0)
}

pub async fn run(a: &Args, bin: &Path) {
    let minutes = if a.quick {
        a.minutes.min(1.0)
    } else {
        a.minutes
    };
    let devices = if a.quick { 50 } else { 200 };
    let rate: f64 = std::env::var("SOAK_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300.0);
    let cport = free_port();
    let shm = Path::new("/dev/shm");
    let cloud_dir = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let db = cloud_dir.join(format!("pos-hub-soak-cloud-{}.db", std::process::id()));
    let mut cloud = start_cloud(bin, cport, &db, "soak");
    let env = [
        (
            "CLOUD_BRIDGE_URL",
            format!("http://127.0.0.1:{cport}/v1/events/ingest"),
        ),
        ("CLOUD_BRIDGE_TOKEN", "soak".to_string()),
        ("CLOUD_BACKOFF_MAX", "2s".to_string()),
        ("CLOUD_FEED_WAIT", "5s".to_string()),
        ("CLOUD_TIMEOUT", "5s".to_string()),
        ("CLOUD_PUSH_BUSY_RATE", "3000".to_string()),
    ];
    let hub = Hub::start_with(bin, "soak", &env).await;
    let wal = hub.dir.join("realms/t-dev/s-dev.db-wal");
    let out_dir = std::env::var_os("SOAK_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            bin.parent()
                .map(|p| p.join("soak"))
                .unwrap_or_else(|| PathBuf::from("soak"))
        });
    let _ = std::fs::create_dir_all(&out_dir);
    println!(
        "soak: {devices} devices, {rate} events/s (4x bursts 5 s a minute), {minutes} min, \
         cloud faults every 2 min; samples every 10 s"
    );
    // Idle baseline: the hub with its bridge connected and no device, after a first use, so
    // that what any use opens for good is in both counts: one device writes a few events and
    // another catches up from 0 (the fan-out's reader opens the WAL, the bridge pushes, a
    // pooled reader opens); then the hub goes idle (pooled readers close 30 s after their
    // last use, checked every 15 s; an idle push connection within 40 s). SQLite's unix VFS
    // keeps the database descriptor of a closed reader open for the next one while other
    // connections hold locks, so a closed reader leaves that one descriptor in both counts.
    warm_up(&hub).await;
    tokio::time::sleep(Duration::from_secs(50)).await;
    let (base_fds, base_threads) = (fds(hub.pid()), proc_status(hub.pid(), "Threads:"));
    let base_kinds = fd_kinds(hub.pid());
    let sh = Arc::new(Shared::default());
    *sh.fault.lock().unwrap() = "none".into();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for d in 0..devices {
        let tok = hub.token(&format!("soak-{d}"));
        tasks.push(tokio::spawn(device(
            hub.port,
            tok,
            d,
            rate / devices as f64,
            t0,
            sh.clone(),
        )));
        if d % 20 == 19 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Faults: on for 45 s, off for 75 s, in turn.
    let fsh = sh.clone();
    let faults = tokio::spawn(async move {
        let mut i = 0;
        loop {
            tokio::time::sleep(Duration::from_secs(75)).await;
            if fsh.stop.load(Ordering::Relaxed) {
                break;
            }
            let f = FAULTS[i % FAULTS.len()];
            post(cport, "/v1/admin/faults", f).await;
            *fsh.fault.lock().unwrap() = f
                .split("\"mode\":\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("?")
                .to_string();
            tokio::time::sleep(Duration::from_secs(45)).await;
            post(cport, "/v1/admin/faults", r#"{"mode":"none"}"#).await;
            *fsh.fault.lock().unwrap() = "none".into();
            i += 1;
        }
    });
    let mut rows: Vec<Row> = Vec::new();
    let total = Duration::from_secs_f64(minutes * 60.0);
    println!(
        "\n{:>6} {:>9} {:>9} {:>9} {:>5} {:>7} {:>8} {:>7} {:>7} {:>6} {:>7} {:>4}  fault",
        "t s",
        "RSS KiB",
        "heap KiB",
        "free KiB",
        "fds",
        "threads",
        "WAL KiB",
        "p50 ms",
        "p99 ms",
        "acks",
        "outbox",
        "dev"
    );
    while t0.elapsed() < total {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let st = http_get(hub.port, "/status").await;
        let outbox = num_after(&st, "\"outboxDepth\":").unwrap_or(0);
        let m = http_get(hub.port, "/metrics").await;
        let r = sample(&hub, &wal, t0, &sh, outbox, &m);
        println!(
            "{:>6.0} {:>9} {:>9} {:>9} {:>5} {:>7} {:>8} {:>7.2} {:>7.2} {:>6} {:>7} {:>4}  {}",
            r.t,
            r.rss_kib,
            r.heap_kib,
            r.free_kib,
            r.fds,
            r.threads,
            r.wal_kib,
            r.p50,
            r.p99,
            r.acks,
            r.outbox,
            r.connected,
            r.fault
        );
        rows.push(r);
    }
    // Stop: devices finish their acks and leave; the cloud comes back; outbox drains.
    sh.stop.store(true, Ordering::Relaxed);
    faults.abort();
    post(cport, "/v1/admin/faults", r#"{"mode":"none"}"#).await;
    for t in tasks {
        let _ = t.await;
    }
    let drained = {
        let until = Instant::now() + Duration::from_secs(120);
        loop {
            let st = http_get(hub.port, "/status").await;
            if st.contains("\"outboxDepth\":0,") {
                break true;
            }
            if Instant::now() > until {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    // Idle again: tokio's blocking threads leave after 10 s without work; the realm's
    // pooled readers are closed 30 s after their last use (checked every 15 s).
    tokio::time::sleep(Duration::from_secs(70)).await;
    let (end_fds, end_threads) = (fds(hub.pid()), proc_status(hub.pid(), "Threads:"));
    let end_kinds = fd_kinds(hub.pid());
    for (kind, n) in &end_kinds {
        let before = base_kinds.get(kind).copied().unwrap_or(0);
        if *n != before {
            println!("soak: descriptors {kind}: {before} idle before, {n} after");
        }
    }
    // The realm's database file apart: SQLite keeps the descriptor of every reader closed
    // while another connection holds a lock, for the next reader to reuse, so its count
    // is bounded by the connections the realm can have (writer, checkpointer, fan-out
    // reader and the pool), not by its baseline. Every other descriptor must come back.
    let is_db = |k: &str| k.ends_with("/realms/t-dev/s-dev.db");
    let count = |m: &std::collections::BTreeMap<String, u64>, db: bool| -> u64 {
        m.iter()
            .filter(|(k, _)| is_db(k) == db)
            .map(|(_, n)| n)
            .sum()
    };
    let (db_end, other_base, other_end) = (
        count(&end_kinds, true),
        count(&base_kinds, false),
        count(&end_kinds, false),
    );
    let end_rss = proc_status(hub.pid(), "VmRSS:");
    let secs = t0.elapsed().as_secs_f64();

    // The table as data, and the plot.
    let dat = out_dir.join("soak.dat");
    let mut text =
        String::from("# t_s rss_kib fds threads wal_kib p50_ms p99_ms acks outbox devices fault heap_kib free_kib\n");
    for r in &rows {
        text.push_str(&format!(
            "{:.0} {} {} {} {} {:.3} {:.3} {} {} {} {} {} {}\n",
            r.t,
            r.rss_kib,
            r.fds,
            r.threads,
            r.wal_kib,
            r.p50,
            r.p99,
            r.acks,
            r.outbox,
            r.connected,
            r.fault,
            r.heap_kib,
            r.free_kib
        ));
    }
    let _ = std::fs::write(&dat, text);
    let png = out_dir.join("soak.png");
    plot(&dat, &png, devices, rate, minutes);

    // Verdict.
    let warm = rows
        .iter()
        .position(|r| r.t >= (minutes * 60.0 / 6.0).min(300.0))
        .unwrap_or(0);
    let after: Vec<&Row> = rows[warm.min(rows.len())..].iter().collect();
    let mut checks: Vec<(String, bool)> = Vec::new();
    if after.len() >= 6 {
        let k = (after.len() / 3).max(2);
        let first_rss = median(after[..3].iter().map(|r| r.rss_kib as f64).collect());
        let last_rss = median(
            after[after.len() - 3..]
                .iter()
                .map(|r| r.rss_kib as f64)
                .collect(),
        );
        let growth = (last_rss - first_rss) / first_rss * 100.0;
        checks.push((
            format!(
                "RSS after warm-up {first_rss:.0} -> {last_rss:.0} KiB ({growth:+.1}%, limit +10%)"
            ),
            growth < 10.0,
        ));
        // Not a check: tells a leak (heap in use grows) from allocator retention (free grows).
        let heap =
            |f: fn(&Row) -> u64, rows: &[&Row]| median(rows.iter().map(|r| f(r) as f64).collect());
        let (h0, h1) = (
            heap(|r| r.heap_kib, &after[..3]),
            heap(|r| r.heap_kib, &after[after.len() - 3..]),
        );
        let (f0, f1) = (
            heap(|r| r.free_kib, &after[..3]),
            heap(|r| r.free_kib, &after[after.len() - 3..]),
        );
        println!("soak: heap in use after warm-up {h0:.0} -> {h1:.0} KiB, held free {f0:.0} -> {f1:.0} KiB (glibc mallinfo2; 0 = not reported)");
        let wal_first = after[..after.len() / 2]
            .iter()
            .map(|r| r.wal_kib)
            .max()
            .unwrap_or(0);
        let wal_last = after[after.len() / 2..]
            .iter()
            .map(|r| r.wal_kib)
            .max()
            .unwrap_or(0);
        checks.push((
            format!("WAL high-water first half {wal_first} KiB, second half {wal_last} KiB (bounded: second <= 1.25x first + 1 MiB)"),
            (wal_last as f64) <= wal_first as f64 * 1.25 + 1024.0,
        ));
        let p_first = median(after[..k].iter().map(|r| r.p99).collect());
        let p_last = median(after[after.len() - k..].iter().map(|r| r.p99).collect());
        checks.push((
            format!("ack p99 (median of 10 s windows) first third {p_first:.2} ms, last third {p_last:.2} ms (no drift: last <= 1.5x first + 0.5 ms)"),
            p_last <= p_first * 1.5 + 0.5,
        ));
    } else {
        checks.push((
            "too few samples after warm-up for RSS, WAL and p99 (run longer)".into(),
            false,
        ));
    }
    checks.push((
        format!(
            "descriptors idle before {base_fds}, after {end_fds}: all but the database's back to \
             baseline ({other_base} -> {other_end}, <= +1), the database's bounded by its \
             connections ({db_end}, <= {DB_CONNECTIONS})"
        ),
        other_end <= other_base + 1 && db_end <= DB_CONNECTIONS,
    ));
    checks.push((
        format!(
            "threads idle before {base_threads}, after {end_threads} (back to baseline: <= +1)"
        ),
        end_threads <= base_threads + 1,
    ));
    let (sent, acked, lost, refused) = (
        sh.sent.load(Ordering::Relaxed),
        sh.acked.load(Ordering::Relaxed),
        sh.lost.load(Ordering::Relaxed),
        sh.refused.load(Ordering::Relaxed),
    );
    checks.push((
        format!("acks: {sent} sent, {acked} ok, {refused} refused, {lost} missing"),
        lost == 0 && sent == acked + refused,
    ));
    checks.push((format!("outbox drained after the run: {drained}"), drained));
    let all_ok = checks.iter().all(|(_, ok)| *ok);
    println!(
        "\nsoak: {:.1} min, {} events acked ({:.0}/s), {} connects ({} failed), {} events replayed on reconnects, RSS at the end {} KiB",
        secs / 60.0,
        acked,
        acked as f64 / secs,
        sh.connects.load(Ordering::Relaxed),
        sh.connect_failures.load(Ordering::Relaxed),
        sh.replayed.load(Ordering::Relaxed),
        end_rss,
    );
    println!("table: {}  plot: {}", dat.display(), png.display());
    for (what, ok) in &checks {
        println!("  [{}] {what}", if *ok { "pass" } else { "FAIL" });
    }
    println!("soak verdict: {}", if all_ok { "PASS" } else { "FAIL" });
    let _ = cloud.start_kill();
    let _ = cloud.wait().await;
    for ext in ["", "-wal", "-shm"] {
        let mut p = db.clone().into_os_string();
        p.push(ext);
        let _ = std::fs::remove_file(p);
    }
    hub.stop().await;
    if !all_ok {
        std::process::exit(1);
    }
}

/// RSS, descriptors, threads, WAL and ack p99 over time, with gnuplot (installed by
/// scripts/bench for this scenario); says so when gnuplot is missing.
fn plot(dat: &Path, png: &Path, devices: usize, rate: f64, minutes: f64) {
    let script = format!(
        r#"set terminal pngcairo size 1200,900 noenhanced font ",10"
set output "{png}"
set multiplot layout 3,1 title "pos-hub soak: {devices} devices, {rate} events/s with bursts, {minutes} min, cloud faults on and off"
set xlabel "seconds"
set grid
set key left top
set ylabel "MiB"
set y2label "count"
set y2tics
set ytics nomirror
plot "{dat}" using 1:($2/1024) with lines lw 2 title "RSS (MiB)", "" using 1:($5/1024) with lines lw 2 title "WAL (MiB)", "" using 1:3 axes x1y2 with lines title "fds", "" using 1:4 axes x1y2 with lines title "threads"
unset y2tics
unset y2label
set ylabel "ms"
plot "{dat}" using 1:7 with linespoints pt 7 ps 0.4 title "ack p99 (10 s)", "" using 1:6 with lines title "ack p50 (10 s)"
set ylabel "count"
plot "{dat}" using 1:($8/10) with lines title "acks/s", "" using 1:9 with lines title "outbox depth", "" using 1:10 with lines title "devices connected"
unset multiplot
"#,
        png = png.display(),
        dat = dat.display()
    );
    let gp = png.with_extension("gp");
    for term in ["pngcairo", "png"] {
        if std::fs::write(&gp, script.replacen("pngcairo", term, 1)).is_err() {
            break;
        }
        let ok = std::process::Command::new("gnuplot")
            .arg(&gp)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return;
        }
    }
    println!(
        "soak: gnuplot could not draw the plot (is gnuplot installed? scripts/bench installs it)"
    );
}
