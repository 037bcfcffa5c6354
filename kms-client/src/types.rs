//! Rust-side types of the kms.v1 messages: owned, typed, and with secret fields in
//! zeroizing buffers whose `Debug` prints nothing.

use std::{collections::BTreeMap, fmt};

use kms_proto::kms::v1 as pb;
use zeroize::Zeroizing;

use crate::Error;

/// An encryption context: opaque ids bound to a ciphertext blob. A `BTreeMap` so that the
/// order is stable (the server canonicalises anyway).
pub type EncryptionContext = BTreeMap<String, String>;

/// The lifecycle state of a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyState {
    /// Usable for every operation.
    Enabled,
    /// Refuses cryptographic operations with `FAILED_PRECONDITION`.
    Disabled,
    /// Scheduled for destruction; unusable.
    PendingDeletion,
    /// Every version destroyed in the device; its blobs can never be decrypted again.
    Destroyed,
    /// `KEY_STATE_UNSPECIFIED` or a value this client does not know (the raw number).
    Unspecified(i32),
}

impl KeyState {
    /// The proto enum name without prefix: `ENABLED`, `DISABLED`, `PENDING_DELETION`,
    /// `UNSPECIFIED`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Enabled => "ENABLED",
            KeyState::Disabled => "DISABLED",
            KeyState::PendingDeletion => "PENDING_DELETION",
            KeyState::Destroyed => "DESTROYED",
            KeyState::Unspecified(_) => "UNSPECIFIED",
        }
    }
}

impl From<i32> for KeyState {
    fn from(raw: i32) -> Self {
        match pb::KeyState::try_from(raw) {
            Ok(pb::KeyState::Enabled) => KeyState::Enabled,
            Ok(pb::KeyState::Disabled) => KeyState::Disabled,
            Ok(pb::KeyState::PendingDeletion) => KeyState::PendingDeletion,
            Ok(pb::KeyState::Destroyed) => KeyState::Destroyed,
            Ok(pb::KeyState::Unspecified) | Err(_) => KeyState::Unspecified(raw),
        }
    }
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the server knows about a master key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyMetadata {
    /// UUID chosen by the server.
    pub key_id: String,
    /// Optional unique human name.
    pub alias: Option<String>,
    /// Free text (may be empty).
    pub description: String,
    /// Lifecycle state.
    pub state: KeyState,
    /// The version new data keys are wrapped under.
    pub primary_version: u32,
    /// Creation time, milliseconds since the Unix epoch (UTC).
    pub created_at_unix_ms: i64,
    /// `"pkcs11"` or `"tpm"`.
    pub backend: String,
    /// Automatic rotation period in seconds; 0 = none.
    pub rotation_period_seconds: u64,
    /// Next automatic rotation (ms since the epoch); 0 = not scheduled.
    pub next_rotation_at_unix_ms: i64,
    /// Blobs under older versions are refused.
    pub min_decryption_version: u32,
    /// Pending deletion: when it will be destroyed; destroyed: when it was. 0 otherwise.
    pub deletion_at_unix_ms: i64,
}

impl From<pb::KeyMetadata> for KeyMetadata {
    fn from(m: pb::KeyMetadata) -> Self {
        Self {
            key_id: m.key_id,
            alias: (!m.alias.is_empty()).then_some(m.alias),
            description: m.description,
            state: KeyState::from(m.state),
            primary_version: m.primary_version,
            created_at_unix_ms: m.created_at_unix_ms,
            backend: m.backend,
            rotation_period_seconds: m.rotation_period_seconds,
            next_rotation_at_unix_ms: m.next_rotation_at_unix_ms,
            min_decryption_version: m.min_decryption_version,
            deletion_at_unix_ms: m.deletion_at_unix_ms,
        }
    }
}

/// Turns the `key` field every key RPC returns into `KeyMetadata`, or an error if it is absent.
pub(crate) fn required_key(
    method: &'static str,
    key: Option<pb::KeyMetadata>,
) -> Result<KeyMetadata, Error> {
    key.map(KeyMetadata::from)
        .ok_or_else(|| Error::InvalidResponse {
            method,
            reason: "missing key metadata".into(),
        })
}

/// One page of `ListKeys`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyPage {
    /// The keys of this page.
    pub keys: Vec<KeyMetadata>,
    /// Pass to the next `list_keys` call; `None` on the last page.
    pub next_page_token: Option<String>,
}

/// Who is acting and why; recorded in the audit log, not bound to the ciphertext.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditMetadata {
    /// Opaque id of the person on whose behalf the caller acts.
    pub acting_user: String,
    /// Purpose of use, e.g. `TREATMENT`, `BREAK_GLASS`.
    pub purpose: String,
}

impl From<AuditMetadata> for pb::AuditMetadata {
    fn from(a: AuditMetadata) -> Self {
        Self {
            acting_user: a.acting_user,
            purpose: a.purpose,
        }
    }
}

