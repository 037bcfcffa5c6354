//! kmsctl's `audit` commands: query, tail, export, public-key and verify (offline, or by the
//! server). The accounting of disclosures (`audit report`) is in `disclosures.rs`.

use std::{
    fs::{File, OpenOptions},
    io::{BufWriter, Write},
    path::Path,
};

use anyhow::{anyhow, bail, Context};
use futures::StreamExt;
use kms_client::{
    kms_audit::{self, AuditError, AuditEvent, ExportRecord, VerifyingKeyInput},
    AuditClient, AuditFilter,
};
use serde_json::{json, Value};

use crate::{
    audit_cli::{AuditCommand, ExportArgs, ExportFormat, QueryArgs, VerifyArgs},
    disclosures,
    output::{or_dash, table, timestamp_ms, Report},
};

/// Columns of `audit query` and `audit tail`.
const EVENT_COLUMNS: [&str; 10] = [
    "SEQ",
    "TIME",
    "CALLER",
    "OPERATION",
    "KEY",
    "VER",
    "OUTCOME",
    "ACTING_USER",
    "PURPOSE",
    "CONTEXT",
];

/// Runs an audit command that needs the server.
pub async fn run(
    audit: &AuditClient,
    command: &AuditCommand,
    as_json: bool,
) -> anyhow::Result<Report> {
    match command {
        AuditCommand::Query(args) => query(audit, args, as_json).await,
        AuditCommand::Tail { count } => tail(audit, *count, as_json).await,
        AuditCommand::Export(args) => export(audit, args).await,
        AuditCommand::PublicKey { out } => public_key(audit, out.as_deref()).await,
        AuditCommand::Verify(args) if args.server => {
            let r = audit.verify_audit_log().await?;
            let text = if as_json {
                format!(
                    "{}\n",
                    json!({
                        "ok": r.ok,
                        "report": r.report,
                        "events_checked": r.events_checked,
                        "checkpoints_checked": r.checkpoints_checked,
                        "covered_through_seq": r.covered_through_seq,
                        "first_bad_seq": r.first_bad_seq,
                        "reason": r.reason,
                    })
                )
            } else {
                format!("{}\n", r.report)
            };
            Ok(Report::Rendered {
                text,
                success: r.ok,
            })
        }
        AuditCommand::Verify(args) => verify_offline(args, as_json),
        AuditCommand::Report(args) => disclosures::report(audit, args, as_json).await,
    }
}

/// The cells of one event in [`EVENT_COLUMNS`] order.
fn event_row(e: &AuditEvent) -> Vec<String> {
    let context = e
        .context
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    vec![
        e.seq.to_string(),
        timestamp_ms(e.time_ms),
        or_dash(&e.caller),
        e.operation.clone(),
        or_dash(e.key_id.as_deref().unwrap_or_default()),
        e.key_version.map_or_else(|| "-".into(), |v| v.to_string()),
        e.outcome.clone(),
        or_dash(&e.acting_user),
        or_dash(&e.purpose),
        or_dash(&context),
    ]
}

/// One event as a JSON line (all fields, as in an export).
fn event_json(e: &AuditEvent) -> anyhow::Result<String> {
    Ok(format!("{}\n", serde_json::to_string(e)?))
}

async fn query(audit: &AuditClient, args: &QueryArgs, as_json: bool) -> anyhow::Result<Report> {
    if args.limit == 0 {
        bail!("--limit must be at least 1");
    }
    let filter = AuditFilter {
        from_time_ms: args.range.from,
        to_time_ms: args.range.to,
        key_id: args.key.clone(),
        caller: args.caller.clone(),
        operation: args.operation.clone(),
        outcome: args.outcome.clone(),
        context: args.context.clone(),
    };
    // One more than asked, to tell whether the limit cut the result short.
    let mut events = audit
        .query_all_audit_events(&filter, Some(args.limit.saturating_add(1)))
        .await?;
    if events.len() > args.limit {
        events.truncate(args.limit);
        eprintln!(
            "note: more than {} events match; narrow the filter or raise --limit",
            args.limit
        );
    }
    let text = if as_json {
        events
            .iter()
            .map(event_json)
            .collect::<anyhow::Result<String>>()?
    } else {
        let rows: Vec<Vec<String>> = events.iter().map(event_row).collect();
        table(&EVENT_COLUMNS, &rows)
    };
    Ok(Report::Rendered {
        text,
        success: true,
    })
}

async fn tail(audit: &AuditClient, count: Option<u64>, as_json: bool) -> anyhow::Result<Report> {
    let mut stream = audit.stream_audit_events().await?;
    let mut stdout = std::io::stdout();
    if !as_json {
        write_line(&mut stdout, &format!("{}\n", EVENT_COLUMNS.join("  ")))?;
    }
    let mut seen = 0u64;
    while count.is_none_or(|n| seen < n) {
        let item = tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            item = stream.next() => item,
        };
        let event = match item {
            Some(event) => event?,
            None => bail!("the server ended the live tail"),
        };
        let line = if as_json {
            event_json(&event)?
        } else {
            format!("{}\n", event_row(&event).join("  "))
        };
        if !write_line(&mut stdout, &line)? {
            break;
        }
        seen += 1;
    }
    Ok(Report::Rendered {
        text: String::new(),
        success: true,
    })
}

/// Writes and flushes one line. `Ok(false)` when the reader went away (broken pipe).
fn write_line(out: &mut impl Write, line: &str) -> anyhow::Result<bool> {
    match out.write_all(line.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(anyhow!("cannot write the output: {e}")),
    }
}

