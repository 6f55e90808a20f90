//! HTTP routes beside Socket.IO: `/healthz` for monitors and the old runbook's
//! `curl`, `/status` for operators. Never any event contents.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::auth::token;
use crate::auth::Policy;
use crate::realm::{DeviceEntry, Realms};

/// Shared state of the HTTP routes.
pub struct Web {
    pub realms: Arc<Realms>,
    pub policy: Policy,
    pub started: Instant,
    /// The store CA (PEM) and its SHA-256 fingerprint, when TLS is on.
    pub ca_pem: Option<String>,
    pub ca_fingerprint: Option<String>,
    pub clock: Arc<crate::clock::Clock>,
    /// The UPS watcher, when configured.
    pub power: Arc<parking_lot::Mutex<Option<Arc<crate::power::Power>>>>,
    /// The data directory (its partition's fill is reported in /status).
    pub data_dir: std::path::PathBuf,
    /// The OTA update agent.
    pub updater: Arc<crate::update::Updater>,
    /// No realm yet: `/` sends people to `/setup`.
    pub unclaimed: bool,
    /// Per realm: (UTC day, last seq before that day), for "events today".
    pub day_marks: parking_lot::Mutex<std::collections::HashMap<String, (i64, u64)>>,
    /// Outbox samples and events per hour for the status page's charts.
    pub history: crate::ops::history::History,
    /// Where the hub's and init's log files are.
    pub log_dir: crate::ops::logs::LogDir,
    /// Open `GET /admin/logs?follow=1` streams (bounded by [`MAX_FOLLOWERS`]).
    pub followers: std::sync::atomic::AtomicUsize,
    /// The cloud bridge's state of each realm that has one, by realm key.
    pub bridges: std::collections::HashMap<String, Arc<crate::bridge::BridgeState>>,
}

impl Web {
    /// The cloud bridge of realm `r`, when it has one.
    fn bridge(&self, r: &crate::realm::Realm) -> Option<&Arc<crate::bridge::BridgeState>> {
        self.bridges.get(&r.key())
    }
}

/// At most this many log followers at once.
pub const MAX_FOLLOWERS: usize = 16;
/// The data partition counts as nearly full below this share free (the page warns).
pub const DISK_LOW_FRACTION: f64 = 0.10;

/// LAN events of realm `r` not yet accepted by the cloud.
fn outbox_depth(web: &Web, r: &crate::realm::Realm) -> u64 {
    r.stats.lan_events.load(Ordering::Relaxed).saturating_sub(
        web.bridge(r)
            .map(|b| b.pushed_lan.load(Ordering::Relaxed))
            .unwrap_or(0),
    )
}

/// Samples every realm's outbox depth for the status page (runs for the hub's life).
pub async fn sample_loop(web: Arc<Web>) {
    let mut every = tokio::time::interval(crate::ops::history::SAMPLE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let now = crate::util::now_ms();
        for r in web.realms.iter() {
            web.history.sample(&r.key(), now, outbox_depth(&web, r));
            r.close_idle_readers();
        }
        // Freed memory goes back to the kernel instead of staying as a high-water mark.
        let _ = tokio::task::spawn_blocking(crate::allocs::trim).await;
    }
}

/// Events stored since midnight (UTC) in realm `r`.
fn events_today(web: &Web, r: &crate::realm::Realm) -> u64 {
    let last = r.stats.last_seq.load(Ordering::Relaxed);
    last.saturating_sub(day_mark(web, r).1)
}

/// Today (UTC days since the epoch) and the last seq stored before it in realm `r`.
fn day_mark(web: &Web, r: &crate::realm::Realm) -> (i64, u64) {
    let now_ms = web.clock.now_secs() * 1000;
    let day = now_ms.div_euclid(86_400_000);
    let key = r.key();
    let cached = web.day_marks.lock().get(&key).copied();
    let before = match cached {
        Some((d, seq)) if d == day => seq,
        _ => {
            let seq = r
                .with_reader(|s| s.last_seq_before(day * 86_400_000))
                .unwrap_or(0);
            web.day_marks.lock().insert(key, (day, seq));
            seq
        }
    };
    (day, before)
}

/// Prometheus metrics (text format 0.0.4), for localhost or an admin token.
async fn metrics(State(web): State<Arc<Web>>, _admin: Admin) -> Response {
    let w = web.clone();
    let m = tokio::task::spawn_blocking(move || metrics_text(&w))
        .await
        .unwrap_or_default();
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        m,
    )
        .into_response()
}

