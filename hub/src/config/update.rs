//! The update settings: the channel a box follows (`UPDATE_CHANNEL`), where the channel
//! files are (`UPDATE_URL`), the maintenance window and time-zone offset, the polling
//! interval, the trial timeout and the trusted keys. The update agent
//! (`crate::update`) uses them.

use std::time::Duration;

use super::{err, parse_duration, ConfigError, Settings};

/// The update channel a box follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateChannel {
    Stable,
    Canary,
    Pinned(String),
}

impl UpdateChannel {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "stable" => Some(Self::Stable),
            "canary" => Some(Self::Canary),
            v => {
                let v = v.strip_prefix('v').unwrap_or(v);
                let ok = !v.is_empty()
                    && v.split('.').count() <= 4
                    && v.split('.').all(|p| {
                        !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    })
                    && v.starts_with(|c: char| c.is_ascii_digit());
                ok.then(|| Self::Pinned(v.to_string()))
            }
        }
    }
    pub fn as_str(&self) -> &str {
        match self {
            Self::Stable => "stable",
            Self::Canary => "canary",
            Self::Pinned(v) => v,
        }
    }
}

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
    // `then`, not `then_some`: the product must not be computed for an hour out of range
    // (it overflowed for a huge one; found by the fuzz target `env`).
    (h < 24 && m < 60).then(|| h * 60 + m)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_with_an_hour_out_of_range_is_refused_not_overflowed() {
        assert_eq!(parse_window("02:00-05:30"), Some((120, 330)));
        assert_eq!(parse_window("02:00-0533333333:300"), None);
        assert_eq!(parse_window("4294967295:00-01:00"), None);
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
    fn offsets() {
        assert_eq!(parse_offset("+01:00"), Some(60));
        assert_eq!(parse_offset("-05:30"), Some(-330));
    }
}
