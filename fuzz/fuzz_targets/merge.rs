#![no_main]
//! `tributary::fuzzing::merge`; the logic and its invariants live there.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tributary::fuzzing::merge(data));
