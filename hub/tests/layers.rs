//! The import rule of `hub/src`, checked mechanically: lower layers never import upper ones.
//!
//! Every `crate::<module>` path in a file under `hub/src/<module>` (or `<module>.rs`) is an edge
//! from one top-level module to another; each edge must point to a lower layer than its
//! source. The layers, bottom first, are the table in `LAYERS` (the README's "Design notes" say
//! the same in words). Reads the source only: no build of the crate, cheap.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level modules of `hub/src` by layer, bottom first. A module may use any module of a
/// lower layer, none of its own or a higher one.
const LAYERS: &[&[&str]] = &[
    // leaves anyone may call: helpers, counters, the crate root's VERSION
    &["util", "allocs", "metrics", "VERSION"],
    // the box and basic services, each standing alone
    &["auth", "conn", "clock", "power", "system"],
    // every settings type, below all their users
    &["config"],
    &["log"],
    &["link"],
    &["realm"],
    &["bridge", "realtime", "tls", "ops"],
    &["update", "provision", "discovery"],
    &["http"],
    // the two programs: the hub's server and PID 1 (which starts `pos-hub serve` as a child)
    &["serve", "init"],
    &["cli"],
];

/// Edges known to break the rule, each owned by someone working on it (issue 19). The test
/// fails on any other violation, and on a listed one that is gone (take it off the list).
const KNOWN: &[(&str, &str, &str)] = &[];

