// SPDX-License-Identifier: Apache-2.0
//! Prints the path of a built test guest: `test-guest-path <name>` (`long64.bzImage` for the
//! bzImage). Scripts use it to hand a guest to `sandboxer vm run`.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use test_guests::Guest;

fn main() -> ExitCode {
    let Some(name) = std::env::args().nth(1) else {
        eprintln!("usage: test-guest-path <name>");
        return ExitCode::FAILURE;
    };
    if name == "long64.bzImage" {
        println!("{}", test_guests::long64_bzimage().display());
        return ExitCode::SUCCESS;
    }
    match Guest::ALL.iter().find(|g| g.name() == name) {
        Some(g) => {
            println!("{}", g.elf().display());
            ExitCode::SUCCESS
        }
        None => {
            let names: Vec<_> = Guest::ALL.iter().map(|g| g.name()).collect();
            eprintln!("unknown guest {name:?}; guests: {names:?} and long64.bzImage");
            ExitCode::FAILURE
        }
    }
}