/// The text of `/metrics` (reads the realms' databases for the bridge lag).
fn metrics_text(web: &Web) -> String {
    use std::fmt::Write;
    let mut m = String::new();
    let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, f64)>| {
        let _ = writeln!(m, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in rows {
            let _ = writeln!(m, "{name}{labels} {v}");
        }
    };
    let realms: Vec<_> = web.realms.iter().cloned().collect();
    let lbl = |r: &crate::realm::Realm| {
        format!(
            "{{tenant=\"{}\",store=\"{}\"}}",
            r.cfg.tenant_id, r.cfg.store_id
        )
    };
    family(
        "poshub_up",
        "gauge",
        "1 while the hub serves",
        vec![(String::new(), 1.0)],
    );
    if let Some(n) = crate::allocs::total() {
        family(
            "poshub_heap_allocations_total",
            "counter",
            "Heap allocations by the hub process so far",
            vec![(String::new(), n as f64)],
        );
    }
    if let Some((in_use, free)) = crate::allocs::heap() {
        family(
            "poshub_heap_in_use_bytes",
            "gauge",
            "Heap bytes allocated and not yet freed",
            vec![(String::new(), in_use as f64)],
        );
        family(
            "poshub_heap_free_bytes",
            "gauge",
            "Heap bytes freed but still held by the allocator",
            vec![(String::new(), free as f64)],
        );
    }
    family(
        "poshub_uptime_seconds",
        "gauge",
        "Seconds since the hub started",
        vec![(String::new(), web.started.elapsed().as_secs_f64())],
    );
    family(
        "poshub_events_last_seq",
        "counter",
        "Highest event seq stored per realm",
        realms
            .iter()
            .map(|r| (lbl(r), r.stats.last_seq.load(Ordering::Relaxed) as f64))
            .collect(),
    );
    family(
        "poshub_events_today",
        "gauge",
        "Events stored since midnight UTC per realm",
        realms
            .iter()
            .map(|r| (lbl(r), events_today(web, r) as f64))
            .collect(),
    );
    family(
        "poshub_devices_connected",
        "gauge",
        "Connected devices per realm",
        realms
            .iter()
            .map(|r| (lbl(r), r.devices().len() as f64))
            .collect(),
    );
    family(
        "poshub_outbox_depth",
        "gauge",
        "LAN events not yet accepted by the cloud",
        realms
            .iter()
            .map(|r| (lbl(r), outbox_depth(web, r) as f64))
            .collect(),
    );
    family(
        "poshub_realm_healthy",
        "gauge",
        "1 when the realm's database answers",
        realms
            .iter()
            .map(|r| (lbl(r), r.stats.healthy.load(Ordering::Relaxed) as u8 as f64))
            .collect(),
    );
    family(
        "poshub_storage_full",
        "gauge",
        "1 while the data partition is full and events are refused (storage_full)",
        realms
            .iter()
            .map(|r| (lbl(r), r.storage_full() as u8 as f64))
            .collect(),
    );
    family(
        "poshub_events_oldest_seq",
        "gauge",
        "Oldest event seq still stored per realm (retention deletes older ones)",
        realms
            .iter()
            .map(|r| (lbl(r), r.oldest_seq().unwrap_or(0) as f64))
            .collect(),
    );
    family(
        "poshub_db_bytes",
        "gauge",
        "Bytes of the realm's database on disk (main file and WAL)",
        realms
            .iter()
            .map(|r| (lbl(r), r.db_bytes() as f64))
            .collect(),
    );
    let sys = crate::system::status(&web.data_dir);
    if let (Some(total), Some(free)) = (sys.data_bytes_total, sys.data_bytes_free) {
        family(
            "poshub_data_bytes_total",
            "gauge",
            "Size of the data partition",
            vec![(String::new(), total as f64)],
        );
        family(
            "poshub_data_bytes_free",
            "gauge",
            "Bytes free on the data partition (for unprivileged writers)",
            vec![(String::new(), free as f64)],
        );
        family(
            "poshub_data_fill_warning",
            "gauge",
            "1 once the data partition is more than 80% full",
            vec![(String::new(), sys.data_warning.is_some() as u8 as f64)],
        );
    }
    let clock = serde_json::to_value(web.clock.status()).unwrap_or_default();
    family(
        "poshub_clock_synced",
        "gauge",
        "1 when the clock is synced to a time source",
        vec![(
            String::new(),
            (clock.get("state").and_then(|v| v.as_str()) == Some("synced")) as u8 as f64,
        )],
    );
    let power = web
        .power
        .lock()
        .as_ref()
        .map(|p| serde_json::to_value(p.status.lock().clone()).unwrap_or_default());
    if let Some(p) = power {
        family(
            "poshub_power_on_battery",
            "gauge",
            "1 while the UPS runs on battery",
            vec![(
                String::new(),
                p.get("onBatterySinceMs").is_some_and(|v| !v.is_null()) as u8 as f64,
            )],
        );
    }
    let u = web.updater.status();
    family(
        "poshub_update_trial",
        "gauge",
        "1 during a trial boot of a new version",
        vec![(
            String::new(),
            u.get("trial").and_then(|v| v.as_bool()).unwrap_or(false) as u8 as f64,
        )],
    );
    family(
        "poshub_update_failed_versions",
        "gauge",
        "Versions that failed their trial here",
        vec![(
            String::new(),
            u.get("badVersions")
                .and_then(|v| v.as_array())
                .map(|a| a.len())
                .unwrap_or(0) as f64,
        )],
    );
    family(
        "poshub_info",
        "gauge",
        "Version and slot",
        vec![(
            format!(
                "{{version=\"{}\",slot=\"{}\"}}",
                web.updater.running_version,
                u.get("bootedSlot").and_then(|v| v.as_str()).unwrap_or("")
            ),
            1.0,
        )],
    );
    let rlbl = |r: &crate::realm::Realm, k: &str, v: &str| {
        format!(
            "{{tenant=\"{}\",store=\"{}\",{k}=\"{v}\"}}",
            r.cfg.tenant_id, r.cfg.store_id
        )
    };
    family(
        "poshub_events_total",
        "counter",
        "Events stored per realm, by origin (lan: from the store's devices, cloud: from the feed)",
        realms
            .iter()
            .flat_map(|r| {
                let all = r.stats.last_seq.load(Ordering::Relaxed);
                let lan = r.stats.lan_events.load(Ordering::Relaxed);
                [
                    (rlbl(r, "origin", "lan"), lan as f64),
                    (rlbl(r, "origin", "cloud"), all.saturating_sub(lan) as f64),
                ]
            })
            .collect(),
    );
    let now_ms = crate::util::now_ms();
    family(
        "poshub_bridge_push_lag_seconds",
        "gauge",
        "Age of the oldest LAN event the cloud has not accepted yet (0 when the outbox is empty)",
        realms
            .iter()
            .filter_map(|r| {
                let b = web.bridge(r)?;
                let cursor = b.pushed_cursor.load(Ordering::Relaxed);
                let oldest = if outbox_depth(web, r) == 0 {
                    None
                } else {
                    r.with_reader(|s| s.oldest_lan_after(cursor)).ok().flatten()
                };
                let lag = oldest.map(|t| (now_ms - t).max(0) as f64 / 1000.0);
                Some((lbl(r), lag.unwrap_or(0.0)))
            })
            .collect(),
    );
    crate::metrics::render(&mut m);
    m
}

