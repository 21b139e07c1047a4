// SPDX-License-Identifier: Apache-2.0
//! `tsc-khz`: measures this machine's TSC frequency in kHz (median of five 200 ms windows
//! against `CLOCK_MONOTONIC_RAW`) and prints it. The host script passes it to L1 as
//! `tsc_early_khz=` when the kernel log does not say it: under QEMU TCG the guest's TSC runs at
//! the host's rate, and L1's own PIT calibration sometimes fails there (then KVM in L1 never
//! enters its guests).

use std::process::ExitCode;
use std::time::Duration;

fn monotonic_raw_ns() -> Option<u128> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_RAW, &mut ts) };
    if rc != 0 {
        return None;
    }
    let secs = u128::try_from(ts.tv_sec).ok()?;
    let nanos = u128::try_from(ts.tv_nsec).ok()?;
    Some(secs * 1_000_000_000 + nanos)
}

fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads the time-stamp counter; every x86_64 CPU has it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

fn window() -> Option<u64> {
    let (t0, c0) = (monotonic_raw_ns()?, rdtsc());
    std::thread::sleep(Duration::from_millis(200));
    let (t1, c1) = (monotonic_raw_ns()?, rdtsc());
    let ns = t1.checked_sub(t0).filter(|ns| *ns > 0)?;
    let cycles = u128::from(c1.checked_sub(c0)?);
    u64::try_from(cycles * 1_000_000 / ns).ok()
}

fn main() -> ExitCode {
    let mut samples: Vec<u64> = (0..5).filter_map(|_| window()).collect();
    samples.sort_unstable();
    match samples.get(samples.len() / 2) {
        Some(khz) if *khz > 0 => {
            println!("{khz}");
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("tsc-khz: cannot measure the TSC");
            ExitCode::FAILURE
        }
    }
}
