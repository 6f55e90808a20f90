//! The update agent: installs bundles (from a URL, resumable; from an upload; from a
//! file), runs the trial-boot self-check and commits or rolls back, notices a trial
//! that never committed (the box came back on the old slot), rolls back on command,
//! and polls the update channel with rollout waves and the maintenance window.

use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Deserialize;

use super::bundle::{self, Manifest};
use super::slots::{self, Slots};
use super::{in_wave, in_window, BadVersion, Pending, State, UpdateConfig};
use crate::config::UpdateChannel;

/// What the agent is doing now (for /status).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Idle,
    Downloading,
    Installed,
    Rebooting,
    Trial,
    Committed,
    RolledBack,
    Failed,
}

pub struct Updater {
    pub cfg: UpdateConfig,
    pub channel: UpdateChannel,
    pub running_version: String,
    pub board: String,
    pub store_id: String,
    appliance: bool,
    slots: Slots,
    state_path: PathBuf,
    state: Mutex<State>,
    phase: Mutex<Phase>,
    last_error: Mutex<Option<String>>,
    received: AtomicU64,
    total: AtomicU64,
    busy: AtomicBool,
    booted: Option<u32>,
    default_slot: Mutex<Option<u32>>,
    last_check: Mutex<Option<String>>,
}

/// This box's board: the hardware board its device tree names (a bundle built for the Pi
/// 4 family must not land on a Pi 5 running the two-family image), else (QEMU's `virt`,
/// an unknown board) the board its image was built for, /etc/pos-hub-board.
fn board() -> String {
    std::fs::read("/proc/device-tree/compatible")
        .ok()
        .and_then(|dt| bundle::board_of_dt_compatible(&dt))
        .map(String::from)
        .or_else(|| {
            std::fs::read_to_string("/etc/pos-hub-board")
                .map(|v| v.trim().to_string())
                .ok()
                .filter(|v| !v.is_empty())
        })
        .unwrap_or_else(|| "rpi".into())
}

impl Updater {
    pub fn new(
        cfg: UpdateConfig,
        channel: UpdateChannel,
        data_dir: &std::path::Path,
        store_id: String,
    ) -> Arc<Self> {
        let appliance = crate::system::under_init();
        let state_path = data_dir.join("update/state.json");
        let state = State::load(&state_path);
        let slots = Slots::appliance();
        let booted = if appliance {
            crate::system::boot_partition()
        } else {
            None
        };
        let default_slot = if appliance {
            slots.autoboot().ok().map(|a| a.default)
        } else {
            None
        };
        Arc::new(Updater {
            cfg,
            channel,
            running_version: crate::system::firmware_version(),
            board: board(),
            store_id,
            appliance,
            slots,
            state_path,
            state: Mutex::new(state),
            phase: Mutex::new(Phase::Idle),
            last_error: Mutex::new(None),
            received: AtomicU64::new(0),
            total: AtomicU64::new(0),
            busy: AtomicBool::new(false),
            booted,
            default_slot: Mutex::new(default_slot),
            last_check: Mutex::new(None),
        })
    }

    fn save(&self, st: &State) {
        if let Err(e) = st.save(&self.state_path) {
            tracing::error!(error = %e, "cannot save the update state");
        }
    }

    fn fail(&self, msg: String) -> String {
        tracing::error!(error = %msg, "update");
        *self.last_error.lock() = Some(msg.clone());
        *self.phase.lock() = Phase::Failed;
        msg
    }

    /// /status `update` section.
    pub fn status(&self) -> serde_json::Value {
        let st = self.state.lock().clone();
        let hist: Vec<_> = st.history.iter().rev().take(10).cloned().collect();
        serde_json::json!({
            "runningVersion": self.running_version,
            "board": self.board,
            "channel": match &self.channel { UpdateChannel::Stable => "stable".to_string(), UpdateChannel::Canary => "canary".to_string(), UpdateChannel::Pinned(v) => v.clone() },
            "bootedSlot": self.booted.map(slots::slot_name),
            "defaultSlot": self.default_slot.lock().map(slots::slot_name),
            "trial": self.booted.is_some() && *self.default_slot.lock() != self.booted,
            "phase": *self.phase.lock(),
            "progress": {"bytes": self.received.load(Ordering::Relaxed), "total": self.total.load(Ordering::Relaxed)},
            "pending": st.pending,
            "slots": st.slots,
            "lastError": *self.last_error.lock(),
            "lastCheck": *self.last_check.lock(),
            "badVersions": st.bad_versions,
            "history": hist,
            "url": self.cfg.url,
            "window": self.cfg.window.map(|(a, b)| format!("{:02}:{:02}-{:02}:{:02}", a / 60, a % 60, b / 60, b % 60)),
        })
    }

