//! The MBR of the boot disk, and the first-boot rewrite that grows partition 4 to
//! the end of the card: the first 8 input bytes are the disk size in sectors. A
//! grown partition starts where it did, ends within the disk on a 1 MiB boundary,
//! only grows, and nothing else in the sector changes.

use pos_hub::init::disk::grow_last_entry;
use pos_hub::system::disk::parse_mbr;

pub fn run(data: &[u8]) {
    let mut size = [0u8; 8];
    let n = data.len().min(8);
    size[..n].copy_from_slice(&data[..n]);
    let disk_sectors = u64::from_le_bytes(size);
    let rest = data.get(8..).unwrap_or(&[]);
    let mut sector = [0u8; 512];
    let n = rest.len().min(512);
    sector[..n].copy_from_slice(&rest[..n]);
    let Ok(parts) = parse_mbr(&sector) else {
        assert!(sector[510] != 0x55 || sector[511] != 0xAA);
        return;
    };
    let before = sector;
    match grow_last_entry(&mut sector, disk_sectors) {
        Ok(Some(len)) => {
            let p4 = parse_mbr(&sector).expect("still an MBR")[3];
            assert_eq!(p4.sectors, len);
            assert_eq!(p4.start, parts[3].start, "partition 4 moved");
            assert!(len > parts[3].sectors, "partition 4 shrank");
            let end = p4.start as u64 + len as u64;
            assert!(
                end <= disk_sectors,
                "partition 4 ends at {end}, past the disk ({disk_sectors})"
            );
            assert_eq!(end % 2048, 0, "end not 1 MiB aligned");
            for (i, (a, b)) in before.iter().zip(sector.iter()).enumerate() {
                if !(446 + 48 + 12..446 + 48 + 16).contains(&i) {
                    assert_eq!(a, b, "byte {i} changed");
                }
            }
        }
        Ok(None) => assert_eq!(before, sector, "sector changed without growing"),
        Err(e) => {
            assert_eq!(before, sector);
            assert!(parts[3].kind == 0 || parts[3].start == 0, "refused: {e}");
        }
    }
}
