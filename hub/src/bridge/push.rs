//! Push: the outbox is the log itself (LAN events above the pushed cursor). Batches
//! of at most 500 events or 1 MiB go to the cloud with an `Idempotency-Key`; the
//! cursor moves, durably, only after the cloud answered for every event of the
//! batch. Events the cloud rejects are set aside with the reason and do not block
//! the ones behind them.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::{retry_after, Backoff, BridgeState, Endpoints};
use crate::log::event::push_json_str;
use crate::realm::Realm;
use crate::util::now_ms;

pub const MAX_EVENTS: usize = 500;
pub const MAX_BYTES: usize = 1 << 20;
use crate::log::store::PUSHED_CURSOR_KEY as CURSOR_KEY;

/// Loads the pushed cursor and derived counters.
pub async fn init(realm: &Arc<Realm>, state: &Arc<BridgeState>) -> Result<(), String> {
    let r = realm.clone();
    let (cursor, lan_after, set_aside) = tokio::task::spawn_blocking(move || {
        r.with_reader(|s| {
            let cursor = s
                .meta_get(CURSOR_KEY)?
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            let after = s.count_lan_after(cursor)?;
            let aside = s.set_aside_list(100_000)?.len() as u64;
            Ok((cursor, after, aside))
        })
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    let lan = realm.stats.lan_events.load(Ordering::Relaxed);
    state.pushed_cursor.store(cursor, Ordering::Relaxed);
    state
        .pushed_lan
        .store(lan.saturating_sub(lan_after), Ordering::Relaxed);
    state.set_aside.store(set_aside, Ordering::Relaxed);
    Ok(())
}

#[derive(Deserialize)]
struct PushResult {
    seq: u64,
    #[serde(default)]
    id: Option<String>,
    status: String,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Deserialize)]
struct PushResponse {
    results: Vec<PushResult>,
}

enum Step {
    /// Batch answered: move on.
    Done,
    /// Try again after the given wait (Retry-After), or after the next backoff.
    Retry(Option<Duration>),
    /// The cloud said the batch is too large: halve it.
    Smaller,
}

/// Pushes forever (until the realm shuts down).
pub async fn run(
    realm: Arc<Realm>,
    client: reqwest::Client,
    ep: Endpoints,
    state: Arc<BridgeState>,
    clock: Arc<crate::clock::Clock>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(250), ep.tuning.backoff_max);
    let batch = ep.tuning.push_batch.clamp(1, MAX_EVENTS);
    let mut limit = batch;
    let mut pacer = Pacer::new(ep.tuning.max_rate, ep.tuning.busy_rate);
    pacer.assume_busy(std::time::Instant::now());
    loop {
        if realm.is_shutting_down() {
            return;
        }
        let cursor = state.pushed_cursor.load(Ordering::Relaxed);
        let r = realm.clone();
        let page = match tokio::task::spawn_blocking(move || {
            r.with_reader(|s| s.read_lan_page(cursor, limit, MAX_BYTES - 4096))
        })
        .await
        {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                state.fail("push: reading the outbox", e);
                tokio::time::sleep(backoff.next()).await;
                continue;
            }
            Err(_) => return,
        };
        if page.is_empty() {
            if state.cursor_unsaved.load(Ordering::Relaxed) != 0 && !realm.storage_full() {
                // Space came back after a full partition: save the cursor kept in memory.
                let _ = settle(&realm, &state, cursor, Vec::new(), 0).await;
            }
            // Wait for the next commit (or poll now and then in case of a miss).
            let _ = tokio::time::timeout(Duration::from_secs(5), realm.committed.notified()).await;
            continue;
        }
        let started = std::time::Instant::now();
        match push_batch(&realm, &client, &ep, &state, &page, &clock).await {
            Step::Done => {
                backoff.reset();
                limit = batch;
                // Catching up after a day offline must not slow the LAN: the disk
                // and CPU are shared with the devices' commits, so the push yields
                // to them while devices are writing.
                let lan = realm.stats.lan_events.load(Ordering::Relaxed);
                let min = pacer.after_batch(page.len(), lan, std::time::Instant::now());
                if let Some(rest) = min.checked_sub(started.elapsed()) {
                    tokio::time::sleep(rest).await;
                }
            }
            Step::Retry(d) => {
                // When the cloud comes back, start gently: devices may be writing.
                pacer.assume_busy(std::time::Instant::now());
                let wait = d.unwrap_or_else(|| backoff.next());
                tokio::time::sleep(wait.max(Duration::from_millis(50))).await
            }
            Step::Smaller => {
                if limit == 1 {
                    // One event the cloud can never take: set it aside.
                    let (seq, json) = &page[0];
                    let id = serde_json::from_str::<serde_json::Value>(json)
                        .ok()
                        .and_then(|v| v["id"].as_str().map(String::from))
                        .unwrap_or_default();
                    let _ = settle(
                        &realm,
                        &state,
                        *seq,
                        vec![(*seq, id, "too large for the cloud (413)".into())],
                        1,
                    )
                    .await;
                } else {
                    limit = (limit / 2).max(1);
                }
            }
        }
    }
}

