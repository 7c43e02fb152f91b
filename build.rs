//! Compiles `proto/shardkv/` (public API, internal RPCs, stored formats and
//! test-only services, one package each) with protox, a pure-Rust protobuf
//! compiler, so building needs no `protoc` on the machine. The descriptor set is
//! also written to OUT_DIR for gRPC server reflection. `proto/etcd/` (the
//! benchmark's etcd client) is compiled separately, client only, and kept out of
//! the reflection descriptor.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/shardkv/v1/shardkv.proto",
        "proto/shardkv/internal/v1/internal.proto",
        "proto/shardkv/storage/v1/storage.proto",
        "proto/shardkv/testing/v1/testing.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(protos, ["proto"])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("shardkv_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    let etcd = protox::compile(["proto/etcd/kv.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(etcd)?;
    Ok(())
}