/// Creates (or truncates) `path`; a new file gets mode 0600 (the log names callers and ids).
fn create_private(path: &Path) -> anyhow::Result<BufWriter<File>> {
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let file = options
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    Ok(BufWriter::new(file))
}

fn is_stdout(path: &Path) -> bool {
    path == Path::new("-")
}

async fn export(audit: &AuditClient, args: &ExportArgs) -> anyhow::Result<Report> {
    let (from, to) = (args.from_seq.unwrap_or(0), args.to_seq.unwrap_or(0));
    if to > 0 && from > to {
        bail!("--from-seq {from} is after --to-seq {to}");
    }
    let records = audit.export_audit_log(from, to).await?;
    let events: Vec<&AuditEvent> = records.iter().filter_map(ExportRecord::as_event).collect();
    let checkpoints = records.len() - events.len();
    let write = |out: &mut dyn Write| -> anyhow::Result<()> {
        match args.format {
            ExportFormat::Jsonl => kms_audit::write_jsonl(&mut *out, &records)?,
            ExportFormat::Csv => kms_audit::write_csv(&mut *out, events.iter().copied())?,
        }
        Ok(out.flush()?)
    };
    if is_stdout(&args.out) {
        write(&mut std::io::stdout().lock())?;
        return Ok(Report::Rendered {
            text: String::new(),
            success: true,
        });
    }
    let mut file = create_private(&args.out)?;
    write(&mut file).with_context(|| format!("cannot write {}", args.out.display()))?;
    let covered = records
        .iter()
        .filter_map(ExportRecord::as_checkpoint)
        .map(|c| c.seq)
        .max();
    Ok(Report::Fields(vec![
        ("out", json!(args.out.display().to_string())),
        ("format", json!(format!("{:?}", args.format).to_lowercase())),
        ("events", json!(events.len())),
        ("checkpoints", json!(checkpoints)),
        ("first_seq", json!(events.first().map(|e| e.seq))),
        ("last_seq", json!(events.last().map(|e| e.seq))),
        ("covered_through_seq", json!(covered)),
    ]))
}

async fn public_key(audit: &AuditClient, out: Option<&Path>) -> anyhow::Result<Report> {
    let key = audit.audit_public_key().await?;
    let pem = if key.public_key_pem.ends_with('\n') {
        key.public_key_pem.clone()
    } else {
        format!("{}\n", key.public_key_pem)
    };
    match out.filter(|p| !is_stdout(p)) {
        None => Ok(Report::Rendered {
            text: pem,
            success: true,
        }),
        Some(path) => {
            std::fs::write(path, &pem)
                .with_context(|| format!("cannot write {}", path.display()))?;
            Ok(Report::Fields(vec![
                ("out", json!(path.display().to_string())),
                ("algorithm", json!(key.algorithm)),
                ("fingerprint", json!(key.fingerprint)),
            ]))
        }
    }
}

/// `audit verify --in FILE --public-key FILE`: reads both files, never the network.
pub fn verify_offline(args: &VerifyArgs, as_json: bool) -> anyhow::Result<Report> {
    let (Some(input), Some(key_path)) = (&args.input, &args.public_key) else {
        bail!("give --in FILE and --public-key FILE (or --server)");
    };
    let key_bytes =
        std::fs::read(key_path).with_context(|| format!("cannot read {}", key_path.display()))?;
    let key = VerifyingKeyInput::parse(&key_bytes)
        .with_context(|| format!("{} holds no usable public key", key_path.display()))?;
    let text = std::fs::read_to_string(input)
        .with_context(|| format!("cannot read {}", input.display()))?;
    let verdict = match kms_audit::read_jsonl(text.as_bytes()) {
        Ok(records) => {
            let r = kms_audit::verify(&records, &key);
            let fields = json!({
                "ok": r.ok,
                "report": r.to_string(),
                "events_checked": r.events_checked,
                "checkpoints_checked": r.checkpoints_checked,
                "covered_through_seq": r.covered_through_seq,
                "uncovered_tail": r.uncovered_tail,
                "first_bad_seq": r.first_bad_seq,
                "reason": r.reason,
                "node_id": r.node_id,
                "first_seq": r.first_seq,
                "from_genesis": r.from_genesis,
                "public_key_fingerprint": key.fingerprint(),
            });
            (r.ok, r.to_string(), fields)
        }
        // A line that no longer parses is tampering too: name its seq if it still shows one.
        Err(AuditError::Json { line, source }) => {
            let seq = text
                .lines()
                .nth(line.saturating_sub(1))
                .and_then(|l| serde_json::from_str::<Value>(l).ok())
                .and_then(|v| v.get("seq").and_then(Value::as_u64));
            let reason = format!("line {line} is not a valid audit record: {source}");
            let report = match seq {
                Some(seq) => format!("FAILED at seq {seq}: {reason}"),
                None => format!("FAILED: {reason}"),
            };
            let fields = json!({
                "ok": false,
                "report": report,
                "first_bad_seq": seq,
                "reason": reason,
                "public_key_fingerprint": key.fingerprint(),
            });
            (false, report, fields)
        }
        Err(e) => return Err(anyhow!(e).context(format!("cannot read {}", input.display()))),
    };
    let (ok, line, fields) = verdict;
    let text = if as_json {
        format!("{fields}\n")
    } else {
        format!("{line}\n")
    };
    Ok(Report::Rendered { text, success: ok })
}
