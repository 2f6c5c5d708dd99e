#![no_main]
//! `tributary::fuzzing::query_string`; the logic and its invariants live there.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tributary::fuzzing::query_string(data));
