#![no_main]
//! `connectors::fuzzing::mllp_framing`; the logic and its invariants live there.
libfuzzer_sys::fuzz_target!(|data: &[u8]| connectors::fuzzing::mllp_framing(data));
