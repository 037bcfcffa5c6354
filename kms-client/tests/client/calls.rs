//! `KmsClient` against mock servers: every method, failover, retry rules, deadlines, TLS.

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use kms_client::{pki, AuditMetadata, Code, Error, KeyState, KmsClient};

use crate::mock::{closed_port, config, mock, setup, start, Mock};

#[tokio::test]
async fn all_methods_round_trip_over_mutual_tls() {
    let pki = setup();
    let server = start(pki.path(), mock("a")).await;
    let kms = KmsClient::new(&config(pki.path(), vec![server.url.clone()])).unwrap();
    let ctx = BTreeMap::from([("note".to_string(), "42".to_string())]);

    let key = kms.create_key(Some("notes"), None).await.unwrap();
    assert_eq!(
        (key.key_id.as_str(), key.alias.as_deref()),
        ("id-notes", Some("notes"))
    );
    assert_eq!(
        kms.disable_key("k").await.unwrap().state,
        KeyState::Disabled
    );
    assert_eq!(kms.enable_key("k").await.unwrap().state, KeyState::Enabled);
    let all = kms.list_all_keys(2).await.unwrap();
    let aliases: Vec<_> = all.iter().filter_map(|k| k.alias.clone()).collect();
    assert_eq!(aliases, ["a", "b", "c"]);

    let dk = kms.generate_data_key("notes", &ctx).await.unwrap();
    assert_eq!(dk.plaintext.as_slice(), &[7u8; 32]);
    assert!(!format!("{dk:?}").contains("7, 7"));
    let back = kms.decrypt(&dk.ciphertext_blob, &ctx, None).await.unwrap();
    assert_eq!(back.plaintext, dk.plaintext);

    let blob = kms.encrypt("notes", b"hello", &ctx).await.unwrap();
    let audit = AuditMetadata {
        acting_user: "u1".into(),
        purpose: "TREATMENT".into(),
    };
    let back = kms
        .decrypt(&blob.ciphertext_blob, &ctx, Some(audit))
        .await
        .unwrap();
    assert_eq!(back.plaintext.as_slice(), b"hello");

    let wrong = BTreeMap::from([("note".to_string(), "43".to_string())]);
    let err = kms
        .decrypt(&blob.ciphertext_blob, &wrong, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument));
    assert!(!err.to_string().contains("hello"));

    let re = kms.re_encrypt(&blob.ciphertext_blob, &ctx, Some("k2"), Some(&wrong), None);
    assert_eq!(re.await.unwrap().ciphertext_blob, b"to=k2 ctx_set=true n=1");
    let re = kms
        .re_encrypt(&blob.ciphertext_blob, &ctx, None, None, None)
        .await
        .unwrap();
    assert_eq!(re.ciphertext_blob, b"to= ctx_set=false n=0");
    assert_eq!(re.key_version, 2);

    let wrapped = kms
        .generate_data_key_without_plaintext("notes", &ctx)
        .await
        .unwrap();
    assert_eq!(wrapped.ciphertext_blob, b"wrapped");
}

