"""Node agent: pod -> process spec (argv, env, downward API), GPU requests, IP/GPU allocation, status."""

from __future__ import annotations

import base64

import pytest
from fleetserve_devcluster.pods import (
    ContainerConfigError,
    NodeAllocator,
    PodNetwork,
    decode_secret,
    expand_vars,
    gpu_request,
    local_argv,
    resolve_env,
    rewrite_bind_host,
)
from fleetserve_devcluster.status import ContainerView, PodView, build_status, pod_phase, same_status

BIN = "/venv/bin/fleetserve"
NET = PodNetwork(pod_ip="198.18.0.7", host_ip="198.18.0.1", node_name="fs-node-0")


def pod(**spec: object) -> dict:
    return {"metadata": {"name": "web-1", "namespace": "ns1", "uid": "u1", "labels": {"app": "web"},
                         "annotations": {"a": "b"}},
            "spec": {"containers": [{"name": "c", "image": "x"}], **spec}}


@pytest.mark.parametrize("container, argv", [
    ({"image": "any", "command": ["fleetserve", "serve"], "args": ["--port", "8000"]}, [BIN, "serve", "--port", "8000"]),
    ({"image": "any", "command": ["/app/.venv/bin/fleetserve", "operator"]}, [BIN, "operator"]),
    ({"image": "any", "args": ["fleetserve", "dev-cluster", "echo"]}, [BIN, "dev-cluster", "echo"]),
    ({"image": "ghcr.io/acme/fleetserve-server:0.1", "args": ["serve"]}, [BIN, "serve"]),
    ({"image": "nginx:1.27"}, None),
    ({"image": "busybox", "command": ["sh", "-c", "fleetserve serve"]}, None),
    ({"image": "ghcr.io/acme/fleetserve:0.1", "command": ["python"], "args": ["x"]}, None),
])
def test_local_argv_runs_only_fleetserve_commands(container: dict, argv: list[str] | None) -> None:
    assert local_argv(container, BIN) == argv


def test_rewrite_bind_host_forces_the_pod_ip() -> None:
    assert rewrite_bind_host([BIN, "serve", "--host", "0.0.0.0", "--port", "8000"], "198.18.0.2") == \
        [BIN, "serve", "--host", "198.18.0.2", "--port", "8000"]
    assert rewrite_bind_host([BIN, "serve", "--host=::"], "198.18.0.2") == [BIN, "serve", "--host=198.18.0.2"]
    assert rewrite_bind_host([BIN, "serve", "--hostname", "x"], "198.18.0.2") == [BIN, "serve", "--hostname", "x"]


def test_expand_vars_follows_kubernetes_rules() -> None:
    env = {"A": "1", "B": "two"}
    assert expand_vars("$(A)-$(B)", env) == "1-two"
    assert expand_vars("$(MISSING)", env) == "$(MISSING)"
    assert expand_vars("$$(A)", env) == "$(A)"


def lookup_from(objs: dict[tuple[str, str], dict[str, str]]):
    return lambda kind, ns, name: objs.get((kind, name)) if ns == "ns1" else None


def test_resolve_env_order_sources_and_downward_api() -> None:
    p = pod()
    container = {
        "name": "c",
        "envFrom": [{"configMapRef": {"name": "cm"}}, {"secretRef": {"name": "sec"}, "prefix": "S_"}],
        "env": [
            {"name": "PLAIN", "value": "v-$(FROM_CM)"},
            {"name": "KEY", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "FROM_CM"}}},
            {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "password"}}},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "OPT", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k", "optional": True}}},
        ],
    }
    objs = {("configmap", "cm"): {"FROM_CM": "cmval"}, ("secret", "sec"): {"password": "hunter2"}}
    env = resolve_env(p, container, lookup_from(objs), NET, base={"BASE": "b", "PLAIN": "overridden"})
    assert env == {"BASE": "b", "FROM_CM": "cmval", "S_password": "hunter2", "PLAIN": "v-cmval", "KEY": "cmval",
                   "PW": "hunter2", "POD": "web-1", "NS": "ns1", "IP": "198.18.0.7", "APP": "web"}


