//! `pos-hub serve`: opens the realms, wires Socket.IO and HTTP onto one port, and
//! shuts down in order on SIGTERM/SIGINT: stop taking events (devices get
//! `shutting_down`), commit what is queued, close the databases, exit 0.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;

use crate::auth::keys::{generate_ed25519, SigningKey};
use crate::auth::token::{mint, Claims};
use crate::config::{Config, ConfigError, Settings};
use crate::http::{self, Web};
use crate::realm::Realms;
use crate::realtime::{self, Gate};
use crate::tls::server::Tls;
use crate::tls::StoreCa;
use crate::util::{now_secs, raise_fd_limit, write_atomic};

/// Why the hub could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Log(#[from] crate::log::LogError),
    #[error(
        "cannot listen on {addr}: {source} (is another hub or program using the port? set PORT)"
    )]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("dev setup in {dir}: {message}")]
    Dev { dir: PathBuf, message: String },
    #[error("store CA: {0}")]
    Ca(#[from] crate::tls::CaError),
    #[error("server error: {0}")]
    Io(#[from] std::io::Error),
}

/// The hub under init with settings it cannot use: serves plain HTTP on `port` with
/// /healthz (503, `configError`) and /status (the error and the box's state) until
/// SIGTERM, and repeats the error on the console every minute.
pub async fn run_config_error(
    port: u16,
    message: String,
    data_dir: PathBuf,
) -> Result<(), ServeError> {
    use axum::routing::get;
    let msg = Arc::new(message);
    let m1 = msg.clone();
    let m2 = msg.clone();
    let app = axum::Router::new()
        .route(
            "/healthz",
            get(move || {
                let m = m1.clone();
                async move {
                    (
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        axum::Json(serde_json::json!({"ok": false, "configError": *m, "fix": "edit hub.env on the settings partition, then restart the box"})),
                    )
                }
            }),
        )
        .route(
            "/status",
            get(move || {
                let m = m2.clone();
                let d = data_dir.clone();
                async move {
                    axum::Json(serde_json::json!({
                        "version": crate::system::firmware_version(),
                        "configError": *m,
                        "system": crate::system::status(&d),
                        "realms": [],
                    }))
                }
            }),
        );
    let addr = SocketAddr::from(([0, 0, 0, 0], port));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    tracing::error!(%addr, error = %msg, "configuration error: serving only /healthz and /status until the settings are fixed");
    let repeat = msg.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(60)).await;
            eprintln!("pos-hub: configuration error (edit hub.env, then restart): {repeat}");
        }
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    axum::serve(listener, app.into_make_service())
        .with_graceful_shutdown(async move {
            term.recv().await;
        })
        .await?;
    Ok(())
}

/// The realm `--dev` runs.
pub const DEV_TENANT: &str = "t-dev";
pub const DEV_STORE: &str = "s-dev";

