//! Harness for the real `notes-store` binary: started against a running [`KmsServer`], with the
//! KMS PKI's "notes-store" client certificate towards the KMS, the KMS PKI's `server.pem`
//! (localhost) as its own TLS certificate, the same CA for its callers, and its own SQLite file
//! or PostgreSQL database. Tests talk to it as the "app" client (a practice application) and
//! can reach into its database directly (to scan or tamper with it).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{anyhow, Result};
use kms_client::Zeroizing;
use kms_proto::notes::v1 as pb;
use kms_proto::notes::v1::notes_service_client::NotesServiceClient;
use sqlx::{Connection, PgConnection, SqliteConnection};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::{binary, free_port, signal_child, spawn_ready, KmsServer};

/// The KMS key alias notes-store is configured with.
pub const NOTES_KEY: &str = "notes";

#[derive(Debug, Clone)]
pub struct NotesOptions {
    /// `None`: a SQLite file in the server's directory.
    pub database_url: Option<String>,
    pub max_body_bytes: usize,
    pub metrics: bool,
    /// `server.worker_threads`; `None`: the key is left out (notes-store's default).
    pub worker_threads: Option<usize>,
    pub log_json: bool,
    /// The `[[callers]]` entries (TOML); by default "app" may act for every site.
    pub callers: String,
    /// notes-store's client certificate and key for the KMS; `None`: the dev PKI's
    /// "notes-store" client.
    pub kms_client_cert: Option<(PathBuf, PathBuf)>,
}

/// The callers every test notes-store gets unless `NotesOptions::callers` says otherwise.
pub const DEFAULT_CALLERS: &str = r#"
[[callers]]
identity = "spiffe://dev.clinic/client/app"
sites = ["*"]
"#;

impl Default for NotesOptions {
    fn default() -> Self {
        NotesOptions {
            database_url: None,
            max_body_bytes: 64 * 1024,
            metrics: false,
            worker_threads: None,
            log_json: false,
            callers: DEFAULT_CALLERS.to_string(),
            kms_client_cert: None,
        }
    }
}

/// A running notes-store. Killed on drop if still running.
pub struct NotesServer {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub config_path: PathBuf,
    pub database_url: String,
    pub log_path: PathBuf,
    /// The KMS's PKI directory (CA, server and client certificates).
    pub pki_dir: PathBuf,
    child: Option<Child>,
}

impl NotesServer {
    /// Makes sure the KMS has the key `notes`, then starts notes-store against `kms`.
    pub async fn start(kms: &KmsServer, options: NotesOptions) -> Result<NotesServer> {
        let admin = kms.client("admin")?;
        if admin.describe_key(NOTES_KEY).await.is_err() {
            admin
                .create_key(Some(NOTES_KEY), Some("note data keys"))
                .await?;
        }
        let dir = tempfile::Builder::new().prefix("notes-e2e-").tempdir()?;
        let root = dir.path().to_path_buf();
        let database_url = options
            .database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite:{}", root.join("notes.db").display()));
        let metrics_addr = if options.metrics {
            Some(SocketAddr::from(([127, 0, 0, 1], free_port()?)))
        } else {
            None
        };
        let pki = kms.pki_dir.display().to_string();
        let (kms_cert, kms_key_file) = options
            .kms_client_cert
            .clone()
            .unwrap_or_else(|| kms.cert_paths("notes-store"));
        let metrics = metrics_addr
            .map(|a| format!("metrics_listen = \"{a}\""))
            .unwrap_or_default();
        let worker_threads = options
            .worker_threads
            .map(|n| format!("worker_threads = {n}"))
            .unwrap_or_default();
        let text = format!(
            r#"
[server]
listen = "127.0.0.1:0"
{metrics}
{worker_threads}
max_body_bytes = {max_body}
shutdown_grace_secs = 5

[tls]
cert = "{pki}/server.pem"
key = "{pki}/server.key"
client_ca = "{pki}/ca.pem"

[database]
url = "{database_url}"

[kms]
endpoints = ["{kms_endpoint}"]
ca = "{pki}/ca.pem"
client_cert = "{kms_cert}"
client_key = "{kms_key_file}"
kms_key = "{NOTES_KEY}"
# One test notes-store serves every site from one prefix: the site goes into the alias.
client_key_alias = "{{kms_key}}/{{site}}/clients/{{client}}"
request_timeout_ms = 3000
connect_timeout_ms = 1000
max_retries = 0

[log]
format = "{fmt}"
level = "info"
{callers}
"#,
            callers = options.callers,
            kms_cert = kms_cert.display(),
            kms_key_file = kms_key_file.display(),
            max_body = options.max_body_bytes,
            kms_endpoint = kms.endpoint(),
            fmt = if options.log_json { "json" } else { "text" },
        );
        let config_path = root.join("notes-store.toml");
        std::fs::write(&config_path, text)?;
        let mut server = NotesServer {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_addr,
            config_path,
            database_url,
            log_path: root.join("notes-store.log"),
            pki_dir: kms.pki_dir.clone(),
            child: None,
            dir,
        };
        server.spawn().await?;
        Ok(server)
    }

