"""The operator against the real API server (KopfRunner, throwaway namespace, polling with deadlines).

Every LLMDeployment here pins its pods to a node that does not exist, so no
model server starts; test_operator_serving.py covers pods that really run.
"""

from __future__ import annotations

import urllib.request
from typing import Any

import pytest
from fleetserve_devcluster.testing import DevClusterHandle
from operator_harness import (
    EXAMPLES,
    NOWHERE,
    apply,
    cheap,
    condition,
    events_for,
    example,
    free_port,
    get,
    install_crds,
    list_kind,
    operator,
    wait_until,
)

SELECTOR = "app.kubernetes.io/managed-by=fleetserve,app.kubernetes.io/instance={}"
KINDS = ("configmap", "service", "deployment")


@pytest.fixture(scope="module", autouse=True)
def crds(dev_cluster: DevClusterHandle) -> None:
    install_crds(dev_cluster)


def children(cluster: DevClusterHandle, ns: str, name: str, kinds: tuple[str, ...] = KINDS) -> dict[str, list[Any]]:
    return {k: list_kind(cluster, ns, k, SELECTOR.format(name)) for k in kinds}


def all_present(cluster: DevClusterHandle, ns: str, name: str) -> dict[str, list[Any]] | None:
    found = children(cluster, ns, name)
    return found if all(found.values()) else None


def template_hash(dep: dict[str, Any]) -> str:
    return str(dep["spec"]["template"]["metadata"]["annotations"]["fleetserve.io/template-hash"])


def test_children_are_created_owned_and_labelled(dev_cluster: DevClusterHandle, namespace: str) -> None:
    port = free_port()
    with operator(dev_cluster, namespace, metrics_port=port):
        apply(dev_cluster, namespace, cheap("fleet"))
        found = wait_until(lambda: all_present(dev_cluster, namespace, "fleet"), 30, "children of fleet")
        cr = get(dev_cluster, namespace, "llmd", "fleet")
        assert cr is not None
        for kind, objs in found.items():
            assert len(objs) == 1, kind
            meta = objs[0]["metadata"]
            [ref] = meta["ownerReferences"]
            assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == (
                "LLMDeployment", "fleet", cr["metadata"]["uid"], True)
            assert meta["labels"]["app.kubernetes.io/name"] == "fleetserve-server"
            assert any(f["manager"] == "fleetserve" and f["operation"] == "Apply" for f in meta["managedFields"])
        service = found["service"][0]
        assert service["spec"]["ports"][0]["name"] == "http" and service["spec"]["ports"][0]["port"] == 8000
        cr = wait_until(lambda: (c := get(dev_cluster, namespace, "llmd", "fleet")) and condition(c, "MemoryFits")
                        and c, 30, "status of fleet")
        assert condition(cr, "MemoryFits")["status"] == "True"  # type: ignore[index]
        status = cr["status"]
        assert status["memory"]["kvCapacityTokens"] > 1024 and status["memory"]["weightsBytes"] > 0
        assert status["endpoint"] == f"http://fleet.{namespace}.svc.cluster.local:8000"
        assert status["observedGeneration"] == cr["metadata"]["generation"]
        config = yaml_config(found["configmap"][0])
        assert config["kv_cache_tokens"] == status["memory"]["kvCapacityTokens"]
        # exactly what the CR says (512 here); unset, the server sizes its own step budget (unit-tested)
        assert config.get("max_batch_tokens") == cr["spec"]["engine"].get("maxBatchTokens")
        table = dev_cluster.kubectl("get", "llmd", "fleet", "-n", namespace).stdout.splitlines()
        assert table[1].split()[3] == "0/1" and table[1].split()[-2] == "True"  # READY, FITS
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "fleetserve_operator_reconciles_total" in body and "fleetserve_operator_managed_llmdeployments 1.0" in body
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).status == 200


def yaml_config(config_map: dict[str, Any]) -> dict[str, Any]:
    import yaml

    return dict(yaml.safe_load(config_map["data"]["server.yaml"]))


