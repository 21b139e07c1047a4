// SPDX-License-Identifier: Apache-2.0
//! Embeds the guest kernel and the agent initramfs in the `sandboxer` binary (the single-binary
//! product, DESIGN.md §4) when the build names them; `tools/devtool dist` does. Each may be
//! zstd-compressed (the daemon unpacks it once at start). Unset, nothing is embedded and the
//! daemon needs `vm.kernel` / `vm.initramfs` configured.
//!
//! - `SANDBOXER_EMBED_KERNEL`: the guest kernel (vmlinux or bzImage, or either `.zst`)
//! - `SANDBOXER_EMBED_KERNEL_VERSION`: what `sandboxer --version` says of it
//! - `SANDBOXER_EMBED_INITRAMFS`: the agent initramfs (cpio, or `.zst`)
//! - `SANDBOXER_EMBED_AGENT_VERSION`: what `sandboxer --version` says of the agent

use std::path::PathBuf;
use std::{env, fs, io};

/// One embeddable artefact: the variable naming its file, the one naming its version, and the
/// file name it gets in `OUT_DIR`.
struct Piece {
    file_var: &'static str,
    version_var: &'static str,
    out_name: &'static str,
}

const PIECES: [Piece; 2] = [
    Piece {
        file_var: "SANDBOXER_EMBED_KERNEL",
        version_var: "SANDBOXER_EMBED_KERNEL_VERSION",
        out_name: "kernel.img",
    },
    Piece {
        file_var: "SANDBOXER_EMBED_INITRAMFS",
        version_var: "SANDBOXER_EMBED_AGENT_VERSION",
        out_name: "initramfs.img",
    },
];

/// Copies the piece's file into `out` (an empty file when unset) and returns its version text.
fn embed(piece: &Piece, out: &std::path::Path) -> io::Result<String> {
    println!("cargo:rerun-if-env-changed={}", piece.file_var);
    println!("cargo:rerun-if-env-changed={}", piece.version_var);
    let Some(src) = env::var_os(piece.file_var).filter(|p| !p.is_empty()) else {
        fs::write(out, [])?;
        return Ok(String::new());
    };
    let src = PathBuf::from(src);
    println!("cargo:rerun-if-changed={}", src.display());
    let data = fs::read(&src).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("{}={}: {e}", piece.file_var, src.display()),
        )
    })?;
    if data.is_empty() {
        return Err(io::Error::other(format!(
            "{}={} is an empty file",
            piece.file_var,
            src.display()
        )));
    }
    fs::write(out, data)?;
    let version = env::var(piece.version_var).unwrap_or_default();
    Ok(if version.is_empty() {
        format!("unversioned ({})", src.display())
    } else {
        version
    })
}

fn main() -> io::Result<()> {
    let out_dir = env::var_os("OUT_DIR").ok_or_else(|| io::Error::other("OUT_DIR is not set"))?;
    let out_dir = PathBuf::from(out_dir);
    let mut versions = Vec::new();
    for piece in &PIECES {
        versions.push(embed(piece, &out_dir.join(piece.out_name))?);
    }
    // The versions as Rust string literals (Debug quoting escapes whatever they contain).
    let code = format!(
        "/// What `SANDBOXER_EMBED_KERNEL_VERSION` said (empty: no kernel embedded).\n\
         pub const KERNEL_VERSION: &str = {:?};\n\
         /// What `SANDBOXER_EMBED_AGENT_VERSION` said (empty: no initramfs embedded).\n\
         pub const AGENT_VERSION: &str = {:?};\n",
        versions[0], versions[1]
    );
    fs::write(out_dir.join("embedded_versions.rs"), code)
}
