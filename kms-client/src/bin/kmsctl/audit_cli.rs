//! kmsctl's `audit` command line: clap definitions of the audit subcommands and the parsing of
//! times given as RFC 3339 or as milliseconds since the epoch.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use time::{format_description::well_known::Rfc3339, OffsetDateTime};

use crate::cli::parse_pair;

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Search the audit log: a table, or one JSON object per line with --json.
    Query(QueryArgs),
    /// Print events as the server commits them, until Ctrl-C (or --count events).
    Tail {
        /// Stop after this many events.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
    },
    /// Export the chain (events and signed checkpoints) for offline verification.
    Export(ExportArgs),
    /// Save the public key that signs the audit checkpoints (PEM).
    PublicKey {
        /// Output file ('-' or absent = stdout).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Verify an export offline (--in and --public-key; no server is contacted), or ask the
    /// server to verify its chain (--server). Prints `OK: ...` or `FAILED at seq N: reason`
    /// and exits with 0 or 1.
    Verify(VerifyArgs),
    /// Accounting of disclosures: every Decrypt and ReEncrypt of one client's data (context
    /// client=<id>), allowed or not, with who, for whom and why.
    Report(ReportArgs),
}

/// A time window; `--to` is exclusive.
#[derive(Debug, Args)]
pub struct TimeRange {
    /// Events at or after TIME (RFC 3339, YYYY-MM-DD = midnight UTC, or ms since the epoch).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub from: Option<i64>,
    /// Events before TIME (exclusive; same forms as --from).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub to: Option<i64>,
}

#[derive(Debug, Args)]
pub struct QueryArgs {
    #[command(flatten)]
    pub range: TimeRange,
    /// Only events about this key (UUID). (`--key` is the client key file.)
    #[arg(long = "key-id", value_name = "KEY_ID")]
    pub key: Option<String>,
    /// Only events of this caller identity (SAN URI or CN).
    #[arg(long, value_name = "ID")]
    pub caller: Option<String>,
    /// Only this operation, e.g. Decrypt, ServerStarted.
    #[arg(long, value_name = "OP")]
    pub operation: Option<String>,
    /// Only this outcome (gRPC code name), e.g. OK, PERMISSION_DENIED.
    #[arg(long, value_name = "CODE")]
    pub outcome: Option<String>,
    /// Only events whose encryption context holds this pair.
    #[arg(long, value_name = "K=V", value_parser = parse_pair)]
    pub context: Option<(String, String)>,
    /// At most this many events (the oldest matching ones).
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub limit: usize,
}

/// Export file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// JSON Lines with events and checkpoints: verifiable with `audit verify`.
    Jsonl,
    /// Events only, for reading; not verifiable.
    Csv,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Output file ('-' = stdout). Created with mode 0600.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
    pub format: ExportFormat,
    /// First seq to export (default: the start of the chain).
    #[arg(long, value_name = "N")]
    pub from_seq: Option<u64>,
    /// Last seq to export, inclusive (default: the current head).
    #[arg(long, value_name = "M")]
    pub to_seq: Option<u64>,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// JSON Lines export to verify offline.
    #[arg(
        long = "in",
        value_name = "FILE",
        required_unless_present = "server",
        requires = "public_key"
    )]
    pub input: Option<PathBuf>,
    /// The checkpoint-signing public key (PEM, or a SEC1 point raw or in hex).
    #[arg(long, value_name = "FILE", requires = "input")]
    pub public_key: Option<PathBuf>,
    /// Ask the server to verify its whole chain instead (VerifyAuditLog).
    #[arg(long, conflicts_with_all = ["input", "public_key"])]
    pub server: bool,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The client id (the `client` value of the encryption context).
    #[arg(long, value_name = "ID")]
    pub client: String,
    #[command(flatten)]
    pub range: TimeRange,
    /// Print CSV (RFC 4180) instead of a table.
    #[arg(long)]
    pub csv: bool,
}

/// Parses a time: digits = ms since the Unix epoch; RFC 3339 (`2024-03-01T09:30:00Z`, any
/// offset); or a date `YYYY-MM-DD` = midnight UTC.
pub fn parse_time(s: &str) -> Result<i64, String> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse()
            .map_err(|_| format!("{s:?}: too large for milliseconds since the epoch"));
    }
    let full = if s.len() == 10 {
        format!("{s}T00:00:00Z")
    } else {
        s.to_string()
    };
    let t = OffsetDateTime::parse(&full, &Rfc3339).map_err(|e| {
        format!("{s:?}: expected RFC 3339 (2024-03-01T09:30:00Z), YYYY-MM-DD or ms ({e})")
    })?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).map_err(|_| format!("{s:?}: out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<AuditCommand, clap::Error> {
        let cli = Cli::try_parse_from(["kmsctl", "audit"].iter().chain(args).copied())?;
        match cli.command {
            Command::Audit(command) => Ok(command),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn verify_is_offline_or_server_never_both() {
        let Ok(AuditCommand::Verify(v)) = parse(&["verify", "--in", "e", "--public-key", "k"])
        else {
            panic!("not verify");
        };
        assert!(!v.server && v.input.is_some() && v.public_key.is_some());
        assert!(matches!(parse(&["verify", "--server"]), Ok(AuditCommand::Verify(v)) if v.server));
        assert!(parse(&["verify"]).is_err());
        assert!(parse(&["verify", "--in", "e"]).is_err());
        assert!(parse(&["verify", "--public-key", "k"]).is_err());
        assert!(parse(&["verify", "--server", "--in", "e", "--public-key", "k"]).is_err());
    }

    #[test]
    fn query_filters_and_export_defaults() {
        let Ok(AuditCommand::Query(q)) = parse(&[
            "query",
            "--key-id",
            "k1",
            "--context",
            "client=c-1",
            "--from",
            "1970-01-02",
            "--outcome",
            "OK",
        ]) else {
            panic!("not query");
        };
        assert_eq!(q.key.as_deref(), Some("k1"));
        assert_eq!(q.context, Some(("client".into(), "c-1".into())));
        assert_eq!(
            (q.range.from, q.range.to, q.limit),
            (Some(86_400_000), None, 100)
        );
        assert!(parse(&["query", "--from", "soon"]).is_err());
        let Ok(AuditCommand::Export(e)) = parse(&["export", "--out", "f"]) else {
            panic!("not export");
        };
        assert_eq!(
            (e.format, e.from_seq, e.to_seq),
            (ExportFormat::Jsonl, None, None)
        );
        assert!(parse(&["export"]).is_err());
        assert!(parse(&["report"]).is_err(), "--client is required");
    }

    #[test]
    fn times_parse() {
        assert_eq!(parse_time("1700000000123"), Ok(1_700_000_000_123));
        assert_eq!(
            parse_time("2023-11-14T22:13:20.123Z"),
            Ok(1_700_000_000_123)
        );
        assert_eq!(
            parse_time("2023-11-14T23:13:20.123+01:00"),
            Ok(1_700_000_000_123)
        );
        assert_eq!(parse_time("1970-01-02"), Ok(86_400_000));
        assert!(parse_time("yesterday").is_err());
        assert!(parse_time("2023-13-01").is_err());
        assert!(parse_time("99999999999999999999").is_err());
    }
}
