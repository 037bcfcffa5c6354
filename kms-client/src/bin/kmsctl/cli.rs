//! kmsctl's command line: clap definitions and the parsing of `k=v` context pairs.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use kms_client::EncryptionContext;

use crate::audit_cli::AuditCommand;

/// Command-line client of the KMS (kms.v1 over mutual TLS).
///
/// Connection options can be given anywhere on the line or through the environment.
/// Failures print one line `error: <GRPC_CODE>: <message>` on stderr and exit with 1.
#[derive(Debug, Parser)]
#[command(name = "kmsctl", version)]
pub struct Cli {
    /// KMS endpoint; repeat (or comma-separate) for failover, tried in order.
    #[arg(
        long = "endpoint",
        value_name = "URL",
        env = "KMSCTL_ENDPOINT",
        value_delimiter = ',',
        default_value = "https://127.0.0.1:7443",
        global = true
    )]
    pub endpoints: Vec<String>,

    /// CA certificate (PEM) that signs the server certificates.
    #[arg(long = "ca", value_name = "FILE", env = "KMSCTL_CA", global = true)]
    pub ca_file: Option<PathBuf>,

    /// Client certificate (PEM).
    #[arg(long = "cert", value_name = "FILE", env = "KMSCTL_CERT", global = true)]
    pub cert_file: Option<PathBuf>,

    /// Client private key (PEM). Its content is never printed.
    #[arg(long = "key", value_name = "FILE", env = "KMSCTL_KEY", global = true)]
    pub key_file: Option<PathBuf>,

    /// TLS server name to verify. For RPCs give it once ('' = the host of each endpoint);
    /// `pki init` puts every one in the server certificate.
    #[arg(
        long = "server-name",
        value_name = "NAME",
        env = "KMSCTL_SERVER_NAME",
        default_value = "localhost",
        global = true
    )]
    pub server_names: Vec<String>,

    /// Deadline of each RPC attempt, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 5000, global = true)]
    pub timeout_ms: u64,

    /// Print one JSON object instead of text (`audit query`/`tail`: one per event).
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Master keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Data keys.
    #[command(subcommand)]
    Datakey(DatakeyCommand),
    /// Encrypt up to 4096 bytes directly under a master key; prints the blob (base64).
    Encrypt(EncryptArgs),
    /// Decrypt a blob; prints the plaintext as UTF-8 if it is, else base64 (always base64
    /// with --json).
    Decrypt(DecryptArgs),
    /// Re-wrap a blob under another key and/or context without revealing the plaintext.
    #[command(name = "reencrypt")]
    ReEncrypt(ReEncryptArgs),
    /// Who the server thinks this client is: identity, key fingerprint, roles and effective
    /// permissions under the server's policy.
    #[command(name = "whoami")]
    WhoAmI,
    /// The audit log (needs an identity the server's policy makes an auditor, except
    /// `audit verify --in`, which works offline).
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Development PKI (no server needed).
    #[command(subcommand)]
    Pki(PkiCommand),
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create a master key (never retried once sent: check with `key describe` on failure).
    Create {
        /// Unique human name.
        #[arg(long)]
        alias: Option<String>,
        /// Free text.
        #[arg(long)]
        description: Option<String>,
        /// Automatic rotation period in days (0 = none).
        #[arg(long, default_value_t = 0)]
        rotation_days: u64,
    },
    /// Show a key.
    Describe(KeyRef),
    /// List all keys (follows every page).
    List {
        /// Keys per request (1-1000; 0 = server default).
        #[arg(long, default_value_t = 100)]
        page_size: u32,
    },
    /// Enable a key.
    Enable(KeyRef),
    /// Disable a key.
    Disable(KeyRef),
    /// Create a new version in the HSM/TPM and make it primary (older versions still decrypt).
    Rotate(KeyRef),
    /// List a key's versions.
    Versions(KeyRef),
    /// Enable one version.
    EnableVersion(KeyVersionArgs),
    /// Disable one version (not the primary): its blobs are refused until enabled again.
    DisableVersion(KeyVersionArgs),
    /// Set the automatic rotation period (0 = none). Seconds, or days with --days.
    SetRotation {
        #[arg(value_name = "KEY")]
        key_ref: String,
        #[arg(value_name = "PERIOD")]
        period: u64,
        /// PERIOD is in days.
        #[arg(long)]
        days: bool,
    },
    /// Refuse blobs under versions below VERSION (check `notes-store key-usage` first).
    SetMinVersion(KeyVersionArgs),
    /// Schedule destruction after a waiting period (default 30 days); the key is unusable.
    ScheduleDeletion {
        #[arg(value_name = "KEY")]
        key_ref: String,
        /// Waiting period in days (7-30; 0 = 30).
        #[arg(long, default_value_t = 0, conflicts_with = "seconds")]
        days: u64,
        /// Waiting period in seconds (for servers configured with a short minimum).
        #[arg(long)]
        seconds: Option<u64>,
    },
    /// Cancel a scheduled deletion; the key comes back DISABLED.
    CancelDeletion(KeyRef),
}

