//! notesctl: a small command-line client of notes-store (`notes.v1.NotesService` over mutual
//! TLS), for the demo and for poking at a dev instance by hand. One command per run; prints
//! `key: value` lines (or one JSON object with --json). On failure prints
//! `error: <GRPC_CODE>: <message>` on stderr and exits with 1, like kmsctl.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kms_proto::notes::v1 as pb;
use kms_proto::notes::v1::notes_service_client::NotesServiceClient;
use serde_json::{json, Value};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Command-line client of notes-store (notes.v1 over mutual TLS).
#[derive(Debug, Parser)]
#[command(name = "notesctl", version)]
struct Cli {
    /// notes-store endpoint.
    #[arg(
        long,
        env = "NOTESCTL_ENDPOINT",
        default_value = "https://localhost:7543",
        global = true
    )]
    endpoint: String,
    /// CA certificate (PEM) that signs the server certificate.
    #[arg(long, value_name = "FILE", env = "NOTESCTL_CA", global = true)]
    ca: Option<PathBuf>,
    /// Client certificate (PEM): the calling practice application.
    #[arg(long, value_name = "FILE", env = "NOTESCTL_CERT", global = true)]
    cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, value_name = "FILE", env = "NOTESCTL_KEY", global = true)]
    key: Option<PathBuf>,
    /// TLS server name to verify.
    #[arg(
        long,
        env = "NOTESCTL_SERVER_NAME",
        default_value = "localhost",
        global = true
    )]
    server_name: String,
    /// Deadline of the call, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 15000, global = true)]
    timeout_ms: u64,
    /// Print one JSON object instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Store a new note; prints its id and revision.
    CreateNote {
        #[arg(long)]
        site: String,
        #[arg(long)]
        client: String,
        #[arg(long)]
        author: String,
        /// YYYY-MM-DD.
        #[arg(long)]
        session_date: String,
        /// Note text (UTF-8).
        #[arg(long)]
        body: String,
    },
    /// Read a note (its current revision unless --revision); prints metadata and body.
    GetNote {
        note_id: String,
        /// Who reads (recorded in the KMS audit log).
        #[arg(long)]
        acting_user: String,
        /// TREATMENT, SUPERVISION, CLIENT_REQUEST, LEGAL or BREAK_GLASS.
        #[arg(long, default_value = "TREATMENT")]
        purpose: String,
        /// 0 = the current revision.
        #[arg(long, default_value_t = 0)]
        revision: u32,
    },
    /// One client's notes (metadata only, no KMS call).
    ListNotes {
        #[arg(long)]
        site: String,
        #[arg(long)]
        client: String,
        #[arg(long, default_value_t = 100)]
        page_size: u32,
    },
    /// Add a revision to a note.
    AmendNote {
        note_id: String,
        #[arg(long)]
        body: String,
        /// The revision being amended (optimistic concurrency).
        #[arg(long)]
        expected_revision: u32,
        #[arg(long)]
        reason: String,
        #[arg(long)]
        author: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(&anyhow::anyhow!("cannot start the async runtime: {e}")),
    };
    match runtime.block_on(run(&cli)) {
        Ok(fields) => {
            println!("{}", render(&fields, cli.json));
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

fn fail(err: &anyhow::Error) -> ExitCode {
    let text = match err.downcast_ref::<tonic::Status>() {
        Some(s) => format!("{}: {}", kms_client::code_name(s.code()), s.message()),
        None => format!("{err:#}"),
    };
    eprintln!(
        "error: {}",
        text.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    ExitCode::FAILURE
}

async fn connect(cli: &Cli) -> anyhow::Result<NotesServiceClient<Channel>> {
    let read = |what: &str, path: &Option<PathBuf>| -> anyhow::Result<Vec<u8>> {
        let path = path
            .as_ref()
            .with_context(|| format!("missing --{what} (or NOTESCTL_{})", what.to_uppercase()))?;
        std::fs::read(path).with_context(|| format!("reading {}", path.display()))
    };
    let key = kms_client::Zeroizing::new(read("key", &cli.key)?);
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca", &cli.ca)?))
        .identity(Identity::from_pem(read("cert", &cli.cert)?, &*key))
        .domain_name(cli.server_name.clone());
    let channel = Endpoint::try_from(cli.endpoint.clone())
        .with_context(|| format!("bad endpoint {}", cli.endpoint))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_millis(cli.timeout_ms))
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connecting to {}: {e}", cli.endpoint)))?;
    Ok(NotesServiceClient::new(channel))
}

type Fields = Vec<(&'static str, Value)>;

async fn run(cli: &Cli) -> anyhow::Result<Fields> {
    let mut client = connect(cli).await?;
    Ok(match &cli.command {
        Command::CreateNote {
            site,
            client: client_id,
            author,
            session_date,
            body,
        } => {
            let r = client
                .create_note(pb::CreateNoteRequest {
                    site_id: site.clone(),
                    client_id: client_id.clone(),
                    author_id: author.clone(),
                    session_date: session_date.clone(),
                    body: body.clone().into_bytes(),
                })
                .await?
                .into_inner();
            vec![
                ("note_id", json!(r.note_id)),
                ("revision", json!(r.revision)),
            ]
        }
        Command::GetNote {
            note_id,
            acting_user,
            purpose,
            revision,
        } => {
            let purpose = pb::PurposeOfUse::from_str_name(&format!("PURPOSE_OF_USE_{purpose}"))
                .with_context(|| format!("unknown purpose {purpose}"))?;
            let r = client
                .get_note(pb::GetNoteRequest {
                    note_id: note_id.clone(),
                    acting_user: acting_user.clone(),
                    purpose: purpose as i32,
                    revision: *revision,
                })
                .await?
                .into_inner();
            let mut fields = r.note.as_ref().map(note_fields).unwrap_or_default();
            if let Some(rev) = &r.revision {
                fields.push(("revision", json!(rev.revision)));
                fields.push(("kms_key_id", json!(rev.kms_key_id)));
            }
            fields.push(("body", json!(r.body)));
            if !r.reason.is_empty() {
                fields.push(("reason", json!(r.reason)));
            }
            fields
        }
        Command::ListNotes {
            site,
            client: client_id,
            page_size,
        } => {
            let r = client
                .list_notes(pb::ListNotesRequest {
                    site_id: site.clone(),
                    client_id: client_id.clone(),
                    page_size: *page_size,
                    ..Default::default()
                })
                .await?
                .into_inner();
            let notes: Vec<Value> = r
                .notes
                .iter()
                .map(|n| {
                    Value::Object(
                        note_fields(n)
                            .into_iter()
                            .map(|(k, v)| (k.into(), v))
                            .collect(),
                    )
                })
                .collect();
            vec![("notes", json!(notes))]
        }
        Command::AmendNote {
            note_id,
            body,
            expected_revision,
            reason,
            author,
        } => {
            let r = client
                .amend_note(pb::AmendNoteRequest {
                    note_id: note_id.clone(),
                    body: body.clone().into_bytes(),
                    expected_revision: *expected_revision,
                    reason: reason.clone().into_bytes(),
                    author_id: author.clone(),
                })
                .await?
                .into_inner();
            vec![
                ("note_id", json!(r.note_id)),
                ("revision", json!(r.revision)),
            ]
        }
    })
}

fn note_fields(n: &pb::NoteMetadata) -> Fields {
    vec![
        ("note_id", json!(n.note_id)),
        ("site_id", json!(n.site_id)),
        ("client_id", json!(n.client_id)),
        ("author_id", json!(n.author_id)),
        ("session_date", json!(n.session_date)),
        ("current_revision", json!(n.current_revision)),
    ]
}

fn render(fields: &Fields, as_json: bool) -> String {
    if as_json {
        let map: serde_json::Map<String, Value> = fields
            .iter()
            .map(|(k, v)| ((*k).to_string(), v.clone()))
            .collect();
        return Value::Object(map).to_string();
    }
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    fields
        .iter()
        .map(|(k, v)| match v {
            Value::String(s) => format!("{k:width$}  {s}"),
            other => format!("{k:width$}  {other}"),
        })
        .collect::<Vec<_>>()
        .join("\n")
}
