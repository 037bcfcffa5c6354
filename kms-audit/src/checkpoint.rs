//! [`Checkpoint`]: a signed statement "node N's chain had head hash H at seq S", and the
//! public key ([`VerifyingKeyInput`]) that checks it.
//!
//! Signing: the signer (the HSM in production, `CKM_ECDSA` on a P-256 key) signs the 32-byte
//! [`Checkpoint::digest`] = SHA-256([`Checkpoint::signing_input`]) as a *pre-computed digest*
//! and returns raw `r || s` (32 + 32 bytes, big-endian). The signature is stored hex-encoded.
//! Verification is plain ECDSA over that digest; high-S signatures are accepted (HSMs do not
//! normalise S), so a signature is not unique: `(r, n - s)` verifies too. Never use the
//! signature as an identifier.

use p256::ecdsa::signature::hazmat::PrehashVerifier;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::{DecodePublicKey, EncodePublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::encoding::Encoder;
use crate::error::AuditError;

/// Domain tag that starts the bytes a checkpoint signature covers.
pub const CHECKPOINT_DOMAIN_TAG: &str = "kms-audit-checkpoint-v1";

/// A signed head of one node's chain. JSON field names are stable: they are the names below.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// The node whose chain this covers.
    pub node_id: String,
    /// Sequence number of the last event covered.
    pub seq: u64,
    /// That event's `hash`.
    pub head_hash: String,
    /// When the checkpoint was made, UTC milliseconds since the Unix epoch.
    pub time_ms: i64,
    /// Hex of the raw 64-byte ECDSA P-256 signature `r || s` over [`Checkpoint::digest`].
    pub signature: String,
    /// Hex SHA-256 of the signing key's DER SubjectPublicKeyInfo
    /// (see [`VerifyingKeyInput::fingerprint`]).
    pub public_key_fingerprint: String,
}

impl Checkpoint {
    /// [`CHECKPOINT_DOMAIN_TAG`], then (encoded as in the `encoding` module docs): `node_id` str,
    /// `seq` u64, `head_hash` str (hex text), `time_ms` i64, `public_key_fingerprint` str
    /// (hex text). The signature itself is not included.
    pub fn signing_input(&self) -> Vec<u8> {
        Encoder::new(CHECKPOINT_DOMAIN_TAG)
            .str(&self.node_id)
            .u64(self.seq)
            .str(&self.head_hash)
            .i64(self.time_ms)
            .str(&self.public_key_fingerprint)
            .finish()
    }

    /// SHA-256 of [`Checkpoint::signing_input`]: the 32 bytes handed to the signer.
    pub fn digest(&self) -> [u8; 32] {
        Sha256::digest(self.signing_input()).into()
    }

    /// Stores a raw `r || s` signature (as returned by `CKM_ECDSA`) hex-encoded.
    ///
    /// # Errors
    /// [`AuditError::SignatureLength`] unless `raw` is exactly 64 bytes.
    pub fn set_signature(&mut self, raw: &[u8]) -> Result<(), AuditError> {
        if raw.len() != 64 {
            return Err(AuditError::SignatureLength(raw.len()));
        }
        self.signature = hex::encode(raw);
        Ok(())
    }

    /// Checks that this checkpoint names `key` by fingerprint and that its signature verifies
    /// with `key` over [`Checkpoint::digest`]. The server can call this on the HSM's output
    /// before publishing a checkpoint.
    ///
    /// # Errors
    /// [`AuditError::CheckpointSignature`] saying which check failed.
    pub fn verify_signature(&self, key: &VerifyingKeyInput) -> Result<(), AuditError> {
        if self.public_key_fingerprint != key.fingerprint() {
            return Err(AuditError::CheckpointSignature(
                "public_key_fingerprint does not match the verifying key",
            ));
        }
        let raw = hex::decode(&self.signature)
            .map_err(|_| AuditError::CheckpointSignature("signature is not hex"))?;
        if raw.len() != 64 {
            return Err(AuditError::CheckpointSignature(
                "signature is not 64 bytes (raw r||s)",
            ));
        }
        let sig = Signature::from_slice(&raw)
            .map_err(|_| AuditError::CheckpointSignature("signature r or s out of range"))?;
        key.key
            .verify_prehash(&self.digest(), &sig)
            .map_err(|_| AuditError::CheckpointSignature("signature does not verify"))
    }
}

/// A parsed P-256 checkpoint-verification key and its fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyingKeyInput {
    key: VerifyingKey,
    fingerprint: String,
}

impl VerifyingKeyInput {
    /// The key as PEM SubjectPublicKeyInfo, for publishing (`GetAuditPublicKey`).
    ///
    /// # Errors
    /// [`AuditError::PublicKey`] if encoding fails (it does not for a valid key).
    pub fn to_pem(&self) -> Result<String, AuditError> {
        self.key()
            .to_public_key_pem(p256::pkcs8::LineEnding::LF)
            .map_err(|e| AuditError::PublicKey(e.to_string()))
    }

    /// From PEM SubjectPublicKeyInfo (`-----BEGIN PUBLIC KEY-----`) of a P-256 key.
    ///
    /// # Errors
    /// [`AuditError::PublicKey`] if it is not such a PEM block.
    pub fn from_pem(pem: &str) -> Result<Self, AuditError> {
        let key = VerifyingKey::from_public_key_pem(pem.trim())
            .map_err(|e| AuditError::PublicKey(format!("not a P-256 PEM public key: {e}")))?;
        Self::from_key(key)
    }

