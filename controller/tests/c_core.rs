// SPDX-License-Identifier: Apache-2.0
//! Both API sockets with a stock gRPC C-core client: Python's grpcio, the core iSulad's C++ gRPC
//! links, which sends the socket path as `:authority`. `tests/grpc-c-core/client.py` calls every
//! RPC of one API against the daemon (fake VM backend) and checks the answers and error codes.
//!
//! Needs python3 with grpcio and grpcio-tools (`tests/setup` installs them): without them the
//! test prints a loud SKIP, and fails instead under CI (`CI=true`) or with
//! `SANDBOXER_REQUIRE_GRPCIO=1`.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed step fails the test"
)]
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration test crate: its tests are its top level"
)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::Daemon;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Whether python3 can import grpcio and grpcio-tools; panics when it must and cannot.
fn have_grpcio() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import grpc, grpc_tools.protoc"])
        .status()
        .is_ok_and(|s| s.success());
    let required = std::env::var("CI").as_deref() == Ok("true")
        || std::env::var("SANDBOXER_REQUIRE_GRPCIO").as_deref() == Ok("1");
    if !ok && required {
        panic!("python3 with grpcio and grpcio-tools is required (tests/setup installs them)");
    }
    if !ok {
        eprintln!("SKIP c_core: python3 with grpcio and grpcio-tools not found (tests/setup)");
    }
    ok
}

/// Runs the C-core client for `api` against `socket`; returns its output.
async fn c_core(api: &str, socket: &Path) -> String {
    let script = repo().join("tests/grpc-c-core/client.py");
    let protos = repo().join("proto/proto");
    let (api, socket) = (api.to_string(), socket.to_path_buf());
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .arg(&api)
            .arg(&socket)
            .arg(protos)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "C-core client failed:\n{text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_c_core_client_reaches_both_apis() {
    if !have_grpcio() {
        return;
    }
    // A socket path with characters C-core percent-encodes in its `:authority`.
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_in(dir, |c| {
        let base = c.state_dir.parent().unwrap().join("api dir+");
        c.api.socket = base.join("sandboxer.sock");
        c.api.seed_socket = base.join("sandboxer-seed.sock");
    })
    .await;
    let v2 = c_core("v2", &d.config.api.socket).await;
    assert!(v2.contains("PASS v2"), "{v2}");
    for rpc in [
        "Create", "Start", "Platform", "Status", "Metrics", "Update", "Stop", "Wait", "Shutdown",
    ] {
        assert!(v2.contains(&format!("ok {rpc}")), "{rpc} missing:\n{v2}");
    }
    let seed = c_core("seed", &d.config.api.seed_socket).await;
    assert!(seed.contains("PASS seed"), "{seed}");
    for rpc in [
        "Create",
        "Start",
        "Platform",
        "Prepare",
        "Purge",
        "UpdateResources",
        "Stop",
        "Wait",
        "Status",
        "Shutdown",
    ] {
        assert!(
            seed.contains(&format!("ok {rpc}")),
            "{rpc} missing:\n{seed}"
        );
    }
    d.stop().await;
}
