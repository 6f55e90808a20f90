//! The registry of realms. Per realm `{tenantId, storeId}`: its log writer thread,
//! its fan-out thread, its connected devices and admitted devices. This is the only
//! place that maps a realm to its state.
//!
//! Fan-out and catch-up meet in one thread per realm, so the boundary between a
//! device's replay and its live events has no gap and no duplicate: the fan-out
//! thread is the only one that knows exactly which seq every live device has been
//! sent, and it admits a catching-up device to the live set at that seq.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, unbounded, Receiver, Sender, TrySendError};
use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use socketioxide::extract::{AckSender, SocketRef};
use socketioxide::socket::Sid;
use socketioxide::{SendError, SocketError};

use crate::config::RealmConfig;
use crate::log::event::encode_stored;
use crate::log::writer::{refuse, LogStats};
use crate::log::{Committed, EventError, LogError, Outcome, Reply, Store, WriteReq, Writer};

/// The socket type of the hub.
pub type Sock = SocketRef;

/// Serializes already-encoded JSON as it is (no re-parse, no re-encode).
pub struct RawJson<'a>(pub &'a str);

impl Serialize for RawJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // serde_json's raw-value protocol: a struct with this token as its name and
        // one field writes the field's string verbatim (what `RawValue` does).
        use serde::ser::SerializeStruct;
        const TOKEN: &str = "$serde_json::private::RawValue";
        let mut st = s.serialize_struct(TOKEN, 1)?;
        st.serialize_field(TOKEN, self.0)?;
        st.end()
    }
}

#[derive(Serialize)]
struct AckOk {
    ok: bool,
    seq: u64,
    duplicate: bool,
}

#[derive(Serialize)]
pub struct AckErr<'a> {
    pub ok: bool,
    pub error: ErrBody<'a>,
}

#[derive(Serialize)]
pub struct ErrBody<'a> {
    pub code: &'a str,
    pub message: String,
}

impl<'a> AckErr<'a> {
    pub fn new(e: &'a EventError) -> Self {
        AckErr {
            ok: false,
            error: ErrBody {
                code: e.code(),
                message: e.to_string(),
            },
        }
    }
}

#[derive(Serialize)]
#[serde(untagged)]
enum OutcomeJson<'a> {
    Ok(AckOk),
    Err(AckErr<'a>),
}

fn outcome_json(o: &Outcome) -> OutcomeJson<'_> {
    match o {
        Outcome::Stored(seq) => OutcomeJson::Ok(AckOk {
            ok: true,
            seq: *seq,
            duplicate: false,
        }),
        Outcome::Duplicate(seq) => OutcomeJson::Ok(AckOk {
            ok: true,
            seq: *seq,
            duplicate: true,
        }),
        Outcome::Rejected(e) => OutcomeJson::Err(AckErr::new(e)),
    }
}

#[derive(Serialize)]
struct BatchAck<'a> {
    ok: bool,
    results: Vec<OutcomeJson<'a>>,
}

/// How an append is answered.
pub enum AckReply {
    /// A Socket.IO ack. The socket is kept to disconnect it if its queue is full:
    /// an ack is never dropped without the device knowing.
    Socket { ack: AckSender, sock: Sock },
    /// An in-process caller (the cloud bridge, tests).
    Channel(tokio::sync::oneshot::Sender<Vec<Outcome>>),
    /// Nobody waits (an `event` without ack callback).
    None,
}

fn send_or_drop<T: Serialize>(ack: AckSender, sock: &Sock, v: &T) {
    if let Err(SendError::Socket(SocketError::InternalChannelFull)) = ack.send(v) {
        tracing::warn!(sid = %sock.id, "device's send queue is full; disconnecting it so it resumes from its cursor");
        let _ = sock.clone().disconnect();
    }
}

impl Reply for AckReply {
    fn one(self, o: &Outcome) {
        match self {
            AckReply::Socket { ack, sock } => send_or_drop(ack, &sock, &outcome_json(o)),
            AckReply::Channel(tx) => {
                let _ = tx.send(vec![o.clone()]);
            }
            AckReply::None => {}
        }
    }
    fn many(self, os: &[Outcome]) {
        match self {
            AckReply::Socket { ack, sock } => send_or_drop(
                ack,
                &sock,
                &BatchAck {
                    ok: true,
                    results: os.iter().map(outcome_json).collect(),
                },
            ),
            AckReply::Channel(tx) => {
                let _ = tx.send(os.to_vec());
            }
            AckReply::None => {}
        }
    }
}

