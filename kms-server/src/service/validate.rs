//! Input validation for key-service requests: every rule, in one place, with the message the
//! caller sees.

use uuid::Uuid;

use crate::envelope::MAX_PLAINTEXT;
use crate::error::KmsError;

pub const MAX_ALIAS_LEN: usize = 256;
pub const MAX_DESCRIPTION_LEN: usize = 1024;
pub const DEFAULT_PAGE_SIZE: u32 = 100;
pub const MAX_PAGE_SIZE: u32 = 1000;

/// How the caller named a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRef {
    Id(Uuid),
    Alias(String),
}

/// The answer for a key that does not exist, or that the caller may not know of: the same
/// words either way, so a refusal tells nothing about existence.
pub fn not_found(key: &KeyRef) -> KmsError {
    KmsError::NotFound(match key {
        KeyRef::Id(id) => format!("key {id} not found"),
        KeyRef::Alias(a) => format!("key {a:?} not found"),
    })
}

/// Parses a key reference: a UUID, or an alias.
pub fn key_ref(field: &str, value: &str) -> Result<KeyRef, KmsError> {
    if value.is_empty() {
        return Err(KmsError::invalid(format!(
            "{field} is required (a key id or alias)"
        )));
    }
    if let Ok(id) = Uuid::parse_str(value) {
        return Ok(KeyRef::Id(id));
    }
    alias(field, value)?;
    Ok(KeyRef::Alias(value.to_string()))
}

/// Checks an alias: 1-256 of [A-Za-z0-9./_-], not a UUID. '.' lets per-client aliases carry
/// client ids such as `c.1042` (notes-store's `notes/<site>/clients/<client>`).
pub fn alias(field: &str, value: &str) -> Result<(), KmsError> {
    if value.is_empty() || value.len() > MAX_ALIAS_LEN {
        return Err(KmsError::invalid(format!(
            "{field} must be 1-{MAX_ALIAS_LEN} characters"
        )));
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '/' | '_' | '-'))
    {
        return Err(KmsError::invalid(format!(
            "{field} may contain only A-Z, a-z, 0-9, '.', '/', '_' and '-'"
        )));
    }
    if Uuid::parse_str(value).is_ok() {
        return Err(KmsError::invalid(format!(
            "{field} must not look like a key id (UUID)"
        )));
    }
    Ok(())
}

pub fn description(value: &str) -> Result<(), KmsError> {
    if value.len() > MAX_DESCRIPTION_LEN {
        return Err(KmsError::invalid(format!(
            "description is longer than {MAX_DESCRIPTION_LEN} bytes"
        )));
    }
    if value
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(KmsError::invalid(
            "description must not contain control characters",
        ));
    }
    Ok(())
}

pub fn plaintext(value: &[u8]) -> Result<(), KmsError> {
    if value.is_empty() || value.len() > MAX_PLAINTEXT {
        return Err(KmsError::invalid(format!(
            "plaintext must be 1-{MAX_PLAINTEXT} bytes"
        )));
    }
    Ok(())
}

pub fn page_size(value: u32) -> Result<u32, KmsError> {
    match value {
        0 => Ok(DEFAULT_PAGE_SIZE),
        1..=MAX_PAGE_SIZE => Ok(value),
        _ => Err(KmsError::invalid(format!(
            "page_size must be at most {MAX_PAGE_SIZE}"
        ))),
    }
}

const PAGE_TOKEN_PREFIX: &str = "k1.";

/// Page tokens are opaque to callers: "k1." followed by the last key id returned.
pub fn encode_page_token(last: Uuid) -> String {
    format!("{PAGE_TOKEN_PREFIX}{}", last.simple())
}

pub fn decode_page_token(token: &str) -> Result<Option<Uuid>, KmsError> {
    if token.is_empty() {
        return Ok(None);
    }
    token
        .strip_prefix(PAGE_TOKEN_PREFIX)
        .and_then(|rest| Uuid::try_parse(rest).ok())
        .map(Some)
        .ok_or_else(|| KmsError::invalid("page_token is not valid"))
}

/// Optional audit metadata (acting user, purpose): bounded, printable.
pub fn audit_field(field: &str, value: &str) -> Result<(), KmsError> {
    if value.len() > 128 || value.chars().any(char::is_control) {
        return Err(KmsError::invalid(format!(
            "{field} must be at most 128 printable characters"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_refs() {
        let id = Uuid::new_v4();
        assert_eq!(key_ref("key", &id.to_string()).unwrap(), KeyRef::Id(id));
        assert_eq!(
            key_ref("key", "notes/site-a").unwrap(),
            KeyRef::Alias("notes/site-a".into())
        );
        assert!(key_ref("key", "").is_err());
        assert!(key_ref("key", "has space").is_err());
        assert!(key_ref("key", &"a".repeat(257)).is_err());
        assert!(alias("alias", &id.to_string()).is_err());
    }

    #[test]
    fn page_tokens() {
        let id = Uuid::new_v4();
        assert_eq!(decode_page_token(&encode_page_token(id)).unwrap(), Some(id));
        assert_eq!(decode_page_token("").unwrap(), None);
        assert!(decode_page_token("garbage").is_err());
        assert!(decode_page_token("k1.zz").is_err());
        assert_eq!(page_size(0).unwrap(), 100);
        assert!(page_size(1001).is_err());
    }
}
