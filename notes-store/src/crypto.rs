//! Local encryption of note text under a data key: AES-256-GCM, the KMS encryption context and
//! the canonical AAD. No network, no storage: `service` fetches data keys, `store` keeps the
//! results.
//!
//! Format version 1 ([`CRYPTO_VERSION`], stored with every revision):
//!
//! - One fresh 32-byte data key per revision, from KMS `GenerateDataKey` with the encryption
//!   context `{"site": <site id>, "client": <client id>, "note": <note id>, "revision": "<n>"}`
//!   ([`RevisionIds::kms_context`]). The KMS binds its wrapped copy to that context.
//! - Each text field of the revision (the body; for amendments also the reason) is sealed with
//!   that key, a random 96-bit nonce of its own, and the AAD
//!
//!   ```text
//!   AAD = lp(domain) || lp(site id) || lp(client id) || lp(note id) || u32be(revision)
//!   lp(x) = u32be(len(x)) || x          domain = "notes.v1.body" | "notes.v1.reason"
//!   ```
//!
//!   with the note id in its canonical lower-case hyphenated form. Every variable field is
//!   length-prefixed, so no two different id tuples encode alike; the domain tag keeps a body
//!   ciphertext from opening as a reason (and the reverse).
//! - Stored: nonce (12 bytes) and ciphertext || tag (16 bytes). The plaintext data key is held in
//!   `Zeroizing` memory only, and the expanded AES key schedule is zeroized on drop (aes-gcm's
//!   `zeroize` feature).

use std::collections::BTreeMap;

use aes_gcm::aead::{Aead, KeyInit, Nonce, Payload};
use aes_gcm::Aes256Gcm;
use rand::RngCore;
use uuid::Uuid;
use zeroize::Zeroizing;

/// The format described in the module documentation.
pub const CRYPTO_VERSION: u32 = 1;
pub const DATA_KEY_LEN: usize = 32;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;

/// Which text of a revision is sealed; each has its own AAD domain tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Body,
    Reason,
}

impl Field {
    pub fn domain(self) -> &'static str {
        match self {
            Field::Body => "notes.v1.body",
            Field::Reason => "notes.v1.reason",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("data key has {0} bytes, expected {DATA_KEY_LEN}")]
    DataKeyLength(usize),
    #[error("nonce has {0} bytes, expected {NONCE_LEN}")]
    NonceLength(usize),
    /// Wrong key, wrong ids or revision, or modified nonce/ciphertext. Says nothing about which.
    #[error("authentication failed")]
    Authentication,
    #[error("encryption failed")]
    Encryption,
}

/// The ids one revision is bound to (in the KMS context and in the AAD).
#[derive(Debug, Clone, Copy)]
pub struct RevisionIds<'a> {
    pub site_id: &'a str,
    pub client_id: &'a str,
    pub note_id: Uuid,
    pub revision: u32,
}

impl RevisionIds<'_> {
    /// The KMS encryption context: opaque ids only.
    pub fn kms_context(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("site".to_string(), self.site_id.to_string()),
            ("client".to_string(), self.client_id.to_string()),
            ("note".to_string(), self.note_id.hyphenated().to_string()),
            ("revision".to_string(), self.revision.to_string()),
        ])
    }

    /// The canonical AAD for `field` (see the module documentation).
    pub fn aad(&self, field: Field) -> Vec<u8> {
        let note_id = self.note_id.hyphenated().to_string();
        let mut out = Vec::with_capacity(64 + self.site_id.len() + self.client_id.len());
        for part in [
            field.domain(),
            self.site_id,
            self.client_id,
            note_id.as_str(),
        ] {
            let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(part.as_bytes());
        }
        out.extend_from_slice(&self.revision.to_be_bytes());
        out
    }
}

/// A sealed text: what is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub nonce: Vec<u8>,
    /// Ciphertext followed by the 16-byte tag.
    pub ciphertext: Vec<u8>,
}

fn cipher(data_key: &[u8]) -> Result<Aes256Gcm, CryptoError> {
    if data_key.len() != DATA_KEY_LEN {
        return Err(CryptoError::DataKeyLength(data_key.len()));
    }
    Aes256Gcm::new_from_slice(data_key).map_err(|_| CryptoError::DataKeyLength(data_key.len()))
}

/// A fresh random nonce from the operating system.
pub fn random_nonce() -> [u8; NONCE_LEN] {
    let mut nonce = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    nonce
}

