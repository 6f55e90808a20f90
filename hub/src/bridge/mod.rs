//! The cloud bridge of one realm: pushes the outbox (LAN events above the pushed
//! cursor) to the cloud, and pulls cloud events down into the log. It runs beside
//! the LAN and never blocks it: devices are acked on the local commit, whatever the
//! cloud is doing, and one realm's dead cloud does not slow another realm.
//!
//! The API it speaks is written down in `hub/api/cloud-api.yaml`; a `nats://` or
//! `tls://` URL selects the NATS JetStream target instead (`jetstream/`).

pub mod jetstream;
pub mod pull;
pub mod push;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;

pub use crate::config::Tuning;
use crate::realm::Realm;
use crate::util::now_ms;

/// Where a realm's bridge talks to, and how hard.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub push_url: String,
    pub feed_url: String,
    pub token: String,
    pub tuning: Tuning,
}

impl Endpoints {
    /// The feed URL is CLOUD_FEED_URL, or the push URL with its last path segment
    /// (`ingest`) replaced by `feed`.
    pub fn new(push_url: &str, feed_url: Option<&str>, token: &str, tuning: Tuning) -> Self {
        let feed = match feed_url {
            _ if jetstream::is_nats_url(push_url) => String::new(),
            Some(f) => f.to_string(),
            None => match push_url.rsplit_once('/') {
                Some((base, _)) => format!("{base}/feed"),
                None => format!("{push_url}/feed"),
            },
        };
        Endpoints {
            push_url: push_url.to_string(),
            feed_url: feed,
            token: token.to_string(),
            tuning,
        }
    }
}

/// What `/status` shows of a bridge.
#[derive(Debug, Default)]
pub struct BridgeState {
    pub online: AtomicBool,
    pub pushed_cursor: AtomicU64,
    /// Non-zero while the pushed cursor could not be saved (a full partition).
    pub cursor_unsaved: AtomicU64,
    /// LAN events at or below the pushed cursor (outbox depth = LAN events - this).
    pub pushed_lan: AtomicU64,
    pub last_success_ms: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    pub cloud_cursor: Mutex<Option<String>>,
    pub set_aside: AtomicU64,
    pub pulled: AtomicU64,
    pub refused_from_cloud: AtomicU64,
    /// Set when the target is a NATS JetStream cluster.
    pub nats: std::sync::OnceLock<Arc<jetstream::NatsState>>,
}

impl BridgeState {
    pub(crate) fn ok(&self) {
        self.online.store(true, Ordering::Relaxed);
        self.last_success_ms
            .store(now_ms() as u64, Ordering::Relaxed);
    }
    pub(crate) fn fail(&self, what: &str, e: impl std::fmt::Display) {
        self.online.store(false, Ordering::Relaxed);
        let msg = format!("{what}: {e}");
        tracing::warn!(error = %msg, "cloud bridge");
        *self.last_error.lock() = Some(msg);
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BridgeStatus {
    /// `http` (the cloud API) or `nats` (JetStream).
    pub kind: &'static str,
    pub state: &'static str,
    pub online: bool,
    pub pushed_cursor: u64,
    pub cloud_cursor: Option<String>,
    pub last_success_ms: Option<u64>,
    pub last_error: Option<String>,
    pub set_aside: u64,
    pub pulled: u64,
    pub refused_from_cloud: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats: Option<jetstream::NatsStatus>,
}

impl BridgeState {
    pub fn status(&self) -> BridgeStatus {
        let online = self.online.load(Ordering::Relaxed);
        let last = self.last_success_ms.load(Ordering::Relaxed);
        let nats = self.nats.get().map(|n| n.status());
        BridgeStatus {
            kind: if nats.is_some() { "nats" } else { "http" },
            state: if online { "online" } else { "offline" },
            online,
            pushed_cursor: self.pushed_cursor.load(Ordering::Relaxed),
            cloud_cursor: self.cloud_cursor.lock().clone(),
            last_success_ms: (last > 0).then_some(last),
            last_error: self.last_error.lock().clone(),
            set_aside: self.set_aside.load(Ordering::Relaxed),
            pulled: self.pulled.load(Ordering::Relaxed),
            refused_from_cloud: self.refused_from_cloud.load(Ordering::Relaxed),
            nats,
        }
    }
}

/// Exponential backoff with full jitter, capped.
pub(crate) struct Backoff {
    attempt: u32,
    base: Duration,
    cap: Duration,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            attempt: 0,
            base,
            cap,
        }
    }
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
    pub fn next(&mut self) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let ms = exp.as_millis() as u64;
        Duration::from_millis(ms / 2 + rand::random::<u64>() % (ms / 2 + 1))
    }
}

/// Reads `Retry-After` (seconds) from a response, capped at ten minutes.
pub(crate) fn retry_after(resp: &reqwest::Response) -> Option<Duration> {
    resp.headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(|s| Duration::from_secs(s.min(600)))
}

/// Starts the push and pull tasks of a realm's bridge.
pub async fn start(
    realm: Arc<Realm>,
    ep: Endpoints,
    state: Arc<BridgeState>,
    clock: Arc<crate::clock::Clock>,
) -> Result<(), String> {
    if jetstream::is_nats_url(&ep.push_url) {
        return jetstream::start(realm, ep, state).await;
    }
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        // An idle push connection goes within two of these (hyper's pool checks once
        // per timeout); the pull's long poll keeps its own busy.
        .pool_idle_timeout(Duration::from_secs(20))
        .user_agent(concat!("pos-hub/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| e.to_string())?;
    push::init(&realm, &state).await?;
    pull::init(&realm, &state).await?;
    tokio::spawn(push::run(
        realm.clone(),
        client.clone(),
        ep.clone(),
        state.clone(),
        clock,
    ));
    tokio::spawn(pull::run(realm, client, ep, state));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feed_url_derived_from_push_url() {
        let e = Endpoints::new(
            "https://api.example/v1/events/ingest",
            None,
            "t",
            Tuning::default(),
        );
        assert_eq!(e.feed_url, "https://api.example/v1/events/feed");
        let e = Endpoints::new(
            "https://x/ingest",
            Some("https://y/feed"),
            "t",
            Tuning::default(),
        );
        assert_eq!(e.feed_url, "https://y/feed");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let d: Vec<_> = (0..10).map(|_| b.next()).collect();
        assert!(d.iter().all(|d| *d <= Duration::from_secs(2)));
        assert!(d[9] >= Duration::from_secs(1));
        b.reset();
        assert!(b.next() <= Duration::from_millis(100));
    }
}
