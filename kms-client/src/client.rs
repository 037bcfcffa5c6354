//! `KmsClient`: one typed method per kms.v1 RPC, each run under the transport's deadline,
//! failover and retry policy.

use std::mem;

use kms_proto::kms::v1::{self as pb, key_management_service_client::KeyManagementServiceClient};
use tonic::transport::Channel;
use zeroize::Zeroizing;

use crate::{
    transport::{Method, Transport},
    types::{required_key, to_proto_context},
    AuditClient, AuditMetadata, Ciphertext, DataKey, Decrypted, EncryptionContext, Error,
    KeyMetadata, KeyPage, KmsClientConfig, ReEncrypted,
};

/// The generated client of the key service over one endpoint's channel.
type Grpc = KeyManagementServiceClient<Channel>;

/// Largest number of items the server accepts in one `GenerateDataKeys` call.
pub const MAX_DATA_KEYS_PER_CALL: usize = 64;

/// Largest number of items the server accepts in one `BatchDecrypt` call.
pub const MAX_DECRYPTS_PER_CALL: usize = 64;

/// Upper bound on pages followed by [`KmsClient::list_all_keys`], against a server that never
/// stops returning tokens.
const MAX_PAGES: usize = 10_000;

/// An async client of `kms.v1.KeyManagementService` over mutual TLS.
///
/// Cheap to clone: clones share the connections. See the crate documentation for the
/// failover, deadline and retry policy.
#[derive(Clone, Debug)]
pub struct KmsClient {
    pub(crate) transport: Transport,
}

impl KmsClient {
    /// Builds the client. Checks the configuration and parses the TLS material, but does not
    /// connect: each endpoint is connected on first use. Must be called inside a Tokio
    /// runtime (an error otherwise).
    pub fn new(config: &KmsClientConfig) -> Result<Self, Error> {
        Ok(Self {
            transport: Transport::new(config)?,
        })
    }

    /// A client of the audit service sharing this client's connections and policy. The
    /// server answers it only for identities its policy makes auditors.
    pub fn audit(&self) -> AuditClient {
        AuditClient::with_transport(self.transport.clone())
    }

    /// Creates a master key. **Never re-sent** once it may have reached a server (a repeat
    /// would create a second key): it is retried or failed over only when no connection could
    /// be established. After an ambiguous failure, look the key up by alias.
    pub async fn create_key(
        &self,
        alias: Option<&str>,
        description: Option<&str>,
    ) -> Result<KeyMetadata, Error> {
        let response = self
            .transport
            .call(
                Method::CreateKey,
                || pb::CreateKeyRequest {
                    alias: alias.unwrap_or_default().to_string(),
                    description: description.unwrap_or_default().to_string(),
                    rotation_period_seconds: 0,
                },
                |channel, request| async move { Grpc::new(channel).create_key(request).await },
            )
            .await?;
        required_key("CreateKey", response.key)
    }

    /// The metadata of a key named by UUID or alias.
    pub async fn describe_key(&self, key: &str) -> Result<KeyMetadata, Error> {
        let response = self
            .transport
            .call(
                Method::DescribeKey,
                || pb::DescribeKeyRequest { key: key.into() },
                |channel, request| async move { Grpc::new(channel).describe_key(request).await },
            )
            .await?;
        required_key("DescribeKey", response.key)
    }

    /// One page of keys. `page_size` 0 lets the server choose (100); `page_token` is `None`
    /// for the first page.
    pub async fn list_keys(
        &self,
        page_size: u32,
        page_token: Option<&str>,
    ) -> Result<KeyPage, Error> {
        let response = self
            .transport
            .call(
                Method::ListKeys,
                || pb::ListKeysRequest {
                    page_size,
                    page_token: page_token.unwrap_or_default().to_string(),
                },
                |channel, request| async move { Grpc::new(channel).list_keys(request).await },
            )
            .await?;
        Ok(KeyPage {
            keys: response.keys.into_iter().map(KeyMetadata::from).collect(),
            next_page_token: (!response.next_page_token.is_empty())
                .then_some(response.next_page_token),
        })
    }

