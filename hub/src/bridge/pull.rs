//! Pull: long-polls the cloud feed from the stored cloud cursor and appends each
//! cloud event to the log with origin `cloud` (deduplicated by id, so the hub's own
//! events echoed back are not stored twice). The cursor moves in the same
//! transaction as the append of the page's last events. Bad input from the cloud
//! (malformed JSON, another realm's events, events without ids, huge pages) is
//! logged and refused; it never stops the bridge or the LAN.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::push::describe;
use super::{retry_after, Backoff, BridgeState, Endpoints};
use crate::log::{EventError, NewEvent, Origin};
use crate::realm::Realm;

const CURSOR_KEY: &str = "bridge.cloud_cursor";
/// The largest feed page accepted.
pub const MAX_PAGE_BYTES: usize = 16 << 20;

pub async fn init(realm: &Arc<Realm>, state: &Arc<BridgeState>) -> Result<(), String> {
    let r = realm.clone();
    let cursor = tokio::task::spawn_blocking(move || r.with_reader(|s| s.meta_get(CURSOR_KEY)))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    *state.cloud_cursor.lock() = cursor;
    Ok(())
}

#[derive(Deserialize)]
struct Page<'a> {
    #[serde(borrow)]
    events: Vec<&'a RawValue>,
    #[serde(default)]
    cursor: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CloudEvent<'a> {
    #[serde(default)]
    id: Option<String>,
    #[serde(rename = "type", default)]
    typ: Option<String>,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
    #[serde(borrow, default)]
    ts: Option<&'a RawValue>,
    #[serde(default)]
    device_id: Option<String>,
    #[serde(default)]
    tenant_id: Option<String>,
    #[serde(default)]
    store_id: Option<String>,
}

/// One feed page, parsed: the next cursor (when the page gives one) and each event
/// checked for the realm `tenant:store` (`Ok((device, event))` or why it is refused).
/// `Err` refuses the whole page. (Also the entry point of fuzz/.)
#[doc(hidden)]
#[allow(clippy::type_complexity)]
pub fn parse_feed_page(
    body: &[u8],
    tenant: &str,
    store: &str,
) -> Result<(Option<String>, Vec<Result<(String, NewEvent), String>>), String> {
    // An object only: serde's derive also reads `[[events..], cursor]` (found by the
    // fuzz target `feed`: `[[]]` was an empty page).
    if !body.trim_ascii_start().starts_with(b"{") {
        return Err("malformed page refused: not a JSON object".into());
    }
    let page: Page =
        serde_json::from_slice(body).map_err(|e| format!("malformed page refused: {e}"))?;
    let events = page
        .events
        .iter()
        .map(|raw| check(tenant, store, raw))
        .collect();
    Ok((page.cursor, events))
}

/// Checks one cloud event; `Err` says why it is refused.
pub(crate) fn check(
    tenant: &str,
    store: &str,
    raw: &RawValue,
) -> Result<(String, NewEvent), String> {
    // An object only (serde's derive also reads an array of the fields in order).
    if !raw.get().starts_with('{') {
        return Err("not an event object".into());
    }
    let e: CloudEvent =
        serde_json::from_str(raw.get()).map_err(|e| format!("not an event object: {e}"))?;
    if e.tenant_id.as_deref().is_some_and(|t| t != tenant)
        || e.store_id.as_deref().is_some_and(|s| s != store)
    {
        return Err("event for another realm".into());
    }
    let id = e.id.ok_or("event without id")?;
    let typ = e.typ.ok_or("event without type")?;
    let payload = e.payload.map(|p| p.get()).unwrap_or("null");
    let ev = NewEvent::new(&id, &typ, payload, e.ts.map(|t| t.get()))
        .map_err(|e: EventError| e.to_string())?;
    let device = e
        .device_id
        .filter(|d| !d.is_empty() && d.len() <= 64)
        .unwrap_or_else(|| "cloud".into());
    Ok((device, ev))
}