/// Prepares `--dev`: a persistent Ed25519 key pair in `<data>/dev/`, the dev realm
/// in `settings`, and dev tokens in `<data>/dev-token.txt` and
/// `<data>/dev-admin-token.txt`. Returns the device token.
pub fn prepare_dev(data_dir: &Path, settings: &mut Settings) -> Result<String, ServeError> {
    let dev = |message: String| ServeError::Dev {
        dir: data_dir.to_path_buf(),
        message,
    };
    let key_path = data_dir.join("dev/cluster-key.pem");
    let pub_path = data_dir.join("dev/cluster-key.pub.pem");
    if !key_path.exists() || !pub_path.exists() {
        let (private, public) = generate_ed25519().map_err(|e| dev(e.to_string()))?;
        write_atomic(&key_path, private.as_bytes(), 0o600)
            .map_err(|e| dev(format!("writing {}: {e}", key_path.display())))?;
        write_atomic(&pub_path, public.as_bytes(), 0o644)
            .map_err(|e| dev(format!("writing {}: {e}", pub_path.display())))?;
    }
    let public = std::fs::read_to_string(&pub_path)
        .map_err(|e| dev(format!("reading {}: {e}", pub_path.display())))?;
    let key = SigningKey::from_file(&key_path).map_err(|e| dev(e.to_string()))?;
    settings.set("TENANT_ID", DEV_TENANT);
    settings.set("STORE_ID", DEV_STORE);
    settings.set(
        "CLUSTER_PUBLIC_KEY_BASE64",
        &base64::engine::general_purpose::STANDARD.encode(public.as_bytes()),
    );
    let now = now_secs();
    let mut claims = Claims {
        tenant_id: DEV_TENANT.into(),
        store_id: DEV_STORE.into(),
        device_id: "dev-till-1".into(),
        role: "till".into(),
        exp: now + 30 * 24 * 3600,
        iat: now,
        nbf: None,
        iss: None,
        aud: None,
    };
    let token = mint(&key, &claims, None).map_err(dev)?;
    // The token files are a convenience (the tokens are printed too): a full data
    // partition must not stop the hub from starting, so a failed write only warns
    // (write_atomic leaves the previous file whole).
    save_token(&data_dir.join("dev-token.txt"), &token);
    claims.device_id = "dev-admin".into();
    claims.role = "admin".into();
    let admin = mint(&key, &claims, None).map_err(dev)?;
    save_token(&data_dir.join("dev-admin-token.txt"), &admin);
    Ok(token)
}

fn save_token(path: &Path, token: &str) {
    if let Err(e) = write_atomic(path, format!("{token}\n").as_bytes(), 0o600) {
        tracing::warn!(path = %path.display(), error = %e, "cannot save the dev token (the previous file, if any, is unchanged)");
    }
}

