"""Datasets of the local lm-eval tasks (``custom_dataset: !function data.load_*``), read from the JSONL
files beside this module, so the tasks work from any working directory and never reach a hub."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _rows(name: str) -> list[dict[str, Any]]:
    with open(HERE / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _test_split(name: str) -> dict[str, Any]:
    import datasets  # lm-eval's dependency; imported here so this module loads without it

    return {"test": datasets.Dataset.from_list(_rows(name))}


def load_mcq(**_: Any) -> dict[str, Any]:
    """50 four-choice questions: ``question``, ``choices`` (4 strings), ``answer`` (index)."""
    return _test_split("mcq.jsonl")


def load_short_answer(**_: Any) -> dict[str, Any]:
    """20 short-answer questions: ``question``, ``answer`` (one word or number)."""
    return _test_split("short_answer.jsonl")
