#![no_main]
//! `tributary::fuzzing::policy_load`; the logic and its invariants live there.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tributary::fuzzing::policy_load(data));
