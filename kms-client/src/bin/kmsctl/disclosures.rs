//! `kmsctl audit report --client <id>`: an accounting of disclosures of one client's data.
//!
//! It lists every `Decrypt` and `ReEncrypt` whose encryption context has `client = <id>`, in
//! chain order: when (UTC), which service identity asked, for which user and purpose, how it
//! ended, under which key version, and the note id from the context. Refused and failed
//! attempts are listed too and marked in `RESULT`: `allowed` (OK), `DENIED` (the KMS refused:
//! no permission, wrong context or blob, disabled or unknown key) or `FAILED` (the KMS could
//! not answer: unavailable, internal error…).
//! Forms: a table under header lines (client, period, counts), one JSON object (`--json`),
//! or RFC 4180 CSV with a header row (`--csv`).

use anyhow::bail;
use kms_client::{kms_audit::AuditEvent, AuditClient, AuditFilter};
use serde_json::{json, Value};

use crate::{
    audit_cli::ReportArgs,
    output::{or_dash, table, timestamp_ms, Report},
};

/// The operations that unwrap a client's data key.
const OPERATIONS: [&str; 2] = ["Decrypt", "ReEncrypt"];

/// Columns of the table and of the CSV (the CSV has `seq` and `time_ms` too).
const COLUMNS: [&str; 10] = [
    "TIME (UTC)",
    "CALLER",
    "OPERATION",
    "ACTING_USER",
    "PURPOSE",
    "OUTCOME",
    "RESULT",
    "KEY",
    "VER",
    "NOTE",
];

/// How an attempt ended, for the RESULT column.
fn result(outcome: &str) -> &'static str {
    match outcome {
        "OK" => "allowed",
        "PERMISSION_DENIED"
        | "UNAUTHENTICATED"
        | "INVALID_ARGUMENT"
        | "FAILED_PRECONDITION"
        | "NOT_FOUND" => "DENIED",
        _ => "FAILED",
    }
}

/// The note id of the context (`note`, or `note_id`).
fn note_id(e: &AuditEvent) -> &str {
    e.context
        .get("note")
        .or_else(|| e.context.get("note_id"))
        .map_or("", String::as_str)
}

pub async fn report(
    audit: &AuditClient,
    args: &ReportArgs,
    as_json: bool,
) -> anyhow::Result<Report> {
    if args.csv && as_json {
        bail!("give --json or --csv, not both");
    }
    if args.client.is_empty() {
        bail!("--client must not be empty");
    }
    let mut events = Vec::new();
    for operation in OPERATIONS {
        let filter = AuditFilter {
            from_time_ms: args.range.from,
            to_time_ms: args.range.to,
            operation: Some(operation.into()),
            context: Some(("client".into(), args.client.clone())),
            ..AuditFilter::default()
        };
        events.extend(audit.query_all_audit_events(&filter, None).await?);
    }
    events.sort_by(|a, b| (&a.node_id, a.seq).cmp(&(&b.node_id, b.seq)));
    let text = if as_json {
        format!("{}\n", to_json(args, &events))
    } else if args.csv {
        to_csv(&events)
    } else {
        to_text(args, &events)
    };
    Ok(Report::Rendered {
        text,
        success: true,
    })
}

fn period(args: &ReportArgs) -> String {
    match (args.range.from, args.range.to) {
        (None, None) => "all recorded events".into(),
        (Some(f), None) => format!("from {} (inclusive)", timestamp_ms(f)),
        (None, Some(t)) => format!("before {}", timestamp_ms(t)),
        (Some(f), Some(t)) => format!(
            "from {} to {} (exclusive)",
            timestamp_ms(f),
            timestamp_ms(t)
        ),
    }
}

fn counts(events: &[AuditEvent]) -> (usize, usize, usize) {
    let of = |r: &str| events.iter().filter(|e| result(&e.outcome) == r).count();
    (of("allowed"), of("DENIED"), of("FAILED"))
}

