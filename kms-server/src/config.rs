//! Server configuration: a TOML file, then environment overrides (`KMS_*`).
//!
//! Secrets (the HSM user PIN) never come from the command line: from `KMS_PKCS11_PIN` or from
//! the file named by `pin_file`, and they are held in `SecretString`, whose `Debug` is redacted.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use secrecy::SecretString;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerSection,
    pub tls: TlsSection,
    pub database: DatabaseSection,
    pub backend: BackendConfig,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub cache: CacheSection,
    #[serde(default)]
    pub audit: AuditSection,
    #[serde(default)]
    pub policy: PolicySection,
    #[serde(default)]
    pub lifecycle: LifecycleSection,
}

/// Key rotation and deletion limits, and the background worker that applies them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LifecycleSection {
    /// Shortest automatic rotation period a key may be given (default 1 day; tests use less).
    #[serde(default = "default_min_rotation")]
    pub min_rotation_period_secs: u64,
    /// Shortest ScheduleKeyDeletion waiting period (default 7 days; tests use less). The
    /// longest is always 30 days, the default 30 days.
    #[serde(default = "default_min_deletion_wait")]
    pub min_deletion_waiting_secs: u64,
    /// How often the worker looks for keys due for rotation or destruction.
    #[serde(default = "default_lifecycle_interval")]
    pub check_interval_ms: u64,
}

impl Default for LifecycleSection {
    fn default() -> Self {
        LifecycleSection {
            min_rotation_period_secs: default_min_rotation(),
            min_deletion_waiting_secs: default_min_deletion_wait(),
            check_interval_ms: default_lifecycle_interval(),
        }
    }
}

fn default_min_rotation() -> u64 {
    86_400
}
fn default_min_deletion_wait() -> u64 {
    7 * 86_400
}
fn default_lifecycle_interval() -> u64 {
    60_000
}

/// Who may do what (see `crate::policy` and config/kms-policy.example.toml).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    /// The policy file, loaded at start and reloaded on SIGHUP. Absent: every request is
    /// denied (deny by default).
    pub file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSection {
    /// Sign a checkpoint of the audit chain after this many events...
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// ...or after this many milliseconds with new events, whichever comes first.
    #[serde(default = "default_checkpoint_interval")]
    pub checkpoint_interval_ms: u64,
}

impl Default for AuditSection {
    fn default() -> Self {
        AuditSection {
            checkpoint_every: default_checkpoint_every(),
            checkpoint_interval_ms: default_checkpoint_interval(),
        }
    }
}

fn default_checkpoint_every() -> u64 {
    1000
}
fn default_checkpoint_interval() -> u64 {
    1000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// gRPC listen address; must be a loopback address unless `allow_non_loopback`.
    pub listen: SocketAddr,
    /// Prometheus metrics listen address (plain HTTP; keep it on localhost).
    pub metrics_listen: Option<SocketAddr>,
    #[serde(default = "default_node_id")]
    pub node_id: String,
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    #[serde(default = "default_grace")]
    pub shutdown_grace_secs: u64,
    #[serde(default)]
    pub allow_non_loopback: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA whose certificates clients must present (mutual TLS, always required).
    pub client_ca: PathBuf,
    /// Revocation list of the client CA (PEM or DER), re-read on SIGHUP and when its
    /// modification time changes (KMS_TLS_CLIENT_CRL).
    pub client_crl: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSection {
    /// `sqlite:<path>` or `postgres://…`.
    pub url: String,
}

/// Which key backend holds the master keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum BackendConfig {
    Pkcs11(Pkcs11Section),
    Tpm(TpmSection),
}

/// `type = "tpm"`: a TPM 2.0 reached through a TCTI (see README "TPM backend").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TpmSection {
    /// TCTI string: `swtpm:host=127.0.0.1,port=2321`, `device:/dev/tpmrm0`, `tabrmd:`
    /// (KMS_TPM_TCTI).
    pub tcti: String,
    /// How long a request waits for the TPM before UNAVAILABLE.
    #[serde(default = "default_tpm_timeout_ms")]
    pub request_timeout_ms: u64,
}

