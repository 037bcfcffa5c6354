//! The audit signing key: an ECDSA P-256 key pair generated inside the token, whose private
//! half is sensitive and never extractable. It signs audit checkpoints (a SHA-256 digest,
//! `CKM_ECDSA`, raw r||s); the public half can be exported so anyone can verify offline.

use cryptoki::mechanism::Mechanism as CkMechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};

use super::{OpError, Pkcs11Backend, PooledSession};
use crate::backend::BackendError;

const AUDIT_KEY_LABEL: &[u8] = b"kms-audit-signing";
/// DER of the OID prime256v1 (1.2.840.10045.3.1.7), the CKA_EC_PARAMS of a P-256 key.
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

fn find(s: &PooledSession<'_>, class: ObjectClass) -> Result<Option<ObjectHandle>, OpError> {
    let template = [
        Attribute::Class(class),
        Attribute::Label(AUDIT_KEY_LABEL.to_vec()),
    ];
    let found = s.session().find_objects(&template).map_err(OpError::Ck)?;
    Ok(found.first().copied())
}

impl Pkcs11Backend {
    /// Creates the audit key pair if the token has none yet.
    pub(super) fn ensure_audit_key(&self) -> Result<(), BackendError> {
        self.with_exclusive_session("create audit signing key", |s| {
            if find(s, ObjectClass::PRIVATE_KEY)?.is_some() {
                return Ok(());
            }
            let public = [
                Attribute::Class(ObjectClass::PUBLIC_KEY),
                Attribute::KeyType(KeyType::EC),
                Attribute::EcParams(P256_PARAMS.to_vec()),
                Attribute::Token(true),
                Attribute::Verify(true),
                Attribute::Encrypt(false),
                Attribute::Wrap(false),
                Attribute::Label(AUDIT_KEY_LABEL.to_vec()),
            ];
            let private = [
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::KeyType(KeyType::EC),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Sign(true),
                Attribute::Decrypt(false),
                Attribute::Unwrap(false),
                Attribute::Derive(false),
                Attribute::Label(AUDIT_KEY_LABEL.to_vec()),
            ];
            s.session()
                .generate_key_pair(&CkMechanism::EccKeyPairGen, &public, &private)
                .map(|_| ())
                .map_err(OpError::Ck)
        })
    }

    pub(super) fn audit_point(&self) -> Result<Vec<u8>, BackendError> {
        self.with_session("read audit public key", |s| {
            let public = find(s, ObjectClass::PUBLIC_KEY)?.ok_or_else(|| {
                OpError::Backend(BackendError::KeyNotFound(
                    "no audit signing key in the token".into(),
                ))
            })?;
            let attrs = s
                .session()
                .get_attributes(public, &[AttributeType::EcPoint])
                .map_err(OpError::Ck)?;
            attrs
                .into_iter()
                .find_map(|a| match a {
                    Attribute::EcPoint(p) => Some(p),
                    _ => None,
                })
                .ok_or_else(|| {
                    OpError::Backend(BackendError::Internal(
                        "audit key has no CKA_EC_POINT".into(),
                    ))
                })
        })
    }

    pub(super) fn audit_sign(&self, digest: &[u8; 32]) -> Result<Vec<u8>, BackendError> {
        self.with_session("sign audit checkpoint", |s| {
            let private = find(s, ObjectClass::PRIVATE_KEY)?.ok_or_else(|| {
                OpError::Backend(BackendError::KeyNotFound(
                    "no audit signing key in the token".into(),
                ))
            })?;
            s.session()
                .sign(&CkMechanism::Ecdsa, private, digest)
                .map_err(OpError::Ck)
        })
    }
}
