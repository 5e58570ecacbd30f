#![no_main]
//! See the crate's `src/lib.rs` for what is checked.

libfuzzer_sys::fuzz_target!(|data: &[u8]| lb_fuzz::control_api_bytes(data));
