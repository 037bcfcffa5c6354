//! Generated protobuf and gRPC code for the KMS contract, plus its descriptor set for reflection.
#![allow(clippy::all, missing_docs)]

pub mod kms {
    pub mod v1 {
        tonic::include_proto!("kms.v1");
    }
}

/// Encoded `FileDescriptorSet` of every proto in this crate, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kms_descriptor");
