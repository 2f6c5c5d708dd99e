//! A thin layer over `hl7-parser`: bytes to text by character set, line-ending repair,
//! decoded field access, and an encoder for the messages we send (queries, simulator replies).
//!
//! # Why a layer
//! `hl7-parser` splits a message into segments, fields, repetitions, components and
//! sub-components with the separators from MSH-1/MSH-2, without copying. It takes `&str`
//! only, stops quietly at the first line it cannot read, and its escape decoder indexes
//! bytes by character count (wrong, and able to panic, on non-ASCII text) and knows no `\X..\`
//! beyond CR/LF. So this module:
//! - chooses the character set by MSH-18 (`UNICODE UTF-8`, `8859/1`, `8859/15`, `ASCII`),
//!   falling back to ISO-8859-1 when bytes without a declared set are not UTF-8;
//! - turns CR LF, LF, and blank lines into single CR segment ends before parsing;
//! - refuses a message the parser did not read to its end (truncated or not HL7);
//! - decodes escapes itself: `\F\ \S\ \T\ \R\ \E\`, `\X..\` (hex bytes in the message's
//!   character set), `\.br\`; formatting and character-set switches are dropped.
//!
//! Z-segments parse like any other and are simply never looked up.

use std::borrow::Cow;

use hl7_parser::message::{Segment as RawSegment, Separators};

/// Why bytes are not a readable HL7 v2 message. Messages never quote the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("not an hl7 v2 message (no msh header)")]
    NoHeader,
    #[error("unsupported encoding characters in msh-2")]
    BadEncodingCharacters,
    #[error("character set in msh-18 is not supported")]
    UnsupportedCharset,
    #[error("text is not valid utf-8 although msh-18 declares it")]
    InvalidUtf8,
    #[error("unreadable segment {segment} (message malformed or truncated)")]
    Unreadable { segment: usize },
}

/// The character sets we read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charset {
    Utf8,
    Latin1,
    Latin9,
}

/// A message decoded to text with segment ends normalised to CR, ready to parse.
#[derive(Debug, Clone)]
pub struct Text {
    text: String,
    pub charset: Charset,
}

impl Text {
    /// Decodes raw message bytes (an MLLP payload or a file).
    pub fn decode(bytes: &[u8]) -> Result<Self, MessageError> {
        let start = bytes
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .unwrap_or(bytes.len());
        let bytes = &bytes[start..];
        if !bytes.starts_with(b"MSH") || bytes.len() < 8 {
            return Err(MessageError::NoHeader);
        }
        let declared = declared_charset(bytes)?;
        let (text, charset) = match declared {
            Some(Charset::Utf8) => (
                std::str::from_utf8(bytes)
                    .map_err(|_| MessageError::InvalidUtf8)?
                    .to_owned(),
                Charset::Utf8,
            ),
            Some(Charset::Latin1) => (latin1(bytes), Charset::Latin1),
            Some(Charset::Latin9) => (latin9(bytes), Charset::Latin9),
            None => match std::str::from_utf8(bytes) {
                Ok(s) => (s.to_owned(), Charset::Utf8),
                Err(_) => (latin1(bytes), Charset::Latin1),
            },
        };
        Ok(Self {
            text: normalise(&text)?,
            charset,
        })
    }

