//! The logic of the connectors' fuzz targets, kept here so that `fuzz/` (libFuzzer) and the
//! corpus replay test (`tests/fuzz_corpus.rs`, run by `cargo test`) drive the same code.
//!
//! # Why in the crate under test
//! A target written beside the fuzzer drifts from the product; one written here calls the very
//! functions the connectors call on an upstream's bytes, and any invariant it asserts is checked
//! on every committed seed in CI, on stable, without libFuzzer. Each function takes arbitrary
//! bytes, must not panic on any input except to report a broken invariant, and asserts what must
//! hold whatever the upstream sent.

use bytes::BytesMut;
use serde_json::Value;
use tokio_util::codec::{Decoder, Encoder};

use crate::{
    ConnectorError, NhsNumber, ResourceType, SourceQuery,
    fhir::mapping::{is_fhir_id, read_everything, read_search},
    hl7v2::{
        interpret,
        mapping::map_message,
        message::{Charset, Text, escape, unescape},
        mllp::{EB, MllpCodec, MllpError},
    },
    nhs::NHS_NUMBER_SYSTEM,
};

/// The NHS number the targets ask about when the input names none that is valid (the PDS
/// sandbox's first test patient).
const DEFAULT_NHS: &str = "9000000009";

fn default_nhs() -> NhsNumber {
    match NhsNumber::parse(DEFAULT_NHS) {
        Ok(n) => n,
        Err(e) => panic!("the default NHS number is invalid: {e}"),
    }
}

/// Modulus 11, written out again so that a parsed NHS number is checked against an
/// independent statement of the rule rather than against itself.
pub fn passes_modulus_11(digits: &str) -> bool {
    let d: Vec<u32> = digits.chars().filter_map(|c| c.to_digit(10)).collect();
    if d.len() != 10 || digits.len() != 10 {
        return false;
    }
    let sum: u32 = d[..9]
        .iter()
        .enumerate()
        .map(|(i, v)| v * (10 - i as u32))
        .sum();
    let check = (11 - sum % 11) % 11;
    check != 10 && check == d[9]
}

/// Asserts that no error text repeats the NHS number (patient data never in error texts).
fn assert_no_nhs_in_error(err: &ConnectorError, nhs: &NhsNumber) {
    let text = err.to_string();
    assert!(
        !text.contains(&nhs.expose()),
        "an error text carries the NHS number: {:?}",
        err.code()
    );
}

/// HL7 v2: bytes (an MLLP payload) -> text -> message -> FHIR resources, and the reply check
/// the connector runs (`interpret`) with the control id and query tag the message itself
/// carries, so the fuzzer reaches the mapping.
///
/// Invariants: every mapped patient starts with its Patient; every resource has a
/// `resourceType` and an id in FHIR's id syntax; an NHS number the mapping exposes and
/// `NhsNumber::parse` accepts passes Modulus 11; escaping any text with the message's
/// separators and unescaping it gives the text back; an accepted reply holds the asked-for
/// patient and only wanted types; no error text carries the NHS number.
pub fn hl7v2_message(data: &[u8]) {
    let Ok(text) = Text::decode(data) else {
        return;
    };
    let Ok(msg) = text.parse() else {
        return;
    };
    let patients = map_message(&msg);
    let mut asked = None;
    for p in &patients {
        assert_eq!(
            p.resources.first().map(|r| &r["resourceType"]),
            Some(&Value::from("Patient")),
            "a mapped patient does not start with its Patient"
        );
        for r in &p.resources {
            assert!(r["resourceType"].is_string(), "a resource has no type");
            let id = r["id"].as_str().unwrap_or_default();
            assert!(is_fhir_id(id), "resource id {id:?} is not a FHIR id");
        }
        for n in &p.nhs_numbers {
            if let Ok(parsed) = NhsNumber::parse(n) {
                assert!(
                    passes_modulus_11(&parsed.expose()),
                    "parsed NHS number fails mod 11"
                );
                assert_eq!(parsed.expose(), *n, "an NHS number does not round-trip");
                asked.get_or_insert(parsed);
            }
        }
    }

    // Escaping round-trips with this message's separators.
    let seps = msg.separators();
    let sample = String::from_utf8_lossy(data);
    let sample: String = sample.chars().take(256).collect();
    assert_eq!(
        unescape(&escape(&sample, &seps), &seps, Charset::Utf8),
        sample,
        "escape then unescape changed the text"
    );

    // The connector's reply check, asked with what the reply says it answers.
    let control_id = msg
        .segment("MSA")
        .map(|s| s.get(2, 1, 1).trim().to_owned())
        .unwrap_or_default();
    let tag = msg
        .segment("QAK")
        .map(|s| s.get(1, 1, 1).trim().to_owned())
        .unwrap_or_default();
    let nhs = asked.unwrap_or_else(default_nhs);
    let wanted = [ResourceType::Condition, ResourceType::Encounter];
    let query = SourceQuery::new(nhs, wanted);
    match interpret(data, &control_id, &tag, &query).0 {
        Ok(record) => {
            for r in &record.resources {
                let ty = r["resourceType"].as_str().and_then(ResourceType::parse);
                assert!(
                    ty.is_some_and(|t| query.wants(t)),
                    "an unwanted resource type was returned"
                );
            }
            if let Some(patient) = record.resources.first() {
                assert_eq!(patient["resourceType"], "Patient");
                let carries = patient["identifier"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|i| i["system"] == NHS_NUMBER_SYSTEM && i["value"] == nhs.expose());
                assert!(
                    carries,
                    "an accepted reply's Patient lacks the asked NHS number"
                );
            }
        }
        Err(e) => assert_no_nhs_in_error(&e, &nhs),
    }
}

