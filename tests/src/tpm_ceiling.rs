//! The raw TPM ceiling for kms-bench: the TPM work one GenerateDataKey needs on the TPM
//! backend, issued directly through tss-esapi with nothing else around it — TPM2_GetRandom(32)
//! (the data key), TPM2_EncryptDecrypt2 (AES-256-CFB, 32 bytes) and TPM2_HMAC (SHA-256 over a
//! 32-byte digest) — with the AES and HMAC keys already loaded, the password session set once,
//! from one thread (a TPM executes one command at a time). Keys are created with the same
//! attributes as the server's (fixedTPM, fixedParent, sensitiveDataOrigin).

use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _, Result};
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::constants::tss::TPM2_TRANSIENT_FIRST;
use tss_esapi::constants::CapabilityType;
use tss_esapi::handles::{KeyHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm, SymmetricMode};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    CapabilityData, Digest, EccPoint, InitialValue, KeyedHashScheme, MaxBuffer, Public,
    PublicBuilder, PublicEccParametersBuilder, PublicKeyedHashParameters,
    SymmetricCipherParameters, SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::Context;

pub struct TpmCeiling {
    ctx: Context,
    aes: KeyHandle,
    hmac: KeyHandle,
}

fn public(alg: PublicAlgorithm, decrypt: bool) -> Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_decrypt(decrypt)
        .with_sign_encrypt(true)
        .build()?;
    let b = PublicBuilder::new()
        .with_public_algorithm(alg)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes);
    Ok(match alg {
        PublicAlgorithm::SymCipher => b
            .with_symmetric_cipher_parameters(SymmetricCipherParameters::new(
                SymmetricDefinitionObject::AES_256_CFB,
            ))
            .with_symmetric_cipher_unique_identifier(Digest::default())
            .build()?,
        _ => b
            .with_keyed_hash_parameters(PublicKeyedHashParameters::new(
                KeyedHashScheme::HMAC_SHA_256,
            ))
            .with_keyed_hash_unique_identifier(Digest::default())
            .build()?,
    })
}

fn storage_primary() -> Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()?;
    Ok(PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_restricted_decryption_key(
                SymmetricDefinitionObject::AES_128_CFB,
                EccCurve::NistP256,
            )
            .build()?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()?)
}

/// Flushes the transient objects a killed kms-server left loaded (the TPM has only 3 slots;
/// the drift check after the load would fail with TPM_RC_OBJECT_MEMORY).
fn flush_transients(ctx: &mut Context) -> Result<()> {
    let (data, _more) = ctx.get_capability(CapabilityType::Handles, TPM2_TRANSIENT_FIRST, 64)?;
    if let CapabilityData::Handles(list) = data {
        for handle in list.into_inner() {
            if let TpmHandle::Transient(_) = handle {
                let object = ctx.tr_from_tpm_public(handle)?;
                ctx.flush_context(object)?;
            }
        }
    }
    Ok(())
}

impl TpmCeiling {
    /// Connects (the TPM must not be in use by anyone else: swtpm serves one connection at a
    /// time) and loads an AES and an HMAC key under a fresh storage primary.
    pub fn open(tcti: &str) -> Result<TpmCeiling> {
        let conf = TctiNameConf::from_str(tcti).map_err(|e| anyhow!("TCTI {tcti}: {e}"))?;
        let mut ctx = Context::new(conf).context("connecting to the TPM")?;
        // Before the password session: GetCapability takes no authorization.
        flush_transients(&mut ctx)?;
        ctx.set_sessions((Some(AuthSession::Password), None, None));
        let primary = ctx
            .create_primary(Hierarchy::Owner, storage_primary()?, None, None, None, None)
            .context("storage primary")?
            .key_handle;
        let mut load = |alg, decrypt| -> Result<KeyHandle> {
            let created = ctx.create(primary, public(alg, decrypt)?, None, None, None, None)?;
            Ok(ctx.load(primary, created.out_private, created.out_public)?)
        };
        let aes = load(PublicAlgorithm::SymCipher, true).context("AES key")?;
        let hmac = load(PublicAlgorithm::KeyedHash, false).context("HMAC key")?;
        ctx.flush_context(primary.into())?;
        Ok(TpmCeiling { ctx, aes, hmac })
    }

    fn one(&mut self, iv: &InitialValue, digest: &MaxBuffer) -> Result<()> {
        let ctx = &mut self.ctx;
        let key = ctx.execute_without_session(|c| c.get_random(32))?;
        let data = MaxBuffer::try_from(key.value().to_vec())?;
        let (ct, _) =
            ctx.encrypt_decrypt_2(self.aes, false, SymmetricMode::Cfb, data, iv.clone())?;
        if ct.value().len() != 32 {
            return Err(anyhow!("CFB of 32 bytes gave {} bytes", ct.value().len()));
        }
        ctx.hmac(self.hmac.into(), digest.clone(), HashingAlgorithm::Sha256)?;
        Ok(())
    }

    /// Data-key sequences per second (GetRandom + EncryptDecrypt2 + HMAC) over `duration`.
    pub fn measure(&mut self, duration: Duration) -> Result<f64> {
        let iv = InitialValue::try_from(vec![7u8; 16])?;
        let digest = MaxBuffer::try_from(vec![9u8; 32])?;
        for _ in 0..200 {
            self.one(&iv, &digest)?;
        }
        let started = Instant::now();
        let mut ops = 0u64;
        while started.elapsed() < duration {
            self.one(&iv, &digest)?;
            ops += 1;
        }
        Ok(ops as f64 / started.elapsed().as_secs_f64())
    }
}

impl Drop for TpmCeiling {
    fn drop(&mut self) {
        let _ = self.ctx.flush_context(self.aes.into());
        let _ = self.ctx.flush_context(self.hmac.into());
    }
}