    /// At start (appliance only): record what this slot holds, then decide whether this
    /// is a trial boot (self-check, then commit or go back) or a return from a trial
    /// that never committed (record the failed version).
    pub fn start(
        self: &Arc<Self>,
        realms: Arc<crate::realm::Realms>,
        ca_pem: Option<String>,
        port: u16,
    ) {
        let Some(booted) = self.booted.filter(|_| self.appliance) else {
            return;
        };
        let default = *self.default_slot.lock();
        let mut st = self.state.lock().clone();
        st.slots
            .insert(booted.to_string(), self.running_version.clone());
        let trial = default != Some(booted);
        if let Some(p) = st.pending.clone() {
            if p.slot != booted {
                // We are back on the old slot: the trial did not commit.
                let reason = p.trial_failure.clone().unwrap_or_else(|| format!("the trial boot of {} did not commit (crash, hang, watchdog or power loss during the trial)", p.version));
                if p.rebooting {
                    tracing::error!(version = %p.version, %reason, "update rolled back to the previous slot");
                    st.bad_versions.retain(|b| b.version != p.version);
                    st.bad_versions.push(BadVersion {
                        version: p.version.clone(),
                        reason: reason.clone(),
                        at: super::now_rfc3339(),
                        reported: false,
                    });
                    st.record("rolled_back", &p.version, Some(reason.clone()));
                    st.pending = None;
                    *self.phase.lock() = Phase::RolledBack;
                    *self.last_error.lock() = Some(reason);
                } else {
                    // Written but the tryboot reboot was never asked for (power cut while
                    // writing or before rebooting): the slot is not trusted; install again.
                    st.record(
                        "abandoned",
                        &p.version,
                        Some("interrupted before its trial boot".into()),
                    );
                    st.slots.remove(&p.slot.to_string());
                    st.pending = None;
                }
            }
        }
        self.save(&st);
        *self.state.lock() = st;
        if trial {
            *self.phase.lock() = Phase::Trial;
            let me = self.clone();
            tokio::spawn(async move { me.trial(realms, ca_pem, port, booted).await });
        }
    }

    async fn trial(
        self: Arc<Self>,
        realms: Arc<crate::realm::Realms>,
        ca_pem: Option<String>,
        port: u16,
        booted: u32,
    ) {
        tracing::warn!(version = %self.running_version, slot = slots::slot_name(booted), "trial boot: checking this version before committing it");
        let check = tokio::time::timeout(
            self.cfg.trial_timeout,
            self_check(&realms, ca_pem.as_deref(), port, &self.state_path),
        )
        .await;
        let result = match check {
            Ok(r) => r,
            Err(_) => Err(format!(
                "self-check did not finish within {:?}",
                self.cfg.trial_timeout
            )),
        };
        match result {
            Ok(()) => match self.slots.make_default(booted) {
                Ok(()) => {
                    *self.default_slot.lock() = Some(booted);
                    let mut st = self.state.lock();
                    st.pending = None;
                    st.record(
                        "committed",
                        &self.running_version,
                        Some(format!("slot {}", slots::slot_name(booted))),
                    );
                    self.save(&st);
                    *self.phase.lock() = Phase::Committed;
                    tracing::warn!(version = %self.running_version, "update committed: this slot is now the default");
                }
                Err(e) => self.give_up_trial(format!("commit failed: {e}")),
            },
            Err(reason) => self.give_up_trial(format!("self-check failed: {reason}")),
        }
    }

    /// Records why the trial failed (for the old version to report) and reboots into
    /// the default (old) slot.
    fn give_up_trial(&self, reason: String) {
        tracing::error!(%reason, "trial boot failed: going back to the previous slot");
        {
            let mut st = self.state.lock();
            if let Some(p) = st.pending.as_mut() {
                p.trial_failure = Some(format!(
                    "{} on {}: {reason}",
                    self.running_version, self.board
                ));
            } else {
                st.pending = Some(Pending {
                    version: self.running_version.clone(),
                    slot: self.booted.unwrap_or(0),
                    rebooting: true,
                    trial_failure: Some(reason.clone()),
                });
            }
            self.save(&st);
        }
        self.fail(reason);
        let _ = std::fs::remove_file("/run/reboot-param");
        if let Err(e) = crate::system::request(crate::system::Down::Reboot) {
            tracing::error!(error = %e, "cannot reboot to roll back");
        }
    }

