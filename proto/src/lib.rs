//! Generated protobuf and gRPC code for the KMS (`kms.v1`) and notes (`notes.v1`) contracts,
//! plus their descriptor sets for reflection.
#![allow(clippy::all, missing_docs)]

pub mod kms {
    pub mod v1 {
        tonic::include_proto!("kms.v1");
    }
}

pub mod notes {
    pub mod v1 {
        tonic::include_proto!("notes.v1");
    }
}

/// Encoded `FileDescriptorSet` of `kms/v1/kms.proto`, for the KMS's gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kms_descriptor");

/// Encoded `FileDescriptorSet` of `notes/v1/notes.proto`, for notes-store's reflection.
pub const NOTES_FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("notes_descriptor");
