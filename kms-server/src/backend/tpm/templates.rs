//! The TPM object templates: the storage primary, a key version's AES and HMAC keys, and the
//! audit signing primary. Fixed templates make the primaries re-derivable: the same template
//! under the same owner seed always gives the same key, so nothing needs to be persisted.

use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::structures::{
    Digest, EccParameter, EccPoint, EccScheme, HashScheme, KeyDerivationFunctionScheme,
    KeyedHashScheme, Public, PublicBuilder, PublicEccParametersBuilder, PublicKeyedHashParameters,
    SymmetricCipherParameters, SymmetricDefinitionObject,
};

/// Distinguishes our primaries from any other application's primaries with the default
/// template on the same TPM (the `unique` field of a primary template acts as a salt).
const STORAGE_UNIQUE: &[u8] = b"clinic-kms storage primary v1";
const AUDIT_UNIQUE: &[u8] = b"clinic-kms audit signing v1";

/// Storage primary: ECC P-256 restricted decryption key with AES-128-CFB for its children
/// (ECC because an RSA primary takes seconds to derive). Re-derived at every connect.
pub(super) fn storage_primary() -> tss_esapi::Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()?;
    PublicBuilder::new()
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
        .with_ecc_unique_identifier(EccPoint::new(
            EccParameter::try_from(STORAGE_UNIQUE)?,
            EccParameter::default(),
        ))
        .build()
}

fn child_attributes(decrypt: bool) -> tss_esapi::Result<tss_esapi::attributes::ObjectAttributes> {
    // fixedTPM + fixedParent: the key can never be duplicated out of this TPM;
    // sensitiveDataOrigin: the TPM generated the key, nobody ever saw it.
    ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(false)
        .with_decrypt(decrypt)
        .with_sign_encrypt(true)
        .build()
}

/// A key version's AES-256-CFB key (encrypt and decrypt).
pub(super) fn aes_key() -> tss_esapi::Result<Public> {
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::SymCipher)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(child_attributes(true)?)
        .with_symmetric_cipher_parameters(SymmetricCipherParameters::new(
            SymmetricDefinitionObject::AES_256_CFB,
        ))
        .with_symmetric_cipher_unique_identifier(Digest::default())
        .build()
}

/// A key version's HMAC-SHA256 key (sign only: it computes MACs, nothing else).
pub(super) fn hmac_key() -> tss_esapi::Result<Public> {
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::KeyedHash)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(child_attributes(false)?)
        .with_keyed_hash_parameters(PublicKeyedHashParameters::new(
            KeyedHashScheme::HMAC_SHA_256,
        ))
        .with_keyed_hash_unique_identifier(Digest::default())
        .build()
}

/// The audit signing key: an ECDSA P-256 (SHA-256) primary under the owner hierarchy,
/// re-derived from this fixed template whenever it is needed: the same key for the life of
/// the owner seed, never stored anywhere.
pub(super) fn audit_signing_primary() -> tss_esapi::Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(false)
        .with_decrypt(false)
        .with_sign_encrypt(true)
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_unrestricted_signing_key(
                EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)),
                EccCurve::NistP256,
            )
            .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
            .build()?,
        )
        .with_ecc_unique_identifier(EccPoint::new(
            EccParameter::try_from(AUDIT_UNIQUE)?,
            EccParameter::default(),
        ))
        .build()
}