    /// Installs a bundle read from `src` into the inactive slot (blocking). With
    /// `reboot_now` (or no maintenance window configured) it then reboots into the trial.
    pub fn install_blocking(
        &self,
        src: impl Read,
        force: bool,
        reboot_now: bool,
    ) -> Result<Manifest, String> {
        if self.busy.swap(true, Ordering::SeqCst) {
            return Err("another install is running".into());
        }
        let r = self.install_inner(src, force);
        self.busy.store(false, Ordering::SeqCst);
        let m = r.map_err(|e| self.fail(e))?;
        if reboot_now || self.cfg.window.is_none() || self.in_window_now() {
            self.reboot_into_trial()?;
        }
        Ok(m)
    }

    fn install_inner(&self, src: impl Read, force: bool) -> Result<Manifest, String> {
        if !self.appliance {
            return Err("updates are installed only on the appliance (pos-hub as init)".into());
        }
        let booted = self.booted.ok_or("cannot tell which slot is booted")?;
        if *self.default_slot.lock() != Some(booted) {
            return Err(
                "this is a trial boot: it must commit (or roll back) before another update".into(),
            );
        }
        let keys = bundle::load_keys(&self.cfg.keys_dir).map_err(|e| e.to_string())?;
        let mut r = std::io::BufReader::with_capacity(256 * 1024, src);
        let m = bundle::read_header(&mut r, &keys).map_err(|e| e.to_string())?;
        bundle::check_compatible(&m, &self.board, &self.running_version)
            .map_err(|e| e.to_string())?;
        if !force && self.state.lock().is_bad(&m.version) {
            return Err(format!(
                "version {} failed its trial on this box before; not retried without force",
                m.version
            ));
        }
        if m.version == self.running_version && !force {
            return Err(format!("version {} is already running", m.version));
        }
        let target = slots::other(booted);
        let dev = self.slots.device(target)?;
        *self.phase.lock() = Phase::Downloading;
        *self.last_error.lock() = None;
        self.total.store(m.payload_size, Ordering::Relaxed);
        self.received.store(0, Ordering::Relaxed);
        {
            let mut st = self.state.lock();
            st.slots.remove(&target.to_string());
            st.pending = Some(Pending {
                version: m.version.clone(),
                slot: target,
                rebooting: false,
                trial_failure: None,
            });
            st.record(
                "installing",
                &m.version,
                Some(format!("slot {}", slots::slot_name(target))),
            );
            self.save(&st);
        }
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&dev)
            .map_err(|e| format!("{}: {e}", dev.display()))?;
        let cap = crate::system::disk::dev_bytes(&dev).unwrap_or(u64::MAX);
        tracing::info!(version = %m.version, slot = slots::slot_name(target), bytes = m.payload_size, "installing update");
        let t = std::time::Instant::now();
        let res = bundle::stream_payload(&mut r, &m, &mut f, cap, |n| {
            self.received.store(n, Ordering::Relaxed)
        })
        .map_err(|e| e.to_string());
        let synced = f
            .sync_all()
            .map_err(|e| format!("{}: sync: {e}", dev.display()));
        if let Err(e) = res.and(synced) {
            let mut st = self.state.lock();
            st.pending = None;
            st.record("install_failed", &m.version, Some(e.clone()));
            self.save(&st);
            return Err(e);
        }
        let mut st = self.state.lock();
        st.slots.insert(target.to_string(), m.version.clone());
        st.record(
            "installed",
            &m.version,
            Some(format!(
                "slot {} in {:.1} s",
                slots::slot_name(target),
                t.elapsed().as_secs_f64()
            )),
        );
        self.save(&st);
        *self.phase.lock() = Phase::Installed;
        tracing::warn!(version = %m.version, secs = t.elapsed().as_secs_f64(), "update written and verified");
        Ok(m)
    }

    /// Marks the pending install as rebooting and asks init for `0 tryboot`.
    pub fn reboot_into_trial(&self) -> Result<(), String> {
        {
            let mut st = self.state.lock();
            let Some(p) = st.pending.as_mut() else {
                return Err("no installed update waits for its trial".into());
            };
            p.rebooting = true;
            self.save(&st);
        }
        std::fs::write("/run/reboot-param", "0 tryboot")
            .map_err(|e| format!("/run/reboot-param: {e}"))?;
        *self.phase.lock() = Phase::Rebooting;
        tracing::warn!("rebooting into the trial of the new slot (0 tryboot)");
        crate::system::request_after(crate::system::Down::Reboot, Duration::from_millis(500))
    }

    /// Makes the other slot the default again (it must hold a version that ran here)
    /// and reboots into it.
    pub fn rollback(&self) -> Result<String, String> {
        let booted = self.booted.ok_or("rollback works only on the appliance")?;
        let other = slots::other(booted);
        let version = self
            .state
            .lock()
            .slots
            .get(&other.to_string())
            .cloned()
            .ok_or_else(|| {
                format!(
                    "slot {} holds no known previous version",
                    slots::slot_name(other)
                )
            })?;
        let dev = self.slots.device(other)?;
        let mut bs = [0u8; 512];
        std::fs::File::open(&dev)
            .and_then(|mut f| f.read_exact(&mut bs))
            .map_err(|e| format!("{}: {e}", dev.display()))?;
        if bs[510] != 0x55 || bs[511] != 0xAA {
            return Err(format!(
                "slot {} is not bootable (invalid)",
                slots::slot_name(other)
            ));
        }
        self.slots.make_default(other)?;
        *self.default_slot.lock() = Some(other);
        {
            let mut st = self.state.lock();
            st.record(
                "rollback",
                &version,
                Some(format!("from {} by command", self.running_version)),
            );
            self.save(&st);
        }
        let _ = std::fs::remove_file("/run/reboot-param");
        crate::system::request_after(crate::system::Down::Reboot, Duration::from_millis(500))?;
        Ok(version)
    }

    fn in_window_now(&self) -> bool {
        let Some(w) = self.cfg.window else {
            return true;
        };
        let secs = crate::util::now_secs() + i64::from(self.cfg.tz_offset_minutes) * 60;
        in_window(w, (secs.rem_euclid(86_400) / 60) as u32)
    }

    /// Downloads `url` (resuming after a dropped connection) and installs it.
    pub async fn install_url(
        self: &Arc<Self>,
        url: String,
        force: bool,
        now: bool,
    ) -> Result<Manifest, String> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<std::io::Result<bytes_chunk::Chunk>>(16);
        let dl = tokio::spawn(download(url, tx));
        let me = self.clone();
        let res = tokio::task::spawn_blocking(move || {
            me.install_blocking(ChannelReader::new(rx), force, now)
        })
        .await
        .map_err(|e| format!("install task: {e}"))?;
        dl.abort();
        res
    }

    /// Installs a bundle arriving as an HTTP request body.
    pub async fn install_stream<S, E>(
        self: &Arc<Self>,
        mut body: S,
        force: bool,
        now: bool,
    ) -> Result<Manifest, String>
    where
        S: futures_util::Stream<Item = Result<axum::body::Bytes, E>> + Unpin + Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        use futures_util::StreamExt;
        let (tx, rx) = std::sync::mpsc::sync_channel::<std::io::Result<bytes_chunk::Chunk>>(16);
        let feeder = tokio::spawn(async move {
            // Once the installer refused the bundle, the rest of the upload is read and
            // dropped, so the client gets the answer rather than a broken pipe.
            let mut refused = false;
            while let Some(c) = body.next().await {
                if refused {
                    if c.is_err() {
                        break;
                    }
                    continue;
                }
                let item = c
                    .map(|b| b.to_vec())
                    .map_err(|e| std::io::Error::other(e.to_string()));
                let stop = item.is_err();
                let tx2 = tx.clone();
                if tokio::task::spawn_blocking(move || tx2.send(item))
                    .await
                    .map(|r| r.is_err())
                    .unwrap_or(true)
                {
                    refused = true;
                }
                if stop {
                    break;
                }
            }
        });
        let me = self.clone();
        let res = tokio::task::spawn_blocking(move || {
            me.install_blocking(ChannelReader::new(rx), force, now)
        })
        .await
        .map_err(|e| format!("install task: {e}"))?;
        let _ = tokio::time::timeout(Duration::from_secs(120), feeder).await;
        res
    }

    /// Polls the channel file forever (first check after a minute, then every interval
    /// with jitter). Reports failed versions to `<UPDATE_URL>/report`.
    pub async fn poll_loop(self: Arc<Self>) {
        let Some(base) = self.cfg.url.clone() else {
            return;
        };
        let mut first = true;
        loop {
            let jitter = rand::random::<f64>() * 0.2 + 0.9;
            let wait = if first {
                Duration::from_secs(60).min(self.cfg.interval)
            } else {
                self.cfg.interval.mul_f64(jitter)
            };
            first = false;
            tokio::time::sleep(wait).await;
            match self.check(&base, false).await {
                Ok(msg) => tracing::info!(%msg, "update check"),
                Err(e) => tracing::warn!(error = %e, "update check failed"),
            }
        }
    }

    /// One channel check; installs when a newer version is offered to this store (in
    /// the window unless `now`). Returns what it decided.
    pub async fn check(self: &Arc<Self>, base: &str, now: bool) -> Result<String, String> {
        self.report_failures(base).await;
        let name = match &self.channel {
            UpdateChannel::Stable => "stable".to_string(),
            UpdateChannel::Canary => "canary".to_string(),
            UpdateChannel::Pinned(v) => v.clone(),
        };
        let url = format!("{base}/{name}.json");
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| e.to_string())?;
        let resp = client
            .get(&url)
            .send()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("{url}: HTTP {}", resp.status()));
        }
        let text = resp.text().await.map_err(|e| format!("{url}: {e}"))?;
        let ch = parse_channel(&text).map_err(|e| format!("{url}: {e}"))?;
        *self.last_check.lock() = Some(format!("{} at {}", ch.version, super::now_rfc3339()));
        let pinned = matches!(self.channel, UpdateChannel::Pinned(_));
        if ch.version == self.running_version {
            return Ok(format!("up to date ({})", ch.version));
        }
        if !pinned
            && bundle::version_cmp(&ch.version, &self.running_version)
                != std::cmp::Ordering::Greater
        {
            return Ok(format!(
                "channel offers {} (not newer than {})",
                ch.version, self.running_version
            ));
        }
        if self.state.lock().is_bad(&ch.version) {
            return Ok(format!("{} failed here before; not retried", ch.version));
        }
        if !pinned && !now && !in_wave(&self.store_id, ch.rollout.unwrap_or(100.0)) {
            return Ok(format!(
                "{} is rolling out to {}% of stores; not this one yet",
                ch.version,
                ch.rollout.unwrap_or(100.0)
            ));
        }
        if !now && !self.in_window_now() {
            return Ok(format!("{} waits for the maintenance window", ch.version));
        }
        let bundle_url = bundle_url(base, &ch.url);
        if let Some(size) = ch.size {
            self.total.store(size, Ordering::Relaxed);
        }
        let m = self.install_url(bundle_url, false, true).await?;
        Ok(format!("installed {}; rebooting into its trial", m.version))
    }

    async fn report_failures(&self, base: &str) {
        let todo: Vec<BadVersion> = self
            .state
            .lock()
            .bad_versions
            .iter()
            .filter(|b| !b.reported)
            .cloned()
            .collect();
        for b in todo {
            let body = serde_json::json!({"storeId": self.store_id, "board": self.board, "runningVersion": self.running_version, "failedVersion": b.version, "reason": b.reason, "at": b.at});
            let ok = reqwest::Client::new()
                .post(format!("{base}/report"))
                .timeout(Duration::from_secs(15))
                .json(&body)
                .send()
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            if ok {
                let mut st = self.state.lock();
                for x in st
                    .bad_versions
                    .iter_mut()
                    .filter(|x| x.version == b.version)
                {
                    x.reported = true;
                }
                self.save(&st);
            }
        }
    }
}

