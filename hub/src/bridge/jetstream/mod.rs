//! The cloud bridge's second target: a NATS JetStream cluster (issue 15). Selected
//! by a `nats://` or `tls://` CLOUD_BRIDGE_URL (a comma-separated list of servers).
//!
//! Up: every LAN event goes to `poshub.<tenant>.<store>.up` in the stream
//! CLOUD_NATS_STREAM, exactly once and in seq order (see `up.rs`). Down: a durable
//! pull consumer per realm on `poshub.<tenant>.<store>.down` appends cloud events to
//! the log (see `down.rs`). This file holds what both share: settings, subjects and
//! names, the connection, the stream, and what `/status` shows.

pub mod down;
pub mod up;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;

use super::{BridgeState, Endpoints};
use crate::realm::Realm;

pub use crate::config::nats::{
    check_target, is_nats_url, parse_servers, redact, settings_from, user_pass, NatsSettings,
};

/// Publishes in flight at most (awaiting their PubAck).
pub const INFLIGHT: usize = 512;

/// The URLs to dial, without user:password (passed separately, never shown).
fn dial_urls(servers: &[async_nats::ServerAddr]) -> Vec<String> {
    servers
        .iter()
        .map(|a| {
            let mut u = a.clone().into_inner();
            let _ = u.set_password(None);
            let _ = u.set_username("");
            u.to_string().trim_end_matches('/').to_string()
        })
        .collect()
}

/// One subject token from a tenant or store id. Ids are `[A-Za-z0-9._-]`; anything
/// but letters, digits and `-` becomes `_XX` (hex), so `.` never splits a token,
/// no id can become `*` or `>`, and the mapping is one-to-one (`_` itself is
/// escaped, so two ids never meet on one subject).
pub fn token(id: &str) -> String {
    escape(id, |c| c.is_ascii_alphanumeric() || c == '-')
}

fn escape(id: &str, keep: impl Fn(char) -> bool) -> String {
    let mut out = String::with_capacity(id.len() + 8);
    for c in id.chars() {
        if keep(c) {
            out.push(c);
        } else {
            let mut b = [0u8; 4];
            for byte in c.encode_utf8(&mut b).bytes() {
                out.push_str(&format!("_{byte:02X}"));
            }
        }
    }
    out
}

pub fn up_subject(tenant: &str, store: &str) -> String {
    format!("poshub.{}.{}.up", token(tenant), token(store))
}

pub fn down_subject(tenant: &str, store: &str) -> String {
    format!("poshub.{}.{}.down", token(tenant), token(store))
}