    /// Parses the text; fails unless every segment was read.
    pub fn parse(&self) -> Result<Message<'_>, MessageError> {
        let parsed = hl7_parser::Message::parse(&self.text)
            .map_err(|_| MessageError::Unreadable { segment: 1 })?;
        let read = parsed.raw_value().len();
        if read < self.text.trim_end_matches('\r').len() {
            let segment = parsed.segments.len() + 1;
            return Err(MessageError::Unreadable { segment });
        }
        Ok(Message {
            separators: parsed.separators,
            inner: parsed,
            charset: self.charset,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// MSH-18 from the raw bytes (the header is ASCII in every character set we read).
fn declared_charset(bytes: &[u8]) -> Result<Option<Charset>, MessageError> {
    let field_sep = bytes[3];
    let header_end = bytes
        .iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .unwrap_or(bytes.len());
    // MSH-1 is the separator itself, so MSH-n is split item n-1.
    let Some(msh18) = bytes[..header_end].split(|&b| b == field_sep).nth(17) else {
        return Ok(None);
    };
    // MSH-18 repeats; the first repetition is the message's default set.
    let repetition = bytes.get(5).copied().unwrap_or(b'~');
    let first = msh18.split(|&b| b == repetition).next().unwrap_or_default();
    let name = String::from_utf8_lossy(first).trim().to_ascii_uppercase();
    match name.as_str() {
        "" => Ok(None),
        "UNICODE UTF-8" | "UTF-8" | "UTF8" => Ok(Some(Charset::Utf8)),
        // ASCII is a subset of UTF-8; bytes above 0x7F in an "ASCII" feed are usually Latin-1.
        "ASCII" => Ok(None),
        "8859/1" | "ISO-8859-1" | "ISO_IR 100" => Ok(Some(Charset::Latin1)),
        "8859/15" | "ISO-8859-15" => Ok(Some(Charset::Latin9)),
        _ => Err(MessageError::UnsupportedCharset),
    }
}

fn latin1(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| char::from(b)).collect()
}

fn latin9(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| match b {
            0xA4 => '€',
            0xA6 => 'Š',
            0xA8 => 'š',
            0xB4 => 'Ž',
            0xB8 => 'ž',
            0xBC => 'Œ',
            0xBD => 'œ',
            0xBE => 'Ÿ',
            _ => char::from(b),
        })
        .collect()
}

/// Segment ends to CR; blank lines dropped; MSH-2 repaired where a text export doubled the
/// escape character (`^~\\&`) or a v2.7 truncation character follows (`^~\&#`); a literal
/// `\r` text artefact at a line end (an unterminated escape, so never data) dropped.
fn normalise(text: &str) -> Result<String, MessageError> {
    let mut out = String::with_capacity(text.len() + 1);
    let mut seps: Option<(char, char)> = None;
    for line in text.split(['\r', '\n']) {
        if line.trim().is_empty() {
            continue;
        }
        match seps {
            None => {
                let fixed = repair_msh2(line)?;
                let (Some(field), Some(esc)) = (fixed.chars().nth(3), fixed.chars().nth(6)) else {
                    return Err(MessageError::NoHeader);
                };
                // MSH-1 and MSH-2 are 5 ASCII characters after "MSH".
                let body = fixed.get(8..).unwrap_or_default();
                let kept = strip_escaped_cr(body, esc).len();
                out.push_str(&fixed[..8 + kept]);
                seps = Some((field, esc));
            }
            Some((field, esc)) => {
                let line = strip_escaped_cr(line, esc);
                out.push_str(line);
                // A segment with no fields at all (`PD1`) still needs its separator to parse.
                if line.len() == 3 && line.chars().all(|c| c.is_ascii_alphanumeric()) {
                    out.push(field);
                }
            }
        }
        out.push('\r');
    }
    Ok(out)
}

/// Drops a trailing two-character `\r` or `\n` text artefact, but only when its escape
/// character opens an unterminated sequence (an odd count of escape characters), so that an
/// encoded value such as `\E\r` (a backslash, then "r") is kept.
fn strip_escaped_cr(line: &str, esc: char) -> &str {
    let Some(stripped) = [format!("{esc}r"), format!("{esc}n")]
        .iter()
        .find_map(|tail| line.strip_suffix(tail.as_str()))
    else {
        return line;
    };
    if line.matches(esc).count() % 2 == 1 {
        stripped
    } else {
        line
    }
}

fn repair_msh2(msh: &str) -> Result<Cow<'_, str>, MessageError> {
    let mut chars = msh.char_indices().skip(3);
    let Some((_, field_sep)) = chars.next() else {
        return Err(MessageError::NoHeader);
    };
    if !field_sep.is_ascii_punctuation() {
        return Err(MessageError::BadEncodingCharacters);
    }
    let rest = &msh[3 + field_sep.len_utf8()..];
    let msh2 = rest.split(field_sep).next().unwrap_or_default();
    let valid = |enc: &str| {
        let cs: Vec<char> = enc.chars().collect();
        cs.len() == 4
            && cs
                .iter()
                .all(|c| c.is_ascii_punctuation() && *c != field_sep)
            && (0..4).all(|i| (i + 1..4).all(|j| cs[i] != cs[j]))
    };
    if valid(msh2) {
        return Ok(Cow::Borrowed(msh));
    }
    let candidate: String = if msh2.len() == 5 && msh2.contains("\\\\") {
        msh2.replacen("\\\\", "\\", 1)
    } else if msh2.chars().count() == 5 {
        msh2.chars().take(4).collect()
    } else {
        return Err(MessageError::BadEncodingCharacters);
    };
    if !valid(&candidate) {
        return Err(MessageError::BadEncodingCharacters);
    }
    let after = &rest[msh2.len()..];
    Ok(Cow::Owned(format!("MSH{field_sep}{candidate}{after}")))
}