#[tokio::test]
async fn unreachable_endpoint_fails_over_even_for_create_key() {
    let pki = setup();
    let server = start(pki.path(), mock("b")).await;
    let kms = KmsClient::new(&config(pki.path(), vec![closed_port(), server.url.clone()])).unwrap();
    kms.create_key(Some("x"), None).await.unwrap();
    assert_eq!(server.mock.creates.load(Ordering::SeqCst), 1);
    // Sticky: the next call goes straight to the endpoint that answered.
    assert_eq!(kms.describe_key("k").await.unwrap().backend, "b");
    assert_eq!(server.mock.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn server_unavailable_fails_over_idempotent_calls_but_not_create_key() {
    let pki = setup();
    let a = start(
        pki.path(),
        Mock {
            fail_first: AtomicU32::new(100),
            ..mock("a")
        },
    )
    .await;
    let b = start(pki.path(), mock("b")).await;
    let kms = KmsClient::new(&config(pki.path(), vec![a.url.clone(), b.url.clone()])).unwrap();

    let err = kms.create_key(Some("x"), None).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable));
    assert!(
        matches!(&err, Error::Rpc { endpoint, .. } if *endpoint == a.url),
        "{err}"
    );
    assert_eq!(
        b.mock.calls.load(Ordering::SeqCst),
        0,
        "CreateKey must not be re-sent"
    );

    assert_eq!(kms.describe_key("k").await.unwrap().backend, "b");
    assert_eq!(a.mock.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn unavailable_is_retried_with_backoff_up_to_max_retries() {
    let pki = setup();
    let s = start(
        pki.path(),
        Mock {
            fail_first: AtomicU32::new(2),
            ..mock("a")
        },
    )
    .await;
    let kms = KmsClient::new(&config(pki.path(), vec![s.url.clone()])).unwrap();
    kms.describe_key("k").await.unwrap();
    assert_eq!(s.mock.calls.load(Ordering::SeqCst), 3);

    s.mock.fail_first.store(100, Ordering::SeqCst);
    let err = kms.encrypt("k", b"x", &BTreeMap::new()).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable));
    assert_eq!(
        s.mock.calls.load(Ordering::SeqCst),
        3 + 3,
        "1 try + max_retries 2"
    );

    // Errors other than UNAVAILABLE are returned at once.
    s.mock.fail_first.store(0, Ordering::SeqCst);
    let err = kms.describe_key("missing").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound));
    assert_eq!(s.mock.calls.load(Ordering::SeqCst), 7);
}

#[tokio::test]
async fn slow_server_hits_the_deadline_and_is_not_retried() {
    let pki = setup();
    let s = start(
        pki.path(),
        Mock {
            delay: Some(Duration::from_secs(3)),
            ..mock("a")
        },
    )
    .await;
    let mut cfg = config(pki.path(), vec![s.url.clone()]);
    cfg.request_timeout = Duration::from_millis(300);
    let kms = KmsClient::new(&cfg).unwrap();
    let started = std::time::Instant::now();
    let err = kms.describe_key("k").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::DeadlineExceeded), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(s.mock.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn tls_failures_are_errors() {
    let pki = setup();
    let s = start(pki.path(), mock("a")).await;

    // Wrong server name.
    let mut cfg = config(pki.path(), vec![s.url.clone()]);
    cfg.server_name = Some("not-the-server.example".into());
    cfg.max_retries = 0;
    let err = KmsClient::new(&cfg)
        .unwrap()
        .describe_key("k")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
    assert!(err.to_string().contains("not valid for name"), "{err}");

    // The right override works (the certificate has DNS localhost).
    cfg.server_name = Some("localhost".into());
    KmsClient::new(&cfg)
        .unwrap()
        .describe_key("k")
        .await
        .unwrap();

    // A client certificate from another CA is refused by the server.
    let other = tempfile::tempdir().unwrap();
    pki::init_dev_pki(other.path(), &[], &["notes".into()]).unwrap();
    let mut cfg = config(pki.path(), vec![s.url.clone()]);
    cfg.cert_pem = std::fs::read(other.path().join("notes.pem")).unwrap();
    cfg.key_pem = std::fs::read(other.path().join("notes.key"))
        .unwrap()
        .into();
    cfg.max_retries = 0;
    let err = KmsClient::new(&cfg)
        .unwrap()
        .describe_key("k")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("UnknownCA"), "{err}");
    assert_eq!(
        s.mock.calls.load(Ordering::SeqCst),
        1,
        "only the good client got through"
    );
}

#[tokio::test]
async fn bad_configuration_is_rejected_up_front() {
    let pki = setup();
    let mut cfg = config(pki.path(), vec!["https://127.0.0.1:1".into()]);
    cfg.key_pem = b"not a key".to_vec().into();
    assert!(matches!(KmsClient::new(&cfg), Err(Error::Config(_))));
    let cfg = config(pki.path(), vec!["http://127.0.0.1:1".into()]);
    assert!(matches!(KmsClient::new(&cfg), Err(Error::Config(_))));
}

#[test]
fn creating_a_client_outside_a_runtime_is_an_error_not_a_panic() {
    let pki = setup();
    let cfg = config(pki.path(), vec!["https://127.0.0.1:1".into()]);
    let err = KmsClient::new(&cfg).unwrap_err();
    assert!(err.to_string().contains("Tokio runtime"), "{err}");
}
