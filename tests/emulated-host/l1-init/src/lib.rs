// SPDX-License-Identifier: Apache-2.0
//! The emulated KVM host ("L1") of the Linux-guest tests (DESIGN.md §5, point 3).
//!
//! `tests/emulated-host/run` boots an L1 Linux with KVM under QEMU TCG (`-cpu max`, AMD SVM)
//! whose initramfs holds:
//!
//! | path | what |
//! |---|---|
//! | `/init` | `l1-init`: mounts, checks `/dev/kvm`, runs the selected tests, prints one [`RESULT_PREFIX`] line per test, ends L1 |
//! | `/bin/emu-test` | the test payload: one mode per test case ([`cases::CASES`]) |
//! | `/tests/<name>` | one executable per test (a symlink to `/bin/emu-test` for the built-in cases) |
//! | `/bin/sandboxer` | the project's binary, static |
//! | `/guest/vmlinux`, `/guest/bzImage`, `/guest/initramfs` | the guest kernel and the agent initramfs |
//!
//! The L1 kernel command line selects the tests (`emu.tests=a,b`) and bounds each one
//! (`emu.timeout=<seconds>`). Everything the host parses starts with `EMU-`.

pub mod cases;
pub mod cmdline;
pub mod sys;

/// Prefix of the per-test result lines: `EMU-RESULT <name> pass|fail <seconds>s <detail>`.
pub const RESULT_PREFIX: &str = "EMU-RESULT";
/// Prefix of the line L1 prints once every selected test has run: `EMU-DONE <passed> <failed>`.
pub const DONE_PREFIX: &str = "EMU-DONE";
/// Prefix of the line L1 prints every [`BEAT_SECS`] seconds while its clock and scheduler work:
/// `EMU-BEAT <uptime>`. The host takes a console silent for several beats as a frozen L1.
pub const BEAT_PREFIX: &str = "EMU-BEAT";
/// Seconds between two [`BEAT_PREFIX`] lines.
pub const BEAT_SECS: u64 = 10;
/// Directory where each test leaves its one-line detail (`<name>.detail`) for the result line.
pub const DETAIL_DIR: &str = "/run/emu";
/// Environment variable naming the file a test writes its one-line detail to.
pub const DETAIL_ENV: &str = "EMU_DETAIL_FILE";
