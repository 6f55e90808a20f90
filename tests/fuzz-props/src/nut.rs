//! NUT server replies to `GET VAR <ups> ups.status`: a reading comes only from a
//! quoted `VAR` line for our UPS, and its flags are the status tokens it carries.

use pos_hub::power::{parse_status, parse_var_line};

use crate::util::text;

pub fn run(data: &[u8]) {
    let Some(s) = text(data) else { return };
    match parse_var_line(s, "ups") {
        Ok(r) => {
            let v = s
                .trim_end()
                .strip_prefix("VAR ups ups.status \"")
                .expect("a VAR line for our UPS");
            assert!(v.ends_with('"'));
            let toks: Vec<&str> = r.raw.split_whitespace().collect();
            assert_eq!(r.on_battery, toks.contains(&"OB"));
            assert_eq!(r.low, toks.contains(&"LB"));
            assert_eq!(r.fsd, toks.contains(&"FSD"));
            let again = parse_status(&r.raw);
            assert_eq!(
                (again.on_battery, again.low, again.fsd),
                (r.on_battery, r.low, r.fsd)
            );
        }
        Err(e) => assert!(!e.is_empty()),
    }
}
