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
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, Sender, TrySendError};
use parking_lot::{Mutex, RwLock};
use serde::Serialize;

use crate::config::RealmConfig;
use crate::link::sio;
use crate::link::{self, Packet, Sid, Sock, Why};
use crate::log::event::encode_stored_into;
use crate::log::writer::{refuse, LogStats, Retention};
use crate::log::{Committed, EventError, LogError, Outcome, Reply, Store, WriteReq, Writer};

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
    /// The refusal as JSON.
    pub fn json(e: &EventError) -> String {
        serde_json::to_string(&AckErr::new(e))
            .unwrap_or_else(|_| format!("{{\"ok\":false,\"error\":{{\"code\":\"{}\"}}}}", e.code()))
    }
}

/// Writes one outcome as `{ok, seq, duplicate}` or `{ok:false, error}`.
fn push_outcome(out: &mut String, o: &Outcome) {
    match o {
        Outcome::Stored(seq) | Outcome::Duplicate(seq) => {
            out.push_str("{\"ok\":true,\"seq\":");
            sio::push_u64(out, *seq);
            out.push_str(if matches!(o, Outcome::Duplicate(_)) {
                ",\"duplicate\":true}"
            } else {
                ",\"duplicate\":false}"
            });
        }
        Outcome::Rejected(e) => out.push_str(&AckErr::json(e)),
    }
}

/// How an append is answered.
pub enum AckReply {
    /// A Socket.IO ack to the device's packet `id`. If its queue is full the
    /// device is cut: an ack is never dropped without the device knowing.
    Socket {
        sock: Sock,
        id: u64,
        /// When the event arrived (for the ack latency histogram).
        at: std::time::Instant,
    },
    /// An in-process caller (the cloud bridge, tests).
    Channel(tokio::sync::oneshot::Sender<Vec<Outcome>>),
    /// Nobody waits (an `event` without ack callback).
    None,
}

impl AckReply {
    /// Answers with ready-made JSON (a refusal before the writer saw it).
    pub fn send_json(self, json: &str) {
        if let AckReply::Socket { sock, id, .. } = self {
            link::send_or_cut(&sock, link::str_of(sio::ack(id, json)));
        }
    }
}

impl Reply for AckReply {
    fn one(self, o: &Outcome) {
        self.answer(std::slice::from_ref(o), false);
    }
    fn many(self, os: &[Outcome]) {
        self.answer(os, true);
    }
}

