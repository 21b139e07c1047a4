// SPDX-License-Identifier: Apache-2.0
//! Field numbers on the wire: each message is encoded with one field set and the field number
//! in its tag is checked against DESIGN.md section 3 (and, for `cri`, the CRI api.proto).
//! A renumbered field breaks interoperability silently; this makes it loud.
#![expect(
    clippy::tests_outside_test_module,
    reason = "an integration test crate: its tests are its top level"
)]
#![expect(
    clippy::needless_update,
    reason = "the field! macro sets one field of messages that may have only that one"
)]

use std::collections::HashMap;

use prost::Message;
use proto::cri::v1 as cri;
use proto::seed::sandbox as seed;
use proto::seed::types as seed_types;
use proto::v2::sandbox as v2;
use proto::v2::types as v2_types;

/// The field number of the first (only) field in `bytes`.
fn field_number(bytes: &[u8]) -> u64 {
    let mut buf = bytes;
    let key = prost::encoding::decode_varint(&mut buf).expect("a tag");
    key >> 3
}

macro_rules! field {
    ($($ty:ident)::+ { $($f:ident : $v:expr),+ } => $n:expr) => {{
        let m = $($ty)::+ { $($f: $v),+, ..Default::default() };
        let bytes = m.encode_to_vec();
        assert_eq!(
            field_number(&bytes),
            $n,
            "{}.{}",
            stringify!($($ty)::+),
            stringify!($($f)+)
        );
        assert_eq!(<$($ty)::+ as Message>::decode(bytes.as_slice()).unwrap(), m);
    }};
}

fn s() -> String {
    "x".to_string()
}

fn any() -> Option<prost_types::Any> {
    Some(prost_types::Any {
        type_url: "t".into(),
        value: vec![1],
    })
}

fn ts() -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: 1,
        nanos: 0,
    })
}

fn map() -> HashMap<String, String> {
    HashMap::from([(s(), s())])
}

#[test]
fn containerd_v2_controller() {
    field!(v2::ControllerCreateRequest { sandbox_id: s() } => 1);
    field!(v2::ControllerCreateRequest { rootfs: vec![v2_types::Mount::default()] } => 2);
    field!(v2::ControllerCreateRequest { options: any() } => 3);
    field!(v2::ControllerCreateRequest { netns_path: s() } => 4);
    field!(v2::ControllerCreateRequest { annotations: map() } => 5);
    field!(v2::ControllerCreateRequest { sandbox: Some(v2_types::Sandbox::default()) } => 6);
    field!(v2::ControllerCreateRequest { sandboxer: s() } => 10);
    field!(v2::ControllerCreateResponse { sandbox_id: s() } => 1);
    field!(v2::ControllerStartRequest { sandboxer: s() } => 10);
    field!(v2::ControllerStartResponse { pid: 1 } => 2);
    field!(v2::ControllerStartResponse { created_at: ts() } => 3);
    field!(v2::ControllerStartResponse { labels: map() } => 4);
    field!(v2::ControllerStartResponse { address: s() } => 5);
    field!(v2::ControllerStartResponse { version: 3 } => 6);
    field!(v2::ControllerStartResponse { spec: any() } => 7);
    field!(v2::ControllerPlatformRequest { sandboxer: s() } => 10);
    field!(v2::ControllerPlatformResponse { platform: Some(v2_types::Platform::default()) } => 1);
    field!(v2::ControllerStopRequest { timeout_secs: 1 } => 2);
    field!(v2::ControllerStopRequest { sandboxer: s() } => 10);
    field!(v2::ControllerWaitRequest { sandboxer: s() } => 10);
    field!(v2::ControllerWaitResponse { exit_status: 1 } => 1);
    field!(v2::ControllerWaitResponse { exited_at: ts() } => 2);
    field!(v2::ControllerStatusRequest { verbose: true } => 2);
    field!(v2::ControllerStatusRequest { sandboxer: s() } => 10);
    field!(v2::ControllerStatusResponse { pid: 1 } => 2);
    field!(v2::ControllerStatusResponse { state: s() } => 3);
    field!(v2::ControllerStatusResponse { info: map() } => 4);
    field!(v2::ControllerStatusResponse { created_at: ts() } => 5);
    field!(v2::ControllerStatusResponse { exited_at: ts() } => 6);
    field!(v2::ControllerStatusResponse { extra: any() } => 7);
    field!(v2::ControllerStatusResponse { address: s() } => 8);
    field!(v2::ControllerStatusResponse { version: 3 } => 9);
    field!(v2::ControllerShutdownRequest { sandboxer: s() } => 10);
    field!(v2::ControllerMetricsRequest { sandboxer: s() } => 10);
    field!(v2::ControllerMetricsResponse { metrics: Some(v2_types::Metric::default()) } => 1);
    field!(v2::ControllerUpdateRequest { sandbox_id: s() } => 1);
    field!(v2::ControllerUpdateRequest { sandboxer: s() } => 2);
    field!(v2::ControllerUpdateRequest { sandbox: Some(v2_types::Sandbox::default()) } => 3);
    field!(v2::ControllerUpdateRequest { fields: vec![s()] } => 4);
}

