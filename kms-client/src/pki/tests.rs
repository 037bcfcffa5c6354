//! Unit tests of the dev PKI: idempotence, file modes, certificate contents and chains.

use super::*;
use rcgen::KeyPair;
use std::{collections::BTreeMap, time::SystemTime};

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn der_of(path: &Path) -> Vec<u8> {
    let pem = fs::read(path).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    assert_eq!(pem.label, "CERTIFICATE");
    pem.contents
}

/// Content and modification time of every file in `dir`.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (Vec<u8>, SystemTime)> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            let meta = fs::metadata(&path).unwrap();
            (
                path.clone(),
                (fs::read(&path).unwrap(), meta.modified().unwrap()),
            )
        })
        .collect()
}

#[test]
fn init_creates_everything_then_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let report = init_dev_pki(
        &pki,
        &names(&["localhost", "kms.dev"]),
        &names(&["notes", "ops"]),
    )
    .unwrap();
    assert_eq!(report.created.len(), 8, "{report:?}");
    assert!(report.kept.is_empty());
    for f in ["ca", "server", "notes", "ops"] {
        assert!(pki.join(format!("{f}.pem")).is_file());
        assert!(pki.join(format!("{f}.key")).is_file());
    }
    let before = snapshot(&pki);

    let again = init_dev_pki(
        &pki,
        &names(&["localhost", "kms.dev"]),
        &names(&["notes", "ops"]),
    )
    .unwrap();
    assert!(again.created.is_empty(), "{again:?}");
    assert_eq!(again.kept.len(), 8);
    assert!(again.warnings.is_empty(), "{again:?}");
    assert_eq!(snapshot(&pki), before, "second run changed files");

    // A new client is added without touching the rest.
    let third = init_dev_pki(&pki, &names(&["localhost"]), &names(&["notes", "audit"])).unwrap();
    assert_eq!(
        third.created,
        vec![pki.join("audit.pem"), pki.join("audit.key")]
    );
    for (path, content) in before {
        assert_eq!(fs::read(&path).unwrap(), content.0);
    }
}

#[cfg(unix)]
#[test]
fn private_keys_are_0600() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    init_dev_pki(dir.path(), &[], &names(&["notes"])).unwrap();
    for f in ["ca.key", "server.key", "notes.key"] {
        let mode = fs::metadata(dir.path().join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}: {mode:o}");
    }
    let mode = fs::metadata(dir.path().join("ca.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o077 & !0o044,
        0,
        "ca.pem must not be group/world writable"
    );
}

#[test]
fn certificates_chain_to_the_ca_and_carry_the_right_names() {
    let dir = tempfile::tempdir().unwrap();
    init_dev_pki(
        dir.path(),
        &names(&["localhost", "10.0.0.7"]),
        &names(&["notes"]),
    )
    .unwrap();

    let ca_der = der_of(&dir.path().join("ca.pem"));
    let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
    assert!(ca.is_ca());
    let bc = ca.basic_constraints().unwrap().unwrap().value;
    assert_eq!(bc.path_len_constraint, Some(0));
    ca.verify_signature(None).unwrap(); // self-signed
    let ca_years = (ca.validity().not_after.timestamp() - ca.validity().not_before.timestamp())
        / (365 * 86_400);
    assert_eq!(ca_years, 10);

    let server_der = der_of(&dir.path().join("server.pem"));
    let (_, server) = x509_parser::parse_x509_certificate(&server_der).unwrap();
    assert_eq!(server.issuer(), ca.subject());
    server.verify_signature(Some(ca.public_key())).unwrap();
    assert!(!server.is_ca());
    let eku = server.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && !eku.client_auth);
    let sans = san_strings(&server);
    for expected in ["localhost", "10.0.0.7", "127.0.0.1"] {
        assert!(
            sans.iter().any(|s| s == expected),
            "{expected} not in {sans:?}"
        );
    }
    assert!(server.validity().is_valid());

    let client_der = der_of(&dir.path().join("notes.pem"));
    let (_, client) = x509_parser::parse_x509_certificate(&client_der).unwrap();
    client.verify_signature(Some(ca.public_key())).unwrap();
    let cn = client.subject().iter_common_name().next().unwrap();
    assert_eq!(cn.as_str().unwrap(), "notes");
    assert_eq!(
        san_strings(&client),
        vec!["spiffe://dev.clinic/client/notes"]
    );
    let eku = client.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth);

    // The key files hold private keys that rcgen (and so rustls) can load.
    for f in ["ca.key", "server.key", "notes.key"] {
        let pem = fs::read_to_string(dir.path().join(f)).unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{f}");
        KeyPair::from_pem(&pem).unwrap();
    }
}

