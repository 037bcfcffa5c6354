//! Erasure receipts: what `EraseKey` destroyed, as canonical JSON signed with the audit key.
//!
//! The receipt is a JSON object with a fixed field order and no insignificant whitespace
//! (serde_json of [`ErasureReceipt`]); the signature is ECDSA P-256 over SHA-256 of exactly
//! those bytes, raw `r || s`. Anyone holding the audit public key (`kmsctl audit public-key`)
//! can check it offline with [`verify_receipt`].

use std::collections::BTreeMap;

use p256::ecdsa::{signature::hazmat::PrehashVerifier, Signature};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{AuditError, VerifyingKeyInput};

/// The `type` of every erasure receipt.
pub const ERASURE_RECEIPT_TYPE: &str = "kms.erasure-receipt.v1";

/// One key destruction, as the KMS attests it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErasureReceipt {
    /// Always [`ERASURE_RECEIPT_TYPE`].
    #[serde(rename = "type")]
    pub kind: String,
    pub key_id: String,
    pub alias: String,
    /// Every version destroyed in the device, ascending.
    pub destroyed_versions: Vec<u32>,
    /// Opaque ids of what was erased (e.g. site and client), as the caller named them.
    pub subject: BTreeMap<String, String>,
    pub reason: String,
    /// Identity of the caller that asked for the erasure.
    pub requested_by: String,
    /// The request id of the `EraseKey` call: its audit event carries the same id.
    pub request_id: String,
    /// When the key was destroyed (ms since the epoch).
    pub erased_at_unix_ms: i64,
    /// "pkcs11" or "tpm".
    pub backend: String,
    /// Fingerprint of the audit key that signs this receipt.
    pub signing_key_fingerprint: String,
}

impl ErasureReceipt {
    /// The canonical bytes that are signed.
    pub fn to_bytes(&self) -> Result<Vec<u8>, AuditError> {
        serde_json::to_vec(self).map_err(|e| AuditError::PublicKey(format!("receipt: {e}")))
    }

    /// SHA-256 of `bytes`: the digest handed to the signer.
    pub fn digest(bytes: &[u8]) -> [u8; 32] {
        Sha256::digest(bytes).into()
    }
}

/// Checks a receipt's signature with the audit public key and parses it. The receipt must
/// name `key` as its signer.
///
/// # Errors
/// [`AuditError::CheckpointSignature`] naming the failed check.
pub fn verify_receipt(
    receipt: &[u8],
    signature: &[u8],
    key: &VerifyingKeyInput,
) -> Result<ErasureReceipt, AuditError> {
    let sig = Signature::from_slice(signature)
        .map_err(|_| AuditError::CheckpointSignature("receipt signature is not raw r||s"))?;
    key.key()
        .verify_prehash(&ErasureReceipt::digest(receipt), &sig)
        .map_err(|_| AuditError::CheckpointSignature("receipt signature does not verify"))?;
    let parsed: ErasureReceipt = serde_json::from_slice(receipt)
        .map_err(|_| AuditError::CheckpointSignature("receipt is not an erasure receipt"))?;
    if parsed.kind != ERASURE_RECEIPT_TYPE {
        return Err(AuditError::CheckpointSignature(
            "receipt has an unknown type",
        ));
    }
    if parsed.signing_key_fingerprint != key.fingerprint() {
        return Err(AuditError::CheckpointSignature(
            "receipt names another signing key",
        ));
    }
    Ok(parsed)
}
