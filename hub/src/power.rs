//! Power: watches a UPS and shuts the hub down gracefully before the battery dies.
//!
//! Sources (any of them configured): a NUT server (`UPS_NUT=ups@host:port`, the
//! NUT wire protocol over TCP) and the kernel's `power_supply` class
//! (`UPS_POWER_SUPPLY=/sys/class/power_supply`, for UPS HATs), and a HAT's
//! power-fail GPIO line (`UPS_GPIO=gpiochip0:17`, gpiocdev). On battery the
//! realm's devices get a `hub.power` event and `/status` says so; on low battery,
//! forced shutdown (FSD), a UPS that goes silent while on battery (as NUT's
//! upsmon does), or on battery longer than `UPS_SHUTDOWN_AFTER`, the hub asks
//! `serve` to shut down: stop taking events, commit, close databases, exit.
//! Power back before then cancels it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::util::now_ms;

/// Where power readings come from. Its Debug form (shown in `/status` and logs)
/// never includes the NUT password.
#[derive(Clone, PartialEq, Eq)]
pub enum Source {
    Nut {
        ups: String,
        host: String,
        port: u16,
        user: Option<String>,
        password: Option<String>,
    },
    PowerSupply(PathBuf),
    /// A UPS HAT's power-fail GPIO line: active = mains lost (on battery).
    Gpio {
        chip: PathBuf,
        line: u32,
        active_low: bool,
    },
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Nut {
                ups,
                host,
                port,
                user,
                password,
            } => f
                .debug_struct("Nut")
                .field("ups", ups)
                .field("host", host)
                .field("port", port)
                .field("user", user)
                .field("password", &password.as_ref().map(|_| "<set>"))
                .finish(),
            Source::PowerSupply(p) => f.debug_tuple("PowerSupply").field(p).finish(),
            Source::Gpio {
                chip,
                line,
                active_low,
            } => f
                .debug_struct("Gpio")
                .field("chip", chip)
                .field("line", line)
                .field("active_low", active_low)
                .finish(),
        }
    }
}

impl Source {
    /// Parses `gpiochipN:LINE` or `/dev/gpiochipN:LINE`.
    pub fn parse_gpio(v: &str, active_low: bool) -> Option<Self> {
        let (chip, line) = v.rsplit_once(':')?;
        let line = line.parse().ok()?;
        if chip.is_empty() {
            return None;
        }
        let chip = if chip.starts_with('/') {
            PathBuf::from(chip)
        } else {
            PathBuf::from("/dev").join(chip)
        };
        Some(Source::Gpio {
            chip,
            line,
            active_low,
        })
    }

    /// Parses `ups@host[:port]`.
    pub fn parse_nut(v: &str, user: Option<String>, password: Option<String>) -> Option<Self> {
        let (ups, rest) = v.split_once('@')?;
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() => (h.to_string(), p.parse().ok()?),
            _ => (rest.to_string(), 3493),
        };
        if ups.is_empty() || host.is_empty() {
            return None;
        }
        Some(Source::Nut {
            ups: ups.to_string(),
            host,
            port,
            user,
            password,
        })
    }
}

/// Settings of the power watcher.
#[derive(Debug, Clone)]
pub struct PowerConfig {
    pub sources: Vec<Source>,
    pub shutdown_after: Duration,
    pub poll: Duration,
    /// A source silent this long while last seen on battery counts as critical.
    pub deadtime: Duration,
    pub low_capacity: u8,
}

/// One reading of one source.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reading {
    pub on_battery: bool,
    pub low: bool,
    pub fsd: bool,
    pub raw: String,
}

/// Parses NUT's `ups.status` tokens (`OL`, `OB LB`, `FSD OB`...).
pub fn parse_status(tokens: &str) -> Reading {
    let mut r = Reading {
        raw: tokens.to_string(),
        ..Default::default()
    };
    for t in tokens.split_whitespace() {
        match t {
            "OB" => r.on_battery = true,
            "LB" => r.low = true,
            "FSD" => r.fsd = true,
            _ => {}
        }
    }
    r
}

/// Parses one NUT answer line to `GET VAR <ups> ups.status`.
pub fn parse_var_line(line: &str, ups: &str) -> Result<Reading, String> {
    let line = line.trim_end();
    if let Some(err) = line.strip_prefix("ERR ") {
        return Err(format!("NUT error {err}"));
    }
    let prefix = format!("VAR {ups} ups.status ");
    let v = line.strip_prefix(&prefix).ok_or_else(|| {
        format!(
            "unexpected answer from the NUT server: {:?}",
            line.chars().take(80).collect::<String>()
        )
    })?;
    let v = v
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .ok_or_else(|| "unquoted value from the NUT server".to_string())?;
    Ok(parse_status(&v.replace("\\\"", "\"").replace("\\\\", "\\")))
}

