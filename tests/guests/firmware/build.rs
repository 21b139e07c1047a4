// SPDX-License-Identifier: Apache-2.0
//! Links every guest with `linker.ld` (fixed physical layout at 1 MiB, PT_NOTE for PVH).

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".to_owned());
    println!("cargo:rerun-if-changed=linker.ld");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-link-arg-bins=-T{dir}/linker.ld");
    println!("cargo:rustc-link-arg-bins=--gc-sections");
}
