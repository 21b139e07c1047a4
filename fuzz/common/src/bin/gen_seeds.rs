// SPDX-License-Identifier: Apache-2.0
//! Writes the seed corpora: `gen-seeds <corpus dir>` (default `corpus`).

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let dir = std::env::args_os()
        .nth(1)
        .map_or_else(|| PathBuf::from("corpus"), PathBuf::from);
    fuzz_common::seeds::write_all(&dir)?;
    println!("seeds written to {}", dir.display());
    Ok(())
}
