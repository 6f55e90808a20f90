//! The cloud bridge's knobs (CLOUD_TIMEOUT, CLOUD_FEED_WAIT, CLOUD_BACKOFF_MAX,
//! CLOUD_PUSH_BATCH, CLOUD_PUSH_MAX_RATE, CLOUD_PUSH_BUSY_RATE), one set for every realm,
//! validated with the rest of the configuration. The bridge uses them as
//! `crate::bridge::Tuning`.

use std::time::Duration;

use super::{err, number, parse_duration, ConfigError, Settings};

/// The bridge's knobs (validated with the rest of the configuration).
#[derive(Debug, Clone, PartialEq)]
pub struct Tuning {
    /// Cap of the exponential backoff (CLOUD_BACKOFF_MAX).
    pub backoff_max: Duration,
    /// Request timeout (CLOUD_TIMEOUT); a feed long-poll adds `feed_wait`.
    pub timeout: Duration,
    /// How long the cloud may hold a feed long-poll (CLOUD_FEED_WAIT, 0-30 s).
    pub feed_wait: Duration,
    /// Events per push request (CLOUD_PUSH_BATCH, 1-500: smaller bursts keep the
    /// LAN's latency while catching up).
    pub push_batch: usize,
    /// Events/s pushed at most while no device is writing (CLOUD_PUSH_MAX_RATE).
    pub max_rate: f64,
    /// Events/s pushed at most while devices are writing (CLOUD_PUSH_BUSY_RATE).
    pub busy_rate: f64,
    /// The NATS target's settings (CLOUD_NATS_*), used when the URL is `nats://`.
    /// (Parsed by the bridge's JetStream module, which owns the NATS URL and creds
    /// formats: the one edge from config up to bridge left.)
    pub nats: super::nats::NatsSettings,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            backoff_max: Duration::from_secs(60),
            timeout: Duration::from_secs(30),
            feed_wait: Duration::from_secs(25),
            push_batch: 100,
            max_rate: 20_000.0,
            busy_rate: 1_000.0,
            nats: super::nats::NatsSettings::default(),
        }
    }
}

impl Tuning {
    /// The knobs from the settings, each bad value refused with its key.
    pub fn from_settings(s: &Settings) -> Result<Self, ConfigError> {
        let num =
            |key: &str, default: usize, min: usize, max: usize| number(s, key, default, min, max);
        let d = Tuning::default();
        let dur_or = |key: &str, default: Duration| match s.get(key) {
            None => Ok(default),
            Some(v) => parse_duration(key, v),
        };
        let feed_wait = dur_or("CLOUD_FEED_WAIT", d.feed_wait)?;
        if feed_wait > Duration::from_secs(30) {
            return Err(err("CLOUD_FEED_WAIT", "must be at most 30s"));
        }
        Ok(Tuning {
            backoff_max: dur_or("CLOUD_BACKOFF_MAX", d.backoff_max)?.max(Duration::from_millis(1)),
            timeout: dur_or("CLOUD_TIMEOUT", d.timeout)?.max(Duration::from_millis(100)),
            feed_wait,
            push_batch: num("CLOUD_PUSH_BATCH", d.push_batch, 1, 500)?,
            max_rate: num("CLOUD_PUSH_MAX_RATE", d.max_rate as usize, 1, 10_000_000)? as f64,
            busy_rate: num("CLOUD_PUSH_BUSY_RATE", d.busy_rate as usize, 1, 10_000_000)? as f64,
            nats: super::nats::settings_from(s)?,
        })
    }
}
