// SPDX-License-Identifier: Apache-2.0
//! Both API sockets with a stock grpc-go client (Debian's google.golang.org/grpc), dialled the
//! way containerd's Go clients dial a unix socket: the target `unix://<socket>` with a context
//! dialer (grpc-go then sends `localhost` as the `:authority`; the C-core client of
//! `c_core.rs` sends the socket path).
//! `tests/grpc-go/client.go` invokes the methods with raw message bytes; this test encodes
//! the requests, decodes the answers and drives one sandbox through its whole life on each API
//! (fake VM backend), error codes included.
//!
//! Needs Go and grpc-go's sources (`tests/setup` installs golang-go and
//! golang-google-grpc-dev): without them the test prints a loud SKIP, and fails instead under
//! CI (`CI=true`) or with `SANDBOXER_REQUIRE_GRPC_GO=1`.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed step fails the test"
)]
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration test crate: its tests are its top level"
)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use common::Daemon;
use prost::Message;

/// Where Debian's Go packages keep their sources (GOPATH mode).
const GOPATH: &str = "/usr/share/gocode";
/// The API's gRPC service, the same name on both sockets.
const SERVICE: &str = "/containerd.services.sandbox.v1.Controller";

/// Builds `tests/grpc-go/client.go` (Go caches the build outside the tree); `None` when Go or
/// grpc-go is missing and the test may skip.
fn go_client() -> Option<PathBuf> {
    let have = Path::new(GOPATH)
        .join("src/google.golang.org/grpc")
        .is_dir()
        && Command::new("go")
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success());
    let required = std::env::var("CI").as_deref() == Ok("true")
        || std::env::var("SANDBOXER_REQUIRE_GRPC_GO").as_deref() == Ok("1");
    if !have {
        assert!(
            !required,
            "go and grpc-go ({GOPATH}) are required (tests/setup installs golang-go and \
             golang-google-grpc-dev)"
        );
        eprintln!("SKIP grpc_go: go or grpc-go ({GOPATH}) not found (tests/setup)");
        return None;
    }
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/grpc-go/client.go");
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("grpc-go-client");
    let built = Command::new("go")
        .args(["build", "-o"])
        .arg(&out)
        .arg(&source)
        .env("GO111MODULE", "off")
        .env("GOPATH", GOPATH)
        .env("GOFLAGS", "")
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "go build {}: {}",
        source.display(),
        String::from_utf8_lossy(&built.stderr)
    );
    Some(out)
}

