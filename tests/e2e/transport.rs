//! The transport around the key service: mutual TLS refuses every caller without a valid
//! client certificate from the configured CA, and health, reflection (v1 and v1alpha) and
//! Prometheus metrics answer.

use std::time::{Duration, Instant};

use kms_proto::kms::v1 as pb;
use kms_proto::kms::v1::key_management_service_client::KeyManagementServiceClient;
use kms_tests::metrics::{sample, scrape};
use kms_tests::{wire_ctx, KmsServer, ServerOptions};
use time::OffsetDateTime;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const SERVICE: &str = "kms.v1.KeyManagementService";

fn refusals(server: &KmsServer) -> usize {
    server.log().matches("TLS handshake refused").count()
}

/// Waits until the server has logged more than `before` refused handshakes.
async fn wait_for_refusal(server: &KmsServer, before: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while refusals(server) <= before {
        assert!(
            Instant::now() < deadline,
            "{what}: the server logged no refused TLS handshake:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Connecting may appear to succeed (in TLS 1.3 the server judges the client certificate
/// after the client has finished its side), so also try a call of each service: none may
/// succeed.
async fn assert_refused(
    server: &KmsServer,
    connect: impl std::future::Future<Output = Result<Channel, tonic::transport::Error>>,
    what: &str,
) {
    let before = refusals(server);
    let channel = match connect.await {
        Err(_) => {
            wait_for_refusal(server, before, what).await;
            return;
        }
        Ok(c) => c,
    };
    let list = KeyManagementServiceClient::new(channel.clone())
        .list_keys(pb::ListKeysRequest::default())
        .await;
    assert!(
        list.is_err(),
        "{what}: ListKeys answered {:?}",
        list.map(|r| r.into_inner().keys.len())
    );
    let gdk = KeyManagementServiceClient::new(channel.clone())
        .generate_data_key(pb::GenerateDataKeyRequest {
            key: "k".into(),
            encryption_context: wire_ctx(&[]),
        })
        .await;
    assert!(gdk.is_err(), "{what}: GenerateDataKey answered");
    let health = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await;
    assert!(health.is_err(), "{what}: health answered");
    wait_for_refusal(server, before, what).await;
}

fn tls_endpoint(server: &KmsServer, tls: ClientTlsConfig) -> tonic::transport::Endpoint {
    Channel::from_shared(server.endpoint())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
}

#[tokio::test]
async fn only_clients_with_a_valid_certificate_from_the_ca_get_in() {
    let server = KmsServer::start(ServerOptions::default()).await.unwrap();
    let mut kms = server.raw("app").await.unwrap();
    kms.create_key(pb::CreateKeyRequest {
        alias: "k".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let now = OffsetDateTime::now_utc();
    let day = time::Duration::days(1);
    let uri = kms_client::pki::client_uri("app");

    // Control: a fresh certificate issued by the test's own CA works, so the refusals below
    // are about the certificate, not about how the test builds its channels.
    let ca = server.ca().unwrap();
    let fresh = ca
        .issue_client_cert("app", Some(&uri), now - day, now + day)
        .unwrap();
    let channel = server
        .channel_with(
            fresh.cert_pem.into_bytes(),
            fresh.key_pem.as_bytes().to_vec(),
        )
        .await
        .unwrap();
    KeyManagementServiceClient::new(channel)
        .list_keys(pb::ListKeysRequest::default())
        .await
        .unwrap();

    // No client certificate at all: only the CA, to verify the server.
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(server.ca_pem()))
        .domain_name("localhost");
    assert_refused(
        &server,
        tls_endpoint(&server, tls).connect(),
        "no client certificate",
    )
    .await;

    // A certificate from another CA, with the same names as a real client.
    let other =
        kms_client::pki::CertAuthority::generate("Other CA", now - day, now + 3650 * day).unwrap();
    let foreign = other
        .issue_client_cert("app", Some(&uri), now - day, now + day)
        .unwrap();
    let connect = server.channel_with(
        foreign.cert_pem.into_bytes(),
        foreign.key_pem.as_bytes().to_vec(),
    );
    assert_refused(&server, connect, "certificate from another CA").await;

    // An expired certificate from the right CA.
    let expired = ca
        .issue_client_cert("app", Some(&uri), now - 30 * day, now - day)
        .unwrap();
    let connect = server.channel_with(
        expired.cert_pem.into_bytes(),
        expired.key_pem.as_bytes().to_vec(),
    );
    assert_refused(&server, connect, "expired certificate").await;

    // A certificate from the right CA that is not valid yet.
    let future = ca
        .issue_client_cert("app", Some(&uri), now + day, now + 30 * day)
        .unwrap();
    let connect = server.channel_with(
        future.cert_pem.into_bytes(),
        future.key_pem.as_bytes().to_vec(),
    );
    assert_refused(&server, connect, "not yet valid certificate").await;

    // Plaintext HTTP/2 to the TLS port.
    let plain = Channel::from_shared(format!("http://127.0.0.1:{}", server.addr.port()))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10));
    assert_refused(&server, plain.connect(), "plaintext HTTP/2").await;

    // The legitimate client is unaffected.
    kms.describe_key(pb::DescribeKeyRequest { key: "k".into() })
        .await
        .unwrap();
    assert!(!server.log().contains("panicked"));
}

async fn health_of(channel: Channel, service: &str) -> Result<ServingStatus, tonic::Status> {
    let r = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await?;
    Ok(ServingStatus::try_from(r.into_inner().status).unwrap())
}

#[tokio::test]
async fn health_reports_serving() {
    let server = KmsServer::start(ServerOptions::default()).await.unwrap();
    let channel = server.channel("app").await.unwrap();
    // The health loop sets the per-service status on its first round: allow it a moment.
    for service in ["", SERVICE] {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match health_of(channel.clone(), service).await {
                Ok(ServingStatus::Serving) => break,
                other => assert!(
                    Instant::now() < deadline,
                    "health of {service:?}: {other:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let unknown = health_of(channel, "no.such.Service").await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown}");
}

/// Lists services and fetches the file defining the key service, over one reflection version.
macro_rules! reflect {
    ($version:ident, $channel:expr) => {{
        use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::$version::ServerReflectionRequest;
        let requests = vec![
            ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            },
            ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::FileContainingSymbol(SERVICE.into())),
            },
        ];
        let mut client = ServerReflectionClient::new($channel);
        let mut answers = client
            .server_reflection_info(futures::stream::iter(requests))
            .await
            .unwrap()
            .into_inner();
        let mut services = Vec::new();
        let mut descriptors = Vec::new();
        while let Some(answer) = answers.message().await.unwrap() {
            match answer.message_response {
                Some(MessageResponse::ListServicesResponse(l)) => {
                    services.extend(l.service.into_iter().map(|s| s.name))
                }
                Some(MessageResponse::FileDescriptorResponse(f)) => {
                    descriptors.extend(f.file_descriptor_proto)
                }
                other => panic!(
                    "{}: unexpected reflection answer {other:?}",
                    stringify!($version)
                ),
            }
        }
        (services, descriptors)
    }};
}

#[tokio::test]
async fn reflection_answers_on_v1_and_v1alpha() {
    let server = KmsServer::start(ServerOptions::default()).await.unwrap();
    let channel = server.channel("app").await.unwrap();
    let v1 = reflect!(v1, channel.clone());
    let v1alpha = reflect!(v1alpha, channel);
    for (version, (services, descriptors)) in [("v1", v1), ("v1alpha", v1alpha)] {
        assert!(
            services.iter().any(|s| s == SERVICE),
            "{version}: {services:?}"
        );
        assert!(
            services.iter().any(|s| s == "grpc.health.v1.Health"),
            "{version}: {services:?}"
        );
        assert!(
            !descriptors.is_empty(),
            "{version}: no file descriptor for {SERVICE}"
        );
        let has = |needle: &[u8]| {
            descriptors
                .iter()
                .any(|d| d.windows(needle.len()).any(|w| w == needle))
        };
        assert!(
            has(b"KeyManagementService") && has(b"GenerateDataKey"),
            "{version}: descriptor lacks the service"
        );
    }
}

#[tokio::test]
async fn metrics_count_requests_and_show_the_session_pool() {
    let server = KmsServer::start(ServerOptions {
        metrics: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let addr = server.metrics_addr.unwrap();
    let mut kms = server.raw("app").await.unwrap();
    let key = kms
        .create_key(pb::CreateKeyRequest::default())
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap()
        .key_id;
    for _ in 0..3 {
        kms.generate_data_key(pb::GenerateDataKeyRequest {
            key: key.clone(),
            encryption_context: wire_ctx(&[]),
        })
        .await
        .unwrap();
    }
    let refused = kms
        .generate_data_key(pb::GenerateDataKeyRequest {
            key: String::new(),
            ..Default::default()
        })
        .await;
    assert_eq!(refused.unwrap_err().code(), Code::InvalidArgument);

    // The pool gauge comes from the health loop, once a second: poll.
    let deadline = Instant::now() + Duration::from_secs(5);
    let text = loop {
        let text = scrape(addr).await.unwrap();
        if sample(&text, "kms_hsm_sessions_in_use", &[]).is_some() {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "no kms_hsm_sessions_in_use gauge:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let gdk = ["rpc=\"GenerateDataKey\""];
    assert_eq!(
        sample(&text, "kms_requests_total", &[gdk[0], "code=\"Ok\""]),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "kms_requests_total",
            &[gdk[0], "code=\"InvalidArgument\""]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "kms_requests_total",
            &["rpc=\"CreateKey\"", "code=\"Ok\""]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "kms_request_duration_seconds_count", &gdk),
        Some(4.0),
        "{text}"
    );
    assert!(
        sample(
            &text,
            "kms_request_duration_seconds_bucket",
            &[gdk[0], "le=\"+Inf\""]
        )
        .is_some(),
        "{text}"
    );
    let in_use = sample(&text, "kms_hsm_sessions_in_use", &[]).unwrap();
    assert!(
        (0.0..=2.0).contains(&in_use),
        "sessions in use {in_use} with max_sessions 2"
    );
}
