//! Update bundles: magic, the JSON envelope, the signed manifest and the gzip
//! payload streamed into a slot. The first byte picks the input's shape:
//! 0: raw bundle bytes (no valid signature: must never verify);
//! 1: a manifest and payload (split at 0xFF) signed with the trusted key, so the
//!    manifest checks and the payload stream are reached;
//! 2: a real bundle of a slot image made from the input, cut short or with one byte
//!    changed where the input says (must be refused).
//! Whatever happens, a slot that was not written completely must not look bootable
//! (its boot sector zero), and a slot that was must hold exactly the image.

use std::collections::BTreeMap;
use std::io::{Cursor, Read};

use base64::Engine as _;
use pos_hub::update::bundle::{self, check_compatible, read_header, stream_payload, Manifest};
use sha2::{Digest, Sha256};

use crate::util::{keys, split, B64};

const CAPACITY: u64 = 1 << 20;

fn trusted() -> BTreeMap<String, Vec<u8>> {
    BTreeMap::from([("k1".to_string(), keys().raw_public.clone())])
}

pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            if let Ok(m) = read_header(&mut Cursor::new(rest), &trusted()) {
                panic!("an unsigned bundle verified: {m:?}");
            }
        }
        1 => {
            let p = split(rest, 2);
            let sig = keys().pair.sign(p[0]);
            let env = serde_json::json!({
                "manifest": B64.encode(p[0]),
                "signatures": [{"keyId": "k1", "sig": B64.encode(sig.as_ref())}],
            });
            let mut b = b"POSHUB-BUNDLE 1\n".to_vec();
            b.extend_from_slice(env.to_string().as_bytes());
            b.push(b'\n');
            b.extend_from_slice(p[1]);
            install(&b, None);
        }
        _ => {
            let p = split(rest, 2);
            let image: Vec<u8> = p[1].iter().cycle().take(p[1].len() * 37).copied().collect();
            let mut b = Vec::new();
            let m = bundle::create(
                &image[..],
                &bundle::CreateOptions {
                    version: "0.2.0",
                    board: "rpi4",
                    compatible: vec![],
                    min_version: None,
                    key_id: "k1",
                    key_pkcs8: keys().pkcs8.as_ref(),
                    created: "2026-12-01T00:00:00Z".into(),
                },
                &mut b,
            )
            .expect("create bundle");
            if p[0].is_empty() {
                // Intact: must install, and exactly this image.
                install(&b, Some((m, image, true)));
                return;
            }
            let at = p[0]
                .iter()
                .fold(0usize, |a, x| a.wrapping_mul(251).wrapping_add(*x as usize))
                % b.len();
            if p[0][0] & 1 == 1 {
                b[at] ^= 1 + (p[0].len() as u8 % 255);
            } else {
                b.truncate(at);
            }
            install(&b, Some((m, image, false)));
        }
    }
}

/// Verifies and installs `b` into a fresh slot; `expect` = (manifest, image, intact)
/// of a bundle made here: intact ones must install, changed ones must be refused.
fn install(b: &[u8], expect: Option<(Manifest, Vec<u8>, bool)>) {
    let mut r = Cursor::new(b);
    let m = match read_header(&mut r, &trusted()) {
        Ok(m) => m,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            if let Some((_, _, true)) = &expect {
                panic!("a good bundle's header was refused: {e}");
            }
            return;
        }
    };
    assert_eq!(m.format, "slot-fat-gzip");
    if let Some((want, _, _)) = &expect {
        assert_eq!(&m, want, "a changed manifest verified");
    }
    if check_compatible(&m, "rpi4", "0.1.0").is_err() {
        return;
    }
    // A slot full of an older image: its boot sector is not zero.
    let mut slot = Cursor::new(vec![0xA5u8; 8192]);
    let payload_start = r.position() as usize;
    let res = stream_payload(&mut r, &m, &mut slot, CAPACITY, |_| {});
    let slot = slot.into_inner();
    match res {
        Ok(()) => {
            // The slot holds exactly the gunzipped payload, which matches the manifest.
            let payload = &b[payload_start..];
            assert_eq!(payload.len() as u64, m.payload_size);
            assert_eq!(bundle::hex(&Sha256::digest(payload)), m.payload_sha256);
            let mut image = Vec::new();
            flate2::read::GzDecoder::new(payload)
                .read_to_end(&mut image)
                .expect("installed payload gunzips");
            assert_eq!(image.len() as u64, m.slot_size);
            assert_eq!(
                &slot[..image.len()],
                &image[..],
                "slot differs from the image"
            );
            if let Some((_, want, intact)) = &expect {
                assert!(*intact, "a changed bundle installed");
                assert_eq!(&image, want);
            }
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            assert!(slot.len() >= 512);
            assert!(
                slot[..512].iter().all(|x| *x == 0),
                "a refused slot still looks bootable ({e})"
            );
            if let Some((_, _, true)) = &expect {
                panic!("a good bundle was refused: {e}");
            }
        }
    }
}
