//! The `backend_ref` of a TPM key version: the TPM-wrapped blobs of its AES and HMAC keys.
//!
//! ```text
//! offset  size  field
//! 0       4     magic "KTPM"
//! 4       1     format version = 1
//! 5       2+n   AES key:  u16 big-endian length || TPM2B_PRIVATE buffer (wrapped by the storage primary)
//! …       2+n   AES key:  u16 length || marshalled TPMT_PUBLIC
//! …       2+n   HMAC key: u16 length || TPM2B_PRIVATE buffer
//! …       2+n   HMAC key: u16 length || marshalled TPMT_PUBLIC
//! ```
//! The private parts are encrypted and integrity-protected by the TPM's storage primary
//! (fixedTPM, fixedParent): only this TPM, with this owner seed, can load them. Nothing in
//! the blob is secret to anyone without that TPM. Anything else (a PKCS#11 label, a truncated
//! or edited blob) is refused as a key that does not exist in this device.

use sha2::{Digest as _, Sha256};
use tss_esapi::attributes::ObjectAttributes;
use tss_esapi::structures::{Private, Public};
use tss_esapi::traits::{Marshall, UnMarshall};

use crate::backend::BackendError;

const MAGIC: &[u8; 4] = b"KTPM";
const VERSION: u8 = 1;

/// The wrapped blobs of one key version, ready to load.
#[derive(Debug, Clone)]
pub(super) struct KeyBlobs {
    pub aes_private: Private,
    pub aes_public: Public,
    pub hmac_private: Private,
    pub hmac_public: Public,
}

/// A short fingerprint of a `backend_ref`: the cache key of loaded objects and of destroyed
/// versions.
pub(super) type RefId = [u8; 32];

pub(super) fn ref_id(backend_ref: &[u8]) -> RefId {
    Sha256::digest(backend_ref).into()
}

fn not_ours(why: &str) -> BackendError {
    BackendError::KeyNotFound(format!("not a TPM key version reference ({why})"))
}

impl KeyBlobs {
    pub fn encode(&self) -> Result<Vec<u8>, BackendError> {
        let marshal = |p: &Public| {
            p.marshall()
                .map_err(|e| BackendError::Internal(format!("marshalling a TPM public area: {e}")))
        };
        let parts = [
            self.aes_private.value().to_vec(),
            marshal(&self.aes_public)?,
            self.hmac_private.value().to_vec(),
            marshal(&self.hmac_public)?,
        ];
        let mut out = Vec::with_capacity(5 + parts.iter().map(|p| p.len() + 2).sum::<usize>());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        for part in &parts {
            let len = u16::try_from(part.len())
                .map_err(|_| BackendError::Internal("TPM blob part too long".into()))?;
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(part);
        }
        Ok(out)
    }

    pub fn decode(backend_ref: &[u8]) -> Result<Self, BackendError> {
        let rest = backend_ref
            .strip_prefix(MAGIC.as_slice())
            .ok_or_else(|| not_ours("bad magic"))?;
        let (&version, mut rest) = rest.split_first().ok_or_else(|| not_ours("truncated"))?;
        if version != VERSION {
            return Err(not_ours("unknown format version"));
        }
        let mut next = || -> Result<&[u8], BackendError> {
            if rest.len() < 2 {
                return Err(not_ours("truncated"));
            }
            let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
            let body = rest.get(2..2 + len).ok_or_else(|| not_ours("truncated"))?;
            rest = &rest[2 + len..];
            Ok(body)
        };
        let private = |b: &[u8]| Private::try_from(b.to_vec()).map_err(|_| not_ours("bad private"));
        let public = |b: &[u8]| Public::unmarshall(b).map_err(|_| not_ours("bad public"));
        let blobs = KeyBlobs {
            aes_private: private(next()?)?,
            aes_public: public(next()?)?,
            hmac_private: private(next()?)?,
            hmac_public: public(next()?)?,
        };
        if !rest.is_empty() {
            return Err(not_ours("trailing bytes"));
        }
        Ok(blobs)
    }
}

/// The protection attributes of a key version's two TPM objects, read from the public areas
/// the TPM checks on every load (for tests and operators).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TpmKeyProtection {
    pub aes: ObjectProtection,
    pub hmac: ObjectProtection,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectProtection {
    /// Cannot be duplicated to another TPM.
    pub fixed_tpm: bool,
    /// Cannot be re-parented (duplicated) at all.
    pub fixed_parent: bool,
    /// Generated inside the TPM.
    pub sensitive_data_origin: bool,
    pub decrypt: bool,
    pub sign_encrypt: bool,
    pub restricted: bool,
    pub is_aes_256_cfb: bool,
    pub is_hmac_sha256: bool,
}

fn protection(public: &Public) -> ObjectProtection {
    let a: ObjectAttributes = public.object_attributes();
    let is_aes_256_cfb = matches!(public, Public::SymCipher { parameters, .. }
        if parameters.symmetric_definition_object()
            == tss_esapi::structures::SymmetricDefinitionObject::AES_256_CFB);
    let is_hmac_sha256 = matches!(public, Public::KeyedHash { parameters, .. }
        if *parameters == tss_esapi::structures::PublicKeyedHashParameters::new(
            tss_esapi::structures::KeyedHashScheme::HMAC_SHA_256));
    ObjectProtection {
        fixed_tpm: a.fixed_tpm(),
        fixed_parent: a.fixed_parent(),
        sensitive_data_origin: a.sensitive_data_origin(),
        decrypt: a.decrypt(),
        sign_encrypt: a.sign_encrypt(),
        restricted: a.restricted(),
        is_aes_256_cfb,
        is_hmac_sha256,
    }
}

impl TpmKeyProtection {
    pub fn of(backend_ref: &[u8]) -> Result<Self, BackendError> {
        let blobs = KeyBlobs::decode(backend_ref)?;
        Ok(TpmKeyProtection {
            aes: protection(&blobs.aes_public),
            hmac: protection(&blobs.hmac_public),
        })
    }
}
