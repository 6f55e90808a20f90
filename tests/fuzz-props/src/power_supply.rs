//! `power_supply` class directories (a UPS HAT's driver writes them): the input's
//! lines `supply/file=value` become a directory; the reading must say on battery
//! exactly when a mains-like supply is offline or a battery discharges, and low
//! exactly when a discharging battery is at or under the low capacity.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use pos_hub::power::read_power_supply;

use crate::util::text;

fn base() -> &'static PathBuf {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| crate::util::scratch_path("ps"))
}

/// Removes this process's supply directory, if it made one.
pub fn remove_scratch() {
    let _ = std::fs::remove_dir_all(base());
}

fn name_ok(s: &str) -> bool {
    (1..=16).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

pub fn run(data: &[u8]) {
    let Some(s) = text(data) else { return };
    let mut supplies: BTreeMap<&str, BTreeMap<&str, &str>> = BTreeMap::new();
    for line in s.lines() {
        let Some((path, value)) = line.split_once('=') else {
            continue;
        };
        let Some((sup, file)) = path.split_once('/') else {
            continue;
        };
        if name_ok(sup) && name_ok(file) && supplies.len() < 6 {
            supplies.entry(sup).or_default().insert(file, value);
        }
    }
    let dir = base();
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("temp dir");
    for (sup, files) in &supplies {
        std::fs::create_dir_all(dir.join(sup)).expect("supply dir");
        for (f, v) in files {
            std::fs::write(dir.join(sup).join(f), v).expect("supply file");
        }
    }
    let low_capacity = 20u8;
    let (mut on_battery, mut low) = (false, false);
    let mut any = false;
    for files in supplies.values() {
        let get = |f: &str| files.get(f).map(|v| v.trim());
        let Some(kind) = get("type") else { continue };
        any = true;
        match kind {
            "Mains" | "UPS" | "USB" => on_battery |= get("online") == Some("0"),
            "Battery" => {
                let dis = get("status") == Some("Discharging");
                on_battery |= dis;
                if let Some(c) = get("capacity").and_then(|c| c.parse::<u8>().ok()) {
                    low |= dis && c <= low_capacity;
                }
            }
            _ => {}
        }
    }
    match read_power_supply(dir, low_capacity) {
        Ok(r) => {
            assert!(any, "a reading from a directory without supplies");
            assert_eq!(
                r.on_battery, on_battery,
                "on battery; supplies {supplies:?}"
            );
            assert_eq!(r.low, low, "low; supplies {supplies:?}");
        }
        Err(e) => {
            assert!(!any, "refused a directory with supplies: {e}");
        }
    }
}
