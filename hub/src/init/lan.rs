//! The box on the LAN at boot: its hostname, loopback, and the Ethernet port with a
//! static address from hub.env (`NET_ADDRESS`, `NET_GATEWAY`, `NET_DNS`) or DHCP in a
//! thread that keeps renewing the lease at half its time ([`super::net`] does the
//! packets and ioctls).

use std::collections::HashMap;
use std::time::Duration;

use super::bootlog::BootLog;
use super::net;

/// The box's name (`HOSTNAME`, default `pos-hub`), set in the kernel; returns it.
pub fn set_hostname(log: &BootLog, settings: &HashMap<String, String>) -> String {
    let hostname = settings
        .get("HOSTNAME")
        .cloned()
        .unwrap_or_else(|| "pos-hub".into());
    if let Err(e) = nix::unistd::sethostname(&hostname) {
        log.line(format!("sethostname {hostname}: {e}"));
    }
    hostname
}

/// Loopback, then Ethernet: a static address from hub.env or DHCP.
pub fn up(log: &BootLog, settings: &HashMap<String, String>, hostname: &str) {
    if let Err(e) = net::link_up("lo") {
        log.line(format!("loopback: {e}"));
    }
    start(log, settings, hostname);
}

/// Static address or DHCP (in a thread that keeps renewing the lease).
fn start(log: &BootLog, s: &HashMap<String, String>, hostname: &str) {
    let ifname = match s.get("NET_INTERFACE") {
        Some(n) => Some(n.clone()),
        None => net::find_ethernet(Duration::from_secs(5)),
    };
    let Some(ifname) = ifname else {
        log.line("no Ethernet interface found: LAN is down (the hub still runs)");
        return;
    };
    if let Err(e) = net::link_up(&ifname) {
        log.line(format!("{ifname}: {e}"));
    }
    if let Some(addr) = s
        .get("NET_ADDRESS")
        .filter(|a| !a.is_empty() && a.as_str() != "dhcp")
    {
        match net::parse_static(
            addr,
            s.get("NET_GATEWAY").map(String::as_str),
            s.get("NET_DNS").map(String::as_str),
        ) {
            Ok(l) => match net::apply(&ifname, &l) {
                Ok(()) => log.line(format!(
                    "{ifname}: static address {}/{}",
                    l.address, l.prefix
                )),
                Err(e) => log.line(format!("{ifname}: {e}")),
            },
            Err(e) => log.line(format!("{e}; falling back to DHCP")),
        }
        if s.get("NET_ADDRESS")
            .is_some_and(|a| net::parse_static(a, None, None).is_ok())
        {
            return;
        }
    }
    let dhcp_log = log.clone();
    let hostname = hostname.to_string();
    let spawned = std::thread::Builder::new()
        .name("dhcp".into())
        .spawn(move || {
            let log = dhcp_log;
            let mut current: Option<net::Lease> = None;
            loop {
                match net::dhcp(&ifname, &hostname, Duration::from_secs(30)) {
                    Ok(l) => {
                        if current.as_ref() != Some(&l) {
                            match net::apply(&ifname, &l) {
                                Ok(()) => log.line(format!(
                                    "{ifname}: DHCP address {}/{} gateway {:?}",
                                    l.address, l.prefix, l.gateway
                                )),
                                Err(e) => log.line(format!("{ifname}: {e}")),
                            }
                        }
                        let renew = l.lease.unwrap_or(Duration::from_secs(3600)) / 2;
                        current = Some(l);
                        std::thread::sleep(renew);
                    }
                    Err(e) => {
                        if current.is_none() {
                            log.line(format!("{e}; retrying"));
                        }
                        std::thread::sleep(Duration::from_secs(10));
                    }
                }
            }
        });
    if let Err(e) = spawned {
        log.line(format!("cannot start DHCP: {e}"));
    }
}