async fn nut_session(
    host: &str,
    port: u16,
    user: &Option<String>,
    password: &Option<String>,
) -> Result<BufReader<TcpStream>, String> {
    let s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect((host, port)))
        .await
        .map_err(|_| format!("connecting to NUT {host}:{port} timed out"))?
        .map_err(|e| format!("cannot connect to NUT {host}:{port}: {e}"))?;
    let mut s = BufReader::new(s);
    if let (Some(u), Some(p)) = (user, password) {
        for cmd in [format!("USERNAME {u}\n"), format!("PASSWORD {p}\n")] {
            let line = nut_ask(&mut s, &cmd).await?;
            if !line.starts_with("OK") {
                return Err(format!("NUT refused login: {}", line.trim()));
            }
        }
    }
    Ok(s)
}

async fn nut_ask(s: &mut BufReader<TcpStream>, cmd: &str) -> Result<String, String> {
    s.get_mut()
        .write_all(cmd.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_line(&mut line))
        .await
        .map_err(|_| "the NUT server did not answer within 5 s".to_string())?
        .map_err(|e| e.to_string())?;
    if n == 0 {
        return Err("the NUT server closed the connection".into());
    }
    if line.len() > 4096 {
        return Err("over-long line from the NUT server".into());
    }
    Ok(line)
}

/// Reads the power-fail line (requested once, kept open).
fn read_gpio(
    req: &mut Option<gpiocdev::Request>,
    chip: &std::path::Path,
    line: u32,
    active_low: bool,
) -> Result<Reading, String> {
    if req.is_none() {
        let mut b = gpiocdev::Request::builder();
        b.on_chip(chip)
            .with_consumer("pos-hub power-fail")
            .with_line(line)
            .as_input();
        if active_low {
            b.as_active_low();
        }
        *req = Some(
            b.request()
                .map_err(|e| format!("GPIO {}:{line}: {e}", chip.display()))?,
        );
    }
    let v = req
        .as_ref()
        .map(|r| r.value(line))
        .transpose()
        .map_err(|e| format!("GPIO {}:{line}: {e}", chip.display()))?
        .unwrap_or(gpiocdev::line::Value::Inactive);
    let failed = v == gpiocdev::line::Value::Active;
    Ok(Reading {
        on_battery: failed,
        low: false,
        fsd: false,
        raw: format!("gpio {}", if failed { "power-fail" } else { "ok" }),
    })
}

/// Reads a `power_supply` class directory.
pub fn read_power_supply(dir: &std::path::Path, low_capacity: u8) -> Result<Reading, String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    let mut r = Reading::default();
    let mut seen = false;
    let mut raw = Vec::new();
    for e in entries.flatten() {
        let p = e.path();
        let read = |f: &str| {
            std::fs::read_to_string(p.join(f))
                .map(|s| s.trim().to_string())
                .ok()
        };
        let Some(kind) = read("type") else { continue };
        seen = true;
        match kind.as_str() {
            "Mains" | "UPS" | "USB" if read("online").as_deref() == Some("0") => {
                r.on_battery = true
            }
            "Battery" => {
                let status = read("status").unwrap_or_default();
                if status == "Discharging" {
                    r.on_battery = true;
                }
                if let Some(c) = read("capacity").and_then(|c| c.parse::<u8>().ok()) {
                    if c <= low_capacity && status == "Discharging" {
                        r.low = true;
                    }
                    raw.push(format!("{}:{status}:{c}%", e.file_name().to_string_lossy()));
                }
            }
            _ => {}
        }
    }
    if !seen {
        return Err(format!("no power supplies in {}", dir.display()));
    }
    r.raw = raw.join(" ");
    Ok(r)
}

/// What `/status` shows.
#[derive(Debug, Clone, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct PowerStatus {
    pub state: &'static str,
    pub ups_status: String,
    pub on_battery_since_ms: Option<i64>,
    pub shutdown_reason: Option<String>,
    pub last_error: Option<String>,
    pub sources: Vec<String>,
}

/// The watcher's shared state.
#[derive(Default)]
pub struct Power {
    pub status: Mutex<PowerStatus>,
}

/// What a reading means for the box.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Online,
    OnBattery,
    Shutdown(String),
}

