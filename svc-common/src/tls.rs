//! Mutual TLS with rustls: the server configuration and an accept loop that performs
//! handshakes off the accept path, so one slow or hostile client cannot stall the others.
//! A client without a certificate from the configured client CA, or with one its revocation
//! list names, fails the handshake and never reaches a gRPC handler. The configuration can be
//! rebuilt while serving (`ReloadableConfig`): each new connection uses the current one.
//! Shared by kms-server and notes-store.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, Context};
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub fn load_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing certificates in {}", path.display()))?;
    if certs.is_empty() {
        return Err(anyhow!("no certificate in {}", path.display()));
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let pem = zeroize::Zeroizing::new(
        std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
    );
    rustls_pemfile::private_key(&mut pem.as_slice())
        .with_context(|| format!("parsing private key in {}", path.display()))?
        .ok_or_else(|| anyhow!("no private key in {}", path.display()))
}

/// Certificate revocation lists from a PEM (`X509 CRL` blocks) or DER file.
pub fn load_crls(path: &Path) -> anyhow::Result<Vec<CertificateRevocationListDer<'static>>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let crls = if bytes.starts_with(b"-----") {
        rustls_pemfile::crls(&mut bytes.as_slice())
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("parsing revocation lists in {}", path.display()))?
    } else {
        vec![CertificateRevocationListDer::from(bytes)]
    };
    if crls.is_empty() {
        return Err(anyhow!("no revocation list in {}", path.display()));
    }
    Ok(crls)
}

/// Server config requiring a client certificate chained to `client_ca`; ALPN h2 only.
pub fn server_config(cert: &Path, key: &Path, client_ca: &Path) -> anyhow::Result<ServerConfig> {
    server_config_with_crl(cert, key, client_ca, None)
}

/// As `server_config`, also refusing client certificates revoked by the CRL file `crl`.
pub fn server_config_with_crl(
    cert: &Path,
    key: &Path,
    client_ca: &Path,
    crl: Option<&Path>,
) -> anyhow::Result<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for ca in load_certs(client_ca)? {
        roots.add(ca).context("adding client CA")?;
    }
    let mut builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    if let Some(crl) = crl {
        builder = builder.with_crls(load_crls(crl)?);
    }
    let verifier = builder
        .build()
        .context("building client certificate verifier")?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .context("server certificate and key")?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The files a server's TLS configuration is built from.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    pub client_crl: Option<PathBuf>,
}

/// The TLS configuration in force, rebuilt from its files on `reload` (SIGHUP) or when the
/// CRL file changes (`watch_crl`). A rebuild that fails leaves the current one in place.
/// Cheap to clone; clones share the configuration.
#[derive(Clone)]
pub struct ReloadableConfig {
    files: Option<Arc<TlsFiles>>,
    current: Arc<RwLock<Arc<ServerConfig>>>,
    crl_modified: Arc<Mutex<Option<SystemTime>>>,
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl ReloadableConfig {
    pub fn load(files: TlsFiles) -> anyhow::Result<ReloadableConfig> {
        let crl_modified = files.client_crl.as_deref().and_then(modified);
        let config = server_config_with_crl(
            &files.cert,
            &files.key,
            &files.client_ca,
            files.client_crl.as_deref(),
        )?;
        Ok(ReloadableConfig {
            files: Some(Arc::new(files)),
            current: Arc::new(RwLock::new(Arc::new(config))),
            crl_modified: Arc::new(Mutex::new(crl_modified)),
        })
    }

    /// The configuration for the next connection.
    pub fn current(&self) -> Arc<ServerConfig> {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Rebuilds the configuration from its files (certificate, key, client CA, CRL).
    pub fn reload(&self) -> anyhow::Result<()> {
        let Some(files) = &self.files else {
            return Ok(());
        };
        let stamp = files.client_crl.as_deref().and_then(modified);
        let config = server_config_with_crl(
            &files.cert,
            &files.key,
            &files.client_ca,
            files.client_crl.as_deref(),
        )?;
        match self.current.write() {
            Ok(mut c) => *c = Arc::new(config),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(config),
        }
        if let Ok(mut m) = self.crl_modified.lock() {
            *m = stamp;
        }
        Ok(())
    }

    /// Polls the CRL file's modification time every `every` and reloads when it changes.
    pub fn watch_crl(&self, every: Duration) -> Option<tokio::task::JoinHandle<()>> {
        let crl = self.files.as_ref()?.client_crl.clone()?;
        let this = self.clone();
        Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let now = modified(&crl);
                let known = this.crl_modified.lock().map(|m| *m).unwrap_or(None);
                if now == known {
                    continue;
                }
                match this.reload() {
                    Ok(()) => {
                        tracing::info!(crl = %crl.display(), "revocation list changed: TLS configuration reloaded")
                    }
                    Err(e) => {
                        // Remember the stamp anyway, so a broken file is reported once.
                        if let Ok(mut m) = this.crl_modified.lock() {
                            *m = now;
                        }
                        tracing::error!(error = %format!("{e:#}"), "revocation list changed but does not load; the previous TLS configuration stays");
                    }
                }
            }
        }))
    }
}

impl From<ServerConfig> for ReloadableConfig {
    fn from(config: ServerConfig) -> Self {
        ReloadableConfig {
            files: None,
            current: Arc::new(RwLock::new(Arc::new(config))),
            crl_modified: Arc::new(Mutex::new(None)),
        }
    }
}

/// Accepts TCP connections and yields the ones whose TLS handshake succeeded. Each handshake
/// uses the configuration current when its connection was accepted.
pub fn incoming(
    listener: TcpListener,
    config: impl Into<ReloadableConfig>,
) -> ReceiverStream<Result<TlsStream<TcpStream>, io::Error>> {
    let config: ReloadableConfig = config.into();
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            // Stop listening as soon as the server stops taking connections (shutdown drops
            // the stream): new clients then get "connection refused" rather than a TLS session
            // that is dropped unserved, which they would see as an HTTP/2 protocol error.
            let accepted = tokio::select! {
                _ = tx.closed() => break,
                accepted = listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                break;
            }
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(config.current());
            let tx = tx.clone();
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
                let result = tokio::select! {
                    // Shutting down: nobody would serve this connection.
                    _ = tx.closed() => return,
                    result = handshake => result,
                };
                match result {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => tracing::info!(peer = %peer, error = %e, "TLS handshake refused"),
                    Err(_) => tracing::info!(peer = %peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