/// A parsed message with decoded access to its values.
#[derive(Debug, Clone)]
pub struct Message<'t> {
    inner: hl7_parser::Message<'t>,
    separators: Separators,
    charset: Charset,
}

impl<'t> Message<'t> {
    pub fn segments(&self) -> impl Iterator<Item = Segment<'_, 't>> {
        self.inner.segments().map(|raw| Segment { raw, msg: self })
    }

    /// The first segment with this name.
    pub fn segment(&self, name: &str) -> Option<Segment<'_, 't>> {
        self.segments().find(|s| s.name() == name)
    }

    pub fn separators(&self) -> Separators {
        self.separators
    }

    /// MSH-9 as `TYPE^EVENT` (e.g. `RSP^K22`), the structure left off.
    pub fn message_type(&self) -> String {
        self.segment("MSH")
            .map(|msh| format!("{}^{}", msh.get(9, 1, 1), msh.get(9, 1, 2)))
            .unwrap_or_default()
    }

    /// MSH-10, the message control id.
    pub fn control_id(&self) -> String {
        self.segment("MSH")
            .map(|msh| msh.get(10, 1, 1).into_owned())
            .unwrap_or_default()
    }

    /// Decodes an escaped value of this message.
    pub fn unescape<'a>(&self, raw: &'a str) -> Cow<'a, str> {
        unescape(raw, &self.separators, self.charset)
    }
}

/// One segment with decoded accessors; positions are HL7's (1-based), out of range is empty.
#[derive(Debug, Clone, Copy)]
pub struct Segment<'m, 't> {
    raw: &'m RawSegment<'t>,
    msg: &'m Message<'t>,
}

impl<'m, 't> Segment<'m, 't> {
    pub fn name(&self) -> &'t str {
        self.raw.name
    }

    /// The field's raw text (escapes not decoded).
    pub fn raw(&self, field: usize) -> &'t str {
        if field == 0 {
            return "";
        }
        self.raw.field(field).map(|f| f.raw_value()).unwrap_or("")
    }

    /// How many repetitions field `field` has (0 when empty).
    pub fn repeats(&self, field: usize) -> usize {
        if field == 0 {
            return 0;
        }
        match self.raw.field(field) {
            Some(f) if !f.raw_value().is_empty() => f.repeats.len(),
            _ => 0,
        }
    }

    /// Component `component` of repetition `rep` of field `field`, decoded (all its
    /// sub-components, separators unescaped back to text).
    pub fn get(&self, field: usize, rep: usize, component: usize) -> Cow<'t, str> {
        self.msg.unescape(self.raw_component(field, rep, component))
    }

    /// One sub-component, decoded.
    pub fn sub(&self, field: usize, rep: usize, component: usize, sub: usize) -> Cow<'t, str> {
        if sub == 0 {
            return Cow::Borrowed("");
        }
        let raw = self
            .component_ref(field, rep, component)
            .and_then(|c| c.subcomponent(sub))
            .map(|s| s.raw_value())
            .unwrap_or("");
        self.msg.unescape(raw)
    }

    /// The first sub-component of a component, decoded (e.g. the namespace of CX.4).
    pub fn first_sub(&self, field: usize, rep: usize, component: usize) -> Cow<'t, str> {
        self.sub(field, rep, component, 1)
    }

    /// The raw text of one component.
    pub fn raw_component(&self, field: usize, rep: usize, component: usize) -> &'t str {
        self.component_ref(field, rep, component)
            .map(|c| c.raw_value())
            .unwrap_or("")
    }

    fn component_ref(
        &self,
        field: usize,
        rep: usize,
        component: usize,
    ) -> Option<&'m hl7_parser::message::Component<'t>> {
        if field == 0 || rep == 0 || component == 0 {
            return None;
        }
        self.raw.field(field)?.repeat(rep)?.component(component)
    }

    /// Decoded value of a whole field's first repetition, sub-structure kept raw-joined.
    pub fn text(&self, field: usize) -> Cow<'t, str> {
        self.get(field, 1, 1)
    }
}

