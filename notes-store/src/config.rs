//! notes-store configuration: a TOML file (`config/notes-store.example.toml`), then
//! environment overrides (`NOTES_*`), then checks. Unknown keys are refused.
//!
//! No secret is configured inline: the TLS private keys are files; a PostgreSQL password, if
//! any, belongs in `NOTES_DATABASE_URL` rather than in the file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;

/// Largest amendment reason, in bytes.
pub const MAX_REASON_BYTES: usize = 4096;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerSection,
    pub tls: TlsSection,
    pub database: DatabaseSection,
    pub kms: KmsSection,
    #[serde(default)]
    pub log: LogSection,
    /// Which caller (practice application, by certificate identity) may act for which sites.
    /// None: every call is refused (deny by default).
    #[serde(default)]
    pub callers: Vec<CallerSection>,
}

/// One `[[callers]]` entry (see `crate::callers`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallerSection {
    /// Identity pattern: literal segments, `*`, `**` (rest) and `{name}` (captured).
    pub identity: String,
    /// Site ids the caller may act for; `"*"` = all; `"{name}"` = captured from the identity.
    pub sites: Vec<String>,
    /// May erase clients of those sites (`EraseClient`, irreversible). Default false.
    #[serde(default)]
    pub may_erase: bool,
    /// May place and lift legal holds on clients of those sites. Default false.
    #[serde(default)]
    pub may_hold: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// gRPC listen address; must be a loopback address unless `allow_non_loopback`.
    pub listen: SocketAddr,
    /// Prometheus metrics listen address (plain HTTP; loopback only).
    pub metrics_listen: Option<SocketAddr>,
    /// Largest note body, in bytes of UTF-8.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    #[serde(default = "default_grace")]
    pub shutdown_grace_secs: u64,
    #[serde(default)]
    pub allow_non_loopback: bool,
    /// Tokio worker threads that serve requests; `None`: one per core (Tokio's default).
    ///
    /// Measured with everything on two cores: one worker cut notes-store's CPU per created note
    /// by a fifth and raised `notes_create` on PostgreSQL by ~0.03, but cost reads 0.03-0.05
    /// while each read was a KMS call of its own (README, session 18); with reads sharing
    /// `BatchDecrypt` calls it costs reads little and gave creations no clear gain either
    /// (session 19). Hence one per core by default.
    #[serde(default)]
    pub worker_threads: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA whose certificates callers (the practice applications) must present.
    pub client_ca: PathBuf,
    /// Revocation list of the client CA (PEM or DER), optional; re-read when the file's
    /// modification time changes (NOTES_TLS_CLIENT_CRL).
    pub client_crl: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSection {
    /// `sqlite:<path>` or `postgres://…`.
    pub url: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KmsSection {
    /// `https://host:port` of each KMS node, in order of preference.
    pub endpoints: Vec<String>,
    /// CA that signs the KMS server certificates.
    pub ca: PathBuf,
    /// notes-store's own client certificate and key for mutual TLS with the KMS.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// TLS name of the KMS servers when it is not the endpoints' host.
    pub server_name: Option<String>,
    /// The site's key prefix (an alias): each client gets its own KMS key, named by
    /// `client_key_alias`, under which its notes' data keys are wrapped.
    pub kms_key: String,
    /// Alias of a client's KMS key: `{kms_key}`, `{site}` and `{client}` are replaced.
    /// Default `"{kms_key}/clients/{client}"`, for the usual one notes-store per site whose
    /// `kms_key` is the site's prefix (`notes/a`). A notes-store serving several sites from
    /// one prefix must include `{site}`: the same client id at two sites must not share a key
    /// (refused with FAILED_PRECONDITION when it would).
    #[serde(default = "default_client_key_alias")]
    pub client_key_alias: String,
    /// Automatic rotation period of new client keys, in seconds (0 = none).
    #[serde(default)]
    pub client_key_rotation_period_secs: u64,
    #[serde(default = "default_request_timeout")]
    pub request_timeout_ms: u64,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    #[serde(default = "default_retries")]
    pub max_retries: u32,
    /// `GenerateDataKeys` calls outstanding at most (1-64). The data-key requests of the
    /// writes that arrive while every call is out go together in the next one
    /// (`crate::kms_batch`): fewer calls make bigger groups.
    #[serde(default = "default_data_key_calls")]
    pub data_key_calls_in_flight: usize,
    /// `BatchDecrypt` calls outstanding at most (1-64). The unwraps of the reads that arrive
    /// while every call is out go together in the next one (`crate::kms_batch`).
    #[serde(default = "default_decrypt_calls")]
    pub decrypt_calls_in_flight: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// "text" or "json".
    #[serde(default = "default_log_format")]
    pub format: String,
    /// A tracing filter such as "info" or "notes_store=debug".
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

fn default_client_key_alias() -> String {
    "{kms_key}/clients/{client}".into()
}
fn default_max_body() -> usize {
    64 * 1024
}
fn default_grace() -> u64 {
    10
}
fn default_request_timeout() -> u64 {
    5000
}
fn default_connect_timeout() -> u64 {
    2000
}
fn default_retries() -> u32 {
    1
}
fn default_data_key_calls() -> usize {
    crate::kms_batch::DEFAULT_CALLS_IN_FLIGHT
}
fn default_decrypt_calls() -> usize {
    crate::kms_batch::DEFAULT_DECRYPT_CALLS_IN_FLIGHT
}
fn default_log_format() -> String {
    "text".into()
}
fn default_log_level() -> String {
    "info".into()
}

impl Config {
    /// Reads the file, applies `NOTES_*` environment overrides and checks the result.
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
        if let Some(v) = get("NOTES_LISTEN") {
            self.server.listen = v.parse().context("NOTES_LISTEN")?;
        }
        if let Some(v) = get("NOTES_METRICS_LISTEN") {
            self.server.metrics_listen = if v.is_empty() {
                None
            } else {
                Some(v.parse().context("NOTES_METRICS_LISTEN")?)
            };
        }
        if let Some(v) = get("NOTES_MAX_BODY_BYTES") {
            self.server.max_body_bytes = v.parse().context("NOTES_MAX_BODY_BYTES")?;
        }
        if let Some(v) = get("NOTES_WORKER_THREADS") {
            self.server.worker_threads = Some(v.parse().context("NOTES_WORKER_THREADS")?);
        }
        if let Some(v) = get("NOTES_DATABASE_URL") {
            self.database.url = v;
        }
        if let Some(v) = get("NOTES_TLS_CERT") {
            self.tls.cert = v.into();
        }
        if let Some(v) = get("NOTES_TLS_KEY") {
            self.tls.key = v.into();
        }
        if let Some(v) = get("NOTES_TLS_CLIENT_CA") {
            self.tls.client_ca = v.into();
        }
        if let Some(v) = get("NOTES_TLS_CLIENT_CRL") {
            self.tls.client_crl = (!v.is_empty()).then(|| v.into());
        }
        if let Some(v) = get("NOTES_KMS_ENDPOINTS") {
            self.kms.endpoints = v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
        }
        if let Some(v) = get("NOTES_KMS_CA") {
            self.kms.ca = v.into();
        }
        if let Some(v) = get("NOTES_KMS_CLIENT_CERT") {
            self.kms.client_cert = v.into();
        }
        if let Some(v) = get("NOTES_KMS_CLIENT_KEY") {
            self.kms.client_key = v.into();
        }
        if let Some(v) = get("NOTES_KMS_KEY") {
            self.kms.kms_key = v;
        }
        if let Some(v) = get("NOTES_LOG_FORMAT") {
            self.log.format = v;
        }
        if let Some(v) = get("NOTES_LOG_LEVEL") {
            self.log.level = v;
        }
        Ok(())
    }

    fn validate(&self) -> anyhow::Result<()> {
        crate::callers::Callers::new(&self.callers).map_err(|e| anyhow::anyhow!(e))?;
        if !self.server.allow_non_loopback && !self.server.listen.ip().is_loopback() {
            bail!("server.listen must be a loopback address (set allow_non_loopback to override)");
        }
        if let Some(m) = self.server.metrics_listen {
            if !m.ip().is_loopback() {
                bail!("server.metrics_listen must be a loopback address");
            }
        }
        if !(1..=16 * 1024 * 1024).contains(&self.server.max_body_bytes) {
            bail!("server.max_body_bytes must be 1-16777216");
        }
        if self
            .server
            .worker_threads
            .is_some_and(|n| !(1..=256).contains(&n))
        {
            bail!("server.worker_threads must be 1-256");
        }
        if self.kms.endpoints.is_empty() {
            bail!("kms.endpoints must name at least one KMS");
        }
        if self.kms.kms_key.is_empty() {
            bail!("kms.kms_key must name the KMS key (alias or id)");
        }
        if !self.kms.client_key_alias.contains("{client}") {
            bail!("kms.client_key_alias must contain {{client}}");
        }
        if self.kms.request_timeout_ms == 0 || self.kms.connect_timeout_ms == 0 {
            bail!("kms timeouts must be greater than zero");
        }
        if !(1..=64).contains(&self.kms.data_key_calls_in_flight) {
            bail!("kms.data_key_calls_in_flight must be 1-64");
        }
        if !(1..=64).contains(&self.kms.decrypt_calls_in_flight) {
            bail!("kms.decrypt_calls_in_flight must be 1-64");
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            bail!("log.format must be \"text\" or \"json\"");
        }
        Ok(())
    }

    /// Largest gRPC message accepted or sent: a body at the limit, a reason, and room for the
    /// other fields. Anything larger is refused by tonic with OUT_OF_RANGE.
    pub fn max_message_bytes(&self) -> usize {
        self.server.max_body_bytes + MAX_REASON_BYTES + 16 * 1024
    }

    /// The alias of the KMS key of `client` at `site`.
    pub fn client_key_alias(&self, site: &str, client: &str) -> String {
        self.kms
            .client_key_alias
            .replace("{kms_key}", &self.kms.kms_key)
            .replace("{site}", site)
            .replace("{client}", client)
    }

    pub fn kms_request_timeout(&self) -> Duration {
        Duration::from_millis(self.kms.request_timeout_ms)
    }

    pub fn kms_connect_timeout(&self) -> Duration {
        Duration::from_millis(self.kms.connect_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../config/notes-store.example.toml");

    #[test]
    fn example_config_parses() {
        let cfg: Config = toml::from_str(EXAMPLE).unwrap();
        cfg.validate().unwrap();
        assert!(cfg.server.listen.ip().is_loopback());
        assert_eq!(cfg.server.max_body_bytes, 64 * 1024);
        assert_eq!(cfg.kms.kms_key, "notes");
        assert_eq!(cfg.client_key_alias("a", "c-1"), "notes/clients/c-1");
        assert!(cfg.callers.iter().all(|c| !c.may_erase && !c.may_hold));
    }

    #[test]
    fn client_key_alias_template() {
        let mut cfg: Config = toml::from_str(EXAMPLE).unwrap();
        cfg.kms.client_key_alias = "{kms_key}/{site}/c/{client}".into();
        assert_eq!(cfg.client_key_alias("a", "c.1"), "notes/a/c/c.1");
        cfg.kms.client_key_alias = "{kms_key}/{site}".into();
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn env_overrides_and_validation() {
        let mut cfg: Config = toml::from_str(EXAMPLE).unwrap();
        cfg.apply_env(|k| match k {
            "NOTES_DATABASE_URL" => Some("postgres://x/y".into()),
            "NOTES_KMS_ENDPOINTS" => Some("https://a:1, https://b:2".into()),
            "NOTES_KMS_KEY" => Some("notes/site-a".into()),
            "NOTES_MAX_BODY_BYTES" => Some("1000".into()),
            "NOTES_WORKER_THREADS" => Some("3".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(cfg.database.url, "postgres://x/y");
        assert_eq!(cfg.kms.endpoints, ["https://a:1", "https://b:2"]);
        assert_eq!(cfg.kms.kms_key, "notes/site-a");
        assert_eq!(cfg.server.max_body_bytes, 1000);
        assert_eq!(cfg.server.worker_threads, Some(3));
        cfg.validate().unwrap();
        cfg.server.listen = "0.0.0.0:7543".parse().unwrap();
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn data_key_calls_in_flight_is_bounded() {
        let mut cfg: Config = toml::from_str(EXAMPLE).unwrap();
        assert_eq!(cfg.kms.data_key_calls_in_flight, 1);
        for (calls, ok) in [(0, false), (1, true), (64, true), (65, false)] {
            cfg.kms.data_key_calls_in_flight = calls;
            assert_eq!(cfg.validate().is_ok(), ok, "{calls}");
        }
        let without = EXAMPLE.replace("data_key_calls_in_flight = 1\n", "");
        assert!(!without.contains("data_key_calls_in_flight"));
        let cfg: Config = toml::from_str(&without).unwrap();
        assert_eq!(
            cfg.kms.data_key_calls_in_flight,
            crate::kms_batch::DEFAULT_CALLS_IN_FLIGHT
        );
    }

    #[test]
    fn decrypt_calls_in_flight_is_bounded() {
        let mut cfg: Config = toml::from_str(EXAMPLE).unwrap();
        assert_eq!(
            cfg.kms.decrypt_calls_in_flight,
            crate::kms_batch::DEFAULT_DECRYPT_CALLS_IN_FLIGHT
        );
        for (calls, ok) in [(0, false), (1, true), (64, true), (65, false)] {
            cfg.kms.decrypt_calls_in_flight = calls;
            assert_eq!(cfg.validate().is_ok(), ok, "{calls}");
        }
        let line = format!(
            "decrypt_calls_in_flight = {}\n",
            crate::kms_batch::DEFAULT_DECRYPT_CALLS_IN_FLIGHT
        );
        let without = EXAMPLE.replace(&line, "");
        assert!(!without.contains("decrypt_calls_in_flight ="));
        let cfg: Config = toml::from_str(&without).unwrap();
        assert_eq!(
            cfg.kms.decrypt_calls_in_flight,
            crate::kms_batch::DEFAULT_DECRYPT_CALLS_IN_FLIGHT
        );
    }

    #[test]
    fn worker_threads_default_and_bounds() {
        let mut cfg: Config = toml::from_str(EXAMPLE).unwrap();
        assert_eq!(cfg.server.worker_threads, None);
        cfg.validate().unwrap();
        for (threads, ok) in [(0, false), (1, true), (256, true), (257, false)] {
            cfg.server.worker_threads = Some(threads);
            assert_eq!(cfg.validate().is_ok(), ok, "{threads}");
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        let bad = EXAMPLE.replace("[kms]", "[kms]\nkey_typo = 1");
        assert!(toml::from_str::<Config>(&bad).is_err());
    }
}