#[test]
fn containerd_types() {
    field!(v2_types::Mount { r#type: s() } => 1);
    field!(v2_types::Mount { source: s() } => 2);
    field!(v2_types::Mount { target: s() } => 3);
    field!(v2_types::Mount { options: vec![s()] } => 4);
    field!(v2_types::Platform { os: s() } => 1);
    field!(v2_types::Platform { architecture: s() } => 2);
    field!(v2_types::Platform { variant: s() } => 3);
    field!(v2_types::Platform { os_version: s() } => 4);
    field!(v2_types::Metric { timestamp: ts() } => 1);
    field!(v2_types::Metric { id: s() } => 2);
    field!(v2_types::Metric { data: any() } => 3);
    field!(v2_types::Sandbox { sandbox_id: s() } => 1);
    field!(v2_types::Sandbox { runtime: Some(Default::default()) } => 2);
    field!(v2_types::Sandbox { spec: any() } => 3);
    field!(v2_types::Sandbox { labels: map() } => 4);
    field!(v2_types::Sandbox { created_at: ts() } => 5);
    field!(v2_types::Sandbox { updated_at: ts() } => 6);
    field!(v2_types::Sandbox { extensions: HashMap::from([(s(), any().unwrap())]) } => 7);
    field!(v2_types::Sandbox { sandboxer: s() } => 10);
    field!(v2_types::sandbox::Runtime { name: s() } => 1);
    field!(v2_types::sandbox::Runtime { options: any() } => 2);
}

#[test]
fn seed_controller() {
    field!(seed::ControllerCreateRequest { sandboxer: s() } => 1);
    field!(seed::ControllerCreateRequest { sandbox_id: s() } => 2);
    field!(seed::ControllerCreateRequest { rootfs: vec![seed_types::Mount::default()] } => 3);
    field!(seed::ControllerCreateRequest { options: any() } => 4);
    field!(seed::ControllerCreateRequest { netns_path: s() } => 5);
    field!(seed::ControllerCreateResponse { sandbox_id: s() } => 1);
    field!(seed::ControllerStartRequest { sandbox_id: s() } => 2);
    field!(seed::ControllerStartResponse { pid: 1 } => 2);
    field!(seed::ControllerStartResponse { created_at: ts() } => 3);
    field!(seed::ControllerStartResponse { labels: map() } => 4);
    field!(seed::ControllerStartResponse { task_address: s() } => 5);
    field!(seed::ControllerPlatformRequest { sandbox_id: s() } => 2);
    field!(seed::ControllerPlatformResponse { platform: Some(seed_types::Platform::default()) } => 1);
    field!(seed::PrepareRequest { sandboxer: s() } => 1);
    field!(seed::PrepareRequest { sandbox_id: s() } => 2);
    field!(seed::PrepareRequest { container_id: s() } => 3);
    field!(seed::PrepareRequest { exec_id: s() } => 4);
    field!(seed::PrepareRequest { spec: any() } => 5);
    field!(seed::PrepareRequest { rootfs: vec![seed_types::Mount::default()] } => 6);
    field!(seed::PrepareRequest { stdin: s() } => 7);
    field!(seed::PrepareRequest { stdout: s() } => 8);
    field!(seed::PrepareRequest { stderr: s() } => 9);
    field!(seed::PrepareRequest { terminal: true } => 10);
    field!(seed::PrepareResponse { bundle: s() } => 1);
    field!(seed::PurgeRequest { container_id: s() } => 3);
    field!(seed::PurgeRequest { exec_id: s() } => 4);
    field!(seed::UpdateResourcesRequest { container_id: s() } => 3);
    field!(seed::UpdateResourcesRequest { resources: any() } => 4);
    field!(seed::UpdateResourcesRequest { annotations: map() } => 5);
    field!(seed::ControllerStopRequest { sandbox_id: s() } => 2);
    field!(seed::ControllerStopRequest { timeout_secs: 1 } => 3);
    field!(seed::ControllerWaitRequest { sandbox_id: s() } => 2);
    field!(seed::ControllerWaitResponse { exit_status: 1 } => 1);
    field!(seed::ControllerWaitResponse { exited_at: ts() } => 2);
    field!(seed::ControllerStatusRequest { sandbox_id: s() } => 2);
    field!(seed::ControllerStatusRequest { verbose: true } => 3);
    field!(seed::ControllerStatusResponse { sandbox_id: s() } => 1);
    field!(seed::ControllerStatusResponse { pid: 1 } => 2);
    field!(seed::ControllerStatusResponse { state: s() } => 3);
    field!(seed::ControllerStatusResponse { task_address: s() } => 4);
    field!(seed::ControllerStatusResponse { info: map() } => 5);
    field!(seed::ControllerStatusResponse { created_at: ts() } => 6);
    field!(seed::ControllerStatusResponse { exited_at: ts() } => 7);
    field!(seed::ControllerStatusResponse { extra: any() } => 8);
    field!(seed::ControllerShutdownRequest { sandboxer: s() } => 1);
    field!(seed::ControllerShutdownRequest { sandbox_id: s() } => 2);
}

#[test]
fn seed_types() {
    field!(seed_types::Mount { r#type: s() } => 1);
    field!(seed_types::Mount { options: vec![s()] } => 4);
    field!(seed_types::Platform { architecture: s() } => 2);
    field!(seed_types::Sandbox { sandbox_id: s() } => 1);
    field!(seed_types::Sandbox { runtime: Some(Default::default()) } => 2);
    field!(seed_types::Sandbox { spec: any() } => 3);
    field!(seed_types::Sandbox { sandboxer: s() } => 4);
    field!(seed_types::Sandbox { labels: map() } => 5);
    field!(seed_types::Sandbox { created_at: ts() } => 6);
    field!(seed_types::Sandbox { updated_at: ts() } => 7);
    field!(seed_types::Sandbox { extensions: HashMap::from([(s(), any().unwrap())]) } => 8);
}

#[test]
fn cri_pod_sandbox_config() {
    field!(cri::PodSandboxConfig { metadata: Some(Default::default()) } => 1);
    field!(cri::PodSandboxConfig { hostname: s() } => 2);
    field!(cri::PodSandboxConfig { log_directory: s() } => 3);
    field!(cri::PodSandboxConfig { dns_config: Some(Default::default()) } => 4);
    field!(cri::PodSandboxConfig { labels: map() } => 6);
    field!(cri::PodSandboxConfig { annotations: map() } => 7);
    field!(cri::PodSandboxConfig { linux: Some(Default::default()) } => 8);
    field!(cri::PodSandboxMetadata { name: s() } => 1);
    field!(cri::PodSandboxMetadata { uid: s() } => 2);
    field!(cri::PodSandboxMetadata { namespace: s() } => 3);
    field!(cri::PodSandboxMetadata { attempt: 1 } => 4);
    field!(cri::DnsConfig { servers: vec![s()] } => 1);
    field!(cri::DnsConfig { searches: vec![s()] } => 2);
    field!(cri::DnsConfig { options: vec![s()] } => 3);
    field!(cri::LinuxPodSandboxConfig { cgroup_parent: s() } => 1);
    field!(cri::LinuxPodSandboxConfig { sysctls: map() } => 3);
    field!(cri::LinuxPodSandboxConfig { overhead: Some(Default::default()) } => 4);
    field!(cri::LinuxPodSandboxConfig { resources: Some(Default::default()) } => 5);
    field!(cri::LinuxContainerResources { cpu_period: 1 } => 1);
    field!(cri::LinuxContainerResources { cpu_quota: 1 } => 2);
    field!(cri::LinuxContainerResources { cpu_shares: 1 } => 3);
    field!(cri::LinuxContainerResources { memory_limit_in_bytes: 1 } => 4);
    field!(cri::LinuxContainerResources { oom_score_adj: 1 } => 5);
    field!(cri::LinuxContainerResources { cpuset_cpus: s() } => 6);
    field!(cri::LinuxContainerResources { cpuset_mems: s() } => 7);
}

#[test]
fn type_names_for_any() {
    use prost::Name;
    assert_eq!(
        cri::PodSandboxConfig::full_name(),
        "runtime.v1.PodSandboxConfig"
    );
    assert_eq!(
        v2::ControllerCreateRequest::full_name(),
        "containerd.services.sandbox.v1.ControllerCreateRequest"
    );
    assert_eq!(seed_types::Sandbox::full_name(), "containerd.types.Sandbox");
}
