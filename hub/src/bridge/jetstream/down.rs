//! Down: a durable pull consumer per realm on `poshub.<tenant>.<store>.down`
//! (created if missing). Each message is one `CloudEvent` of the API (`id`, `type`,
//! `payload`, optional `deviceId`, `ts`); the consumer is the cursor. Messages are
//! appended with origin `cloud` (deduplicated by event id, so redeliveries are
//! harmless) and acknowledged only after that append is durable. Hostile messages
//! get the HTTP feed's checks (bad JSON, another realm, oversized, no id): logged,
//! counted, and terminated so the server stops redelivering them.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, AckKind};
use futures_util::StreamExt;
use serde_json::value::RawValue;

use super::{Incident, Target};
use crate::bridge::Backoff;
use crate::log::{EventError, NewEvent, Origin, Outcome};

/// The largest down message taken (an event's payload is at most 64 KiB).
pub const MAX_MESSAGE: usize = 256 * 1024;
const FETCH: usize = 200;

pub(crate) async fn run(t: Arc<Target>) {
    let mut backoff = Backoff::new(Duration::from_millis(250), t.tuning.backoff_max);
    let mut incident = Incident::default();
    loop {
        if t.realm.is_shutting_down() {
            return;
        }
        let started = std::time::Instant::now();
        let mut connected = false;
        let r = session(&t, &mut connected).await;
        if connected {
            incident.connected();
        }
        if let Err(e) = r {
            incident.fail(&t.state, "nats down", e);
        }
        if started.elapsed() > Duration::from_secs(30) {
            backoff.reset();
        }
        tokio::time::sleep(backoff.next()).await;
    }
}

async fn session(t: &Arc<Target>, connected: &mut bool) -> Result<(), String> {
    let client = t.connect("down", None).await?;
    *connected = true;
    let js = jetstream::ContextBuilder::new()
        .timeout(t.tuning.timeout.min(Duration::from_secs(10)))
        .build(client);
    let stream = t.stream(&js).await?;
    let name = t.nats.consumer.clone();
    let consumer: jetstream::consumer::Consumer<pull::Config> = stream
        .get_or_create_consumer(
            &name,
            pull::Config {
                durable_name: Some(name.clone()),
                description: Some(format!("pos-hub {} cloud -> store", t.realm.key())),
                filter_subject: t.nats.down_subject.clone(),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                deliver_policy: jetstream::consumer::DeliverPolicy::All,
                ack_wait: Duration::from_secs(30),
                max_ack_pending: 1000,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| format!("consumer {name}: {e}"))?;
    let wait = t
        .tuning
        .feed_wait
        .clamp(Duration::from_secs(1), Duration::from_secs(25));
    loop {
        if t.realm.is_shutting_down() {
            return Ok(());
        }
        let mut batch = consumer
            .fetch()
            .max_messages(FETCH)
            .expires(wait)
            .messages()
            .await
            .map_err(|e| format!("fetch: {e}"))?;
        let mut msgs = Vec::new();
        while let Some(m) = batch.next().await {
            match m {
                Ok(m) => msgs.push(m),
                Err(e) => {
                    if msgs.is_empty() {
                        return Err(format!("fetch: {e}"));
                    }
                    break;
                }
            }
        }
        t.state.ok();
        if msgs.is_empty() {
            continue;
        }
        take(t, msgs).await?;
    }
}

/// A device's consecutive events and the messages they came in.
type Group = (
    String,
    Vec<Result<NewEvent, EventError>>,
    Vec<jetstream::Message>,
);

/// Appends one fetched batch and acknowledges it.
async fn take(t: &Target, msgs: Vec<jetstream::Message>) -> Result<(), String> {
    // Consecutive events of one device go in one append.
    let mut groups: Vec<Group> = Vec::new();
    for m in msgs {
        match check(t, &m) {
            Ok((device, ev)) => match groups.last_mut() {
                Some((d, v, ms)) if *d == device => {
                    v.push(Ok(ev));
                    ms.push(m);
                }
                _ => groups.push((device, vec![Ok(ev)], vec![m])),
            },
            Err(why) => {
                t.state.refused_from_cloud.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(realm = %t.realm.key(), reason = %why, "refused a message from the NATS down subject");
                // Never storable: stop its redelivery.
                m.ack_with(AckKind::Term)
                    .await
                    .map_err(|e| format!("terminating a refused message: {e}"))?;
            }
        }
    }
    for (device, events, ms) in groups {
        let outcomes = t
            .realm
            .append_from(events, Arc::from(device.as_str()), Origin::Cloud, None)
            .await
            .map_err(|e| format!("storing cloud events: {e}"))?;
        if outcomes
            .iter()
            .any(|o| matches!(o, Outcome::Rejected(EventError::Storage(_))))
        {
            // Not durable: leave them unacknowledged; the server redelivers.
            return Err("storing cloud events failed; they will be redelivered".into());
        }
        let stored = outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Stored(_)))
            .count();
        t.state.pulled.fetch_add(stored as u64, Ordering::Relaxed);
        for (m, o) in ms.iter().zip(&outcomes) {
            if let Outcome::Rejected(e) = o {
                t.state.refused_from_cloud.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(realm = %t.realm.key(), reason = %e, "refused an event from the NATS down subject");
            }
            m.ack().await.map_err(|e| format!("ack: {e}"))?;
        }
    }
    Ok(())
}

/// The HTTP feed's checks, plus the message size.
fn check(t: &Target, m: &jetstream::Message) -> Result<(String, NewEvent), String> {
    if m.payload.len() > MAX_MESSAGE {
        return Err(format!(
            "message of {} bytes (at most {MAX_MESSAGE})",
            m.payload.len()
        ));
    }
    let text = std::str::from_utf8(&m.payload).map_err(|_| "not UTF-8".to_string())?;
    let raw: &RawValue = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    if !raw.get().trim_start().starts_with('{') {
        return Err("not an event object".into());
    }
    crate::bridge::pull::check(&t.realm.cfg.tenant_id, &t.realm.cfg.store_id, raw)
}
