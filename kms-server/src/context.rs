//! Encryption contexts: validation and the canonical byte encoding used as AAD.
//!
//! A context is a small map of opaque ids (site, client, note...). It is not secret, but it
//! is bound to every blob: the canonical encoding below is part of the AEAD's associated
//! data, so a blob only opens with exactly the same map.

use std::collections::{BTreeMap, HashMap};

use crate::error::KmsError;

pub const MAX_PAIRS: usize = 64;
pub const MAX_KEY_LEN: usize = 128;
pub const MAX_VALUE_LEN: usize = 256;

/// A validated encryption context, sorted by key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncryptionContext(BTreeMap<String, String>);

impl EncryptionContext {
    /// Validates a context received on the wire.
    pub fn from_wire(map: &HashMap<String, String>) -> Result<Self, KmsError> {
        if map.len() > MAX_PAIRS {
            return Err(KmsError::invalid(format!(
                "encryption_context has {} pairs; at most {MAX_PAIRS} are allowed",
                map.len()
            )));
        }
        let mut sorted = BTreeMap::new();
        for (k, v) in map {
            if k.is_empty() || k.len() > MAX_KEY_LEN {
                return Err(KmsError::invalid(format!(
                    "encryption_context keys must be 1-{MAX_KEY_LEN} bytes"
                )));
            }
            if v.len() > MAX_VALUE_LEN {
                return Err(KmsError::invalid(format!(
                    "encryption_context value for {k:?} is longer than {MAX_VALUE_LEN} bytes"
                )));
            }
            if k.chars().any(char::is_control) || v.chars().any(char::is_control) {
                return Err(KmsError::invalid(
                    "encryption_context must not contain control characters",
                ));
            }
            sorted.insert(k.clone(), v.clone());
        }
        Ok(EncryptionContext(sorted))
    }

    pub fn pairs(&self) -> &BTreeMap<String, String> {
        &self.0
    }

    /// Canonical encoding: u32 BE pair count, then per pair in byte order of the key:
    /// u32 BE key length, key bytes, u32 BE value length, value bytes. Unambiguous because
    /// every field is length-prefixed.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            4 + self
                .0
                .iter()
                .map(|(k, v)| 8 + k.len() + v.len())
                .sum::<usize>(),
        );
        out.extend_from_slice(&(self.0.len() as u32).to_be_bytes());
        for (k, v) in &self.0 {
            out.extend_from_slice(&(k.len() as u32).to_be_bytes());
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(&(v.len() as u32).to_be_bytes());
            out.extend_from_slice(v.as_bytes());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn encoding_is_order_independent_and_unambiguous() {
        let a = EncryptionContext::from_wire(&ctx(&[("b", "2"), ("a", "1")])).unwrap();
        let b = EncryptionContext::from_wire(&ctx(&[("a", "1"), ("b", "2")])).unwrap();
        assert_eq!(a.encode(), b.encode());
        // "ab"="c" must differ from "a"="bc".
        let c = EncryptionContext::from_wire(&ctx(&[("ab", "c")])).unwrap();
        let d = EncryptionContext::from_wire(&ctx(&[("a", "bc")])).unwrap();
        assert_ne!(c.encode(), d.encode());
        assert_eq!(EncryptionContext::default().encode(), vec![0, 0, 0, 0]);
    }

    #[test]
    fn rejects_bad_contexts() {
        assert!(EncryptionContext::from_wire(&ctx(&[("", "x")])).is_err());
        assert!(EncryptionContext::from_wire(&ctx(&[(&"k".repeat(129), "x")])).is_err());
        assert!(EncryptionContext::from_wire(&ctx(&[("k", &"v".repeat(257))])).is_err());
        assert!(EncryptionContext::from_wire(&ctx(&[("k", "a\nb")])).is_err());
        let many: HashMap<String, String> = (0..65)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect();
        assert!(EncryptionContext::from_wire(&many).is_err());
        let max: HashMap<String, String> = (0..64)
            .map(|i| (format!("k{i}"), "v".repeat(256)))
            .collect();
        assert!(EncryptionContext::from_wire(&max).is_ok());
    }
}
