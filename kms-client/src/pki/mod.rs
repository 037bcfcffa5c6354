//! Dev PKI for mutual TLS in development and tests: a local CA (ECDSA P-256), a server
//! certificate and client certificates, generated with rcgen. Not for production.
//!
//! [`init_dev_pki`] writes, in one directory:
//!
//! | file                         | content                                                      |
//! |------------------------------|--------------------------------------------------------------|
//! | `ca.pem`, `ca.key`           | self-signed CA, `CA:TRUE, pathlen:0`, 10 years               |
//! | `server.pem`, `server.key`   | SAN = server names + IP 127.0.0.1, EKU serverAuth, 1 year    |
//! | `<name>.pem`, `<name>.key`   | CN = name, SAN URI `spiffe://dev.clinic/client/<name>`, EKU clientAuth, 1 year |
//!
//! It is idempotent: a file that exists is kept as it is, a missing one is created. A kept
//! leaf certificate must verify against `ca.pem`; half a pair (a `.pem` without its `.key`
//! or the reverse) is an error rather than a silent overwrite. Private keys are PKCS#8 PEM,
//! created with mode 0600 (never overwritten).
//!
//! [`CertAuthority`] also issues certificates with arbitrary validity and names, for tests
//! that need an expired certificate or one from an unrelated CA.

mod authority;

use std::{
    fs::{self, OpenOptions},
    io::Write,
    path::{Path, PathBuf},
};

use authority::{pem_to_cert_der, san_strings};
pub use authority::{CertAuthority, IssuedCert};
use time::{Duration, OffsetDateTime};

/// Lifetime of the dev CA.
pub const CA_VALIDITY: Duration = Duration::days(3650);
/// Lifetime of server and client certificates.
pub const LEAF_VALIDITY: Duration = Duration::days(365);
/// Backdating of `not_before`, against clock skew between machines.
const BACKDATE: Duration = Duration::hours(1);
/// The SPIFFE-style URI prefix of client identities.
pub const CLIENT_URI_PREFIX: &str = "spiffe://dev.clinic/client/";
/// The server always answers on loopback.
const LOOPBACK: &str = "127.0.0.1";

/// Errors of the dev PKI.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// rcgen refused the parameters or could not sign.
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A name cannot be used (bad characters, reserved file name, ...).
    #[error("invalid name {name:?}: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// Existing files do not fit together; the message says what to delete.
    #[error("{}: {reason}", path.display())]
    Inconsistent {
        /// The offending file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        reason: String,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The URI SAN of client `name`: `spiffe://dev.clinic/client/<name>`.
pub fn client_uri(name: &str) -> String {
    format!("{CLIENT_URI_PREFIX}{name}")
}

/// What [`init_dev_pki`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PkiReport {
    /// The directory.
    pub dir: PathBuf,
    /// Files written by this run.
    pub created: Vec<PathBuf>,
    /// Files that existed and were kept.
    pub kept: Vec<PathBuf>,
    /// Things worth knowing, e.g. a kept server certificate lacks a requested name.
    pub warnings: Vec<String>,
}

