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
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{err, parse_duration, ConfigError, Settings};

pub use agent::Updater;

/// Update settings (validated at start with everything else).
#[derive(Debug, Clone)]
pub struct UpdateConfig {
    /// Base URL of the channel files (`<UPDATE_URL>/<channel>.json`); none = no polling.
    pub url: Option<String>,
    /// Maintenance window, minutes after local midnight (start, end); may wrap.
    pub window: Option<(u32, u32)>,
    /// Local time = UTC + this offset (the box has no time-zone database).
    pub tz_offset_minutes: i32,
    pub interval: Duration,
    pub trial_timeout: Duration,
    /// Directory of trusted bundle keys (`<key id>.pub`).
    pub keys_dir: std::path::PathBuf,
}

impl UpdateConfig {
    pub fn from_settings(s: &Settings) -> Result<Self, ConfigError> {
        let url = match s.get("UPDATE_URL").map(str::trim).filter(|u| !u.is_empty()) {
            None => None,
            Some(u) if u.starts_with("http://") || u.starts_with("https://") => {
                Some(u.trim_end_matches('/').to_string())
            }
            Some(u) => return Err(err("UPDATE_URL", format!("{u:?} is not an http(s) URL"))),
        };
        let window = match s
            .get("UPDATE_WINDOW")
            .map(str::trim)
            .filter(|w| !w.is_empty())
        {
            None => None,
            Some(w) => Some(parse_window(w).ok_or_else(|| {
                err(
                    "UPDATE_WINDOW",
                    format!("{w:?} is not a window like 02:00-05:00"),
                )
            })?),
        };
        let tz_offset_minutes = match s
            .get("UPDATE_TZ_OFFSET")
            .map(str::trim)
            .filter(|w| !w.is_empty())
        {
            None => 0,
            Some(o) => parse_offset(o).ok_or_else(|| {
                err(
                    "UPDATE_TZ_OFFSET",
                    format!("{o:?} is not an offset like +01:00 or -05:00"),
                )
            })?,
        };
        let dur = |key: &str, default: u64| match s.get(key) {
            Some(v) => parse_duration(key, v),
            None => Ok(Duration::from_secs(default)),
        };
        Ok(UpdateConfig {
            url,
            window,
            tz_offset_minutes,
            interval: dur("UPDATE_INTERVAL", 3600)?.max(Duration::from_secs(10)),
            trial_timeout: dur("UPDATE_TRIAL_TIMEOUT", 120)?,
            keys_dir: s
                .get("UPDATE_KEYS_DIR")
                .unwrap_or("/etc/pos-hub/bundle-keys")
                .into(),
        })
    }
}

fn parse_hhmm(s: &str) -> Option<u32> {
    let (h, m) = s.trim().split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 60 + m)
}

pub fn parse_window(w: &str) -> Option<(u32, u32)> {
    let (a, b) = w.split_once('-')?;
    Some((parse_hhmm(a)?, parse_hhmm(b)?))
}

fn parse_offset(o: &str) -> Option<i32> {
    let (sign, rest) = match o.as_bytes().first()? {
        b'+' => (1, &o[1..]),
        b'-' => (-1, &o[1..]),
        _ => (1, o),
    };
    let m = parse_hhmm(rest)? as i32;
    Some(sign * m)
}

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
        assert_eq!(parse_offset("+01:00"), Some(60));
        assert_eq!(parse_offset("-05:30"), Some(-330));
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
    fn config_validation() {
        let mut s = Settings::default();
        s.set("UPDATE_WINDOW", "2am");
        assert!(UpdateConfig::from_settings(&s)
            .unwrap_err()
            .to_string()
            .contains("UPDATE_WINDOW"));
        let mut s = Settings::default();
        s.set("UPDATE_URL", "ftp://x");
        assert!(UpdateConfig::from_settings(&s).is_err());
        let mut s = Settings::default();
        s.set("UPDATE_URL", "http://10.0.2.100:8080/updates/");
        s.set("UPDATE_WINDOW", "02:00-05:00");
        let c = UpdateConfig::from_settings(&s).unwrap();
        assert_eq!(c.url.as_deref(), Some("http://10.0.2.100:8080/updates"));
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
