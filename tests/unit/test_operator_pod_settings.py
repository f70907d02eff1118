"""The pod settings of issue 14 (pull secrets, service account, env/envFrom, model cache, strategy,
pod metadata, extra resources): the Python side of their rules and how they render into the
Deployment. The CEL side is proven on the real API server by
tests/integration/test_operator_pod_settings.py."""

from __future__ import annotations

from typing import Any

import pytest
from fleetserve_operator.api.spec import LLMDeploymentSpec, spec_from_body
from fleetserve_operator.reconcile.fit import check_memory_fit
from fleetserve_operator.reconcile.plan import Observed, desired_children
from fleetserve_operator.resources.server import build_deployment, template_hash
from operator_fixtures import cpu_body, example
from pydantic import ValidationError


def pod_of(**spec: Any) -> dict[str, Any]:
    body = cpu_body(**spec)
    parsed = spec_from_body(body)
    return build_deployment("m", "ns1", parsed, check_memory_fit(parsed), 1)


def test_defaults_render_what_they_did_before() -> None:
    dep = pod_of()
    pod = dep["spec"]["template"]["spec"]
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert {"name": "model-cache", "emptyDir": {}} in pod["volumes"]
    assert "imagePullSecrets" not in pod and "serviceAccountName" not in pod
    assert "envFrom" not in pod["containers"][0]
    assert set(dep["spec"]["template"]["metadata"]["labels"]) == {
        "app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/managed-by",
        "app.kubernetes.io/component"}


def test_every_pod_setting_reaches_the_pod() -> None:
    dep = pod_of(
        imagePullSecrets=[{"name": "registry-cred"}],
        serviceAccountName="llm-reader",
        env=[{"name": "HF_HUB_ENABLE_HF_TRANSFER", "value": "1"},
             {"name": "TEAM", "valueFrom": {"configMapKeyRef": {"name": "meta", "key": "team"}}}],
        envFrom=[{"secretRef": {"name": "hf-token"}}, {"configMapRef": {"name": "proxy", "optional": True},
                                                       "prefix": "PROXY_"}],
        modelCache={"emptyDir": {"sizeLimit": "20Gi"}},
        strategy={"maxSurge": 0, "maxUnavailable": "25%"},
        podAnnotations={"example.com/owner": "ml"},
        podLabels={"team": "ml"},
        resources={"gpus": 0, "cpu": 2, "memory": "2Gi", "requests": {"ephemeral-storage": "10Gi", "cpu": "1"},
                   "limits": {"ephemeral-storage": "20Gi"}},
    )
    template = dep["spec"]["template"]
    pod = template["spec"]
    [c] = pod["containers"]
    assert pod["imagePullSecrets"] == [{"name": "registry-cred"}]
    assert pod["serviceAccountName"] == "llm-reader"
    assert pod["automountServiceAccountToken"] is False  # restricted: the server needs no API token
    env = {e["name"]: e for e in c["env"]}
    assert env["HF_HUB_ENABLE_HF_TRANSFER"] == {"name": "HF_HUB_ENABLE_HF_TRANSFER", "value": "1"}
    assert env["TEAM"]["valueFrom"] == {"configMapKeyRef": {"name": "meta", "key": "team"}}
    assert env["HF_HOME"]["value"] == "/var/cache/fleetserve/huggingface"  # the operator's own stay
    assert c["envFrom"] == [{"secretRef": {"name": "hf-token"}},
                            {"prefix": "PROXY_", "configMapRef": {"name": "proxy", "optional": True}}]
    assert {"name": "model-cache", "emptyDir": {"sizeLimit": "20Gi"}} in pod["volumes"]
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": "25%"}
    assert template["metadata"]["annotations"]["example.com/owner"] == "ml"
    assert template["metadata"]["labels"]["team"] == "ml"
    assert c["resources"]["requests"] == {"cpu": "1", "memory": "2Gi", "ephemeral-storage": "10Gi"}
    assert c["resources"]["limits"] == {"cpu": "2", "memory": "2Gi", "ephemeral-storage": "20Gi"}