/// A key and one of its versions.
#[derive(Debug, Args)]
pub struct KeyVersionArgs {
    /// Key UUID or alias.
    #[arg(value_name = "KEY")]
    pub key_ref: String,
    #[arg(value_name = "VERSION")]
    pub version: u32,
}

/// A key named by UUID or alias.
#[derive(Debug, Args)]
pub struct KeyRef {
    /// Key UUID or alias.
    #[arg(value_name = "KEY")]
    pub key_ref: String,
}

#[derive(Debug, Subcommand)]
pub enum DatakeyCommand {
    /// Generate a data key: prints the wrapped blob and (unless --no-plaintext) the key.
    Generate {
        /// Master key UUID or alias.
        #[arg(value_name = "KEY")]
        key_ref: String,
        #[command(flatten)]
        context: ContextArgs,
        /// Do not fetch (or print) the plaintext data key.
        #[arg(long)]
        no_plaintext: bool,
    },
}

/// Encryption context pairs.
#[derive(Debug, Args)]
pub struct ContextArgs {
    /// Encryption context pair (repeatable). Must match exactly on decrypt.
    #[arg(long = "context", value_name = "K=V", value_parser = parse_pair)]
    pub pairs: Vec<(String, String)>,
}

impl ContextArgs {
    pub fn to_context(&self) -> Result<EncryptionContext, String> {
        to_context(&self.pairs)
    }
}

/// Who acts and why (recorded in the audit log).
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Opaque id of the person on whose behalf you act.
    #[arg(long)]
    pub acting_user: Option<String>,
    /// Purpose of use, e.g. TREATMENT, BREAK_GLASS.
    #[arg(long)]
    pub purpose: Option<String>,
}

impl AuditArgs {
    pub fn to_audit(&self) -> Option<kms_client::AuditMetadata> {
        if self.acting_user.is_none() && self.purpose.is_none() {
            return None;
        }
        Some(kms_client::AuditMetadata {
            acting_user: self.acting_user.clone().unwrap_or_default(),
            purpose: self.purpose.clone().unwrap_or_default(),
        })
    }
}

#[derive(Debug, Args)]
#[group(id = "input", required = true, multiple = false, args = ["plaintext", "input_file"])]
pub struct EncryptArgs {
    /// Master key UUID or alias.
    #[arg(value_name = "KEY")]
    pub key_ref: String,
    /// Plaintext as text (visible in the process list: prefer --in).
    #[arg(long)]
    pub plaintext: Option<String>,
    /// Read the plaintext from FILE ('-' = stdin).
    #[arg(long = "in", value_name = "FILE")]
    pub input_file: Option<PathBuf>,
    #[command(flatten)]
    pub context: ContextArgs,
}

#[derive(Debug, Args)]
pub struct DecryptArgs {
    /// The ciphertext blob, base64 (standard alphabet).
    #[arg(long)]
    pub blob: String,
    #[command(flatten)]
    pub context: ContextArgs,
    #[command(flatten)]
    pub audit: AuditArgs,
}

#[derive(Debug, Args)]
pub struct ReEncryptArgs {
    /// The ciphertext blob, base64 (standard alphabet).
    #[arg(long)]
    pub blob: String,
    #[command(flatten)]
    pub context: ContextArgs,
    /// Destination key (default: the source key's primary version).
    #[arg(long, value_name = "KEY")]
    pub to_key: Option<String>,
    /// Destination context pair (repeatable; default: keep the source context).
    #[arg(long = "to-context", value_name = "K=V", value_parser = parse_pair)]
    pub to_context: Vec<(String, String)>,
    #[command(flatten)]
    pub audit: AuditArgs,
}

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Create (or complete) a dev PKI: ca, server and client certificates. Existing files
    /// are kept. Server names come from --server-name (repeatable, default localhost).
    Init {
        /// Output directory (created 0700 if missing).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Client certificate to create (repeatable): NAME.pem and NAME.key.
        #[arg(long = "client", value_name = "NAME")]
        clients: Vec<String>,
    },
    /// Issue one client certificate with a chosen SAN URI (e.g. a site's service identity
    /// spiffe://dev.clinic/site/a/notes-store) from the CA of `pki init`: NAME.pem and NAME.key.
    /// An existing pair is kept if the CA issued it with that URI; otherwise it is an error.
    IssueClient {
        /// The PKI directory (holding ca.pem and ca.key).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// File name and certificate CN: 1-64 characters of A-Z a-z 0-9 . _ -
        #[arg(long, value_name = "NAME")]
        name: String,
        /// The SAN URI, the identity the servers' policies see.
        #[arg(long, value_name = "URI")]
        uri: String,
    },
}

/// Parses `k=v` (the value may contain '='; the key may not be empty).
pub fn parse_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        Some(_) => Err(format!("empty key in {s:?} (expected K=V)")),
        None => Err(format!("missing '=' in {s:?} (expected K=V)")),
    }
}

