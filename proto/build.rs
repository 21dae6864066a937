fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc, so a fresh machine needs no system package.
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // Decode errors are INVALID_ARGUMENT (src/codec.rs), not prost's INTERNAL.
        .codec_path("crate::codec::BtCodec")
        .file_descriptor_set_path(out.join("bt_descriptor.bin"))
        .compile_protos(&["bt/v1/jobs.proto", "bt/v1/worker.proto"], &["."])?;
    println!("cargo:rerun-if-changed=bt");
    Ok(())
}
