// SPDX-License-Identifier: Apache-2.0
//! Purpose-built test guests for KVM tests and benchmarks, plus the `require_kvm!` gate.
//!
//! This environment's `/dev/kvm` cannot run a stock Linux guest (DESIGN.md §5), so the project
//! boots small guests of its own that exercise the VMM for real.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::fs::OpenOptions;

/// Whether `/dev/kvm` can be opened read-write by this process.
pub fn kvm_usable() -> Result<(), String> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| format!("/dev/kvm is not usable: {e}"))
}

/// Whether the environment demands KVM (CI sets `SANDBOXER_REQUIRE_KVM=1`).
pub fn kvm_required() -> bool {
    std::env::var("SANDBOXER_REQUIRE_KVM").is_ok_and(|v| v == "1")
}

/// Gate for tests that need `/dev/kvm`.
///
/// Returns from the test with a loud `SKIP` line when KVM is unusable, and panics instead when
/// `SANDBOXER_REQUIRE_KVM=1`, so a KVM CI run can never pass silently.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if let Err(why) = $crate::kvm_usable() {
            if $crate::kvm_required() {
                panic!("SANDBOXER_REQUIRE_KVM=1 but {why}");
            }
            eprintln!("SKIP {}: {why}", module_path!());
            return;
        }
    };
}