pub fn router(web: Arc<Web>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/healthz", get(healthz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/status/charts", get(charts))
        .route("/admin/logs", get(admin_logs))
        .route("/admin/support-bundle", get(admin_support_bundle))
        .route("/ca.crt", get(ca_crt))
        .route("/admin/reboot", axum::routing::post(admin_reboot))
        .route("/admin/poweroff", axum::routing::post(admin_poweroff))
        .route("/admin/reset", axum::routing::post(admin_reset))
        .route("/admin/update", get(admin_update_status))
        .route(
            "/admin/update/check",
            axum::routing::post(admin_update_check),
        )
        .route(
            "/admin/update/install",
            axum::routing::post(admin_update_install),
        )
        .route(
            "/admin/update/rollback",
            axum::routing::post(admin_update_rollback),
        )
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(web)
}

/// The live status page for the store admin (no external resources; it polls
/// /status with the admin token kept in the browser). An unclaimed box sends people to
/// its setup page.
async fn index(State(web): State<Arc<Web>>) -> Response {
    if web.unclaimed {
        return axum::response::Redirect::temporary("/setup").into_response();
    }
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        include_str!("status_page.html"),
    )
        .into_response()
}

/// 200 `ok` when every realm's database answers a write check; 503 with the reason.
async fn healthz(State(web): State<Arc<Web>>) -> Response {
    let mut problems = Vec::new();
    for r in web.realms.iter() {
        if let Err(e) = r.check().await {
            problems.push(format!("realm {}: {e}", r.key()));
        }
    }
    if problems.is_empty() {
        (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain")],
            "ok\n",
        )
            .into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/plain")],
            format!("{}\n", problems.join("\n")),
        )
            .into_response()
    }
}

