//! Over-the-air A/B updates: signed bundles ([`bundle`]) streamed into the inactive
//! boot slot ([`slots`]), a `0 tryboot` reboot, a self-check on the trial boot that
//! commits the slot or sends the box back to the old one, and channel polling with
//! rollout waves and a maintenance window ([`agent`]).
//!
//! State that must survive reboots and rollbacks lives in `<data>/update/state.json`
//! on the data partition, shared by both slots; every version reads what the other
//! wrote (unknown fields are kept as they are not needed).

pub mod agent;
pub mod bundle;
pub mod cmd;
pub mod slots;

use std::path::Path;

use serde::{Deserialize, Serialize};

pub use crate::config::update::{parse_window, UpdateConfig};
pub use agent::Updater;

/// Whether `minute_of_day` (local) falls in `window` (start inclusive, end exclusive).
pub fn in_window(window: (u32, u32), minute_of_day: u32) -> bool {
    let (a, b) = window;
    if a <= b {
        (a..b).contains(&minute_of_day)
    } else {
        minute_of_day >= a || minute_of_day < b
    }
}

/// A store is in a rollout wave when a hash of its store id falls under the percentage.
pub fn in_wave(store_id: &str, rollout_percent: f64) -> bool {
    use sha2::Digest;
    let h = sha2::Sha256::digest(store_id.as_bytes());
    let bucket = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) % 10_000;
    (bucket as f64) < rollout_percent * 100.0
}

/// A version this box tried and that failed; not retried automatically.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BadVersion {
    pub version: String,
    pub reason: String,
    pub at: String,
    #[serde(default)]
    pub reported: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntry {
    pub at: String,
    pub event: String,
    pub version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A version written to a slot and waiting for (or in) its trial boot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Pending {
    pub version: String,
    pub slot: u32,
    /// The tryboot reboot was asked for.
    #[serde(default)]
    pub rebooting: bool,
    /// Written by the new version when its self-check failed, before rebooting.
    #[serde(default)]
    pub trial_failure: Option<String>,
}

/// Persistent update state (`<data>/update/state.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct State {
    #[serde(default)]
    pub pending: Option<Pending>,
    #[serde(default)]
    pub bad_versions: Vec<BadVersion>,
    #[serde(default)]
    pub history: Vec<HistoryEntry>,
    /// Version known to be in each slot ("2", "3").
    #[serde(default)]
    pub slots: std::collections::BTreeMap<String, String>,
}

impl State {
    pub fn load(path: &Path) -> State {
        std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub fn save(&self, path: &Path) -> Result<(), String> {
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| e.to_string())?;
        crate::util::write_atomic(path, &bytes, 0o644)
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn record(&mut self, event: &str, version: &str, detail: Option<String>) {
        self.history.push(HistoryEntry {
            at: now_rfc3339(),
            event: event.into(),
            version: version.into(),
            detail,
        });
        let n = self.history.len();
        if n > 50 {
            self.history.drain(..n - 50);
        }
    }

    pub fn is_bad(&self, version: &str) -> bool {
        self.bad_versions.iter().any(|b| b.version == version)
    }
}

pub fn now_rfc3339() -> String {
    httpdate::fmt_http_date(std::time::SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_and_offsets() {
        assert_eq!(parse_window("02:00-05:00"), Some((120, 300)));
        assert_eq!(parse_window("23:30-01:00"), Some((1410, 60)));
        assert!(parse_window("2-5").is_none());
        assert!(parse_window("25:00-01:00").is_none());
        assert!(
            in_window((120, 300), 120) && in_window((120, 300), 299) && !in_window((120, 300), 300)
        );
        assert!(
            in_window((1410, 60), 1430) && in_window((1410, 60), 10) && !in_window((1410, 60), 600)
        );
    }

    #[test]
    fn waves_are_stable_and_proportional() {
        assert!(!in_wave("s-001", 0.0));
        assert!(in_wave("s-001", 100.0));
        assert_eq!(in_wave("s-001", 37.0), in_wave("s-001", 37.0));
        let n = (0..2000)
            .filter(|i| in_wave(&format!("s-{i}"), 25.0))
            .count();
        assert!((400..600).contains(&n), "about a quarter of stores: {n}");
    }

    #[test]
    fn state_round_trips_and_tolerates_garbage() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("update/state.json");
        assert_eq!(State::load(&p), State::default());
        let mut s = State::default();
        s.record("installed", "0.2.0", None);
        s.bad_versions.push(BadVersion {
            version: "0.3.0".into(),
            reason: "x".into(),
            at: "t".into(),
            reported: false,
        });
        s.save(&p).unwrap();
        assert_eq!(State::load(&p), s);
        assert!(State::load(&p).is_bad("0.3.0"));
        std::fs::write(&p, "{garbage").unwrap();
        assert_eq!(State::load(&p), State::default());
    }
}
