//! Networking without a network manager: loopback up, then the Ethernet port by DHCP
//! (a small DHCPv4 client: DISCOVER, OFFER, REQUEST, ACK, the packets encoded and
//! decoded by `dhcproto`; renewed at half the lease)
//! or a static address from the settings (`NET_ADDRESS=10.1.2.3/24`,
//! `NET_GATEWAY`, `NET_DNS`). Addresses and routes are set with the classic
//! SIOCSIF*/SIOCADDRT ioctls; DNS servers go to /run/resolv.conf (/etc/resolv.conf
//! links there, the root being read-only).

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

pub use dhcproto::v4::MessageType;
use dhcproto::v4::{DhcpOption, Flags, Message, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable};

/// An IPv4 configuration for one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    /// Lease time; `None` for a static address.
    pub lease: Option<Duration>,
}

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn ifreq(name: &str) -> Result<libc::ifreq, String> {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    let b = name.as_bytes();
    if b.len() >= r.ifr_name.len() {
        return Err(format!("interface name {name} is too long"));
    }
    for (d, s) in r.ifr_name.iter_mut().zip(b) {
        *d = *s as libc::c_char;
    }
    Ok(r)
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; this is how the API is used.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ctl_socket() -> Result<UdpSocket, String> {
    UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("control socket: {e}"))
}

/// Brings an interface up (IFF_UP).
pub fn link_up(name: &str) -> Result<(), String> {
    let s = ctl_socket()?;
    let mut r = ifreq(name)?;
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the flags member of ifreq.
    unsafe {
        if libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut r) != 0 {
            return Err(os_err(&format!("{name}: read flags")));
        }
        r.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &r) != 0 {
            return Err(os_err(&format!("{name}: set up")));
        }
    }
    Ok(())
}

/// The interface's MAC address.
pub fn mac(name: &str) -> Result<[u8; 6], String> {
    let s = std::fs::read_to_string(format!("/sys/class/net/{name}/address"))
        .map_err(|e| format!("{name}: no MAC address: {e}"))?;
    let mut m = [0u8; 6];
    let parts: Vec<&str> = s.trim().split(':').collect();
    if parts.len() != 6 {
        return Err(format!("{name}: odd MAC address {s}"));
    }
    for (d, p) in m.iter_mut().zip(parts) {
        *d = u8::from_str_radix(p, 16).map_err(|_| format!("{name}: odd MAC address {s}"))?;
    }
    Ok(m)
}

/// The first Ethernet-like interface (not lo), waiting for its driver to appear.
pub fn find_ethernet(timeout: Duration) -> Option<String> {
    let start = Instant::now();
    loop {
        if let Ok(dir) = std::fs::read_dir("/sys/class/net") {
            let mut names: Vec<String> = dir
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != "lo" && !n.starts_with("sit") && !n.starts_with("wl"))
                .collect();
            names.sort();
            if let Some(n) = names.into_iter().next() {
                return Some(n);
            }
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sets address, netmask and (if any) default route; writes /run/resolv.conf.
pub fn apply(name: &str, l: &Lease) -> Result<(), String> {
    let s = ctl_socket()?;
    let mask = if l.prefix == 0 {
        0
    } else {
        u32::MAX << (32 - l.prefix as u32)
    };
    let mut r = ifreq(name)?;
    // SAFETY: SIOCSIFADDR/SIOCSIFNETMASK take an ifreq with a sockaddr; SIOCADDRT an rtentry.
    unsafe {
        r.ifr_ifru.ifru_addr = sockaddr(l.address);
        if libc::ioctl(s.as_raw_fd(), libc::SIOCSIFADDR, &r) != 0 {
            return Err(os_err(&format!("{name}: set address {}", l.address)));
        }
        r.ifr_ifru.ifru_netmask = sockaddr(Ipv4Addr::from(mask));
        if libc::ioctl(s.as_raw_fd(), libc::SIOCSIFNETMASK, &r) != 0 {
            return Err(os_err(&format!("{name}: set netmask /{}", l.prefix)));
        }
    }
    link_up(name)?;
    if let Some(gw) = l.gateway {
        // SAFETY: rtentry is plain old data.
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        rt.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_gateway = sockaddr(gw);
        rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        // SAFETY: as above.
        let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCADDRT, &rt) };
        if rc != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
            return Err(os_err(&format!("default route via {gw}")));
        }
    }
    if !l.dns.is_empty() {
        let text: String = l.dns.iter().map(|d| format!("nameserver {d}\n")).collect();
        std::fs::write("/run/resolv.conf", text).map_err(|e| format!("/run/resolv.conf: {e}"))?;
    }
    Ok(())
}