/// Decodes HL7 escape sequences in one value.
pub fn unescape<'a>(raw: &'a str, seps: &Separators, charset: Charset) -> Cow<'a, str> {
    let esc = seps.escape;
    if !raw.contains(esc) {
        return Cow::Borrowed(raw);
    }
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(start) = rest.find(esc) {
        out.push_str(&rest[..start]);
        let after = &rest[start + esc.len_utf8()..];
        let Some(end) = after.find(esc) else {
            // Unterminated: keep the text as it came.
            out.push_str(&rest[start..]);
            return Cow::Owned(out);
        };
        let seq = &after[..end];
        match seq {
            "F" => out.push(seps.field),
            "S" => out.push(seps.component),
            "T" => out.push(seps.subcomponent),
            "R" => out.push(seps.repetition),
            "E" => out.push(esc),
            ".br" => out.push('\n'),
            _ if seq.starts_with('X') => out.push_str(&hex_text(&seq[1..], charset)),
            // \H\ \N\ (highlighting), \Cxxyy\ \Mxxyyzz\ (charset switches), \Zxxx\ (local),
            // \.sp\ and other formatting: dropped.
            _ => {}
        }
        rest = &after[end + esc.len_utf8()..];
    }
    out.push_str(rest);
    Cow::Owned(out)
}

fn hex_text(hex: &str, charset: Charset) -> String {
    let bytes: Vec<u8> = hex
        .as_bytes()
        .chunks(2)
        .filter_map(|pair| std::str::from_utf8(pair).ok())
        .filter_map(|pair| u8::from_str_radix(pair, 16).ok())
        .collect();
    match (charset, std::str::from_utf8(&bytes)) {
        (Charset::Utf8, Ok(s)) => s.to_owned(),
        (Charset::Latin9, _) => latin9(&bytes),
        _ => latin1(&bytes),
    }
}

/// Escapes text for one value: delimiters become `\F\ \S\ \T\ \R\ \E\`, line breaks `\X0D\`
/// and `\X0A\`.
pub fn escape(value: &str, seps: &Separators) -> String {
    let e = seps.escape;
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\r' => out.extend([e, 'X', '0', 'D', e]),
            '\n' => out.extend([e, 'X', '0', 'A', e]),
            c if c == seps.field => out.extend([e, 'F', e]),
            c if c == seps.component => out.extend([e, 'S', e]),
            c if c == seps.subcomponent => out.extend([e, 'T', e]),
            c if c == seps.repetition => out.extend([e, 'R', e]),
            c if c == e => out.extend([e, 'E', e]),
            c => out.push(c),
        }
    }
    out
}

/// A value as nested lists: repetitions of components of sub-components, unescaped text.
pub type FieldValue = Vec<Vec<Vec<String>>>;

/// Builds a message with the standard separators `|^~\&`; every value is escaped.
#[derive(Debug, Clone, Default)]
pub struct Builder {
    out: String,
}