/// Builds a context, refusing a key given twice.
pub fn to_context(pairs: &[(String, String)]) -> Result<EncryptionContext, String> {
    let mut context = EncryptionContext::new();
    for (k, v) in pairs {
        if context.insert(k.clone(), v.clone()).is_some() {
            return Err(format!("context key {k:?} given more than once"));
        }
    }
    Ok(context)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("kmsctl").chain(args.iter().copied()))
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn pairs_parse() {
        assert_eq!(parse_pair("site=7"), Ok(("site".into(), "7".into())));
        assert_eq!(parse_pair("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(parse_pair("empty="), Ok(("empty".into(), String::new())));
        assert!(parse_pair("=v").is_err());
        assert!(parse_pair("novalue").is_err());
    }

    #[test]
    fn duplicate_context_keys_are_refused() {
        let pairs = vec![("a".to_string(), "1".to_string()), ("a".into(), "2".into())];
        assert!(to_context(&pairs).is_err());
        let ok = to_context(&[("b".into(), "2".into()), ("a".into(), "1".into())]).unwrap();
        assert_eq!(ok.keys().collect::<Vec<_>>(), ["a", "b"]);
    }

    #[test]
    fn global_flags_anywhere_and_repeated_endpoints() {
        let cli = parse(&[
            "datakey",
            "generate",
            "notes",
            "--context",
            "site=1",
            "--context",
            "note=2",
            "--endpoint",
            "https://a:1",
            "--endpoint",
            "https://b:2,https://c:3",
            "--json",
        ])
        .unwrap();
        assert_eq!(cli.endpoints, ["https://a:1", "https://b:2", "https://c:3"]);
        assert!(cli.json);
        let Command::Datakey(DatakeyCommand::Generate {
            key_ref,
            context,
            no_plaintext,
        }) = cli.command
        else {
            panic!("wrong command");
        };
        assert_eq!(key_ref, "notes");
        assert!(!no_plaintext);
        assert_eq!(context.to_context().unwrap().len(), 2);
    }

    #[test]
    fn defaults() {
        let cli = parse(&["key", "list"]).unwrap();
        assert_eq!(cli.endpoints, ["https://127.0.0.1:7443"]);
        assert_eq!(cli.server_names, ["localhost"]);
        assert_eq!(cli.timeout_ms, 5000);
        assert!(matches!(
            cli.command,
            Command::Key(KeyCommand::List { page_size: 100 })
        ));
    }

    #[test]
    fn encrypt_needs_exactly_one_input() {
        assert!(parse(&["encrypt", "k"]).is_err());
        assert!(parse(&["encrypt", "k", "--plaintext", "x", "--in", "f"]).is_err());
        assert!(parse(&["encrypt", "k", "--in", "-"]).is_ok());
        assert!(parse(&["encrypt", "k", "--plaintext", "x", "--context", "bad"]).is_err());
    }

    #[test]
    fn pki_init_takes_several_server_names_and_clients() {
        let cli = parse(&[
            "pki",
            "init",
            "--dir",
            "d",
            "--server-name",
            "localhost",
            "--server-name",
            "kms.dev",
            "--client",
            "notes",
            "--client",
            "ops",
        ])
        .unwrap();
        assert_eq!(cli.server_names, ["localhost", "kms.dev"]);
        let Command::Pki(PkiCommand::Init { clients, .. }) = cli.command else {
            panic!("wrong command");
        };
        assert_eq!(clients, ["notes", "ops"]);
    }

    #[test]
    fn pki_issue_client_takes_name_and_uri() {
        let cli = parse(&[
            "pki",
            "issue-client",
            "--dir",
            "d",
            "--name",
            "site-a-notes",
            "--uri",
            "spiffe://dev.clinic/site/a/notes-store",
        ])
        .unwrap();
        let Command::Pki(PkiCommand::IssueClient { name, uri, .. }) = cli.command else {
            panic!("wrong command");
        };
        assert_eq!(name, "site-a-notes");
        assert_eq!(uri, "spiffe://dev.clinic/site/a/notes-store");
        assert!(parse(&["pki", "issue-client", "--dir", "d", "--name", "x"]).is_err());
    }

    #[test]
    fn reencrypt_and_decrypt_flags() {
        let cli = parse(&[
            "reencrypt",
            "--blob",
            "QQ==",
            "--context",
            "a=1",
            "--to-key",
            "k2",
            "--to-context",
            "a=2",
            "--purpose",
            "LEGAL",
        ])
        .unwrap();
        let Command::ReEncrypt(args) = cli.command else {
            panic!("wrong command")
        };
        assert_eq!(args.to_key.as_deref(), Some("k2"));
        assert_eq!(args.to_context, [("a".to_string(), "2".to_string())]);
        assert_eq!(args.audit.to_audit().unwrap().purpose, "LEGAL");

        let cli = parse(&["decrypt", "--blob", "QQ=="]).unwrap();
        let Command::Decrypt(args) = cli.command else {
            panic!("wrong command")
        };
        assert!(args.audit.to_audit().is_none());
    }
}
