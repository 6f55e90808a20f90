//! The ext4 superblock of the data partition (init decides from it whether to run
//! e2fsck): only a superblock with the magic is read, and its size does not wrap.

use pos_hub::init::disk::ext4_info_of;

pub fn run(data: &[u8]) {
    let mut sb = [0u8; 1024];
    let n = data.len().min(1024);
    sb[..n].copy_from_slice(&data[..n]);
    if let Some(info) = ext4_info_of(&sb) {
        assert_eq!(u16::from_le_bytes([sb[56], sb[57]]), 0xEF53);
        let le32 = |o: usize| u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]) as u128;
        let blocks = le32(4) | (le32(0x150) << 32);
        let bs = 1024u128 << le32(24).min(6);
        assert_eq!(
            info.bytes as u128,
            (blocks * bs).min(u64::MAX as u128),
            "size wrapped"
        );
    }
}