/// The decision rule, kept pure for tests: `since` is how long the box has been on
/// battery, `silent` how long the source has not answered while last seen on battery.
pub fn decide(
    r: Option<&Reading>,
    since: Option<Duration>,
    silent: Option<Duration>,
    cfg: &PowerConfig,
) -> Verdict {
    match r {
        Some(r) if r.fsd => Verdict::Shutdown("the UPS forces a shutdown (FSD)".into()),
        Some(r) if r.on_battery && r.low => {
            Verdict::Shutdown("on battery and the battery is low".into())
        }
        Some(r) if r.on_battery => match since {
            Some(d) if d >= cfg.shutdown_after => {
                Verdict::Shutdown(format!("on battery for {}s", d.as_secs()))
            }
            _ => Verdict::OnBattery,
        },
        Some(_) => Verdict::Online,
        None => match silent {
            Some(d) if d >= cfg.deadtime => Verdict::Shutdown(format!(
                "the UPS stopped answering while on battery ({}s)",
                d.as_secs()
            )),
            Some(_) => Verdict::OnBattery,
            None => Verdict::Online,
        },
    }
}

/// Polls the sources; calls `notice` on every change between on-line and on-battery
/// and returns the reason when the box must shut down.
pub async fn watch(
    cfg: PowerConfig,
    power: Arc<Power>,
    notice: impl Fn(&str, &PowerStatus),
) -> String {
    let mut nut: Option<BufReader<TcpStream>> = None;
    let mut gpio: Option<gpiocdev::Request> = None;
    let mut on_battery_since: Option<Instant> = None;
    let mut last_answer = Instant::now();
    let mut was = Verdict::Online;
    {
        let mut st = power.status.lock();
        st.state = "unknown";
        st.sources = cfg.sources.iter().map(|s| format!("{s:?}")).collect();
    }
    loop {
        // Read every source; the box is on battery if any says so.
        let mut reading: Option<Reading> = None;
        let mut error = None;
        for src in &cfg.sources {
            let r = match src {
                Source::Nut {
                    ups,
                    host,
                    port,
                    user,
                    password,
                } => {
                    if nut.is_none() {
                        match nut_session(host, *port, user, password).await {
                            Ok(s) => nut = Some(s),
                            Err(e) => error = Some(e),
                        }
                    }
                    match nut.as_mut() {
                        Some(s) => match nut_ask(s, &format!("GET VAR {ups} ups.status\n")).await {
                            Ok(line) => parse_var_line(&line, ups),
                            Err(e) => {
                                nut = None;
                                Err(e)
                            }
                        },
                        None => Err(error.clone().unwrap_or_default()),
                    }
                }
                Source::PowerSupply(dir) => read_power_supply(dir, cfg.low_capacity),
                Source::Gpio {
                    chip,
                    line,
                    active_low,
                } => {
                    let r = read_gpio(&mut gpio, chip, *line, *active_low);
                    if r.is_err() {
                        gpio = None; // request again next time
                    }
                    r
                }
            };
            match r {
                Ok(r) => {
                    let merged = match reading.take() {
                        None => r,
                        Some(mut a) => {
                            a.on_battery |= r.on_battery;
                            a.low |= r.low;
                            a.fsd |= r.fsd;
                            a.raw = format!("{} {}", a.raw, r.raw);
                            a
                        }
                    };
                    reading = Some(merged);
                }
                Err(e) => error = Some(e),
            }
        }
        if reading.is_some() {
            last_answer = Instant::now();
        }
        if let Some(r) = &reading {
            match (r.on_battery, on_battery_since) {
                (true, None) => on_battery_since = Some(Instant::now()),
                (false, Some(_)) => on_battery_since = None,
                _ => {}
            }
        }
        let silent =
            (reading.is_none() && on_battery_since.is_some()).then(|| last_answer.elapsed());
        let verdict = decide(
            reading.as_ref(),
            on_battery_since.map(|t| t.elapsed()),
            silent,
            &cfg,
        );
        let snapshot = {
            let mut st = power.status.lock();
            st.last_error = error.clone();
            if let Some(r) = &reading {
                st.ups_status = r.raw.clone();
            }
            st.state = match (&verdict, reading.is_some()) {
                (Verdict::Shutdown(_), _) => "critical",
                (Verdict::OnBattery, true) => "on_battery",
                (Verdict::OnBattery, false) => "stale",
                (Verdict::Online, true) => "online",
                (Verdict::Online, false) => "unknown",
            };
            st.on_battery_since_ms =
                on_battery_since.map(|t| now_ms() - t.elapsed().as_millis() as i64);
            if let Verdict::Shutdown(why) = &verdict {
                st.shutdown_reason = Some(why.clone());
            }
            st.clone()
        };
        if let Some(e) = &error {
            tracing::debug!(error = %e, "power source");
        }
        if verdict != was {
            match &verdict {
                Verdict::OnBattery => {
                    tracing::warn!(status = %snapshot.ups_status, "power: on battery")
                }
                Verdict::Online => {
                    tracing::info!(status = %snapshot.ups_status, "power: back on line")
                }
                Verdict::Shutdown(why) => {
                    tracing::error!(reason = %why, "power: shutting down before the battery dies")
                }
            }
            notice(snapshot.state, &snapshot);
            was = verdict.clone();
        }
        if let Verdict::Shutdown(why) = verdict {
            return why;
        }
        tokio::time::sleep(cfg.poll).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PowerConfig {
        PowerConfig {
            sources: vec![],
            shutdown_after: Duration::from_secs(300),
            poll: Duration::from_secs(2),
            deadtime: Duration::from_secs(15),
            low_capacity: 20,
        }
    }

    #[test]
    fn nut_lines() {
        assert!(
            !parse_var_line("VAR ups ups.status \"OL\"\n", "ups")
                .unwrap()
                .on_battery
        );
        let r = parse_var_line("VAR ups ups.status \"OB LB\"\n", "ups").unwrap();
        assert!(r.on_battery && r.low);
        assert!(parse_var_line("ERR DATA-STALE\n", "ups").is_err());
        assert!(parse_var_line("garbage \u{0}\n", "ups").is_err());
        assert!(parse_var_line("VAR other ups.status \"OB\"\n", "ups").is_err());
        assert!(parse_var_line("VAR ups ups.status OB\n", "ups").is_err());
    }

    #[test]
    fn decisions() {
        let c = cfg();
        let ob = parse_status("OB DISCHRG");
        assert_eq!(
            decide(Some(&parse_status("OL")), None, None, &c),
            Verdict::Online
        );
        assert_eq!(
            decide(Some(&ob), Some(Duration::from_secs(10)), None, &c),
            Verdict::OnBattery
        );
        assert!(matches!(
            decide(Some(&ob), Some(Duration::from_secs(301)), None, &c),
            Verdict::Shutdown(_)
        ));
        assert!(matches!(
            decide(Some(&parse_status("OB LB")), Some(Duration::ZERO), None, &c),
            Verdict::Shutdown(_)
        ));
        assert!(matches!(
            decide(Some(&parse_status("OL FSD")), None, None, &c),
            Verdict::Shutdown(_)
        ));
        assert_eq!(
            decide(
                None,
                Some(Duration::from_secs(3)),
                Some(Duration::from_secs(3)),
                &c
            ),
            Verdict::OnBattery
        );
        assert!(matches!(
            decide(
                None,
                Some(Duration::from_secs(20)),
                Some(Duration::from_secs(16)),
                &c
            ),
            Verdict::Shutdown(_)
        ));
        assert_eq!(decide(None, None, None, &c), Verdict::Online);
    }

    #[test]
    fn nut_source_parsing() {
        assert_eq!(
            Source::parse_nut("ups@127.0.0.1:3500", None, None),
            Some(Source::Nut {
                ups: "ups".into(),
                host: "127.0.0.1".into(),
                port: 3500,
                user: None,
                password: None
            })
        );
        assert!(matches!(
            Source::parse_nut("ups@nas", None, None),
            Some(Source::Nut { port: 3493, .. })
        ));
        assert_eq!(Source::parse_nut("nonsense", None, None), None);
        assert_eq!(
            Source::parse_gpio("gpiochip0:17", true),
            Some(Source::Gpio {
                chip: "/dev/gpiochip0".into(),
                line: 17,
                active_low: true
            })
        );
        assert!(Source::parse_gpio("gpiochip0", false).is_none());
        assert!(Source::parse_gpio("gpiochip0:x", false).is_none());
    }

    #[test]
    fn power_supply_dir() {
        let d = tempfile::tempdir().unwrap();
        let ac = d.path().join("AC");
        let bat = d.path().join("BAT0");
        std::fs::create_dir_all(&ac).unwrap();
        std::fs::create_dir_all(&bat).unwrap();
        std::fs::write(ac.join("type"), "Mains\n").unwrap();
        std::fs::write(ac.join("online"), "1\n").unwrap();
        std::fs::write(bat.join("type"), "Battery\n").unwrap();
        std::fs::write(bat.join("status"), "Charging\n").unwrap();
        std::fs::write(bat.join("capacity"), "90\n").unwrap();
        assert!(!read_power_supply(d.path(), 20).unwrap().on_battery);
        std::fs::write(ac.join("online"), "0\n").unwrap();
        std::fs::write(bat.join("status"), "Discharging\n").unwrap();
        std::fs::write(bat.join("capacity"), "15\n").unwrap();
        let r = read_power_supply(d.path(), 20).unwrap();
        assert!(r.on_battery && r.low);
        assert!(read_power_supply(&d.path().join("none"), 20).is_err());
    }
}
