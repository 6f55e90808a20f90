#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| pos_hub_fuzz::sio::run(data));