/// The store CA certificate, for devices to trust (check its fingerprint against
/// `/status`, the mDNS record or the console before trusting it).
async fn ca_crt(State(web): State<Arc<Web>>) -> Response {
    match &web.ca_pem {
        Some(pem) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/x-pem-file")],
            pem.clone(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "TLS is off on this hub (TLS=off)\n").into_response(),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Status {
    version: String,
    uptime_secs: u64,
    ca_fingerprint: Option<String>,
    tls: bool,
    power: Option<crate::power::PowerStatus>,
    clock: crate::clock::ClockStatus,
    detail: &'static str,
    system: crate::system::SystemStatus,
    update: serde_json::Value,
    realms: Vec<RealmStatus>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RealmStatus {
    tenant_id: String,
    store_id: String,
    /// The log's identity (devices get it in `synced`); new after a factory reset.
    #[serde(skip_serializing_if = "Option::is_none")]
    log_id: Option<String>,
    last_seq: u64,
    outbox_depth: u64,
    pushed_cursor: u64,
    cloud_cursor: Option<String>,
    bridge: serde_json::Value,
    healthy: bool,
    /// The data partition is full: events are refused with `storage_full`.
    storage_full: bool,
    /// The oldest seq still stored (retention deletes older ones).
    #[serde(skip_serializing_if = "Option::is_none")]
    oldest_seq: Option<u64>,
    /// Bytes of the realm's database on disk (main file and WAL).
    db_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_error: Option<String>,
    device_count: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    events_today: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    schema_version: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    devices: Option<Vec<DeviceEntry>>,
}

/// Which realms the caller may see in full: all from localhost, a realm for a
/// valid admin token of that realm.
fn full_detail_for(web: &Web, addr: &SocketAddr, headers: &HeaderMap) -> (bool, Option<String>) {
    if addr.ip().to_canonical().is_loopback() {
        return (true, None);
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if let Some(t) = bearer {
        if let Ok((tenant, store)) = token::peek_realm(t) {
            if let Some(r) = web.realms.get(&tenant, &store) {
                if let Ok(v) = token::verify(&r.cfg.keys, t, web.clock.now_secs(), &web.policy) {
                    if v.expired_by.is_none() && v.claims.role == "admin" {
                        return (false, Some(r.key()));
                    }
                }
            }
        }
    }
    (false, None)
}

async fn status(
    State(web): State<Arc<Web>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Json<Status> {
    let (all, one) = full_detail_for(&web, &addr, &headers);
    Json(build_status(&web, all, one.as_deref()))
}

/// `/status` for a caller who sees every realm (`all`) or realm `one` in full.
fn build_status(web: &Web, all: bool, one: Option<&str>) -> Status {
    let realms = web
        .realms
        .iter()
        .map(|r| {
            let full = all || one == Some(r.key().as_str());
            let devices = r.devices();
            RealmStatus {
                tenant_id: r.cfg.tenant_id.clone(),
                store_id: r.cfg.store_id.clone(),
                log_id: r.log_id.as_deref().map(str::to_string),
                last_seq: r.stats.last_seq.load(Ordering::Relaxed),
                outbox_depth: r.stats.lan_events.load(Ordering::Relaxed).saturating_sub(
                    web.bridge(r).map(|b| b.pushed_lan.load(Ordering::Relaxed)).unwrap_or(0),
                ),
                pushed_cursor: web.bridge(r).map(|b| b.pushed_cursor.load(Ordering::Relaxed)).unwrap_or(0),
                cloud_cursor: web.bridge(r).and_then(|b| b.cloud_cursor.lock().clone()),
                bridge: match web.bridge(r) {
                    Some(b) => {
                        let mut v = serde_json::to_value(b.status()).unwrap_or_default();
                        if !full {
                            v["lastError"] = serde_json::Value::Null;
                        } else if b.set_aside.load(Ordering::Relaxed) > 0 {
                            let list = r.with_reader(|s| s.set_aside_list(50)).unwrap_or_default();
                            v["setAsideEvents"] = list
                                .into_iter()
                                .map(|(seq, id, reason, at)| serde_json::json!({"seq": seq, "id": id, "reason": reason, "at": at}))
                                .collect();
                        }
                        v
                    }
                    None => serde_json::json!({"state": "not_configured"}),
                },
                healthy: r.stats.healthy.load(Ordering::Relaxed),
                storage_full: r.storage_full(),
                oldest_seq: r.oldest_seq(),
                db_bytes: r.db_bytes(),
                last_error: if full {
                    r.stats.last_error.lock().clone()
                } else {
                    None
                },
                device_count: devices.len(),
                events_today: full.then(|| events_today(web, r)),
                schema_version: if full { r.with_reader(|s| s.schema_version()).ok() } else { None },
                devices: full.then_some(devices),
            }
        })
        .collect();
    Status {
        version: web.updater.running_version.clone(),
        uptime_secs: web.started.elapsed().as_secs(),
        ca_fingerprint: web.ca_fingerprint.clone(),
        tls: web.ca_pem.is_some(),
        power: web.power.lock().as_ref().map(|p| p.status.lock().clone()),
        clock: web.clock.status(),
        detail: if all {
            "full"
        } else if one.is_some() {
            "realm"
        } else {
            "summary"
        },
        system: crate::system::status(&web.data_dir),
        update: web.updater.status(),
        realms,
    }
}

/// Whether the caller may act as an administrator: localhost, or an admin token of
/// one of this hub's realms.
fn is_admin(web: &Web, addr: &SocketAddr, headers: &HeaderMap) -> bool {
    let (all, one) = full_detail_for(web, addr, headers);
    all || one.is_some()
}

/// An administrator: localhost, or a caller with an admin token of one of the hub's
/// realms. Handlers that take it answer everyone else 401.
pub struct Admin(pub SocketAddr);

impl axum::extract::FromRequestParts<Arc<Web>> for Admin {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        web: &Arc<Web>,
    ) -> Result<Self, Response> {
        let addr = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0)
            .ok_or_else(unauthorized)?;
        if is_admin(web, &addr, &parts.headers) {
            Ok(Admin(addr))
        } else {
            Err(unauthorized())
        }
    }
}

async fn admin_down(addr: SocketAddr, down: crate::system::Down) -> Response {
    if !crate::system::under_init() {
        return (StatusCode::CONFLICT, Json(serde_json::json!({"error": "not running under pos-hub init: reboot the machine yourself"}))).into_response();
    }
    tracing::warn!(?down, %addr, "administrator asked the box to go down");
    tokio::spawn(async move {
        // Let the answer leave first.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        if let Err(e) = crate::system::request(down) {
            tracing::error!(error = %e, "could not ask init to go down");
        }
    });
    (
        StatusCode::ACCEPTED,
        Json(serde_json::json!({"ok": true, "action": format!("{down:?}").to_lowercase()})),
    )
        .into_response()
}

async fn admin_reboot(Admin(addr): Admin) -> Response {
    admin_down(addr, crate::system::Down::Reboot).await
}

async fn admin_poweroff(Admin(addr): Admin) -> Response {
    admin_down(addr, crate::system::Down::PowerOff).await
}

fn unauthorized() -> Response {
    (StatusCode::UNAUTHORIZED, Json(serde_json::json!({"error": "admin token required (Authorization: Bearer <admin token>)"}))).into_response()
}

/// `?now=1` (install/reboot outside the maintenance window), `?force=1` (reinstall a
/// version that failed here before), `?url=...` (install from a URL instead of the body).
#[derive(serde::Deserialize, Default)]
struct UpdateQuery {
    #[serde(default)]
    now: Option<String>,
    #[serde(default)]
    force: Option<String>,
    #[serde(default)]
    url: Option<String>,
}

fn flag(v: &Option<String>) -> bool {
    matches!(v.as_deref(), Some("1" | "true" | "yes" | "on" | ""))
}

async fn admin_update_status(State(web): State<Arc<Web>>, _admin: Admin) -> Response {
    Json(web.updater.status()).into_response()
}

async fn admin_update_check(
    State(web): State<Arc<Web>>,
    _admin: Admin,
    axum::extract::Query(q): axum::extract::Query<UpdateQuery>,
) -> Response {
    let Some(base) = web.updater.cfg.url.clone() else {
        return (
            StatusCode::CONFLICT,
            Json(serde_json::json!({"error": "UPDATE_URL is not set"})),
        )
            .into_response();
    };
    match web.updater.check(&base, flag(&q.now)).await {
        Ok(msg) => Json(serde_json::json!({"ok": true, "result": msg})).into_response(),
        Err(e) => (
            StatusCode::BAD_GATEWAY,
            Json(serde_json::json!({"ok": false, "error": e})),
        )
            .into_response(),
    }
}

async fn admin_update_install(
    State(web): State<Arc<Web>>,
    _admin: Admin,
    axum::extract::Query(q): axum::extract::Query<UpdateQuery>,
    body: axum::body::Body,
) -> Response {
    let (force, now) = (flag(&q.force), flag(&q.now));
    let res = match q.url.clone() {
        Some(url) => web.updater.install_url(url, force, now).await,
        None => {
            web.updater
                .install_stream(body.into_data_stream(), force, now)
                .await
        }
    };
    match res {
        Ok(m) => (StatusCode::ACCEPTED, Json(serde_json::json!({"ok": true, "version": m.version, "status": web.updater.status()}))).into_response(),
        Err(e) => (StatusCode::UNPROCESSABLE_ENTITY, Json(serde_json::json!({"ok": false, "error": e}))).into_response(),
    }
}

async fn admin_update_rollback(State(web): State<Arc<Web>>, _admin: Admin) -> Response {
    let u = web.updater.clone();
    match tokio::task::spawn_blocking(move || u.rollback()).await {
        Ok(Ok(v)) => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({"ok": true, "rollingBackTo": v})),
        )
            .into_response(),
        Ok(Err(e)) => (
            StatusCode::CONFLICT,
            Json(serde_json::json!({"ok": false, "error": e})),
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(serde_json::json!({"ok": false, "error": e.to_string()})),
        )
            .into_response(),
    }
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ResetBody {
    #[serde(default)]
    wipe_ca: bool,
    confirm: String,
}

/// Factory reset (admin): init wipes the data partition at the next boot.
async fn admin_reset(
    Admin(addr): Admin,
    body: Result<Json<ResetBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Ok(Json(b)) = body else {
        return (StatusCode::BAD_REQUEST, Json(serde_json::json!({"error": "send JSON {\"confirm\": \"RESET\", \"wipeCa\": false}"}))).into_response();
    };
    if b.confirm != "RESET" {
        return (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({"error": "confirm must be \"RESET\""})),
        )
            .into_response();
    }
    match crate::provision::reset::request_on_appliance(b.wipe_ca) {
        Ok(()) => {
            tracing::warn!(%addr, wipe_ca = b.wipe_ca, "factory reset requested: rebooting");
            (
                StatusCode::ACCEPTED,
                Json(serde_json::json!({"ok": true, "wipeCa": b.wipe_ca})),
            )
                .into_response()
        }
        Err(e) => (
            StatusCode::CONFLICT,
            Json(serde_json::json!({"ok": false, "error": e})),
        )
            .into_response(),
    }
}