/// How long the LAN counts as busy after its last event.
const BUSY_FOR: Duration = Duration::from_secs(2);

/// Paces the push: full speed while the LAN is quiet, the busy rate while devices
/// have written within the last [`BUSY_FOR`].
pub(crate) struct Pacer {
    max_rate: f64,
    busy_rate: f64,
    last_lan: Option<u64>,
    lan_seen: Option<std::time::Instant>,
}

impl Pacer {
    pub(crate) fn new(max_rate: f64, busy_rate: f64) -> Self {
        Pacer {
            max_rate,
            busy_rate: busy_rate.min(max_rate),
            last_lan: None,
            lan_seen: None,
        }
    }

    /// Paces at the busy rate for the next [`BUSY_FOR`] whatever the LAN does.
    pub(crate) fn assume_busy(&mut self, now: std::time::Instant) {
        self.lan_seen = Some(now);
    }

    /// The least time a batch of `n` events should take, given the realm's LAN
    /// event count now.
    pub(crate) fn after_batch(
        &mut self,
        n: usize,
        lan_events: u64,
        now: std::time::Instant,
    ) -> Duration {
        if self.last_lan.is_some_and(|l| l != lan_events) {
            self.lan_seen = Some(now);
        }
        self.last_lan = Some(lan_events);
        let busy = self
            .lan_seen
            .is_some_and(|t| now.duration_since(t) < BUSY_FOR);
        let rate = if busy { self.busy_rate } else { self.max_rate };
        Duration::from_secs_f64(n as f64 / rate)
    }
}