/// Splits `data` into a chunking plan and a byte stream: the first byte says how many of the
/// following bytes are chunk lengths (at most 8); the rest is the stream.
fn chunking(data: &[u8]) -> (Vec<usize>, &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return (Vec::new(), data);
    };
    let n = usize::from(n % 9).min(rest.len());
    let (plan, stream) = rest.split_at(n);
    let sizes = plan.iter().map(|&b| usize::from(b).max(1)).collect();
    (sizes, stream)
}

#[derive(Debug, PartialEq)]
enum Ending {
    Clean,
    TooLarge,
    NoStartBlock,
    BadEndBlock,
    Truncated,
}

fn ending(e: &MllpError) -> Ending {
    match e {
        MllpError::TooLarge { .. } => Ending::TooLarge,
        MllpError::NoStartBlock => Ending::NoStartBlock,
        MllpError::BadEndBlock => Ending::BadEndBlock,
        MllpError::Truncated => Ending::Truncated,
        MllpError::Io(_) => panic!("the codec reported i/o without doing any"),
    }
}

/// Runs the codec over `stream` delivered in chunks of `sizes` (cycled; one chunk when empty),
/// as a socket delivers it, then at end of stream.
fn decode_stream(max: usize, stream: &[u8], sizes: &[usize]) -> (Vec<BytesMut>, Ending) {
    let mut codec = MllpCodec::new(max);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut at = 0;
    let mut turn = 0;
    while at < stream.len() {
        let size = sizes
            .get(turn % sizes.len().max(1))
            .copied()
            .unwrap_or(stream.len());
        turn += 1;
        let end = (at + size).min(stream.len());
        buf.extend_from_slice(&stream[at..end]);
        at = end;
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(e) => return (frames, ending(&e)),
            }
        }
    }
    loop {
        match codec.decode_eof(&mut buf) {
            Ok(Some(frame)) => frames.push(frame),
            Ok(None) => return (frames, Ending::Clean),
            Err(e) => return (frames, ending(&e)),
        }
    }
}