/// Runs the hub until SIGTERM/SIGINT.
pub async fn run(cfg: Config) -> Result<(), ServeError> {
    let fds = raise_fd_limit();
    std::fs::create_dir_all(&cfg.data_dir).map_err(|e| ServeError::Dev {
        dir: cfg.data_dir.clone(),
        message: format!("cannot create the data directory: {e}"),
    })?;
    // The hub's own log file, unless init keeps one from its stderr.
    let log_dir = crate::ops::logs::LogDir::for_data_dir(&cfg.data_dir);
    if log_dir.init_keeps_files {
        crate::ops::logs::no_file();
    } else if let Err(e) = crate::ops::logs::attach(&log_dir.dir) {
        crate::ops::logs::no_file();
        tracing::error!(dir = %log_dir.dir.display(), error = %e, "cannot write the hub's log file; GET /admin/logs will have nothing to show");
    }
    let clock = crate::clock::Clock::open(&cfg.data_dir, cfg.clock_set);
    if !cfg.ntp_servers.is_empty() {
        tokio::spawn(crate::clock::run(
            clock.clone(),
            cfg.ntp_servers.clone(),
            cfg.ntp_interval,
        ));
    }
    let retention = crate::log::writer::Retention {
        keep: cfg.log_retention,
        every: cfg.log_prune_interval,
        bridged: false, // per realm: set by Realm::open from its cloud settings
    };
    let realms = Arc::new(Realms::open(
        &cfg.realms,
        &cfg.data_dir,
        cfg.group_commit_max,
        retention,
    )?);
    let mut bridges = std::collections::HashMap::new();
    for r in realms.iter() {
        // An HTTP cloud needs its token; a NATS cluster may log in with a creds file
        // or user:password instead (config checked that one way is given).
        let token = r.cfg.cloud_bridge_token.as_deref();
        if let Some(url) = r
            .cfg
            .cloud_bridge_url
            .as_deref()
            .filter(|u| token.is_some() || crate::bridge::jetstream::is_nats_url(u))
        {
            let ep = crate::bridge::Endpoints::new(
                url,
                r.cfg.cloud_feed_url.as_deref(),
                token.unwrap_or(""),
                cfg.bridge.clone(),
            );
            let state = Arc::new(crate::bridge::BridgeState::default());
            bridges.insert(r.key(), state.clone());
            match crate::bridge::start(r.clone(), ep.clone(), state, clock.clone()).await {
                Ok(()) => {
                    tracing::info!(realm = %r.key(), push = %crate::ops::logs::redact_url(&ep.push_url), feed = %crate::ops::logs::redact_url(&ep.feed_url), "cloud bridge started")
                }
                Err(e) => {
                    tracing::error!(realm = %r.key(), error = %e, "cloud bridge could not start; the LAN works without it")
                }
            }
        }
    }
    let gate = Arc::new(Gate {
        realms: realms.clone(),
        policy: cfg.token_policy.clone(),
        grace_secs: cfg.token_offline_grace.as_secs() as i64,
        clock: clock.clone(),
    });
    let (layer, io) = realtime::build(gate, cfg.socket_buffer, cfg.socket_buffer_bytes);
    let tls = if cfg.tls {
        let dir = cfg.data_dir.clone();
        let extra = cfg.tls_extra_names.clone();
        let clk = clock.clone();
        let t = tokio::task::spawn_blocking(move || {
            let now = clk.now_secs();
            let ca = StoreCa::load_or_create(&dir, &extra, now)?;
            Tls::start(ca, extra, now, clk.trusted_for_issuing())
        })
        .await
        .map_err(|e| ServeError::Io(std::io::Error::other(e.to_string())))??;
        tracing::info!(fingerprint = %t.fingerprint, "store CA loaded; devices trust it via GET /ca.crt");
        tokio::spawn(crate::tls::server::renew_loop(
            t.clone(),
            cfg.tls_check_interval,
            clock.clone(),
        ));
        Some(t)
    } else {
        tracing::warn!("TLS=off: serving plain HTTP and WS only");
        None
    };
    let web_power: Arc<parking_lot::Mutex<Option<Arc<crate::power::Power>>>> = Default::default();
    let store_id = cfg
        .realms
        .first()
        .map(|r| r.store_id.clone())
        .unwrap_or_default();
    let updater = crate::update::Updater::new(
        cfg.update.clone(),
        cfg.update_channel.clone(),
        &cfg.data_dir,
        store_id,
    );
    let web = Arc::new(Web {
        realms: realms.clone(),
        policy: cfg.token_policy.clone(),
        started: Instant::now(),
        ca_pem: tls.as_ref().map(|t| t.ca_pem.clone()),
        ca_fingerprint: tls.as_ref().map(|t| t.fingerprint.clone()),
        power: web_power.clone(),
        clock: clock.clone(),
        data_dir: cfg.data_dir.clone(),
        updater: updater.clone(),
        unclaimed: cfg.claim.is_some(),
        day_marks: Default::default(),
        history: Default::default(),
        log_dir,
        followers: Default::default(),
        bridges,
    });
    tokio::spawn(http::sample_loop(web.clone()));
    let mut app = http::router(web.clone())
        .layer(layer)
        .layer(axum::middleware::map_request_with_state(
            io.clone(),
            realtime::prepare,
        ))
        .layer(axum::middleware::from_fn_with_state(
            io.clone(),
            realtime::direct,
        ));
    if let Some(key) = cfg.claim.clone() {
        tracing::warn!(port = cfg.port, "UNCLAIMED: this box accepts no events until it is claimed at https://<address>:{}/setup", cfg.port);
        eprintln!("pos-hub: this box is not claimed yet: open https://<its address>:{}/setup and paste the store's claim token", cfg.port);
        app = app.merge(crate::provision::claim::router(Arc::new(
            crate::provision::claim::SetupState {
                key,
                data_dir: cfg.data_dir.clone(),
                clock: clock.clone(),
                claimed: Default::default(),
            },
        )));
    }

    let addr = SocketAddr::new(cfg.bind, cfg.port);
    let listener = bind(addr, cfg.bind_explicit).await?;
    tracing::info!(
        %addr,
        realms = %cfg.realms.iter().map(|r| r.key()).collect::<Vec<_>>().join(","),
        data_dir = %cfg.data_dir.display(),
        fd_limit = fds,
        mdns = cfg.mdns,
        version = crate::VERSION,
        tls = cfg.tls,
        "pos-hub listening (TLS and plain HTTP on one port)"
    );

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(crate::tls::server::serve(listener, app, tls, stop_rx));
    // Updates: a trial boot checks itself and commits; a failed trial is recorded; the
    // channel is polled when UPDATE_URL is set.
    updater.start(realms.clone(), web.ca_pem.clone(), cfg.port);
    tokio::spawn(updater.clone().poll_loop());

    let advert = if cfg.mdns {
        let realm_ids: Vec<(String, String)> = cfg
            .realms
            .iter()
            .map(|r| (r.tenant_id.clone(), r.store_id.clone()))
            .collect();
        let fp = web.ca_fingerprint.clone();
        match crate::discovery::advertise(
            &realm_ids,
            cfg.port,
            cfg.tls,
            fp.as_deref(),
            &cfg.mdns_interfaces,
        ) {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::error!(error = %e, "mDNS advertisement failed; devices must be given the hub's address");
                None
            }
        }
    } else {
        None
    };
    let power = Arc::new(crate::power::Power::default());
    let (power_tx, mut power_rx) = tokio::sync::mpsc::channel::<String>(1);
    if let Some(pc) = cfg.power.clone() {
        let realms_n = realms.clone();
        let p = power.clone();
        tokio::spawn(async move {
            let why = crate::power::watch(pc, p, move |state, st| {
                let json = serde_json::json!({"state": state, "upsStatus": st.ups_status, "onBatterySinceMs": st.on_battery_since_ms, "shutdownReason": st.shutdown_reason}).to_string();
                for r in realms_n.iter() {
                    r.notice("hub.power", json.clone());
                }
            })
            .await;
            let _ = power_tx.send(why).await;
        });
    }
    *web_power.lock() = Some(power.clone());

    let signal = tokio::select! {
        s = wait_for_signal() => s.to_string(),
        Some(why) = power_rx.recv() => format!("power: {why}"),
    };
    tracing::info!(
        signal = %signal,
        "shutting down: no new events, committing what is queued"
    );
    for r in realms.iter() {
        r.notice(
            "hub.shutdown",
            format!("{{\"reason\":{}}}", crate::realtime::json_str(&signal)),
        );
    }
    if let Some(a) = advert {
        let _ = tokio::task::spawn_blocking(move || a.stop()).await;
    }
    // 1. Stop taking events and commit what is queued (devices get their acks).
    let r = realms.clone();
    let _ = tokio::task::spawn_blocking(move || r.close_all()).await;
    // 2. Tell devices goodbye, stop the server.
    io.close(Duration::from_secs(3)).await;
    let _ = stop_tx.send(true);
    if tokio::time::timeout(Duration::from_secs(3), server)
        .await
        .is_err()
    {
        tracing::warn!("the listener did not stop within 3 s; exiting anyway");
    }
    clock.save();
    tracing::info!("stopped cleanly");
    if signal.starts_with("power")
        && std::env::var_os("POS_HUB_INIT").is_some()
        && nix::unistd::getppid().as_raw() == 1
    {
        // Under our init: ask PID 1 to power the box off (SIGUSR2).
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(1),
            nix::sys::signal::Signal::SIGUSR2,
        );
    }
    Ok(())
}

/// Binds the port. Without an explicit BIND the hub listens on `[::]` (IPv4 and
/// IPv6), falling back to `0.0.0.0` where IPv6 is off.
async fn bind(addr: SocketAddr, explicit: bool) -> Result<tokio::net::TcpListener, ServeError> {
    if !explicit {
        let dual = SocketAddr::new(std::net::IpAddr::from([0u16; 8]), addr.port());
        if let Ok(l) = tokio::net::TcpListener::bind(dual).await {
            return Ok(l);
        }
    }
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })
}

async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM; only Ctrl-C will stop the hub");
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        }
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    }
}
