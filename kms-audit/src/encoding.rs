//! The canonical, length-prefixed byte encoding that event hashes and checkpoint signatures
//! are computed over, plus hex helpers.
//!
//! Primitives (all integers big-endian):
//! - `u64` / `i64`: 8 bytes (two's complement for `i64`); `u32`: 4 bytes.
//! - string: `u64` byte length, then the UTF-8 bytes.
//! - `Option<T>`: one presence byte, `0x00` for `None`, or `0x01` followed by the encoding of `T`.
//! - string map: `u64` entry count, then for each entry in ascending byte order of the key
//!   (the order of a `BTreeMap<String, String>`): key as string, value as string.
//!
//! A message is a fixed ASCII domain tag (no length, no terminator) followed by the fields in a
//! fixed order. Every variable-length item carries its length, so two different field tuples
//! never encode to the same bytes.

use std::collections::BTreeMap;

/// Builds one canonical message. Infallible: it only appends to a `Vec<u8>`.
#[derive(Debug)]
pub(crate) struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    /// Starts a message with its domain tag.
    pub(crate) fn new(domain_tag: &str) -> Self {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(domain_tag.as_bytes());
        Encoder { buf }
    }

    pub(crate) fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub(crate) fn i64(&mut self, v: i64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub(crate) fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub(crate) fn str(&mut self, s: &str) -> &mut Self {
        // usize -> u64 is lossless on every supported target.
        self.u64(s.len() as u64);
        self.buf.extend_from_slice(s.as_bytes());
        self
    }

    pub(crate) fn opt_str(&mut self, v: Option<&str>) -> &mut Self {
        match v {
            None => self.buf.push(0),
            Some(s) => {
                self.buf.push(1);
                self.str(s);
            }
        }
        self
    }

    pub(crate) fn opt_u32(&mut self, v: Option<u32>) -> &mut Self {
        match v {
            None => self.buf.push(0),
            Some(n) => {
                self.buf.push(1);
                self.u32(n);
            }
        }
        self
    }

    pub(crate) fn map(&mut self, m: &BTreeMap<String, String>) -> &mut Self {
        self.u64(m.len() as u64);
        for (k, v) in m {
            self.str(k);
            self.str(v);
        }
        self
    }

    pub(crate) fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }
}

/// True if `s` is exactly 64 lowercase hex digits (the only form hashes take in this crate).
pub fn is_hex_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primitives_encode_as_documented() {
        let mut m = BTreeMap::new();
        m.insert("b".to_owned(), "2".to_owned());
        m.insert("a".to_owned(), "".to_owned());
        let bytes = Encoder::new("T")
            .u64(1)
            .i64(-1)
            .u32(7)
            .str("hi")
            .opt_str(None)
            .opt_str(Some(""))
            .opt_u32(Some(3))
            .map(&m)
            .finish();
        let expected = [
            &b"T"[..],
            &[0, 0, 0, 0, 0, 0, 0, 1],
            &[0xff; 8],
            &[0, 0, 0, 7],
            &[0, 0, 0, 0, 0, 0, 0, 2, b'h', b'i'],
            &[0],
            &[1, 0, 0, 0, 0, 0, 0, 0, 0],
            &[1, 0, 0, 0, 3],
            &[0, 0, 0, 0, 0, 0, 0, 2],
            &[0, 0, 0, 0, 0, 0, 0, 1, b'a', 0, 0, 0, 0, 0, 0, 0, 0],
            &[0, 0, 0, 0, 0, 0, 0, 1, b'b', 0, 0, 0, 0, 0, 0, 0, 1, b'2'],
        ]
        .concat();
        assert_eq!(bytes, expected);
    }

    #[test]
    fn hex_sha256_check() {
        assert!(is_hex_sha256(&"0".repeat(64)));
        assert!(!is_hex_sha256(&"A".repeat(64)));
        assert!(!is_hex_sha256(&"0".repeat(63)));
    }
}
