// SPDX-License-Identifier: Apache-2.0
//! Create refuses a sandbox the descriptor limit has no room for, with RESOURCE_EXHAUSTED
//! naming the limit, and takes one again once a sandbox is shut down. (Its own test binary: it
//! lowers this process's soft RLIMIT_NOFILE.)
#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed step fails the test"
)]
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration test crate: its tests are its top level"
)]

mod common;

use common::Daemon;
use containerd_client::services::v1::sandbox::{
    ControllerCreateRequest, ControllerShutdownRequest,
};
use controller::nofile::{FDS_PER_SANDBOX, RESERVED_FDS, open_fds};
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use tonic::Code;

fn create(id: &str) -> ControllerCreateRequest {
    ControllerCreateRequest {
        sandbox_id: id.into(),
        sandboxer: "sandboxer".into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_is_refused_before_the_descriptors_run_out() {
    // Room for three sandboxes over what the process holds now; the daemon and the client
    // hold a few more by the first Create (its baseline), so two or three fit.
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let soft = open_fds().unwrap() + RESERVED_FDS + 3 * FDS_PER_SANDBOX + 8;
    assert!(
        soft <= hard,
        "the hard limit {hard} is too low for this test"
    );
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();

    let d = Daemon::start().await;
    let mut c = d.v2().await;
    let mut admitted = Vec::new();
    let refused = loop {
        let id = format!("s{}", admitted.len());
        match c.create(create(&id)).await {
            Ok(_) => admitted.push(id),
            Err(status) => break status,
        }
        assert!(
            admitted.len() <= 3,
            "more sandboxes than the limit has room for"
        );
    };
    assert!(
        (2..=3).contains(&admitted.len()),
        "{} admitted",
        admitted.len()
    );
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let expected = format!(
        "Cannot create sandbox s{}: RLIMIT_NOFILE {soft} leaves no room for another sandbox: {} \
         sandboxes at {FDS_PER_SANDBOX} descriptors each",
        admitted.len(),
        admitted.len()
    );
    assert!(
        refused.message().starts_with(&expected),
        "{}",
        refused.message()
    );
    // The refused sandbox does not exist; a shut down one frees its budget.
    let again = c.create(create("again")).await.unwrap_err();
    assert_eq!(again.code(), Code::ResourceExhausted);
    c.shutdown(ControllerShutdownRequest {
        sandbox_id: admitted.remove(0),
        sandboxer: "sandboxer".into(),
    })
    .await
    .unwrap();
    c.create(create("again")).await.unwrap();
    let full = c.create(create("one-more")).await.unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted);
    d.stop().await;
}