/// The sender of an event, so fan-out can skip it.
pub type Tag = Option<Sid>;

/// Messages to the fan-out thread, in order.
enum Fan {
    Batch(Vec<Committed<Tag>>),
    /// Admit `sock` to the live set: first send it what it has not seen up to the
    /// current seq (from `after`; `None` = live only), then `synced`.
    Join {
        sock: Sock,
        after: Option<u64>,
    },
    Leave(Sid),
    /// A hub notice to every device (e.g. `hub.power`).
    Notice {
        event: &'static str,
        json: String,
    },
    Close,
}

/// A connected device, for `/status`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceEntry {
    pub device_id: String,
    pub role: String,
    pub connected_since: i64,
    pub in_grace: bool,
}

/// One realm's live state.
pub struct Realm {
    pub cfg: RealmConfig,
    pub stats: Arc<LogStats>,
    db_path: PathBuf,
    writer_tx: Sender<WriteReq<AckReply, Tag>>,
    fan_tx: Sender<Fan>,
    /// The highest seq the fan-out has sent to live devices.
    fanned_seq: Arc<AtomicU64>,
    readers: Mutex<Vec<Store>>,
    devices: Mutex<HashMap<Sid, DeviceEntry>>,
    admitted: RwLock<HashSet<String>>,
    shutting_down: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// The cloud bridge's state, when the realm has one.
    pub bridge: std::sync::OnceLock<Arc<crate::bridge::BridgeState>>,
    /// Woken after every commit of new events (the cloud bridge's push waits on it).
    pub committed: Arc<tokio::sync::Notify>,
}

/// The largest page a replay or `sync` reads at once.
pub const PAGE: usize = 1000;
/// How close to the live head a replay must get before it hands over to fan-out.
const TAIL: u64 = 256;
/// Appends queued per realm before devices are told `busy`.
const QUEUE: usize = 65_536;

impl Realm {
    /// Opens the realm's database and starts its writer and fan-out threads.
    pub fn open(
        cfg: RealmConfig,
        data_dir: &std::path::Path,
        max_batch: usize,
    ) -> Result<Arc<Self>, LogError> {
        let db_path = data_dir
            .join("realms")
            .join(&cfg.tenant_id)
            .join(format!("{}.db", cfg.store_id));
        let store = Store::open(&db_path)?;
        let admitted: HashSet<String> = store.admitted()?.into_iter().collect();
        let lan = store.count_lan_after(0)?;
        let reader = Store::open_reader(&db_path)?;
        let stats = Arc::new(LogStats::default());
        stats.lan_events.store(lan, Ordering::Relaxed);
        let (writer_tx, writer_rx) = bounded(QUEUE);
        let (fan_tx, fan_rx) = unbounded::<Fan>();
        let to_fan = fan_tx.clone();
        let committed = Arc::new(tokio::sync::Notify::new());
        let wake = committed.clone();
        let sink = Box::new(move |batch| {
            // The fan-out only stops after the writer; nobody else listens.
            let _ = to_fan.send(Fan::Batch(batch));
            wake.notify_one();
        });
        let writer = Writer::new(store, writer_rx, sink, max_batch, stats.clone())?;
        let last = stats.last_seq.load(Ordering::Relaxed);
        let fanned_seq = Arc::new(AtomicU64::new(last));

        let key = cfg.key();
        let mut threads = Vec::new();
        let name = format!("log-{}", cfg.store_id);
        threads.push(spawn_named(&name, move || {
            let store = writer.run();
            drop(store);
        })?);
        let fs = fanned_seq.clone();
        threads.push(spawn_named(&format!("fan-{}", cfg.store_id), move || {
            FanOut {
                reader,
                live: Vec::new(),
                fanned: fs,
            }
            .run(fan_rx)
        })?);
        tracing::info!(realm = %key, path = %db_path.display(), last_seq = last, "realm open");
        Ok(Arc::new(Realm {
            cfg,
            stats,
            db_path,
            writer_tx,
            fan_tx,
            fanned_seq,
            readers: Mutex::new(Vec::new()),
            devices: Mutex::new(HashMap::new()),
            admitted: RwLock::new(admitted),
            shutting_down: AtomicBool::new(false),
            threads: Mutex::new(threads),
            committed,
            bridge: std::sync::OnceLock::new(),
        }))
    }

