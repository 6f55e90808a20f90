//! The support bundle: one `.tar.gz` a tech attaches to a ticket. This module only
//! packs the files it is given (name, bytes) with a manifest listing them; what goes
//! in (and that no event contents or secrets do) is decided by `http`, which gathers
//! them.

use std::io::Write;

use flate2::write::GzEncoder;
use flate2::Compression;

/// Packs `files` under a top directory `dir/` (so unpacking makes one folder), with
/// `dir/MANIFEST.txt` first listing every file and its size.
pub fn pack(dir: &str, files: &[(String, Vec<u8>)], mtime: u64) -> std::io::Result<Vec<u8>> {
    let gz = GzEncoder::new(Vec::new(), Compression::default());
    let mut tar = tar::Builder::new(gz);
    let mut manifest = String::from("pos-hub support bundle: files and sizes\n");
    for (name, bytes) in files {
        manifest.push_str(&format!("{name}\t{}\n", bytes.len()));
    }
    let mut add = |name: &str, bytes: &[u8]| -> std::io::Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(mtime);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, format!("{dir}/{name}"), bytes)
    };
    add("MANIFEST.txt", manifest.as_bytes())?;
    for (name, bytes) in files {
        add(name, bytes)?;
    }
    let mut gz = tar.into_inner()?;
    gz.flush()?;
    gz.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn packs_and_unpacks() {
        let files = vec![
            ("status.json".to_string(), b"{}".to_vec()),
            ("logs/hub.log".to_string(), b"line\n".to_vec()),
        ];
        let gz = pack("b", &files, 1_700_000_000).unwrap();
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(&gz[..]));
        let mut names = Vec::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let mut s = String::new();
            e.read_to_string(&mut s).unwrap();
            names.push((e.path().unwrap().display().to_string(), s));
        }
        assert_eq!(names[0].0, "b/MANIFEST.txt");
        assert!(names[0].1.contains("logs/hub.log\t5"));
        assert_eq!(names[2], ("b/logs/hub.log".into(), "line\n".into()));
    }
}
