// SPDX-License-Identifier: Apache-2.0
//! Generates the Rust code for the .proto files under `proto/`.
//!
//! Feature `grpc` (tonic, needs `protoc`: `PROTOC` or PATH): the containerd 2.x sandbox API and the seed sandbox API use the same package and service names
//! with different field numbers, so each set is generated into its own directory under OUT_DIR
//! and included into its own module tree by `src/lib.rs`.

use std::path::PathBuf;

/// One set of .proto files generated together.
#[cfg(feature = "grpc")]
struct ProtoSet {
    /// Directory under `proto/` and under OUT_DIR.
    name: &'static str,
    /// Files relative to the set's directory.
    files: &'static [&'static str],
}

#[cfg(feature = "grpc")]
const SETS: &[ProtoSet] = &[
    ProtoSet {
        name: "v2",
        files: &[
            "containerd/types/mount.proto",
            "containerd/types/platform.proto",
            "containerd/types/metrics.proto",
            "containerd/types/sandbox.proto",
            "containerd/services/sandbox/v1/sandbox.proto",
        ],
    },
    ProtoSet {
        name: "seed",
        files: &[
            "containerd/types/types.proto",
            "containerd/services/sandbox/v1/sandbox.proto",
        ],
    },
    ProtoSet {
        name: "cri",
        files: &["runtime/v1/api.proto"],
    },
    ProtoSet {
        name: "admin",
        files: &["sandboxer/admin/v1/admin.proto"],
    },
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    #[cfg(feature = "grpc")]
    grpc()?;
    #[cfg(feature = "ttrpc")]
    ttrpc()?;
    Ok(())
}

/// The agent's ttrpc services (rust-protobuf, async servers and clients), one module per file.
#[cfg(feature = "ttrpc")]
const TTRPC_FILES: &[&str] = &[
    "sandboxer/agent/v1/control.proto",
    "sandboxer/agent/v1/stream_resume.proto",
    "containerd/services/streaming/v1/streaming.proto",
    "containerd/types/transfer/stream_data.proto",
];

#[cfg(feature = "ttrpc")]
fn ttrpc() -> Result<(), Box<dyn std::error::Error>> {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest.join("proto").join("agent");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?).join("agent");
    std::fs::create_dir_all(&out_dir)?;
    let inputs: Vec<PathBuf> = TTRPC_FILES.iter().map(|f| root.join(f)).collect();
    ttrpc_codegen::Codegen::new()
        .inputs(&inputs)
        .include(&root)
        .rust_protobuf()
        .rust_protobuf_customize(ttrpc_codegen::ProtobufCustomize::default().gen_mod_rs(false))
        .customize(ttrpc_codegen::Customize {
            async_all: true,
            ..Default::default()
        })
        .out_dir(&out_dir)
        .run()?;
    // `include!` cannot take inner attributes or inner doc comments: drop those lines.
    for entry in std::fs::read_dir(&out_dir)? {
        let path = entry?.path();
        let text = std::fs::read_to_string(&path)?;
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("#!") && !l.starts_with("//!"))
            .collect();
        std::fs::write(&path, kept.join("\n"))?;
    }
    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}

#[cfg(feature = "grpc")]
fn grpc() -> Result<(), Box<dyn std::error::Error>> {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    for set in SETS {
        let root = manifest.join("proto").join(set.name);
        let out_dir = out.join(set.name);
        std::fs::create_dir_all(&out_dir)?;
        let files: Vec<PathBuf> = set.files.iter().map(|f| root.join(f)).collect();
        let mut includes = vec![root.clone()];
        includes.extend(well_known_includes());
        let mut config = prost_build::Config::new();
        // `prost::Name` gives each message its full name, used for `Any` type URLs.
        config.enable_type_names();
        tonic_prost_build::configure()
            .build_server(true)
            .build_client(true)
            .out_dir(&out_dir)
            .compile_with_config(config, &files, &includes)?;
        println!("cargo:rerun-if-changed={}", root.display());
    }
    Ok(())
}

/// Where `google/protobuf/*.proto` live: Debian's libprotobuf-dev puts them in /usr/include.
#[cfg(feature = "grpc")]
fn well_known_includes() -> Vec<PathBuf> {
    ["/usr/include", "/usr/local/include"]
        .iter()
        .map(std::path::Path::new)
        .filter(|d| d.join("google/protobuf/any.proto").exists())
        .map(std::path::Path::to_path_buf)
        .collect()
}
