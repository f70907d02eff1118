"""Render the LLMDeployment CustomResourceDefinition from the pydantic models.

``render_crd_yaml()`` is what ``fleetserve crds`` prints and what
``crds/fleetserve.io_llmdeployments.yaml`` holds, byte for byte. The schema is
*structural* (every node typed, no ``$ref``/``anyOf``/``additionalProperties:
false``), as apiextensions.k8s.io/v1 requires: pydantic's JSON Schema is
rewritten node by node — references inlined, ``Optional`` collapsed, numeric
``exclusiveMinimum`` turned into OpenAPI v3.0's boolean form, free-form
objects marked ``x-kubernetes-preserve-unknown-fields``.
"""

from __future__ import annotations

from typing import Any

import yaml

from .spec import CATEGORIES, GROUP, KIND, PLURAL, SHORT_NAMES, SINGULAR, VERSION, LLMDeploymentSpec
from .status import LLMDeploymentStatus

CRD_NAME = f"{PLURAL}.{GROUP}"
# The name becomes the Service's (a DNS-1035 label) and prefixes the pods' names.
MAX_NAME_LENGTH = 52
NAME_RULE = {
    "rule": f"self.metadata.name.size() <= {MAX_NAME_LENGTH} && "
            "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
    "message": f"metadata.name must be a DNS-1035 label of at most {MAX_NAME_LENGTH} characters "
               "(lowercase letters, digits, '-', starting with a letter): it names the Service and the pods",
}
CRD_FILENAME = f"{GROUP}_{PLURAL}.yaml"

_KEEP = {
    "type", "description", "default", "enum", "minimum", "maximum", "minLength", "maxLength", "pattern",
    "format", "minItems", "maxItems", "minProperties", "maxProperties",
}

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.source", "description": "model source"},
    {"name": "Quant", "type": "string", "jsonPath": ".spec.quantization", "description": "weight quantization"},
    {"name": "Ready", "type": "string", "jsonPath": ".status.readySummary",
     "description": "ready replicas / desired replicas"},
    {"name": "KV%", "type": "integer", "jsonPath": ".status.autoscaler.observed.kvCacheUsagePercent",
     "description": "mean KV-cache usage of the ready pods, percent"},
    {"name": "Queue", "type": "number", "jsonPath": ".status.autoscaler.observed.queueLength",
     "description": "waiting requests per ready replica"},
    {"name": "Fits", "type": "string", "jsonPath": '.status.conditions[?(@.type=="MemoryFits")].status',
     "description": "the model and one full-length sequence fit the replica's memory"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


class SchemaError(ValueError):
    """A pydantic schema node has no structural OpenAPI equivalent."""


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline ``$ref``/``allOf``/``anyOf-with-null``, keeping the node's own keys on top."""
    siblings = {k: v for k, v in node.items() if k not in ("$ref", "allOf", "anyOf")}
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        return {**_resolve(target, defs), **siblings}
    if "allOf" in node and len(node["allOf"]) == 1:
        return {**_resolve(node["allOf"][0], defs), **siblings}
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        if len(options) != 1:
            raise SchemaError(f"cannot express anyOf {node['anyOf']!r} structurally")
        return {**_resolve(options[0], defs), **siblings}
    return node


def to_structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """One pydantic JSON-Schema node -> one structural OpenAPI v3 node."""
    node = _resolve(node, defs)
    out: dict[str, Any] = {k: v for k, v in node.items() if k in _KEEP or k.startswith("x-kubernetes-")}
    if out.get("default", 0) is None:
        del out["default"]
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if bound in node:
            out[plain] = node[bound]
            out[bound] = True
    if "properties" in node:
        out["type"] = "object"
        out["properties"] = {name: to_structural(sub, defs) for name, sub in node["properties"].items()}
        required = node.get("required") or []
        if required:
            out["required"] = list(required)
    elif node.get("type") == "object":
        extra = node.get("additionalProperties", True)
        if isinstance(extra, dict) and extra:
            out["additionalProperties"] = to_structural(extra, defs)
        else:
            out["x-kubernetes-preserve-unknown-fields"] = True
    if node.get("type") == "array":
        out["items"] = to_structural(node.get("items", {"type": "object"}), defs)
    if "type" not in out and not out.get("x-kubernetes-int-or-string"):
        raise SchemaError(f"schema node without a type: {node!r}")
    return out


def _schema_of(model: type[Any]) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True, mode="validation")
    out = to_structural(schema, schema.get("$defs", {}))
    # Nested objects built by a default_factory default to the factory's whole value: the API
    # server validates a default against the CEL rules as it is, before nested defaulting.
    for name, info in model.model_fields.items():
        if info.default_factory is not None:
            default = info.default_factory()  # type: ignore[call-arg]
            alias = info.alias or name
            if default in ([], {}):
                continue  # an empty list/map needs no default: it would only clutter every stored object
            out["properties"][alias]["default"] = (
                default.to_wire() if hasattr(default, "to_wire") else default
            )
    return out


def _status_schema() -> dict[str, Any]:
    schema = _schema_of(LLMDeploymentStatus)
    conditions = schema["properties"]["conditions"]
    conditions.pop("default", None)
    # Conditions are a map keyed by type, as in every built-in API.
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    conditions["maxItems"] = 16
    return schema


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition as a dict."""
    spec_schema = _schema_of(LLMDeploymentSpec)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/name": "fleetserve", "app.kubernetes.io/part-of": "fleetserve"},
        },
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": list(CATEGORIES),
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A fleet of fleetserve LLM inference servers for one model.",
                            "required": ["spec"],
                            "x-kubernetes-validations": [NAME_RULE],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": _status_schema(),
                            },
                        }
                    },
                }
            ],
        },
    }


HEADER = (
    "# Generated by `fleetserve crds` from fleetserve_operator/api (pydantic models). Do not edit:\n"
    "# change the models and run `fleetserve crds > crds/fleetserve.io_llmdeployments.yaml`.\n"
)


def render_crd_yaml() -> str:
    """The CRD as YAML text: deterministic (field order of the models), ASCII only."""
    return HEADER + yaml.safe_dump(build_crd(), sort_keys=False, default_flow_style=False, width=100)