/// `<UPDATE_URL>/<channel>.json`, as written by scripts/publish-update.
#[doc(hidden)]
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChannelFile {
    pub version: String,
    pub url: String,
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub rollout: Option<f64>,
}

/// Parses a channel file (also the entry point of fuzz/).
#[doc(hidden)]
pub fn parse_channel(text: &str) -> Result<ChannelFile, String> {
    if text.len() > 64 * 1024 {
        return Err("channel file too large".into());
    }
    serde_json::from_str(text).map_err(|e| format!("not a channel file: {e}"))
}

/// Where the bundle a channel file names is: its `url` as is when absolute, else
/// under `base`.
#[doc(hidden)]
pub fn bundle_url(base: &str, url: &str) -> String {
    if url.starts_with("http://") || url.starts_with("https://") {
        url.to_string()
    } else {
        format!("{base}/{}", url.trim_start_matches('/'))
    }
}

#[allow(clippy::unnecessary_cast)] // statvfs field types differ between targets
/// The trial self-check: every database takes a write, TLS serves with the store CA,
/// the data partition takes a synced write, and the image was not built to fail.
async fn self_check(
    realms: &crate::realm::Realms,
    ca_pem: Option<&str>,
    port: u16,
    state_path: &std::path::Path,
) -> Result<(), String> {
    if std::path::Path::new("/etc/pos-hub/selfcheck-fail").exists() {
        return Err("this image was built to fail its self-check (test build)".into());
    }
    for r in realms.iter() {
        r.check()
            .await
            .map_err(|e| format!("realm {}: {e}", r.key()))?;
    }
    if let Some(pem) = ca_pem {
        tls_probe(pem, port).await?;
    }
    let probe = state_path.with_file_name("selfcheck.probe");
    tokio::task::spawn_blocking(move || -> Result<(), String> {
        use std::io::Write;
        let mut f = std::fs::File::create(&probe).map_err(|e| format!("data partition: {e}"))?;
        f.write_all(b"pos-hub self-check\n")
            .map_err(|e| format!("data partition: {e}"))?;
        f.sync_all().map_err(|e| format!("data partition: {e}"))?;
        let back = std::fs::read(&probe).map_err(|e| format!("data partition: {e}"))?;
        let _ = std::fs::remove_file(&probe);
        if back != b"pos-hub self-check\n" {
            return Err("data partition returned other bytes than written".into());
        }
        let s = nix::sys::statvfs::statvfs(probe.parent().unwrap_or(std::path::Path::new("/")))
            .map_err(|e| e.to_string())?;
        let free = s.blocks_available() as u64 * s.fragment_size() as u64;
        if free < 8 << 20 {
            return Err(format!("data partition nearly full ({free} bytes free)"));
        }
        Ok(())
    })
    .await
    .map_err(|e| e.to_string())?
}

