//! Caller identity from the verified client certificate (shared by kms-server and notes-store).
//!
//! The TLS layer (`crate::tls`) has already verified the chain against the client CA; this module only
//! names the caller: the first SAN URI (e.g. `spiffe://group/site/a/notes-store`), else the
//! subject CN, plus the SHA-256 fingerprint of the public key. Roles and policies build on it.

use sha2::{Digest, Sha256};
use tonic::Request;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// SAN URI or subject CN.
    pub name: String,
    /// Hex SHA-256 of the certificate's SubjectPublicKeyInfo.
    pub key_fingerprint: String,
}

/// Derives the identity from a DER certificate.
pub fn identity_from_der(der: &[u8]) -> Option<Identity> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let uri = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|n| match n {
                GeneralName::URI(u) => Some(u.to_string()),
                _ => None,
            })
        });
    let cn = || {
        cert.subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string)
    };
    let name = uri.or_else(cn)?;
    let key_fingerprint = hex::encode(Sha256::digest(cert.public_key().raw));
    Some(Identity {
        name,
        key_fingerprint,
    })
}

/// The identity of the caller of a request, if it presented a parsable certificate.
pub fn peer_identity<T>(req: &Request<T>) -> Option<Identity> {
    let certs = req.peer_certs()?;
    identity_from_der(certs.first()?.as_ref())
}

/// A short printable name for logs.
pub fn peer_name<T>(req: &Request<T>) -> String {
    peer_identity(req)
        .map(|i| i.name)
        .unwrap_or_else(|| "<unauthenticated>".to_string())
}