    /// Every key, following all pages.
    pub async fn list_all_keys(&self, page_size: u32) -> Result<Vec<KeyMetadata>, Error> {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let page = self.list_keys(page_size, token.as_deref()).await?;
            keys.extend(page.keys);
            match page.next_page_token {
                None => return Ok(keys),
                Some(next) if token.as_deref() == Some(next.as_str()) => {
                    return Err(Error::InvalidResponse {
                        method: "ListKeys",
                        reason: "the server returned the same page token twice".into(),
                    });
                }
                Some(next) => token = Some(next),
            }
        }
        Err(Error::InvalidResponse {
            method: "ListKeys",
            reason: format!("more than {MAX_PAGES} pages"),
        })
    }

    /// Enables a key (idempotent).
    pub async fn enable_key(&self, key: &str) -> Result<KeyMetadata, Error> {
        let response = self
            .transport
            .call(
                Method::EnableKey,
                || pb::EnableKeyRequest { key: key.into() },
                |channel, request| async move { Grpc::new(channel).enable_key(request).await },
            )
            .await?;
        required_key("EnableKey", response.key)
    }

    /// Disables a key (idempotent).
    pub async fn disable_key(&self, key: &str) -> Result<KeyMetadata, Error> {
        let response = self
            .transport
            .call(
                Method::DisableKey,
                || pb::DisableKeyRequest { key: key.into() },
                |channel, request| async move { Grpc::new(channel).disable_key(request).await },
            )
            .await?;
        required_key("DisableKey", response.key)
    }

    /// A fresh 32-byte data key, in plaintext and wrapped under `key`, bound to `context`.
    pub async fn generate_data_key(
        &self,
        key: &str,
        context: &EncryptionContext,
    ) -> Result<DataKey, Error> {
        let mut response =
            self.transport
                .call(
                    Method::GenerateDataKey,
                    || pb::GenerateDataKeyRequest {
                        key: key.into(),
                        encryption_context: to_proto_context(context),
                    },
                    |channel, request| async move {
                        Grpc::new(channel).generate_data_key(request).await
                    },
                )
                .await?;
        // Move (not copy) the plaintext into zeroizing memory.
        let plaintext = Zeroizing::new(mem::take(&mut response.plaintext));
        Ok(DataKey {
            plaintext,
            ciphertext_blob: response.ciphertext_blob,
            key_id: response.key_id,
            key_version: response.key_version,
        })
    }

    /// Up to [`MAX_DATA_KEYS_PER_CALL`] fresh data keys in one call, item `i` under
    /// `items[i].0` bound to `items[i].1`: one result per item, in order. An item fails alone
    /// (its error is an [`Error::Rpc`] with the item's status); the whole call fails only if
    /// the call itself does. Each item is authorized and audited as a `generate_data_key`.
    pub async fn generate_data_keys(
        &self,
        items: &[(&str, &EncryptionContext)],
    ) -> Result<Vec<Result<DataKey, Error>>, Error> {
        let (response, endpoint) =
            self.transport
                .call_at(
                    Method::GenerateDataKeys,
                    || pb::GenerateDataKeysRequest {
                        items: items
                            .iter()
                            .map(|(key, context)| pb::GenerateDataKeyRequest {
                                key: (*key).into(),
                                encryption_context: to_proto_context(context),
                            })
                            .collect(),
                    },
                    |channel, request| async move {
                        Grpc::new(channel).generate_data_keys(request).await
                    },
                )
                .await?;
        let results = response
            .results
            .into_iter()
            .map(|r| (r.code, r.message, r.data_key));
        item_results(
            "GenerateDataKeys",
            &endpoint,
            items.len(),
            results,
            |mut dk| {
                DataKey {
                    // Move (not copy) the plaintext into zeroizing memory.
                    plaintext: Zeroizing::new(mem::take(&mut dk.plaintext)),
                    ciphertext_blob: dk.ciphertext_blob,
                    key_id: dk.key_id,
                    key_version: dk.key_version,
                }
            },
        )
    }

    /// A fresh data key, wrapped only (for a component that will decrypt it later).
    pub async fn generate_data_key_without_plaintext(
        &self,
        key: &str,
        context: &EncryptionContext,
    ) -> Result<Ciphertext, Error> {
        let response = self
            .transport
            .call(
                Method::GenerateDataKeyWithoutPlaintext,
                || pb::GenerateDataKeyWithoutPlaintextRequest {
                    key: key.into(),
                    encryption_context: to_proto_context(context),
                },
                |channel, request| async move {
                    Grpc::new(channel)
                        .generate_data_key_without_plaintext(request)
                        .await
                },
            )
            .await?;
        Ok(Ciphertext {
            ciphertext_blob: response.ciphertext_blob,
            key_id: response.key_id,
            key_version: response.key_version,
        })
    }

    /// Encrypts up to 4096 bytes directly under `key`. The request copies of `plaintext`
    /// inside prost/tonic buffers are not zeroized; prefer data keys for bulk data.
    pub async fn encrypt(
        &self,
        key: &str,
        plaintext: &[u8],
        context: &EncryptionContext,
    ) -> Result<Ciphertext, Error> {
        let response = self
            .transport
            .call(
                Method::Encrypt,
                || pb::EncryptRequest {
                    key: key.into(),
                    plaintext: plaintext.to_vec(),
                    encryption_context: to_proto_context(context),
                },
                |channel, request| async move { Grpc::new(channel).encrypt(request).await },
            )
            .await?;
        Ok(Ciphertext {
            ciphertext_blob: response.ciphertext_blob,
            key_id: response.key_id,
            key_version: response.key_version,
        })
    }

    /// Decrypts a blob (from `Encrypt` or a data key) with the exact context it was made with.
    /// `audit` says who is acting and why; it is logged by the server.
    pub async fn decrypt(
        &self,
        ciphertext_blob: &[u8],
        context: &EncryptionContext,
        audit: Option<AuditMetadata>,
    ) -> Result<Decrypted, Error> {
        let mut response = self
            .transport
            .call(
                Method::Decrypt,
                || pb::DecryptRequest {
                    ciphertext_blob: ciphertext_blob.to_vec(),
                    encryption_context: to_proto_context(context),
                    audit: audit.clone().map(Into::into),
                },
                |channel, request| async move { Grpc::new(channel).decrypt(request).await },
            )
            .await?;
        let plaintext = Zeroizing::new(mem::take(&mut response.plaintext));
        Ok(Decrypted {
            plaintext,
            key_id: response.key_id,
            key_version: response.key_version,
        })
    }

    /// Up to [`MAX_DECRYPTS_PER_CALL`] decryptions in one call, item `i` opening `items[i].0`
    /// with context `items[i].1` on behalf of `items[i].2`: one result per item, in order. An
    /// item fails alone (its error is an [`Error::Rpc`] with the item's status); the whole call
    /// fails only if the call itself does. Each item is authorized and audited as a `decrypt`,
    /// with its own audit metadata.
    pub async fn batch_decrypt(
        &self,
        items: &[(&[u8], &EncryptionContext, Option<&AuditMetadata>)],
    ) -> Result<Vec<Result<Decrypted, Error>>, Error> {
        let (response, endpoint) = self
            .transport
            .call_at(
                Method::BatchDecrypt,
                || pb::BatchDecryptRequest {
                    items: items
                        .iter()
                        .map(|(blob, context, audit)| pb::DecryptRequest {
                            ciphertext_blob: blob.to_vec(),
                            encryption_context: to_proto_context(context),
                            audit: audit.cloned().map(Into::into),
                        })
                        .collect(),
                },
                |channel, request| async move { Grpc::new(channel).batch_decrypt(request).await },
            )
            .await?;
        let results = response
            .results
            .into_iter()
            .map(|r| (r.code, r.message, r.decrypted));
        item_results(
            "BatchDecrypt",
            &endpoint,
            items.len(),
            results,
            |mut out| {
                Decrypted {
                    // Move (not copy) the plaintext into zeroizing memory.
                    plaintext: Zeroizing::new(mem::take(&mut out.plaintext)),
                    key_id: out.key_id,
                    key_version: out.key_version,
                }
            },
        )
    }

    /// Re-wraps a blob without revealing its plaintext to the caller: under
    /// `destination_key` (default: the source key's primary version) and with
    /// `destination_context` (default: the source context).
    pub async fn re_encrypt(
        &self,
        ciphertext_blob: &[u8],
        source_context: &EncryptionContext,
        destination_key: Option<&str>,
        destination_context: Option<&EncryptionContext>,
        audit: Option<AuditMetadata>,
    ) -> Result<ReEncrypted, Error> {
        let response = self
            .transport
            .call(
                Method::ReEncrypt,
                || pb::ReEncryptRequest {
                    ciphertext_blob: ciphertext_blob.to_vec(),
                    source_encryption_context: to_proto_context(source_context),
                    destination_key: destination_key.unwrap_or_default().to_string(),
                    destination_encryption_context: destination_context
                        .map(to_proto_context)
                        .unwrap_or_default(),
                    destination_context_set: destination_context.is_some(),
                    audit: audit.clone().map(Into::into),
                },
                |channel, request| async move { Grpc::new(channel).re_encrypt(request).await },
            )
            .await?;
        Ok(ReEncrypted {
            ciphertext_blob: response.ciphertext_blob,
            source_key_id: response.source_key_id,
            source_key_version: response.source_key_version,
            key_id: response.key_id,
            key_version: response.key_version,
        })
    }

    /// Who the server thinks this client is: identity, key fingerprint, roles, permissions.
    pub async fn who_am_i(&self) -> Result<crate::WhoAmI, Error> {
        let r = self
            .transport
            .call(
                Method::WhoAmI,
                || pb::WhoAmIRequest {},
                |channel, request| async move { Grpc::new(channel).who_am_i(request).await },
            )
            .await?;
        Ok(crate::WhoAmI {
            identity: r.identity,
            key_fingerprint: r.key_fingerprint,
            roles: r.roles,
            permissions: r.permissions,
        })
    }
}

