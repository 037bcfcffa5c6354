//! Generates the gRPC code and the file descriptor sets used for server reflection: one per
//! package, so each server registers only the services it serves.
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("kms_descriptor.bin"))
        .compile_protos(&["kms/v1/kms.proto"], &["."])?;
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("notes_descriptor.bin"))
        .compile_protos(&["notes/v1/notes.proto"], &["."])?;
    println!("cargo:rerun-if-changed=kms/v1/kms.proto");
    println!("cargo:rerun-if-changed=notes/v1/notes.proto");
    Ok(())
}
