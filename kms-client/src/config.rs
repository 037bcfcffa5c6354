//! `KmsClientConfig`: endpoints, mutual-TLS material, deadlines and retry policy.

use std::{fmt, path::Path, time::Duration};

use zeroize::Zeroizing;

use crate::Error;

/// Default per-attempt deadline (sent as `grpc-timeout`).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Default TCP + TLS connect timeout per endpoint.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Default number of extra passes over the endpoint list for retryable failures.
pub const DEFAULT_MAX_RETRIES: u32 = 3;
/// Default backoff before the first retry pass; doubles each pass (with jitter).
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(100);

/// How to reach the KMS. `Debug` shows the endpoints and timeouts, never the private key.
#[derive(Clone)]
pub struct KmsClientConfig {
    /// `https://host:port` URLs, in order of preference.
    pub endpoints: Vec<String>,
    /// PEM of the CA(s) that sign the server certificates. Only these are trusted: the
    /// system roots are not used.
    pub ca_pem: Vec<u8>,
    /// PEM of this client's certificate (chain), presented for mutual TLS.
    pub cert_pem: Vec<u8>,
    /// PEM of this client's private key.
    pub key_pem: Zeroizing<Vec<u8>>,
    /// TLS server name (SNI and certificate check) for every endpoint. `None`: the host
    /// of each endpoint URL.
    pub server_name: Option<String>,
    /// Deadline of one attempt of one call, sent to the server as `grpc-timeout`.
    pub request_timeout: Duration,
    /// TCP + TLS handshake timeout per endpoint.
    pub connect_timeout: Duration,
    /// Extra passes over the endpoint list when a call may be retried (see `KmsClient`).
    pub max_retries: u32,
    /// Backoff before the first extra pass; doubled each pass, capped, with jitter.
    pub initial_backoff: Duration,
}

impl KmsClientConfig {
    /// A configuration from PEM bytes, with the default timeouts and retry policy.
    pub fn new(
        endpoints: Vec<String>,
        ca_pem: Vec<u8>,
        cert_pem: Vec<u8>,
        key_pem: Zeroizing<Vec<u8>>,
    ) -> Self {
        Self {
            endpoints,
            ca_pem,
            cert_pem,
            key_pem,
            server_name: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_retries: DEFAULT_MAX_RETRIES,
            initial_backoff: DEFAULT_INITIAL_BACKOFF,
        }
    }

    /// Like [`KmsClientConfig::new`], reading the three PEM files. The key file is read into
    /// zeroizing memory.
    pub fn from_files(
        endpoints: Vec<String>,
        ca_path: impl AsRef<Path>,
        cert_path: impl AsRef<Path>,
        key_path: impl AsRef<Path>,
    ) -> Result<Self, Error> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })
        };
        let ca_pem = read(ca_path.as_ref())?;
        let cert_pem = read(cert_path.as_ref())?;
        let key_pem = Zeroizing::new(read(key_path.as_ref())?);
        Ok(Self::new(endpoints, ca_pem, cert_pem, key_pem))
    }

    /// Checks what can be checked without the network.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.endpoints.is_empty() {
            return Err(Error::Config("no endpoint given".into()));
        }
        for endpoint in &self.endpoints {
            if !endpoint.starts_with("https://") {
                return Err(Error::Config(format!(
                    "endpoint {endpoint:?} must start with https:// (mutual TLS is mandatory)"
                )));
            }
        }
        if self.ca_pem.is_empty() || self.cert_pem.is_empty() || self.key_pem.is_empty() {
            return Err(Error::Config(
                "CA certificate, client certificate and client key are all required".into(),
            ));
        }
        if self.request_timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err(Error::Config("timeouts must be greater than zero".into()));
        }
        Ok(())
    }
}

impl fmt::Debug for KmsClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KmsClientConfig")
            .field("endpoints", &self.endpoints)
            .field("ca_pem", &format_args!("<{} bytes>", self.ca_pem.len()))
            .field("cert_pem", &format_args!("<{} bytes>", self.cert_pem.len()))
            .field("key_pem", &"<redacted>")
            .field("server_name", &self.server_name)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_retries", &self.max_retries)
            .field("initial_backoff", &self.initial_backoff)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(endpoints: &[&str]) -> KmsClientConfig {
        KmsClientConfig::new(
            endpoints.iter().map(|e| e.to_string()).collect(),
            b"ca".to_vec(),
            b"cert".to_vec(),
            Zeroizing::new(b"-----BEGIN PRIVATE KEY-----SECRET".to_vec()),
        )
    }

    #[test]
    fn debug_does_not_show_the_key() {
        let shown = format!("{:?}", config(&["https://a:1"]));
        assert!(!shown.contains("SECRET"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn validate_rejects_plaintext_and_empty_endpoints() {
        assert!(config(&["https://a:1", "https://b:2"]).validate().is_ok());
        assert!(matches!(config(&[]).validate(), Err(Error::Config(_))));
        assert!(matches!(
            config(&["http://a:1"]).validate(),
            Err(Error::Config(_))
        ));
    }

    #[test]
    fn from_files_reports_the_missing_path() {
        let err = KmsClientConfig::from_files(
            vec!["https://a:1".into()],
            "/nonexistent/ca.pem",
            "/nonexistent/c.pem",
            "/nonexistent/c.key",
        )
        .err();
        assert!(
            matches!(err, Some(Error::Io { ref path, .. }) if path.ends_with("ca.pem")),
            "{err:?}"
        );
    }
}
