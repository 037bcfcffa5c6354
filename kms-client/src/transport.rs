//! Channels to the endpoints (mutual TLS), ordered failover between them, a deadline on every
//! attempt, and retries with exponential backoff and jitter for calls that are safe to repeat.
//!
//! Policy, in one place:
//! - One lazily connected `Channel` per endpoint. A call starts at the *preferred* endpoint
//!   (initially the first; afterwards the last one that answered) and walks the list in
//!   order. A pass ends at the first answer that is not retryable, or after every endpoint.
//! - A failure is retryable only if its code is `UNAVAILABLE` (which tonic also reports when
//!   it cannot connect or finish the TLS handshake) **and** repeating the call is safe: the
//!   method is idempotent ([`Method::is_idempotent`]), or the request provably never left this
//!   process (the connection could not be established). Everything else, including
//!   `DEADLINE_EXCEEDED`, is returned at once: a server that is merely slow may still
//!   complete the call, and retrying would multiply its load.
//! - When a whole pass failed retryably, the client sleeps (`initial_backoff · 2^pass`,
//!   capped at [`MAX_BACKOFF`], "equal jitter": half fixed, half random) and makes another
//!   pass, at most `max_retries` times. The last status seen is returned.
//! - Every attempt carries `grpc-timeout = request_timeout`; a local timer of
//!   `connect_timeout + request_timeout` backs it up. A client-side expiry is reported as
//!   `DEADLINE_EXCEEDED` (tonic itself would say `CANCELLED`).
//! - Server streams ([`Transport::open_stream`]) get the same failover and retries for
//!   *opening* the stream (until the response headers arrive, bounded by the local timer),
//!   but no `grpc-timeout`: a live tail may run for hours. Once open, a stream is never
//!   retried or failed over; its reader decides how long to wait for each message.

use std::{
    future::Future,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use tonic::{
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
    Code, Status,
};

use crate::{error::code_name, Error, KmsClientConfig};

/// Upper bound of one backoff sleep.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The RPCs of `kms.v1.KeyManagementService` and `kms.v1.AuditService`, with their retry
/// safety.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    /// Not idempotent: a repeat would create a second key.
    CreateKey,
    /// Read only.
    DescribeKey,
    /// Read only.
    ListKeys,
    /// Sets a state; repeating it sets the same state.
    EnableKey,
    /// Sets a state; repeating it sets the same state.
    DisableKey,
    /// Each call makes a fresh data key and stores nothing: a repeat only wastes a key.
    GenerateDataKey,
    /// As `GenerateDataKey`, item by item.
    GenerateDataKeys,
    /// As `GenerateDataKey`.
    GenerateDataKeyWithoutPlaintext,
    /// Stores nothing; a repeat returns another valid blob for the same plaintext.
    Encrypt,
    /// Stores nothing (the audit log may record the attempt twice).
    Decrypt,
    /// As `Decrypt`, item by item.
    BatchDecrypt,
    /// Stores nothing; as `Encrypt`.
    ReEncrypt,
    /// Read only.
    WhoAmI,
    /// Stores nothing; as `ReEncrypt`, item by item.
    BatchReEncrypt,
    /// Not idempotent: a repeat would create another version.
    RotateKey,
    /// Read only.
    ListKeyVersions,
    /// Sets a state; repeating it sets the same state.
    EnableKeyVersion,
    /// Sets a state; repeating it sets the same state.
    DisableKeyVersion,
    /// Sets a value (the next rotation is counted again from the repeat).
    SetKeyRotationPeriod,
    /// Sets a value.
    SetMinDecryptionVersion,
    /// A repeat on a key already pending deletion keeps the first date.
    ScheduleKeyDeletion,
    /// Not idempotent: a repeat after success finds the key no longer pending deletion.
    CancelKeyDeletion,
    /// A repeat on an erased key returns a receipt for the same destruction.
    EraseKey,
    /// Read only (the query itself is audited).
    QueryAuditEvents,
    /// Read only: opens a live tail.
    StreamAuditEvents,
    /// Read only.
    GetAuditPublicKey,
    /// Read only (the server may sign a checkpoint of its current head first).
    VerifyAuditLog,
    /// Read only (the server may sign a checkpoint of its current head first).
    ExportAuditLog,
}

