//! Test harness: starts the real `kms-server` binary with its own SoftHSM token directory,
//! dev PKI, database and free port, and gives tests authenticated clients. `notes` starts the
//! real `notes-store` binary against such a KMS.
//!
//! Binaries are taken from `target/<profile>/` (build them first: `cargo build --workspace
//! --bins`, as `make test` does) or from `KMS_SERVER_BIN`.

pub mod cpu;
pub mod hsm_ceiling;
pub mod metrics;
pub mod notes;
pub mod pg;
pub mod swtpm;
pub mod tpm_ceiling;

pub use notes::{NotesOptions, NotesServer};
pub use swtpm::Swtpm;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use kms_client::{AuditClient, KmsClient, KmsClientConfig, Zeroizing};
use kms_proto::kms::v1::key_management_service_client::KeyManagementServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// Client certificate names every test server's PKI contains.
pub const CLIENTS: &[&str] = &["admin", "app", "notes-store", "auditor"];
/// The client that the harness policy makes an auditor (may call the AuditService).
pub const AUDITOR: &str = "auditor";
/// The label of the SoftHSM token each test server gets.
pub const TOKEN_LABEL: &str = "kms-e2e";

/// The policy every test server gets unless `ServerOptions::policy` says otherwise: "admin" is
/// key-admin, "auditor" auditor, "app" and "notes-store" services on every key without context
/// conditions. "app" is ALSO key-admin, because the existing tests create the keys they use as
/// "app"; a production policy never binds one identity to both roles (separation of duties).
pub const HARNESS_POLICY: &str = r#"
[[allow]]
identity = "spiffe://dev.clinic/client/admin"
role = "key-admin"

[[allow]]
identity = "spiffe://dev.clinic/client/auditor"
role = "auditor"

[[allow]]
identity = "spiffe://dev.clinic/client/app"
role = "service"

[[allow]]
identity = "spiffe://dev.clinic/client/app"
role = "key-admin"

[[allow]]
identity = "spiffe://dev.clinic/client/notes-store"
role = "service"

[[allow]]
identity = "spiffe://dev.clinic/client/notes-store"
role = "custodian"

[[allow]]
identity = "spiffe://dev.clinic/client/app"
role = "custodian"
"#;
pub const PIN: &str = "harness-user-pin-8472";
const SO_PIN: &str = "harness-so-pin-8472";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Path of a workspace binary: `$KMS_<NAME>_BIN`, else target/debug, else target/release.
pub fn binary(name: &str) -> Result<PathBuf> {
    let var = format!("KMS_{}_BIN", name.to_uppercase().replace('-', "_"));
    if let Ok(p) = std::env::var(&var) {
        return Ok(PathBuf::from(p));
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join("target"));
    for profile in ["debug", "release"] {
        let p = target.join(profile).join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    bail!("{name} not built: run `cargo build --workspace --bins` first (or set {var})")
}

/// What kind of server to start.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// `None`: a SQLite file in the server's directory.
    pub database_url: Option<String>,
    pub metrics: bool,
    pub key_cache_ttl_ms: u64,
    pub max_sessions: usize,
    pub log_json: bool,
    /// `[audit] checkpoint_every`: sign a checkpoint after this many events...
    pub checkpoint_every: u64,
    /// `[audit] checkpoint_interval_ms`: ...or after this long with new events.
    pub checkpoint_interval_ms: u64,
    /// The policy file's text (`[policy] file`); `HARNESS_POLICY` by default.
    pub policy: String,
    /// `[tls] client_crl = "<pki>/ca.crl"`, starting as an empty list signed by the dev CA
    /// (rewrite it with `CertAuthority::issue_crl`).
    pub client_crl: bool,
    /// `[lifecycle] check_interval_ms`: how often due rotations and deletions run. The
    /// harness sets the minimum rotation period and deletion wait to 1 s.
    pub lifecycle_check_ms: u64,
    /// `Some(tcti)`: `[backend] type = "tpm"` with this TCTI (e.g. `Swtpm::tcti()`; the test
    /// owns the swtpm) instead of the server's SoftHSM token.
    pub tpm_tcti: Option<String>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            database_url: None,
            metrics: false,
            key_cache_ttl_ms: 2000,
            max_sessions: 2,
            log_json: false,
            checkpoint_every: 1000,
            checkpoint_interval_ms: 1000,
            policy: HARNESS_POLICY.to_string(),
            client_crl: false,
            lifecycle_check_ms: 500,
            tpm_tcti: None,
        }
    }
}