    pub fn key(&self) -> String {
        self.cfg.key()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    /// Queues an append in arrival order. Never blocks: a full queue answers `busy`.
    pub fn submit(&self, req: WriteReq<AckReply, Tag>) {
        if self.is_shutting_down() {
            return refuse(req, EventError::ShuttingDown);
        }
        match self.writer_tx.try_send(req) {
            Ok(()) => {}
            Err(TrySendError::Full(r)) => refuse(r, EventError::Busy),
            Err(TrySendError::Disconnected(r)) => refuse(r, EventError::ShuttingDown),
        }
    }

    /// Asks the writer whether the database is writable (for `/healthz`).
    pub async fn check(&self) -> Result<(), String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.is_shutting_down() {
            return Err("shutting down".into());
        }
        self.writer_tx
            .try_send(WriteReq::Check(tx))
            .map_err(|_| "the event log queue is full or closed".to_string())?;
        match tokio::time::timeout(Duration::from_secs(5), rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err("the event log writer stopped".into()),
            Err(_) => Err("the event log did not answer within 5 s (disk stalled?)".into()),
        }
    }

    pub fn is_admitted(&self, device_id: &str) -> bool {
        self.admitted.read().contains(device_id)
    }

    /// Records a device admitted with a valid token (for later offline grace).
    pub fn admit(&self, device_id: &str, role: &str, token_exp: i64) {
        self.admitted.write().insert(device_id.to_string());
        let _ = self.writer_tx.try_send(WriteReq::Admit {
            device_id: device_id.to_string(),
            role: role.to_string(),
            token_exp,
        });
    }

    pub fn device_connected(&self, sid: Sid, entry: DeviceEntry) {
        self.devices.lock().insert(sid, entry);
    }

    pub fn device_left(&self, sid: Sid) {
        self.devices.lock().remove(&sid);
        let _ = self.fan_tx.send(Fan::Leave(sid));
    }

    pub fn devices(&self) -> Vec<DeviceEntry> {
        let mut v: Vec<_> = self.devices.lock().values().cloned().collect();
        v.sort_by(|a, b| a.device_id.cmp(&b.device_id));
        v
    }

    pub fn device_count(&self) -> usize {
        self.devices.lock().len()
    }

    /// Sends a hub notice to every live device of the realm.
    pub fn notice(&self, event: &'static str, json: String) {
        let _ = self.fan_tx.send(Fan::Notice { event, json });
    }

