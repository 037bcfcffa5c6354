//! The SoftHSM run of `device_outage_then_recovery` (see `backend_conformance/cases.rs`), in a
//! test process of its own. PKCS#11 is initialised once per process, so all SoftHSM
//! conformance tests share one token; this case takes that token's directory away, and right
//! after it came back SoftHSM sometimes failed another test's first C_GenerateKey with
//! CKR_GENERAL_ERROR (now UNAVAILABLE, and the next call recovers). Alone here, it disturbs
//! nobody. The swtpm run stays in the suite: every swtpm test has its own simulator.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

#[path = "backend_conformance/cases.rs"]
mod cases;
#[path = "backend_conformance/fixtures.rs"]
mod fixtures;
#[path = "backend_conformance/swtpm.rs"]
mod swtpm;

#[test]
fn softhsm_device_outage_then_recovery() {
    cases::device_outage_then_recovery(&mut fixtures::SoftHsm::new(true));
}
