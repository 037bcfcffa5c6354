//! kmsctl's output: a command yields a `Report` (ordered fields, a key table, or text it
//! rendered itself), printed either as aligned text or as JSON.

use base64::{engine::general_purpose::STANDARD, Engine};
use kms_client::{KeyMetadata, KeyVersion};
use serde_json::{json, Map, Value};
use time::{
    format_description::{well_known::Rfc3339, BorrowedFormatItem},
    macros::format_description,
    OffsetDateTime,
};

/// What a command has to say.
pub enum Report {
    /// `key: value` lines / a JSON object with these members, in this order.
    Fields(Vec<(&'static str, Value)>),
    /// A table of keys / `{"keys": [...]}`.
    Keys(Vec<KeyMetadata>),
    /// A table of a key's versions / `{"versions": [...]}`.
    Versions(Vec<KeyVersion>),
    /// Text the command rendered itself (in the form `--json` asked for), and whether the
    /// command succeeded: a failed verification prints its verdict and exits with 1.
    Rendered { text: String, success: bool },
}

impl Report {
    /// The text to print on stdout (ends with a newline).
    pub fn render(&self, as_json: bool) -> String {
        match (self, as_json) {
            (Report::Fields(fields), true) => {
                let object: Map<String, Value> = fields
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect();
                format!("{}\n", Value::Object(object))
            }
            (Report::Fields(fields), false) => render_fields(fields),
            (Report::Keys(keys), true) => {
                let keys: Vec<Value> = keys.iter().map(key_json).collect();
                format!("{}\n", json!({ "keys": keys }))
            }
            (Report::Keys(keys), false) => render_table(keys),
            (Report::Versions(versions), true) => {
                let rows: Vec<Value> = versions.iter().map(version_json).collect();
                format!("{}\n", json!({ "versions": rows }))
            }
            (Report::Versions(versions), false) => render_versions(versions),
            (Report::Rendered { text, .. }, _) => text.clone(),
        }
    }

    /// False when kmsctl must exit with 1 after printing the report.
    pub fn success(&self) -> bool {
        match self {
            Report::Rendered { success, .. } => *success,
            Report::Fields(_) | Report::Keys(_) | Report::Versions(_) => true,
        }
    }
}

/// Standard base64, as every blob is printed.
pub fn b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// Parses a base64 blob given on the command line.
pub fn from_b64(what: &str, text: &str) -> anyhow::Result<Vec<u8>> {
    STANDARD
        .decode(text.trim())
        .map_err(|e| anyhow::anyhow!("{what} is not valid base64: {e}"))
}

/// The fields of a key, for `key create/describe/enable/disable`.
pub fn key_fields(key: &KeyMetadata) -> Vec<(&'static str, Value)> {
    vec![
        ("key_id", json!(key.key_id)),
        ("alias", json!(key.alias)),
        ("description", json!(key.description)),
        ("state", json!(key.state.as_str())),
        ("primary_version", json!(key.primary_version)),
        ("created_at", json!(timestamp(key.created_at_unix_ms))),
        ("created_at_unix_ms", json!(key.created_at_unix_ms)),
        ("backend", json!(key.backend)),
        (
            "rotation_period_seconds",
            json!(key.rotation_period_seconds),
        ),
        (
            "next_rotation_at",
            json!((key.next_rotation_at_unix_ms != 0)
                .then(|| timestamp(key.next_rotation_at_unix_ms))),
        ),
        ("min_decryption_version", json!(key.min_decryption_version)),
        (
            "deletion_at",
            json!((key.deletion_at_unix_ms != 0).then(|| timestamp(key.deletion_at_unix_ms))),
        ),
    ]
}

fn key_json(key: &KeyMetadata) -> Value {
    Value::Object(
        key_fields(key)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    )
}

fn version_json(v: &KeyVersion) -> Value {
    json!({
        "version": v.version,
        "state": v.state.as_str(),
        "primary": v.primary,
        "created_at": timestamp(v.created_at_unix_ms),
    })
}

/// `VERSION  STATE  PRIMARY  CREATED_AT`, one line per version.
fn render_versions(versions: &[KeyVersion]) -> String {
    let mut out = format!(
        "{:<8} {:<10} {:<8} {}\n",
        "VERSION", "STATE", "PRIMARY", "CREATED_AT"
    );
    for v in versions {
        out.push_str(&format!(
            "{:<8} {:<10} {:<8} {}\n",
            v.version,
            v.state.as_str(),
            if v.primary { "yes" } else { "" },
            timestamp(v.created_at_unix_ms)
        ));
    }
    out
}

/// RFC 3339 UTC, or the raw number if out of range.
pub fn timestamp(unix_ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| unix_ms.to_string())
}

/// RFC 3339 UTC with exactly three fraction digits (`2023-11-14T22:13:20.120Z`), so that
/// audit times line up; the raw number if out of range.
pub fn timestamp_ms(unix_ms: i64) -> String {
    const FORMAT: &[BorrowedFormatItem<'_>] =
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(FORMAT).ok())
        .unwrap_or_else(|| unix_ms.to_string())
}

/// A JSON value as a table cell: strings bare, null and "" as "-", arrays one per line.
fn cell(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(items) if items.is_empty() => "-".into(),
        Value::Array(items) => items.iter().map(cell).collect::<Vec<_>>().join(", "),
        other => other.to_string(),
    }
}