/// Reads a body up to `max` bytes.
async fn body_capped(resp: reqwest::Response, max: usize) -> Result<Vec<u8>, String> {
    if resp.content_length().is_some_and(|n| n as usize > max) {
        return Err(format!("feed page larger than {max} bytes"));
    }
    let mut out = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| describe(&e))?;
        if out.len() + chunk.len() > max {
            return Err(format!("feed page larger than {max} bytes"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

pub async fn run(
    realm: Arc<Realm>,
    client: reqwest::Client,
    ep: Endpoints,
    state: Arc<BridgeState>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(250), ep.tuning.backoff_max);
    loop {
        if realm.is_shutting_down() {
            return;
        }
        let cursor = state.cloud_cursor.lock().clone().unwrap_or_default();
        let req = client
            .get(&ep.feed_url)
            .bearer_auth(&ep.token)
            .query(&[
                ("tenantId", realm.cfg.tenant_id.as_str()),
                ("storeId", realm.cfg.store_id.as_str()),
                ("cursor", cursor.as_str()),
                ("limit", "500"),
                ("wait", &ep.tuning.feed_wait.as_secs().to_string()),
            ])
            .timeout(ep.tuning.timeout + ep.tuning.feed_wait);
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                state.fail("feed", describe(&e));
                tokio::time::sleep(backoff.next()).await;
                continue;
            }
        };
        let status = resp.status();
        if !status.is_success() {
            let wait = retry_after(&resp).unwrap_or_else(|| backoff.next());
            state.fail("feed", format!("cloud answered {status}"));
            tokio::time::sleep(wait).await;
            continue;
        }
        let body = match body_capped(resp, MAX_PAGE_BYTES).await {
            Ok(b) => b,
            Err(e) => {
                state.fail("feed", e);
                tokio::time::sleep(backoff.next()).await;
                continue;
            }
        };
        let (page_cursor, checked) =
            match parse_feed_page(&body, &realm.cfg.tenant_id, &realm.cfg.store_id) {
                Ok(p) => p,
                Err(e) => {
                    state.fail("feed", e);
                    tokio::time::sleep(backoff.next()).await;
                    continue;
                }
            };
        let next = page_cursor.unwrap_or(cursor.clone());
        // Group consecutive events by device; the last group carries the cursor.
        let mut groups: Vec<(String, Vec<Result<NewEvent, EventError>>)> = Vec::new();
        for c in checked {
            match c {
                Ok((device, ev)) => match groups.last_mut() {
                    Some((d, v)) if *d == device => v.push(Ok(ev)),
                    _ => groups.push((device, vec![Ok(ev)])),
                },
                Err(why) => {
                    state.refused_from_cloud.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(realm = %realm.key(), reason = %why, "refused an event from the cloud feed");
                }
            }
        }
        if groups.is_empty() && next == cursor {
            state.ok();
            backoff.reset();
            continue;
        }
        if groups.is_empty() {
            groups.push(("cloud".into(), Vec::new()));
        }
        let n = groups.len();
        let mut ok = true;
        for (i, (device, events)) in groups.into_iter().enumerate() {
            let meta = (i + 1 == n).then(|| (CURSOR_KEY.to_string(), next.clone()));
            match realm
                .append_from(events, Arc::from(device.as_str()), Origin::Cloud, meta)
                .await
            {
                Ok(outcomes) => {
                    let stored = outcomes
                        .iter()
                        .filter(|o| matches!(o, crate::log::Outcome::Stored(_)))
                        .count();
                    state.pulled.fetch_add(stored as u64, Ordering::Relaxed);
                    if outcomes.iter().any(|o| {
                        matches!(
                            o,
                            crate::log::Outcome::Rejected(
                                EventError::Storage(_) | EventError::StorageFull
                            )
                        )
                    }) {
                        ok = false;
                        break;
                    }
                }
                Err(e) => {
                    state.fail("feed: storing", e);
                    ok = false;
                    break;
                }
            }
        }
        if ok {
            *state.cloud_cursor.lock() = Some(next);
            state.ok();
            backoff.reset();
        } else {
            tokio::time::sleep(backoff.next()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found while fixing what the fuzz target `sync` found (serde's derive reads a
    /// struct from an array): a feed event given as `["c-1","t",...]` was taken.
    #[test]
    fn a_feed_event_is_an_object() {
        let page = br#"{"events":[["c-1","t",1],{"id":"c-2","type":"t","payload":1,"deviceId":"cloud"}],"cursor":"c9"}"#;
        let (cursor, events) = parse_feed_page(page, "t-1", "s-1").unwrap();
        assert_eq!(cursor.as_deref(), Some("c9"));
        assert_eq!(events.len(), 2);
        assert!(events[0]
            .as_ref()
            .unwrap_err()
            .contains("not an event object"));
        assert_eq!(events[1].as_ref().unwrap().1.id(), "c-2");
    }

    /// Found by the fuzz target `feed`: a page given as an array (`[[]]`, or
    /// `[[..events], "c9"]`) was read as `{events, cursor}`.
    #[test]
    fn a_feed_page_is_an_object() {
        for bad in [&b"[[]]"[..], br#"[[], "c9"]"#, b" [[]]", b"null"] {
            let e = parse_feed_page(bad, "t-1", "s-1").unwrap_err();
            assert!(e.starts_with("malformed page refused"), "{e}");
        }
        assert!(parse_feed_page(br#" {"events":[]}"#, "t-1", "s-1").is_ok());
    }
}
