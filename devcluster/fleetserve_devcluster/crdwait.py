"""Wait for just-applied CRDs to be Established (shared by the Karpenter and monitoring components)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_established(kubectl: Callable[..., Any], *crds: str, timeout_s: float = 60.0) -> None:
    """`kubectl wait --for=condition=Established` on `crds` (names like `crd/x.example.com`), retried:
    a CRD created a moment ago has no status.conditions yet, and `kubectl wait` then fails at once
    (".status.conditions accessor error: <nil>") instead of waiting. `kubectl(*args)` raises
    RuntimeError with kubectl's stderr on failure."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            kubectl("wait", "--for=condition=Established", f"--timeout={int(timeout_s)}s", *crds)
            return
        except RuntimeError as exc:
            if "accessor error" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)