/// The results of a call of several items (`(code, message, answer)` each, in item order) as
/// one result per item: the answer, converted, or the item's own status as an [`Error::Rpc`].
/// A count other than `expected`, or an OK item without its answer, breaks the contract.
fn item_results<A, T>(
    method: &'static str,
    endpoint: &str,
    expected: usize,
    results: impl ExactSizeIterator<Item = (i32, String, Option<A>)>,
    convert: impl Fn(A) -> T,
) -> Result<Vec<Result<T, Error>>, Error> {
    if results.len() != expected {
        return Err(Error::InvalidResponse {
            method,
            reason: format!("{} results for {expected} items", results.len()),
        });
    }
    Ok(results
        .map(|(code, message, answer)| match answer {
            Some(answer) if code == 0 => Ok(convert(answer)),
            None if code == 0 => Err(Error::InvalidResponse {
                method,
                reason: "an item succeeded without its answer".into(),
            }),
            _ => {
                // A refused item should carry no answer; if one came anyway, it goes through
                // `convert` (which moves a plaintext into zeroizing memory) and is dropped.
                drop(answer.map(&convert));
                Err(Error::Rpc {
                    method,
                    endpoint: endpoint.to_string(),
                    status: tonic::Status::new(tonic::Code::from_i32(code), message),
                })
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_results_keep_order_and_each_items_status() {
        let results = vec![
            (0, String::new(), Some(1)),
            (5, "key \"k\" not found".to_string(), Some(2)),
            (0, String::new(), None),
        ];
        let out = item_results(
            "BatchDecrypt",
            "https://kms:1",
            3,
            results.into_iter(),
            |n| n * 10,
        )
        .unwrap();
        assert_eq!(out[0].as_ref().unwrap(), &10);
        match &out[1] {
            Err(Error::Rpc {
                method,
                endpoint,
                status,
            }) => {
                assert_eq!(
                    (*method, endpoint.as_str()),
                    ("BatchDecrypt", "https://kms:1")
                );
                assert_eq!(status.code(), tonic::Code::NotFound);
                assert_eq!(status.message(), "key \"k\" not found");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(out[2], Err(Error::InvalidResponse { .. })));
    }

    #[test]
    fn item_results_refuse_a_wrong_count() {
        let results = vec![(0, String::new(), Some(1))];
        let err =
            item_results("GenerateDataKeys", "e", 2, results.into_iter(), |n: i32| n).unwrap_err();
        assert!(
            matches!(err, Error::InvalidResponse { ref reason, .. } if reason == "1 results for 2 items"),
            "{err}"
        );
    }
}