fn row(e: &AuditEvent) -> Vec<String> {
    vec![
        timestamp_ms(e.time_ms),
        or_dash(&e.caller),
        e.operation.clone(),
        or_dash(&e.acting_user),
        or_dash(&e.purpose),
        e.outcome.clone(),
        result(&e.outcome).to_string(),
        or_dash(e.key_id.as_deref().unwrap_or_default()),
        e.key_version.map_or_else(|| "-".into(), |v| v.to_string()),
        or_dash(note_id(e)),
    ]
}

fn to_text(args: &ReportArgs, events: &[AuditEvent]) -> String {
    let (allowed, denied, failed) = counts(events);
    let mut out = format!(
        "Accounting of disclosures for client {}\nPeriod: {}\nAccesses: {} ({allowed} allowed, \
         {denied} denied, {failed} failed)\n\n",
        args.client,
        period(args),
        events.len(),
    );
    if events.is_empty() {
        out.push_str("No Decrypt or ReEncrypt of this client's data in the period.\n");
    } else {
        let rows: Vec<Vec<String>> = events.iter().map(row).collect();
        out.push_str(&table(&COLUMNS, &rows));
    }
    out
}

fn to_json(args: &ReportArgs, events: &[AuditEvent]) -> Value {
    let (allowed, denied, failed) = counts(events);
    let entries: Vec<Value> = events
        .iter()
        .map(|e| {
            json!({
                "seq": e.seq,
                "node_id": e.node_id,
                "time": timestamp_ms(e.time_ms),
                "time_ms": e.time_ms,
                "caller": e.caller,
                "operation": e.operation,
                "acting_user": e.acting_user,
                "purpose": e.purpose,
                "outcome": e.outcome,
                "result": result(&e.outcome),
                "key_id": e.key_id,
                "key_version": e.key_version,
                "note_id": (!note_id(e).is_empty()).then(|| note_id(e)),
                "context": e.context,
                "request_id": e.request_id,
            })
        })
        .collect();
    json!({
        "client": args.client,
        "period": period(args),
        "from": args.range.from.map(timestamp_ms),
        "to": args.range.to.map(timestamp_ms),
        "count": events.len(),
        "allowed": allowed,
        "denied": denied,
        "failed": failed,
        "entries": entries,
    })
}

/// RFC 4180: CRLF line ends; a cell holding `,` `"` CR or LF is quoted with `"` doubled; a
/// cell a spreadsheet would run as a formula gets a leading `'`.
fn csv_cell(text: &str) -> String {
    let text = if text.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{text}")
    } else {
        text.to_string()
    };
    if text.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text
    }
}

fn to_csv(events: &[AuditEvent]) -> String {
    let header = [
        "seq",
        "time_ms",
        "time_utc",
        "caller",
        "operation",
        "acting_user",
        "purpose",
        "outcome",
        "result",
        "key_id",
        "key_version",
        "note_id",
    ];
    let mut out = format!("{}\r\n", header.join(","));
    for e in events {
        let cells = [
            e.seq.to_string(),
            e.time_ms.to_string(),
            timestamp_ms(e.time_ms),
            csv_cell(&e.caller),
            csv_cell(&e.operation),
            csv_cell(&e.acting_user),
            csv_cell(&e.purpose),
            csv_cell(&e.outcome),
            result(&e.outcome).to_string(),
            csv_cell(e.key_id.as_deref().unwrap_or_default()),
            e.key_version.map(|v| v.to_string()).unwrap_or_default(),
            csv_cell(note_id(e)),
        ];
        out.push_str(&cells.join(","));
        out.push_str("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_and_cells() {
        assert_eq!(result("OK"), "allowed");
        assert_eq!(result("PERMISSION_DENIED"), "DENIED");
        assert_eq!(result("INVALID_ARGUMENT"), "DENIED");
        assert_eq!(result("UNAVAILABLE"), "FAILED");
        assert_eq!(csv_cell("plain"), "plain");
        assert_eq!(csv_cell("a,b"), "\"a,b\"");
        assert_eq!(csv_cell("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_cell("=SUM(A1)"), "'=SUM(A1)");
    }
}