/// Source text with comments, string and char literals blanked out (lines kept).
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    let blank = |out: &mut String, s: &[u8]| {
        for &c in s {
            out.push(if c == b'\n' { '\n' } else { ' ' });
        }
    };
    while i < b.len() {
        let rest = &b[i..];
        if rest.starts_with(b"//") {
            let end = rest.iter().position(|&c| c == b'\n').unwrap_or(rest.len());
            blank(&mut out, &rest[..end]);
            i += end;
        } else if rest.starts_with(b"/*") {
            let mut depth = 0;
            let mut j = 0;
            while j < rest.len() {
                if rest[j..].starts_with(b"/*") {
                    depth += 1;
                    j += 2;
                } else if rest[j..].starts_with(b"*/") {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            blank(&mut out, &rest[..j]);
            i += j;
        } else if (rest[0] == b'r' || rest.starts_with(b"br"))
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'))
            && {
                let k = if rest[0] == b'r' { 1 } else { 2 };
                let hashes = rest[k..].iter().take_while(|&&c| c == b'#').count();
                rest.get(k + hashes) == Some(&b'"')
            }
        {
            let k = if rest[0] == b'r' { 1 } else { 2 };
            let hashes = rest[k..].iter().take_while(|&&c| c == b'#').count();
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            let body = k + hashes + 1;
            let end = rest[body..]
                .windows(close.len())
                .position(|w| w == close.as_slice())
                .map(|p| body + p + close.len())
                .unwrap_or(rest.len());
            blank(&mut out, &rest[..end]);
            i += end;
        } else if rest[0] == b'"' {
            let mut j = 1;
            while j < rest.len() && rest[j] != b'"' {
                j += if rest[j] == b'\\' { 2 } else { 1 };
            }
            let end = (j + 1).min(rest.len());
            blank(&mut out, &rest[..end]);
            i += end;
        } else if rest[0] == b'\'' {
            // a char literal ('x', '\n', '\u{1F600}', '"') or a lifetime ('a)
            let end = if rest.get(1) == Some(&b'\\') {
                rest[2..].iter().position(|&c| c == b'\'').map(|p| p + 3)
            } else {
                let ch = src[i + 1..].chars().next().map_or(1, char::len_utf8);
                (rest.get(1 + ch) == Some(&b'\'')).then_some(ch + 2)
            };
            let end = end.unwrap_or(1);
            blank(&mut out, &rest[..end]);
            i += end;
        } else {
            let ch = src[i..].chars().next().unwrap();
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

/// The modules a file's code names as `crate::m`, `crate::{m, n::x}`, with their line numbers.
fn crate_paths(code: &str) -> Vec<(String, usize)> {
    let mut found = Vec::new();
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut at = 0;
    while let Some(p) = code[at..].find("crate::") {
        let start = at + p;
        at = start + "crate::".len();
        let before = code[..start].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue; // `$crate::` in a macro, or a longer name ending in "crate"
        }
        let line = code[..start].matches('\n').count() + 1;
        let rest = &code[at..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    _ => {}
                }
                if depth == 0 || (depth == 1 && c == ',') {
                    let m = ident(&item);
                    if !m.is_empty() {
                        found.push((m, line));
                    }
                    item.clear();
                    if depth == 0 {
                        break;
                    }
                } else {
                    item.push(c);
                }
            }
        } else {
            let m = ident(rest);
            if !m.is_empty() {
                found.push((m, line));
            }
        }
    }
    found
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read hub/src") {
        let path = entry.expect("read hub/src").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// (from, to) -> every place the edge is taken, as "file:line".
fn edges(src: &Path) -> BTreeMap<(String, String), Vec<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut edges: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let from = first.trim_end_matches(".rs").to_string();
        if from == "lib" || from == "main" {
            continue; // the crate root declares the modules; main is the binary on top
        }
        let text = std::fs::read_to_string(&file).expect("read a source file");
        for (to, line) in crate_paths(&code_only(&text)) {
            if to != from {
                edges
                    .entry((from.clone(), to))
                    .or_default()
                    .push(format!("{}:{line}", rel.display()));
            }
        }
    }
    edges
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

#[test]
fn lower_layers_never_import_upper_ones() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let edges = edges(&src);
    assert!(
        edges.len() > 50,
        "found only {} import edges in {}: the scanner is broken",
        edges.len(),
        src.display()
    );

    let mut top_level: BTreeSet<String> = BTreeSet::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy();
        if path.is_dir() {
            top_level.insert(name.to_string());
        } else if let Some(m) = name.strip_suffix(".rs") {
            top_level.insert(m.to_string());
        }
    }
    top_level.remove("lib");
    top_level.remove("main");
    let unplaced: Vec<_> = top_level.iter().filter(|m| layer_of(m).is_none()).collect();
    assert!(
        unplaced.is_empty(),
        "hub/src modules missing from LAYERS in hub/tests/layers.rs: {unplaced:?} (give each a layer)"
    );

    let mut violations = Vec::new();
    let mut known_seen = BTreeSet::new();
    for ((from, to), places) in &edges {
        let (Some(lf), Some(lt)) = (layer_of(from), layer_of(to)) else {
            violations.push(format!("{from} -> {to}: not in LAYERS ({})", places[0]));
            continue;
        };
        if lt < lf {
            continue;
        }
        if KNOWN.iter().any(|(f, t, _)| f == from && t == to) {
            known_seen.insert((from.clone(), to.clone()));
            continue;
        }
        violations.push(format!(
            "{from} (layer {lf}) -> {to} (layer {lt}) at {}",
            places.join(", ")
        ));
    }
    assert!(
        violations.is_empty(),
        "lower layers must not import upper ones (hub/tests/layers.rs LAYERS):\n  {}",
        violations.join("\n  ")
    );
    let stale: Vec<_> = KNOWN
        .iter()
        .filter(|(f, t, _)| !known_seen.contains(&(f.to_string(), t.to_string())))
        .map(|(f, t, _)| format!("{f} -> {t}"))
        .collect();
    assert!(
        stale.is_empty(),
        "known violations no longer found, take them off KNOWN in hub/tests/layers.rs: {stale:?}"
    );
}

#[test]
fn the_scanner_sees_through_comments_strings_and_groups() {
    let code = code_only(
        "use crate::{log::Event, realm};\n\
         // crate::http in a comment\n\
         let s = \"crate::tls in a string\"; let c = '\"'; let r = r#\"crate::ops\"#;\n\
         fn f<'a>(x: &'a crate::auth::Key) {}\n\
         /* crate::init /* nested */ crate::serve */ $crate::cli::x();\n",
    );
    let got: Vec<String> = crate_paths(&code).into_iter().map(|(m, _)| m).collect();
    assert_eq!(got, ["log", "realm", "auth"]);
}