/// MLLP framing: the codec's decode over arbitrary chunking of an arbitrary stream.
///
/// Invariants: the frames and the way the stream ends (clean or which error) do not depend on
/// how the stream was chunked; every frame is within the cap and holds no end block; every frame
/// encodes and decodes back to itself.
pub fn mllp_framing(data: &[u8]) {
    let (sizes, stream) = chunking(data);
    // A small cap so that the fuzzer reaches it; and the connector's default-sized cap.
    for max in [64, 1 << 20] {
        let whole = decode_stream(max, stream, &[]);
        let chunked = decode_stream(max, stream, &sizes);
        let bytewise = decode_stream(max, stream, &[1]);
        assert_eq!(whole, chunked, "chunking changed what the codec decoded");
        assert_eq!(
            whole, bytewise,
            "byte-at-a-time delivery changed what the codec decoded"
        );
        for frame in &whole.0 {
            assert!(frame.len() <= max, "a frame passed the cap");
            assert!(!frame.contains(&EB), "a frame holds an end block");
            let mut codec = MllpCodec::new(max);
            let mut wire = BytesMut::new();
            if let Err(e) = codec.encode(&frame[..], &mut wire) {
                panic!("a decoded frame does not encode: {e}");
            }
            match codec.decode(&mut wire) {
                Ok(Some(again)) => assert_eq!(again, *frame, "a frame does not round-trip"),
                other => panic!("an encoded frame does not decode: {other:?}"),
            }
            assert!(wire.is_empty(), "encoding left bytes over");
        }
    }
}

/// The NHS number a FHIR reply is about: the first valid one among its identifiers.
fn nhs_in(body: &[u8]) -> Option<NhsNumber> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let entries = v["entry"].as_array()?;
    entries
        .iter()
        .flat_map(|e| e["resource"]["identifier"].as_array().into_iter().flatten())
        .filter(|i| i["system"] == NHS_NUMBER_SYSTEM)
        .find_map(|i| i["value"].as_str().and_then(|s| NhsNumber::parse(s).ok()))
}

/// FHIR ingestion: a source's Patient search reply and `$everything` reply (the input split at
/// its first NUL byte; without one, the same bytes serve as both) read as the FHIR connector
/// reads them, into the `SourceRecord` it would return.
///
/// Invariants: a found Patient carries the asked-for NHS number and no other, and has an id;
/// every kept resource is of a wanted clinical type, has an id, and refers (when it refers to a
/// patient at all) to the found Patient; no error text carries the NHS number.
pub fn fhir_ingest(data: &[u8]) {
    let (search, everything) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, data),
    };
    let nhs = nhs_in(search).unwrap_or_else(default_nhs);
    let query = SourceQuery::new(
        nhs,
        [
            ResourceType::Condition,
            ResourceType::AllergyIntolerance,
            ResourceType::Observation,
        ],
    );
    let patient = match read_search(search, &nhs) {
        Ok(Some(p)) => p,
        Ok(None) => return,
        Err(e) => return assert_no_nhs_in_error(&e, &nhs),
    };
    assert_eq!(patient["resourceType"], "Patient");
    let numbers: Vec<&Value> = patient["identifier"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["system"] == NHS_NUMBER_SYSTEM)
        .map(|i| &i["value"])
        .collect();
    assert!(
        !numbers.is_empty() && numbers.iter().all(|n| **n == nhs.expose()),
        "a found Patient does not carry exactly the asked NHS number"
    );
    assert!(passes_modulus_11(&nhs.expose()));
    let Some(id) = patient["id"].as_str().filter(|id| is_fhir_id(id)) else {
        return;
    };
    match read_everything(everything, &nhs, id, |t| query.wants(t)) {
        Ok(resources) => {
            for r in &resources {
                let ty = r["resourceType"].as_str().and_then(ResourceType::parse);
                assert!(
                    ty.is_some_and(|t| t != ResourceType::Patient && query.wants(t)),
                    "an unwanted resource was kept"
                );
                assert!(
                    r["id"].as_str().is_some_and(|s| !s.is_empty()),
                    "kept without an id"
                );
                let reference = r["subject"]["reference"]
                    .as_str()
                    .or_else(|| r["patient"]["reference"].as_str());
                if let Some(reference) = reference {
                    assert!(
                        reference == format!("Patient/{id}")
                            || reference.ends_with(&format!("/Patient/{id}")),
                        "a kept resource refers to another patient"
                    );
                }
            }
        }
        Err(e) => assert_no_nhs_in_error(&e, &nhs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modulus_11_restatement_agrees_with_the_parser() {
        for n in ["9000000009", "9434765919"] {
            assert!(passes_modulus_11(n), "{n}");
            assert!(NhsNumber::parse(n).is_ok(), "{n}");
        }
        for n in ["9000000008", "1234567890", "943476591", "94347659190"] {
            assert!(!passes_modulus_11(n), "{n}");
        }
    }
}
