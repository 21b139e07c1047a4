// SPDX-License-Identifier: Apache-2.0
//! Guest image tooling: a newc cpio writer/reader ([`cpio`]), the agent initramfs layout
//! ([`initramfs`]) and the stripping of the agent that goes into it ([`strip`]). The guest kernel itself is built by `guest/build-kernel` from
//! `guest/kernel/config-fragment`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cpio;
pub mod initramfs;
pub mod strip;

/// The tests' rule for a missing host tool: a loud `SKIP` line on a developer's machine, a
/// failure under CI (`CI=true`, or `SANDBOXER_REQUIRE_TOOLS=1`), where `tests/setup` installs
/// every tool.
#[cfg(test)]
fn skip_without_tool(test: &str, why: &str) {
    let required = std::env::var("CI").is_ok_and(|v| v == "true")
        || std::env::var("SANDBOXER_REQUIRE_TOOLS").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "{test}: {why} (required: CI=true or SANDBOXER_REQUIRE_TOOLS=1)"
    );
    eprintln!("SKIP {test}: {why}");
}
