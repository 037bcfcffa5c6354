//! Integration tests for kms-audit: one binary, modules per concern.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test crate: helpers may panic

mod fixture;
mod formats;
mod tamper;
