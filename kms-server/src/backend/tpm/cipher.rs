//! The sealing construction (mechanism 2, "TPM AES-256-CFB + HMAC-SHA256"), encrypt-then-MAC
//! with two TPM-resident keys per key version:
//!
//! ```text
//! iv  = 16 random bytes from the OS CSPRNG (getrandom), fresh per seal
//! ct  = AES-256-CFB(K_aes, iv, plaintext)           TPM2_EncryptDecrypt2, 1024-byte chunks,
//!                                                    each chunk's IV = the previous ivOut
//! m   = SHA-256("clinic-kms tpm-cfb-hmac v1" || u64 len(aad) || aad
//!               || u64 len(iv) || iv || u64 len(ct) || ct)          (lengths big-endian)
//! tag = HMAC-SHA256(K_mac, m)                        TPM2_HMAC
//! out = ct || tag                                    (32 bytes of overhead)
//! ```
//! `open` recomputes the tag in the TPM and compares it in constant time (`subtle`) before
//! decrypting anything; any difference is `DecryptionFailed`. The AAD given by the service
//! holds the envelope header (format, mechanism, key id, key version) and the encryption
//! context, so all of them are authenticated. Hashing first keeps the TPM input at 32 bytes
//! whatever the sizes (TPM2_HMAC takes at most 1024 bytes) and costs one TPM command.

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;
use tss_esapi::handles::KeyHandle;
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, SymmetricMode};
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{InitialValue, MaxBuffer};
use zeroize::Zeroizing;

use super::blob::{KeyBlobs, RefId};
use super::device::{Conn, LoadedVersion};
use super::errors::{is_device_fault, tss, Fault};
use super::templates;
use crate::backend::BackendError;

pub(super) const IV_LEN: usize = 16;
pub(super) const TAG_LEN: usize = 32;
/// TPM2B_MAX_BUFFER: the most TPM2_EncryptDecrypt2 takes at once (a multiple of the block).
const CHUNK: usize = 1024;
const MAC_DOMAIN: &[u8] = b"clinic-kms tpm-cfb-hmac v1";

/// Flushes the cached key version's objects, freeing two transient slots.
pub(super) fn unload(conn: &mut Conn) -> Result<(), Fault> {
    if let Some(v) = conn.loaded.take() {
        let a = conn.ctx.flush_context(v.aes.into());
        let b = conn.ctx.flush_context(v.hmac.into());
        a.map_err(tss("flush AES key"))?;
        b.map_err(tss("flush HMAC key"))?;
    }
    Ok(())
}

/// The handles of a key version's objects, loading them (and evicting the previous version)
/// on a cache miss.
pub(super) fn ensure_loaded(
    conn: &mut Conn,
    id: RefId,
    blobs: &KeyBlobs,
) -> Result<(KeyHandle, KeyHandle), Fault> {
    if let Some(v) = &conn.loaded {
        if v.id == id {
            return Ok((v.aes, v.hmac));
        }
    }
    unload(conn)?;
    let primary = conn.primary;
    let aes = load(
        conn,
        primary,
        blobs.aes_private.clone(),
        blobs.aes_public.clone(),
    )?;
    let hmac = match load(
        conn,
        primary,
        blobs.hmac_private.clone(),
        blobs.hmac_public.clone(),
    ) {
        Ok(h) => h,
        Err(e) => {
            conn.ctx
                .flush_context(aes.into())
                .map_err(tss("flush AES key"))?;
            return Err(e);
        }
    };
    conn.loaded = Some(LoadedVersion { id, aes, hmac });
    Ok((aes, hmac))
}

fn load(
    conn: &mut Conn,
    parent: KeyHandle,
    private: tss_esapi::structures::Private,
    public: tss_esapi::structures::Public,
) -> Result<KeyHandle, Fault> {
    conn.ctx
        .execute_with_session(Some(AuthSession::Password), |c| {
            c.load(parent, private, public)
        })
        .map_err(|e| {
            if is_device_fault(&e) {
                Fault::Tss("load key version", e)
            } else {
                // Integrity or binding failure: a blob of another TPM or owner seed, or edited.
                Fault::Backend(BackendError::KeyNotFound(format!(
                    "this TPM cannot load the key version ({e})"
                )))
            }
        })
}

