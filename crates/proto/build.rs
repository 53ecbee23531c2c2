//! Compiles `proto/*.proto` with protox (pure-Rust protoc, so no system protoc is needed) and generates the
//! tonic/prost code into OUT_DIR; nothing generated is committed (DEPENDENCIES.md §1).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fds = protox::compile(["worker.proto"], ["../../proto"])?;
    tonic_prost_build::configure()
        // proto `bytes` → bytes::Bytes: activations move between workers without a copy.
        .bytes(".")
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=../../proto");
    Ok(())
}