/// The status page's charts (admin): today's events per hour (UTC) and the outbox
/// depth sampled over the last hour, per realm the caller may see in full.
async fn charts(State(web): State<Arc<Web>>, Admin(addr): Admin, headers: HeaderMap) -> Response {
    let (all, one) = full_detail_for(&web, &addr, &headers);
    let w = web.clone();
    let v = tokio::task::spawn_blocking(move || {
        let now = crate::util::now_ms();
        let realms: Vec<_> = w
            .realms
            .iter()
            .filter(|r| all || one.as_deref() == Some(r.key().as_str()))
            .map(|r| {
                let (day, before) = day_mark(&w, r);
                let hours = w
                    .history
                    .hours(&r.key(), day, before, |after| {
                        r.with_reader(|s| s.counts_by_hour(after, day * 86_400_000))
                    })
                    .map(|h| h.to_vec())
                    .unwrap_or_default();
                let mut outbox = w.history.outbox(&r.key(), now);
                outbox.push((now, outbox_depth(&w, r)));
                serde_json::json!({
                    "tenantId": r.cfg.tenant_id,
                    "storeId": r.cfg.store_id,
                    "dayStartMs": day * 86_400_000,
                    "eventsByHour": hours,
                    "outbox": outbox,
                })
            })
            .collect();
        serde_json::json!({"nowMs": now, "sampleEverySecs": crate::ops::history::SAMPLE_EVERY.as_secs(), "realms": realms})
    })
    .await
    .unwrap_or_default();
    Json(v).into_response()
}

