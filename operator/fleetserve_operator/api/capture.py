"""``spec.capture``: opt-in capture of sampled requests for offline evaluation (the server's --capture-* flags).

Off unless ``enabled``. Each server pod then writes its own file,
``/var/lib/fleetserve/capture/<pod name>.jsonl`` (rotated beside it), on the
volume given here: an emptyDir by default (lost with the pod: copy it out with
``kubectl cp``), or an existing PersistentVolumeClaim that an evaluation job
also mounts. Prompts and outputs are redacted before they are written.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from .base import ApiModel, Rule
from .pod import DNS_SUBDOMAIN
from .quantity import Quantity


class CaptureEmptyDir(ApiModel):
    """Scratch space of the pod: the samples go with it."""

    size_limit: Quantity | None = Field(None, description="evict the pod when the files grow past this, e.g. 1Gi")


class CaptureHostPath(ApiModel):
    """A directory on the node; only the ``privileged`` Pod Security profile admits it."""

    path: str = Field(min_length=2, max_length=4096, pattern=r"^/.+", description="absolute path on the node")
    type: Literal["Directory", "DirectoryOrCreate"] = Field(
        "DirectoryOrCreate", description="Directory: must exist; DirectoryOrCreate: created when missing"
    )


class CaptureClaim(ApiModel):
    """An existing PersistentVolumeClaim; several replicas need ReadWriteMany (each writes its own file)."""

    claim_name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN, description="PersistentVolumeClaim name")


class CaptureVolume(ApiModel):
    """Where the captured samples are written (mounted at /var/lib/fleetserve/capture). At most one kind."""

    RULES = (
        Rule("(has(self.emptyDir) ? 1 : 0) + (has(self.persistentVolumeClaim) ? 1 : 0) + "
             "(has(self.hostPath) ? 1 : 0) <= 1",
             "capture.volume: set at most one of emptyDir, persistentVolumeClaim or hostPath",
             lambda v: sum(x is not None for x in (v.empty_dir, v.persistent_volume_claim, v.host_path)) <= 1),
    )

    empty_dir: CaptureEmptyDir | None = Field(None, description="per-pod scratch space (the default; lost with the pod)")
    persistent_volume_claim: CaptureClaim | None = Field(
        None, description="an existing claim, e.g. one an evaluation job reads"
    )
    host_path: CaptureHostPath | None = Field(
        None, description="a node directory (needs a namespace with the privileged Pod Security profile)"
    )


class Capture(ApiModel):
    """Sampled requests as redacted JSON lines: prompt, output, sampling parameters, latency, token logprobs
    when the request asked for them; the request id is the one in the server's JSON request log."""

    enabled: bool = Field(False, description="write samples (off by default: prompts are user data)")
    fraction: float = Field(0.01, ge=0.0, le=1.0, description="share of requests written, 0..1")
    max_file_size: Quantity = Field(
        "100Mi", description="rotate a pod's file before it grows past this (e.g. 100Mi; at least 1Ki)"
    )
    max_files: int = Field(5, ge=1, le=100, description="rotated files kept per pod besides the current one")
    redact: list[str] = Field(
        default_factory=list, max_length=32,
        description="extra regular expressions (Python syntax) whose matches are redacted from prompts and outputs",
    )
    default_redaction: bool = Field(
        True, description="redact e-mail addresses, API keys/tokens and runs of 8+ digits (on by default)"
    )
    volume: CaptureVolume = Field(
        default_factory=lambda: CaptureVolume.model_validate({}), description="where the files are written"
    )

    @field_validator("redact")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                compiled = re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"capture.redact: {pattern!r} is not a valid regular expression ({exc})") from None
            if compiled.search(""):
                raise ValueError(f"capture.redact: {pattern!r} matches the empty string; make it match "
                                 "at least one character")
        return patterns

    @field_validator("max_file_size")
    @classmethod
    def _at_least_a_kib(cls, value: str) -> str:
        if max_file_bytes(value) < 1024:
            raise ValueError(f"capture.maxFileSize: {value} is under 1Ki; a file must hold at least one sample")
        return value


def max_file_bytes(quantity: str) -> int:
    from fleetserve_server.memory import parse_quantity

    return parse_quantity(quantity)
