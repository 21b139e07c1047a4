// SPDX-License-Identifier: Apache-2.0
//! Node-wide `[limits]`, the sandbox socket paths' length, and pod CPU limits at Create and
//! Update.

use super::*;

#[tokio::test]
async fn node_limits_refuse_sandboxes_beyond_them() {
    let tmp = tempfile::tempdir().unwrap();
    let kernel = tmp.path().join("vmlinux");
    std::fs::write(&kernel, b"fake kernel").unwrap();
    let mut config = ServiceConfig::new(tmp.path().join("state"));
    config.vm.kernel = kernel;
    let base = config.vm.mem_mib;
    // Room for two base-sized sandboxes and one of base + 256 MiB, not more.
    config.limits = LimitsConfig {
        max_sandboxes: 3,
        max_total_mem_mib: u64::from(base) * 3 + 256,
        max_sandbox_mem_mib: base + 256,
        max_sandbox_vcpus: 0,
    };
    let svc = SandboxService::new(FakeVmBackend::new(), config);
    let with_limit = |id: &str, mib: i64| {
        let pod = cri::PodSandboxConfig {
            linux: Some(cri::LinuxPodSandboxConfig {
                resources: Some(cri::LinuxContainerResources {
                    memory_limit_in_bytes: mib << 20,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut r = create_req(id);
        r.options = Some(pod_options(&pod));
        r
    };

    // One sandbox's size: INVALID_ARGUMENT naming the pod's memory limit.
    match svc.create(with_limit("huge", 257)).await {
        Err(SandboxError::InvalidArgument { field, reason }) => {
            assert_eq!(field, "options.linux.resources.memory_limit_in_bytes");
            assert!(reason.contains("limits.max_sandbox_mem_mib"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    svc.create(with_limit("big", 256)).await.unwrap();
    svc.create(create_req("a")).await.unwrap();
    // The node's memory: RESOURCE_EXHAUSTED naming the limit.
    let refused = svc.create(with_limit("b", 1)).await.unwrap_err();
    let status = tonic::Status::from(refused);
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(
        status.message().contains("limits.max_total_mem_mib"),
        "{status:?}"
    );
    svc.create(create_req("b")).await.unwrap();
    // The node's count.
    let refused = svc.create(create_req("c")).await.unwrap_err();
    let status = tonic::Status::from(refused);
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(
        status.message().contains("limits.max_sandboxes"),
        "{status:?}"
    );
    // Room again once one is gone; nothing refused was kept.
    svc.shutdown("big").await.unwrap();
    svc.create(create_req("c")).await.unwrap();
    assert_eq!(svc.ids(), ["a", "b", "c"]);
}

#[tokio::test]
async fn an_id_too_long_for_the_sandboxs_sockets_is_refused_at_create() {
    let f = fixture();
    // Valid as an id (128 bytes at most), too long for a socket under this state dir.
    let id = "a".repeat(proto::id::MAX_ID_LEN);
    match f.svc.create(create_req(&id)).await {
        Err(SandboxError::InvalidArgument { field, reason }) => {
            assert_eq!(field, "sandbox_id");
            assert!(reason.contains("unix socket"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(f.svc.ids().is_empty());
    // containerd's 64-character ids fit.
    f.svc.create(create_req(&"b".repeat(64))).await.unwrap();
}

/// A pod config with a CPU limit (quota / period) and a cgroup parent.
fn cpu_pod(quota: i64, period: i64, cgroup_parent: &str) -> StoredAny {
    pod_options(&cri::PodSandboxConfig {
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: cgroup_parent.into(),
            resources: Some(cri::LinuxContainerResources {
                cpu_quota: quota,
                cpu_period: period,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    })
}

fn updated_cpu(quota: i64, period: i64) -> SandboxInfo {
    let json = serde_json::json!({"Resources": {"cpu_quota": quota, "cpu_period": period}});
    SandboxInfo {
        extensions: [(
            "updated-resources".to_string(),
            StoredAny {
                type_url: "io.containerd.cri.v1.UpdatedResources".into(),
                value: serde_json::to_vec(&json).unwrap(),
            },
        )]
        .into(),
        ..SandboxInfo::default()
    }
}

#[tokio::test]
async fn cpu_limits_at_create_and_update() {
    let tmp = tempfile::tempdir().unwrap();
    let kernel = tmp.path().join("vmlinux");
    std::fs::write(&kernel, b"fake kernel").unwrap();
    let cpu = tmp.path().join("cpu");
    let mut config = ServiceConfig::new(tmp.path().join("state"));
    config.vm.kernel = kernel;
    config.limits.max_sandbox_vcpus = 2;
    config.cgroups =
        Some(crate::cgroup::CpuCgroups::v1(cpu.clone(), None, Path::new("sandboxer")).unwrap());
    let svc = SandboxService::new(FakeVmBackend::new(), config);
    let with = |id: &str, options: StoredAny| {
        let mut r = create_req(id);
        r.options = Some(options);
        r
    };

    // More CPUs than the limit: INVALID_ARGUMENT naming the pod's quota and the limit.
    match svc.create(with("big", cpu_pod(250_000, 100_000, ""))).await {
        Err(SandboxError::InvalidArgument { field, reason }) => {
            assert_eq!(field, "options.linux.resources.cpu_quota");
            assert!(reason.contains("limits.max_sandbox_vcpus"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // A quota the kernel would refuse.
    match svc.create(with("tiny", cpu_pod(10, 100_000, ""))).await {
        Err(SandboxError::InvalidArgument { field, .. }) => {
            assert_eq!(field, "options.linux.resources.cpu_quota");
        }
        other => panic!("{other:?}"),
    }
    // A cgroup parent that does not exist, or climbs out.
    for parent in ["/kubepods/none", "../x"] {
        match svc.create(with("p", cpu_pod(0, 0, parent))).await {
            Err(SandboxError::InvalidArgument { field, .. }) => {
                assert_eq!(field, "options.linux.cgroup_parent", "{parent}");
            }
            other => panic!("{parent}: {other:?}"),
        }
    }
    std::fs::create_dir_all(cpu.join("kubepods/pod1")).unwrap();
    svc.create(with("in-parent", cpu_pod(0, 0, "/kubepods/pod1")))
        .await
        .unwrap();
    assert_eq!(
        svc.record("in-parent").unwrap().cgroup.as_deref(),
        Some(Path::new("kubepods/pod1/in-parent"))
    );

    svc.create(with("pod", cpu_pod(150_000, 100_000, "")))
        .await
        .unwrap();
    let rec = svc.record("pod").unwrap();
    assert_eq!(rec.cgroup.as_deref(), Some(Path::new("sandboxer/pod")));
    svc.start("pod").await.unwrap();
    // The fake backend has no threads to move: make the cgroup as a real VM's start would.
    let group = cpu.join("sandboxer/pod");
    std::fs::create_dir_all(&group).unwrap();
    svc.update(
        "pod",
        updated_cpu(30_000, 100_000),
        vec!["extensions.updated-resources".into()],
    )
    .await
    .unwrap();
    assert_eq!(
        std::fs::read_to_string(group.join("cpu.cfs_quota_us")).unwrap(),
        "30000"
    );
    assert_eq!(
        std::fs::read_to_string(group.join("cpu.cfs_period_us")).unwrap(),
        "100000"
    );
    let pod = svc.record("pod").unwrap().pod.unwrap();
    assert_eq!((pod.cpu_quota, pod.cpu_period), (30_000, 100_000));
    // Beyond the limit: refused, nothing changed.
    match svc
        .update(
            "pod",
            updated_cpu(300_000, 100_000),
            vec!["extensions".into()],
        )
        .await
    {
        Err(SandboxError::InvalidArgument { field, reason }) => {
            assert_eq!(field, "sandbox.extensions[updated-resources]");
            assert!(reason.contains("limits.max_sandbox_vcpus"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        std::fs::read_to_string(group.join("cpu.cfs_quota_us")).unwrap(),
        "30000"
    );
    assert_eq!(svc.record("pod").unwrap().pod.unwrap().cpu_quota, 30_000);
}
