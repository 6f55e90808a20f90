//! SNTP answers (any box on the LAN can answer, and the NTP server may be wrong):
//! the first 16 input bytes are our send and receive times; only a server answer
//! to our request, from a synchronised server, gives a sample, and the sample is
//! what the four timestamps say.

use pos_hub::clock::parse_answer;

pub fn run(data: &[u8]) {
    if data.len() < 16 {
        return;
    }
    let t1 = 1_700_000_000_000 + (u32::from_le_bytes(data[0..4].try_into().unwrap()) as i64);
    let t4 = t1 + (u16::from_le_bytes(data[4..6].try_into().unwrap()) as i64);
    let sent = u64::from_be_bytes(data[8..16].try_into().unwrap());
    let mut buf = data[16..].to_vec();
    // Most inputs answer our request (the fuzzer need not find the 8 bytes).
    if buf.len() >= 48 && data[6] & 1 == 0 {
        buf[24..32].copy_from_slice(&sent.to_be_bytes());
    }
    match parse_answer(&buf, sent, t1, t4) {
        Ok(s) => {
            assert!(buf.len() >= 48);
            assert_eq!(buf[0] & 7, 4, "mode");
            assert!((1..=15).contains(&s.stratum));
            assert_eq!(s.stratum, buf[1]);
            assert_ne!(buf[0] >> 6, 3, "unsynchronised server");
            assert_eq!(&buf[24..32], &sent.to_be_bytes());
            // offset = ((t2 - t1) + (t3 - t4)) / 2, delay = (t4 - t1) - (t3 - t2)
            let ms = |i: usize| {
                let t = u64::from_be_bytes(buf[i..i + 8].try_into().unwrap());
                ((t >> 32) as i128 - 2_208_988_800) * 1000
                    + (((t & 0xffff_ffff) as i128 * 1000) >> 32)
            };
            let (t2, t3) = (ms(32), ms(40));
            let (a, b) = (t1 as i128, t4 as i128);
            assert_eq!(s.offset_ms as i128, ((t2 - a) + (t3 - b)) / 2);
            assert_eq!(s.delay_ms as i128, (b - a) - (t3 - t2));
        }
        Err(e) => assert!(!e.is_empty()),
    }
}