/// Parses `NET_ADDRESS` (`a.b.c.d/nn`), `NET_GATEWAY`, `NET_DNS` (comma list).
pub fn parse_static(addr: &str, gateway: Option<&str>, dns: Option<&str>) -> Result<Lease, String> {
    let (ip, prefix) = addr.split_once('/').ok_or_else(|| {
        format!("NET_ADDRESS={addr}: expected an address with a prefix, e.g. 192.168.1.20/24")
    })?;
    let address: Ipv4Addr = ip
        .trim()
        .parse()
        .map_err(|_| format!("NET_ADDRESS={addr}: {ip} is not an IPv4 address"))?;
    let prefix: u8 = prefix
        .trim()
        .parse()
        .ok()
        .filter(|p| (1..=32).contains(p))
        .ok_or_else(|| format!("NET_ADDRESS={addr}: the prefix must be 1 to 32"))?;
    let gateway = match gateway.map(str::trim).filter(|g| !g.is_empty()) {
        None => None,
        Some(g) => Some(
            g.parse()
                .map_err(|_| format!("NET_GATEWAY={g} is not an IPv4 address"))?,
        ),
    };
    let mut servers = Vec::new();
    for d in dns
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
    {
        servers.push(
            d.parse()
                .map_err(|_| format!("NET_DNS: {d} is not an IPv4 address"))?,
        );
    }
    Ok(Lease {
        address,
        prefix,
        gateway,
        dns: servers,
        lease: None,
    })
}

// ---- DHCPv4 (packets encoded and decoded by the dhcproto crate) ----

#[doc(hidden)]
/// A DISCOVER (no `requested`) or a REQUEST for `requested = (address, server)`.
pub fn dhcp_packet(
    kind: MessageType,
    xid: u32,
    mac: &[u8; 6],
    requested: Option<(Ipv4Addr, Ipv4Addr)>,
    hostname: &str,
) -> Vec<u8> {
    let unspecified = Ipv4Addr::UNSPECIFIED;
    let mut m = Message::new_with_id(xid, unspecified, unspecified, unspecified, unspecified, mac);
    // The broadcast flag: we have no address yet to receive a unicast answer on.
    m.set_flags(Flags::default().set_broadcast());
    let opts = m.opts_mut();
    opts.insert(DhcpOption::MessageType(kind));
    let mut client_id = vec![1]; // hardware type Ethernet, then the MAC
    client_id.extend_from_slice(mac);
    opts.insert(DhcpOption::ClientIdentifier(client_id));
    if let Some((ip, server)) = requested {
        opts.insert(DhcpOption::RequestedIpAddress(ip));
        opts.insert(DhcpOption::ServerIdentifier(server));
    }
    if !hostname.is_empty() && hostname.len() < 64 {
        opts.insert(DhcpOption::Hostname(hostname.to_string()));
    }
    opts.insert(DhcpOption::ParameterRequestList(vec![
        OptionCode::SubnetMask,
        OptionCode::Router,
        OptionCode::DomainNameServer,
        OptionCode::AddressLeaseTime,
    ]));
    // Encoding a message built from these fields cannot fail; an empty packet would
    // simply get no answer.
    m.to_vec().unwrap_or_default()
}

/// What a DHCP reply says.
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub kind: MessageType,
    pub yiaddr: Ipv4Addr,
    pub server: Option<Ipv4Addr>,
    pub lease: Lease,
}

/// The options [`parse_reply`] reads: message type, server id, mask, router, DNS, lease.
const USED_OPTIONS: [u8; 6] = [53, 54, 1, 3, 6, 51];

