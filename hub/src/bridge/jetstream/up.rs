//! Up: LAN events into the stream, exactly once and in seq order per realm.
//!
//! Each event is published to the realm's up subject with `Nats-Msg-Id:
//! <tenant>:<store>:<id>` and `Pos-Hub-Seq: <seq>`, pipelined (up to [`INFLIGHT`]
//! PubAcks outstanding). PubAcks are taken in publish order; the pushed cursor
//! (`H Q`: hub seq and stream seq of the last event the stream acknowledged, with
//! nothing missing before it) moves, durably, only over acknowledged events.
//!
//! The duplicate window alone cannot be the guarantee (a hub may be away for
//! longer), so every session starts by reading the truth from the stream: the
//! realm's messages after `Q`, walked in stream order. Those that continue the LAN
//! log in order extend the cursor (their PubAcks were lost: hub killed, connection
//! dropped); one that does not (an event published after one that never arrived,
//! when a connection or a stream leader died mid-pipeline) is deleted, so the realm's
//! messages in the stream stay exactly the LAN events in seq order. A PubAck saying
//! `duplicate` is checked the same way: the copy it points to must exist and lie
//! after the cursor, or it is deleted and the event is published again once the
//! stream's duplicate window has let go of its id.

use std::collections::VecDeque;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, context::PublishErrorKind, stream::LastRawMessageErrorKind};

use super::{msg_id, Incident, Lost, Target, INFLIGHT};
use crate::bridge::push::Pacer;
use crate::bridge::Backoff;
use crate::util::now_ms;

/// `H Q`: see the module comment.
const POSITION_KEY: &str = "bridge.nats.position";
pub const SEQ_HEADER: &str = "Pos-Hub-Seq";
/// The cursor is saved at least every this many acknowledged events.
const SAVE_EVERY: u64 = 256;

type AckFut = Pin<
    Box<
        dyn Future<
                Output = Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
            > + Send,
    >,
>;