/// A running kms-server. Stopped (SIGKILL) on drop if still running.
pub struct KmsServer {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub token_dir: PathBuf,
    pub pki_dir: PathBuf,
    pub config_path: PathBuf,
    /// The policy file the server reads (rewrite it, then `reload`).
    pub policy_path: PathBuf,
    pub database_url: String,
    /// Server stderr (its logs).
    pub log_path: PathBuf,
    pub options: ServerOptions,
    child: Option<Child>,
}

/// A port that was free a moment ago.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl KmsServer {
    pub async fn start(options: ServerOptions) -> Result<KmsServer> {
        let dir = tempfile::Builder::new().prefix("kms-e2e-").tempdir()?;
        let root = dir.path().to_path_buf();
        let token_dir = root.join("softhsm");
        let pki_dir = root.join("pki");
        // One token per server, so servers (and tests) run in parallel without sharing state.
        init_token(&token_dir, TOKEN_LABEL)?;
        let clients: Vec<String> = CLIENTS.iter().map(|s| s.to_string()).collect();
        kms_client::pki::init_dev_pki(&pki_dir, &["localhost".to_string()], &clients)
            .map_err(|e| anyhow!("dev PKI: {e}"))?;
        if options.client_crl {
            let ca = kms_client::pki::CertAuthority::load(
                &pki_dir.join("ca.pem"),
                &pki_dir.join("ca.key"),
            )
            .map_err(|e| anyhow!("loading the dev CA: {e}"))?;
            let now = time::OffsetDateTime::now_utc();
            let crl = ca
                .issue_crl(
                    &[],
                    1,
                    now - time::Duration::minutes(5),
                    now + time::Duration::days(1),
                )
                .map_err(|e| anyhow!("CRL: {e}"))?;
            std::fs::write(pki_dir.join("ca.crl"), crl)?;
        }
        let database_url = options
            .database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite:{}", root.join("kms.db").display()));
        let metrics_addr = if options.metrics {
            Some(SocketAddr::from(([127, 0, 0, 1], free_port()?)))
        } else {
            None
        };
        let config_path = root.join("kms-server.toml");
        let policy_path = root.join("kms-policy.toml");
        std::fs::write(&policy_path, &options.policy)?;
        let mut server = KmsServer {
            policy_path,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_addr,
            token_dir,
            pki_dir,
            config_path,
            database_url,
            log_path: root.join("kms-server.log"),
            options,
            child: None,
            dir,
        };
        server.write_config(0)?;
        server.spawn().await?;
        Ok(server)
    }

    fn write_config(&self, port: u16) -> Result<()> {
        let metrics = match self.metrics_addr {
            Some(a) => format!("metrics_listen = \"{a}\""),
            None => String::new(),
        };
        let o = &self.options;
        let text = format!(
            r#"
[server]
listen = "127.0.0.1:{port}"
{metrics}
node_id = "e2e"
shutdown_grace_secs = 5

[tls]
cert = "{pki}/server.pem"
key = "{pki}/server.key"
client_ca = "{pki}/ca.pem"
{crl}

[database]
url = "{db}"

[backend]
{backend}

[log]
format = "{fmt}"
level = "info"

[cache]
key_ttl_ms = {ttl}

[audit]
checkpoint_every = {cp_every}
checkpoint_interval_ms = {cp_interval}

[policy]
file = "{policy}"

[lifecycle]
min_rotation_period_secs = 1
min_deletion_waiting_secs = 1
check_interval_ms = {lifecycle_ms}
"#,
            pki = self.pki_dir.display(),
            db = self.database_url,
            backend = match &o.tpm_tcti {
                Some(tcti) => format!("type = \"tpm\"\ntcti = \"{tcti}\""),
                None => format!(
                    "type = \"pkcs11\"\nmodule = \"{module}\"\ntoken_label = \"kms-e2e\"\n\
                     pin_file = \"{tok}/user.pin\"\nmax_sessions = {sessions}\n\
                     acquire_timeout_ms = 3000",
                    module = pkcs11_module().display(),
                    tok = self.token_dir.display(),
                    sessions = o.max_sessions,
                ),
            },
            fmt = if o.log_json { "json" } else { "text" },
            ttl = o.key_cache_ttl_ms,
            cp_every = o.checkpoint_every,
            cp_interval = o.checkpoint_interval_ms,
            policy = self.policy_path.display(),
            lifecycle_ms = o.lifecycle_check_ms,
            crl = if o.client_crl {
                format!("client_crl = \"{}/ca.crl\"", self.pki_dir.display())
            } else {
                String::new()
            },
        );
        std::fs::write(&self.config_path, text)?;
        Ok(())
    }

    /// Starts the process and waits for its `KMS_READY` line.
    async fn spawn(&mut self) -> Result<()> {
        let mut cmd = Command::new(binary("kms-server")?);
        cmd.arg("--config")
            .arg(&self.config_path)
            .env("SOFTHSM2_CONF", self.token_dir.join("softhsm2.conf"))
            .env_remove("KMS_PKCS11_PIN");
        let (child, addr) = spawn_ready(cmd, "KMS_READY listen=", &self.log_path).await?;
        self.child = Some(child);
        self.addr = addr;
        Ok(())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
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
            .ok_or_else(|| anyhow!("server not running"))?;
        signal_child(child, sig, timeout)
    }

    /// Sends SIGHUP (reload the policy) without waiting for anything.
    pub fn hangup(&self) -> Result<()> {
        let pid = self.pid().ok_or_else(|| anyhow!("server not running"))?;
        let status = Command::new("kill")
            .arg("-HUP")
            .arg(pid.to_string())
            .status()?;
        if !status.success() {
            bail!("kill -HUP {pid} failed");
        }
        Ok(())
    }

    /// Stops the server (SIGTERM) and starts it again on the same port, token and database.
    pub async fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            self.signal_and_wait("TERM", Duration::from_secs(10))?;
        }
        self.write_config(self.addr.port())?;
        self.spawn().await
    }

    pub fn endpoint(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    pub fn cert_paths(&self, client: &str) -> (PathBuf, PathBuf) {
        (
            self.pki_dir.join(format!("{client}.pem")),
            self.pki_dir.join(format!("{client}.key")),
        )
    }

    /// The kms-client library, authenticated as `client`.
    pub fn client(&self, client: &str) -> Result<KmsClient> {
        let (cert, key) = self.cert_paths(client);
        let mut cfg = KmsClientConfig::from_files(
            vec![self.endpoint()],
            self.pki_dir.join("ca.pem"),
            cert,
            key,
        )?;
        cfg.max_retries = 0;
        // Tests run in parallel on two cores: a 5 s deadline is tight for exports and bursts.
        cfg.request_timeout = Duration::from_secs(30);
        Ok(KmsClient::new(&cfg)?)
    }

    /// The audit client, authenticated as `client` (only `AUDITOR` may read by default).
    pub fn audit_client(&self, client: &str) -> Result<AuditClient> {
        Ok(self.client(client)?.audit())
    }

    /// The real `kmsctl` binary, pointed at this server as `client` (no `KMSCTL_*` variable
    /// of the caller's environment leaks in). Add the subcommand and run it.
    pub fn kmsctl(&self, client: &str) -> Result<Command> {
        let (cert, key) = self.cert_paths(client);
        let mut cmd = Command::new(binary("kmsctl")?);
        for var in ["ENDPOINT", "CA", "CERT", "KEY", "SERVER_NAME"] {
            cmd.env_remove(format!("KMSCTL_{var}"));
        }
        cmd.arg("--endpoint")
            .arg(self.endpoint())
            .arg("--ca")
            .arg(self.pki_dir.join("ca.pem"))
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key);
        Ok(cmd)
    }

    /// A raw tonic channel with the given client identity (PEM cert and key).
    pub async fn channel_with(
        &self,
        cert_pem: Vec<u8>,
        key_pem: Vec<u8>,
    ) -> Result<Channel, tonic::transport::Error> {
        let ca = std::fs::read(self.pki_dir.join("ca.pem")).unwrap_or_default();
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .identity(Identity::from_pem(cert_pem, key_pem))
            .domain_name("localhost");
        tonic::transport::Endpoint::try_from(self.endpoint())?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .connect()
            .await
    }

    /// The dev CA certificate (PEM): the server's client CA and its server certificate's issuer.
    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.pki_dir.join("ca.pem")).unwrap_or_default()
    }

    /// The dev CA with its key, to issue further client certificates (expired, other names).
    pub fn ca(&self) -> Result<kms_client::pki::CertAuthority> {
        kms_client::pki::CertAuthority::load(
            &self.pki_dir.join("ca.pem"),
            &self.pki_dir.join("ca.key"),
        )
        .map_err(|e| anyhow!("loading the dev CA: {e}"))
    }

    /// A raw tonic channel authenticated as `client` (for health, reflection, ...).
    pub async fn channel(&self, client: &str) -> Result<Channel> {
        let (cert, key) = self.cert_paths(client);
        let key = Zeroizing::new(std::fs::read(key)?);
        Ok(self
            .channel_with(std::fs::read(cert)?, key.to_vec())
            .await?)
    }

    /// A raw generated client authenticated as `client`.
    pub async fn raw(&self, client: &str) -> Result<KeyManagementServiceClient<Channel>> {
        let (cert, key) = self.cert_paths(client);
        let key = Zeroizing::new(std::fs::read(key)?);
        let channel = self
            .channel_with(std::fs::read(cert)?, key.to_vec())
            .await?;
        Ok(KeyManagementServiceClient::new(channel)
            .max_decoding_message_size(1 << 20)
            .max_encoding_message_size(8 << 20))
    }
}

