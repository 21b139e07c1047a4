#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Calls every RPC of one sandboxer API socket with gRPC C-core (Python grpcio).

Usage: client.py v2|seed SOCKET PROTO_ROOT

C-core sends the socket path, percent-encoded, as `:authority` (what iSulad's C++ gRPC does
too), so this is the client that proves the daemon serves such requests. It compiles the API's
.proto files with grpcio-tools into a temporary directory, drives one sandbox through its whole
life with the API's own calls, checks every answer, and checks that errors carry their codes.
Prints one line per call and exits non-zero on the first failure.
"""
import importlib
import os
import sys
import tempfile
import threading

import grpc
from grpc_tools import protoc


def compile_protos(api, root):
    """Generates the Python modules of `api` and returns the sandbox module pair."""
    src = os.path.join(root, api)
    files = []
    for d, _, names in os.walk(src):
        files += [os.path.relpath(os.path.join(d, n), src) for n in names if n.endswith(".proto")]
    out = tempfile.mkdtemp(prefix=f"sandboxer-{api}-py-")
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    rc = protoc.main(["protoc", f"-I{src}", f"-I{include}", f"--python_out={out}",
                      f"--grpc_python_out={out}"] + files)
    if rc != 0:
        sys.exit(f"protoc failed for {api} ({rc})")
    sys.path.insert(0, out)
    pb = importlib.import_module("containerd.services.sandbox.v1.sandbox_pb2")
    rpc = importlib.import_module("containerd.services.sandbox.v1.sandbox_pb2_grpc")
    return pb, rpc


def check(cond, what):
    if not cond:
        sys.exit(f"FAIL: {what}")


def call(name, fn, req):
    resp = fn(req, timeout=20)
    print(f"ok {name}")
    return resp


def expect_code(name, fn, req, code):
    try:
        fn(req, timeout=20)
    except grpc.RpcError as e:
        check(e.code() == code, f"{name}: {e.code()} ({e.details()}), expected {code}")
        check(e.details(), f"{name}: no message")
        print(f"ok {name} -> {code.name}: {e.details()}")
        return
    sys.exit(f"FAIL: {name} succeeded, expected {code}")


def v2(stub, pb):
    sid = "c-core-v2"
    call("Create", stub.Create, pb.ControllerCreateRequest(sandbox_id=sid, sandboxer="sandboxer"))
    started = call("Start", stub.Start, pb.ControllerStartRequest(sandbox_id=sid))
    check(started.version == 3, f"Start version {started.version}")
    check(started.address.startswith("ttrpc+unix://"), f"Start address {started.address!r}")
    check(started.pid > 0, "Start pid")
    plat = call("Platform", stub.Platform, pb.ControllerPlatformRequest(sandbox_id=sid))
    check((plat.platform.os, plat.platform.architecture) == ("linux", "amd64"), str(plat))
    st = call("Status", stub.Status, pb.ControllerStatusRequest(sandbox_id=sid, verbose=True))
    check(st.state == "SANDBOX_READY", f"Status state {st.state}")
    check(st.address == started.address, "Status address")
    metrics = call("Metrics", stub.Metrics, pb.ControllerMetricsRequest(sandbox_id=sid))
    check(metrics.metrics.id == sid or metrics.metrics.data.type_url, str(metrics))
    upd = pb.ControllerUpdateRequest(sandbox_id=sid, fields=["labels"])
    upd.sandbox.sandbox_id = sid
    upd.sandbox.labels["from"] = "c-core"
    call("Update", stub.Update, upd)
    # Wait blocks until Stop ends the sandbox: run it beside Stop.
    waited = {}
    waiter = threading.Thread(
        target=lambda: waited.update(r=stub.Wait(pb.ControllerWaitRequest(sandbox_id=sid),
                                                 timeout=30)))
    waiter.start()
    call("Stop", stub.Stop, pb.ControllerStopRequest(sandbox_id=sid, timeout_secs=1))
    waiter.join(30)
    check("r" in waited, "Wait did not return after Stop")
    print(f"ok Wait: exit_status {waited['r'].exit_status}")
    st = call("Status", stub.Status, pb.ControllerStatusRequest(sandbox_id=sid))
    check(st.state == "SANDBOX_NOTREADY", f"Status after Stop {st.state}")
    call("Shutdown", stub.Shutdown, pb.ControllerShutdownRequest(sandbox_id=sid))
    expect_code("Status of a removed sandbox", stub.Status,
                pb.ControllerStatusRequest(sandbox_id=sid), grpc.StatusCode.NOT_FOUND)
    expect_code("Create with a bad id", stub.Create,
                pb.ControllerCreateRequest(sandbox_id="../x"), grpc.StatusCode.INVALID_ARGUMENT)


def seed(stub, pb):
    sid = "c-core-seed"
    call("Create", stub.Create, pb.ControllerCreateRequest(sandbox_id=sid, sandboxer="sandboxer"))
    started = call("Start", stub.Start, pb.ControllerStartRequest(sandbox_id=sid))
    check(started.task_address.startswith("ttrpc+unix://"), f"Start {started.task_address!r}")
    plat = call("Platform", stub.Platform, pb.ControllerPlatformRequest(sandbox_id=sid))
    check(plat.platform.os == "linux", str(plat))
    prep = call("Prepare", stub.Prepare, pb.PrepareRequest(sandbox_id=sid, container_id="c1"))
    check(prep.bundle.endswith("/c1"), f"Prepare bundle {prep.bundle!r}")
    call("Prepare (exec)", stub.Prepare,
         pb.PrepareRequest(sandbox_id=sid, container_id="c1", exec_id="e1"))
    call("UpdateResources", stub.UpdateResources,
         pb.UpdateResourcesRequest(sandbox_id=sid, container_id="c1"))
    call("Purge (exec)", stub.Purge, pb.PurgeRequest(sandbox_id=sid, container_id="c1",
                                                     exec_id="e1"))
    call("Purge", stub.Purge, pb.PurgeRequest(sandbox_id=sid, container_id="c1"))
    st = call("Status", stub.Status, pb.ControllerStatusRequest(sandbox_id=sid, verbose=True))
    check(st.state == "SANDBOX_READY", f"Status state {st.state}")
    call("Stop", stub.Stop, pb.ControllerStopRequest(sandbox_id=sid, timeout_secs=1))
    waited = call("Wait", stub.Wait, pb.ControllerWaitRequest(sandbox_id=sid))
    print(f"   exit_status {waited.exit_status}")
    call("Shutdown", stub.Shutdown, pb.ControllerShutdownRequest(sandbox_id=sid))
    expect_code("Purge in a removed sandbox", stub.Purge,
                pb.PurgeRequest(sandbox_id=sid, container_id="c1"), grpc.StatusCode.NOT_FOUND)


def main():
    if len(sys.argv) != 4 or sys.argv[1] not in ("v2", "seed"):
        sys.exit(__doc__)
    api, socket, root = sys.argv[1:]
    pb, rpc = compile_protos(api, root)
    channel = grpc.insecure_channel(f"unix:{socket}")
    grpc.channel_ready_future(channel).result(timeout=10)
    stub = rpc.ControllerStub(channel)
    (v2 if api == "v2" else seed)(stub, pb)
    print(f"PASS {api}: every RPC answered a gRPC C-core client ({grpc.__version__})")


main()