impl Method {
    /// The RPC name as in the proto.
    pub fn name(self) -> &'static str {
        match self {
            Method::CreateKey => "CreateKey",
            Method::DescribeKey => "DescribeKey",
            Method::ListKeys => "ListKeys",
            Method::EnableKey => "EnableKey",
            Method::DisableKey => "DisableKey",
            Method::GenerateDataKey => "GenerateDataKey",
            Method::GenerateDataKeys => "GenerateDataKeys",
            Method::GenerateDataKeyWithoutPlaintext => "GenerateDataKeyWithoutPlaintext",
            Method::Encrypt => "Encrypt",
            Method::Decrypt => "Decrypt",
            Method::BatchDecrypt => "BatchDecrypt",
            Method::ReEncrypt => "ReEncrypt",
            Method::WhoAmI => "WhoAmI",
            Method::BatchReEncrypt => "BatchReEncrypt",
            Method::RotateKey => "RotateKey",
            Method::ListKeyVersions => "ListKeyVersions",
            Method::EnableKeyVersion => "EnableKeyVersion",
            Method::DisableKeyVersion => "DisableKeyVersion",
            Method::SetKeyRotationPeriod => "SetKeyRotationPeriod",
            Method::SetMinDecryptionVersion => "SetMinDecryptionVersion",
            Method::ScheduleKeyDeletion => "ScheduleKeyDeletion",
            Method::CancelKeyDeletion => "CancelKeyDeletion",
            Method::EraseKey => "EraseKey",
            Method::QueryAuditEvents => "QueryAuditEvents",
            Method::StreamAuditEvents => "StreamAuditEvents",
            Method::GetAuditPublicKey => "GetAuditPublicKey",
            Method::VerifyAuditLog => "VerifyAuditLog",
            Method::ExportAuditLog => "ExportAuditLog",
        }
    }

    /// Whether sending the request twice is harmless.
    pub fn is_idempotent(self) -> bool {
        !matches!(
            self,
            Method::CreateKey | Method::RotateKey | Method::CancelKeyDeletion
        )
    }
}

/// What to do after a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Disposition {
    /// Return the error to the caller.
    Fail,
    /// Try the next endpoint, and retry after backoff once all have failed.
    Retry,
}

/// The retry rule (see the module documentation).
pub(crate) fn classify(method: Method, status: &Status) -> Disposition {
    let safe = method.is_idempotent() || is_connect_error(status);
    if status.code() == Code::Unavailable && safe {
        Disposition::Retry
    } else {
        Disposition::Fail
    }
}

/// True when the status comes from failing to establish the connection (TCP or TLS), i.e.
/// the request was never sent.
pub(crate) fn is_connect_error(status: &Status) -> bool {
    source_chain_has::<tonic::ConnectError>(status)
}

fn source_chain_has<E: std::error::Error + 'static>(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        if err.is::<E>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// A status made locally by tonic from a transport failure says little ("transport error",
/// "tcp connect error"); add its causes (e.g. "Connection refused", a certificate problem,
/// a TLS alert) to the message. Statuses received from a server have no source and are
/// returned unchanged.
fn explain_local_error(status: Status) -> Status {
    let mut message = status.message().to_string();
    let mut source = std::error::Error::source(&status);
    if source.is_none() {
        return status;
    }
    while let Some(err) = source {
        let text = err.to_string();
        if text != "transport error" && !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = err.source();
    }
    Status::new(status.code(), message)
}

/// Reports a client-side deadline expiry as `DEADLINE_EXCEEDED` instead of tonic's `CANCELLED`.
fn normalize(status: Status, timeout: Duration) -> Status {
    if status.code() == Code::Cancelled && source_chain_has::<tonic::TimeoutExpired>(&status) {
        deadline_exceeded(timeout)
    } else {
        status
    }
}

fn deadline_exceeded(timeout: Duration) -> Status {
    Status::deadline_exceeded(format!(
        "no answer within the {} ms deadline",
        timeout.as_millis()
    ))
}

/// Sleep before retry pass `pass` (0-based): `initial · 2^pass` capped at [`MAX_BACKOFF`], of
/// which half is fixed and half scaled by `jitter` (in `[0, 1)`).
pub(crate) fn backoff_delay(initial: Duration, pass: u32, jitter: f64) -> Duration {
    let exponential = initial.saturating_mul(2u32.saturating_pow(pass.min(20)));
    let capped = exponential.min(MAX_BACKOFF);
    let half = capped / 2;
    half + half.mul_f64(jitter.clamp(0.0, 1.0))
}

/// One endpoint: its URL (for errors and logs) and its channel, shared by the generated
/// clients of every service.
#[derive(Clone, Debug)]
struct Target {
    url: String,
    channel: Channel,
}

/// Whether an attempt carries `grpc-timeout` (unary calls) or not (server streams).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Deadline {
    Call,
    OpenStream,
}

/// The endpoints and the call policy. Cheap to clone; clones share the channels.
#[derive(Clone, Debug)]
pub(crate) struct Transport {
    targets: Arc<[Target]>,
    preferred: Arc<AtomicUsize>,
    request_timeout: Duration,
    connect_timeout: Duration,
    max_retries: u32,
    initial_backoff: Duration,
}