async fn push_batch(
    realm: &Arc<Realm>,
    client: &reqwest::Client,
    ep: &Endpoints,
    state: &Arc<BridgeState>,
    page: &[(u64, String)],
    clock: &crate::clock::Clock,
) -> Step {
    let (first, last) = (page[0].0, page[page.len() - 1].0);
    let mut body = String::with_capacity(64 + page.iter().map(|(_, j)| j.len() + 1).sum::<usize>());
    body.push_str("{\"tenantId\":");
    push_json_str(&mut body, &realm.cfg.tenant_id);
    body.push_str(",\"storeId\":");
    push_json_str(&mut body, &realm.cfg.store_id);
    body.push_str(",\"events\":[");
    for (i, (_, j)) in page.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(j);
    }
    body.push_str("]}");
    let key = format!(
        "{}:{}:{first}-{last}",
        realm.cfg.tenant_id, realm.cfg.store_id
    );
    let resp = client
        .post(&ep.push_url)
        .bearer_auth(&ep.token)
        .header("Idempotency-Key", &key)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .timeout(ep.tuning.timeout)
        .body(body)
        .send()
        .await;
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            state.fail("push", describe(&e));
            return Step::Retry(None);
        }
    };
    let status = resp.status();
    // The cloud's Date is the clock's fallback when NTP does not answer.
    if let Some(d) = resp
        .headers()
        .get(reqwest::header::DATE)
        .and_then(|d| d.to_str().ok())
    {
        clock.observe_http_date(d);
    }
    if status == reqwest::StatusCode::PAYLOAD_TOO_LARGE {
        return Step::Smaller;
    }
    if status == reqwest::StatusCode::TOO_MANY_REQUESTS
        || status == reqwest::StatusCode::SERVICE_UNAVAILABLE
    {
        let wait = retry_after(&resp);
        state.fail(
            "push",
            format!("cloud answered {status} (Retry-After {wait:?})"),
        );
        return Step::Retry(wait);
    }
    if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
        state.fail(
            "push",
            format!("cloud answered {status}: check CLOUD_BRIDGE_TOKEN"),
        );
        return Step::Retry(None);
    }
    if !status.is_success() {
        state.fail("push", format!("cloud answered {status}"));
        return Step::Retry(None);
    }
    let seqs: Vec<u64> = page.iter().map(|(s, _)| *s).collect();
    let rejected = match resp
        .bytes()
        .await
        .map_err(|e| describe(&e))
        .and_then(|b| judge_answer(&seqs, &b))
    {
        Ok(r) => r,
        Err(e) => {
            state.fail("push", e);
            return Step::Retry(None);
        }
    };
    match settle(realm, state, last, rejected, page.len() as u64).await {
        Ok(()) => {
            state.ok();
            Step::Done
        }
        Err(e) => {
            state.fail("push: saving the cursor", e);
            Step::Retry(Some(Duration::from_secs(1)))
        }
    }
}

/// Reads the cloud's answer to a push of the events `seqs`: the rejected ones
/// `(seq, id, reason)`, or `Err` (keep the cursor, retry) unless every event of the
/// batch was answered for. (Also the entry point of fuzz/.)
#[doc(hidden)]
pub fn judge_answer(seqs: &[u64], body: &[u8]) -> Result<Vec<(u64, String, String)>, String> {
    let parsed: PushResponse =
        serde_json::from_slice(body).map_err(|e| format!("malformed answer: {e}"))?;
    let mut rejected = Vec::new();
    // Counted once per event: an answer that names one seq twice and another not at
    // all has not answered for the batch.
    let mut answered = std::collections::HashSet::new();
    for r in &parsed.results {
        if !seqs.contains(&r.seq) {
            continue;
        }
        answered.insert(r.seq);
        match r.status.as_str() {
            "accepted" | "duplicate" => {}
            "rejected" => rejected.push((
                r.seq,
                r.id.clone().unwrap_or_default(),
                // An empty reason says nothing in the set-aside record or the log.
                r.reason
                    .clone()
                    .filter(|why| !why.trim().is_empty())
                    .unwrap_or_else(|| "rejected".into()),
            )),
            other => {
                return Err(format!("unknown result status {other:?} for seq {}", r.seq));
            }
        }
    }
    if answered.len() != seqs.len() {
        return Err(format!(
            "the cloud answered for {} of {} events",
            answered.len(),
            seqs.len()
        ));
    }
    Ok(rejected)
}

/// Durably moves the pushed cursor to `last` and records set-aside events.
async fn settle(
    realm: &Arc<Realm>,
    state: &Arc<BridgeState>,
    last: u64,
    rejected: Vec<(u64, String, String)>,
    pushed: u64,
) -> Result<(), String> {
    let n = rejected.len() as u64;
    for (seq, id, reason) in &rejected {
        tracing::warn!(realm = %realm.key(), seq, id = %id, reason = %reason, "the cloud rejected an event; set aside");
    }
    let at = now_ms();
    let saved = realm
        .apply(Box::new(move |s| {
            for (seq, id, reason) in &rejected {
                s.set_aside(*seq, id, reason, at)?;
            }
            s.meta_set(CURSOR_KEY, &last.to_string())
        }))
        .await;
    if let Err(e) = saved {
        if !realm.storage_full() {
            return Err(e);
        }
        // The partition is full: keep pushing with the cursor in memory. The next
        // cursor write after space comes back saves it; a restart before that only
        // pushes these events again, and the cloud deduplicates them by id.
        if state.cursor_unsaved.swap(last, Ordering::Relaxed) == 0 {
            tracing::warn!(realm = %realm.key(), "data partition full: the pushed cursor is kept in memory until it can be saved");
        }
    } else {
        state.cursor_unsaved.store(0, Ordering::Relaxed);
    }
    state.pushed_cursor.store(last, Ordering::Relaxed);
    state.pushed_lan.fetch_add(pushed, Ordering::Relaxed);
    state.set_aside.fetch_add(n, Ordering::Relaxed);
    Ok(())
}