impl Builder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a segment. `fields[0]` is field 1 (for MSH, field 3: MSH-1 and MSH-2 are written
    /// for you). Each field's value is its components, `^`-joined and escaped.
    pub fn segment<I, F, C>(&mut self, name: &str, fields: I) -> &mut Self
    where
        I: IntoIterator<Item = F>,
        F: IntoIterator<Item = C>,
        C: AsRef<str>,
    {
        let seps = Separators::default();
        self.out.push_str(name);
        if name == "MSH" {
            self.out.push_str("|^~\\&");
        }
        for field in fields {
            self.out.push('|');
            let comps: Vec<String> = field
                .into_iter()
                .map(|c| escape(c.as_ref(), &seps))
                .collect();
            let used = comps
                .iter()
                .rposition(|c| !c.is_empty())
                .map_or(0, |i| i + 1);
            self.out.push_str(&comps[..used].join("^"));
        }
        self.out.push('\r');
        self
    }

    /// Adds a segment with full structure per field (repetitions, components, sub-components).
    pub fn segment_structured(&mut self, name: &str, fields: &[FieldValue]) -> &mut Self {
        let seps = Separators::default();
        self.out.push_str(name);
        if name == "MSH" {
            self.out.push_str("|^~\\&");
        }
        for field in fields {
            self.out.push('|');
            let reps: Vec<String> = field
                .iter()
                .map(|rep| {
                    rep.iter()
                        .map(|comp| {
                            comp.iter()
                                .map(|s| escape(s, &seps))
                                .collect::<Vec<_>>()
                                .join("&")
                        })
                        .collect::<Vec<_>>()
                        .join("^")
                })
                .collect();
            self.out.push_str(&reps.join("~"));
        }
        self.out.push('\r');
        self
    }

    /// Adds a segment whose fields are already encoded (e.g. repeats joined by the caller).
    pub fn segment_raw(&mut self, name: &str, encoded_fields: &[String]) -> &mut Self {
        self.out.push_str(name);
        if name == "MSH" {
            self.out.push_str("|^~\\&");
        }
        for f in encoded_fields {
            self.out.push('|');
            self.out.push_str(f);
        }
        self.out.push('\r');
        self
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// Encodes one value's components with the standard separators (for [`Builder::segment_raw`]).
pub fn components<C: AsRef<str>>(comps: impl IntoIterator<Item = C>) -> String {
    let seps = Separators::default();
    let comps: Vec<String> = comps
        .into_iter()
        .map(|c| escape(c.as_ref(), &seps))
        .collect();
    let used = comps
        .iter()
        .rposition(|c| !c.is_empty())
        .map_or(0, |i| i + 1);
    comps[..used].join("^")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn separators_come_from_msh() {
        let text = Text::decode(b"MSH#*@!$#A#B\rPID#1##X*Y@Z*W$V").unwrap();
        let msg = text.parse().unwrap();
        let pid = msg.segment("PID").unwrap();
        assert_eq!(pid.get(3, 1, 1), "X");
        assert_eq!(pid.get(3, 1, 2), "Y");
        assert_eq!(pid.get(3, 2, 1), "Z");
        assert_eq!(pid.sub(3, 2, 2, 2), "V");
        assert_eq!(pid.repeats(3), 2);
    }

    #[test]
    fn escapes_decode_including_hex_and_non_ascii() {
        let seps = Separators::default();
        assert_eq!(
            unescape(r"a\F\b\S\c\T\d\R\e\E\f\.br\g", &seps, Charset::Utf8),
            "a|b^c&d~e\\f\ng"
        );
        assert_eq!(unescape(r"Sch\XF6\n", &seps, Charset::Latin1), "Schön");
        assert_eq!(unescape(r"Sch\XC3B6\n", &seps, Charset::Utf8), "Schön");
        assert_eq!(
            unescape(r"é\F\é\H\bold\N\", &seps, Charset::Utf8),
            "é|ébold"
        );
        assert_eq!(unescape(r"open\X4", &seps, Charset::Utf8), r"open\X4");
        let s = "a|b^c&d~e\\f\r\ng é";
        assert_eq!(unescape(&escape(s, &seps), &seps, Charset::Utf8), s);
    }

    #[test]
    fn lf_crlf_and_blank_lines_end_segments() {
        for text in [
            &b"MSH|^~\\&|A\nPID|1\n\nPV1|1\n"[..],
            b"MSH|^~\\&|A\r\nPID|1\r\nPV1|1",
            b"\r\nMSH|^~\\&|A\rPID|1\rPV1|1\r\r",
        ] {
            let t = Text::decode(text).unwrap();
            let names: Vec<_> = t.parse().unwrap().segments().map(|s| s.name()).collect();
            assert_eq!(names, ["MSH", "PID", "PV1"]);
        }
    }

    #[test]
    fn latin1_is_decoded_by_declaration_or_fallback() {
        let declared =
            b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5||||||8859/1\rPID|1||||M\xfcller";
        let m = Text::decode(declared).unwrap();
        assert_eq!(m.charset, Charset::Latin1);
        assert_eq!(
            m.parse().unwrap().segment("PID").unwrap().get(5, 1, 1),
            "Müller"
        );
        let undeclared = b"MSH|^~\\&|A\rPID|1||||M\xfcller";
        let m = Text::decode(undeclared).unwrap();
        assert_eq!(
            m.parse().unwrap().segment("PID").unwrap().get(5, 1, 1),
            "Müller"
        );
        let lying = b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5||||||UNICODE UTF-8\rPID|\xfc";
        assert_eq!(Text::decode(lying).unwrap_err(), MessageError::InvalidUtf8);
        let odd = b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5||||||EBCDIC\rPID|1";
        assert_eq!(
            Text::decode(odd).unwrap_err(),
            MessageError::UnsupportedCharset
        );
        let latin9 = b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5||||||8859/15\rPID|\xa4";
        let m = Text::decode(latin9).unwrap();
        assert_eq!(m.parse().unwrap().segment("PID").unwrap().get(1, 1, 1), "€");
    }

    #[test]
    fn odd_encoding_characters_are_repaired_or_refused() {
        let m = Text::decode(b"MSH|^~\\\\&|APP\rPID|1||A^B").unwrap();
        let msg = m.parse().unwrap();
        assert_eq!(msg.segment("MSH").unwrap().raw(3), "APP");
        let m = Text::decode(b"MSH|^~\\&#|APP\rPID|1").unwrap();
        assert_eq!(m.parse().unwrap().segment("MSH").unwrap().raw(3), "APP");
        assert!(Text::decode(b"MSH|^^^^|APP").is_err());
        assert!(Text::decode("MSH|^~\\é|APP".as_bytes()).is_err());
        assert!(Text::decode("MSH|^~é|APP".as_bytes()).is_err());
        assert!(Text::decode("MSHé^~\\&éAPP".as_bytes()).is_err());
        assert!(Text::decode(b"MSH|^~|APP").is_err());
    }

    #[test]
    fn unreadable_segments_and_non_hl7_are_refused() {
        assert_eq!(
            Text::decode(b"<html>bad gateway</html>").unwrap_err(),
            MessageError::NoHeader
        );
        let t = Text::decode(b"MSH|^~\\&|A\rPID|1\rthis is not a segment\rPV1|1").unwrap();
        assert_eq!(
            t.parse().unwrap_err(),
            MessageError::Unreadable { segment: 3 }
        );
    }

    #[test]
    fn builder_output_parses_back() {
        let mut b = Builder::new();
        b.segment("MSH", [vec!["APP"], vec!["FAC"]]);
        b.segment("PID", [vec!["1"], vec![], vec!["A|B", "", "C^D"]]);
        b.segment_structured(
            "ZZZ",
            &[vec![
                vec![vec!["x".into(), "y&z".into()]],
                vec![vec!["w".into()]],
            ]],
        );
        let text = Text::decode(b.finish().as_bytes()).unwrap();
        let msg = text.parse().unwrap();
        let pid = msg.segment("PID").unwrap();
        assert_eq!(pid.get(3, 1, 1), "A|B");
        assert_eq!(pid.get(3, 1, 3), "C^D");
        let z = msg.segment("ZZZ").unwrap();
        assert_eq!(z.sub(1, 1, 1, 2), "y&z");
        assert_eq!(z.get(1, 2, 1), "w");
    }
}