/// The grpc-go client on one socket: one connection, one call per line.
struct GoClient {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

/// A failed call: its gRPC code number and message.
#[derive(Debug)]
struct Failed {
    code: i32,
    message: String,
}

impl GoClient {
    fn start(bin: &Path, socket: &Path) -> Self {
        let mut child = Command::new(bin)
            .arg(socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        GoClient {
            child,
            stdin,
            stdout,
        }
    }

    fn call<Resp: Message + Default>(
        &mut self,
        method: &str,
        req: &impl Message,
    ) -> Result<Resp, Failed> {
        let line = format!("{SERVICE}/{method} {}\n", hex(&req.encode_to_vec()));
        self.stdin.write_all(line.as_bytes()).unwrap();
        let mut answer = String::new();
        self.stdout.read_line(&mut answer).unwrap();
        let mut words = answer.split_whitespace();
        match words.next() {
            Some("OK") => Ok(Resp::decode(&*unhex(words.next().unwrap_or(""))).unwrap()),
            Some("ERR") => Err(Failed {
                code: words.next().unwrap().parse().unwrap(),
                message: String::from_utf8(unhex(words.next().unwrap_or(""))).unwrap(),
            }),
            _ => panic!("the grpc-go client answered {answer:?} to {method}"),
        }
    }

    /// `call` that must succeed.
    fn ok<Resp: Message + Default>(&mut self, method: &str, req: &impl Message) -> Resp {
        self.call(method, req)
            .unwrap_or_else(|e| panic!("{method} from grpc-go: {e:?}"))
    }

    /// `call` that must fail with `code`, with a message.
    fn fails(&mut self, method: &str, req: &impl Message, code: tonic::Code) {
        let e = self
            .call::<prost_types::Any>(method, req)
            .expect_err(method);
        assert_eq!(e.code, code as i32, "{method}: {e:?}");
        assert!(!e.message.is_empty(), "{method}: no message");
    }

    fn finish(mut self) {
        drop(self.stdin);
        assert!(self.child.wait().unwrap().success());
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

fn v2(c: &mut GoClient) {
    use proto::v2::sandbox::*;
    let id = || "grpc-go-v2".to_owned();
    let sandboxer = || "sandboxer".to_owned();
    let _: ControllerCreateResponse = c.ok(
        "Create",
        &ControllerCreateRequest {
            sandbox_id: id(),
            sandboxer: sandboxer(),
            ..Default::default()
        },
    );
    let started: ControllerStartResponse = c.ok(
        "Start",
        &ControllerStartRequest {
            sandbox_id: id(),
            sandboxer: sandboxer(),
        },
    );
    assert_eq!(started.version, 3);
    assert!(started.address.starts_with("ttrpc+unix://"), "{started:?}");
    let platform: ControllerPlatformResponse = c.ok(
        "Platform",
        &ControllerPlatformRequest {
            sandbox_id: id(),
            sandboxer: sandboxer(),
        },
    );
    let p = platform.platform.unwrap();
    assert_eq!((p.os.as_str(), p.architecture.as_str()), ("linux", "amd64"));
    let status: ControllerStatusResponse = c.ok(
        "Status",
        &ControllerStatusRequest {
            sandbox_id: id(),
            verbose: true,
            sandboxer: sandboxer(),
        },
    );
    assert_eq!(status.state, "SANDBOX_READY");
    assert_eq!(status.address, started.address);
    let _: ControllerMetricsResponse = c.ok(
        "Metrics",
        &ControllerMetricsRequest {
            sandbox_id: id(),
            sandboxer: sandboxer(),
        },
    );
    let mut sandbox = proto::v2::types::Sandbox {
        sandbox_id: id(),
        ..Default::default()
    };
    sandbox.labels.insert("from".into(), "grpc-go".into());
    let _: ControllerUpdateResponse = c.ok(
        "Update",
        &ControllerUpdateRequest {
            sandbox_id: id(),
            sandboxer: sandboxer(),
            sandbox: Some(sandbox),
            fields: vec!["labels".into()],
        },
    );
    let _: ControllerStopResponse = c.ok(
        "Stop",
        &ControllerStopRequest {
            sandbox_id: id(),
            timeout_secs: 1,
            sandboxer: sandboxer(),
        },
    );
    let waited: ControllerWaitResponse = c.ok(
        "Wait",
        &ControllerWaitRequest {
            sandbox_id: id(),
            sandboxer: sandboxer(),
        },
    );
    assert!(waited.exited_at.is_some(), "{waited:?}");
    let _: ControllerShutdownResponse = c.ok(
        "Shutdown",
        &ControllerShutdownRequest {
            sandbox_id: id(),
            sandboxer: sandboxer(),
        },
    );
    c.fails(
        "Status",
        &ControllerStatusRequest {
            sandbox_id: id(),
            verbose: false,
            sandboxer: sandboxer(),
        },
        tonic::Code::NotFound,
    );
    c.fails(
        "Create",
        &ControllerCreateRequest {
            sandbox_id: "../x".into(),
            ..Default::default()
        },
        tonic::Code::InvalidArgument,
    );
}

fn seed(c: &mut GoClient) {
    use proto::seed::sandbox::*;
    let id = || "grpc-go-seed".to_owned();
    let sandboxer = || "sandboxer".to_owned();
    let _: ControllerCreateResponse = c.ok(
        "Create",
        &ControllerCreateRequest {
            sandbox_id: id(),
            sandboxer: sandboxer(),
            ..Default::default()
        },
    );
    let started: ControllerStartResponse = c.ok(
        "Start",
        &ControllerStartRequest {
            sandbox_id: id(),
            sandboxer: sandboxer(),
        },
    );
    assert!(
        started.task_address.starts_with("ttrpc+unix://"),
        "{started:?}"
    );
    let platform: ControllerPlatformResponse = c.ok(
        "Platform",
        &ControllerPlatformRequest {
            sandbox_id: id(),
            sandboxer: sandboxer(),
        },
    );
    assert_eq!(platform.platform.unwrap().os, "linux");
    let prepared: PrepareResponse = c.ok(
        "Prepare",
        &PrepareRequest {
            sandbox_id: id(),
            sandboxer: sandboxer(),
            container_id: "c1".into(),
            ..Default::default()
        },
    );
    assert!(prepared.bundle.ends_with("/c1"), "{prepared:?}");
    let _: UpdateResourcesResponse = c.ok(
        "UpdateResources",
        &UpdateResourcesRequest {
            sandbox_id: id(),
            sandboxer: sandboxer(),
            container_id: "c1".into(),
            ..Default::default()
        },
    );
    let purge = || PurgeRequest {
        sandbox_id: id(),
        sandboxer: sandboxer(),
        container_id: "c1".into(),
        exec_id: String::new(),
    };
    let _: PurgeResponse = c.ok("Purge", &purge());
    let status: ControllerStatusResponse = c.ok(
        "Status",
        &ControllerStatusRequest {
            sandbox_id: id(),
            verbose: true,
            sandboxer: sandboxer(),
        },
    );
    assert_eq!(status.state, "SANDBOX_READY");
    let _: ControllerStopResponse = c.ok(
        "Stop",
        &ControllerStopRequest {
            sandbox_id: id(),
            timeout_secs: 1,
            sandboxer: sandboxer(),
        },
    );
    let _: ControllerWaitResponse = c.ok(
        "Wait",
        &ControllerWaitRequest {
            sandbox_id: id(),
            sandboxer: sandboxer(),
        },
    );
    let _: ControllerShutdownResponse = c.ok(
        "Shutdown",
        &ControllerShutdownRequest {
            sandbox_id: id(),
            sandboxer: sandboxer(),
        },
    );
    c.fails("Purge", &purge(), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_go_client_reaches_both_apis() {
    let Some(bin) = go_client() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_in(dir, |_| {}).await;
    let (v2_socket, seed_socket) = (
        d.config.api.socket.clone(),
        d.config.api.seed_socket.clone(),
    );
    tokio::task::spawn_blocking(move || {
        let mut c = GoClient::start(&bin, &v2_socket);
        v2(&mut c);
        c.finish();
        let mut c = GoClient::start(&bin, &seed_socket);
        seed(&mut c);
        c.finish();
    })
    .await
    .unwrap();
    d.stop().await;
}