pub(crate) fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "the request timed out".into()
    } else if e.is_connect() {
        format!("cannot connect: {e}")
    } else {
        e.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn pacer_slows_down_while_devices_write_and_speeds_up_after() {
        let mut p = Pacer::new(20_000.0, 1_000.0);
        let t0 = Instant::now();
        // Quiet LAN: full speed.
        assert_eq!(p.after_batch(100, 5, t0), Duration::from_millis(5));
        assert_eq!(
            p.after_batch(100, 5, t0 + Duration::from_millis(5)),
            Duration::from_millis(5)
        );
        // A device wrote: the busy rate.
        let t1 = t0 + Duration::from_millis(10);
        assert_eq!(p.after_batch(100, 6, t1), Duration::from_millis(100));
        assert_eq!(
            p.after_batch(100, 6, t1 + Duration::from_secs(1)),
            Duration::from_millis(100)
        );
        // Two seconds without LAN events: full speed again.
        assert_eq!(
            p.after_batch(100, 6, t1 + BUSY_FOR),
            Duration::from_millis(5)
        );
        // After a failed push (the cloud was away), gently for a while.
        let t2 = t1 + BUSY_FOR * 2;
        p.assume_busy(t2);
        assert_eq!(p.after_batch(100, 6, t2), Duration::from_millis(100));
        assert_eq!(
            p.after_batch(100, 6, t2 + BUSY_FOR),
            Duration::from_millis(5)
        );
    }

    #[test]
    fn busy_rate_never_exceeds_the_max_rate() {
        let mut p = Pacer::new(500.0, 1_000.0);
        let t0 = Instant::now();
        p.after_batch(100, 1, t0);
        assert_eq!(p.after_batch(100, 2, t0), Duration::from_millis(200));
    }

    /// Found by fuzz/ (ingest): an answer naming one event twice and another not at
    /// all counted as answering for the whole batch, so the cursor moved past an
    /// event the cloud never took.
    #[test]
    fn an_answer_must_cover_every_event_once() {
        let twice =
            br#"{"results":[{"seq":1,"status":"accepted"},{"seq":1,"status":"duplicate"}]}"#;
        assert!(judge_answer(&[1, 2], twice).unwrap_err().contains("1 of 2"));
        let both = br#"{"results":[{"seq":2,"status":"accepted"},{"seq":1,"status":"rejected","id":"a","reason":"no"}]}"#;
        assert_eq!(
            judge_answer(&[1, 2], both).unwrap(),
            vec![(1, "a".to_string(), "no".to_string())]
        );
        assert!(judge_answer(&[1], br#"{"results":[{"seq":1,"status":"maybe"}]}"#).is_err());
    }

    /// Found by the fuzz target `ingest`: a rejection with `"reason": ""` was set
    /// aside with an empty reason (nothing to tell the operator).
    #[test]
    fn a_rejection_always_has_a_reason() {
        for reason in [r#","reason":"""#, r#","reason":"  ""#, ""] {
            let body =
                format!(r#"{{"results":[{{"seq":1,"status":"rejected","id":"x"{reason}}}]}}"#);
            assert_eq!(
                judge_answer(&[1], body.as_bytes()).unwrap(),
                vec![(1, "x".to_string(), "rejected".to_string())],
                "{body}"
            );
        }
    }
}
