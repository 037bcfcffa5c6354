//! Backend conformance suite: every backend-level test is written once (`cases.rs`) and run
//! against SoftHSM (PKCS#11) and swtpm (TPM 2.0), plus the TPM-only and cross-backend checks
//! (`tpm.rs`). Needs `softhsm2` and `swtpm` installed (scripts/install-deps.sh).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cases;
mod fixtures;
mod swtpm;
mod tpm;

/// Instantiates each case for each backend: `softhsm::<case>` and `tpm::<case>`. Cases
/// listed after `exclusive:` take the device away: their SoftHSM run is in its own process
/// (`tests/backend_outage.rs`), because the SoftHSM tests of one process share a token.
macro_rules! conformance {
    ($($case:ident),* ; exclusive: $($excl:ident),*) => {
        mod softhsm {
            $( #[test] fn $case() { crate::cases::$case(&mut crate::fixtures::SoftHsm::new(false)) } )*
        }
        mod swtpm_backend {
            $( #[test] fn $case() { crate::cases::$case(&mut crate::fixtures::Tpm::new()) } )*
            $( #[test] fn $excl() { crate::cases::$excl(&mut crate::fixtures::Tpm::new()) } )*
        }
    };
}

conformance!(
    round_trip_32_bytes_and_4_kib,
    fresh_iv_per_seal,
    tampering_is_detected,
    reseal_moves_a_blob_to_another_version_and_context,
    random_lengths_and_non_repetition,
    unknown_reference_is_not_found,
    destroyed_version_never_opens_again,
    key_material_is_not_extractable,
    audit_signatures_verify,
    concurrent_use_from_many_threads;
    exclusive: device_outage_then_recovery
);