    async fn spawn(&mut self) -> Result<()> {
        let mut cmd = Command::new(binary("notes-store")?);
        cmd.arg("--config").arg(&self.config_path);
        // The config file alone decides, including the runtime's threads.
        for (key, _) in std::env::vars() {
            if key.starts_with("NOTES_") || key == "TOKIO_WORKER_THREADS" {
                cmd.env_remove(key);
            }
        }
        let (child, addr) = spawn_ready(cmd, "NOTES_READY listen=", &self.log_path).await?;
        self.child = Some(child);
        self.addr = addr;
        Ok(())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Sends a signal ("TERM", "INT", "KILL") and waits for the exit status.
    pub fn signal_and_wait(
        &mut self,
        sig: &str,
        timeout: Duration,
    ) -> Result<std::process::ExitStatus> {
        let child = self
            .child
            .take()
            .ok_or_else(|| anyhow!("notes-store not running"))?;
        signal_child(child, sig, timeout)
    }

    pub fn endpoint(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    /// A channel authenticated as `client` of the KMS PKI (e.g. "app").
    pub async fn channel(&self, client: &str) -> Result<Channel> {
        let cert = std::fs::read(self.pki_dir.join(format!("{client}.pem")))?;
        let key = Zeroizing::new(std::fs::read(self.pki_dir.join(format!("{client}.key")))?);
        let ca = std::fs::read(self.pki_dir.join("ca.pem"))?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .identity(Identity::from_pem(cert, &*key))
            .domain_name("localhost");
        Ok(tonic::transport::Endpoint::try_from(self.endpoint())?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(20))
            .connect()
            .await?)
    }

    /// The generated client, authenticated as the practice application "app".
    pub async fn client(&self) -> Result<NotesServiceClient<Channel>> {
        Ok(NotesServiceClient::new(self.channel("app").await?)
            .max_decoding_message_size(4 << 20)
            .max_encoding_message_size(4 << 20))
    }

    /// The SQLite database file, if that is the database.
    pub fn sqlite_path(&self) -> Option<PathBuf> {
        self.database_url
            .strip_prefix("sqlite:")
            .map(|p| PathBuf::from(p.trim_start_matches("//")))
    }

    /// Runs one SQL statement (no parameters) on the server's database, behind its back.
    pub async fn sql(&self, sql: &str) -> Result<u64> {
        let sql = sqlx::AssertSqlSafe(sql.to_string());
        let affected = if self.sqlite_path().is_some() {
            let mut conn = SqliteConnection::connect(&self.database_url).await?;
            let r = sqlx::raw_sql(sql).execute(&mut conn).await?.rows_affected();
            conn.close().await?;
            r
        } else {
            let mut conn = PgConnection::connect(&self.database_url).await?;
            let r = sqlx::raw_sql(sql).execute(&mut conn).await?.rows_affected();
            conn.close().await?;
            r
        };
        Ok(affected)
    }

    /// One scalar (as text) from the server's database.
    pub async fn sql_text(&self, sql: &str) -> Result<String> {
        let sql = sqlx::AssertSqlSafe(sql.to_string());
        if self.sqlite_path().is_some() {
            let mut conn = SqliteConnection::connect(&self.database_url).await?;
            let v: String = sqlx::query_scalar(sql).fetch_one(&mut conn).await?;
            conn.close().await?;
            Ok(v)
        } else {
            let mut conn = PgConnection::connect(&self.database_url).await?;
            let v: String = sqlx::query_scalar(sql).fetch_one(&mut conn).await?;
            conn.close().await?;
            Ok(v)
        }
    }

    /// A blob column of one revision, as bytes.
    pub async fn revision_bytes(
        &self,
        note_id: &str,
        revision: u32,
        column: &str,
    ) -> Result<Vec<u8>> {
        let hex = self
            .sql_text(&format!(
                "SELECT {hex} FROM note_revisions WHERE note_id = '{note_id}' AND revision = {revision}",
                hex = self.hex_of(column)
            ))
            .await?;
        Ok(hex::decode(hex.to_lowercase())?)
    }

    /// Overwrites a blob column of one revision.
    pub async fn set_revision_bytes(
        &self,
        note_id: &str,
        revision: u32,
        column: &str,
        value: &[u8],
    ) -> Result<()> {
        let literal = if self.sqlite_path().is_some() {
            format!("X'{}'", hex::encode(value))
        } else {
            format!("'\\x{}'::bytea", hex::encode(value))
        };
        let n = self
            .sql(&format!(
                "UPDATE note_revisions SET {column} = {literal} \
                 WHERE note_id = '{note_id}' AND revision = {revision}"
            ))
            .await?;
        anyhow::ensure!(n == 1, "no revision {revision} of note {note_id}");
        Ok(())
    }

    /// An SQL expression giving `column` (a blob) as hex text.
    pub fn hex_of(&self, column: &str) -> String {
        if self.sqlite_path().is_some() {
            format!("hex({column})")
        } else {
            format!("encode({column}, 'hex')")
        }
    }
}

impl Drop for NotesServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A CreateNote request.
pub fn create_request(site: &str, client: &str, date: &str, body: &str) -> pb::CreateNoteRequest {
    pb::CreateNoteRequest {
        site_id: site.into(),
        client_id: client.into(),
        author_id: "clin-7".into(),
        session_date: date.into(),
        body: body.as_bytes().to_vec(),
    }
}

/// A GetNote request by "user-42" for treatment; `revision` 0 = current.
pub fn get_request(note_id: &str, revision: u32) -> pb::GetNoteRequest {
    pb::GetNoteRequest {
        note_id: note_id.into(),
        acting_user: "user-42".into(),
        purpose: pb::PurposeOfUse::Treatment as i32,
        revision,
    }
}

/// An AmendNote request by "clin-8".
pub fn amend_request(
    note_id: &str,
    expected: u32,
    body: &str,
    reason: &str,
) -> pb::AmendNoteRequest {
    pb::AmendNoteRequest {
        note_id: note_id.into(),
        body: body.as_bytes().to_vec(),
        expected_revision: expected,
        reason: reason.as_bytes().to_vec(),
        author_id: "clin-8".into(),
    }
}
