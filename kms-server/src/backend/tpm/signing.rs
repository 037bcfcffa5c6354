//! The audit signing key on the TPM: an ECDSA P-256 primary under the owner hierarchy,
//! re-derived from a fixed template (`templates::audit_signing_primary`) for each signature
//! and flushed right after. The same owner seed always gives the same key, so the public key
//! stays stable across restarts of the KMS and of the TPM, and nothing is persisted; the
//! private key exists only inside the TPM. Checkpoints are rare, so re-deriving (a few ms)
//! costs nothing that matters.

use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
use tss_esapi::handles::KeyHandle;
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{Digest, HashScheme, Public, Signature, SignatureScheme};
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;

use super::cipher::unload;
use super::device::Conn;
use super::errors::{tss, Fault};
use super::templates;
use crate::backend::BackendError;

/// Loads the signing primary (freeing the cached key version's slots first).
fn load_signing_key(conn: &mut Conn) -> Result<(KeyHandle, Public), Fault> {
    unload(conn)?;
    let template = templates::audit_signing_primary().map_err(tss("audit key template"))?;
    let created = conn
        .ctx
        .execute_with_session(Some(AuthSession::Password), |c| {
            c.create_primary(Hierarchy::Owner, template, None, None, None, None)
        })
        .map_err(tss("derive audit signing key"))?;
    Ok((created.key_handle, created.out_public))
}

fn left_pad_32(v: &[u8]) -> Result<[u8; 32], Fault> {
    let mut out = [0u8; 32];
    if v.len() > 32 {
        return Err(Fault::Backend(BackendError::Internal(
            "P-256 value longer than 32 bytes".into(),
        )));
    }
    out[32 - v.len()..].copy_from_slice(v);
    Ok(out)
}

/// The public key as an uncompressed SEC1 point (0x04 || x || y).
pub(super) fn public_key(conn: &mut Conn) -> Result<Vec<u8>, Fault> {
    let (handle, public) = load_signing_key(conn)?;
    conn.ctx
        .flush_context(handle.into())
        .map_err(tss("flush audit signing key"))?;
    let Public::Ecc { unique, .. } = public else {
        return Err(Fault::Backend(BackendError::Internal(
            "audit signing key is not an ECC key".into(),
        )));
    };
    let mut point = vec![0x04];
    point.extend_from_slice(&left_pad_32(unique.x().value())?);
    point.extend_from_slice(&left_pad_32(unique.y().value())?);
    Ok(point)
}

/// ECDSA-SHA256 over a digest: raw r || s, 64 bytes.
pub(super) fn sign(conn: &mut Conn, digest: &[u8; 32]) -> Result<Vec<u8>, Fault> {
    let (handle, _) = load_signing_key(conn)?;
    let digest = Digest::try_from(digest.to_vec()).map_err(tss("digest"))?;
    // An unrestricted key signs any digest: the NULL ticket says "not hashed by the TPM".
    let validation = TPMT_TK_HASHCHECK {
        tag: TPM2_ST_HASHCHECK,
        hierarchy: TPM2_RH_NULL,
        digest: Default::default(),
    };
    let signed = validation
        .try_into()
        .map_err(tss("hash check ticket"))
        .and_then(|ticket| {
            conn.ctx
                .execute_with_session(Some(AuthSession::Password), |c| {
                    c.sign(
                        handle,
                        digest,
                        SignatureScheme::EcDsa {
                            hash_scheme: HashScheme::new(HashingAlgorithm::Sha256),
                        },
                        ticket,
                    )
                })
                .map_err(tss("sign audit checkpoint"))
        });
    let flushed = conn
        .ctx
        .flush_context(handle.into())
        .map_err(tss("flush audit signing key"));
    let signature = signed?;
    flushed?;
    let Signature::EcDsa(sig) = signature else {
        return Err(Fault::Backend(BackendError::Internal(
            "TPM returned a non-ECDSA signature".into(),
        )));
    };
    let mut out = left_pad_32(sig.signature_r().value())?.to_vec();
    out.extend_from_slice(&left_pad_32(sig.signature_s().value())?);
    Ok(out)
}
