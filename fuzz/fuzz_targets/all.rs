//! Every target in one binary; `HUB_FUZZ_TARGET=<name>` chooses which (scripts/fuzz).
#![no_main]
use std::sync::OnceLock;

static TARGET: OnceLock<fn(&[u8])> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let run = TARGET.get_or_init(|| {
        let name = std::env::var("HUB_FUZZ_TARGET").unwrap_or_default();
        pos_hub_fuzz::target(&name).unwrap_or_else(|| {
            eprintln!(
                "HUB_FUZZ_TARGET={name:?} is not a target; one of: {}",
                pos_hub_fuzz::TARGETS
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            std::process::exit(2)
        })
    });
    run(data)
});
