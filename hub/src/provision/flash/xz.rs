//! `.img.xz` images through liblzma (the library behind the `xz` command, compiled into
//! the binary by the `liblzma` crate, so a laptop needs no `xz` installed). The decoder
//! checks every block's check value as it streams. The uncompressed size, needed to
//! refuse a too-small card before writing, comes from the xz index at the end of the
//! file, walked backwards stream by stream as `xz --list` does; the `liblzma` crate has
//! no binding for the index, so the three liblzma functions used are declared here.

use std::ffi::c_void;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};

use liblzma_sys as sys;

/// The first six bytes of an xz file.
pub const MAGIC: [u8; 6] = [0xfd, b'7', b'z', b'X', b'Z', 0];
/// Stream header and footer are 12 bytes each.
const HEADER: u64 = 12;

extern "C" {
    // liblzma/index.h (stable since xz 5.0); linked from liblzma-sys's static build.
    fn lzma_index_buffer_decode(
        i: *mut *mut c_void,
        memlimit: *mut u64,
        allocator: *const c_void,
        input: *const u8,
        in_pos: *mut usize,
        in_size: usize,
    ) -> sys::lzma_ret;
    fn lzma_index_uncompressed_size(i: *const c_void) -> u64;
    fn lzma_index_stream_size(i: *const c_void) -> u64;
    fn lzma_index_end(i: *mut c_void, allocator: *const c_void);
}

/// A reader of the decompressed image (several concatenated streams, like `xz -dc`).
pub fn decoder(file: File) -> impl Read {
    liblzma::read::XzDecoder::new_multi_decoder(BufReader::with_capacity(1 << 20, file))
}

/// The uncompressed size of the xz file `f` of `len` bytes, from its indexes.
pub fn uncompressed_size(f: &mut File, len: u64) -> Result<u64, String> {
    let mut end = len;
    let mut total = 0u64;
    loop {
        // Stream padding: zero bytes in groups of four between and after streams.
        while end >= 4 && read_at(f, end - 4, 4)? == [0; 4] {
            end -= 4;
        }
        if end < 2 * HEADER {
            return Err("it is truncated (no complete xz stream)".into());
        }
        let (uncompressed, stream) = stream_sizes(f, end)?;
        total = total
            .checked_add(uncompressed)
            .ok_or("its index gives an impossible size")?;
        end = end
            .checked_sub(stream)
            .ok_or("its index does not match the file; it is damaged")?;
        if end == 0 {
            return Ok(total);
        }
    }
}

/// The uncompressed and the total size of the stream that ends at `end`.
fn stream_sizes(f: &mut File, end: u64) -> Result<(u64, u64), String> {
    let footer = read_at(f, end - HEADER, HEADER as usize)?;
    // SAFETY: lzma_stream_flags is plain data (integers and enums) for which all-zero
    // is valid; the decoder fills it from the 12 bytes we pass.
    let mut flags: sys::lzma_stream_flags = unsafe { std::mem::zeroed() };
    // SAFETY: `footer` holds the 12 bytes the function reads.
    let rc = unsafe { sys::lzma_stream_footer_decode(&mut flags, footer.as_ptr()) };
    if rc != sys::LZMA_OK {
        return Err("it has no xz stream footer: it is truncated (an unfinished download?)".into());
    }
    let index_len = flags.backward_size;
    if index_len > end - 2 * HEADER || index_len > 1 << 30 {
        return Err("its index does not match the file; it is damaged".into());
    }
    let index = read_at(f, end - HEADER - index_len, index_len as usize)?;
    let mut idx: *mut c_void = std::ptr::null_mut();
    let mut memlimit = u64::MAX;
    let mut pos = 0usize;
    // SAFETY: `index` is a live buffer of `index.len()` bytes; on success liblzma
    // allocates the index, which is freed below with lzma_index_end.
    let rc = unsafe {
        lzma_index_buffer_decode(
            &mut idx,
            &mut memlimit,
            std::ptr::null(),
            index.as_ptr(),
            &mut pos,
            index.len(),
        )
    };
    if rc != sys::LZMA_OK || idx.is_null() {
        return Err("its index is corrupt; the file is damaged".into());
    }
    // SAFETY: `idx` is the valid index decoded above, freed exactly once.
    let sizes = unsafe {
        let sizes = (
            lzma_index_uncompressed_size(idx),
            lzma_index_stream_size(idx),
        );
        lzma_index_end(idx, std::ptr::null());
        sizes
    };
    Ok(sizes)
}

fn read_at(f: &mut File, at: u64, len: usize) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; len];
    f.seek(SeekFrom::Start(at))
        .and_then(|_| f.read_exact(&mut buf))
        .map_err(|e| format!("cannot read it: {e}"))?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn xz_file(parts: &[&[u8]], padding: usize) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        for p in parts {
            let mut enc = liblzma::write::XzEncoder::new(Vec::new(), 1);
            enc.write_all(p).unwrap();
            f.write_all(&enc.finish().unwrap()).unwrap();
            f.write_all(&vec![0u8; padding]).unwrap();
        }
        f
    }

    #[test]
    fn sizes_from_the_index_and_a_round_trip() {
        let a = vec![7u8; 3_000_000];
        let b: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for (parts, pad) in [(vec![&a[..]], 0), (vec![&a[..], &b[..]], 8)] {
            let f = xz_file(&parts, pad);
            let len = f.as_file().metadata().unwrap().len();
            let mut file = f.reopen().unwrap();
            let want: usize = parts.iter().map(|p| p.len()).sum();
            assert_eq!(uncompressed_size(&mut file, len).unwrap(), want as u64);
            let mut out = Vec::new();
            decoder(f.reopen().unwrap()).read_to_end(&mut out).unwrap();
            assert_eq!(out, parts.concat());
        }
    }

    #[test]
    fn truncated_or_damaged_files_are_refused() {
        let f = xz_file(&[&[1u8; 10_000]], 0);
        let bytes = std::fs::read(f.path()).unwrap();
        let mut cut = tempfile::NamedTempFile::new().unwrap();
        cut.write_all(&bytes[..bytes.len() - 5]).unwrap();
        let len = bytes.len() as u64 - 5;
        let e = uncompressed_size(&mut cut.reopen().unwrap(), len).unwrap_err();
        assert!(e.contains("truncated"), "{e}");
        let mut tiny = tempfile::NamedTempFile::new().unwrap();
        tiny.write_all(&MAGIC).unwrap();
        assert!(uncompressed_size(&mut tiny.reopen().unwrap(), 6).is_err());
        // A flipped byte in the middle: the decoder's check catches it.
        let mut bad = bytes.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x55;
        let mut badf = tempfile::NamedTempFile::new().unwrap();
        badf.write_all(&bad).unwrap();
        let mut out = Vec::new();
        assert!(decoder(badf.reopen().unwrap())
            .read_to_end(&mut out)
            .is_err());
    }
}