/// `GET /admin/logs` parameters.
#[derive(serde::Deserialize, Default)]
struct LogsQuery {
    lines: Option<String>,
    since: Option<String>,
    follow: Option<String>,
    format: Option<String>,
}

fn bad_request(msg: impl Into<String>) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(serde_json::json!({"error": msg.into()})),
    )
        .into_response()
}

fn render_entry(e: &crate::ops::logs::Entry, json: bool) -> String {
    if json {
        let mut s = serde_json::to_string(e).unwrap_or_default();
        s.push('\n');
        s
    } else {
        let mut s = e.text();
        s.push('\n');
        s
    }
}

/// Counts an open follower; uncounts it when the stream is dropped.
struct Follower(Arc<Web>);
impl Drop for Follower {
    fn drop(&mut self) {
        self.0.followers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The hub's and init's logs, newest last (admin): `?lines=N` (default 200),
/// `?since=TIME|DURATION`, `?format=json` (JSON lines), `?follow=1` (keeps the
/// response open and streams new lines as they are written, checked every 200 ms).
async fn admin_logs(
    State(web): State<Arc<Web>>,
    _admin: Admin,
    axum::extract::Query(q): axum::extract::Query<LogsQuery>,
) -> Response {
    let lines = match q.lines.as_deref() {
        None => 200,
        Some(v) => match v.trim().parse::<usize>() {
            Ok(n) => n.min(100_000),
            Err(_) => return bad_request(format!("lines={v:?}: give a number of lines")),
        },
    };
    let since_ms = match q.since.as_deref() {
        None => None,
        Some(v) => match crate::ops::logs::parse_since(v, crate::util::now_ms()) {
            Ok(t) => Some(t),
            Err(e) => return bad_request(e),
        },
    };
    let json = match q.format.as_deref() {
        None | Some("text") => false,
        Some("json") => true,
        Some(other) => return bad_request(format!("format={other:?}: text or json")),
    };
    let follow = flag(&q.follow);
    let dir = web.log_dir.clone();
    let Ok((entries, cursor)) = tokio::task::spawn_blocking(move || {
        crate::ops::logs::read(&dir, crate::ops::logs::Query { lines, since_ms })
    })
    .await
    else {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "reading the logs failed\n",
        )
            .into_response();
    };
    let head: String = entries.iter().map(|e| render_entry(e, json)).collect();
    let ctype = if json {
        "application/x-ndjson"
    } else {
        "text/plain; charset=utf-8"
    };
    if !follow {
        return (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, ctype),
                (header::CACHE_CONTROL, "no-store"),
            ],
            head,
        )
            .into_response();
    }
    if web.followers.fetch_add(1, Ordering::Relaxed) >= MAX_FOLLOWERS {
        web.followers.fetch_sub(1, Ordering::Relaxed);
        return (
            StatusCode::TOO_MANY_REQUESTS,
            Json(serde_json::json!({"error": format!("at most {MAX_FOLLOWERS} log followers at once; close one")})),
        )
            .into_response();
    }
    let guard = Follower(web.clone());
    let stream = futures_util::stream::unfold(
        (cursor, Some(head), guard),
        move |(mut cur, head, guard)| async move {
            if let Some(h) = head {
                return Some((
                    Ok::<_, std::io::Error>(axum::body::Bytes::from(h)),
                    (cur, None, guard),
                ));
            }
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                let new = cur.poll();
                if !new.is_empty() {
                    let s: String = new.iter().map(|e| render_entry(e, json)).collect();
                    return Some((Ok(axum::body::Bytes::from(s)), (cur, None, guard)));
                }
            }
        },
    );
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, ctype),
            (header::CACHE_CONTROL, "no-store"),
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}

