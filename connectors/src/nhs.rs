//! The NHS number: ten digits whose last is a Modulus 11 check digit.
//!
//! # Why a newtype
//! An NHS number identifies a patient, so it must never reach a log line, a span or an
//! error message by accident. `Debug` and `Display` redact it; the digits leave only through
//! [`NhsNumber::expose`], which makes every disclosure visible at the call site.

use std::fmt;

/// The FHIR identifier system for NHS numbers.
pub const NHS_NUMBER_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhs-number";

/// A valid NHS number (ten digits, Modulus 11 check digit correct).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NhsNumber([u8; 10]);

/// Why a string is not an NHS number. Messages never repeat the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NhsNumberError {
    #[error("an NHS number has exactly 10 digits")]
    Length,
    #[error("an NHS number contains only the digits 0-9")]
    NotDigits,
    #[error("the NHS number fails the Modulus 11 check")]
    CheckDigit,
}

impl NhsNumber {
    /// Parses ten ASCII digits (no spaces or separators: as PDS takes them) and checks the
    /// Modulus 11 check digit.
    pub fn parse(s: &str) -> Result<Self, NhsNumberError> {
        let bytes = s.as_bytes();
        if bytes.len() != 10 {
            return Err(if bytes.iter().all(u8::is_ascii_digit) {
                NhsNumberError::Length
            } else {
                NhsNumberError::NotDigits
            });
        }
        let mut digits = [0u8; 10];
        for (slot, b) in digits.iter_mut().zip(bytes) {
            if !b.is_ascii_digit() {
                return Err(NhsNumberError::NotDigits);
            }
            *slot = b - b'0';
        }
        match check_digit(&digits[..9]) {
            Some(c) if c == digits[9] => Ok(Self(digits)),
            _ => Err(NhsNumberError::CheckDigit),
        }
    }

    /// Builds an NHS number from its first nine digits, adding the check digit; `None` when
    /// the nine digits have no valid check digit (Modulus 11 gives 10) or are not nine digits.
    pub fn from_nine(first_nine: u32) -> Option<Self> {
        if first_nine > 999_999_999 {
            return None;
        }
        let mut digits = [0u8; 10];
        let mut n = first_nine;
        for slot in digits[..9].iter_mut().rev() {
            *slot = (n % 10) as u8;
            n /= 10;
        }
        digits[9] = check_digit(&digits[..9])?;
        Some(Self(digits))
    }

    /// True in the range 999 000 0000 to 999 999 9999, reserved for testing.
    pub fn is_test_range(&self) -> bool {
        self.0[..3] == [9, 9, 9]
    }

    /// The ten digits, for the wire. Every call is a disclosure: never pass the result to a
    /// log line, span, metric label or error message.
    pub fn expose(&self) -> String {
        self.0.iter().map(|d| char::from(b'0' + d)).collect()
    }
}

/// Modulus 11: weights 10..2 over the first nine digits; 11 - (sum mod 11), where 11 is 0 and
/// 10 is invalid.
fn check_digit(nine: &[u8]) -> Option<u8> {
    let sum: u32 = nine
        .iter()
        .zip((2..=10u32).rev())
        .map(|(d, w)| u32::from(*d) * w)
        .sum();
    match 11 - (sum % 11) {
        11 => Some(0),
        10 => None,
        c => Some(c as u8),
    }
}

impl fmt::Debug for NhsNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NhsNumber(<redacted>)")
    }
}

impl fmt::Display for NhsNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<nhs-number>")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn accepts_known_valid_numbers() {
        // PDS sandbox test patients and the NHS's published example.
        for s in ["9000000009", "9000000017", "9000000025", "9434765919"] {
            assert_eq!(NhsNumber::parse(s).unwrap().expose(), s);
        }
    }

    #[test]
    fn rejects_bad_check_digit_length_and_characters() {
        assert_eq!(
            NhsNumber::parse("9000000008"),
            Err(NhsNumberError::CheckDigit)
        );
        assert_eq!(NhsNumber::parse("900000000"), Err(NhsNumberError::Length));
        assert_eq!(NhsNumber::parse("90000000099"), Err(NhsNumberError::Length));
        assert_eq!(
            NhsNumber::parse("900000000A"),
            Err(NhsNumberError::NotDigits)
        );
        assert_eq!(
            NhsNumber::parse("900 000 0009"),
            Err(NhsNumberError::NotDigits)
        );
        assert_eq!(NhsNumber::parse(""), Err(NhsNumberError::Length));
    }

    #[test]
    fn from_nine_adds_the_check_digit_or_refuses() {
        assert_eq!(
            NhsNumber::from_nine(900_000_000).unwrap().expose(),
            "9000000009"
        );
        // 999000001: sum gives check 10, which is never issued.
        let produced: Vec<_> = (999_000_000..999_000_100)
            .filter_map(NhsNumber::from_nine)
            .collect();
        assert!(produced.len() > 80 && produced.len() < 100);
        assert!(
            produced
                .iter()
                .all(|n| n.is_test_range() && NhsNumber::parse(&n.expose()).is_ok())
        );
    }

    #[test]
    fn debug_and_display_never_show_digits() {
        let n = NhsNumber::parse("9434765919").unwrap();
        assert!(!format!("{n:?} {n}").chars().any(|c| c.is_ascii_digit()));
    }
}
