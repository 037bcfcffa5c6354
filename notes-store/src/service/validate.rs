//! Input validation for notes requests: every rule in one place, with the message the caller
//! sees. Messages name fields, never note text.

use kms_proto::notes::v1::PurposeOfUse;
use uuid::Uuid;

use crate::config::MAX_REASON_BYTES;
use crate::error::NotesError;

pub const MAX_ID_LEN: usize = 64;
pub const DEFAULT_PAGE_SIZE: u32 = 50;
pub const MAX_PAGE_SIZE: u32 = 500;

/// An opaque caller-chosen id (site, client, author, acting user): 1-64 of [A-Za-z0-9._-].
pub fn id(field: &str, value: &str) -> Result<(), NotesError> {
    if value.is_empty() {
        return Err(NotesError::invalid(format!("{field} is required")));
    }
    if value.len() > MAX_ID_LEN
        || !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(NotesError::invalid(format!(
            "{field} must be 1-{MAX_ID_LEN} characters of A-Z, a-z, 0-9, '.', '_', '-'"
        )));
    }
    Ok(())
}

/// A note id: a UUID.
pub fn note_id(value: &str) -> Result<Uuid, NotesError> {
    if value.is_empty() {
        return Err(NotesError::invalid("note_id is required"));
    }
    Uuid::try_parse(value).map_err(|_| NotesError::invalid("note_id must be a UUID"))
}

/// A calendar date written YYYY-MM-DD.
pub fn date(field: &str, value: &str) -> Result<(), NotesError> {
    let bad = || NotesError::invalid(format!("{field} must be a date written YYYY-MM-DD"));
    let b = value.as_bytes();
    // ASCII first: the slicing below must stay on character boundaries.
    if !value.is_ascii() || b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return Err(bad());
    }
    let number = |range: std::ops::Range<usize>| -> Result<u32, NotesError> {
        let part = &value[range];
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        part.parse().map_err(|_| bad())
    };
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return Err(bad()),
    };
    if year == 0 || day == 0 || day > days {
        return Err(bad());
    }
    Ok(())
}

/// Clinical text (body or reason): 1..=`max` bytes of valid UTF-8.
pub fn text<'a>(field: &str, value: &'a [u8], max: usize) -> Result<&'a str, NotesError> {
    if value.is_empty() {
        return Err(NotesError::invalid(format!("{field} is required")));
    }
    if value.len() > max {
        return Err(NotesError::invalid(format!(
            "{field} is longer than {max} bytes"
        )));
    }
    std::str::from_utf8(value)
        .map_err(|_| NotesError::invalid(format!("{field} is not valid UTF-8")))
}

pub fn reason(value: &[u8]) -> Result<&str, NotesError> {
    text("reason", value, MAX_REASON_BYTES)
}

/// The purpose of use: a known value other than UNSPECIFIED. Returns its short name
/// ("TREATMENT", ...), as forwarded to the KMS audit log.
pub fn purpose(value: i32) -> Result<&'static str, NotesError> {
    match PurposeOfUse::try_from(value) {
        Ok(PurposeOfUse::Treatment) => Ok("TREATMENT"),
        Ok(PurposeOfUse::Supervision) => Ok("SUPERVISION"),
        Ok(PurposeOfUse::ClientRequest) => Ok("CLIENT_REQUEST"),
        Ok(PurposeOfUse::Legal) => Ok("LEGAL"),
        Ok(PurposeOfUse::BreakGlass) => Ok("BREAK_GLASS"),
        Ok(PurposeOfUse::Unspecified) => Err(NotesError::invalid("purpose is required")),
        Err(_) => Err(NotesError::invalid(format!(
            "purpose {value} is not a known purpose of use"
        ))),
    }
}

pub fn page_size(value: u32) -> Result<u32, NotesError> {
    match value {
        0 => Ok(DEFAULT_PAGE_SIZE),
        1..=MAX_PAGE_SIZE => Ok(value),
        _ => Err(NotesError::invalid(format!(
            "page_size must be at most {MAX_PAGE_SIZE}"
        ))),
    }
}

const PAGE_TOKEN_PREFIX: &str = "n1.";

/// Page tokens are opaque to callers: "n1.<session date>.<note id, simple>" of the last note
/// returned.
pub fn encode_page_token(session_date: &str, note_id: Uuid) -> String {
    format!("{PAGE_TOKEN_PREFIX}{session_date}.{}", note_id.simple())
}

pub fn decode_page_token(token: &str) -> Result<Option<(String, Uuid)>, NotesError> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || NotesError::invalid("page_token is not valid");
    let rest = token.strip_prefix(PAGE_TOKEN_PREFIX).ok_or_else(bad)?;
    let (date_part, id_part) = rest.split_once('.').ok_or_else(bad)?;
    date("page_token", date_part).map_err(|_| bad())?;
    let id = Uuid::try_parse(id_part).map_err(|_| bad())?;
    Ok(Some((date_part.to_string(), id)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(id("site_id", "site-a.1_B").is_ok());
        assert!(id("site_id", &"a".repeat(64)).is_ok());
        assert!(id("site_id", "").is_err());
        assert!(id("site_id", &"a".repeat(65)).is_err());
        for bad in ["a b", "a/b", "Jane Doe", "é", "a\n", "a:b"] {
            assert!(id("site_id", bad).is_err(), "{bad:?}");
        }
        assert!(note_id("not-a-uuid").is_err());
        assert!(note_id("").is_err());
        assert!(note_id(&Uuid::new_v4().to_string()).is_ok());
    }

    #[test]
    fn dates() {
        for good in ["2024-02-29", "2000-02-29", "2023-12-31", "0001-01-01"] {
            assert!(date("d", good).is_ok(), "{good}");
        }
        for bad in [
            "2023-02-29",
            "1900-02-29",
            "2023-13-01",
            "2023-00-10",
            "2023-04-31",
            "2023-4-01",
            "20230401",
            "2023-04-01T00",
            "+023-04-01",
            "0000-01-01",
            "",
            "20\u{e9}4-01-1",
            "2024-\u{e9}1-1",
        ] {
            assert!(date("d", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn texts() {
        assert_eq!(text("body", b"hello", 10).unwrap(), "hello");
        assert!(text("body", b"", 10).is_err());
        assert!(text("body", &[b'a'; 11], 10).is_err());
        assert!(text("body", &[0xff, 0xfe], 10).is_err());
        assert!(text("body", "é".as_bytes(), 2).is_ok());
    }

    #[test]
    fn purposes() {
        assert_eq!(
            purpose(PurposeOfUse::BreakGlass as i32).unwrap(),
            "BREAK_GLASS"
        );
        assert!(purpose(0).is_err());
        assert!(purpose(99).is_err());
        assert!(purpose(-1).is_err());
    }

    #[test]
    fn page_tokens() {
        let id = Uuid::new_v4();
        let t = encode_page_token("2024-01-05", id);
        assert_eq!(
            decode_page_token(&t).unwrap(),
            Some(("2024-01-05".to_string(), id))
        );
        assert_eq!(decode_page_token("").unwrap(), None);
        for bad in [
            "garbage",
            "n1.",
            "n1.2024-01-05",
            "n1.2024-13-05.abc",
            "k1.x",
        ] {
            assert!(decode_page_token(bad).is_err(), "{bad}");
        }
        assert_eq!(page_size(0).unwrap(), DEFAULT_PAGE_SIZE);
        assert!(page_size(MAX_PAGE_SIZE + 1).is_err());
    }
}