/// Creates a new key version's two keys under the storage primary.
pub(super) fn create_version(conn: &mut Conn) -> Result<KeyBlobs, Fault> {
    unload(conn)?;
    let primary = conn.primary;
    let mut create = |public: tss_esapi::structures::Public, what: &'static str| {
        conn.ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.create(primary, public, None, None, None, None)
            })
            .map_err(tss(what))
    };
    let aes = create(
        templates::aes_key().map_err(tss("AES template"))?,
        "create AES key",
    )?;
    let hmac = create(
        templates::hmac_key().map_err(tss("HMAC template"))?,
        "create HMAC key",
    )?;
    Ok(KeyBlobs {
        aes_private: aes.out_private,
        aes_public: aes.out_public,
        hmac_private: hmac.out_private,
        hmac_public: hmac.out_public,
    })
}

/// AES-256-CFB in the TPM, in chunks the TPM accepts, chaining the IV.
fn cfb(
    conn: &mut Conn,
    key: KeyHandle,
    decrypt: bool,
    iv: &[u8; IV_LEN],
    data: &[u8],
) -> Result<Zeroizing<Vec<u8>>, Fault> {
    let mut out = Zeroizing::new(Vec::with_capacity(data.len()));
    let mut chain = InitialValue::try_from(iv.to_vec()).map_err(tss("IV"))?;
    for chunk in data.chunks(CHUNK) {
        let input = MaxBuffer::try_from(chunk.to_vec()).map_err(tss("CFB input"))?;
        let (output, next) = conn
            .ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.encrypt_decrypt_2(key, decrypt, SymmetricMode::Cfb, input, chain.clone())
            })
            .map_err(tss("EncryptDecrypt2"))?;
        if output.value().len() != chunk.len() {
            return Err(Fault::Backend(BackendError::Internal(
                "TPM returned a CFB output of the wrong length".into(),
            )));
        }
        out.extend_from_slice(output.value());
        chain = next;
    }
    Ok(out)
}

fn mac_message(aad: &[u8], iv: &[u8], ct: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(MAC_DOMAIN);
    for part in [aad, iv, ct] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.finalize().into()
}

fn mac(
    conn: &mut Conn,
    key: KeyHandle,
    aad: &[u8],
    iv: &[u8],
    ct: &[u8],
) -> Result<Vec<u8>, Fault> {
    let message =
        MaxBuffer::try_from(mac_message(aad, iv, ct).to_vec()).map_err(tss("MAC input"))?;
    let tag = conn
        .ctx
        .execute_with_session(Some(AuthSession::Password), |c| {
            c.hmac(key.into(), message, HashingAlgorithm::Sha256)
        })
        .map_err(tss("HMAC"))?;
    if tag.value().len() != TAG_LEN {
        return Err(Fault::Backend(BackendError::Internal(
            "TPM returned an HMAC of the wrong length".into(),
        )));
    }
    Ok(tag.value().to_vec())
}

/// `ciphertext || tag`.
pub(super) fn seal(
    conn: &mut Conn,
    id: RefId,
    blobs: &KeyBlobs,
    iv: &[u8; IV_LEN],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, Fault> {
    let (aes, hmac) = ensure_loaded(conn, id, blobs)?;
    let ct = cfb(conn, aes, false, iv, plaintext)?;
    let tag = mac(conn, hmac, aad, iv, &ct)?;
    let mut out = ct.to_vec();
    out.extend_from_slice(&tag);
    Ok(out)
}

pub(super) fn open(
    conn: &mut Conn,
    id: RefId,
    blobs: &KeyBlobs,
    iv: &[u8; IV_LEN],
    aad: &[u8],
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>, Fault> {
    let Some(split) = sealed.len().checked_sub(TAG_LEN) else {
        return Err(Fault::Backend(BackendError::DecryptionFailed));
    };
    let (ct, tag) = sealed.split_at(split);
    let (aes, hmac) = ensure_loaded(conn, id, blobs)?;
    let expected = mac(conn, hmac, aad, iv, ct)?;
    if !bool::from(expected.as_slice().ct_eq(tag)) {
        return Err(Fault::Backend(BackendError::DecryptionFailed));
    }
    cfb(conn, aes, true, iv, ct)
}

/// `len` bytes from the TPM's RNG (TPM2_GetRandom gives at most a digest's worth per call).
pub(super) fn random(conn: &mut Conn, len: usize) -> Result<Zeroizing<Vec<u8>>, Fault> {
    let mut out = Zeroizing::new(Vec::with_capacity(len));
    while out.len() < len {
        let want = (len - out.len()).min(32);
        let bytes = conn.ctx.get_random(want).map_err(tss("GetRandom"))?;
        if bytes.value().is_empty() {
            return Err(Fault::Backend(BackendError::Unavailable(
                "TPM GetRandom returned nothing".into(),
            )));
        }
        out.extend_from_slice(bytes.value());
    }
    out.truncate(len);
    Ok(out)
}