    /// Runs `f` on a pooled read-only connection (blocking: call from a blocking task).
    pub fn with_reader<T>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, LogError>,
    ) -> Result<T, LogError> {
        let reader = self.readers.lock().pop();
        let reader = match reader {
            Some(r) => r,
            None => Store::open_reader(&self.db_path)?,
        };
        let r = f(&reader);
        let mut pool = self.readers.lock();
        if pool.len() < 4 {
            pool.push(reader);
        }
        r
    }

    /// Reads one page of events `(after, min(upto, fanned)]` on a pooled reader.
    pub fn read_page(&self, after: u64, limit: usize) -> Result<Vec<(u64, String)>, LogError> {
        let upto = self.fanned_seq.load(Ordering::Acquire);
        self.with_reader(|r| {
            let mut out = Vec::with_capacity(limit.min(PAGE));
            r.read_page(after, upto, limit, |seq, json| out.push((seq, json)))?;
            Ok(out)
        })
    }

    /// Runs `f` in the writer's next transaction and waits for the commit.
    pub async fn apply(&self, f: crate::log::writer::ApplyFn) -> Result<(), String> {
        let (done, rx) = tokio::sync::oneshot::channel();
        self.writer_tx
            .try_send(WriteReq::Apply { f, done })
            .map_err(|_| "the event log queue is full or closed".to_string())?;
        rx.await
            .map_err(|_| "the event log writer stopped".to_string())?
    }

    /// Appends events from outside the LAN (the cloud), setting `meta` in the same
    /// transaction, and waits for the commit. Fan-out sends them to every device.
    pub async fn append_from(
        &self,
        events: Vec<Result<crate::log::NewEvent, EventError>>,
        device: Arc<str>,
        origin: crate::log::Origin,
        meta: Option<(String, String)>,
    ) -> Result<Vec<Outcome>, String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.writer_tx
            .try_send(WriteReq::Append {
                events: crate::log::Appended::Many(events),
                device,
                origin,
                tag: None,
                reply: AckReply::Channel(tx),
                meta,
            })
            .map_err(|_| "the event log queue is full or closed".to_string())?;
        rx.await
            .map_err(|_| "the event log writer stopped".to_string())
    }

    pub fn fanned_seq(&self) -> u64 {
        self.fanned_seq.load(Ordering::Acquire)
    }

    /// Replays what `sock` missed since `since`, then hands it to the fan-out,
    /// which sends the last few events, `synced`, and live events from then on.
    pub async fn catch_up(self: Arc<Self>, sock: Sock, since: Option<u64>) {
        let Some(mut after) = since else {
            let _ = self.fan_tx.send(Fan::Join { sock, after: None });
            return;
        };
        loop {
            let head = self.fanned_seq();
            if head <= after + TAIL {
                break;
            }
            let realm = self.clone();
            let page = match tokio::task::spawn_blocking(move || realm.read_page(after, PAGE)).await
            {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => {
                    tracing::error!(realm = %self.key(), error = %e, "replay read failed; disconnecting device");
                    let _ = sock.disconnect();
                    return;
                }
                Err(_) => return,
            };
            if page.is_empty() {
                break;
            }
            for (seq, json) in &page {
                if !emit_waiting(&sock, "event", json).await {
                    return;
                }
                after = *seq;
            }
        }
        let _ = self.fan_tx.send(Fan::Join {
            sock,
            after: Some(after),
        });
    }

    /// Stops taking events, commits what is queued, closes the database.
    pub fn close(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let _ = self.writer_tx.send(WriteReq::Close);
        let threads: Vec<_> = self.threads.lock().drain(..).collect();
        let mut it = threads.into_iter();
        // The writer first (it drains and commits), then the fan-out.
        if let Some(w) = it.next() {
            let _ = w.join();
        }
        let _ = self.fan_tx.send(Fan::Close);
        for t in it {
            let _ = t.join();
        }
        self.readers.lock().clear();
        tracing::info!(realm = %self.key(), last_seq = self.stats.last_seq.load(Ordering::Relaxed), "realm closed");
    }
}