/// Loads the position and the counters `/status` derives from it.
pub(crate) async fn init(t: &Arc<Target>) -> Result<(), String> {
    let r = t.realm.clone();
    let (pos, after) = tokio::task::spawn_blocking(move || {
        r.with_reader(|s| {
            let pos = parse_position(s.meta_get(POSITION_KEY)?.as_deref());
            let after = s.count_lan_after(pos.0)?;
            Ok((pos, after))
        })
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    let lan = t.realm.stats.lan_events.load(Ordering::Relaxed);
    t.state.pushed_cursor.store(pos.0, Ordering::Relaxed);
    t.state
        .pushed_lan
        .store(lan.saturating_sub(after), Ordering::Relaxed);
    t.nats.stream_seq.store(pos.1, Ordering::Relaxed);
    Ok(())
}

fn parse_position(v: Option<&str>) -> (u64, u64) {
    let mut it = v
        .unwrap_or("")
        .split_whitespace()
        .map(|x| x.parse::<u64>().ok());
    match (it.next().flatten(), it.next().flatten()) {
        (Some(h), Some(q)) => (h, q),
        _ => (0, 0),
    }
}

/// Why a session ended.
enum End {
    /// The connection or the stream failed; reconnect after a backoff.
    Failed(String),
    /// An event's id is still held by the duplicate window although its copy was
    /// deleted: try again in a while.
    Window(String),
    /// The realm is closing.
    Shutdown,
}

/// Pushes forever (until the realm shuts down).
pub(crate) async fn run(t: Arc<Target>) {
    let mut backoff = Backoff::new(Duration::from_millis(250), t.tuning.backoff_max);
    let mut pacer = Pacer::new(t.tuning.max_rate, t.tuning.busy_rate);
    let mut incident = Incident::default();
    loop {
        if t.realm.is_shutting_down() {
            return;
        }
        pacer.assume_busy(Instant::now());
        let started = Instant::now();
        let mut connected = false;
        let end = session(&t, &mut pacer, &mut connected).await;
        t.nats.pending_acks.store(0, Ordering::Relaxed);
        if connected {
            incident.connected();
        }
        let wait = match end {
            End::Failed(e) => {
                incident.fail(&t.state, "nats up", e);
                if started.elapsed() > Duration::from_secs(30) {
                    backoff.reset();
                }
                backoff.next()
            }
            End::Window(e) => {
                incident.fail(&t.state, "nats up", e);
                Duration::from_secs(1)
            }
            End::Shutdown => return,
        };
        tokio::time::sleep(wait).await;
    }
}

/// The realm's position as the stream knows it, plus the hub's own.
struct Pos {
    /// Last LAN seq acknowledged by the stream, with nothing missing before it.
    h: u64,
    /// Its stream sequence.
    q: u64,
}

async fn session(t: &Arc<Target>, pacer: &mut Pacer, connected: &mut bool) -> End {
    let lost: Lost = Arc::new(tokio::sync::Notify::new());
    let client = match t.connect("up", Some(lost.clone())).await {
        Ok(c) => c,
        Err(e) => return End::Failed(e),
    };
    *connected = true;
    let js = jetstream::ContextBuilder::new()
        .timeout(t.tuning.timeout.min(Duration::from_secs(10)))
        .max_ack_inflight(INFLIGHT + 16)
        .backpressure_on_inflight(true)
        .build(client.clone());
    let stream = match t.stream(&js).await {
        Ok(s) => s,
        Err(e) => return End::Failed(e),
    };
    let (h, q) = (
        t.state.pushed_cursor.load(Ordering::Relaxed),
        t.nats.stream_seq.load(Ordering::Relaxed),
    );
    let mut pos = match resync(t, &stream, Pos { h, q }).await {
        Ok(p) => p,
        Err(e) => return End::Failed(e),
    };
    t.state.ok();
    let subject = t.nats.up_subject.clone();
    let (tenant, store) = (&t.realm.cfg.tenant_id, &t.realm.cfg.store_id);
    let batch = t.tuning.push_batch.clamp(1, INFLIGHT);
    // Published, awaiting PubAck, in publish order.
    let mut inflight: VecDeque<(u64, String, AckFut)> = VecDeque::new();
    let mut sent = pos.h;
    let mut next_send = Instant::now();
    let mut unsaved = 0u64;
    let mut idle = false;
    loop {
        if t.realm.is_shutting_down() {
            let _ = save(t, &pos).await;
            return End::Shutdown;
        }
        // Publish the next page while there is room and the pacer allows.
        if inflight.len() + batch <= INFLIGHT && Instant::now() >= next_send {
            let r = t.realm.clone();
            let page = match tokio::task::spawn_blocking(move || {
                r.with_reader(|s| s.read_lan_page(sent, batch, usize::MAX))
            })
            .await
            {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => return End::Failed(format!("reading the outbox: {e}")),
                Err(_) => return End::Failed("the outbox reader stopped".into()),
            };
            idle = page.is_empty();
            if !page.is_empty() {
                let n = page.len();
                for (seq, json) in page {
                    let id = event_id(&json).unwrap_or_default();
                    let mid = msg_id(tenant, store, &id);
                    let msg = jetstream::message::PublishMessage::build()
                        .payload(bytes::Bytes::from(json))
                        .message_id(&mid)
                        .header(SEQ_HEADER, seq.to_string().as_str());
                    match js.send_publish(subject.clone(), msg).await {
                        Ok(ack) => {
                            inflight.push_back((seq, mid, ack.into_future()));
                            sent = seq;
                        }
                        Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                            // Never storable there: set it aside once everything
                            // before it is acknowledged.
                            while let Some((s, mid, fut)) = inflight.pop_front() {
                                if let Err(e) =
                                    settle(t, &stream, &mut pos, s, &mid, fut.await).await
                                {
                                    let _ = save(t, &pos).await;
                                    return e;
                                }
                            }
                            if let Err(e) = set_aside(t, &mut pos, seq, &id, &e.to_string()).await {
                                return End::Failed(e);
                            }
                            sent = seq;
                            break;
                        }
                        Err(e) => {
                            let _ = save(t, &pos).await;
                            return End::Failed(format!("publish: {e}"));
                        }
                    }
                }
                t.nats
                    .pending_acks
                    .store(inflight.len() as u64, Ordering::Relaxed);
                let lan = t.realm.stats.lan_events.load(Ordering::Relaxed);
                let now = Instant::now();
                next_send = now + pacer.after_batch(n, lan, now);
                continue;
            }
        }
        let room = inflight.len() + batch <= INFLIGHT;
        if inflight.is_empty() {
            if unsaved > 0 {
                if let Err(e) = save(t, &pos).await {
                    return End::Failed(e);
                }
                unsaved = 0;
            }
            tokio::select! {
                _ = lost.notified() => return End::Failed("the connection was lost".into()),
                _ = t.realm.committed.notified(), if idle => {}
                _ = tokio::time::sleep(if idle { Duration::from_secs(1) } else { next_send.saturating_duration_since(Instant::now()) }) => {}
            }
            continue;
        }
        let wake = {
            let Some(front) = inflight.front_mut() else {
                continue;
            };
            let fut = &mut front.2;
            tokio::select! {
                biased;
                _ = lost.notified() => Wake::Lost,
                r = fut => Wake::Ack(r),
                _ = tokio::time::sleep(next_send.saturating_duration_since(Instant::now())), if room && !idle => Wake::Tick,
                _ = t.realm.committed.notified(), if room && idle => Wake::Committed,
            }
        };
        match wake {
            Wake::Lost => {
                // Take the PubAcks that did arrive, then start over from the stream.
                while let Some((s, mid, fut)) = inflight.pop_front() {
                    match tokio::time::timeout(Duration::from_millis(200), fut).await {
                        Ok(r) => {
                            if settle(t, &stream, &mut pos, s, &mid, r).await.is_err() {
                                break;
                            }
                        }
                        Err(_) => break,
                    }
                }
                let _ = save(t, &pos).await;
                return End::Failed("the connection was lost".into());
            }
            Wake::Ack(r) => {
                let Some((s, mid, _)) = inflight.pop_front() else {
                    continue;
                };
                t.nats
                    .pending_acks
                    .store(inflight.len() as u64, Ordering::Relaxed);
                if let Err(e) = settle(t, &stream, &mut pos, s, &mid, r).await {
                    let _ = save(t, &pos).await;
                    return e;
                }
                unsaved += 1;
                if unsaved >= SAVE_EVERY || inflight.is_empty() {
                    if let Err(e) = save(t, &pos).await {
                        return End::Failed(e);
                    }
                    unsaved = 0;
                }
            }
            Wake::Tick => {}
            Wake::Committed => idle = false,
        }
    }
}

enum Wake {
    Lost,
    Ack(Result<jetstream::publish::PublishAck, jetstream::context::PublishError>),
    Tick,
    Committed,
}

/// Takes one PubAck, in publish order, into the position.
async fn settle(
    t: &Target,
    stream: &jetstream::stream::Stream,
    pos: &mut Pos,
    seq: u64,
    mid: &str,
    r: Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
) -> Result<(), End> {
    let ack = match r {
        Ok(a) => a,
        Err(e) => {
            let hint = match e.kind() {
                PublishErrorKind::StreamNotFound => format!(
                    ": no stream takes {} (is {} missing or without poshub.>?)",
                    t.nats.up_subject, t.nats.stream
                ),
                _ => String::new(),
            };
            return Err(End::Failed(format!("PubAck for seq {seq}: {e}{hint}")));
        }
    };
    if ack.duplicate {
        // The stream says it has this id already. Trust it only if that copy is
        // there and after the cursor; otherwise it is out of place or gone.
        if ack.sequence <= pos.q {
            delete(t, stream, ack.sequence, seq, "a copy before the cursor").await?;
            return Err(End::Window(format!(
                "seq {seq} was stored out of order and deleted; waiting for the duplicate window to let go of {mid}"
            )));
        }
        match stream.get_raw_message(ack.sequence).await {
            Ok(m) if m.headers.get("Nats-Msg-Id").map(|v| v.as_str()) == Some(mid) => {}
            Ok(_) => {
                return Err(End::Failed(format!(
                    "the stream's copy of seq {seq} at {} is another message",
                    ack.sequence
                )))
            }
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {
                return Err(End::Window(format!(
                    "the stream's copy of seq {seq} was deleted; waiting for the duplicate window to let go of {mid}"
                )))
            }
            Err(e) => return Err(End::Failed(format!("checking a duplicate PubAck: {e}"))),
        }
    }
    pos.h = seq;
    pos.q = ack.sequence;
    t.state.pushed_lan.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

async fn delete(
    t: &Target,
    stream: &jetstream::stream::Stream,
    at: u64,
    seq: u64,
    why: &str,
) -> Result<(), End> {
    match stream.delete_message(at).await {
        Ok(_) => {
            t.nats.repaired.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(realm = %t.realm.key(), stream_seq = at, seq, why, "deleted a message of this realm that was out of place in the stream");
            Ok(())
        }
        Err(e) => Err(End::Failed(format!(
            "cannot delete the out-of-place message {at} (seq {seq}): {e}"
        ))),
    }
}

/// Reads the realm's messages after `pos.q` and returns the true position.
async fn resync(
    t: &Target,
    stream: &jetstream::stream::Stream,
    mut pos: Pos,
) -> Result<Pos, String> {
    t.nats.resyncs.fetch_add(1, Ordering::Relaxed);
    let subject = &t.nats.up_subject;
    let last = match stream.get_last_raw_message_by_subject(subject).await {
        Ok(m) => Some(m.sequence),
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => None,
        Err(e) => {
            return Err(format!(
                "reading the stream's last message on {subject}: {e}"
            ))
        }
    };
    let Some(last) = last else {
        if pos.h > 0 {
            tracing::warn!(realm = %t.realm.key(), pushed = pos.h, "the stream holds none of this realm's events (purged, aged out or a new stream); carrying on after the pushed cursor");
        }
        pos.q = 0;
        commit(t, &pos).await?;
        return Ok(pos);
    };
    if last <= pos.q {
        if last < pos.q {
            pos.q = last;
            commit(t, &pos).await?;
        }
        return Ok(pos);
    }
    // Walk the realm's messages after q, in stream order.
    let mut at = pos.q;
    // The LAN events after h, as (seq, Nats-Msg-Id), in order.
    let mut expected: VecDeque<(u64, String)> = VecDeque::new();
    let (before_h, before_q) = (pos.h, pos.q);
    let mut misplaced = Vec::new();
    let mut foreign = 0u64;
    loop {
        let m = match stream
            .raw_message_builder()
            .next_by_subject(subject.clone())
            .sequence(at + 1)
            .send()
            .await
        {
            Ok(m) => m,
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => break,
            Err(e) => return Err(format!("reading the stream after {at}: {e}")),
        };
        at = m.sequence;
        let hs = m
            .headers
            .get(SEQ_HEADER)
            .and_then(|v| v.as_str().parse::<u64>().ok());
        let mid = m.headers.get("Nats-Msg-Id").map(|v| v.as_str().to_string());
        if let (Some(hs), Some(mid)) = (hs, mid) {
            if expected.is_empty() {
                expected.extend(lan_ids(t, pos.h, 1000).await?);
            }
            if expected.front().is_some_and(|(s, i)| *s == hs && *i == mid) {
                expected.pop_front();
                pos.h = hs;
                pos.q = m.sequence;
                if at >= last {
                    break;
                }
                continue;
            }
            // One of ours out of place (after a gap, or a second copy)? Only
            // what this log published is touched; anything else is left alone.
            if lan_ids(t, hs.saturating_sub(1), 1)
                .await?
                .first()
                .is_some_and(|(s, i)| *s == hs && *i == mid)
            {
                misplaced.push((m.sequence, hs));
            } else {
                foreign += 1;
            }
        } else {
            foreign += 1;
        }
        if at >= last {
            break;
        }
    }
    if foreign > 0 {
        tracing::warn!(realm = %t.realm.key(), messages = foreign, "messages on this realm's up subject that this hub's log did not publish (another box with this realm, or a log that was reset); left alone");
    }
    // Everything walked is accounted for: ours in place, deleted, or not ours.
    pos.q = pos.q.max(at);
    for (at, hs) in misplaced {
        delete(t, stream, at, hs, "found by the resync walk")
            .await
            .map_err(|e| match e {
                End::Failed(e) | End::Window(e) => e,
                End::Shutdown => "shutting down".into(),
            })?;
    }
    if pos.h != before_h {
        tracing::info!(realm = %t.realm.key(), from = before_h, to = pos.h, "the stream already held events whose PubAcks were lost; cursor moved to the stream's position");
        let r = t.realm.clone();
        let h = pos.h;
        let after = tokio::task::spawn_blocking(move || r.with_reader(|s| s.count_lan_after(h)))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let lan = t.realm.stats.lan_events.load(Ordering::Relaxed);
        t.state
            .pushed_lan
            .store(lan.saturating_sub(after), Ordering::Relaxed);
    }
    if (pos.h, pos.q) != (before_h, before_q) {
        commit(t, &pos).await?;
    }
    Ok(pos)
}

/// Up to `n` LAN events after `after` as (seq, Nats-Msg-Id).
async fn lan_ids(t: &Target, after: u64, n: usize) -> Result<Vec<(u64, String)>, String> {
    let r = t.realm.clone();
    let page = tokio::task::spawn_blocking(move || {
        r.with_reader(|s| s.read_lan_page(after, n, usize::MAX))
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    let (tenant, store) = (&t.realm.cfg.tenant_id, &t.realm.cfg.store_id);
    Ok(page
        .into_iter()
        .map(|(s, j)| (s, msg_id(tenant, store, &event_id(&j).unwrap_or_default())))
        .collect())
}

async fn commit(t: &Target, pos: &Pos) -> Result<(), String> {
    save(t, pos).await
}

/// Durably stores the position, then shows it.
async fn save(t: &Target, pos: &Pos) -> Result<(), String> {
    let v = format!("{} {}", pos.h, pos.q);
    t.realm
        .apply(Box::new(move |s| s.meta_set(POSITION_KEY, &v)))
        .await
        .map_err(|e| format!("saving the pushed cursor: {e}"))?;
    t.state.pushed_cursor.store(pos.h, Ordering::Relaxed);
    t.nats.stream_seq.store(pos.q, Ordering::Relaxed);
    t.state.ok();
    Ok(())
}

async fn set_aside(t: &Target, pos: &mut Pos, seq: u64, id: &str, why: &str) -> Result<(), String> {
    tracing::warn!(realm = %t.realm.key(), seq, id, reason = why, "the NATS server cannot take this event; set aside");
    let (id, why, at) = (id.to_string(), format!("NATS: {why}"), now_ms());
    let v = format!("{} {}", seq, pos.q);
    t.realm
        .apply(Box::new(move |s| {
            s.set_aside(seq, &id, &why, at)?;
            s.meta_set(POSITION_KEY, &v)
        }))
        .await?;
    pos.h = seq;
    t.state.pushed_cursor.store(seq, Ordering::Relaxed);
    t.state.pushed_lan.fetch_add(1, Ordering::Relaxed);
    t.state.set_aside.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// The `id` of a stored event's JSON (`{"seq":N,"id":"...",...}`).
fn event_id(json: &str) -> Option<String> {
    let i = json.find("\"id\":\"")? + 6;
    let rest = &json[i..];
    let j = rest.find('"')?;
    Some(rest[..j].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_and_ids() {
        assert_eq!(parse_position(Some("12 345")), (12, 345));
        assert_eq!(parse_position(Some("garbage")), (0, 0));
        assert_eq!(parse_position(None), (0, 0));
        let j = crate::log::event::encode_stored(
            7,
            "ord-1.a:b",
            "t",
            "{}",
            "till",
            None,
            1,
            crate::log::Origin::Lan,
        );
        assert_eq!(event_id(&j).as_deref(), Some("ord-1.a:b"));
    }
}