/// A TLS handshake with our own port, trusting only the store CA.
async fn tls_probe(ca_pem: &str, port: u16) -> Result<(), String> {
    let ca = pem::parse(ca_pem).map_err(|e| format!("store CA: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(
            ca.contents().to_vec(),
        ))
        .map_err(|e| format!("store CA: {e}"))?;
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let conn = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("TLS probe: connect: {e}"))?;
    let name = rustls::pki_types::ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    tokio::time::timeout(Duration::from_secs(10), conn.connect(name, tcp))
        .await
        .map_err(|_| "TLS probe: handshake timed out".to_string())?
        .map_err(|e| format!("TLS probe: handshake: {e}"))?;
    Ok(())
}

mod bytes_chunk {
    pub type Chunk = Vec<u8>;
}

/// A blocking reader over chunks sent from an async task.
struct ChannelReader {
    rx: std::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>,
    buf: Vec<u8>,
    pos: usize,
}

impl ChannelReader {
    fn new(rx: std::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>) -> Self {
        ChannelReader {
            rx,
            buf: Vec::new(),
            pos: 0,
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos >= self.buf.len() {
            match self.rx.recv() {
                Ok(Ok(b)) => {
                    self.buf = b;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Streams `url` into `tx`, resuming with `Range` after a dropped connection (5 tries).
async fn download(url: String, tx: std::sync::mpsc::SyncSender<std::io::Result<Vec<u8>>>) {
    use futures_util::StreamExt;
    let client = match reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(15))
        .read_timeout(Duration::from_secs(60))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.send(Err(std::io::Error::other(e.to_string())));
            return;
        }
    };
    let mut got: u64 = 0;
    let mut tries = 0;
    loop {
        tries += 1;
        let mut req = client.get(&url);
        if got > 0 {
            req = req.header("Range", format!("bytes={got}-"));
        }
        let err = match req.send().await {
            Ok(resp) if resp.status().is_success() => {
                let mut skip = if got > 0 && resp.status() != reqwest::StatusCode::PARTIAL_CONTENT {
                    got
                } else {
                    0
                };
                let mut stream = resp.bytes_stream();
                let mut failed = None;
                while let Some(c) = stream.next().await {
                    match c {
                        Ok(b) => {
                            let mut b = b.to_vec();
                            if skip > 0 {
                                let s = (skip as usize).min(b.len());
                                b.drain(..s);
                                skip -= s as u64;
                            }
                            if b.is_empty() {
                                continue;
                            }
                            got += b.len() as u64;
                            let tx2 = tx.clone();
                            let sent = tokio::task::spawn_blocking(move || tx2.send(Ok(b))).await;
                            if !matches!(sent, Ok(Ok(()))) {
                                return; // the installer stopped reading
                            }
                        }
                        Err(e) => {
                            failed = Some(e.to_string());
                            break;
                        }
                    }
                }
                match failed {
                    None => return, // complete: dropping tx ends the reader
                    Some(e) => e,
                }
            }
            Ok(resp) => format!("HTTP {}", resp.status()),
            Err(e) => e.to_string(),
        };
        if tries >= 5 {
            let _ = tx.send(Err(std::io::Error::other(format!(
                "download {url}: {err} (gave up after {tries} tries)"
            ))));
            return;
        }
        tracing::warn!(%url, error = %err, received = got, "download interrupted; resuming");
        tokio::time::sleep(Duration::from_secs(2u64.pow(tries))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;

    /// A one-file HTTP server that drops the first connection halfway through the
    /// body; later requests get the rest (206 for a Range) or, with
    /// `honour_range` off, the whole body again (200). Returns the Range headers seen.
    fn flaky_server(
        body: Vec<u8>,
        honour_range: bool,
    ) -> (String, std::thread::JoinHandle<Vec<Option<String>>>) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}/b.bundle", l.local_addr().expect("addr"));
        let h = std::thread::spawn(move || {
            let mut ranges = Vec::new();
            for (i, conn) in l.incoming().enumerate() {
                let Ok(mut c) = conn else { break };
                let mut range = None;
                let mut r = BufReader::new(c.try_clone().expect("clone"));
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                        range = Some(v.trim().trim_end_matches('-').to_string());
                    }
                }
                ranges.push(range.clone());
                let from = match (&range, honour_range) {
                    (Some(r), true) => r.parse::<usize>().expect("range"),
                    _ => 0,
                };
                let status = if from > 0 {
                    "206 Partial Content"
                } else {
                    "200 OK"
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len() - from
                );
                let _ = c.write_all(head.as_bytes());
                if i == 0 {
                    // The connection drops halfway.
                    let _ = c.write_all(&body[..body.len() / 2]);
                    let _ = c.flush();
                    drop(c);
                    continue;
                }
                let _ = c.write_all(&body[from..]);
                break;
            }
            ranges
        });
        (url, h)
    }

    async fn fetch_all(url: String) -> Vec<u8> {
        let (tx, rx) = std::sync::mpsc::sync_channel(64);
        let reader = std::thread::spawn(move || {
            let mut out = Vec::new();
            ChannelReader::new(rx)
                .read_to_end(&mut out)
                .map(|_| out)
                .map_err(|e| e.to_string())
        });
        download(url, tx).await;
        reader.join().expect("reader").expect("download")
    }

    fn body() -> Vec<u8> {
        (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[tokio::test]
    async fn download_resumes_with_range_after_a_dropped_connection() {
        let b = body();
        let (url, server) = flaky_server(b.clone(), true);
        let got = fetch_all(url).await;
        let ranges = server.join().expect("server");
        assert_eq!(ranges.len(), 2);
        assert_eq!(ranges[0], None);
        let resumed_at: usize = ranges[1]
            .as_deref()
            .expect("a Range request")
            .parse()
            .expect("n");
        assert!(
            resumed_at > 0 && resumed_at <= b.len() / 2,
            "resumed at {resumed_at}"
        );
        assert!(got == b, "the resumed download differs from the file");
    }

    #[tokio::test]
    async fn download_skips_what_it_has_when_the_server_ignores_range() {
        let b = body();
        let (url, server) = flaky_server(b.clone(), false);
        let got = fetch_all(url).await;
        let ranges = server.join().expect("server");
        assert!(ranges[1].is_some());
        assert!(got == b, "the download differs from the file");
    }
}
