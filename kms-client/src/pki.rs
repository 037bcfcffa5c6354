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

use std::{
    fmt,
    fs::{self, OpenOptions},
    io::Write,
    path::{Path, PathBuf},
};

use rcgen::{
    string::Ia5String, BasicConstraints, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, pem::Pem};
use zeroize::Zeroizing;

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

/// A certificate and its private key, as PEM. `Debug` hides the key.
#[derive(Clone)]
pub struct IssuedCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PKCS#8 PEM (zeroized on drop).
    pub key_pem: Zeroizing<String>,
}

impl IssuedCert {
    /// Writes the certificate (0644) and key (0600). Both files must not exist yet.
    pub fn write(&self, cert_path: &Path, key_path: &Path) -> Result<(), PkiError> {
        write_new(key_path, self.key_pem.as_bytes(), 0o600)?;
        write_new(cert_path, self.cert_pem.as_bytes(), 0o644)
    }
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// A CA that can issue certificates. `Debug` hides the key.
pub struct CertAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: Vec<u8>,
}

impl fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertAuthority")
            .field("cert_pem", &self.cert_pem)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl CertAuthority {
    /// A new self-signed CA (ECDSA P-256, `CA:TRUE, pathlen:0`) named `common_name`.
    /// Use a different name for each unrelated CA in a test.
    pub fn generate(
        common_name: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Self, PkiError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The dev CA: `common_name`, valid from an hour ago for [`CA_VALIDITY`].
    pub fn generate_dev(common_name: &str) -> Result<Self, PkiError> {
        let now = OffsetDateTime::now_utc();
        Self::generate(common_name, now - BACKDATE, now + CA_VALIDITY)
    }

    /// A CA from its certificate and PKCS#8 private key, both PEM.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        let cert_der = pem_to_cert_der(cert_pem.as_bytes())
            .ok_or(rcgen::Error::CouldNotParseCertificate)?;
        Ok(Self {
            issuer,
            cert_pem: cert_pem.to_string(),
            cert_der,
        })
    }

    /// A CA from a certificate file and a key file.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, PkiError> {
        let cert_pem = fs::read_to_string(cert_path).map_err(io_error(cert_path))?;
        let key_pem = Zeroizing::new(fs::read_to_string(key_path).map_err(io_error(key_path))?);
        Self::from_pem(&cert_pem, &key_pem)
    }

    /// Writes the certificate (0644) and key (0600). Both files must not exist yet.
    pub fn write(&self, cert_path: &Path, key_path: &Path) -> Result<(), PkiError> {
        let key_pem = Zeroizing::new(self.issuer.key().serialize_pem());
        write_new(key_path, key_pem.as_bytes(), 0o600)?;
        write_new(cert_path, self.cert_pem.as_bytes(), 0o644)
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// A server certificate: CN = the first name, SAN = every name (IP addresses recognised)
    /// plus 127.0.0.1, EKU serverAuth.
    pub fn issue_server_cert(
        &self,
        server_names: &[String],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<IssuedCert, PkiError> {
        let mut names: Vec<String> = Vec::new();
        for name in server_names.iter().map(String::as_str).chain([LOOPBACK]) {
            if !names.iter().any(|n| n == name) {
                names.push(name.to_string());
            }
        }
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name = distinguished_name(
            server_names.first().map_or(LOOPBACK, String::as_str),
        );
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign_leaf(params, not_before, not_after)
    }

    /// A client certificate: CN = `common_name`, SAN URI = `uri` if given, EKU clientAuth.
    pub fn issue_client_cert(
        &self,
        common_name: &str,
        uri: Option<&str>,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<IssuedCert, PkiError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(common_name);
        if let Some(uri) = uri {
            params.subject_alt_names = vec![SanType::URI(Ia5String::try_from(uri)?)];
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign_leaf(params, not_before, not_after)
    }

    fn sign_leaf(
        &self,
        mut params: CertificateParams,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<IssuedCert, PkiError> {
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: Zeroizing::new(key.serialize_pem()),
        })
    }

    /// Whether `cert_pem` is a certificate whose signature verifies with this CA's key.
    pub fn has_issued(&self, cert_pem: &[u8]) -> bool {
        let (Some(leaf_der), Ok((_, ca))) = (
            pem_to_cert_der(cert_pem),
            x509_parser::parse_x509_certificate(&self.cert_der),
        ) else {
            return false;
        };
        match x509_parser::parse_x509_certificate(&leaf_der) {
            Ok((_, leaf)) => {
                leaf.issuer() == ca.subject()
                    && leaf.verify_signature(Some(ca.public_key())).is_ok()
            }
            Err(_) => false,
        }
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
            let ca = CertAuthority::generate_dev("dev.clinic dev CA")?;
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
        let (pem, key) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
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
    report.created.extend([pem.to_path_buf(), key.to_path_buf()]);
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
            let (present, absent) = if cert_exists { (cert, key) } else { (key, cert) };
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

/// The DNS, URI and IPv4 entries of a certificate's SAN, as strings.
pub(crate) fn san_strings(cert: &X509Certificate<'_>) -> Vec<String> {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(s) | GeneralName::URI(s) => Some(s.to_string()),
            GeneralName::IPAddress(ip) => <[u8; 4]>::try_from(*ip)
                .ok()
                .map(|b| std::net::Ipv4Addr::from(b).to_string()),
            _ => None,
        })
        .collect()
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

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "dev.clinic dev PKI");
    dn.push(DnType::CommonName, common_name);
    dn
}

/// A random positive 128-bit serial number.
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // no leading zero byte: the DER integer stays 16 bytes
    SerialNumber::from_slice(&bytes)
}

/// The DER of the first `CERTIFICATE` block of a PEM text.
fn pem_to_cert_der(pem: &[u8]) -> Option<Vec<u8>> {
    Pem::iter_from_buffer(pem)
        .filter_map(Result::ok)
        .find(|p| p.label == "CERTIFICATE")
        .map(|p| p.contents)
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
#[path = "pki_tests.rs"]
mod tests;