/// A fresh data key: use `plaintext` in memory (it is zeroized on drop), store
/// `ciphertext_blob`. `Debug` never shows the plaintext.
#[derive(Clone)]
pub struct DataKey {
    /// The 32-byte data key.
    pub plaintext: Zeroizing<Vec<u8>>,
    /// The data key wrapped under the master key, bound to the encryption context.
    pub ciphertext_blob: Vec<u8>,
    /// The master key (UUID).
    pub key_id: String,
    /// The master key version that wrapped it.
    pub key_version: u32,
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataKey")
            .field("plaintext", &"<redacted>")
            .field(
                "ciphertext_blob",
                &format_args!("<{} bytes>", self.ciphertext_blob.len()),
            )
            .field("key_id", &self.key_id)
            .field("key_version", &self.key_version)
            .finish()
    }
}

/// A ciphertext blob and the key that made it (`Encrypt`, `GenerateDataKeyWithoutPlaintext`).
#[derive(Clone, PartialEq, Eq)]
pub struct Ciphertext {
    /// The blob; it names its key and version itself.
    pub ciphertext_blob: Vec<u8>,
    /// The master key (UUID).
    pub key_id: String,
    /// The master key version.
    pub key_version: u32,
}

impl fmt::Debug for Ciphertext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ciphertext")
            .field(
                "ciphertext_blob",
                &format_args!("<{} bytes>", self.ciphertext_blob.len()),
            )
            .field("key_id", &self.key_id)
            .field("key_version", &self.key_version)
            .finish()
    }
}

/// The result of `Decrypt`. `Debug` never shows the plaintext.
#[derive(Clone)]
pub struct Decrypted {
    /// The plaintext (zeroized on drop).
    pub plaintext: Zeroizing<Vec<u8>>,
    /// The master key (UUID) that unwrapped it.
    pub key_id: String,
    /// The master key version.
    pub key_version: u32,
}

impl fmt::Debug for Decrypted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decrypted")
            .field("plaintext", &"<redacted>")
            .field("key_id", &self.key_id)
            .field("key_version", &self.key_version)
            .finish()
    }
}

/// The caller as the server sees it (`WhoAmI`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WhoAmI {
    /// Certificate SAN URI, else subject CN.
    pub identity: String,
    /// Hex SHA-256 of the certificate's public key.
    pub key_fingerprint: String,
    /// Roles the server's policy binds to the identity.
    pub roles: Vec<String>,
    /// Effective permissions, one line each.
    pub permissions: Vec<String>,
}

/// The result of `ReEncrypt`.
#[derive(Clone, PartialEq, Eq)]
pub struct ReEncrypted {
    /// The new blob.
    pub ciphertext_blob: Vec<u8>,
    /// The key (UUID) and version the old blob was under.
    pub source_key_id: String,
    /// See `source_key_id`.
    pub source_key_version: u32,
    /// The key (UUID) and version the new blob is under.
    pub key_id: String,
    /// See `key_id`.
    pub key_version: u32,
}

impl fmt::Debug for ReEncrypted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReEncrypted")
            .field(
                "ciphertext_blob",
                &format_args!("<{} bytes>", self.ciphertext_blob.len()),
            )
            .field("source_key_id", &self.source_key_id)
            .field("source_key_version", &self.source_key_version)
            .field("key_id", &self.key_id)
            .field("key_version", &self.key_version)
            .finish()
    }
}

/// Copies a context into the proto's `HashMap`.
pub(crate) fn to_proto_context(
    context: &EncryptionContext,
) -> std::collections::HashMap<String, String> {
    context
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_plaintext() {
        let dk = DataKey {
            plaintext: Zeroizing::new(b"TOP-SECRET-DATA-KEY".to_vec()),
            ciphertext_blob: vec![1, 2, 3],
            key_id: "k".into(),
            key_version: 1,
        };
        let shown = format!("{dk:?}");
        assert!(!shown.contains("TOP-SECRET"), "{shown}");
        assert!(!shown.contains("84, 79, 80"), "{shown}"); // "TOP" as bytes
        let dec = Decrypted {
            plaintext: Zeroizing::new(b"TOP-SECRET".to_vec()),
            key_id: "k".into(),
            key_version: 1,
        };
        assert!(!format!("{dec:?}").contains("TOP-SECRET"));
    }

    #[test]
    fn key_metadata_from_proto() {
        let m = KeyMetadata::from(pb::KeyMetadata {
            key_id: "id".into(),
            alias: String::new(),
            description: "d".into(),
            state: pb::KeyState::Disabled as i32,
            primary_version: 2,
            created_at_unix_ms: 5,
            backend: "pkcs11".into(),
            min_decryption_version: 2,
            ..Default::default()
        });
        assert_eq!(m.min_decryption_version, 2);
        assert_eq!(m.alias, None);
        assert_eq!(m.state, KeyState::Disabled);
        assert_eq!(KeyState::from(99), KeyState::Unspecified(99));
        assert_eq!(KeyState::from(3).to_string(), "PENDING_DELETION");
    }
}
