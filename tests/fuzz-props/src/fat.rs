//! FAT boot sectors (init finds the boot disk by the settings partition's label):
//! a label is read only from a signed boot sector with an extended boot record and
//! is at most the 11 bytes it was stored in.

use pos_hub::system::disk::fat_label_of;

pub fn run(data: &[u8]) {
    let mut bs = [0u8; 512];
    let n = data.len().min(512);
    bs[..n].copy_from_slice(&data[..n]);
    if let Some(label) = fat_label_of(&bs) {
        assert_eq!((bs[510], bs[511]), (0x55, 0xAA));
        assert!(label.len() <= 11 * 3, "label {label:?}");
        assert!(!label.ends_with(' '));
        let fat32 = u16::from_le_bytes([bs[0x16], bs[0x17]]) == 0;
        assert_eq!(bs[if fat32 { 0x42 } else { 0x26 }], 0x29);
    }
}
