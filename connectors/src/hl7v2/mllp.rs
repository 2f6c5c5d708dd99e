//! MLLP framing (HL7 v2 Minimal Lower Layer Protocol): `0x0B` payload `0x1C 0x0D`.
//!
//! # Why a hard cap and a strict start byte
//! A frame that never ends would otherwise grow the buffer without bound, so the decoder
//! fails with [`MllpError::TooLarge`] as soon as the buffered payload passes the cap, without
//! waiting for the end. Bytes before the start block are not tolerated: a peer that is not
//! speaking MLLP (an HTTP server, a TLS port) is reported at once instead of being read until
//! the read timeout.

use bytes::{Buf, BufMut, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// Start block.
pub const SB: u8 = 0x0B;
/// End block.
pub const EB: u8 = 0x1C;
/// Carriage return that follows the end block.
pub const CR: u8 = 0x0D;

/// Why a stream is not a valid MLLP stream.
#[derive(Debug, thiserror::Error)]
pub enum MllpError {
    #[error("frame exceeds the size cap of {limit} bytes")]
    TooLarge { limit: usize },
    #[error("stream does not start a frame with 0x0b")]
    NoStartBlock,
    #[error("end block 0x1c not followed by 0x0d")]
    BadEndBlock,
    #[error("stream ended inside a frame")]
    Truncated,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// A tokio-util codec for MLLP frames; items are the raw payload bytes (no charset assumed).
#[derive(Debug, Clone)]
pub struct MllpCodec {
    max_frame_bytes: usize,
    /// How far the buffer has already been searched for the end block.
    scanned: usize,
}

impl MllpCodec {
    pub fn new(max_frame_bytes: usize) -> Self {
        Self {
            max_frame_bytes,
            scanned: 1,
        }
    }
}

impl Decoder for MllpCodec {
    type Item = BytesMut;
    type Error = MllpError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, MllpError> {
        // Tolerate blank line noise between frames (some senders add CR/LF after 0x1C 0x0D).
        while matches!(src.first(), Some(b'\r' | b'\n')) {
            src.advance(1);
            self.scanned = 1;
        }
        match src.first() {
            None => return Ok(None),
            Some(&SB) => {}
            Some(_) => return Err(MllpError::NoStartBlock),
        }
        let from = self.scanned.max(1);
        if let Some(pos) = src[from..].iter().position(|&b| b == EB) {
            let end = from + pos;
            let payload_len = end - 1;
            if payload_len > self.max_frame_bytes {
                return Err(MllpError::TooLarge {
                    limit: self.max_frame_bytes,
                });
            }
            match src.get(end + 1) {
                None => {
                    // Wait for the CR after the end block.
                    self.scanned = end;
                    return Ok(None);
                }
                Some(&CR) => {}
                Some(_) => return Err(MllpError::BadEndBlock),
            }
            let mut frame = src.split_to(end + 2);
            frame.truncate(end);
            frame.advance(1);
            self.scanned = 1;
            return Ok(Some(frame));
        }
        self.scanned = src.len();
        if src.len() - 1 > self.max_frame_bytes {
            return Err(MllpError::TooLarge {
                limit: self.max_frame_bytes,
            });
        }
        // Reserve enough for a typical reply at once rather than growing by small steps.
        src.reserve(4096.min(self.max_frame_bytes + 3));
        Ok(None)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, MllpError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.iter().all(|b| matches!(b, b'\r' | b'\n')) => {
                src.clear();
                Ok(None)
            }
            None => Err(MllpError::Truncated),
        }
    }
}

impl<T: AsRef<[u8]>> Encoder<T> for MllpCodec {
    type Error = MllpError;

    fn encode(&mut self, payload: T, dst: &mut BytesMut) -> Result<(), MllpError> {
        let payload = payload.as_ref();
        if payload.len() > self.max_frame_bytes {
            return Err(MllpError::TooLarge {
                limit: self.max_frame_bytes,
            });
        }
        dst.reserve(payload.len() + 3);
        dst.put_u8(SB);
        dst.put_slice(payload);
        dst.put_u8(EB);
        dst.put_u8(CR);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn framed(payload: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        MllpCodec::new(1024).encode(payload, &mut b).unwrap();
        b
    }

    #[test]
    fn decodes_frames_split_at_every_byte() {
        let wire = [framed(b"MSH|one"), framed(b"MSH|two")].concat();
        for split in 0..wire.len() {
            let mut codec = MllpCodec::new(1024);
            let mut buf = BytesMut::from(&wire[..split]);
            let mut got = Vec::new();
            while let Some(f) = codec.decode(&mut buf).unwrap() {
                got.push(f);
            }
            buf.extend_from_slice(&wire[split..]);
            while let Some(f) = codec.decode(&mut buf).unwrap() {
                got.push(f);
            }
            assert_eq!(got, vec![&b"MSH|one"[..], &b"MSH|two"[..]], "split {split}");
        }
    }

    #[test]
    fn a_frame_that_never_ends_fails_at_the_cap() {
        let mut codec = MllpCodec::new(16);
        let mut buf = BytesMut::from(&[SB][..]);
        buf.extend_from_slice(&[b'x'; 16]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        buf.extend_from_slice(b"x");
        assert!(matches!(
            codec.decode(&mut buf),
            Err(MllpError::TooLarge { limit: 16 })
        ));
    }

    #[test]
    fn oversized_complete_frame_and_bad_bytes_are_errors() {
        let mut codec = MllpCodec::new(4);
        assert!(matches!(
            codec.decode(&mut framed(b"12345")),
            Err(MllpError::TooLarge { .. })
        ));
        assert!(matches!(
            MllpCodec::new(64).decode(&mut BytesMut::from(&b"HTTP/1.1 400"[..])),
            Err(MllpError::NoStartBlock)
        ));
        assert!(matches!(
            MllpCodec::new(64).decode(&mut BytesMut::from(&b"\x0bMSH\x1cX"[..])),
            Err(MllpError::BadEndBlock)
        ));
        assert!(matches!(
            MllpCodec::new(64).decode_eof(&mut BytesMut::from(&b"\x0bMSH|"[..])),
            Err(MllpError::Truncated)
        ));
    }
}
