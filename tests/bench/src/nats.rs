//! Scenario `nats` (issue 15): an offline day into the NATS JetStream target. The
//! hub writes events while the three-node cluster (Debian's nats-server, JetStream,
//! loopback) is down, then the cluster starts and the hub catches up into the R3
//! stream it creates. Figures: events/s of the catch-up with the default pacing
//! (50 tills writing at 1,000 ev/s meanwhile) and unpaced, and the LAN ack p99 with
//! the bridge idle (cluster down) vs while catching up.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::{bulk_write, http_get, num_after, paced_acks, pct, tills, Hub};

struct Cluster {
    dir: PathBuf,
    nodes: Vec<(u16, u16)>,
    children: Vec<tokio::process::Child>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Cluster {
    fn new(tag: &str) -> Cluster {
        // The cluster stands for other machines: like the HTTP scenario's reference
        // cloud, its stores live in /dev/shm (BENCH_CLOUD_DIR moves them) so their
        // writes do not queue on the hub's disk; it still shares the 2 cores.
        let base = std::env::var_os("BENCH_CLOUD_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(|| {
                let shm = Path::new("/dev/shm");
                if shm.is_dir() {
                    shm.to_path_buf()
                } else {
                    std::env::temp_dir()
                }
            });
        let dir = base.join(format!("poshub-bench-nats-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let nodes = (0..3).map(|_| (free_port(), free_port())).collect();
        Cluster {
            dir,
            nodes,
            children: Vec::new(),
        }
    }

    fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|(p, _)| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn start(&mut self) {
        for (i, (port, cport)) in self.nodes.iter().enumerate() {
            let store = self.dir.join(format!("n{i}"));
            let _ = std::fs::create_dir_all(&store);
            let routes = self
                .nodes
                .iter()
                .filter(|(_, c)| c != cport)
                .map(|(_, c)| format!("\"nats-route://127.0.0.1:{c}\""))
                .collect::<Vec<_>>()
                .join(", ");
            let conf = self.dir.join(format!("n{i}.conf"));
            let text = format!(
                "server_name: n{i}\nlisten: \"127.0.0.1:{port}\"\njetstream {{ store_dir: \"{}\", max_file_store: 4GB }}\ncluster {{ name: bench, listen: \"127.0.0.1:{cport}\", routes: [{routes}], no_advertise: true }}\n",
                store.display()
            );
            std::fs::write(&conf, text).expect("write a nats-server config");
            let child = tokio::process::Command::new("nats-server")
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("start nats-server");
            self.children.push(child);
        }
    }

    async fn stop(mut self) {
        for c in &mut self.children {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn nats_server_present() -> bool {
    std::process::Command::new("nats-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Waits until the stream acknowledged the first event (the cluster elected its
/// leaders and the stream exists: seconds of nats-server start-up that are not the
/// catch-up); returns when, and the pushed cursor then.
async fn first_ack(port: u16, start: Instant, limit: Duration) -> Option<(Duration, u64)> {
    while start.elapsed() < limit {
        let st = http_get(port, "/status").await;
        let pushed = num_after(&st, "\"pushedCursor\":").unwrap_or(0);
        if pushed > 0 {
            return Some((start.elapsed(), pushed));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Waits until the realm's outbox is empty; returns how long it took.
async fn drained(port: u16, start: Instant, limit: Duration) -> Option<Duration> {
    while start.elapsed() < limit {
        let st = http_get(port, "/status").await;
        if st.contains("\"outboxDepth\":0,") {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

pub async fn offline_day(quick: bool, bin: &Path, report: &mut Vec<(String, String)>) {
    if !nats_server_present() {
        report.push((
            "NATS catch-up".into(),
            "skipped: nats-server is not installed (scripts/install-test-deps)".into(),
        ));
        return;
    }
    let n = if quick { 10_000 } else { 200_000 };
    for paced in [true, false] {
        let mut cluster = Cluster::new(if paced { "paced" } else { "unpaced" });
        let mut env = vec![
            ("CLOUD_BRIDGE_URL", cluster.urls()),
            ("CLOUD_BACKOFF_MAX", "500ms".to_string()),
        ];
        if !paced {
            env.push(("CLOUD_PUSH_MAX_RATE", "10000000".into()));
            env.push(("CLOUD_PUSH_BUSY_RATE", "10000000".into()));
        }
        let hub = Hub::start_with(bin, if paced { "nats" } else { "nats-unpaced" }, &env).await;
        bulk_write(&hub, n, "nats").await;
        let mut base = if paced {
            paced_acks(
                hub.port,
                tills(&hub, 50),
                Duration::from_secs(if quick { 2 } else { 5 }),
                17,
            )
            .await
        } else {
            Vec::new()
        };
        cluster.start();
        let start = Instant::now();
        let limit = Duration::from_secs(600);
        let Some((first, pushed)) = first_ack(hub.port, start, limit).await else {
            report.push(("NATS catch-up".into(), "no PubAck within 600 s".into()));
            hub.stop().await;
            cluster.stop().await;
            continue;
        };
        // The tills write while the catch-up runs (not while the servers boot).
        let lat = paced.then(|| {
            tokio::spawn(paced_acks(
                hub.port,
                tills(&hub, 50),
                Duration::from_secs(5),
                18,
            ))
        });
        let done = drained(hub.port, start, limit).await;
        let mut during = match lat {
            Some(t) => t.await.unwrap_or_default(),
            None => Vec::new(),
        };
        let what = if paced {
            "default pacing, 50 tills writing 1,000 ev/s for the first 5 s of it"
        } else {
            "unpaced, LAN quiet"
        };
        report.push(match done {
            Some(d) => (
                format!("NATS catch-up into R3 after an offline day ({n} events), {what}"),
                format!(
                    "{:.0} events/s from the first PubAck ({:.1} s; {:.1} s from the cluster's start)",
                    ((n + during.len()) as f64 - pushed as f64) / (d - first).as_secs_f64().max(0.001),
                    (d - first).as_secs_f64(),
                    d.as_secs_f64()
                ),
            ),
            None => ("NATS catch-up".into(), "did not finish within 600 s".into()),
        });
        if paced {
            report.push((
                "LAN ack p99 at 1,000 ev/s: NATS bridge idle (cluster down) / while catching up"
                    .into(),
                {
                    let (idle, busy) = (pct(&mut base, 99.0), pct(&mut during, 99.0));
                    format!("{idle:.2} / {busy:.2} ms ({:.1}x)", busy / idle.max(0.001))
                },
            ));
        }
        hub.stop().await;
        cluster.stop().await;
    }
}