/// Seals `plaintext` under `data_key` with the given nonce (use [`random_nonce`]).
pub fn seal_with_nonce(
    data_key: &[u8],
    ids: &RevisionIds<'_>,
    field: Field,
    nonce: [u8; NONCE_LEN],
    plaintext: &[u8],
) -> Result<Sealed, CryptoError> {
    let aad = ids.aad(field);
    let ciphertext = cipher(data_key)?
        .encrypt(
            &Nonce::<Aes256Gcm>::from(nonce),
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        .map_err(|_| CryptoError::Encryption)?;
    Ok(Sealed {
        nonce: nonce.to_vec(),
        ciphertext,
    })
}

/// Seals `plaintext` under `data_key` with a fresh random nonce.
pub fn seal(
    data_key: &[u8],
    ids: &RevisionIds<'_>,
    field: Field,
    plaintext: &[u8],
) -> Result<Sealed, CryptoError> {
    seal_with_nonce(data_key, ids, field, random_nonce(), plaintext)
}

/// Opens a sealed text; fails unless key, ids, revision, field, nonce and ciphertext all match.
pub fn open(
    data_key: &[u8],
    ids: &RevisionIds<'_>,
    field: Field,
    sealed: &Sealed,
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    let nonce: [u8; NONCE_LEN] = sealed
        .nonce
        .as_slice()
        .try_into()
        .map_err(|_| CryptoError::NonceLength(sealed.nonce.len()))?;
    let aad = ids.aad(field);
    cipher(data_key)?
        .decrypt(
            &Nonce::<Aes256Gcm>::from(nonce),
            Payload {
                msg: &sealed.ciphertext,
                aad: &aad,
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| CryptoError::Authentication)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOTE: &str = "0b0c2d5e-4f6a-4b8c-9d0e-1f2a3b4c5d6e";

    fn ids(site: &'static str, client: &'static str, revision: u32) -> RevisionIds<'static> {
        RevisionIds {
            site_id: site,
            client_id: client,
            note_id: Uuid::parse_str(NOTE).unwrap(),
            revision,
        }
    }

    #[test]
    fn aad_known_answer() {
        let aad = ids("s1", "c-2", 7).aad(Field::Body);
        let mut want = Vec::new();
        want.extend_from_slice(&[0, 0, 0, 13]);
        want.extend_from_slice(b"notes.v1.body");
        want.extend_from_slice(&[0, 0, 0, 2]);
        want.extend_from_slice(b"s1");
        want.extend_from_slice(&[0, 0, 0, 3]);
        want.extend_from_slice(b"c-2");
        want.extend_from_slice(&[0, 0, 0, 36]);
        want.extend_from_slice(NOTE.as_bytes());
        want.extend_from_slice(&[0, 0, 0, 7]);
        assert_eq!(aad, want);
    }

    #[test]
    fn aad_is_unambiguous() {
        assert_ne!(
            ids("ab", "c", 1).aad(Field::Body),
            ids("a", "bc", 1).aad(Field::Body)
        );
        assert_ne!(
            ids("a", "b", 1).aad(Field::Body),
            ids("a", "b", 1).aad(Field::Reason)
        );
        assert_ne!(
            ids("a", "b", 1).aad(Field::Body),
            ids("a", "b", 2).aad(Field::Body)
        );
    }

    #[test]
    fn kms_context_holds_only_ids() {
        let ctx = ids("s1", "c-2", 3).kms_context();
        assert_eq!(ctx.len(), 4);
        assert_eq!(ctx["site"], "s1");
        assert_eq!(ctx["client"], "c-2");
        assert_eq!(ctx["note"], NOTE);
        assert_eq!(ctx["revision"], "3");
    }

    /// AES-256-GCM known answer (the GCM specification's test case 14): the crate is wired as
    /// AES-256-GCM with a 96-bit nonce and a postfix 128-bit tag.
    #[test]
    fn aes_gcm_known_answer_without_aad() {
        let key = [0u8; 32];
        let cipher = Aes256Gcm::new_from_slice(&key).unwrap();
        let ct = cipher
            .encrypt(&Nonce::<Aes256Gcm>::from([0u8; 12]), &[0u8; 16][..])
            .unwrap();
        // Zero key, zero IV, one zero block: ciphertext || tag.
        let want = "cea7403d4d606b6e074ec5d3baf39d18d0d1c8a799996bf0265b98b5d48ab919";
        let got: String = ct.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn round_trip_and_every_binding() {
        let key = [7u8; 32];
        let a = ids("s1", "c1", 1);
        let sealed = seal(&key, &a, Field::Body, b"session went well").unwrap();
        assert_eq!(sealed.nonce.len(), NONCE_LEN);
        assert_eq!(sealed.ciphertext.len(), 17 + TAG_LEN);
        assert_eq!(
            &open(&key, &a, Field::Body, &sealed).unwrap()[..],
            b"session went well"
        );
        // Other key, ids, revision or field: refused.
        assert_eq!(
            open(&[8u8; 32], &a, Field::Body, &sealed),
            Err(CryptoError::Authentication)
        );
        for other in [ids("s2", "c1", 1), ids("s1", "c2", 1), ids("s1", "c1", 2)] {
            assert_eq!(
                open(&key, &other, Field::Body, &sealed),
                Err(CryptoError::Authentication)
            );
        }
        assert_eq!(
            open(&key, &a, Field::Reason, &sealed),
            Err(CryptoError::Authentication)
        );
        // Every flipped bit of nonce or ciphertext: refused.
        for i in 0..sealed.nonce.len() + sealed.ciphertext.len() {
            let mut t = sealed.clone();
            if i < t.nonce.len() {
                t.nonce[i] ^= 0x80;
            } else {
                t.ciphertext[i - sealed.nonce.len()] ^= 0x01;
            }
            assert_eq!(
                open(&key, &a, Field::Body, &t),
                Err(CryptoError::Authentication)
            );
        }
        // Malformed inputs are errors, not panics.
        assert_eq!(
            open(&key[..31], &a, Field::Body, &sealed),
            Err(CryptoError::DataKeyLength(31))
        );
        let mut short = sealed.clone();
        short.nonce.pop();
        assert_eq!(
            open(&key, &a, Field::Body, &short),
            Err(CryptoError::NonceLength(11))
        );
        let mut empty = sealed;
        empty.ciphertext.clear();
        assert_eq!(
            open(&key, &a, Field::Body, &empty),
            Err(CryptoError::Authentication)
        );
    }

    #[test]
    fn nonces_are_fresh() {
        let key = [1u8; 32];
        let a = ids("s", "c", 1);
        let x = seal(&key, &a, Field::Body, b"same").unwrap();
        let y = seal(&key, &a, Field::Body, b"same").unwrap();
        assert_ne!(x.nonce, y.nonce);
        assert_ne!(x.ciphertext, y.ciphertext);
    }
}