@pytest.mark.parametrize("container, message", [
    ({"name": "c", "envFrom": [{"configMapRef": {"name": "gone"}}]}, 'configmap "gone" not found'),
    ({"name": "c", "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "nokey"}}}]},
     "key 'nokey' in secret"),
    ({"name": "c", "env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "spec.bogus"}}}]}, "spec.bogus"),
])
def test_resolve_env_names_what_is_missing(container: dict, message: str) -> None:
    objs = {("secret", "sec"): {"password": "x"}}
    with pytest.raises(ContainerConfigError, match=message):
        resolve_env(pod(), container, lookup_from(objs), NET)


def test_decode_secret() -> None:
    secret = {"data": {"a": base64.b64encode(b"hello").decode()}, "stringData": {"b": "plain"}}
    assert decode_secret(secret) == {"a": "hello", "b": "plain"}


def test_gpu_request_sums_containers_and_takes_max_of_init() -> None:
    p = pod(containers=[{"name": "a", "resources": {"limits": {"nvidia.com/gpu": "1"}}},
                        {"name": "b", "resources": {"requests": {"nvidia.com/gpu": 2}}}],
            initContainers=[{"name": "i", "resources": {"limits": {"nvidia.com/gpu": "4"}}}])
    assert gpu_request(p) == 4
    assert gpu_request(pod()) == 0


def test_allocator_gives_distinct_ips_per_node_and_reuses_freed_ones() -> None:
    n0, n1 = NodeAllocator(index=0, gpus=2), NodeAllocator(index=1, gpus=2)
    a, b = n0.allocate_ip("a"), n0.allocate_ip("b")
    assert (a, b) == ("198.18.0.2", "198.18.0.3")
    assert n0.allocate_ip("a") == a  # idempotent per pod
    assert n1.allocate_ip("a") == "198.18.1.2"
    assert n0.host_ip == "198.18.0.1" and n1.host_ip == "198.18.1.1"
    assert NodeAllocator(index=3, gpus=2, net=11).allocate_ip("a") == "198.18.179.2"
    assert NodeAllocator(index=0, gpus=2, net=17).allocate_ip("a") == "198.19.16.2"
    assert n0.allocate_ip("c", wanted="198.18.0.3") == "198.18.0.4"  # wanted but taken
    assert n0.allocate_ip("d", wanted="198.18.0.9") == "198.18.0.9"  # an existing pod keeps its IP
    n0.free("a")
    assert n0.allocate_ip("e") == "198.18.0.2"
    with pytest.raises(ValueError, match="at most 16 nodes"):
        NodeAllocator(index=16, gpus=0)


def test_allocator_gpus_never_overcommit() -> None:
    n = NodeAllocator(index=0, gpus=2)
    assert n.allocate_gpus("a", 1) == [0]
    assert n.can_allocate_gpus(1) and not n.can_allocate_gpus(2)
    with pytest.raises(ValueError, match="needs 2"):
        n.allocate_gpus("b", 2)
    assert n.allocate_gpus("b", 1) == [1]
    n.free("a")
    assert n.allocate_gpus("c", 1) == [0]


def test_status_phase_and_ready_conditions() -> None:
    running = ContainerView(name="c", image="x", running_since="2026-01-01T00:00:00Z", started=True, ready=True,
                            waiting=None)
    view = PodView(pod_ip="198.18.0.2", host_ip="198.18.0.1", start_time="2026-01-01T00:00:00Z",
                   containers=[running])
    status = build_status(pod(readinessGates=[]), view)
    conds = {c["type"]: c["status"] for c in status["conditions"]}
    assert status["phase"] == "Running" and status["podIP"] == "198.18.0.2"
    assert conds["Ready"] == "True" and conds["ContainersReady"] == "True"
    assert status["containerStatuses"][0]["state"] == {"running": {"startedAt": "2026-01-01T00:00:00Z"}}

    running.ready = False
    assert {c["type"]: c["status"] for c in build_status(pod(), view)["conditions"]}["Ready"] == "False"
    # A readiness gate that is not True keeps the pod unready even with ready containers.
    running.ready = True
    gated = pod(readinessGates=[{"conditionType": "example.com/gate"}])
    assert {c["type"]: c["status"] for c in build_status(gated, view)["conditions"]}["Ready"] == "False"


def test_status_crashloop_and_terminal_phases() -> None:
    crashed = ContainerView(name="c", image="x", restart_count=2, waiting=("CrashLoopBackOff", "back-off 4s"),
                            last_terminated={"exitCode": 3, "reason": "Error"})
    view = PodView(pod_ip="198.18.0.2", host_ip="198.18.0.1", start_time="t", containers=[crashed])
    status = build_status(pod(), view)
    cs = status["containerStatuses"][0]
    assert status["phase"] == "Running"
    assert cs["state"]["waiting"]["reason"] == "CrashLoopBackOff" and cs["restartCount"] == 2
    assert cs["lastState"]["terminated"]["exitCode"] == 3

    done = ContainerView(name="c", image="x", waiting=None, terminated={"exitCode": 0, "reason": "Completed"})
    assert pod_phase(PodView("ip", "h", "t", "Never", [done])) == "Succeeded"
    failed = PodView(None, "h", "t", failed_reason="ImageNotRunnableLocally", failed_message="m",
                     containers=[ContainerView(name="c", image="nginx")])
    status = build_status(pod(), failed)
    assert status["phase"] == "Failed" and status["reason"] == "ImageNotRunnableLocally"
    assert same_status(status, build_status(pod(), failed))


def test_fleetserve_serve_binds_the_host_the_agent_sets(tmp_path) -> None:
    """The contract with `fleetserve serve`: --host > $FLEETSERVE_HOST > the config file's host."""
    from fleetserve_server.config import build_config

    cfg = tmp_path / "server.yaml"
    cfg.write_text("host: 0.0.0.0\nport: 8000\n")
    env = {"FLEETSERVE_HOST": "198.18.0.2"}
    assert build_config({}, config_file=cfg, environ=env).host == "198.18.0.2"
    assert build_config({"host": "198.18.0.9"}, config_file=cfg, environ=env).host == "198.18.0.9"
    assert build_config({}, config_file=cfg, environ={}).host == "0.0.0.0"