/// statvfs of `path`: (total, free) bytes.
#[allow(clippy::unnecessary_cast)]
fn fs_usage(path: &std::path::Path) -> Option<(u64, u64)> {
    let s = nix::sys::statvfs::statvfs(path).ok()?;
    Some((
        s.blocks() as u64 * s.fragment_size() as u64,
        s.blocks_available() as u64 * s.fragment_size() as u64,
    ))
}

/// What a support bundle holds: never event contents, tokens, keys or hub.env.
fn support_files(web: &Web, all: bool, one: Option<&str>) -> Vec<(String, Vec<u8>)> {
    let pretty = |v: &serde_json::Value| {
        let mut b = serde_json::to_vec_pretty(v).unwrap_or_default();
        b.push(b'\n');
        b
    };
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let st = serde_json::to_value(build_status(web, all, one)).unwrap_or_default();
    files.push(("status.json".into(), pretty(&st)));

    let (entries, _) = crate::ops::logs::read(
        &web.log_dir,
        crate::ops::logs::Query {
            lines: 5000,
            since_ms: None,
        },
    );
    let logs: String = entries.iter().map(|e| render_entry(e, false)).collect();
    files.push(("logs.txt".into(), logs.into_bytes()));

    let u = web.updater.status();
    let packages = std::fs::read("/etc/pos-hub-packages").ok();
    files.push((
        "versions.json".into(),
        pretty(&serde_json::json!({
            "hub": crate::VERSION,
            "firmware": crate::system::firmware_version(),
            "runningVersion": web.updater.running_version,
            "bootedSlot": u.get("bootedSlot"),
            "kernel": st.pointer("/system/kernel"),
            "appliance": crate::system::under_init(),
            "packageList": if packages.is_some() { "packages.txt" } else { "none: not the firmware image (/etc/pos-hub-packages missing)" },
        })),
    ));
    if let Some(p) = packages {
        files.push(("packages.txt".into(), p));
    }

    let mut parts = Vec::new();
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let wanted = [
        ("data", web.data_dir.clone()),
        ("root", "/".into()),
        ("settings", "/config".into()), // where init mounts the settings partition
        ("run", "/run".into()),
        ("tmp", "/tmp".into()),
    ];
    for (role, path) in wanted {
        if let Some((total, free)) = fs_usage(&path) {
            parts.push(serde_json::json!({
                "role": role, "path": path.display().to_string(),
                "bytesTotal": total, "bytesFree": free,
                "usedPercent": if total > 0 { ((total - free) as f64 * 1000.0 / total as f64).round() / 10.0 } else { 0.0 },
            }));
        }
    }
    let mount_lines: Vec<String> = mounts
        .lines()
        .filter(|l| !l.contains("cgroup") && !l.starts_with("overlay "))
        .map(String::from)
        .collect();
    files.push((
        "partitions.json".into(),
        pretty(&serde_json::json!({"usage": parts, "mounts": mount_lines})),
    ));

    files.push((
        "update.json".into(),
        pretty(&serde_json::json!({
            "status": u,
            "history": u.get("history"),
            "failedVersions": u.get("badVersions"),
        })),
    ));

    files.push((
        "clock-power.json".into(),
        pretty(&serde_json::json!({
            "systemTime": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            "hubTimeSecs": web.clock.now_secs(),
            "clock": web.clock.status(),
            "clockKnownWrong": web.clock.known_wrong(),
            "power": web.power.lock().as_ref().map(|p| p.status.lock().clone()),
            "uptimeSecs": web.started.elapsed().as_secs(),
        })),
    ));

    let realms: Vec<_> = web
        .realms
        .iter()
        .filter(|r| all || one == Some(r.key().as_str()))
        .map(|r| {
            let last = r.stats.last_seq.load(Ordering::Relaxed);
            let lan = r.stats.lan_events.load(Ordering::Relaxed);
            let db = web
                .data_dir
                .join("realms")
                .join(&r.cfg.tenant_id)
                .join(format!("{}.db", r.cfg.store_id));
            serde_json::json!({
                "tenantId": r.cfg.tenant_id,
                "storeId": r.cfg.store_id,
                "events": last,
                "lanEvents": lan,
                "cloudEvents": last.saturating_sub(lan),
                "eventsToday": events_today(web, r),
                "outboxDepth": outbox_depth(web, r),
                "setAside": web.bridge(r).map(|b| b.set_aside.load(Ordering::Relaxed)),
                "bridgeConfigured": web.bridge(r).is_some(),
                "devicesConnected": r.device_count(),
                "healthy": r.stats.healthy.load(Ordering::Relaxed),
                "schemaVersion": r.with_reader(|s| s.schema_version()).ok(),
                "databaseBytes": std::fs::metadata(&db).map(|m| m.len()).ok(),
            })
        })
        .collect();
    files.push(("realms.json".into(), pretty(&serde_json::json!(realms))));
    files.push(("metrics.txt".into(), metrics_text(web).into_bytes()));
    files
}

