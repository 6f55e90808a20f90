//! Replays every committed seed (fuzz/seeds/<target>/*) through its target's
//! property checks, on the stable toolchain and without libFuzzer: what a fuzzing
//! run once found (its crash inputs are kept among the seeds) stays fixed on every
//! `cargo test`. The coverage-guided runs themselves are scripts/fuzz.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

fn seeds_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds")
}

#[test]
fn every_target_has_seeds_and_every_seed_dir_a_target() {
    let root = seeds_dir();
    for (name, _) in pos_hub_fuzz::TARGETS {
        let n = std::fs::read_dir(root.join(name))
            .unwrap_or_else(|e| panic!("fuzz/seeds/{name}: {e}"))
            .count();
        assert!(n > 0, "fuzz/seeds/{name} is empty");
    }
    for d in std::fs::read_dir(&root).unwrap() {
        let name = d.unwrap().file_name().into_string().unwrap();
        assert!(
            pos_hub_fuzz::target(&name).is_some(),
            "fuzz/seeds/{name} names no target"
        );
    }
}

#[test]
fn every_seed_holds_its_targets_properties() {
    let root = seeds_dir();
    let mut failed = Vec::new();
    let mut ran = 0;
    for (name, run) in pos_hub_fuzz::TARGETS {
        let mut files: Vec<_> = std::fs::read_dir(root.join(name))
            .unwrap()
            .map(|d| d.unwrap().path())
            .collect();
        files.sort();
        for f in files {
            let data = std::fs::read(&f).unwrap();
            ran += 1;
            if catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
                failed.push(format!("{name}: {}", f.display()));
            }
        }
    }
    pos_hub_fuzz::remove_scratch();
    assert!(failed.is_empty(), "seeds failing their target: {failed:#?}");
    assert!(ran > 0);
}