impl Drop for KmsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Spawns `cmd` with stderr appended to `log_path` and waits (30 s at most) for the stdout line
/// `<ready_prefix><address>`. The child is killed if it does not become ready.
pub async fn spawn_ready(
    mut cmd: Command,
    ready_prefix: &'static str,
    log_path: &Path,
) -> Result<(Child, SocketAddr)> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)?;
    let mut child = cmd
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            if let Some(addr) = line.strip_prefix(ready_prefix) {
                let _ = tx.send(addr.to_string());
            }
        }
    });
    let addr =
        tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30))).await?;
    match addr.ok().and_then(|a| a.parse().ok()) {
        Some(addr) => Ok((child, addr)),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{:?} did not become ready; log:\n{}",
                cmd.get_program(),
                std::fs::read_to_string(log_path).unwrap_or_default()
            )
        }
    }
}

/// Sends a signal ("TERM", "INT", "KILL") to `child` and waits for its exit status; kills it
/// if it has not exited within `timeout`.
pub fn signal_child(
    mut child: Child,
    sig: &str,
    timeout: Duration,
) -> Result<std::process::ExitStatus> {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("process did not exit within {timeout:?} after SIG{sig}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn pkcs11_module() -> PathBuf {
    std::env::var("PKCS11_MODULE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| "/usr/lib/softhsm/libsofthsm2.so".into())
}

/// Creates a SoftHSM token directory with one token, using the project's setup script.
pub fn init_token(dir: &Path, label: &str) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("user.pin"), format!("{PIN}\n"))?;
    std::fs::write(dir.join("so.pin"), format!("{SO_PIN}\n"))?;
    let out = Command::new(repo_root().join("softhsm-setup/init-token.sh"))
        .arg("--dir")
        .arg(dir)
        .args(["--label", label])
        .env_remove("KMS_PKCS11_PIN")
        .env_remove("KMS_PKCS11_SO_PIN")
        .output()
        .context("running softhsm-setup/init-token.sh")?;
    if !out.status.success() {
        bail!(
            "init-token.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Builds an encryption context from pairs.
pub fn ctx(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The same as a wire map.
pub fn wire_ctx(pairs: &[(&str, &str)]) -> std::collections::HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
