//! Update bundles: one file that carries a signed manifest and the compressed contents
//! of a boot slot.
//!
//! ```text
//! POSHUB-BUNDLE 1\n
//! {"manifest":"<base64 of the manifest JSON>","signatures":[{"keyId":"dev-2026","sig":"<base64>"}]}\n
//! <payload: gzip of the boot slot's FAT partition image>
//! ```
//!
//! The manifest names version, board, compatible boards, the payload's SHA-256 and size
//! (of the compressed bytes as they travel), the slot image size, creation time, and
//! the lowest version it may replace. Signatures are Ed25519 over the manifest bytes;
//! any key in the trusted set (built into the image, several for rotation) will do.
//! Everything in the header is checked before a single byte of the slot is touched.

use std::collections::BTreeMap;
use std::io::{BufRead, Read, Write};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const MAGIC: &[u8] = b"POSHUB-BUNDLE 1\n";
const MAX_HEADER: usize = 64 * 1024;
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Why a bundle was refused.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("not a pos-hub update bundle (bad magic): was the right file given?")]
    Magic,
    #[error("bundle header is damaged: {0}")]
    Header(String),
    #[error("bad signature: the bundle is not signed by a trusted key (key ids tried: {0}); refusing it")]
    Signature(String),
    #[error("bundle is for board {board} (compatible: {compatible}), this box is {ours}")]
    Board {
        board: String,
        compatible: String,
        ours: String,
    },
    #[error("bundle {version} may only replace {min} or newer; this box runs {running}")]
    TooOld {
        version: String,
        min: String,
        running: String,
    },
    #[error("payload does not match its manifest: {0} (download damaged or truncated? the inactive slot was left marked invalid)")]
    Payload(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("signing key: {0}")]
    Key(String),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub version: String,
    pub board: String,
    #[serde(default)]
    pub compatible: Vec<String>,
    pub payload_sha256: String,
    pub payload_size: u64,
    /// Size of the slot image once decompressed.
    pub slot_size: u64,
    pub created: String,
    /// The lowest running version this bundle may replace.
    #[serde(default)]
    pub min_version: Option<String>,
    pub format: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    manifest: String,
    signatures: Vec<Sig>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Sig {
    key_id: String,
    sig: String,
}

/// Trusted bundle keys: key id -> raw 32-byte Ed25519 public key.
pub type TrustedKeys = BTreeMap<String, Vec<u8>>;

/// Reads `*.pub` files (base64 of the raw 32-byte key; the file stem is the key id).
pub fn load_keys(dir: &std::path::Path) -> Result<TrustedKeys, BundleError> {
    let mut keys = TrustedKeys::new();
    let rd =
        std::fs::read_dir(dir).map_err(|e| BundleError::Key(format!("{}: {e}", dir.display())))?;
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().and_then(|x| x.to_str()) != Some("pub") {
            continue;
        }
        let text = std::fs::read_to_string(&p)
            .map_err(|e| BundleError::Key(format!("{}: {e}", p.display())))?;
        let raw = B64
            .decode(text.trim())
            .ok()
            .filter(|k| k.len() == 32)
            .ok_or_else(|| {
                BundleError::Key(format!("{}: not a base64 Ed25519 public key", p.display()))
            })?;
        let id = p
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        keys.insert(id, raw);
    }
    Ok(keys)
}

/// Orders versions like 1.4.2 < 1.10.0 and 1.2.0-rc1 < 1.2.0.
pub fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn split(v: &str) -> (Vec<u64>, Option<&str>) {
        let v = v.strip_prefix('v').unwrap_or(v);
        let (core, pre) = match v.split_once('-') {
            Some((c, p)) => (c, Some(p)),
            None => (v, None),
        };
        (
            core.split('.').map(|p| p.parse().unwrap_or(0)).collect(),
            pre,
        )
    }
    let (ca, pa) = split(a);
    let (cb, pb) = split(b);
    let n = ca.len().max(cb.len());
    for i in 0..n {
        let (x, y) = (
            ca.get(i).copied().unwrap_or(0),
            cb.get(i).copied().unwrap_or(0),
        );
        if x != y {
            return x.cmp(&y);
        }
    }
    match (pa, pb) {
        (None, None) => std::cmp::Ordering::Equal,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (Some(_), None) => std::cmp::Ordering::Less,
        (Some(x), Some(y)) => x.cmp(y),
    }
}

