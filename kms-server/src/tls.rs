//! Mutual TLS: the rustls server configuration and the accept loop live in `svc-common`
//! (shared with notes-store); re-exported here so `kms_server::tls` keeps its API.

pub use svc_common::tls::{
    incoming, load_certs, load_crls, load_key, server_config, server_config_with_crl,
    ReloadableConfig, TlsFiles,
};