/// Creates the dev PKI in `dir` (see the module documentation). `server_names` empty means
/// `["localhost"]`. Client names: 1-64 characters of `[A-Za-z0-9._-]`, not starting with a
/// dot, and neither `ca` nor `server`.
pub fn init_dev_pki(
    dir: &Path,
    server_names: &[String],
    clients: &[String],
) -> Result<PkiReport, PkiError> {
    let default_names = ["localhost".to_string()];
    let server_names = if server_names.is_empty() {
        &default_names[..]
    } else {
        server_names
    };
    for name in clients {
        validate_client_name(name)?;
    }
    create_private_dir(dir)?;
    let mut report = PkiReport {
        dir: dir.to_path_buf(),
        ..PkiReport::default()
    };
    let now = OffsetDateTime::now_utc();
    let (not_before, leaf_not_after) = (now - BACKDATE, now + LEAF_VALIDITY);

    let (ca_pem, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let ca = match pair_state(&ca_pem, &ca_key)? {
        true => {
            let ca = CertAuthority::load(&ca_pem, &ca_key)?;
            report.kept.extend([ca_pem, ca_key]);
            ca
        }
        false => {
            // A random suffix: two dev PKIs never share an issuer name, so a certificate
            // from the wrong one is reported as "unknown CA", not as a bad signature.
            let suffix = hex::encode(rand::random::<[u8; 4]>());
            let ca = CertAuthority::generate_dev(&format!("dev.clinic dev CA {suffix}"))?;
            ca.write(&ca_pem, &ca_key)?;
            report.created.extend([ca_pem, ca_key]);
            ca
        }
    };

    let (pem, key) = (dir.join("server.pem"), dir.join("server.key"));
    if ensure_leaf(&ca, &pem, &key, &mut report, || {
        ca.issue_server_cert(server_names, not_before, leaf_not_after)
    })? {
        let missing = missing_server_names(&pem, server_names)?;
        if !missing.is_empty() {
            report.warnings.push(format!(
                "kept {} lacks {}; delete server.pem and server.key to reissue",
                pem.display(),
                missing.join(", ")
            ));
        }
    }

    for name in clients {
        let (pem, key) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        ensure_leaf(&ca, &pem, &key, &mut report, || {
            ca.issue_client_cert(name, Some(&client_uri(name)), not_before, leaf_not_after)
        })?;
    }
    Ok(report)
}

/// Keeps an existing pair (after checking it comes from `ca`) or issues a new one. Returns
/// whether the pair was kept.
fn ensure_leaf(
    ca: &CertAuthority,
    pem: &Path,
    key: &Path,
    report: &mut PkiReport,
    issue: impl FnOnce() -> Result<IssuedCert, PkiError>,
) -> Result<bool, PkiError> {
    if pair_state(pem, key)? {
        let existing = fs::read(pem).map_err(io_error(pem))?;
        if !ca.has_issued(&existing) {
            return Err(PkiError::Inconsistent {
                path: pem.to_path_buf(),
                reason: "not a certificate issued by ca.pem; delete it and its .key to reissue"
                    .into(),
            });
        }
        report.kept.extend([pem.to_path_buf(), key.to_path_buf()]);
        return Ok(true);
    }
    issue()?.write(pem, key)?;
    report
        .created
        .extend([pem.to_path_buf(), key.to_path_buf()]);
    Ok(false)
}

/// `true` if both files exist, `false` if neither does, an error for half a pair.
fn pair_state(cert: &Path, key: &Path) -> Result<bool, PkiError> {
    match (cert.try_exists(), key.try_exists()) {
        (Ok(true), Ok(true)) => Ok(true),
        (Ok(false), Ok(false)) => Ok(false),
        (Err(source), _) => Err(io_error(cert)(source)),
        (_, Err(source)) => Err(io_error(key)(source)),
        (Ok(cert_exists), Ok(_)) => {
            let (present, absent) = if cert_exists {
                (cert, key)
            } else {
                (key, cert)
            };
            Err(PkiError::Inconsistent {
                path: present.to_path_buf(),
                reason: format!(
                    "exists but {} does not; delete it to regenerate the pair",
                    absent.display()
                ),
            })
        }
    }
}

/// Requested server names (DNS or IP) absent from the SAN of the certificate at `pem`.
fn missing_server_names(pem: &Path, names: &[String]) -> Result<Vec<String>, PkiError> {
    let bytes = fs::read(pem).map_err(io_error(pem))?;
    let present = pem_to_cert_der(&bytes)
        .and_then(|der| {
            let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
            Some(san_strings(&cert))
        })
        .unwrap_or_default();
    Ok(names
        .iter()
        .filter(|n| !present.contains(n))
        .cloned()
        .collect())
}

fn validate_client_name(name: &str) -> Result<(), PkiError> {
    let invalid = |reason| {
        Err(PkiError::InvalidName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() || name.len() > 64 {
        return invalid("must be 1-64 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return invalid("only A-Z a-z 0-9 . _ - are allowed");
    }
    if name.starts_with('.') {
        return invalid("must not start with a dot");
    }
    if name == "ca" || name == "server" {
        return invalid("reserved for the CA and server files");
    }
    Ok(())
}

fn create_private_dir(dir: &Path) -> Result<(), PkiError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(io_error(dir))
}

/// Creates `path` (which must not exist) with `mode` and writes `contents`.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path).map_err(io_error(path))?;
    file.write_all(contents).map_err(io_error(path))?;
    file.sync_all().map_err(io_error(path))
}

#[cfg(test)]
mod tests;
