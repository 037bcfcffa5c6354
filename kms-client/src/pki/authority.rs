//! `CertAuthority`: a CA key and certificate that issue server and client certificates
//! with any validity and names (rcgen), and check that a certificate came from it.

use std::{fmt, fs, path::Path};

use rcgen::{
    string::Ia5String, BasicConstraints, CertificateParams, CertificateRevocationListParams,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair,
    KeyUsagePurpose, RevokedCertParams, SanType, SerialNumber,
};
use time::OffsetDateTime;
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, pem::Pem};
use zeroize::Zeroizing;

use super::{io_error, write_new, PkiError, BACKDATE, CA_VALIDITY, LOOPBACK};

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
        let cert_der =
            pem_to_cert_der(cert_pem.as_bytes()).ok_or(rcgen::Error::CouldNotParseCertificate)?;
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
        params.distinguished_name =
            distinguished_name(server_names.first().map_or(LOOPBACK, String::as_str));
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

    /// A certificate revocation list (PEM) revoking the given certificates (PEM), valid from
    /// `this_update` to `next_update`. `crl_number` must grow with each new list.
    pub fn issue_crl(
        &self,
        revoked_cert_pems: &[&str],
        crl_number: u64,
        this_update: OffsetDateTime,
        next_update: OffsetDateTime,
    ) -> Result<String, PkiError> {
        let mut revoked_certs = Vec::new();
        for pem in revoked_cert_pems {
            let der = pem_to_cert_der(pem.as_bytes()).ok_or(PkiError::InvalidName {
                name: "revoked certificate".into(),
                reason: "not a PEM certificate",
            })?;
            let (_, cert) =
                x509_parser::parse_x509_certificate(&der).map_err(|_| PkiError::InvalidName {
                    name: "revoked certificate".into(),
                    reason: "not a parsable certificate",
                })?;
            revoked_certs.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(cert.raw_serial()),
                revocation_time: this_update,
                reason_code: None,
                invalidity_date: None,
            });
        }
        let params = CertificateRevocationListParams {
            this_update,
            next_update,
            crl_number: SerialNumber::from(crl_number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
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
pub(crate) fn pem_to_cert_der(pem: &[u8]) -> Option<Vec<u8>> {
    Pem::iter_from_buffer(pem)
        .filter_map(Result::ok)
        .find(|p| p.label == "CERTIFICATE")
        .map(|p| p.contents)
}