/// Reads and verifies a bundle's header from `r`, leaving `r` at the payload.
pub fn read_header<R: BufRead>(r: &mut R, keys: &TrustedKeys) -> Result<Manifest, BundleError> {
    let mut magic = [0u8; MAGIC.len()];
    r.read_exact(&mut magic).map_err(|_| BundleError::Magic)?;
    if magic != MAGIC {
        return Err(BundleError::Magic);
    }
    let mut line = Vec::new();
    r.take(MAX_HEADER as u64).read_until(b'\n', &mut line)?;
    if line.last() != Some(&b'\n') {
        return Err(BundleError::Header(
            "header line missing or longer than 64 KiB".into(),
        ));
    }
    let env: Envelope =
        serde_json::from_slice(&line).map_err(|e| BundleError::Header(e.to_string()))?;
    let manifest_bytes = B64
        .decode(&env.manifest)
        .map_err(|e| BundleError::Header(format!("manifest is not base64: {e}")))?;
    let mut tried = Vec::new();
    let mut ok = false;
    for s in &env.signatures {
        tried.push(s.key_id.clone());
        let (Some(key), Ok(sig)) = (keys.get(&s.key_id), B64.decode(&s.sig)) else {
            continue;
        };
        let pk = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key);
        if pk.verify(&manifest_bytes, &sig).is_ok() {
            ok = true;
            break;
        }
    }
    if !ok {
        return Err(BundleError::Signature(if tried.is_empty() {
            "none".into()
        } else {
            tried.join(", ")
        }));
    }
    let m: Manifest = serde_json::from_slice(&manifest_bytes)
        .map_err(|e| BundleError::Header(format!("manifest: {e}")))?;
    if m.format != "slot-fat-gzip" {
        return Err(BundleError::Header(format!(
            "unknown payload format {:?}",
            m.format
        )));
    }
    Ok(m)
}

/// The hardware boards pos-hub images boot, by the first `compatible` string of their
/// device tree's root node (the board name bundles list in `compatible`). Image
/// boards: `rpi` (both families, all of these), `rpi4` (the Pi 4 family: rpi4, rpi400,
/// cm4), `rpi5`.
pub const BOARDS: &[(&str, &str)] = &[
    ("raspberrypi,4-model-b", "rpi4"),
    ("raspberrypi,400", "rpi400"),
    ("raspberrypi,4-compute-module", "cm4"),
    ("raspberrypi,5-model-b", "rpi5"),
];

/// The board name of a device tree's root `compatible` property (NUL-separated strings).
pub fn board_of_dt_compatible(dt: &[u8]) -> Option<&'static str> {
    dt.split(|&b| b == 0)
        .filter_map(|s| std::str::from_utf8(s).ok())
        .find_map(|c| BOARDS.iter().find(|(dc, _)| *dc == c).map(|(_, b)| *b))
}

/// Checks that `m` may be installed on `board` running `running`.
pub fn check_compatible(m: &Manifest, board: &str, running: &str) -> Result<(), BundleError> {
    if m.board != board && !m.compatible.iter().any(|b| b == board) {
        return Err(BundleError::Board {
            board: m.board.clone(),
            compatible: m.compatible.join(", "),
            ours: board.into(),
        });
    }
    if let Some(min) = &m.min_version {
        if version_cmp(running, min) == std::cmp::Ordering::Less {
            return Err(BundleError::TooOld {
                version: m.version.clone(),
                min: min.clone(),
                running: running.into(),
            });
        }
    }
    Ok(())
}

