//! mDNS: the hub advertises `_poshub._tcp` on its port, one service per realm, so
//! tills and screens find it without configuration; `pos-hub discover` browses the
//! LAN for hubs (the field tech's replacement for `avahi-browse`) and can check a
//! hub's `/ca.crt` against the fingerprint it advertises.
//!
//! mdns-sd follows address changes itself (`enable_addr_auto`), answers legacy
//! unicast queries (Android), and says goodbye when a service is unregistered.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent, ServiceInfo};

pub const SERVICE: &str = "_poshub._tcp.local.";

/// The running advertisement.
pub struct Advert {
    daemon: ServiceDaemon,
    fullnames: Vec<String>,
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .map(|h| {
            h.to_string_lossy()
                .split('.')
                .next()
                .unwrap_or("hub")
                .to_string()
        })
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "pos-hub".into())
}

/// Advertises one service per realm `(tenantId, storeId)` on `port` (one marked
/// `state=unclaimed` when there is no realm yet).
/// `interfaces` limits it to the named interfaces (empty = all).
pub fn advertise(
    realms: &[(String, String)],
    port: u16,
    tls: bool,
    ca_fp: Option<&str>,
    interfaces: &[String],
) -> Result<Advert, String> {
    let daemon = ServiceDaemon::new().map_err(|e| format!("mDNS: {e}"))?;
    if !interfaces.is_empty() {
        daemon
            .disable_interface(IfKind::All)
            .map_err(|e| e.to_string())?;
        for i in interfaces {
            daemon
                .enable_interface(IfKind::Name(i.clone()))
                .map_err(|e| e.to_string())?;
        }
    }
    let host = hostname();
    let mut fullnames = Vec::new();
    // An unclaimed box advertises itself too, so a setup tool can find its /setup page.
    let unclaimed = [(String::new(), String::new())];
    let list: &[(String, String)] = if realms.is_empty() {
        &unclaimed
    } else {
        realms
    };
    for (tenant, store) in list {
        let is_unclaimed = tenant.is_empty();
        // Instance names are limited to 63 bytes.
        let mut instance = if is_unclaimed {
            format!("POS Hub - {host} (unclaimed)")
        } else {
            format!("POS Hub - {host} ({store}/{tenant})")
        };
        while instance.len() > 63 {
            instance.pop();
        }
        let mut props = vec![
            ("version", "1"),
            ("tls", if tls { "1" } else { "0" }),
            ("hub", crate::VERSION),
        ];
        if is_unclaimed {
            props.push(("state", "unclaimed"));
            props.push(("setup", "/setup"));
        } else {
            props.push(("storeId", store.as_str()));
            props.push(("tenantId", tenant.as_str()));
        }
        if let Some(fp) = ca_fp {
            props.push(("caFp", fp));
        }
        let info = ServiceInfo::new(
            SERVICE,
            &instance,
            &format!("{host}.local."),
            "",
            port,
            &props[..],
        )
        .map_err(|e| format!("mDNS service for {tenant}:{store}: {e}"))?
        .enable_addr_auto();
        fullnames.push(info.get_fullname().to_string());
        daemon.register(info).map_err(|e| format!("mDNS: {e}"))?;
    }
    tracing::info!(services = fullnames.len(), host = %host, "advertising _poshub._tcp over mDNS");
    Ok(Advert { daemon, fullnames })
}

impl Advert {
    /// Says goodbye (TTL 0 announcements) and stops the responder.
    pub fn stop(self) {
        for f in &self.fullnames {
            if let Ok(rx) = self.daemon.unregister(f) {
                let _ = rx.recv_timeout(Duration::from_secs(2));
            }
        }
        if let Ok(rx) = self.daemon.shutdown() {
            let _ = rx.recv_timeout(Duration::from_secs(2));
        }
    }
}

/// A hub found on the LAN.
#[derive(Debug, Clone)]
pub struct Found {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub addresses: Vec<IpAddr>,
    pub tenant_id: String,
    pub store_id: String,
    pub ca_fp: Option<String>,
    pub tls: bool,
}

/// Browses for `timeout` and returns every hub that answered.
pub fn browse(timeout: Duration) -> Result<Vec<Found>, String> {
    let daemon = ServiceDaemon::new().map_err(|e| format!("mDNS: {e}"))?;
    let rx = daemon.browse(SERVICE).map_err(|e| format!("mDNS: {e}"))?;
    let end = Instant::now() + timeout;
    let mut found: BTreeMap<String, Found> = BTreeMap::new();
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(ServiceEvent::ServiceResolved(s)) => {
                let prop = |k: &str| s.get_property_val_str(k).map(String::from);
                let mut addresses: Vec<IpAddr> =
                    s.get_addresses().iter().map(|a| a.to_ip_addr()).collect();
                addresses.sort();
                found.insert(
                    s.get_fullname().to_string(),
                    Found {
                        name: s.get_fullname().to_string(),
                        host: s.get_hostname().to_string(),
                        port: s.get_port(),
                        addresses,
                        tenant_id: prop("tenantId").unwrap_or_default(),
                        store_id: prop("storeId").unwrap_or_default(),
                        ca_fp: prop("caFp"),
                        tls: prop("tls").as_deref() == Some("1"),
                    },
                );
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let _ = daemon.shutdown();
    Ok(found.into_values().collect())
}

/// Fetches `http://addr:port/ca.crt` (plain HTTP, which the hub serves for just
/// this) and returns the SHA-256 fingerprint of the certificate in it.
pub fn fetch_ca_fingerprint(addr: IpAddr, port: u16) -> Result<String, String> {
    use std::io::{Read, Write};
    let sa = std::net::SocketAddr::new(addr, port);
    let mut s = std::net::TcpStream::connect_timeout(&sa, Duration::from_secs(3))
        .map_err(|e| format!("{sa}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.write_all(format!("GET /ca.crt HTTP/1.0\r\nHost: {sa}\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.take(64 * 1024)
        .read_to_end(&mut buf)
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf);
    let body = text.split("\r\n\r\n").nth(1).ok_or("no HTTP body")?;
    let p = pem::parse(body.trim()).map_err(|e| format!("not a PEM certificate: {e}"))?;
    Ok(crate::tls::ca::fingerprint(p.contents()))
}
