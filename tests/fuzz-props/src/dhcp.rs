//! DHCP answers on the shop's LAN (any box there can send one): only an answer to our
//! transaction and MAC is read, and a lease the hub would configure is usable: a
//! unicast address (offers and acks), a prefix of 1-32, a unicast gateway.

use std::net::Ipv4Addr;

use pos_hub::init::net::{dhcp_packet, parse_reply, MessageType};

const MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const XID: u32 = 0x1234_5678;

pub fn run(data: &[u8]) {
    // The input is the options part of an answer to our own request (so the fuzzer
    // does not have to find the transaction id and cookie) or, with the first
    // byte odd, a whole datagram.
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let p = if mode & 1 == 1 {
        rest.to_vec()
    } else {
        let mut p = dhcp_packet(MessageType::Discover, XID, &MAC, None, "pos-hub");
        p.truncate(240);
        p[0] = 2;
        p[16..20].copy_from_slice(&[10, 0, 2, 15]);
        if mode & 2 == 2 && rest.len() >= 4 {
            p[16..20].copy_from_slice(&rest[..4]);
        }
        p.extend_from_slice(rest);
        p
    };
    let Some(r) = parse_reply(&p, XID, &MAC) else {
        return;
    };
    assert!(p.len() >= 240 && p[0] == 2);
    assert_eq!(&p[4..8], &XID.to_be_bytes());
    assert_eq!(&p[28..34], &MAC);
    let l = &r.lease;
    assert_eq!(l.address, r.yiaddr);
    let usable = |a: Ipv4Addr| {
        !(a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback())
    };
    // Offers and acks (the ones whose lease is used) give a usable address.
    if matches!(r.kind, MessageType::Offer | MessageType::Ack) {
        assert!(usable(l.address), "a lease of {}", l.address);
    }
    assert!(
        (1..=32).contains(&l.prefix),
        "a lease with prefix /{}",
        l.prefix
    );
    if let Some(g) = l.gateway {
        assert!(usable(g), "gateway {g}");
    }
    assert!(l.lease.is_some_and(|d| d.as_secs() >= 60));
}
