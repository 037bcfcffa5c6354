//! The versioned wrapped-key format (`ciphertext_blob`): parse and serialize, nothing else.
//!
//! Format version 1, all integers big-endian:
//!
//! ```text
//! offset size field
//! 0      4    magic "KMSB"
//! 4      1    format version = 1
//! 5      1    mechanism (1 = PKCS#11 AES-256-GCM, 2 = TPM AES-256-CFB + HMAC-SHA256)
//! 6      16   key id (UUID bytes)
//! 22     4    key version (>= 1)
//! 26     1    IV length (must equal the mechanism's: 12 for GCM, 16 for CFB)
//! 27     n    IV
//! 27+n   ...  ciphertext || tag (at least the mechanism's overhead + 1 byte)
//! ```
//!
//! The AAD given to the backend is `header (bytes 0..26) || canonical encryption context`,
//! so the format version, mechanism, key id, key version and context are all authenticated:
//! changing any of them, or moving the blob to another key, makes decryption fail.

use uuid::Uuid;

use crate::backend::Mechanism;
use crate::context::EncryptionContext;

pub const MAGIC: &[u8; 4] = b"KMSB";
pub const FORMAT_VERSION: u8 = 1;
const HEADER_LEN: usize = 26;
/// Largest plaintext a blob may carry (Encrypt accepts up to 4 KiB).
pub const MAX_PLAINTEXT: usize = 4096;
/// Largest blob the parser accepts; anything larger cannot have come from this server.
pub const MAX_BLOB_LEN: usize = HEADER_LEN + 1 + 16 + MAX_PLAINTEXT + 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("ciphertext blob is too short")]
    TooShort,
    #[error("ciphertext blob is longer than {MAX_BLOB_LEN} bytes")]
    TooLong,
    #[error("ciphertext blob does not start with the KMS magic bytes")]
    BadMagic,
    #[error("unsupported ciphertext blob format version {0}")]
    UnsupportedVersion(u8),
    #[error("unknown mechanism {0} in ciphertext blob")]
    UnknownMechanism(u8),
    #[error("ciphertext blob names key version 0")]
    ZeroKeyVersion,
    #[error("ciphertext blob has an IV of {got} bytes; its mechanism needs {want}")]
    BadIvLength { got: usize, want: usize },
    #[error("ciphertext blob has no ciphertext beyond its authentication tag")]
    NoCiphertext,
}

/// A parsed blob. The fields are not yet authenticated: only a successful `open` proves them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub mechanism: Mechanism,
    pub key_id: Uuid,
    pub key_version: u32,
    pub iv: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

/// The authenticated header of a blob (everything before the IV).
pub fn header(mechanism: Mechanism, key_id: Uuid, key_version: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(MAGIC);
    h[4] = FORMAT_VERSION;
    h[5] = mechanism as u8;
    h[6..22].copy_from_slice(key_id.as_bytes());
    h[22..26].copy_from_slice(&key_version.to_be_bytes());
    h
}

/// The associated data bound into every seal: header || canonical context.
pub fn aad(
    mechanism: Mechanism,
    key_id: Uuid,
    key_version: u32,
    context: &EncryptionContext,
) -> Vec<u8> {
    let mut out = header(mechanism, key_id, key_version).to_vec();
    out.extend_from_slice(&context.encode());
    out
}

