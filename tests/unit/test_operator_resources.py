"""Child builders: the Deployment's pod template, the server config and the Service."""

from __future__ import annotations

from typing import Any

import yaml
from fleetserve_operator.api.spec import spec_from_body
from fleetserve_operator.reconcile.fit import check_memory_fit
from fleetserve_operator.resources.network import build_service
from fleetserve_operator.resources.server import build_deployment, render_server_config
from fleetserve_server.config import ServerConfig
from operator_fixtures import example


def deployment(name: str) -> dict[str, Any]:
    body = example(name)
    spec = spec_from_body(body)
    return build_deployment(body["metadata"]["name"], "ns1", spec, check_memory_fit(spec), 2)


def test_gpu_pod_template() -> None:
    dep = deployment("llama-3.1-8b-nf4.yaml")
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    template = dep["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "8000"
    pod = template["spec"]
    [c] = pod["containers"]
    assert c["command"] == ["fleetserve", "serve", "--config", "/etc/fleetserve/server.yaml"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1" and c["resources"]["requests"]["memory"] == "32Gi"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # model loading may take minutes
    assert c["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    pre_stop_seconds = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > 30 + pre_stop_seconds  # preStop + drain + exit
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts == {"/etc/fleetserve": "config", "/var/cache/fleetserve": "model-cache", "/tmp": "tmp"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "llama-3-1-8b-nf4-config"
    assert "emptyDir" in volumes["model-cache"] and "emptyDir" in volumes["tmp"]


def test_cpu_pod_has_memory_and_no_gpu() -> None:
    [c] = deployment("smollm2-cpu.yaml")["spec"]["template"]["spec"]["containers"]
    assert c["resources"]["limits"] == {"cpu": "2", "memory": "2Gi"}


def test_custom_gpu_resource_name_and_scheduling() -> None:
    body = example("llama-3.1-8b-nf4.yaml")
    body["spec"]["resources"]["gpuResourceName"] = "amd.com/gpu"
    body["spec"]["scheduling"] = {"nodeSelector": {"gpu": "mi300"}, "priorityClassName": "high",
                                  "tolerations": [{"key": "gpu", "operator": "Exists"}]}
    body["spec"]["apiKeySecretRef"] = {"name": "llm-key"}
    spec = spec_from_body(body)
    pod = build_deployment("x", "ns1", spec, check_memory_fit(spec), 1)["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["amd.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"gpu": "mi300"} and pod["priorityClassName"] == "high"
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["FLEETSERVE_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "llm-key", "key": "api-key"}


def test_server_config_is_a_valid_server_config_with_the_planned_kv_cache() -> None:
    for name in ("smollm2-cpu.yaml", "llama-3.1-8b-nf4.yaml"):
        spec = spec_from_body(example(name))
        fit = check_memory_fit(spec)
        config = ServerConfig.model_validate(yaml.safe_load(render_server_config(spec, fit)))
        assert fit.plan is not None and config.kv_cache_tokens == fit.plan.kv_capacity_tokens
        assert config.max_model_len == spec.engine.max_model_len and config.port == 8000
        assert config.model == spec.model.source and config.quantization == spec.quantization


def test_service_port() -> None:
    svc = build_service("m", "ns1")
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
    assert svc["spec"]["selector"] == {"app.kubernetes.io/name": "fleetserve-server", "app.kubernetes.io/instance": "m"}
