//! Fuzz target: the wrapped-key parser must reject or accept any byte string without
//! panicking, and whatever it accepts must serialize back to exactly the same bytes.
//!
//! Run: `cd kms-server/fuzz && cargo +nightly fuzz run envelope_parse -- -max_total_time=60`
#![no_main]

use kms_server::envelope::Envelope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = Envelope::parse(data) {
        assert_eq!(env.to_bytes(), data, "accepted blob does not round-trip");
        assert_eq!(env.iv.len(), env.mechanism.iv_len());
        assert!(env.ciphertext.len() > env.mechanism.overhead());
    }
});
