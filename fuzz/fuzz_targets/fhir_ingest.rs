#![no_main]
//! `connectors::fuzzing::fhir_ingest`; the logic and its invariants live there.
libfuzzer_sys::fuzz_target!(|data: &[u8]| connectors::fuzzing::fhir_ingest(data));