@pytest.mark.parametrize("filename", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_every_example_reconciles(dev_cluster: DevClusterHandle, namespace: str, filename: str) -> None:
    body = example(filename, scheduling=NOWHERE)  # as shipped, but no pod gets a node here
    name = body["metadata"]["name"]
    with operator(dev_cluster, namespace):
        apply(dev_cluster, namespace, body)
        cr = wait_until(lambda: (c := get(dev_cluster, namespace, "llmd", name)) and condition(c, "MemoryFits")
                        and c, 30, f"MemoryFits on {name}")
        fits = (condition(cr, "MemoryFits") or {})["status"]
        kinds = ("configmap", "service", "deployment") if fits != "False" else ("configmap", "service")
        found = wait_until(lambda: (f := children(dev_cluster, namespace, name, kinds)) and all(f.values()) and f,
                           30, f"children of {name}")
        for objs in found.values():
            assert [ref["uid"] for ref in objs[0]["metadata"]["ownerReferences"]] == [cr["metadata"]["uid"]]
        if fits == "False":
            assert list_kind(dev_cluster, namespace, "deployment", SELECTOR.format(name)) == []
        else:
            assert fits == "True" and cr["status"]["memory"]["maxConcurrentSequences"] >= 1


def test_model_that_does_not_fit_creates_no_deployment(dev_cluster: DevClusterHandle, namespace: str) -> None:
    body = example("llama-3.1-70b-does-not-fit.yaml")
    with operator(dev_cluster, namespace):
        apply(dev_cluster, namespace, body)
        cr = wait_until(lambda: (c := get(dev_cluster, namespace, "llmd", "llama-3-1-70b"))
                        and condition(c, "MemoryFits") and c, 30, "MemoryFits on llama-3-1-70b")
        fits = condition(cr, "MemoryFits")
        assert fits is not None and fits["status"] == "False"
        assert "131.4 GiB for weights" in fits["message"] and "use quantization nf4" in fits["message"]
        warnings = wait_until(lambda: [e for e in events_for(dev_cluster, namespace, "llama-3-1-70b")
                                       if e["reason"] == "MemoryDoesNotFit"], 15, "MemoryDoesNotFit event")
        assert warnings[0]["type"] == "Warning"
        assert list_kind(dev_cluster, namespace, "deployment", SELECTOR.format("llama-3-1-70b")) == []
        describe = dev_cluster.kubectl("describe", "llmd", "llama-3-1-70b", "-n", namespace).stdout
        assert "MemoryFits" in describe and "does not fit" in describe


def test_spec_change_rolls_and_observed_generation_catches_up(dev_cluster: DevClusterHandle, namespace: str) -> None:
    with operator(dev_cluster, namespace):
        apply(dev_cluster, namespace, cheap("roll"))
        first = wait_until(lambda: all_present(dev_cluster, namespace, "roll"), 30, "children")["deployment"][0]
        changed = cheap("roll", engine={"maxModelLen": 512, "maxNumSeqs": 4, "maxBatchTokens": 512})
        apply(dev_cluster, namespace, changed)

        def rolled() -> dict[str, Any] | None:
            dep = get(dev_cluster, namespace, "deployment", "roll")
            return dep if dep and template_hash(dep) != template_hash(first) else None

        dep = wait_until(rolled, 30, "a new pod-template hash")
        assert yaml_config(get(dev_cluster, namespace, "configmap", "roll-config") or {})["max_model_len"] == 512
        assert dep["metadata"]["generation"] > first["metadata"]["generation"]

        def caught_up() -> dict[str, Any] | None:
            cr = get(dev_cluster, namespace, "llmd", "roll")
            return cr if cr and cr["status"].get("observedGeneration") == cr["metadata"]["generation"] == 2 else None

        wait_until(caught_up, 30, "observedGeneration 2")
        assert any(e["reason"] == "Updated" and "rolling the pods" in e["message"]
                   for e in events_for(dev_cluster, namespace, "roll"))


def test_scale_subresource_drives_replicas_and_disruption_budget(
    dev_cluster: DevClusterHandle, namespace: str
) -> None:
    with operator(dev_cluster, namespace):
        apply(dev_cluster, namespace, cheap("scaled"))
        wait_until(lambda: all_present(dev_cluster, namespace, "scaled"), 30, "children")
        dev_cluster.kubectl("scale", "-n", namespace, "llmd/scaled", "--replicas=3")
        wait_until(lambda: (d := get(dev_cluster, namespace, "deployment", "scaled"))
                   and d["spec"]["replicas"] == 3, 30, "Deployment replicas 3")
        pdb = wait_until(lambda: get(dev_cluster, namespace, "pdb", "scaled"), 30, "PodDisruptionBudget")
        assert pdb["spec"]["maxUnavailable"] == 1
        # three pods that cannot be scheduled: Degraded says why, with the scheduler's words
        cr = wait_until(lambda: (c := get(dev_cluster, namespace, "llmd", "scaled"))
                        and (condition(c, "Degraded") or {}).get("status") == "True"
                        and c["status"].get("replicas") == 3 and c, 60, "Degraded=True with 3 pods")
        degraded = condition(cr, "Degraded") or {}
        assert degraded["reason"] == "Unschedulable" and "node" in degraded["message"]
        assert cr["status"]["readySummary"] == "0/3" and (condition(cr, "Ready") or {}).get("status") == "False"
        dev_cluster.kubectl("scale", "-n", namespace, "llmd/scaled", "--replicas=1")
        wait_until(lambda: get(dev_cluster, namespace, "pdb", "scaled") is None, 30, "PDB removed at 1 replica")


def test_deleting_the_llmdeployment_collects_every_child(dev_cluster: DevClusterHandle, namespace: str) -> None:
    with operator(dev_cluster, namespace):
        apply(dev_cluster, namespace, cheap("gone", replicas=2))
        wait_until(lambda: get(dev_cluster, namespace, "pdb", "gone") and all_present(dev_cluster, namespace, "gone"),
                   30, "children incl. PDB")
        dev_cluster.kubectl("delete", "-n", namespace, "llmd", "gone", "--wait=true", "--timeout=60s")
        wait_until(lambda: not any(children(dev_cluster, namespace, "gone", (*KINDS, "pdb", "pod")).values()),
                   60, "garbage collection of every child")


def test_deleted_child_is_put_back(dev_cluster: DevClusterHandle, namespace: str) -> None:
    with operator(dev_cluster, namespace):
        apply(dev_cluster, namespace, cheap("heal"))
        svc = wait_until(lambda: get(dev_cluster, namespace, "service", "heal"), 30, "Service")
        dev_cluster.kubectl("delete", "-n", namespace, "service", "heal")
        back = wait_until(lambda: (s := get(dev_cluster, namespace, "service", "heal"))
                          and s["metadata"]["uid"] != svc["metadata"]["uid"] and s, 30, "a new Service")
        assert back["spec"]["ports"][0]["port"] == 8000


def test_an_unlabelled_object_of_a_childs_name_is_reported_not_taken_over(
    dev_cluster: DevClusterHandle, namespace: str
) -> None:
    """The operator's watches see only labelled objects: someone else's ConfigMap of the child's name
    is still found (read before anything is created), left as it is, and named in Degraded."""
    dev_cluster.kubectl("create", "configmap", "taken-config", "-n", namespace, "--from-literal=owner=someone")
    with operator(dev_cluster, namespace):
        apply(dev_cluster, namespace, cheap("taken"))
        cr = wait_until(lambda: (c := get(dev_cluster, namespace, "llmd", "taken"))
                        and (condition(c, "Degraded") or {}).get("reason") == "ChildConflict" and c, 30,
                        "Degraded=True/ChildConflict")
        assert "ConfigMap taken-config exists and is not owned" in (condition(cr, "Degraded") or {})["message"]
        assert get(dev_cluster, namespace, "deployment", "taken") is not None  # the rest is created
        cm = get(dev_cluster, namespace, "configmap", "taken-config") or {}
    assert cm["data"] == {"owner": "someone"}, cm
    assert not cm["metadata"].get("ownerReferences") and not cm["metadata"].get("labels"), cm["metadata"]


def test_restart_mid_reconcile_converges_without_duplicates_or_flapping(
    dev_cluster: DevClusterHandle, namespace: str
) -> None:
    with operator(dev_cluster, namespace, cleanup=False):
        apply(dev_cluster, namespace, cheap("restart", replicas=2))
        # stop as soon as the first child exists: the reconcile may be half done
        wait_until(lambda: get(dev_cluster, namespace, "configmap", "restart-config"), 30, "the ConfigMap")
    with operator(dev_cluster, namespace, cleanup=False):
        found = wait_until(lambda: get(dev_cluster, namespace, "pdb", "restart")
                           and all_present(dev_cluster, namespace, "restart"), 30, "all children")
        assert all(len(objs) == 1 for objs in found.values()), {k: len(v) for k, v in found.items()}
        cr = wait_until(lambda: (c := get(dev_cluster, namespace, "llmd", "restart")) and condition(c, "Degraded")
                        and c, 60, "conditions")
        before = {t: condition(cr, t) for t in ("MemoryFits", "Ready")}
    resumed_before = resumes()
    with operator(dev_cluster, namespace):
        # a third start on a converged object: the resume handler runs and changes nothing
        wait_until(lambda: resumes() > resumed_before, 30, "the resume handler")
        after_cr = get(dev_cluster, namespace, "llmd", "restart")
        counts = {k: len(v) for k, v in children(dev_cluster, namespace, "restart", (*KINDS, "pdb")).items()}
    assert after_cr is not None
    assert {t: condition(after_cr, t) for t in ("MemoryFits", "Ready")} == before
    assert after_cr["status"] == cr["status"], "status changed on a restart with nothing to do"
    assert counts == {"configmap": 1, "service": 1, "deployment": 1, "pdb": 1}


def resumes() -> float:
    from fleetserve_operator.metrics import REGISTRY

    return REGISTRY.get_sample_value("fleetserve_operator_reconciles_total",
                                     {"trigger": "resume", "result": "success"}) or 0.0


@pytest.mark.slow
def test_crash_looping_server_degrades_with_the_pods_reason(dev_cluster: DevClusterHandle, namespace: str) -> None:
    """A model that is not there: the pod really runs `fleetserve serve`, which exits; Degraded says so."""
    body = cheap("crash", model={"source": "/nonexistent/model-dir"})
    del body["spec"]["scheduling"]  # this one runs, on the node agent
    with operator(dev_cluster, namespace):
        apply(dev_cluster, namespace, body)
        cr = wait_until(lambda: (c := get(dev_cluster, namespace, "llmd", "crash"))
                        and (condition(c, "Degraded") or {}).get("status") == "True" and c,
                        300, "Degraded=True", interval=1.0)
        degraded = condition(cr, "Degraded") or {}
        assert degraded["reason"] == "CrashLoopBackOff" and "crash-" in degraded["message"]
        assert (condition(cr, "MemoryFits") or {}).get("status") == "Unknown"  # no config.json offline
        assert (condition(cr, "Ready") or {}).get("status") == "False"
        assert any(e["reason"] == "CrashLoopBackOff" and e["type"] == "Warning"
                   for e in events_for(dev_cluster, namespace, "crash"))