impl Envelope {
    pub fn aad(&self, context: &EncryptionContext) -> Vec<u8> {
        aad(self.mechanism, self.key_id, self.key_version, context)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + 1 + self.iv.len() + self.ciphertext.len());
        out.extend_from_slice(&header(self.mechanism, self.key_id, self.key_version));
        // IV lengths are 12 or 16: always fits in a byte.
        out.push(self.iv.len() as u8);
        out.extend_from_slice(&self.iv);
        out.extend_from_slice(&self.ciphertext);
        out
    }

    pub fn parse(blob: &[u8]) -> Result<Self, EnvelopeError> {
        if blob.len() > MAX_BLOB_LEN {
            return Err(EnvelopeError::TooLong);
        }
        if blob.len() < HEADER_LEN + 1 {
            return Err(EnvelopeError::TooShort);
        }
        if &blob[0..4] != MAGIC {
            return Err(EnvelopeError::BadMagic);
        }
        if blob[4] != FORMAT_VERSION {
            return Err(EnvelopeError::UnsupportedVersion(blob[4]));
        }
        let mechanism =
            Mechanism::from_u8(blob[5]).ok_or(EnvelopeError::UnknownMechanism(blob[5]))?;
        let mut id = [0u8; 16];
        id.copy_from_slice(&blob[6..22]);
        let key_id = Uuid::from_bytes(id);
        let key_version = u32::from_be_bytes([blob[22], blob[23], blob[24], blob[25]]);
        if key_version == 0 {
            return Err(EnvelopeError::ZeroKeyVersion);
        }
        let iv_len = blob[26] as usize;
        if iv_len != mechanism.iv_len() {
            return Err(EnvelopeError::BadIvLength {
                got: iv_len,
                want: mechanism.iv_len(),
            });
        }
        let rest = &blob[HEADER_LEN + 1..];
        if rest.len() < iv_len {
            return Err(EnvelopeError::TooShort);
        }
        let (iv, ciphertext) = rest.split_at(iv_len);
        if ciphertext.len() <= mechanism.overhead() {
            return Err(EnvelopeError::NoCiphertext);
        }
        Ok(Envelope {
            mechanism,
            key_id,
            key_version,
            iv: iv.to_vec(),
            ciphertext: ciphertext.to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Envelope {
        Envelope {
            mechanism: Mechanism::Pkcs11AesGcm,
            key_id: Uuid::new_v4(),
            key_version: 3,
            iv: vec![7; 12],
            ciphertext: vec![9; 48],
        }
    }

    #[test]
    fn round_trip() {
        let e = sample();
        let bytes = e.to_bytes();
        assert_eq!(bytes.len(), 27 + 12 + 48);
        assert_eq!(Envelope::parse(&bytes).unwrap(), e);
    }

    #[test]
    fn rejects_truncation_into_header_iv_or_tag() {
        // Shorter ciphertexts are well-formed; only the backend's authentication catches them.
        let bytes = sample().to_bytes();
        for len in 0..=27 + 12 + 16 {
            assert!(
                Envelope::parse(&bytes[..len]).is_err(),
                "prefix of {len} bytes accepted"
            );
        }
    }

    #[test]
    fn rejects_malformed_headers() {
        let good = sample().to_bytes();
        let mut b = good.clone();
        b[0] = b'X';
        assert_eq!(Envelope::parse(&b), Err(EnvelopeError::BadMagic));
        let mut b = good.clone();
        b[4] = 2;
        assert_eq!(
            Envelope::parse(&b),
            Err(EnvelopeError::UnsupportedVersion(2))
        );
        let mut b = good.clone();
        b[5] = 0;
        assert_eq!(Envelope::parse(&b), Err(EnvelopeError::UnknownMechanism(0)));
        let mut b = good.clone();
        b[22..26].copy_from_slice(&[0, 0, 0, 0]);
        assert_eq!(Envelope::parse(&b), Err(EnvelopeError::ZeroKeyVersion));
        let mut b = good.clone();
        b[26] = 16;
        assert_eq!(
            Envelope::parse(&b),
            Err(EnvelopeError::BadIvLength { got: 16, want: 12 })
        );
        let mut b = good;
        b.extend(std::iter::repeat_n(0u8, MAX_BLOB_LEN));
        assert_eq!(Envelope::parse(&b), Err(EnvelopeError::TooLong));
    }

    /// The fuzz target's property on stable Rust: random and mutated inputs never panic, and
    /// every accepted input round-trips exactly.
    #[test]
    fn parser_survives_random_and_mutated_input() {
        use rand::{Rng, RngCore};
        let mut rng = rand::thread_rng();
        let good = sample().to_bytes();
        for _ in 0..50_000 {
            let input = if rng.gen_bool(0.5) {
                let mut b = vec![0u8; rng.gen_range(0..200)];
                rng.fill_bytes(&mut b);
                if b.len() >= 6 && rng.gen_bool(0.5) {
                    b[..6].copy_from_slice(&good[..6]);
                }
                b
            } else {
                let mut b = good.clone();
                for _ in 0..rng.gen_range(1..4) {
                    let i = rng.gen_range(0..b.len());
                    b[i] = rng.gen();
                }
                b.truncate(rng.gen_range(0..=b.len()));
                b
            };
            if let Ok(env) = Envelope::parse(&input) {
                assert_eq!(env.to_bytes(), input);
            }
        }
    }

    #[test]
    fn aad_binds_header_fields() {
        let ctx = EncryptionContext::default();
        let e = sample();
        let base = e.aad(&ctx);
        let mut other = e.clone();
        other.key_version = 4;
        assert_ne!(other.aad(&ctx), base);
        other = e.clone();
        other.key_id = Uuid::new_v4();
        assert_ne!(other.aad(&ctx), base);
        other = e;
        other.mechanism = Mechanism::TpmAesCfbHmacSha256;
        assert_ne!(other.aad(&ctx), base);
    }
}
