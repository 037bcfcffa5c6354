//! Integration tests of kms-client: the library and the kmsctl binary against in-process
//! mock servers over real mutual TLS. One test binary, one module per subject.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test crate: helpers may panic

mod calls;
mod kmsctl;
mod mock;
