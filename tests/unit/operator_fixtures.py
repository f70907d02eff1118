"""Helpers shared by the operator's unit tests: example bodies as the API server would store them."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
UID = "0b1c2d3e-0000-4000-8000-000000000001"


def example(name: str, namespace: str = "ns1", generation: int = 1) -> dict[str, Any]:
    body = yaml.safe_load((EXAMPLES / name).read_text())
    body["metadata"].update(namespace=namespace, uid=UID, generation=generation)
    return body


def cpu_body(**spec_overrides: Any) -> dict[str, Any]:
    body = example("smollm2-cpu.yaml")
    body["spec"].update(copy.deepcopy(spec_overrides))
    return body