/// The support bundle (admin): a `.tar.gz` of the files [`support_files`] gathers.
async fn admin_support_bundle(
    State(web): State<Arc<Web>>,
    Admin(addr): Admin,
    headers: HeaderMap,
) -> Response {
    let (all, one) = full_detail_for(&web, &addr, &headers);
    let w = web.clone();
    let res = tokio::task::spawn_blocking(move || {
        let now = std::time::SystemTime::now();
        let stamp = humantime::format_rfc3339_seconds(now)
            .to_string()
            .replace([':', '-'], "");
        let host = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "pos-hub".into());
        let dir = format!("pos-hub-support-{host}-{stamp}");
        let files = support_files(&w, all, one.as_deref());
        let secs = now
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        crate::ops::bundle::pack(&dir, &files, secs).map(|b| (dir, b))
    })
    .await;
    match res {
        Ok(Ok((dir, bytes))) => {
            tracing::info!(%addr, bytes = bytes.len(), "support bundle downloaded");
            (
                StatusCode::OK,
                [
                    (header::CONTENT_TYPE, "application/gzip".to_string()),
                    (
                        header::CONTENT_DISPOSITION,
                        format!("attachment; filename=\"{dir}.tar.gz\""),
                    ),
                    (header::CACHE_CONTROL, "no-store".to_string()),
                ],
                bytes,
            )
                .into_response()
        }
        Ok(Err(e)) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(serde_json::json!({"error": format!("packing the bundle: {e}")})),
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(serde_json::json!({"error": e.to_string()})),
        )
            .into_response(),
    }
}