fn render_fields(fields: &[(&'static str, Value)]) -> String {
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    fields
        .iter()
        .map(|(k, v)| format!("{:<width$} {}\n", format!("{k}:"), cell(v)))
        .collect()
}

fn render_table(keys: &[KeyMetadata]) -> String {
    let header = ["KEY_ID", "ALIAS", "STATE", "VERSION", "BACKEND", "CREATED"];
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            vec![
                k.key_id.clone(),
                k.alias.clone().unwrap_or_else(|| "-".into()),
                k.state.to_string(),
                k.primary_version.to_string(),
                k.backend.clone(),
                timestamp(k.created_at_unix_ms),
            ]
        })
        .collect();
    table(&header, &rows)
}

/// An aligned text table: the header, then one line per row; columns two spaces apart,
/// trailing blanks trimmed. Empty cells should be given as "-".
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let text: Vec<String> = cells
            .zip(&widths)
            .map(|(c, &w)| format!("{c:<w$}"))
            .collect();
        format!("{}\n", text.join("  ").trim_end())
    };
    let mut out = line(&mut header.iter().copied());
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

/// A table cell for optional text: the text, or "-" when empty.
pub fn or_dash(text: &str) -> String {
    if text.is_empty() {
        "-".into()
    } else {
        text.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kms_client::KeyState;

    fn key(alias: Option<&str>) -> KeyMetadata {
        KeyMetadata {
            key_id: "0b9e6a4e-0000-4000-8000-000000000001".into(),
            alias: alias.map(String::from),
            description: String::new(),
            state: KeyState::Enabled,
            primary_version: 1,
            created_at_unix_ms: 1_700_000_000_123,
            backend: "pkcs11".into(),
            rotation_period_seconds: 0,
            next_rotation_at_unix_ms: 0,
            min_decryption_version: 1,
            deletion_at_unix_ms: 0,
        }
    }

    #[test]
    fn fields_align_and_json_is_one_object() {
        let report = Report::Fields(vec![("key_id", json!("k")), ("key_version", json!(2))]);
        assert_eq!(report.render(false), "key_id:      k\nkey_version: 2\n");
        let text = report.render(true);
        assert_eq!(text.lines().count(), 1);
        let parsed: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed["key_version"], 2);
    }

    #[test]
    fn key_table_and_json() {
        let report = Report::Keys(vec![key(Some("notes")), key(None)]);
        let text = report.render(false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("KEY_ID"));
        assert_eq!(lines[0].find("ALIAS"), lines[1].find("notes"));
        assert!(lines[2].contains("  -  "));
        let parsed: Value = serde_json::from_str(&report.render(true)).unwrap();
        assert_eq!(parsed["keys"][0]["alias"], "notes");
        assert_eq!(parsed["keys"][1]["alias"], Value::Null);
        assert_eq!(parsed["keys"][0]["created_at"], "2023-11-14T22:13:20.123Z");
    }

    #[test]
    fn audit_times_have_three_fraction_digits() {
        assert_eq!(timestamp_ms(1_700_000_000_120), "2023-11-14T22:13:20.120Z");
        assert_eq!(timestamp_ms(1_700_000_000_000), "2023-11-14T22:13:20.000Z");
        assert_eq!(timestamp_ms(i64::MAX), i64::MAX.to_string());
    }

    #[test]
    fn base64_round_trip() {
        assert_eq!(b64(b"\x00\xff"), "AP8=");
        assert_eq!(from_b64("blob", " AP8=\n").unwrap(), b"\x00\xff");
        assert!(from_b64("blob", "***").is_err());
    }
}