fn default_tpm_timeout_ms() -> u64 {
    10_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Section {
    pub module: PathBuf,
    pub token_label: String,
    /// File holding the user PIN (first line). `KMS_PKCS11_PIN` takes precedence.
    pub pin_file: Option<PathBuf>,
    #[serde(default = "default_sessions")]
    pub max_sessions: usize,
    #[serde(default = "default_acquire_ms")]
    pub acquire_timeout_ms: u64,
    /// Run a data-key call on the async worker that received the request when a session is
    /// free, instead of handing it to the blocking pool (see `Pkcs11Settings::inline_calls`).
    #[serde(default = "default_inline_calls")]
    pub inline_calls: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// "text" or "json".
    #[serde(default = "default_log_format")]
    pub format: String,
    /// A tracing filter such as "info" or "kms_server=debug".
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            format: default_log_format(),
            level: default_log_level(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSection {
    /// How long key metadata read from the database is reused. Changes made through this
    /// server take effect at once; changes made by another node within this time.
    #[serde(default = "default_key_ttl")]
    pub key_ttl_ms: u64,
}

impl Default for CacheSection {
    fn default() -> Self {
        CacheSection {
            key_ttl_ms: default_key_ttl(),
        }
    }
}

fn default_node_id() -> String {
    "kms-1".into()
}
fn default_max_message_bytes() -> usize {
    1024 * 1024
}
fn default_grace() -> u64 {
    10
}
fn default_sessions() -> usize {
    2
}
fn default_inline_calls() -> bool {
    true
}
fn default_acquire_ms() -> u64 {
    5000
}
fn default_log_format() -> String {
    "text".into()
}
fn default_log_level() -> String {
    "info".into()
}
fn default_key_ttl() -> u64 {
    2000
}

impl Config {
    /// Reads the file, applies `KMS_*` environment overrides and checks the result.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut cfg: Config =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        cfg.apply_env(|k| std::env::var(k).ok())?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> anyhow::Result<()> {
        if let Some(v) = get("KMS_LISTEN") {
            self.server.listen = v.parse().context("KMS_LISTEN")?;
        }
        if let Some(v) = get("KMS_METRICS_LISTEN") {
            self.server.metrics_listen = if v.is_empty() {
                None
            } else {
                Some(v.parse().context("KMS_METRICS_LISTEN")?)
            };
        }
        if let Some(v) = get("KMS_NODE_ID") {
            self.server.node_id = v;
        }
        if let Some(v) = get("KMS_DATABASE_URL") {
            self.database.url = v;
        }
        if let Some(v) = get("KMS_TLS_CERT") {
            self.tls.cert = v.into();
        }
        if let Some(v) = get("KMS_TLS_KEY") {
            self.tls.key = v.into();
        }
        if let Some(v) = get("KMS_TLS_CLIENT_CA") {
            self.tls.client_ca = v.into();
        }
        if let Some(v) = get("KMS_TLS_CLIENT_CRL") {
            self.tls.client_crl = (!v.is_empty()).then(|| v.into());
        }
        if let Some(v) = get("KMS_POLICY_FILE") {
            self.policy.file = Some(v.into());
        }
        if let Some(v) = get("KMS_LOG_FORMAT") {
            self.log.format = v;
        }
        if let Some(v) = get("KMS_LOG_LEVEL") {
            self.log.level = v;
        }
        match &mut self.backend {
            BackendConfig::Pkcs11(p) => {
                if let Some(v) = get("KMS_PKCS11_MODULE") {
                    p.module = v.into();
                }
                if let Some(v) = get("KMS_PKCS11_TOKEN_LABEL") {
                    p.token_label = v;
                }
                if let Some(v) = get("KMS_PKCS11_PIN_FILE") {
                    p.pin_file = Some(v.into());
                }
            }
            BackendConfig::Tpm(t) => {
                if let Some(v) = get("KMS_TPM_TCTI") {
                    t.tcti = v;
                }
            }
        }
        Ok(())
    }

    fn validate(&self) -> anyhow::Result<()> {
        if !self.server.allow_non_loopback && !self.server.listen.ip().is_loopback() {
            bail!("server.listen must be a loopback address (set allow_non_loopback to override)");
        }
        if let Some(m) = self.server.metrics_listen {
            if !m.ip().is_loopback() {
                bail!("server.metrics_listen must be a loopback address");
            }
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            bail!("log.format must be \"text\" or \"json\"");
        }
        if self.server.max_message_bytes < 8 * 1024 {
            bail!("server.max_message_bytes must be at least 8192");
        }
        Ok(())
    }

    pub fn key_cache_ttl(&self) -> Duration {
        Duration::from_millis(self.cache.key_ttl_ms)
    }
}

impl Pkcs11Section {
    /// The user PIN: `KMS_PKCS11_PIN`, else the first line of `pin_file`.
    pub fn pin(&self) -> anyhow::Result<SecretString> {
        if let Ok(pin) = std::env::var("KMS_PKCS11_PIN") {
            if !pin.is_empty() {
                return Ok(SecretString::from(pin));
            }
        }
        let Some(file) = &self.pin_file else {
            bail!("no HSM PIN: set KMS_PKCS11_PIN or backend.pin_file");
        };
        let text = zeroize::Zeroizing::new(
            std::fs::read_to_string(file)
                .with_context(|| format!("reading PIN file {}", file.display()))?,
        );
        let pin = text.lines().next().unwrap_or("").trim();
        if pin.is_empty() {
            bail!("PIN file {} is empty", file.display());
        }
        Ok(SecretString::from(pin.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../config/kms-server.example.toml");

    #[test]
    fn example_config_parses() {
        let cfg: Config = toml::from_str(EXAMPLE).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.server.listen.port(), 7443);
        // The dev configuration names the dev policy, and that policy loads.
        let policy = cfg.policy.file.unwrap();
        assert_eq!(policy, PathBuf::from("config/kms-policy.dev.toml"));
        crate::policy::Policy::load(
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join(policy),
        )
        .unwrap();
        crate::policy::Policy::parse(include_str!("../../config/kms-policy.example.toml")).unwrap();
    }

    #[test]
    fn env_overrides_and_validation() {
        let mut cfg: Config = toml::from_str(EXAMPLE).unwrap();
        cfg.apply_env(|k| match k {
            "KMS_DATABASE_URL" => Some("postgres://x/y".into()),
            "KMS_LISTEN" => Some("127.0.0.1:1".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(cfg.database.url, "postgres://x/y");
        assert_eq!(cfg.server.listen.port(), 1);
        cfg.server.listen = "0.0.0.0:7443".parse().unwrap();
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn unknown_keys_are_refused() {
        let bad = EXAMPLE.replace("[server]", "[server]\nlisten_typo = 1");
        assert!(toml::from_str::<Config>(&bad).is_err());
    }

    #[test]
    fn tpm_example_config_parses_and_tcti_comes_from_env() {
        let text = include_str!("../../config/kms-server.tpm.example.toml");
        let mut cfg: Config = toml::from_str(text).unwrap();
        cfg.validate().unwrap();
        cfg.apply_env(|k| (k == "KMS_TPM_TCTI").then(|| "swtpm:host=127.0.0.1,port=9".into()))
            .unwrap();
        let BackendConfig::Tpm(t) = &cfg.backend else {
            panic!("not a TPM backend: {:?}", cfg.backend);
        };
        assert_eq!(t.tcti, "swtpm:host=127.0.0.1,port=9");
        assert_eq!(t.request_timeout_ms, 10_000);
    }
}