/// Streams the payload from `r` (positioned after the header) into `slot`, hashing the
/// compressed bytes as they arrive and decompressing into the slot. The slot's first
/// 64 KiB (its FAT boot sector and tables) are held back and written only after the
/// hash and size matched, so a slot interrupted or refused half-way never looks
/// bootable. `progress(bytes_in)` is called as data arrives.
pub fn stream_payload<R: Read, W: std::io::Write + std::io::Seek>(
    r: R,
    m: &Manifest,
    slot: &mut W,
    slot_capacity: u64,
    mut progress: impl FnMut(u64),
) -> Result<(), BundleError> {
    use std::io::SeekFrom;
    const HOLD: usize = 64 * 1024;
    if m.slot_size > slot_capacity {
        return Err(BundleError::Payload(format!(
            "slot image is {} bytes, the slot holds {slot_capacity}",
            m.slot_size
        )));
    }
    // Invalidate the slot first: zero its boot sector.
    slot.seek(SeekFrom::Start(0))?;
    slot.write_all(&[0u8; 512])?;
    slot.flush()?;
    let hashing = HashingReader {
        inner: r.take(m.payload_size.saturating_add(1)),
        hasher: Sha256::new(),
        count: 0,
        progress: &mut progress,
    };
    let mut gz = flate2::read::GzDecoder::new(hashing);
    let mut head = vec![0u8; HOLD];
    let mut written: u64 = 0;
    let mut buf = vec![0u8; 256 * 1024];
    let mut head_len = 0usize;
    loop {
        let n = gz
            .read(&mut buf)
            .map_err(|e| BundleError::Payload(format!("decompressing: {e}")))?;
        if n == 0 {
            break;
        }
        let mut chunk = &buf[..n];
        if written + (chunk.len() as u64) > m.slot_size {
            return Err(BundleError::Payload(
                "decompressed payload is larger than the manifest says".into(),
            ));
        }
        if head_len < HOLD {
            let take = (HOLD - head_len).min(chunk.len());
            head[head_len..head_len + take].copy_from_slice(&chunk[..take]);
            head_len += take;
            chunk = &chunk[take..];
            written += take as u64;
            if chunk.is_empty() {
                continue;
            }
            slot.seek(SeekFrom::Start(written))?;
        }
        slot.write_all(chunk)?;
        written += chunk.len() as u64;
    }
    // Drain whatever follows the gzip stream (there must be nothing).
    let mut hashing = gz.into_inner();
    let mut rest = Vec::new();
    hashing.read_to_end(&mut rest)?;
    let count = hashing.count;
    let digest = hex(&hashing.hasher.finalize());
    if count != m.payload_size {
        return Err(BundleError::Payload(format!(
            "received {count} payload bytes, the manifest says {}",
            m.payload_size
        )));
    }
    if digest != m.payload_sha256 {
        return Err(BundleError::Payload(format!(
            "SHA-256 {digest} but the manifest says {}",
            m.payload_sha256
        )));
    }
    if written != m.slot_size {
        return Err(BundleError::Payload(format!(
            "slot image is {written} bytes, the manifest says {}",
            m.slot_size
        )));
    }
    slot.flush()?;
    slot.seek(SeekFrom::Start(0))?;
    slot.write_all(&head[..head_len])?;
    slot.flush()?;
    Ok(())
}

struct HashingReader<'a, R, F: FnMut(u64)> {
    inner: R,
    hasher: Sha256,
    count: u64,
    progress: &'a mut F,
}

impl<R: Read, F: FnMut(u64)> Read for HashingReader<'_, R, F> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        (self.progress)(self.count);
        Ok(n)
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Creates a bundle from a slot image: gzip payload, manifest, Ed25519 signature.
pub struct CreateOptions<'a> {
    pub version: &'a str,
    pub board: &'a str,
    pub compatible: Vec<String>,
    pub min_version: Option<String>,
    pub key_id: &'a str,
    /// PKCS#8 DER of the Ed25519 signing key.
    pub key_pkcs8: &'a [u8],
    pub created: String,
}

