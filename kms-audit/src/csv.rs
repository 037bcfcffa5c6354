//! CSV export of events, for people and spreadsheets.
//!
//! **Not verifiable**: checkpoints are left out, and cells are rewritten for safe display
//! (see below), so a CSV file cannot be checked against the chain. Verify the JSON Lines export
//! and use the CSV only to read it.
//!
//! Format: RFC 4180, CRLF line ends, a header row, one row per event. A cell is quoted when it
//! holds `,` `"` CR or LF, with `"` doubled. Text cells that a spreadsheet would run as a formula
//! (starting with `=` `+` `-` `@` TAB or CR) get a leading `'`. `context` is written as
//! `k=v;k=v` in key order, with `\` `;` and `=` inside keys and values escaped as `\\` `\;` `\=`.
//! `time_utc` is `time_ms` as `YYYY-MM-DDTHH:MM:SS.mmmZ`.

use std::collections::BTreeMap;
use std::io::Write;

use crate::error::AuditError;
use crate::event::AuditEvent;

/// The header row, in column order.
pub const CSV_COLUMNS: [&str; 19] = [
    "seq",
    "time_ms",
    "time_utc",
    "node_id",
    "request_id",
    "caller",
    "caller_fingerprint",
    "role",
    "operation",
    "key_id",
    "key_version",
    "context",
    "acting_user",
    "purpose",
    "outcome",
    "latency_us",
    "detail",
    "prev_hash",
    "hash",
];

/// Writes `events` as CSV (header row first).
///
/// # Errors
/// [`AuditError::Io`].
pub fn write_csv<'a, W, I>(mut writer: W, events: I) -> Result<(), AuditError>
where
    W: Write,
    I: IntoIterator<Item = &'a AuditEvent>,
{
    writer.write_all(CSV_COLUMNS.join(",").as_bytes())?;
    writer.write_all(b"\r\n")?;
    for e in events {
        let row: [String; 19] = [
            e.seq.to_string(),
            e.time_ms.to_string(),
            format_utc_ms(e.time_ms),
            text(&e.node_id),
            text(&e.request_id),
            text(&e.caller),
            text(&e.caller_fingerprint),
            text(&e.role),
            text(&e.operation),
            e.key_id.as_deref().map(text).unwrap_or_default(),
            e.key_version.map(|v| v.to_string()).unwrap_or_default(),
            text(&context_cell(&e.context)),
            text(&e.acting_user),
            text(&e.purpose),
            text(&e.outcome),
            e.latency_us.to_string(),
            text(&e.detail),
            text(&e.prev_hash),
            text(&e.hash),
        ];
        writer.write_all(row.join(",").as_bytes())?;
        writer.write_all(b"\r\n")?;
    }
    writer.flush()?;
    Ok(())
}

/// A text cell: formula-neutralised, then quoted if needed.
fn text(s: &str) -> String {
    let neutral = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    if neutral.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", neutral.replace('"', "\"\""))
    } else {
        neutral
    }
}

/// `k=v;k=v` with `\`, `;` and `=` escaped by a backslash.
fn context_cell(context: &BTreeMap<String, String>) -> String {
    fn esc(s: &str, out: &mut String) {
        for ch in s.chars() {
            if matches!(ch, '\\' | ';' | '=') {
                out.push('\\');
            }
            out.push(ch);
        }
    }
    let mut out = String::new();
    for (i, (k, v)) in context.iter().enumerate() {
        if i > 0 {
            out.push(';');
        }
        esc(k, &mut out);
        out.push('=');
        esc(v, &mut out);
    }
    out
}

/// Milliseconds since the Unix epoch as ISO 8601 UTC (proleptic Gregorian calendar).
fn format_utc_ms(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let ms_of_day = ms.rem_euclid(86_400_000);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        ms_of_day / 3_600_000,
        ms_of_day / 60_000 % 60,
        ms_of_day / 1000 % 60,
        ms_of_day % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formatting() {
        assert_eq!(format_utc_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_utc_ms(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(format_utc_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(format_utc_ms(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn cells_are_escaped() {
        assert_eq!(text("plain"), "plain");
        assert_eq!(text("a,b"), "\"a,b\"");
        assert_eq!(text("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(text("line\nbreak"), "\"line\nbreak\"");
        assert_eq!(text("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(text("-1"), "'-1");
        let mut m = BTreeMap::new();
        m.insert("a;b".to_owned(), "x=y\\z".to_owned());
        m.insert("c".to_owned(), "d".to_owned());
        assert_eq!(context_cell(&m), "a\\;b=x\\=y\\\\z;c=d");
    }
}
