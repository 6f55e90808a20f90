//! `pos-cloud-ref`: a reference implementation of the cloud API the hub's bridge
//! speaks (`hub/api/cloud-api.yaml`), on its own SQLite database, for tests and for
//! anyone developing a client. It can inject faults on demand (`POST
//! /v1/admin/faults`): refuse connections, 500, 429 with Retry-After, hang, reset
//! the connection after committing a batch but before answering, answer slowly.
//!
//! `pos-cloud-ref --listen 127.0.0.1:0 --db cloud.db --token T [--reject-type TYPE]`
//! prints `listening on http://127.0.0.1:<port>` once ready; SIGTERM stops it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use rusqlite::{params, Connection, OptionalExtension};
use serde::Deserialize;
use serde_json::{json, value::RawValue, Value};
use tokio::sync::Notify;
use tower::ServiceExt;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    #[arg(long)]
    db: PathBuf,
    /// Accepted bearer tokens (repeatable).
    #[arg(long, required = true)]
    token: Vec<String>,
    /// Event types the cloud rejects (per event), so tests can exercise set-aside.
    #[arg(long)]
    reject_type: Vec<String>,
    #[arg(long)]
    allow_non_loopback: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Fault {
    #[serde(default)]
    mode: String,
    #[serde(default)]
    count: Option<u64>,
    #[serde(default)]
    retry_after: Option<u64>,
    #[serde(default)]
    delay_ms: Option<u64>,
    #[serde(default)]
    target: Option<String>,
}

struct App {
    db: Mutex<Connection>,
    tokens: Vec<String>,
    reject: Vec<String>,
    fault: Mutex<Fault>,
    wake: Mutex<HashMap<String, Arc<Notify>>>,
    stats: Mutex<HashMap<String, u64>>,
}

/// Set by a handler to drop its connection without answering.
#[derive(Clone)]
struct Abort(Arc<Notify>);

fn realm_key(t: &str, s: &str) -> String {
    format!("{t}:{s}")
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

impl App {
    fn bump(&self, k: &str) {
        *self.stats.lock().unwrap().entry(k.to_string()).or_default() += 1;
    }
    fn wake_for(&self, realm: &str) -> Arc<Notify> {
        self.wake
            .lock()
            .unwrap()
            .entry(realm.to_string())
            .or_default()
            .clone()
    }
    /// Takes one fault for `target` (ingest or feed), if armed.
    fn take_fault(&self, target: &str) -> Option<Fault> {
        let mut f = self.fault.lock().unwrap();
        if f.mode.is_empty() || f.mode == "none" {
            return None;
        }
        let t = f.target.clone().unwrap_or_else(|| "ingest".into());
        if t != target && t != "both" {
            return None;
        }
        let out = f.clone();
        if let Some(c) = f.count.as_mut() {
            *c = c.saturating_sub(1);
            if *c == 0 {
                *f = Fault::default();
            }
        }
        Some(out)
    }
    fn authorized(&self, h: &HeaderMap) -> bool {
        h.get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| self.tokens.iter().any(|k| k == t))
    }
}

fn err(code: StatusCode, msg: &str) -> Response {
    (code, Json(json!({"error": msg}))).into_response()
}

/// Applies a fault before (or, for reset_after_commit, after) the real work.
async fn pre_fault(app: &App, target: &str, abort: &Abort) -> Result<Option<Fault>, Response> {
    let Some(f) = app.take_fault(target) else {
        return Ok(None);
    };
    app.bump(&format!("fault_{}", f.mode));
    match f.mode.as_str() {
        "refuse" => {
            abort.0.notify_one();
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Err(err(StatusCode::SERVICE_UNAVAILABLE, "refused"))
        }
        "error500" => Err(err(StatusCode::INTERNAL_SERVER_ERROR, "injected fault")),
        "rate_limit" => Err((
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", f.retry_after.unwrap_or(1).to_string())],
            Json(json!({"error": "rate limited"})),
        )
            .into_response()),
        "hang" => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Err(err(StatusCode::GATEWAY_TIMEOUT, "hung"))
        }
        "slow" => {
            tokio::time::sleep(Duration::from_millis(f.delay_ms.unwrap_or(1000))).await;
            Ok(None)
        }
        "reset_after_commit" => Ok(Some(f)),
        _ => Ok(None),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct IngestBody<'a> {
    tenant_id: String,
    store_id: String,
    #[serde(borrow)]
    events: Vec<&'a RawValue>,
}

