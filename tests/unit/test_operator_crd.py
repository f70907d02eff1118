"""The generated CRD: structural, with the CEL rules, subresources and columns; crds/ is up to date."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from fleetserve_operator.api.crd import CRD_FILENAME, build_crd, render_crd_yaml
from fleetserve_operator.cli import crds as crds_cli

ROOT = Path(__file__).resolve().parents[2]


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = []
    if isinstance(node, dict):
        if "type" in node or "x-kubernetes-int-or-string" in node or "properties" in node:
            out.append((path, node))
        for key in ("properties",):
            for name, sub in (node.get(key) or {}).items():
                out.extend(_walk(sub, f"{path}.{name}"))
        if "items" in node:
            out.extend(_walk(node["items"], f"{path}[]"))
        if isinstance(node.get("additionalProperties"), dict):
            out.extend(_walk(node["additionalProperties"], f"{path}{{}}"))
    return out


def version() -> dict[str, Any]:
    return build_crd()["spec"]["versions"][0]


def test_committed_crd_is_the_generated_one() -> None:
    committed = (ROOT / "crds" / CRD_FILENAME).read_text()
    assert committed == render_crd_yaml(), "run `fleetserve crds > crds/fleetserve.io_llmdeployments.yaml`"


def test_cli_check_flags_a_stale_file(tmp_path: Path, capsys: Any) -> None:
    stale = tmp_path / "crd.yaml"
    stale.write_text(render_crd_yaml().replace("llmd", "xxxx"))
    parser = __import__("argparse").ArgumentParser()
    crds_cli.configure(parser)
    assert crds_cli.run(parser.parse_args(["--check", str(stale)])) == 1
    assert crds_cli.run(parser.parse_args(["--check", str(ROOT / "crds" / CRD_FILENAME)])) == 0
    assert crds_cli.run(parser.parse_args([])) == 0
    assert capsys.readouterr().out == render_crd_yaml()


def test_names_scope_and_subresources() -> None:
    crd = build_crd()
    names = crd["spec"]["names"]
    assert crd["metadata"]["name"] == "llmdeployments.fleetserve.io"
    assert (names["kind"], names["plural"], names["shortNames"], names["categories"]) == (
        "LLMDeployment", "llmdeployments", ["llmd"], ["fleetserve"])
    assert crd["spec"]["scope"] == "Namespaced"
    assert version()["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector"}
    assert version()["subresources"]["status"] == {}


def test_printer_columns() -> None:
    cols = {c["name"]: c for c in version()["additionalPrinterColumns"]}
    assert list(cols) == ["Model", "Quant", "Ready", "KV%", "Queue", "Fits", "Age"]
    assert cols["Fits"]["jsonPath"] == '.status.conditions[?(@.type=="MemoryFits")].status'
    assert cols["Age"]["type"] == "date"


def test_schema_is_structural() -> None:
    schema = version()["schema"]["openAPIV3Schema"]
    text = yaml.safe_dump(schema)
    for forbidden in ("$ref", "anyOf", "allOf", "title", "$defs", "additionalProperties: false"):
        assert forbidden not in text, forbidden
    for path, node in _walk(schema):
        assert "type" in node or node.get("x-kubernetes-int-or-string"), path
        if node.get("type") == "object" and path != ".metadata":  # metadata is the API server's
            assert ("properties" in node or "additionalProperties" in node
                    or node.get("x-kubernetes-preserve-unknown-fields")), path
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True and "minimum" in node, path


def test_enums_defaults_patterns_and_cel() -> None:
    spec = version()["schema"]["openAPIV3Schema"]["properties"]["spec"]
    props = spec["properties"]
    assert props["quantization"]["enum"] == ["none", "int8", "nf4", "fp4"]
    assert props["dtype"]["enum"] == ["auto", "float32", "bfloat16", "float16"]
    # nested defaults are whole objects (the API server checks them against the CEL rules as they are)
    assert props["engine"]["default"]["blockSize"] == props["engine"]["properties"]["blockSize"]["default"] == 16
    assert props["autoscaling"]["default"]["minReplicas"] <= props["autoscaling"]["default"]["maxReplicas"]
    assert "apiKeySecretRef" in props and "default" not in props["apiKeySecretRef"]  # has a required field
    gpu_memory = props["resources"]["properties"]["gpuMemory"]
    assert gpu_memory["x-kubernetes-int-or-string"] is True and gpu_memory["pattern"].startswith("^")
    rules = {r["rule"] for r in props["autoscaling"]["x-kubernetes-validations"]}
    assert "self.minReplicas <= self.maxReplicas" in rules
    engine_rules = {r["fieldPath"] for r in props["engine"]["x-kubernetes-validations"]}
    assert engine_rules == {".kvCacheMemoryFraction", ".maxBatchTokens"}
    assert spec["required"] == ["model", "resources"]  # the memory-fit proof needs one or the other
    assert all(p.get("description") for p in props.values())


def test_conditions_are_a_map_keyed_by_type() -> None:
    status = version()["schema"]["openAPIV3Schema"]["properties"]["status"]
    conditions = status["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert set(conditions["items"]["required"]) == {"type", "status", "reason", "lastTransitionTime"}
