"""Content hashes that decide whether a child must be re-applied or the pods rolled."""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from .labels import APPLIED_HASH


def content_hash(obj: Any) -> str:
    """16 hex chars of sha256 over canonical JSON (key order does not matter)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stamp(obj: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``obj`` with its :data:`APPLIED_HASH` annotation set to the hash of the rest."""
    out = copy.deepcopy(obj)
    annotations = out.setdefault("metadata", {}).setdefault("annotations", {})
    annotations.pop(APPLIED_HASH, None)
    annotations[APPLIED_HASH] = content_hash(out)
    return out


def applied_hash(obj: dict[str, Any] | None) -> str | None:
    """The hash a live object was last applied with (None when absent)."""
    if not obj:
        return None
    return ((obj.get("metadata") or {}).get("annotations") or {}).get(APPLIED_HASH)
