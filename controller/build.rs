// SPDX-License-Identifier: Apache-2.0
//! Embeds the guest agent's initramfs in the `sandboxer` binary (single-binary deployment,
//! DESIGN.md §4) when `SANDBOXER_EMBED_INITRAMFS` names a prebuilt one; otherwise embeds
//! nothing (an empty file), and a daemon with no `vm.initramfs` configured refuses to Start.

use std::path::PathBuf;
use std::{env, fs, io};

/// The variable naming the prebuilt initramfs (`tests/demo` and release builds set it).
const EMBED_VAR: &str = "SANDBOXER_EMBED_INITRAMFS";

fn main() -> io::Result<()> {
    println!("cargo:rerun-if-env-changed={EMBED_VAR}");
    let out_dir = env::var_os("OUT_DIR").ok_or_else(|| io::Error::other("OUT_DIR is not set"))?;
    let out = PathBuf::from(out_dir).join("initramfs.img");
    match env::var_os(EMBED_VAR).filter(|p| !p.is_empty()) {
        Some(src) => {
            let src = PathBuf::from(src);
            println!("cargo:rerun-if-changed={}", src.display());
            let data = fs::read(&src).map_err(|e| {
                io::Error::new(e.kind(), format!("{EMBED_VAR}={}: {e}", src.display()))
            })?;
            if data.is_empty() {
                return Err(io::Error::other(format!(
                    "{EMBED_VAR}={} is an empty file",
                    src.display()
                )));
            }
            fs::write(&out, data)
        }
        None => fs::write(&out, []),
    }
}
