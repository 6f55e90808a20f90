//! `autoboot.txt` on the settings partition (a laptop may have edited it): what
//! parses names boot partitions 2 or 3 (the slots) and survives the commit rewrite.

use pos_hub::update::slots::{format_autoboot, parse_autoboot};

use crate::util::text;

pub fn run(data: &[u8]) {
    let Some(s) = text(data) else { return };
    if let Some(a) = parse_autoboot(s) {
        assert!(
            [2, 3].contains(&a.default) && [2, 3].contains(&a.tryboot),
            "autoboot names partitions {a:?} (the slots are 2 and 3)"
        );
        let again = format_autoboot(a);
        assert_eq!(parse_autoboot(&again), Some(a), "rewritten: {again:?}");
    }
}