    /// From a SEC1 point: uncompressed `04 || X || Y` (65 bytes; also accepted wrapped in a
    /// DER OCTET STRING `04 41 …` as PKCS#11 `CKA_EC_POINT` returns it) or compressed (33 bytes).
    ///
    /// # Errors
    /// [`AuditError::PublicKey`] if the bytes are not a point on P-256.
    pub fn from_sec1(bytes: &[u8]) -> Result<Self, AuditError> {
        let point = match bytes {
            [0x04, 0x41, rest @ ..] if rest.len() == 65 => rest,
            _ => bytes,
        };
        let key = VerifyingKey::from_sec1_bytes(point)
            .map_err(|_| AuditError::PublicKey("not a SEC1 P-256 point".to_owned()))?;
        Self::from_key(key)
    }

    /// Accepts what an operator is likely to hand `kmsctl`: PEM text, a raw SEC1 point, or the
    /// SEC1 point as hex text.
    ///
    /// # Errors
    /// [`AuditError::PublicKey`] if none of these forms parses.
    pub fn parse(input: &[u8]) -> Result<Self, AuditError> {
        let text = std::str::from_utf8(input).map(str::trim);
        match text {
            Ok(t) if t.starts_with("-----BEGIN") => Self::from_pem(t),
            Ok(t) if !t.is_empty() && t.bytes().all(|b| b.is_ascii_hexdigit()) => {
                let raw = hex::decode(t)
                    .map_err(|e| AuditError::PublicKey(format!("hex public key: {e}")))?;
                Self::from_sec1(&raw)
            }
            _ => Self::from_sec1(input),
        }
    }

    /// From an already-parsed key.
    ///
    /// # Errors
    /// [`AuditError::PublicKey`] if it cannot be DER-encoded (not expected for a valid key).
    pub fn from_key(key: VerifyingKey) -> Result<Self, AuditError> {
        let der = key
            .to_public_key_der()
            .map_err(|e| AuditError::PublicKey(format!("encode SPKI: {e}")))?;
        let fingerprint = hex::encode(Sha256::digest(der.as_bytes()));
        Ok(VerifyingKeyInput { key, fingerprint })
    }

    /// Hex SHA-256 of the key's DER SubjectPublicKeyInfo (91 bytes: id-ecPublicKey,
    /// prime256v1, uncompressed point) — the same as
    /// `openssl pkey -pubin -outform DER | sha256sum`.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The parsed key.
    pub fn key(&self) -> &VerifyingKey {
        &self.key
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::hazmat::PrehashSigner;
    use p256::ecdsa::SigningKey;
    use p256::pkcs8::LineEnding;

    fn kat_checkpoint() -> Checkpoint {
        Checkpoint {
            node_id: "kms-a".to_owned(),
            seq: 2500,
            head_hash: "cd".repeat(32),
            time_ms: 1_700_000_000_999,
            signature: String::new(),
            public_key_fingerprint: "ef".repeat(32),
        }
    }

    /// Known-answer vector for the checkpoint digest (also reproduced by an independent
    /// implementation of the documented encoding).
    #[test]
    fn known_answer_digest() {
        assert_eq!(
            hex::encode(kat_checkpoint().digest()),
            "edfb03a40ae753c3966b33abd4d291433fae0c1d0dc9e402998830df3d73d12d"
        );
    }

    #[test]
    fn key_forms_parse_to_the_same_key() {
        let sk = SigningKey::from_slice(&[7u8; 32]).unwrap();
        let vk = *sk.verifying_key();
        let pem = vk.to_public_key_pem(LineEnding::LF).unwrap();
        let point = vk.to_sec1_point(false);
        let raw = point.as_bytes();
        assert_eq!(raw.len(), 65);
        let mut wrapped = vec![0x04, 0x41];
        wrapped.extend_from_slice(raw);

        let from_pem = VerifyingKeyInput::from_pem(&pem).unwrap();
        for other in [
            VerifyingKeyInput::parse(pem.as_bytes()).unwrap(),
            VerifyingKeyInput::parse(raw).unwrap(),
            VerifyingKeyInput::parse(&wrapped).unwrap(),
            VerifyingKeyInput::parse(hex::encode(raw).as_bytes()).unwrap(),
            VerifyingKeyInput::from_sec1(raw).unwrap(),
        ] {
            assert_eq!(other, from_pem);
        }
        // Fingerprint = SHA-256 of the 91-byte DER SPKI: fixed prefix + uncompressed point.
        let prefix = hex::decode("3059301306072a8648ce3d020106082a8648ce3d030107034200").unwrap();
        let der = [prefix.as_slice(), raw].concat();
        assert_eq!(from_pem.fingerprint(), hex::encode(Sha256::digest(&der)));

        assert!(VerifyingKeyInput::parse(b"garbage").is_err());
        assert!(VerifyingKeyInput::from_sec1(&[4u8; 65]).is_err());
    }

    #[test]
    fn sign_like_the_hsm_and_verify() {
        let sk = SigningKey::from_slice(&[9u8; 32]).unwrap();
        let key = VerifyingKeyInput::from_key(*sk.verifying_key()).unwrap();
        let mut cp = kat_checkpoint();
        cp.public_key_fingerprint = key.fingerprint().to_owned();
        let sig: Signature = sk.sign_prehash(&cp.digest()).unwrap();
        cp.set_signature(&sig.to_bytes()).unwrap();
        cp.verify_signature(&key).unwrap();

        // An HSM does not normalise S: the high-S twin must verify too.
        let (r, s) = sig.split_scalars();
        let twin = Signature::from_scalars(r.to_bytes(), (-*s).to_bytes()).unwrap();
        assert_ne!(twin, sig);
        cp.set_signature(&twin.to_bytes()).unwrap();
        cp.verify_signature(&key).unwrap();

        assert!(matches!(
            cp.set_signature(&[0u8; 63]),
            Err(AuditError::SignatureLength(63))
        ));
        cp.seq += 1;
        assert!(cp.verify_signature(&key).is_err());
    }
}