impl Transport {
    /// Builds one lazy channel per endpoint. No network I/O happens here, but a Tokio runtime
    /// must be running (tonic spawns a worker per channel).
    pub(crate) fn new(config: &KmsClientConfig) -> Result<Self, Error> {
        config.validate()?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::Config(
                "KmsClient must be created inside a Tokio runtime".into(),
            ));
        }
        let targets = config
            .endpoints
            .iter()
            .map(|url| build_target(url, config))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            targets: targets.into(),
            preferred: Arc::new(AtomicUsize::new(0)),
            request_timeout: config.request_timeout,
            connect_timeout: config.connect_timeout,
            max_retries: config.max_retries,
            initial_backoff: config.initial_backoff,
        })
    }

    /// Runs one RPC under the policy. `make` builds a fresh request message for each attempt;
    /// `send` performs it on the given endpoint's channel.
    pub(crate) async fn call<Req, Resp, Fut>(
        &self,
        method: Method,
        make: impl Fn() -> Req,
        send: impl Fn(Channel, tonic::Request<Req>) -> Fut,
    ) -> Result<Resp, Error>
    where
        Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        let (response, _endpoint) = self.call_at(method, make, send).await?;
        Ok(response)
    }

    /// [`Transport::call`], also returning the endpoint that answered (for per-item errors of
    /// a batch call).
    pub(crate) async fn call_at<Req, Resp, Fut>(
        &self,
        method: Method,
        make: impl Fn() -> Req,
        send: impl Fn(Channel, tonic::Request<Req>) -> Fut,
    ) -> Result<(Resp, String), Error>
    where
        Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        self.run(method, Deadline::Call, make, send).await
    }

    /// Opens a server stream under the policy (see the module documentation): no
    /// `grpc-timeout`, failover and retries only until the stream is open. Returns the stream
    /// and the endpoint that serves it (for errors met while reading it).
    pub(crate) async fn open_stream<Req, Resp, Fut>(
        &self,
        method: Method,
        make: impl Fn() -> Req,
        send: impl Fn(Channel, tonic::Request<Req>) -> Fut,
    ) -> Result<(Resp, String), Error>
    where
        Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        self.run(method, Deadline::OpenStream, make, send).await
    }

    /// The deadline of one message of an open stream: the per-attempt request timeout.
    pub(crate) fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    async fn run<Req, Resp, Fut>(
        &self,
        method: Method,
        deadline: Deadline,
        make: impl Fn() -> Req,
        send: impl Fn(Channel, tonic::Request<Req>) -> Fut,
    ) -> Result<(Resp, String), Error>
    where
        Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        let count = self.targets.len();
        let guard = self.connect_timeout + self.request_timeout;
        let mut pass = 0;
        loop {
            let start = self.preferred.load(Ordering::Relaxed) % count;
            let mut last = None;
            for offset in 0..count {
                let index = (start + offset) % count;
                let target = &self.targets[index];
                let mut request = tonic::Request::new(make());
                if deadline == Deadline::Call {
                    request.set_timeout(self.request_timeout);
                }
                let outcome = match tokio::time::timeout(
                    guard,
                    send(target.channel.clone(), request),
                )
                .await
                {
                    Ok(result) => result.map_err(|s| normalize(s, self.request_timeout)),
                    Err(_elapsed) => Err(deadline_exceeded(self.request_timeout)),
                };
                let status = match outcome {
                    Ok(response) => {
                        if index != start {
                            self.preferred.store(index, Ordering::Relaxed);
                            tracing::info!(method = method.name(), endpoint = %target.url, "failed over");
                        }
                        return Ok((response.into_inner(), target.url.clone()));
                    }
                    Err(status) => status,
                };
                let disposition = classify(method, &status);
                let status = explain_local_error(status);
                tracing::debug!(
                    method = method.name(),
                    endpoint = %target.url,
                    code = code_name(status.code()),
                    pass,
                    retry = disposition == Disposition::Retry,
                    "attempt failed"
                );
                let error = Error::Rpc {
                    method: method.name(),
                    endpoint: target.url.clone(),
                    status,
                };
                if disposition == Disposition::Fail {
                    return Err(error);
                }
                last = Some(error);
            }
            let Some(error) = last else {
                return Err(Error::Config("no endpoint".into()));
            };
            if pass >= self.max_retries {
                return Err(error);
            }
            let delay = backoff_delay(self.initial_backoff, pass, rand::random::<f64>());
            tracing::debug!(
                method = method.name(),
                delay_ms = delay.as_millis() as u64,
                "backing off"
            );
            tokio::time::sleep(delay).await;
            pass += 1;
        }
    }
}