thread_local! {
    /// Where acks are written before they are copied into a packet of their exact
    /// size: one allocation per ack (see [`link::str_copy`]).
    static ACK_SCRATCH: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

impl AckReply {
    /// Acks `os`: one event's outcome, or (`many`) a batch's.
    fn answer(self, os: &[Outcome], many: bool) {
        match self {
            AckReply::Socket { sock, id, at } => {
                let packet = ACK_SCRATCH.with_borrow_mut(|out| {
                    out.clear();
                    sio::ack_start(out, id);
                    if many {
                        out.push_str("{\"ok\":true,\"results\":[");
                        for (i, o) in os.iter().enumerate() {
                            if i > 0 {
                                out.push(',');
                            }
                            push_outcome(out, o);
                        }
                        out.push_str("]}");
                    } else if let Some(o) = os.first() {
                        push_outcome(out, o);
                    }
                    sio::ack_end(out);
                    let packet = link::str_copy(out);
                    if out.capacity() > 64 << 10 {
                        *out = String::new(); // a huge batch's ack is not kept
                    }
                    packet
                });
                link::send_or_cut(&sock, packet);
                crate::metrics::ACK_LATENCY.observe_duration(at.elapsed());
            }
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
    /// A hub notice to every device (e.g. `hub.power`), encoded once.
    Notice(Packet),
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
    /// Bytes the hub holds for the device and has not written yet (at the time of
    /// [`Realm::devices`]): a device that falls behind shows here before it is cut.
    pub send_buffer_bytes: usize,
    #[serde(skip)]
    pub sock: std::sync::Weak<link::Socket>,
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
    /// Read-only connections for catch-up and `sync`, newest last, with when each was
    /// last given back; at most [`READERS`], closed after [`READER_IDLE`] unused.
    readers: Mutex<Vec<(Store, Instant)>>,
    devices: Mutex<HashMap<Sid, DeviceEntry>>,
    admitted: RwLock<HashSet<String>>,
    shutting_down: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Woken after every commit of new events (the cloud bridge's push waits on it).
    pub committed: Arc<tokio::sync::Notify>,
    /// This log's identity ([`Store::ensure_log_id`]), told to devices in `synced`.
    pub log_id: Option<Arc<str>>,
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
        retention: Retention,
    ) -> Result<Arc<Self>, LogError> {
        let db_path = data_dir
            .join("realms")
            .join(&cfg.tenant_id)
            .join(format!("{}.db", cfg.store_id));
        let mut store = Store::open(&db_path)?;
        // Without an id that survives a restart, devices are not told one at all (a new
        // id each start would make every device replay the whole log).
        let log_id = match store.ensure_log_id() {
            Ok(id) => Some(id),
            Err(e) => {
                tracing::warn!(path = %db_path.display(), error = %e, "no log id (devices cannot tell this log from another until it has one)");
                None
            }
        };
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
        let retention = Retention {
            bridged: cfg.cloud_bridge_url.is_some(),
            ..retention
        };
        let writer = Writer::new(store, writer_rx, sink, max_batch, stats.clone())?
            .with_retention(retention);
        let last = stats.last_seq.load(Ordering::Relaxed);
        let fanned_seq = Arc::new(AtomicU64::new(last));

        let key = cfg.key();
        let mut threads = Vec::new();
        let name = format!("log-{}", cfg.store_id);
        // Both threads answer and close device connections, which spawns on the
        // async runtime: they run inside its context.
        let rt = tokio::runtime::Handle::try_current().ok();
        let rt2 = rt.clone();
        threads.push(spawn_named(&name, move || {
            let _ctx = rt.as_ref().map(|h| h.enter());
            let store = writer.run();
            drop(store);
        })?);
        let fs = fanned_seq.clone();
        let log_id: Option<Arc<str>> = log_id.map(Arc::from);
        let fan_log_id = log_id.clone();
        threads.push(spawn_named(&format!("fan-{}", cfg.store_id), move || {
            let _ctx = rt2.as_ref().map(|h| h.enter());
            FanOut {
                reader,
                live: Vec::new(),
                fanned: fs,
                log_id: fan_log_id,
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
            log_id,
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

    /// The oldest seq the log still holds (`None` while it is empty).
    pub fn oldest_seq(&self) -> Option<u64> {
        Some(self.stats.oldest_seq.load(Ordering::Relaxed)).filter(|s| *s > 0)
    }

    /// `Some(oldest kept seq)` when a device resuming after `since` would miss
    /// events retention already deleted (it must be told, not given a gap).
    pub fn cursor_expired(&self, since: u64) -> Option<u64> {
        self.oldest_seq()
            .filter(|oldest| since.saturating_add(1) < *oldest)
    }

    /// Bytes of the realm's database on disk (main file and WAL).
    pub fn db_bytes(&self) -> u64 {
        let len = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let mut wal = self.db_path.as_os_str().to_owned();
        wal.push("-wal");
        len(&self.db_path) + len(std::path::Path::new(&wal))
    }

    /// True while the data partition is full (events refused with `storage_full`).
    pub fn storage_full(&self) -> bool {
        self.stats.storage_full.load(Ordering::Relaxed)
    }

    /// Asks the writer whether the database is writable (for `/healthz`).
    pub async fn check(&self) -> Result<(), String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.is_shutting_down() {
            return Err("shutting down".into());
        }
        if self.storage_full() {
            // An empty transaction still commits on a full partition: say what events get.
            return Err("storage_full: the data partition is full; new events are refused until space is freed (reads, catch-up and the cloud push keep working)".into());
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
        for d in &mut v {
            d.send_buffer_bytes = d.sock.upgrade().map_or(0, |s| s.held_bytes());
        }
        v.sort_by(|a, b| a.device_id.cmp(&b.device_id));
        v
    }

    pub fn device_count(&self) -> usize {
        self.devices.lock().len()
    }

    /// Sends a hub notice to every live device of the realm.
    pub fn notice(&self, event: &'static str, json: String) {
        let _ = self
            .fan_tx
            .send(Fan::Notice(link::str_of(sio::event(event, &json))));
    }

    /// Runs `f` on a pooled read-only connection (blocking: call from a blocking task).
    pub fn with_reader<T>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, LogError>,
    ) -> Result<T, LogError> {
        let reader = self.readers.lock().pop().map(|(r, _)| r);
        let reader = match reader {
            Some(r) => r,
            None => Store::open_reader(&self.db_path)?,
        };
        let r = f(&reader);
        let mut pool = self.readers.lock();
        if pool.len() < READERS {
            pool.push((reader, Instant::now()));
        }
        r
    }

    /// Closes pooled readers unused for [`READER_IDLE`], so a busy hour's descriptors
    /// (two per reader: the database and its WAL) go back once the store is quiet.
    pub fn close_idle_readers(&self) {
        self.readers
            .lock()
            .retain(|(_, used)| used.elapsed() < READER_IDLE);
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
    ///
    /// The replay waits while the device's queue is full (a slow device is not cut
    /// for being slow), but a device that takes nothing for [`STALL`] is cut.
    pub async fn catch_up(self: Arc<Self>, sock: Sock, since: Option<u64>) {
        let Some(mut after) = since else {
            let _ = self.fan_tx.send(Fan::Join { sock, after: None });
            return;
        };
        loop {
            let head = self.fanned_seq();
            if head <= after.saturating_add(TAIL) {
                break;
            }
            let realm = self.clone();
            let page = match tokio::task::spawn_blocking(move || {
                realm.read_page_packets(after, PAGE)
            })
            .await
            {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => {
                    tracing::error!(realm = %self.key(), error = %e, "replay read failed; disconnecting device");
                    link::cut(&sock, Why::ReadFailed);
                    return;
                }
                Err(_) => return,
            };
            let Some(last) = page.last().map(|(seq, _)| *seq) else {
                break;
            };
            if page[0].0 != after + 1 {
                // Retention deleted events after the handshake's check: no silent gap;
                // the device reconnects and is told cursor_expired.
                tracing::info!(realm = %self.key(), after, next = page[0].0, "replay would skip pruned events; disconnecting device");
                link::cut(&sock, Why::ReadFailed);
                return;
            }
            if !send_waiting(&sock, page.iter().map(|(_, p)| p)).await {
                return;
            }
            after = last;
        }
        let _ = self.fan_tx.send(Fan::Join {
            sock,
            after: Some(after),
        });
    }

    /// Reads one page as ready-to-send `event` packets.
    fn read_page_packets(&self, after: u64, limit: usize) -> Result<Vec<(u64, Packet)>, LogError> {
        let upto = self.fanned_seq.load(Ordering::Acquire);
        self.with_reader(|r| {
            let mut out = Vec::with_capacity(limit.min(PAGE));
            r.read_page(after, upto, limit, |seq, json| {
                out.push((seq, link::str_of(sio::event("event", &json))))
            })?;
            Ok(out)
        })
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

/// Read-only connections a realm keeps open between reads.
const READERS: usize = 4;
/// How long a pooled reader may stay unused before it is closed.
pub const READER_IDLE: Duration = Duration::from_secs(30);

/// How many packets of a catch-up may wait in a device's queue (each a copy of its
/// own, unlike the fan-out's shared ones).
const CATCH_UP_AHEAD: usize = 8192;

/// How long a catching-up device may take nothing before it is cut.
const STALL: Duration = Duration::from_secs(10);

/// Queues `packets` in order, waiting while the device's queue is full. Returns
/// false if the device is gone or was cut for taking nothing for [`STALL`].
async fn send_waiting<'a>(sock: &Sock, packets: impl Iterator<Item = &'a Packet> + Clone) -> bool {
    let mut rest = packets;
    let mut stalled_since: Option<Instant> = None;
    loop {
        match link::try_send_paced(sock, rest.clone(), CATCH_UP_AHEAD) {
            Ok(_) => return true,
            Err((n, link::SendError::Full)) => {
                if n > 0 {
                    stalled_since = None;
                    for _ in 0..n {
                        rest.next();
                    }
                }
                let since = *stalled_since.get_or_insert_with(Instant::now);
                if since.elapsed() > STALL {
                    link::cut(sock, Why::CatchUpStalled);
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err((_, link::SendError::Closed)) => return false,
        }
    }
}

struct Live {
    sid: Sid,
    sock: Sock,
}

struct FanOut {
    reader: Store,
    live: Vec<Live>,
    fanned: Arc<AtomicU64>,
    /// Sent in every `synced`.
    log_id: Option<Arc<str>>,
}

impl FanOut {
    fn run(mut self, rx: Receiver<Fan>) {
        for msg in rx {
            match msg {
                Fan::Batch(batch) => self.batch(batch),
                Fan::Join { sock, after } => self.join(sock, after),
                Fan::Leave(sid) => self.live.retain(|l| l.sid != sid),
                Fan::Notice(packet) => {
                    let mut gone = Vec::new();
                    for l in &self.live {
                        if let Err(e) = link::try_send(&l.sock, packet.clone()) {
                            gone.push((l.sid, e));
                        }
                    }
                    self.drop_gone(gone);
                }
                Fan::Close => break,
            }
        }
        self.live.clear();
    }

    fn batch(&mut self, batch: Vec<Committed<Tag>>) {
        // Encode each event once, as the whole Socket.IO packet; every socket gets
        // the same bytes.
        let mut buf = String::with_capacity(
            batch
                .iter()
                .map(|c| {
                    let e = &c.event;
                    112 + e.id().len() + e.typ().len() + e.payload().len() + c.device.len()
                })
                .sum(),
        );
        let mut ends = Vec::with_capacity(batch.len());
        for c in &batch {
            let e = &c.event;
            sio::event_start(&mut buf, "event");
            encode_stored_into(
                &mut buf,
                c.seq,
                e.id(),
                e.typ(),
                e.payload(),
                &c.device,
                e.ts(),
                c.hub_ts,
                c.origin,
            );
            sio::event_end(&mut buf);
            ends.push(buf.len());
        }
        let packets = link::Batch::new(
            batch
                .iter()
                .map(|c| c.tag)
                .zip(link::strs_of(buf, &ends))
                .collect(),
        );
        // Socket by socket, the whole batch at once, shared: its writer wakes once
        // and writes the batch (but the socket's own events) in one go. A socket
        // whose queue is full is cut; the others never wait for it.
        let mut gone = Vec::new();
        for l in &self.live {
            if let Err(e) = link::try_send_batch(&l.sock, &packets) {
                gone.push((l.sid, e));
            }
        }
        self.drop_gone(gone);
        if let Some(c) = batch.last() {
            self.fanned.store(c.seq, Ordering::Release);
        }
    }

    fn drop_gone(&mut self, gone: Vec<(Sid, link::SendError)>) {
        for (sid, e) in gone {
            if let Some(i) = self.live.iter().position(|l| l.sid == sid) {
                let l = self.live.swap_remove(i);
                if e == link::SendError::Full {
                    link::cut(&l.sock, Why::QueueFull);
                }
            }
        }
    }

    fn join(&mut self, sock: Sock, after: Option<u64>) {
        let head = self.fanned.load(Ordering::Acquire);
        if let Some(after) = after {
            // The last few events (at most TAIL, and whatever the fan-out sent
            // meanwhile): without waiting, or the device is cut.
            let mut from = after;
            while from < head {
                let mut page = Vec::new();
                let r = self.reader.read_page(from, head, PAGE, |seq, json| {
                    page.push(link::str_of(sio::event("event", &json)));
                    from = seq;
                });
                match r {
                    Ok(0) => break,
                    Ok(_) => match link::try_send_all(&sock, page.iter()) {
                        Ok(_) => {}
                        Err((_, e)) => {
                            if e == link::SendError::Full {
                                link::cut(&sock, Why::QueueFull);
                            }
                            return;
                        }
                    },
                    Err(e) => {
                        tracing::error!(error = %e, "catch-up read failed; disconnecting device");
                        link::cut(&sock, Why::ReadFailed);
                        return;
                    }
                }
            }
        }
        let mut synced = String::with_capacity(32);
        sio::event_start(&mut synced, "synced");
        synced.push_str("{\"seq\":");
        sio::push_u64(&mut synced, head);
        if let Some(id) = &self.log_id {
            synced.push_str(",\"logId\":");
            crate::log::event::push_json_str(&mut synced, id);
        }
        synced.push('}');
        sio::event_end(&mut synced);
        match link::try_send(&sock, link::str_of(synced)) {
            Ok(()) => {
                sock.data.live.store(true, Ordering::Release);
                self.live.push(Live { sid: sock.id, sock });
            }
            Err(link::SendError::Full) => link::cut(&sock, Why::QueueFull),
            Err(link::SendError::Closed) => {}
        }
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
        retention: Retention,
    ) -> Result<Self, LogError> {
        let mut list = Vec::new();
        let mut by_key = HashMap::new();
        for c in cfgs {
            let r = Realm::open(c.clone(), data_dir, max_batch, retention)?;
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

    /// The realm and its index in the list (the index is what a connection keeps).
    pub fn find(&self, tenant: &str, store: &str) -> Option<(usize, &Arc<Realm>)> {
        if self.list.len() == 1 {
            let r = &self.list[0];
            return (r.cfg.tenant_id == tenant && r.cfg.store_id == store).then_some((0, r));
        }
        let r = self.by_key.get(&(tenant.to_string(), store.to_string()))?;
        let i = self.list.iter().position(|x| Arc::ptr_eq(x, r))?;
        Some((i, r))
    }

    /// The realm at `index` (from [`Realms::find`]).
    pub fn at(&self, index: usize) -> Option<&Arc<Realm>> {
        self.list.get(index)
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
    fn acks_are_the_json_devices_expect() {
        let cases = [
            (
                Outcome::Stored(7),
                r#"{"ok":true,"seq":7,"duplicate":false}"#,
            ),
            (
                Outcome::Duplicate(3),
                r#"{"ok":true,"seq":3,"duplicate":true}"#,
            ),
        ];
        for (o, want) in cases {
            let mut s = String::new();
            push_outcome(&mut s, &o);
            assert_eq!(s, want);
            let v: serde_json::Value = serde_json::from_str(&s).unwrap();
            assert_eq!(v["ok"], true);
        }
        let mut s = String::new();
        push_outcome(&mut s, &Outcome::Rejected(EventError::BadId));
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["ok"], false);
        assert_eq!(v["error"]["code"], "invalid_id");
    }

    #[test]
    fn raw_json_serializes_verbatim() {
        let s = serde_json::to_string(&(RawJson(r#"{"a":[1,"x"]}"#),)).unwrap();
        assert_eq!(s, r#"[{"a":[1,"x"]}]"#);
    }
}