/// The packet with only [`USED_OPTIONS`] left in its options field (and an End), or
/// `None` when it is too short to be a DHCP message. dhcproto's decoders of some other
/// options assert their length (`debug_assert!`: a panic in debug builds, a misread in
/// release) instead of refusing it; what the hub does not read never reaches them.
fn used_options_only(p: &[u8]) -> Option<Vec<u8>> {
    const HEADER: usize = 240; // the fixed fields and the magic cookie
    let mut out = p.get(..HEADER)?.to_vec();
    let mut rest = &p[HEADER..];
    while let Some((&code, tail)) = rest.split_first() {
        match code {
            0 => rest = tail,
            255 => break,
            _ => {
                let Some((&len, tail)) = tail.split_first() else {
                    break;
                };
                let Some(value) = tail.get(..usize::from(len)) else {
                    break; // cut short: the option and what follows are dropped
                };
                if USED_OPTIONS.contains(&code) {
                    out.extend_from_slice(&[code, len]);
                    out.extend_from_slice(value);
                }
                rest = &tail[usize::from(len)..];
            }
        }
    }
    out.push(255);
    Some(out)
}

#[doc(hidden)]
/// A reply to our transaction `xid` for our `mac`; `None` for anything else (another
/// client's answer, a request, garbage).
pub fn parse_reply(p: &[u8], xid: u32, mac: &[u8; 6]) -> Option<Reply> {
    let p = used_options_only(p)?;
    let m = Message::decode(&mut Decoder::new(&p)).ok()?;
    // An Ethernet reply carries our 6-byte address; `hlen` is checked first because
    // dhcproto's `chaddr()` panics on a length over 16 (found by the `dhcp` fuzz target).
    if m.opcode() != Opcode::BootReply || m.xid() != xid || m.hlen() != 6 || m.chaddr() != mac {
        return None;
    }
    let opts = m.opts();
    let kind = opts.msg_type()?;
    let server = match opts.get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
        _ => None,
    };
    // An offer or ack must give an address we can use.
    let usable = |a: Ipv4Addr| {
        !(a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback())
    };
    if matches!(kind, MessageType::Offer | MessageType::Ack) && !usable(m.yiaddr()) {
        return None;
    }
    // A mask that is not 1-32 contiguous ones counts as absent.
    let prefix = match opts.get(OptionCode::SubnetMask) {
        Some(DhcpOption::SubnetMask(mask)) => Some(u32::from(*mask)),
        _ => None,
    }
    .filter(|m| *m != 0 && m.leading_ones() + m.trailing_zeros() == 32)
    .map(|m| m.leading_ones() as u8)
    .unwrap_or(24);
    let gateway = match opts.get(OptionCode::Router) {
        Some(DhcpOption::Router(r)) => r.first().copied(),
        _ => None,
    }
    .filter(|g| usable(*g));
    let dns = match opts.get(OptionCode::DomainNameServer) {
        Some(DhcpOption::DomainNameServer(d)) => d.clone(),
        _ => Vec::new(),
    };
    let lease = match opts.get(OptionCode::AddressLeaseTime) {
        Some(DhcpOption::AddressLeaseTime(secs)) => *secs,
        _ => 3600,
    };
    Some(Reply {
        kind,
        yiaddr: m.yiaddr(),
        server,
        lease: Lease {
            address: m.yiaddr(),
            prefix,
            gateway,
            dns,
            lease: Some(Duration::from_secs(u64::from(lease.max(60)))),
        },
    })
}

/// Runs one DHCP exchange on `ifname` (DISCOVER..ACK), within `timeout`.
pub fn dhcp(ifname: &str, hostname: &str, timeout: Duration) -> Result<Lease, String> {
    let mac = mac(ifname)?;
    let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68))
        .map_err(|e| format!("DHCP: bind port 68: {e}"))?;
    sock.set_broadcast(true).map_err(|e| format!("DHCP: {e}"))?;
    nix::sys::socket::setsockopt(
        &sock,
        nix::sys::socket::sockopt::BindToDevice,
        &std::ffi::OsString::from(ifname),
    )
    .map_err(|e| format!("DHCP: bind to {ifname}: {e}"))?;
    let dest = SocketAddrV4::new(Ipv4Addr::BROADCAST, 67);
    let start = Instant::now();
    let mut attempt = 0u32;
    while start.elapsed() < timeout {
        attempt += 1;
        let xid: u32 = rand::random();
        let _ = sock.send_to(
            &dhcp_packet(MessageType::Discover, xid, &mac, None, hostname),
            dest,
        );
        let wait = Duration::from_secs((1u64 << attempt.min(3)).min(8));
        let Some(offer) = receive(&sock, xid, &mac, &[MessageType::Offer], wait) else {
            continue;
        };
        let server = offer.server.unwrap_or(Ipv4Addr::BROADCAST);
        let _ = sock.send_to(
            &dhcp_packet(
                MessageType::Request,
                xid,
                &mac,
                Some((offer.yiaddr, server)),
                hostname,
            ),
            dest,
        );
        match receive(
            &sock,
            xid,
            &mac,
            &[MessageType::Ack, MessageType::Nak],
            wait,
        ) {
            Some(r) if r.kind == MessageType::Ack => return Ok(r.lease),
            _ => continue,
        }
    }
    Err(format!("DHCP: no lease on {ifname} within {timeout:?}"))
}

