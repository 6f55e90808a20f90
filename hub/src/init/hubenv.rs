//! The few `hub.env` keys init itself reads (HOSTNAME, NET_*, WATCHDOG*, PORT). The
//! file is the hub's to validate and report; init only needs a best effort.

use std::collections::HashMap;
use std::path::Path;

use super::bootlog::BootLog;
use super::CONFIG_DIR;

/// Reads hub.env for the few keys init itself uses. A garbled file is the hub's to
/// report (on the console and in /status); init carries on with defaults.
pub fn read_settings(log: &BootLog) -> HashMap<String, String> {
    let path = Path::new(CONFIG_DIR).join("hub.env");
    match std::fs::read_to_string(&path) {
        Ok(text) => crate::config::parse_env_file(&text).unwrap_or_else(|(line, m)| {
            log.line(format!(
                "{} line {line}: {m} (network on defaults; the hub reports the error)",
                path.display()
            ));
            HashMap::new()
        }),
        Err(e) => {
            log.line(format!("{}: {e} (defaults)", path.display()));
            HashMap::new()
        }
    }
}
