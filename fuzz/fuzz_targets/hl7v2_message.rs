#![no_main]
//! `connectors::fuzzing::hl7v2_message`; the logic and its invariants live there.
libfuzzer_sys::fuzz_target!(|data: &[u8]| connectors::fuzzing::hl7v2_message(data));