def test_pvc_and_host_path_caches() -> None:
    pvc = pod_of(modelCache={"persistentVolumeClaim": {"claimName": "models"}})["spec"]["template"]["spec"]
    assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": "models"}} in pvc["volumes"]
    host = pod_of(modelCache={"hostPath": {"path": "/var/cache/fleetserve"}})["spec"]["template"]["spec"]
    assert {"name": "model-cache", "hostPath": {"path": "/var/cache/fleetserve", "type": "DirectoryOrCreate"}} \
        in host["volumes"]


def test_pod_settings_change_the_template_hash() -> None:
    base = template_hash(pod_of())
    for change in ({"podLabels": {"a": "b"}}, {"podAnnotations": {"a": "b"}}, {"env": [{"name": "A", "value": "1"}]},
                   {"envFrom": [{"secretRef": {"name": "s"}}]}, {"imagePullSecrets": [{"name": "s"}]},
                   {"modelCache": {"persistentVolumeClaim": {"claimName": "c"}}}, {"serviceAccountName": "sa"}):
        assert template_hash(pod_of(**change)) != base, change
    # The roll-out strategy is not part of the pod: changing it rolls nothing.
    assert template_hash(pod_of(strategy={"maxSurge": 0, "maxUnavailable": 1})) == base


def test_cr_labels_never_reach_children_or_the_pod_template() -> None:
    body = example("smollm2-cpu.yaml")
    plain = desired_children(body, spec_from_body(body), check_memory_fit(spec_from_body(body)), 1, Observed())
    body["metadata"]["labels"] = {"team": "a", "helm.sh/chart": "fleetserve-0.2.0"}
    spec = spec_from_body(body)
    labelled = desired_children(body, spec, check_memory_fit(spec), 1, Observed())
    assert labelled == plain
    dep = labelled["Deployment"]
    assert dep is not None and dep["metadata"]["ownerReferences"][0]["uid"] == body["metadata"]["uid"]
    assert "team" not in dep["spec"]["template"]["metadata"]["labels"]


def spec(**kw: object) -> LLMDeploymentSpec:
    return LLMDeploymentSpec.model_validate({"model": {"source": "builtin:smollm2-135m-instruct"},
                                             "resources": {"gpus": 0, "memory": "2Gi"}, **kw})


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"podLabels": {"app.kubernetes.io/instance": "x"}}, "podLabels may not set"),
        ({"podAnnotations": {"fleetserve.io/template-hash": "x"}}, "podAnnotations may not use"),
        ({"env": [{"name": "HF_HOME", "value": "/x"}]}, "env may not set"),
        ({"env": [{"name": "A", "value": "1", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]},
         "either value or valueFrom"),
        ({"envFrom": [{"prefix": "X_"}]}, "exactly one of configMapRef or secretRef"),
        ({"envFrom": [{"secretRef": {"name": "a"}, "configMapRef": {"name": "b"}}]}, "exactly one of"),
        ({"modelCache": {"emptyDir": {}, "hostPath": {"path": "/x"}}}, "at most one of"),
        ({"modelCache": {"hostPath": {"path": "relative"}}}, "should match pattern"),
        ({"strategy": {"maxSurge": 0, "maxUnavailable": "0%"}}, "cannot both be 0"),
        ({"strategy": {"maxSurge": "half"}}, "percentage"),
        ({"strategy": {"maxSurge": -1}}, "negative"),
        ({"resources": {"gpus": 0, "memory": "2Gi", "limits": {"nvidia.com/gpu": "1"}}}, "GPU resource"),
        ({"resources": {"gpus": 0, "memory": "2Gi", "requests": {"cpu": "lots"}}}, "should match pattern"),
        ({"imagePullSecrets": [{"name": "Bad_Name"}]}, "should match pattern"),
    ],
)
def test_bad_pod_settings_are_refused_with_a_message_naming_them(patch: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError) as err:
        spec(**patch)
    assert message in str(err.value)