/// The durable consumer's name: consumer names may not hold `.`, so `-` separates
/// and is escaped inside the ids too. Names over 200 chars become a digest.
pub fn consumer_name(tenant: &str, store: &str) -> String {
    let e = |s: &str| escape(s, |c| c.is_ascii_alphanumeric());
    let name = format!("poshub-down-{}-{}", e(tenant), e(store));
    if name.len() <= 200 {
        return name;
    }
    use sha2::Digest;
    let d = sha2::Sha256::digest(format!("{tenant}\n{store}").as_bytes());
    let hex: String = d[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("poshub-down-{hex}")
}

/// The `Nats-Msg-Id` of a LAN event.
pub fn msg_id(tenant: &str, store: &str, id: &str) -> String {
    format!("{tenant}:{store}:{id}")
}

/// What `/status` shows of the NATS target.
#[derive(Debug)]
pub struct NatsState {
    pub servers: String,
    pub stream: String,
    pub consumer: String,
    pub up_subject: String,
    pub down_subject: String,
    pub connected_server: Mutex<Option<String>>,
    pub pending_acks: AtomicU64,
    /// Stream sequence of the realm's last event the stream acknowledged.
    pub stream_seq: AtomicU64,
    pub replicas: AtomicU64,
    /// Messages found out of place in the stream and deleted (see `up.rs`).
    pub repaired: AtomicU64,
    pub resyncs: AtomicU64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NatsStatus {
    pub servers: String,
    pub connected_server: Option<String>,
    pub stream: String,
    pub replicas: u64,
    pub consumer: String,
    pub up_subject: String,
    pub down_subject: String,
    pub pending_acks: u64,
    pub stream_seq: u64,
    pub repaired: u64,
    pub resyncs: u64,
}

impl NatsState {
    pub fn status(&self) -> NatsStatus {
        NatsStatus {
            servers: self.servers.clone(),
            connected_server: self.connected_server.lock().clone(),
            stream: self.stream.clone(),
            replicas: self.replicas.load(Ordering::Relaxed),
            consumer: self.consumer.clone(),
            up_subject: self.up_subject.clone(),
            down_subject: self.down_subject.clone(),
            pending_acks: self.pending_acks.load(Ordering::Relaxed),
            stream_seq: self.stream_seq.load(Ordering::Relaxed),
            repaired: self.repaired.load(Ordering::Relaxed),
            resyncs: self.resyncs.load(Ordering::Relaxed),
        }
    }
}

/// Everything a realm's NATS tasks need.
pub(crate) struct Target {
    pub realm: Arc<Realm>,
    pub servers: Vec<async_nats::ServerAddr>,
    pub token: Option<String>,
    /// From the URLs (see [`user_pass`]).
    pub user_pass: Option<(String, String)>,
    pub settings: NatsSettings,
    pub tuning: super::Tuning,
    pub state: Arc<BridgeState>,
    pub nats: Arc<NatsState>,
}

/// A task's last failure. The same failure again (a retry every few seconds against
/// a server that refuses the login or the certificate) updates `/status` but is not
/// logged again: one log line per incident, not one per retry.
#[derive(Default)]
pub(crate) struct Incident(Option<String>);

impl Incident {
    pub fn fail(&mut self, state: &BridgeState, what: &str, e: String) {
        let msg = format!("{what}: {e}");
        if self.0.as_deref() == Some(msg.as_str()) {
            state.online.store(false, Ordering::Relaxed);
            *state.last_error.lock() = Some(msg);
        } else {
            state.fail(what, e);
            self.0 = Some(msg);
        }
    }

    /// A connection was made since: the next failure is a new incident.
    pub fn connected(&mut self) {
        self.0 = None;
    }
}

/// How a connection ended or failed, for the task that owns it.
pub(crate) type Lost = Arc<tokio::sync::Notify>;

impl Target {
    /// Opens a connection. `lost` is notified when it drops: the push stops at once
    /// rather than let the client replay queued publishes onto a new connection.
    pub async fn connect(
        &self,
        role: &str,
        lost: Option<Lost>,
    ) -> Result<async_nats::Client, String> {
        let mut o = match &self.settings.creds {
            Some(p) => async_nats::ConnectOptions::with_credentials_file(p)
                .await
                .map_err(|e| format!("CLOUD_NATS_CREDS {}: {e}", p.display()))?,
            None => async_nats::ConnectOptions::new(),
        };
        if let Some(t) = &self.token {
            o = o.token(t.clone());
        }
        if let Some((user, pass)) = &self.user_pass {
            o = o.user_and_password(user.clone(), pass.clone());
        }
        if let Some(ca) = &self.settings.ca {
            o = o.add_root_certificates(ca.clone()).require_tls(true);
        }
        let nats = self.nats.clone();
        let realm = self.realm.key();
        let role_s = role.to_string();
        o = o
            .name(format!("pos-hub {} {role}", self.realm.key()))
            .connection_timeout(Duration::from_secs(5))
            .request_timeout(Some(self.tuning.timeout))
            .event_callback(move |ev| {
                let lost = lost.clone();
                let nats = nats.clone();
                let realm = realm.clone();
                let role = role_s.clone();
                async move {
                    match ev {
                        async_nats::Event::Disconnected => {
                            if let Some(l) = &lost {
                                l.notify_one();
                            }
                            tracing::warn!(realm = %realm, role = %role, "NATS connection lost");
                            *nats.connected_server.lock() = None;
                        }
                        async_nats::Event::Connected => {
                            tracing::info!(realm = %realm, role = %role, "NATS connected");
                        }
                        async_nats::Event::ServerError(e) => {
                            tracing::warn!(realm = %realm, role = %role, error = %e, "NATS server error")
                        }
                        _ => {}
                    }
                }
            });
        let urls = dial_urls(&self.servers);
        let client = o.connect(urls.as_slice()).await.map_err(|e| {
            format!(
                "cannot connect to {}: {}",
                self.nats.servers,
                self.explain(&e)
            )
        })?;
        let info = client.server_info();
        *self.nats.connected_server.lock() = Some(format!(
            "{} ({}:{}, nats-server {})",
            info.server_name, info.host, info.port, info.version
        ));
        Ok(client)
    }

    /// What a failed connection means and what to do about it: a refused login
    /// names the way the hub logged in, a certificate that does not verify names
    /// CLOUD_NATS_CA.
    fn explain(&self, e: &async_nats::ConnectError) -> String {
        use async_nats::ConnectErrorKind as K;
        let text = e.to_string();
        match e.kind() {
            K::AuthorizationViolation => {
                format!("the server refused the login (authorization violation): check {}", self.login())
            }
            K::Authentication => format!(
                "{text}: the NKey seed in CLOUD_NATS_CREDS could not sign the server's challenge; check the creds file"
            ),
            _ if e.kind() == K::Tls || text.contains("certificate") => match &self.settings.ca {
                Some(ca) => format!(
                    "TLS: {text}: the server's certificate does not verify against CLOUD_NATS_CA {} (is it the CA that signed the server's certificate, and does the certificate name the host of the URL?)",
                    ca.display()
                ),
                None => format!(
                    "TLS: {text}: the server's certificate does not verify against the system's CAs; give the servers' CA as CLOUD_NATS_CA"
                ),
            },
            _ => text,
        }
    }

    /// The way this realm logs in, for error messages.
    fn login(&self) -> String {
        if let Some(p) = &self.settings.creds {
            format!(
                "CLOUD_NATS_CREDS {} (the user JWT must be signed by an account the server knows, the seed must be that user's)",
                p.display()
            )
        } else if self.token.is_some() {
            "CLOUD_BRIDGE_TOKEN".into()
        } else if self.user_pass.is_some() {
            "the user:password in CLOUD_BRIDGE_URL".into()
        } else {
            "the login: the server wants one; set CLOUD_NATS_CREDS, CLOUD_BRIDGE_TOKEN or user:password in CLOUD_BRIDGE_URL".into()
        }
    }

    /// The stream, created if missing with subjects `poshub.>` and as many replicas
    /// as the cluster allows, up to 3.
    pub async fn stream(
        &self,
        js: &async_nats::jetstream::Context,
    ) -> Result<async_nats::jetstream::stream::Stream, String> {
        use async_nats::jetstream::stream;
        let name = &self.settings.stream;
        match js.get_stream(name).await {
            Ok(s) => {
                self.nats.replicas.store(
                    s.cached_info().config.num_replicas as u64,
                    Ordering::Relaxed,
                );
                return Ok(s);
            }
            Err(e) => match e.kind() {
                async_nats::jetstream::context::GetStreamErrorKind::JetStream(j)
                    if j.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND => {}
                _ => return Err(format!("stream {name}: {e}")),
            },
        }
        let mut last = String::new();
        for replicas in [3usize, 2, 1] {
            let cfg = stream::Config {
                name: name.clone(),
                subjects: vec!["poshub.>".into()],
                num_replicas: replicas,
                storage: stream::StorageType::File,
                ..Default::default()
            };
            match js.create_stream(cfg).await {
                Ok(s) => {
                    tracing::info!(stream = %name, replicas, "created the NATS stream");
                    self.nats.replicas.store(replicas as u64, Ordering::Relaxed);
                    return Ok(s);
                }
                Err(e) => {
                    // Too few servers for this many replicas: try fewer. Someone
                    // else may also have created it meanwhile.
                    if let Ok(s) = js.get_stream(name).await {
                        self.nats.replicas.store(
                            s.cached_info().config.num_replicas as u64,
                            Ordering::Relaxed,
                        );
                        return Ok(s);
                    }
                    last = e.to_string();
                }
            }
        }
        Err(format!("cannot create the stream {name}: {last}"))
    }
}

/// Starts the up and down tasks of a realm whose bridge URL is a NATS server list.
pub async fn start(
    realm: Arc<Realm>,
    ep: Endpoints,
    state: Arc<BridgeState>,
) -> Result<(), String> {
    let servers = parse_servers(&ep.push_url)?;
    let user_pass = user_pass(&servers)?;
    let nats = Arc::new(NatsState {
        servers: redact(&ep.push_url),
        stream: ep.tuning.nats.stream.clone(),
        consumer: consumer_name(&realm.cfg.tenant_id, &realm.cfg.store_id),
        up_subject: up_subject(&realm.cfg.tenant_id, &realm.cfg.store_id),
        down_subject: down_subject(&realm.cfg.tenant_id, &realm.cfg.store_id),
        connected_server: Mutex::new(None),
        pending_acks: AtomicU64::new(0),
        stream_seq: AtomicU64::new(0),
        replicas: AtomicU64::new(0),
        repaired: AtomicU64::new(0),
        resyncs: AtomicU64::new(0),
    });
    let _ = state.nats.set(nats.clone());
    let target = Arc::new(Target {
        realm,
        servers,
        token: (!ep.token.is_empty()).then(|| ep.token.clone()),
        user_pass,
        settings: ep.tuning.nats.clone(),
        tuning: ep.tuning.clone(),
        state,
        nats,
    });
    up::init(&target).await?;
    tokio::spawn(up::run(target.clone()));
    tokio::spawn(down::run(target));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_one_to_one_and_wildcard_free() {
        assert_eq!(up_subject("t-abc", "s-001"), "poshub.t-abc.s-001.up");
        // `.` would split tokens: "a.b"+"c" and "a"+"b.c" must not meet.
        assert_ne!(up_subject("a.b", "c"), up_subject("a", "b.c"));
        assert_eq!(up_subject("a.b", "c"), "poshub.a_2Eb.c.up");
        // `_` is the escape character, so an id that looks escaped stays apart.
        assert_ne!(token("a_2Eb"), token("a.b"));
        for id in ["*", ">", "a.*", "a.>", "a b", "..", "a\tb"] {
            let t = token(id);
            assert!(!t.contains(['.', '*', '>', ' ', '\t']), "{id} -> {t}");
        }
        // Consumer names: no `.`, and `-` inside ids cannot fake the separator.
        assert_ne!(consumer_name("a-b", "c"), consumer_name("a", "b-c"));
        assert!(!consumer_name("a.b", "c.d").contains('.'));
        assert!(consumer_name(&"x".repeat(64), &"y.".repeat(32)).len() <= 200);
    }

    #[test]
    fn server_lists() {
        assert_eq!(
            parse_servers("nats://a:4222, tls://b:4223").unwrap().len(),
            2
        );
        assert!(parse_servers("nats://a:4222,https://b").is_err());
        assert!(parse_servers("").is_err());
        assert_eq!(
            redact("nats://u:secret@a:4222,nats://b:4222"),
            "nats://u:***@a:4222,nats://b:4222"
        );
        // async-nats ignores URL logins: the hub decodes and passes them, and dials
        // the URLs without them.
        let s = parse_servers("tls://store%201:p%40ss%20w@a:4222,nats://b:4222").unwrap();
        assert_eq!(
            user_pass(&s).unwrap(),
            Some(("store 1".to_string(), "p@ss w".to_string()))
        );
        assert_eq!(dial_urls(&s), ["tls://a:4222", "nats://b:4222"]);
        assert_eq!(
            user_pass(&parse_servers("nats://a,nats://b").unwrap()).unwrap(),
            None
        );
        assert!(user_pass(&parse_servers("nats://u:p@a,nats://u:q@b").unwrap()).is_err());
    }
}