async fn ingest(State(app): State<Arc<App>>, req: Request<Body>) -> Response {
    let abort = req
        .extensions()
        .get::<Abort>()
        .cloned()
        .unwrap_or(Abort(Arc::new(Notify::new())));
    app.bump("ingest_requests");
    if !app.authorized(req.headers()) {
        app.bump("status_401");
        return err(StatusCode::UNAUTHORIZED, "unauthorized");
    }
    let Some(key) = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(String::from)
    else {
        return err(StatusCode::BAD_REQUEST, "Idempotency-Key header required");
    };
    let fault = match pre_fault(&app, "ingest", &abort).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let bytes = match axum::body::to_bytes(req.into_body(), 1 << 20).await {
        Ok(b) => b,
        Err(_) => return err(StatusCode::PAYLOAD_TOO_LARGE, "batch larger than 1 MiB"),
    };
    let body: IngestBody = match serde_json::from_slice(&bytes) {
        Ok(b) => b,
        Err(e) => return err(StatusCode::BAD_REQUEST, &format!("bad body: {e}")),
    };
    if body.events.len() > 500 {
        return err(StatusCode::PAYLOAD_TOO_LARGE, "more than 500 events");
    }
    let realm = realm_key(&body.tenant_id, &body.store_id);
    let response = {
        let mut db = app.db.lock().unwrap();
        if let Some(prev) = db
            .query_row("SELECT response FROM idem WHERE key = ?1", [&key], |r| {
                r.get::<_, String>(0)
            })
            .optional()
            .unwrap_or(None)
        {
            drop(db);
            app.bump("idempotent_replays");
            return (StatusCode::OK, [("content-type", "application/json")], prev).into_response();
        }
        let tx = match db.transaction() {
            Ok(t) => t,
            Err(e) => return err(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        };
        let mut results = Vec::new();
        let mut next = next_cloud_seq(&tx, &realm);
        for raw in &body.events {
            let v: Value = serde_json::from_str(raw.get()).unwrap_or(Value::Null);
            let seq = v["seq"].as_u64();
            let id = v["id"].as_str().unwrap_or("").to_string();
            let typ = v["type"].as_str().unwrap_or("").to_string();
            let reason = if !valid_id(&id) {
                Some("invalid id")
            } else if typ.is_empty() || v.get("payload").is_none() {
                Some("missing type or payload")
            } else if v["origin"].as_str() != Some("lan") {
                Some("origin must be lan")
            } else if app.reject.contains(&typ) {
                Some("type refused by this cloud")
            } else {
                None
            };
            let status = match reason {
                Some(r) => {
                    results.push(json!({"seq": seq, "id": id, "status": "rejected", "reason": r}));
                    continue;
                }
                None => {
                    let n = tx
                        .execute(
                            "INSERT INTO events(realm, cloud_seq, hub_seq, id, type, payload, device_id, ts, origin)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'lan') ON CONFLICT(realm, id) DO NOTHING",
                            params![
                                realm,
                                next,
                                seq.map(|s| s as i64),
                                id,
                                typ,
                                v["payload"].to_string(),
                                v["deviceId"].as_str().unwrap_or(""),
                                v["ts"].to_string()
                            ],
                        )
                        .unwrap_or(0);
                    if n == 1 {
                        next += 1;
                        "accepted"
                    } else {
                        app.bump("duplicates");
                        "duplicate"
                    }
                }
            };
            results.push(json!({"seq": seq, "id": id, "status": status}));
        }
        let resp = json!({"results": results}).to_string();
        let _ = tx.execute(
            "INSERT INTO idem(key, response) VALUES (?1, ?2)",
            params![key, resp],
        );
        if let Err(e) = tx.commit() {
            return err(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string());
        }
        resp
    };
    app.wake_for(&realm).notify_waiters();
    if fault.is_some() {
        // Committed; now drop the connection without answering.
        abort.0.notify_one();
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    app.bump("status_200");
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        response,
    )
        .into_response()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FeedQuery {
    tenant_id: String,
    store_id: String,
    #[serde(default)]
    cursor: Option<String>,
    #[serde(default)]
    limit: Option<u32>,
    #[serde(default)]
    wait: Option<u64>,
}

async fn feed(
    State(app): State<Arc<App>>,
    Query(q): Query<FeedQuery>,
    req: Request<Body>,
) -> Response {
    let abort = req
        .extensions()
        .get::<Abort>()
        .cloned()
        .unwrap_or(Abort(Arc::new(Notify::new())));
    if !app.authorized(req.headers()) {
        return err(StatusCode::UNAUTHORIZED, "unauthorized");
    }
    if let Err(r) = pre_fault(&app, "feed", &abort).await {
        return r;
    }
    let after: i64 = match q.cursor.as_deref() {
        None | Some("") => 0,
        Some(c) => match c.parse() {
            Ok(v) => v,
            Err(_) => return err(StatusCode::BAD_REQUEST, "bad cursor"),
        },
    };
    let limit = q.limit.unwrap_or(500).clamp(1, 1000);
    let realm = realm_key(&q.tenant_id, &q.store_id);
    let wake = app.wake_for(&realm);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(q.wait.unwrap_or(0).min(30));
    loop {
        let notified = wake.notified();
        let rows: Vec<Value> = {
            let db = app.db.lock().unwrap();
            let mut st = db
                .prepare_cached(
                    "SELECT cloud_seq, id, type, payload, device_id, ts FROM events WHERE realm = ?1 AND cloud_seq > ?2 ORDER BY cloud_seq LIMIT ?3",
                )
                .expect("prepare");
            st.query_map(params![realm, after, limit], |r| {
                let cs: i64 = r.get(0)?;
                let payload: String = r.get(3)?;
                let ts: String = r.get(5)?;
                Ok(json!({
                    "id": r.get::<_, String>(1)?, "type": r.get::<_, String>(2)?,
                    "payload": serde_json::from_str::<Value>(&payload).unwrap_or(Value::Null),
                    "deviceId": r.get::<_, String>(4)?,
                    "ts": serde_json::from_str::<Value>(&ts).unwrap_or(Value::Null),
                    "cursor": cs.to_string(),
                }))
            })
            .map(|it| it.filter_map(Result::ok).collect())
            .unwrap_or_default()
        };
        if !rows.is_empty() || tokio::time::Instant::now() >= deadline {
            let cursor = rows
                .last()
                .map(|r| r["cursor"].clone())
                .unwrap_or(json!(after.to_string()));
            app.bump("feed_pages");
            return Json(json!({"events": rows, "cursor": cursor})).into_response();
        }
        let _ = tokio::time::timeout_at(deadline, notified).await;
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CloudEvents {
    tenant_id: String,
    store_id: String,
    events: Vec<Value>,
}

/// The cloud seq the realm's next stored event gets.
fn next_cloud_seq(tx: &rusqlite::Transaction, realm: &str) -> i64 {
    tx.query_row(
        "SELECT COALESCE(MAX(cloud_seq), 0) + 1 FROM events WHERE realm = ?1",
        [realm],
        |r| r.get(0),
    )
    .unwrap_or(1)
}

async fn add_cloud_events(State(app): State<Arc<App>>, Json(b): Json<CloudEvents>) -> Response {
    let realm = realm_key(&b.tenant_id, &b.store_id);
    let mut added = 0;
    {
        let mut db = app.db.lock().unwrap();
        let tx = db.transaction().expect("tx");
        let mut next = next_cloud_seq(&tx, &realm);
        for e in &b.events {
            let n = tx
                .execute(
                    "INSERT INTO events(realm, cloud_seq, hub_seq, id, type, payload, device_id, ts, origin)
                     VALUES (?1, ?2, NULL, ?3, ?4, ?5, ?6, ?7, 'cloud') ON CONFLICT(realm, id) DO NOTHING",
                    params![
                        realm,
                        next,
                        e["id"].as_str().unwrap_or(""),
                        e["type"].as_str().unwrap_or(""),
                        e.get("payload").map(|p| p.to_string()).unwrap_or("null".into()),
                        e["deviceId"].as_str().unwrap_or("cloud-backoffice"),
                        e.get("ts").map(|p| p.to_string()).unwrap_or("null".into())
                    ],
                )
                .unwrap_or(0);
            if n == 1 {
                next += 1;
                added += 1;
            }
        }
        tx.commit().expect("commit");
    }
    app.wake_for(&realm).notify_waiters();
    Json(json!({"added": added})).into_response()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RealmQ {
    tenant_id: String,
    store_id: String,
}

async fn list_events(State(app): State<Arc<App>>, Query(q): Query<RealmQ>) -> Response {
    let realm = realm_key(&q.tenant_id, &q.store_id);
    let db = app.db.lock().unwrap();
    let mut st = db
        .prepare("SELECT cloud_seq, hub_seq, id, type, payload, device_id, origin FROM events WHERE realm = ?1 ORDER BY cloud_seq")
        .expect("prepare");
    let rows: Vec<Value> = st
        .query_map([&realm], |r| {
            let payload: String = r.get(4)?;
            Ok(json!({"cloudSeq": r.get::<_, i64>(0)?, "seq": r.get::<_, Option<i64>>(1)?, "id": r.get::<_, String>(2)?,
                "type": r.get::<_, String>(3)?, "payload": serde_json::from_str::<Value>(&payload).unwrap_or(Value::Null),
                "deviceId": r.get::<_, String>(5)?, "origin": r.get::<_, String>(6)?}))
        })
        .map(|it| it.filter_map(Result::ok).collect())
        .unwrap_or_default();
    Json(json!({"events": rows})).into_response()
}

async fn set_fault(State(app): State<Arc<App>>, Json(f): Json<Fault>) -> Response {
    let known = [
        "none",
        "refuse",
        "error500",
        "rate_limit",
        "hang",
        "reset_after_commit",
        "slow",
    ];
    if !known.contains(&f.mode.as_str()) {
        return err(StatusCode::BAD_REQUEST, "unknown mode");
    }
    *app.fault.lock().unwrap() = f;
    Json(json!({"ok": true})).into_response()
}

async fn stats(State(app): State<Arc<App>>) -> Response {
    Json(json!(app.stats.lock().unwrap().clone())).into_response()
}

fn open_db(path: &PathBuf) -> rusqlite::Result<Connection> {
    let c = Connection::open(path)?;
    c.pragma_update(None, "journal_mode", "WAL")?;
    c.pragma_update(None, "synchronous", "FULL")?;
    c.execute_batch(
        "CREATE TABLE IF NOT EXISTS events(realm TEXT NOT NULL, cloud_seq INTEGER NOT NULL, hub_seq INTEGER, id TEXT NOT NULL,
           type TEXT NOT NULL, payload TEXT NOT NULL, device_id TEXT NOT NULL, ts TEXT, origin TEXT NOT NULL,
           PRIMARY KEY(realm, cloud_seq), UNIQUE(realm, id));
         CREATE TABLE IF NOT EXISTS idem(key TEXT PRIMARY KEY, response TEXT NOT NULL);",
    )?;
    Ok(c)
}

#[tokio::main]
async fn main() {
    let a = Args::parse();
    if !a.listen.ip().is_loopback() && !a.allow_non_loopback {
        eprintln!("pos-cloud-ref: refusing to listen on {} (loopback only; --allow-non-loopback to override)", a.listen);
        std::process::exit(2);
    }
    let db = match open_db(&a.db) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("pos-cloud-ref: cannot open {}: {e}", a.db.display());
            std::process::exit(1);
        }
    };
    let app = Arc::new(App {
        db: Mutex::new(db),
        tokens: a.token,
        reject: a.reject_type,
        fault: Mutex::new(Fault::default()),
        wake: Mutex::new(HashMap::new()),
        stats: Mutex::new(HashMap::new()),
    });
    let router = Router::new()
        .route("/v1/events/ingest", post(ingest))
        .route("/v1/events/feed", get(feed))
        .route("/v1/admin/cloud-events", post(add_cloud_events))
        .route("/v1/admin/events", get(list_events))
        .route("/v1/admin/faults", post(set_fault))
        .route("/v1/admin/stats", get(stats))
        .with_state(app);
    let listener = match tokio::net::TcpListener::bind(a.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("pos-cloud-ref: cannot listen on {}: {e}", a.listen);
            std::process::exit(1);
        }
    };
    let addr = listener.local_addr().expect("local addr");
    println!("listening on http://{addr}");
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM");
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
            _ = term.recv() => break,
        };
        let router = router.clone();
        tokio::spawn(async move {
            let abort = Abort(Arc::new(Notify::new()));
            let a2 = abort.clone();
            let svc = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(a2.clone());
                let router = router.clone();
                async move { router.oneshot(req.map(Body::new)).await }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = abort.0.notified() => {} // dropped: the client sees the connection close
            }
        });
    }
}