/// A lazily connecting mutual-TLS channel to `url`.
fn build_target(url: &str, config: &KmsClientConfig) -> Result<Target, Error> {
    // tonic copies the key into its own (non-zeroizing) buffer; that copy lives as long as
    // the channel. The config's copy stays in `Zeroizing`.
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&config.ca_pem))
        .identity(Identity::from_pem(&config.cert_pem, &*config.key_pem))
        .timeout(config.connect_timeout);
    if let Some(name) = &config.server_name {
        tls = tls.domain_name(name.clone());
    }
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| Error::Config(format!("endpoint {url:?}: {}", chain(&e))))?
        .connect_timeout(config.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .tls_config(tls)
        .map_err(|e| Error::Config(format!("TLS setup for {url}: {}", chain(&e))))?;
    Ok(Target {
        url: url.to_string(),
        channel: endpoint.connect_lazy(),
    })
}

/// An error and its sources on one line. Used only for configuration errors (PEM parsing,
/// URL syntax), whose messages contain no key material.
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Method; 18] = [
        Method::CreateKey,
        Method::DescribeKey,
        Method::ListKeys,
        Method::EnableKey,
        Method::DisableKey,
        Method::GenerateDataKey,
        Method::GenerateDataKeys,
        Method::GenerateDataKeyWithoutPlaintext,
        Method::Encrypt,
        Method::Decrypt,
        Method::BatchDecrypt,
        Method::ReEncrypt,
        Method::WhoAmI,
        Method::QueryAuditEvents,
        Method::StreamAuditEvents,
        Method::GetAuditPublicKey,
        Method::VerifyAuditLog,
        Method::ExportAuditLog,
    ];

    #[test]
    fn only_create_key_is_not_idempotent() {
        let not: Vec<_> = ALL.iter().filter(|m| !m.is_idempotent()).collect();
        assert_eq!(not, [&Method::CreateKey]);
    }

    #[test]
    fn unavailable_is_retried_for_idempotent_methods_only() {
        let unavailable = Status::unavailable("backend down");
        for m in ALL {
            let expected = if m == Method::CreateKey {
                Disposition::Fail
            } else {
                Disposition::Retry
            };
            assert_eq!(classify(m, &unavailable), expected, "{m:?}");
        }
    }

    #[test]
    fn other_codes_are_never_retried() {
        for code in [
            Code::DeadlineExceeded,
            Code::Cancelled,
            Code::Internal,
            Code::NotFound,
            Code::PermissionDenied,
            Code::FailedPrecondition,
            Code::ResourceExhausted,
            Code::Unknown,
        ] {
            for m in ALL {
                assert_eq!(classify(m, &Status::new(code, "x")), Disposition::Fail);
            }
        }
    }

    #[test]
    fn connect_errors_are_retried_even_for_create_key() {
        let status = Status::from_error(Box::new(tonic::ConnectError(
            "tcp connect error: Connection refused".into(),
        )));
        assert_eq!(status.code(), Code::Unavailable);
        assert!(is_connect_error(&status));
        assert_eq!(classify(Method::CreateKey, &status), Disposition::Retry);
        assert!(!is_connect_error(&Status::unavailable("x")));
    }

    #[test]
    fn client_timeouts_become_deadline_exceeded() {
        let status = Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert_eq!(status.code(), Code::Cancelled);
        let status = normalize(status, Duration::from_millis(250));
        assert_eq!(status.code(), Code::DeadlineExceeded);
        assert!(status.message().contains("250 ms"));
        // A cancellation that is not a timeout stays as it is.
        assert_eq!(
            normalize(Status::cancelled("by peer"), Duration::from_secs(1)).code(),
            Code::Cancelled
        );
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let initial = Duration::from_millis(100);
        assert_eq!(backoff_delay(initial, 0, 0.0), Duration::from_millis(50));
        assert_eq!(backoff_delay(initial, 0, 1.0), Duration::from_millis(100));
        assert_eq!(backoff_delay(initial, 3, 0.0), Duration::from_millis(400));
        assert_eq!(backoff_delay(initial, 3, 0.5), Duration::from_millis(600));
        assert_eq!(backoff_delay(initial, 40, 1.0), MAX_BACKOFF);
        assert_eq!(backoff_delay(initial, u32::MAX, 0.0), MAX_BACKOFF / 2);
        for pass in 0..10 {
            let lo = backoff_delay(initial, pass, 0.0);
            let hi = backoff_delay(initial, pass, 0.999);
            assert!(lo <= hi && hi <= MAX_BACKOFF);
        }
    }
}