pub fn create<R: Read, W: Write>(
    mut slot_image: R,
    o: &CreateOptions<'_>,
    out: &mut W,
) -> Result<Manifest, BundleError> {
    let key = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(o.key_pkcs8)
        .map_err(|e| BundleError::Key(format!("not an Ed25519 PKCS#8 key: {e}")))?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    let slot_size = std::io::copy(&mut slot_image, &mut gz)?;
    let payload = gz.finish()?;
    let m = Manifest {
        version: o.version.into(),
        board: o.board.into(),
        compatible: o.compatible.clone(),
        payload_sha256: hex(&Sha256::digest(&payload)),
        payload_size: payload.len() as u64,
        slot_size,
        created: o.created.clone(),
        min_version: o.min_version.clone(),
        format: "slot-fat-gzip".into(),
    };
    let mbytes = serde_json::to_vec(&m).map_err(|e| BundleError::Header(e.to_string()))?;
    let sig = key.sign(&mbytes);
    let env = Envelope {
        manifest: B64.encode(&mbytes),
        signatures: vec![Sig {
            key_id: o.key_id.into(),
            sig: B64.encode(sig.as_ref()),
        }],
    };
    out.write_all(MAGIC)?;
    serde_json::to_writer(&mut *out, &env).map_err(|e| BundleError::Header(e.to_string()))?;
    out.write_all(b"\n")?;
    out.write_all(&payload)?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn key() -> (Vec<u8>, Vec<u8>) {
        use ring::signature::KeyPair;
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let kp = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        (pkcs8.as_ref().to_vec(), kp.public_key().as_ref().to_vec())
    }

    fn bundle(slot: &[u8], pkcs8: &[u8], board: &str, min: Option<&str>) -> Vec<u8> {
        let mut out = Vec::new();
        create(
            slot,
            &CreateOptions {
                version: "0.2.0",
                board,
                compatible: vec!["rpi400".into()],
                min_version: min.map(Into::into),
                key_id: "k1",
                key_pkcs8: pkcs8,
                created: "2026-11-24T00:00:00Z".into(),
            },
            &mut out,
        )
        .unwrap();
        out
    }

    fn slot_image() -> Vec<u8> {
        (0..300_000u32).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn round_trip_verifies_and_writes_the_slot() {
        let (pkcs8, public) = key();
        let b = bundle(&slot_image(), &pkcs8, "rpi4", Some("0.1.0"));
        let keys = TrustedKeys::from([("k1".to_string(), public)]);
        let mut r = Cursor::new(&b);
        let m = read_header(&mut r, &keys).unwrap();
        assert_eq!(m.version, "0.2.0");
        check_compatible(&m, "rpi4", "0.1.0").unwrap();
        check_compatible(&m, "rpi400", "0.1.5").unwrap();
        let mut slot = Cursor::new(vec![0xAAu8; 400_000]);
        let mut last = 0;
        stream_payload(&mut r, &m, &mut slot, 400_000, |n| last = n).unwrap();
        assert_eq!(last, m.payload_size);
        assert_eq!(&slot.get_ref()[..300_000], &slot_image()[..]);
    }

    #[test]
    fn boards_from_device_tree() {
        assert_eq!(
            board_of_dt_compatible(b"raspberrypi,5-model-b\0brcm,bcm2712\0"),
            Some("rpi5")
        );
        assert_eq!(
            board_of_dt_compatible(b"raspberrypi,4-model-b\0brcm,bcm2711\0"),
            Some("rpi4")
        );
        assert_eq!(
            board_of_dt_compatible(b"raspberrypi,4-compute-module\0brcm,bcm2711\0"),
            Some("cm4")
        );
        assert_eq!(board_of_dt_compatible(b"linux,dummy-virt\0"), None);
    }

    #[test]
    fn refuses_wrong_key_board_and_age() {
        let (pkcs8, _) = key();
        let (_, other_public) = key();
        let b = bundle(&slot_image(), &pkcs8, "rpi4", Some("0.1.0"));
        let keys = TrustedKeys::from([("k1".to_string(), other_public)]);
        assert!(matches!(
            read_header(&mut Cursor::new(&b), &keys),
            Err(BundleError::Signature(_))
        ));
        assert!(matches!(
            read_header(&mut Cursor::new(b"hello"), &keys),
            Err(BundleError::Magic)
        ));
        let (pkcs8, public) = key();
        let b = bundle(&slot_image(), &pkcs8, "rpi5", Some("0.1.0"));
        let keys = TrustedKeys::from([("k1".to_string(), public)]);
        let m = read_header(&mut Cursor::new(&b), &keys).unwrap();
        assert!(matches!(
            check_compatible(&m, "rpi4", "0.1.0"),
            Err(BundleError::Board { .. })
        ));
        let b = bundle(&slot_image(), &pkcs8, "rpi4", Some("0.1.5"));
        let m = read_header(&mut Cursor::new(&b), &keys).unwrap();
        assert!(matches!(
            check_compatible(&m, "rpi4", "0.1.0"),
            Err(BundleError::TooOld { .. })
        ));
    }

    #[test]
    fn tampered_manifest_or_payload_is_refused_and_slot_stays_invalid() {
        let (pkcs8, public) = key();
        let keys = TrustedKeys::from([("k1".to_string(), public)]);
        let b = bundle(&slot_image(), &pkcs8, "rpi4", None);
        // Truncated download.
        let cut = &b[..b.len() - 1000];
        let mut r = Cursor::new(cut);
        let m = read_header(&mut r, &keys).unwrap();
        let mut slot = Cursor::new(vec![0x55u8; 400_000]);
        assert!(matches!(
            stream_payload(&mut r, &m, &mut slot, 400_000, |_| {}),
            Err(BundleError::Payload(_))
        ));
        assert_eq!(
            &slot.get_ref()[..512],
            &[0u8; 512][..],
            "boot sector zeroed: the slot is marked invalid"
        );
        // A flipped payload byte.
        let mut bad = b.clone();
        let n = bad.len();
        bad[n - 20] ^= 0xff;
        let mut r = Cursor::new(&bad);
        let m = read_header(&mut r, &keys).unwrap();
        let mut slot = Cursor::new(vec![0x55u8; 400_000]);
        assert!(stream_payload(&mut r, &m, &mut slot, 400_000, |_| {}).is_err());
        assert_eq!(&slot.get_ref()[..512], &[0u8; 512][..]);
        // Too big for the slot.
        let mut r = Cursor::new(&b);
        let m = read_header(&mut r, &keys).unwrap();
        let mut slot = Cursor::new(vec![0u8; 1000]);
        assert!(stream_payload(&mut r, &m, &mut slot, 1000, |_| {}).is_err());
    }

    #[test]
    fn versions_order_numerically() {
        use std::cmp::Ordering::*;
        assert_eq!(version_cmp("1.4.2", "1.10.0"), Less);
        assert_eq!(version_cmp("1.2.0-rc1", "1.2.0"), Less);
        assert_eq!(version_cmp("v2.0", "2.0.0"), Equal);
        assert_eq!(version_cmp("0.2.0", "0.1.9"), Greater);
    }

    /// Found while writing fuzz/ (bundle): `payload_size + 1` overflowed for a
    /// signed manifest claiming u64::MAX bytes. Refused, slot left invalid.
    #[test]
    fn huge_payload_size_is_refused_without_overflow() {
        let m = Manifest {
            version: "0.2.0".into(),
            board: "rpi4".into(),
            compatible: vec![],
            payload_sha256: "00".into(),
            payload_size: u64::MAX,
            slot_size: 1000,
            created: "x".into(),
            min_version: None,
            format: "slot-fat-gzip".into(),
        };
        let mut slot = Cursor::new(vec![0xA5u8; 4096]);
        let payload = {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&[1u8; 1000]).unwrap();
            gz.finish().unwrap()
        };
        let e = stream_payload(&payload[..], &m, &mut slot, 1 << 20, |_| {}).unwrap_err();
        assert!(matches!(e, BundleError::Payload(_)), "{e}");
        assert!(slot.get_ref()[..512].iter().all(|b| *b == 0));
    }
}