#[test]
fn expired_and_foreign_certificates_for_negative_tests() {
    let dir = tempfile::tempdir().unwrap();
    init_dev_pki(dir.path(), &[], &[]).unwrap();
    let ca = CertAuthority::load(&dir.path().join("ca.pem"), &dir.path().join("ca.key")).unwrap();

    let now = OffsetDateTime::now_utc();
    let expired = ca
        .issue_client_cert(
            "old",
            Some(&client_uri("old")),
            now - Duration::days(30),
            now - Duration::days(1),
        )
        .unwrap();
    assert!(ca.has_issued(expired.cert_pem.as_bytes()));
    let der = pem_to_cert_der(expired.cert_pem.as_bytes()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    assert!(!cert.validity().is_valid());

    let other = CertAuthority::generate_dev("unrelated CA").unwrap();
    let foreign = other
        .issue_client_cert(
            "notes",
            Some(&client_uri("notes")),
            now - BACKDATE,
            now + LEAF_VALIDITY,
        )
        .unwrap();
    assert!(other.has_issued(foreign.cert_pem.as_bytes()));
    assert!(!ca.has_issued(foreign.cert_pem.as_bytes()));

    // No URI at all, for "certificate without identity" tests.
    let bare = ca
        .issue_client_cert("bare", None, now - BACKDATE, now + LEAF_VALIDITY)
        .unwrap();
    let der = pem_to_cert_der(bare.cert_pem.as_bytes()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    assert!(san_strings(&cert).is_empty());

    // Written pairs can be used like init_dev_pki's.
    let (pem, key) = (dir.path().join("old.pem"), dir.path().join("old.key"));
    expired.write(&pem, &key).unwrap();
    assert!(
        expired.write(&pem, &key).is_err(),
        "write must never overwrite"
    );
    assert!(!format!("{expired:?}").contains("PRIVATE KEY"));
    assert!(!format!("{ca:?}").contains("PRIVATE KEY"));
}

#[test]
fn inconsistent_directories_are_refused_not_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    init_dev_pki(dir.path(), &[], &names(&["notes"])).unwrap();

    // Half a pair.
    fs::remove_file(dir.path().join("notes.key")).unwrap();
    let err = init_dev_pki(dir.path(), &[], &names(&["notes"])).unwrap_err();
    assert!(matches!(err, PkiError::Inconsistent { .. }), "{err}");
    assert!(dir.path().join("notes.pem").exists());

    // A leaf from another CA.
    fs::remove_file(dir.path().join("notes.pem")).unwrap();
    let other = CertAuthority::generate_dev("other").unwrap();
    let now = OffsetDateTime::now_utc();
    other
        .issue_client_cert("notes", None, now - BACKDATE, now + LEAF_VALIDITY)
        .unwrap()
        .write(&dir.path().join("notes.pem"), &dir.path().join("notes.key"))
        .unwrap();
    let err = init_dev_pki(dir.path(), &[], &names(&["notes"])).unwrap_err();
    assert!(
        err.to_string()
            .contains("not a certificate issued by ca.pem"),
        "{err}"
    );
}

#[test]
fn kept_server_certificate_missing_a_name_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    init_dev_pki(dir.path(), &names(&["localhost"]), &[]).unwrap();
    let report = init_dev_pki(dir.path(), &names(&["localhost", "kms.dev"]), &[]).unwrap();
    assert_eq!(report.warnings.len(), 1);
    assert!(
        report.warnings[0].contains("kms.dev"),
        "{:?}",
        report.warnings
    );
}

#[test]
fn bad_client_names_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    for bad in [
        "",
        "ca",
        "server",
        "../x",
        "a/b",
        ".hidden",
        "é",
        &"x".repeat(65),
    ] {
        let err = init_dev_pki(dir.path(), &[], &names(&[bad])).unwrap_err();
        assert!(
            matches!(err, PkiError::InvalidName { .. }),
            "{bad:?}: {err}"
        );
    }
    // Nothing was written for invalid input.
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
}
