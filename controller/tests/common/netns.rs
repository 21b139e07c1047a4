// SPDX-License-Identifier: Apache-2.0
//! A pod network namespace as CNI leaves it, made by the test (root and iproute2).

use std::os::unix::fs::MetadataExt as _;
use std::process::Command;

/// Tells the namespaces of one test process apart.
static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Runs `ip ARGS` and returns its output; a failure fails the test.
pub fn ip(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("ip {}: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Root and iproute2, or a loud skip (a failure under CI: `CI=true` or SANDBOXER_REQUIRE_ROOT=1).
pub fn can_make_netns() -> bool {
    // /proc/self belongs to the process's effective user.
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    let iproute2 = Command::new("ip").arg("-V").output().is_ok();
    if root && iproute2 {
        return true;
    }
    let why = if root { "no iproute2" } else { "not root" };
    assert!(
        std::env::var("SANDBOXER_REQUIRE_ROOT").as_deref() != Ok("1")
            && std::env::var("CI").as_deref() != Ok("true"),
        "this test needs root and iproute2: {why} (CI=true or SANDBOXER_REQUIRE_ROOT=1)"
    );
    eprintln!("SKIP: this test needs root and iproute2: {why}");
    false
}

/// A pod netns with `eth0` (one end of a veth pair) as CNI leaves it; deleted on drop.
pub struct Netns(String);

impl Netns {
    pub fn new() -> Self {
        let name = format!(
            "sbxns-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = Netns(name);
        let n = ns.0.as_str();
        ip(&[
            "-n", n, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
        ]);
        ip(&["-n", n, "addr", "add", "10.125.0.2/24", "dev", "eth0"]);
        ip(&["-n", n, "link", "set", "eth0", "up"]);
        ip(&["-n", n, "link", "set", "peer0", "up"]);
        ns
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.0)
    }

    pub fn links(&self) -> String {
        ip(&["-n", &self.0, "-o", "link", "show"])
    }

    pub fn has_ingress(&self) -> bool {
        let out = Command::new("tc")
            .args(["-n", &self.0, "qdisc", "show", "dev", "eth0"])
            .output()
            .expect("tc");
        String::from_utf8_lossy(&out.stdout).contains("ingress")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}