fn spawn_named(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, LogError> {
    std::thread::Builder::new()
        .name(name.chars().take(15).collect())
        .spawn(f)
        .map_err(|e| {
            LogError::Thread(format!(
                "cannot start thread {name}: {e} (out of memory or process limits?)"
            ))
        })
}

/// Emits `json` as `event`, waiting while the socket's queue is full. Returns false
/// if the socket is gone.
async fn emit_waiting(sock: &Sock, event: &str, json: &str) -> bool {
    for _ in 0..30_000 {
        match sock.emit(event, &RawJson(json)) {
            Ok(()) => return true,
            Err(SendError::Socket(SocketError::InternalChannelFull)) => {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err(_) => return false,
        }
    }
    // Stuck for about 30 s: let it reconnect.
    let _ = sock.clone().disconnect();
    false
}

struct Live {
    sid: Sid,
    sock: Sock,
}

struct FanOut {
    reader: Store,
    live: Vec<Live>,
    fanned: Arc<AtomicU64>,
}

#[derive(Serialize)]
struct Synced {
    seq: u64,
}

impl FanOut {
    fn run(mut self, rx: Receiver<Fan>) {
        for msg in rx {
            match msg {
                Fan::Batch(batch) => self.batch(batch),
                Fan::Join { sock, after } => self.join(sock, after),
                Fan::Leave(sid) => self.live.retain(|l| l.sid != sid),
                Fan::Notice { event, json } => {
                    let mut dead = Vec::new();
                    for l in &self.live {
                        if l.sock.emit(event, &RawJson(&json)).is_err() {
                            dead.push(l.sid);
                        }
                    }
                    self.drop_dead(dead);
                }
                Fan::Close => break,
            }
        }
        self.live.clear();
    }

    fn batch(&mut self, batch: Vec<Committed<Tag>>) {
        // Encode each event once; every socket gets the same JSON.
        let encoded: Vec<(Tag, String)> = batch
            .iter()
            .map(|c| {
                (
                    c.tag,
                    encode_stored(
                        c.seq,
                        c.event.id(),
                        c.event.typ(),
                        c.event.payload(),
                        &c.device,
                        c.event.ts(),
                        c.hub_ts,
                        c.origin,
                    ),
                )
            })
            .collect();
        // Socket by socket, all of the batch at once: each socket's writer task then
        // wakes once and sends the batch in one write.
        let mut dead = Vec::new();
        for l in &self.live {
            for (tag, json) in &encoded {
                if Some(l.sid) == *tag {
                    continue;
                }
                if let Err(e) = l.sock.emit("event", &RawJson(json)) {
                    if let SendError::Socket(SocketError::InternalChannelFull) = e {
                        tracing::warn!(sid = %l.sid, "device fell too far behind; disconnecting it so it resumes from its cursor");
                    }
                    dead.push(l.sid);
                    break;
                }
            }
        }
        self.drop_dead(dead);
        if let Some(c) = batch.last() {
            self.fanned.store(c.seq, Ordering::Release);
        }
    }

    fn drop_dead(&mut self, dead: Vec<Sid>) {
        for sid in dead {
            if let Some(i) = self.live.iter().position(|l| l.sid == sid) {
                let l = self.live.swap_remove(i);
                let _ = l.sock.disconnect();
            }
        }
    }

    fn join(&mut self, sock: Sock, after: Option<u64>) {
        let head = self.fanned.load(Ordering::Acquire);
        if let Some(after) = after {
            let mut from = after;
            while from < head {
                let mut ok = true;
                let r = self.reader.read_page(from, head, PAGE, |seq, json| {
                    if ok && sock.emit("event", &RawJson(&json)).is_err() {
                        ok = false;
                    }
                    from = seq;
                });
                match r {
                    Ok(0) => break,
                    Ok(_) if ok => {}
                    Ok(_) => {
                        tracing::warn!(sid = %sock.id, "device's queue overflowed during catch-up; disconnecting it");
                        let _ = sock.disconnect();
                        return;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "catch-up read failed; disconnecting device");
                        let _ = sock.disconnect();
                        return;
                    }
                }
            }
        }
        if sock.emit("synced", &Synced { seq: head }).is_err() {
            let _ = sock.disconnect();
            return;
        }
        self.live.push(Live { sid: sock.id, sock });
    }
}

/// Every realm of this hub, by `{tenantId, storeId}`.
pub struct Realms {
    list: Vec<Arc<Realm>>,
    by_key: HashMap<(String, String), Arc<Realm>>,
}

impl Realms {
    /// Opens every configured realm; the first failure stops start-up.
    pub fn open(
        cfgs: &[RealmConfig],
        data_dir: &std::path::Path,
        max_batch: usize,
    ) -> Result<Self, LogError> {
        let mut list = Vec::new();
        let mut by_key = HashMap::new();
        for c in cfgs {
            let r = Realm::open(c.clone(), data_dir, max_batch)?;
            by_key.insert((c.tenant_id.clone(), c.store_id.clone()), r.clone());
            list.push(r);
        }
        Ok(Self { list, by_key })
    }

    pub fn get(&self, tenant: &str, store: &str) -> Option<&Arc<Realm>> {
        // Avoid allocating a key for the lookup in the common one-realm case.
        if self.list.len() == 1 {
            let r = &self.list[0];
            return (r.cfg.tenant_id == tenant && r.cfg.store_id == store).then_some(r);
        }
        self.by_key.get(&(tenant.to_string(), store.to_string()))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Realm>> {
        self.list.iter()
    }

    /// Stops every realm: no new events, queued ones committed, databases closed.
    pub fn close_all(&self) {
        for r in &self.list {
            r.shutting_down.store(true, Ordering::SeqCst);
        }
        for r in &self.list {
            r.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_json_goes_through_socketio_encoding_verbatim() {
        let s = serde_json::to_string(&(RawJson(r#"{"a":1}"#),)).unwrap();
        assert_eq!(s, r#"[{"a":1}]"#);
        use socketioxide_core::parser::Parse;
        let v = socketioxide_parser_common::CommonParser
            .encode_value(&RawJson(r#"{"a":[1,"x"]}"#), Some("event"))
            .unwrap();
        assert_eq!(v.as_str().unwrap().as_str(), r#"["event",{"a":[1,"x"]}]"#);
    }
}
