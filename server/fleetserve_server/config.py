"""The server's configuration: one pydantic model, filled from flags, a file and the environment.

The keys are the `fleetserve serve` flags in snake_case, so the ConfigMap the
operator writes (``server.yaml``) and the command line speak the same names::

    model: builtin:smollm2-135m-instruct
    quantization: nf4
    max_num_seqs: 64
    prefix_caching: true
    port: 8000

Precedence, highest first: a command-line flag, the environment (only
``FLEETSERVE_API_KEY``, so a Secret never has to be written into a ConfigMap,
and ``FLEETSERVE_HOST``, the bind address the dev cluster's node agent sets),
the ``--config`` file, the defaults below. An unknown key in the file is an
error that names the key and lists the valid ones. Nothing here imports torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_MODEL = "builtin:smollm2-135m-instruct"
API_KEY_ENV = "FLEETSERVE_API_KEY"
# The bind address, above the config file: replicas sharing one host (the dev cluster) each bind their pod IP.
HOST_ENV = "FLEETSERVE_HOST"


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the key and the fix."""


class ServerConfig(BaseModel):
    """Everything `fleetserve serve` needs to know before it loads a model.

    Invariants (checked on construction): every count is positive, fractions
    lie in (0, 1], ``kv_cache_tokens`` (when set) overrides the memory
    fraction, and ``host``/``port`` form a bindable address.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(DEFAULT_MODEL, description="builtin:NAME, a local directory, a .gguf file or hf:org/name")
    served_model_name: str | None = Field(
        None, description="name clients pass as `model` (default: derived from --model)"
    )
    quantization: Literal["none", "int8", "nf4", "fp4"] = Field("none", description="bitsandbytes weight quantization")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="activation dtype (auto: bfloat16 on CUDA, float32 on CPU)"
    )
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto = CUDA when available, else CPU")
    tensor_parallel_size: int = Field(
        1, ge=1, description="split the model over this many GPUs, one process each (Megatron-style; "
                             "it must divide the attention heads)"
    )
    max_model_len: int = Field(2048, ge=1, description="context limit in tokens: prompt + completion")
    max_num_seqs: int = Field(32, ge=1, description="sequences scheduled together in one step")
    max_batch_tokens: int | None = Field(
        None, ge=1,
        description="tokens computed in one engine step (default: 2048 on CUDA; on CPU sized so one step "
                    "takes about a second on the usable cores, e.g. 240 for the builtin on 2 cores)",
    )
    threads: int | None = Field(
        None, ge=1,
        description="torch's CPU threads (default: OMP_NUM_THREADS if set, else the cores the cgroup CPU "
                    "quota and the CPU affinity allow; never more than those)",
    )
    kv_cache_memory_fraction: float = Field(
        0.9, gt=0.0, le=1.0, description="share of free device memory given to weights + KV cache"
    )
    kv_cache_tokens: int | None = Field(
        None, ge=1, description="KV cache size in tokens (overrides --kv-cache-memory-fraction)"
    )
    block_size: int = Field(16, ge=1, description="tokens per KV cache block")
    prefix_caching: bool = Field(True, description="reuse the KV of shared prompt prefixes")
    cache_ttl_seconds: float = Field(600.0, gt=0.0, description="idle seconds before a cached prefix is freed")
    max_queue_length: int | None = Field(
        None, ge=1, description="waiting requests before new ones get 429 (default: derived from the KV "
                                "capacity: 4 x the max_model_len sequences it holds, at least max_num_seqs)"
    )
    malloc_trim_seconds: float = Field(
        60.0, ge=0.0, description="when the engine goes idle after work, return the heap a burst left free to "
                                  "the OS (glibc malloc_trim), at most once per this many seconds; 0 = never"
    )
    max_request_bytes: int | None = Field(
        None, ge=1, description="largest request body accepted; larger ones get 413 (default: 1 MiB + "
                                "32 bytes per token of max_model_len)"
    )
    api_key: str | None = Field(
        None, description=f"require `Authorization: Bearer KEY` (also from ${API_KEY_ENV})", repr=False
    )
    host: str = Field("0.0.0.0", min_length=1, description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on (0 = any free port)")
    drain_timeout: float = Field(
        30.0, ge=0.0, description="seconds in-flight requests may run after SIGTERM before they are aborted"
    )
    chat_template: str | None = Field(
        None, description="a Jinja chat-template file that replaces the model's own (for a model without one, "
                          "or to fix a broken one); checked at startup by rendering a sample conversation"
    )
    log_format: Literal["json", "text"] = Field("json", description="format of the server's log lines")
    log_prompts: bool = Field(False, description="include prompt and completion text in request logs")
    capture_path: str | None = Field(
        None, description="write a sample of finished requests (prompt, output, sampling parameters, latency, "
                          "token logprobs when asked) as redacted JSON lines to this file; off by default"
    )
    capture_fraction: float = Field(0.01, description="share of requests captured, 0..1 (with --capture-path)")
    capture_max_bytes: int = Field(
        100 * 1024 * 1024, description="rotate the capture file before it grows past this many bytes"
    )
    capture_max_files: int = Field(5, description="rotated capture files kept (FILE.1 newest .. FILE.N oldest)")
    capture_redact: list[str] = Field(
        default_factory=list, description="a regular expression whose matches are redacted from captured "
                                          "text, besides the defaults (repeat the flag for more)"
    )
    capture_default_redaction: bool = Field(
        True, description="redact e-mail addresses, API keys/tokens and runs of 8+ digits from captured text"
    )
    otlp_endpoint: str | None = Field(
        None, description="export OpenTelemetry traces of each request over OTLP/HTTP to this URL, e.g. "
                          "http://otel-collector:4318 (also $OTEL_EXPORTER_OTLP_ENDPOINT); off by default"
    )

    @model_validator(mode="after")
    def _api_key_not_blank(self) -> ServerConfig:
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError(f"api_key is empty; unset it (and ${API_KEY_ENV}) to disable authentication")
        return self

    def resolved_served_name(self) -> str:
        """The model name clients must send: --served-model-name or one derived from --model."""
        if self.served_model_name:
            return self.served_model_name
        return derive_served_name(self.model)


def derive_served_name(model: str) -> str:
    """``builtin:NAME`` -> NAME, ``hf:org/name`` -> name, a path -> its directory or file stem."""
    if model.startswith("builtin:"):
        return model.split(":", 1)[1]
    if model.startswith("hf:"):
        return model.split(":", 1)[1].rstrip("/").rsplit("/", 1)[-1]
    path = Path(model.rstrip("/"))
    return path.stem if path.suffix == ".gguf" else path.name


def field_names() -> list[str]:
    return list(ServerConfig.model_fields)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of ServerConfig keys; unknown keys are a ConfigError naming them."""
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read it ({exc.strerror})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"--config {path}: expected a mapping of settings, got {type(data).__name__}")
    # Accept the flag spelling too (max-num-seqs), since users copy flags into files.
    normalized = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(normalized) - set(field_names()))
    if unknown:
        raise ConfigError(
            f"--config {path}: unknown key(s) {', '.join(unknown)}; valid keys are: {', '.join(field_names())}"
        )
    return normalized


def build_config(
    cli: Mapping[str, Any],
    *,
    config_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> ServerConfig:
    """Merge the sources (flag > environment > file > default) and validate once.

    ``cli`` holds only the flags the user actually gave.
    """
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    source: dict[str, str] = {}
    if config_file is not None:
        for key, value in load_config_file(config_file).items():
            merged[key], source[key] = value, f"--config {config_file}"
    if environ.get(API_KEY_ENV):
        merged["api_key"], source["api_key"] = environ[API_KEY_ENV], f"${API_KEY_ENV}"
    if environ.get(HOST_ENV):  # the dev cluster's node agent sets it to the pod's own IP
        merged["host"], source["host"] = environ[HOST_ENV], f"${HOST_ENV}"
    for key, value in cli.items():
        merged[key], source[key] = value, "--" + key.replace("_", "-")
    try:
        return ServerConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def _describe(exc: ValidationError, source: Mapping[str, str]) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "config"
        where = source.get(key, "default")
        given = f" (got {err['input']!r})" if key != "api_key" and "input" in err else ""
        lines.append(f"{key} from {where}: {err['msg']}{given}")
    return "invalid server configuration: " + "; ".join(lines)