fn receive(
    sock: &UdpSocket,
    xid: u32,
    mac: &[u8; 6],
    kinds: &[MessageType],
    wait: Duration,
) -> Option<Reply> {
    let until = Instant::now() + wait;
    let mut buf = [0u8; 1500];
    loop {
        let left = until.checked_duration_since(Instant::now())?;
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .ok()?;
        let Ok((n, _)) = sock.recv_from(&mut buf) else {
            return None;
        };
        if let Some(r) = parse_reply(&buf[..n], xid, mac) {
            if kinds.contains(&r.kind) {
                return Some(r);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_addresses_are_validated() {
        let l = parse_static(
            "192.168.1.20/24",
            Some("192.168.1.1"),
            Some("192.168.1.1, 9.9.9.9"),
        )
        .unwrap();
        assert_eq!(l.address, Ipv4Addr::new(192, 168, 1, 20));
        assert_eq!(l.prefix, 24);
        assert_eq!(l.dns.len(), 2);
        assert!(parse_static("192.168.1.20", None, None)
            .unwrap_err()
            .contains("prefix"));
        assert!(parse_static("192.168.1.20/33", None, None).is_err());
        assert!(parse_static("300.1.1.1/24", None, None).is_err());
        assert!(parse_static("10.0.0.2/8", Some("gw"), None)
            .unwrap_err()
            .contains("NET_GATEWAY"));
    }

    #[test]
    fn dhcp_reply_is_parsed_and_foreign_replies_ignored() {
        let mac = [2, 0, 0, 0, 0, 1];
        // Our DISCOVER as a server sees it.
        let d = dhcp_packet(MessageType::Discover, 42, &mac, None, "pos-hub");
        let m = Message::decode(&mut Decoder::new(&d)).unwrap();
        assert_eq!(m.opcode(), Opcode::BootRequest);
        assert!(m.flags().broadcast());
        assert_eq!(m.opts().msg_type(), Some(MessageType::Discover));
        assert_eq!(
            m.opts().get(OptionCode::Hostname),
            Some(&DhcpOption::Hostname("pos-hub".into()))
        );
        // A REQUEST names the offered address and the server.
        let r = dhcp_packet(
            MessageType::Request,
            42,
            &mac,
            Some((Ipv4Addr::new(10, 0, 2, 15), Ipv4Addr::new(10, 0, 2, 2))),
            "pos-hub",
        );
        let m = Message::decode(&mut Decoder::new(&r)).unwrap();
        assert_eq!(
            m.opts().get(OptionCode::RequestedIpAddress),
            Some(&DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 0, 2, 15)))
        );

        // The server's OFFER, byte by byte as on the wire (as QEMU's slirp sends it).
        let mut p = d.clone();
        p[0] = 2;
        p[16..20].copy_from_slice(&[10, 0, 2, 15]);
        p.truncate(240);
        p.extend_from_slice(&[
            53, 1, 2, 54, 4, 10, 0, 2, 2, 1, 4, 255, 255, 255, 0, 3, 4, 10, 0, 2, 2, 6, 4, 10, 0,
            2, 3, 51, 4, 0, 1, 81, 128, 255,
        ]);
        let r = parse_reply(&p, 42, &mac).unwrap();
        assert_eq!(r.kind, MessageType::Offer);
        assert_eq!(r.server, Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(r.lease.address, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(r.lease.prefix, 24);
        assert_eq!(r.lease.gateway, Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(r.lease.dns, vec![Ipv4Addr::new(10, 0, 2, 3)]);
        assert_eq!(r.lease.lease, Some(Duration::from_secs(86400)));
        assert!(parse_reply(&p, 43, &mac).is_none(), "other transaction");
        assert!(
            parse_reply(&p, 42, &[2, 0, 0, 0, 0, 2]).is_none(),
            "other client"
        );
        assert!(parse_reply(&p[..100], 42, &mac).is_none(), "truncated");
        assert!(
            parse_reply(&d, 42, &mac).is_none(),
            "a request, not a reply"
        );
    }

    /// Found by the fuzz target `dhcp` (a debug-assertion build): options the hub
    /// does not read but dhcproto asserts the length of (Rapid Commit 80 with a
    /// value, Client Network Interface 94 not 3 bytes, Client FQDN 81 under 3) panicked
    /// the decoder; they are dropped before it now, and the answer still counts.
    #[test]
    fn options_the_hub_does_not_read_cannot_panic_the_decoder() {
        let mac = [2, 0, 0, 0, 0, 1];
        let answer = |opts: &[u8]| {
            let mut p = dhcp_packet(MessageType::Discover, 42, &mac, None, "pos-hub");
            p[0] = 2;
            p[16..20].copy_from_slice(&[10, 0, 2, 15]);
            p.truncate(240);
            p.extend_from_slice(opts);
            p
        };
        for odd in [
            &[80u8, 1, 7][..],
            &[94, 1, 0],
            &[81, 1, 0],
            &[91, 1, 0],
            &[151, 0],
            &[152, 2, 0, 0],
        ] {
            let mut opts = vec![53, 1, 5, 1, 4, 255, 255, 255, 0];
            opts.extend_from_slice(odd);
            opts.extend_from_slice(&[3, 4, 10, 0, 2, 2, 255]);
            let r = parse_reply(&answer(&opts), 42, &mac).expect("an ack");
            assert_eq!(r.kind, MessageType::Ack);
            assert_eq!(r.lease.prefix, 24);
            assert_eq!(r.lease.gateway, Some(Ipv4Addr::new(10, 0, 2, 2)));
        }
        // An option cut short ends the options; what came before it still counts.
        let r = parse_reply(&answer(&[53, 1, 5, 3, 4, 10, 0]), 42, &mac).unwrap();
        assert_eq!((r.kind, r.lease.gateway), (MessageType::Ack, None));
        assert!(
            parse_reply(&answer(&[]), 42, &mac).is_none(),
            "no message type"
        );
        assert!(used_options_only(&[2; 239]).is_none());
    }

    /// Found while writing fuzz/ (dhcp): an offer or ack of 0.0.0.0 (or broadcast,
    /// multicast, loopback) was taken as our address, a mask of 0.0.0.0 as /0 and a
    /// router of 0.0.0.0 as the gateway.
    #[test]
    fn unusable_leases_are_ignored() {
        let mac = [2, 0, 0, 0, 0, 1];
        let (ack, nak) = (5, 6);
        let answer = |yiaddr: [u8; 4], opts: &[u8]| {
            let mut p = dhcp_packet(MessageType::Discover, 42, &mac, None, "pos-hub");
            p[0] = 2;
            p[16..20].copy_from_slice(&yiaddr);
            p.truncate(240);
            p.extend_from_slice(opts);
            p
        };
        for bad in [
            [0, 0, 0, 0],
            [255, 255, 255, 255],
            [224, 0, 0, 1],
            [127, 0, 0, 1],
        ] {
            assert!(parse_reply(&answer(bad, &[53, 1, ack, 255]), 42, &mac).is_none());
        }
        assert_eq!(
            parse_reply(&answer([0; 4], &[53, 1, nak, 255]), 42, &mac)
                .unwrap()
                .kind,
            MessageType::Nak
        );
        let r = parse_reply(
            &answer(
                [10, 0, 2, 15],
                &[53, 1, ack, 1, 4, 0, 0, 0, 0, 3, 4, 0, 0, 0, 0, 255],
            ),
            42,
            &mac,
        )
        .unwrap();
        assert_eq!((r.lease.prefix, r.lease.gateway), (24, None));
        let r = parse_reply(
            &answer([10, 0, 2, 15], &[53, 1, ack, 1, 4, 255, 0, 255, 0, 255]),
            42,
            &mac,
        )
        .unwrap();
        assert_eq!(r.lease.prefix, 24, "non-contiguous mask");
    }
}
