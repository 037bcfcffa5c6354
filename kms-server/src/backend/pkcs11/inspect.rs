//! Read-back of a key object's protection attributes, so tests and operators can prove that
//! master keys are sensitive and were never extractable. The key value itself cannot be read:
//! SoftHSM silently omits sensitive attributes, and `CKA_VALUE` is never requested here.

use cryptoki::object::{Attribute, AttributeType};

use super::{OpError, Pkcs11Backend};
use crate::backend::BackendError;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KeyProtection {
    pub sensitive: bool,
    pub always_sensitive: bool,
    pub extractable: bool,
    pub never_extractable: bool,
    pub local: bool,
    pub token: bool,
    pub private: bool,
    pub encrypt: bool,
    pub decrypt: bool,
    pub sign: bool,
    pub wrap: bool,
    pub unwrap: bool,
    pub derive: bool,
    pub value_len: u64,
}

impl Pkcs11Backend {
    /// The protection attributes of the key object named `backend_ref`.
    pub fn key_protection(&self, backend_ref: &[u8]) -> Result<KeyProtection, BackendError> {
        self.with_session("read key attributes", |s| {
            let key = self.key_handle(s, backend_ref)?;
            let wanted = [
                AttributeType::Sensitive,
                AttributeType::AlwaysSensitive,
                AttributeType::Extractable,
                AttributeType::NeverExtractable,
                AttributeType::Local,
                AttributeType::Token,
                AttributeType::Private,
                AttributeType::Encrypt,
                AttributeType::Decrypt,
                AttributeType::Sign,
                AttributeType::Wrap,
                AttributeType::Unwrap,
                AttributeType::Derive,
                AttributeType::ValueLen,
            ];
            let attrs = s
                .session()
                .get_attributes(key, &wanted)
                .map_err(OpError::Ck)?;
            let mut p = KeyProtection::default();
            for a in attrs {
                match a {
                    Attribute::Sensitive(v) => p.sensitive = v,
                    Attribute::AlwaysSensitive(v) => p.always_sensitive = v,
                    Attribute::Extractable(v) => p.extractable = v,
                    Attribute::NeverExtractable(v) => p.never_extractable = v,
                    Attribute::Local(v) => p.local = v,
                    Attribute::Token(v) => p.token = v,
                    Attribute::Private(v) => p.private = v,
                    Attribute::Encrypt(v) => p.encrypt = v,
                    Attribute::Decrypt(v) => p.decrypt = v,
                    Attribute::Sign(v) => p.sign = v,
                    Attribute::Wrap(v) => p.wrap = v,
                    Attribute::Unwrap(v) => p.unwrap = v,
                    Attribute::Derive(v) => p.derive = v,
                    Attribute::ValueLen(v) => p.value_len = v.into(),
                    _ => {}
                }
            }
            Ok(p)
        })
    }
}
