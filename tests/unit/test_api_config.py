"""ServerConfig: precedence (flag > env > file > default), unknown keys, CLI flags."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from fleetserve_server.cli import serve as serve_cli
from fleetserve_server.config import DEFAULT_MODEL, ConfigError, ServerConfig, build_config


def parse(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser()
    serve_cli.configure(parser)
    args = parser.parse_args(argv)
    return {k: v for k, v in vars(args).items() if k in ServerConfig.model_fields}


def test_defaults_serve_the_builtin_model_on_port_8000() -> None:
    config = build_config({}, environ={})
    assert config.model == DEFAULT_MODEL
    assert config.port == 8000 and config.prefix_caching and config.log_format == "json"
    assert config.resolved_served_name() == "smollm2-135m-instruct"
    assert config.api_key is None


def test_flag_beats_file_beats_default(tmp_path: Path) -> None:
    cfg = tmp_path / "server.yaml"
    cfg.write_text("model: /models/tiny\nport: 9001\nmax-num-seqs: 4\nprefix_caching: false\n")
    from_file = build_config({}, config_file=cfg, environ={})
    assert (from_file.model, from_file.port, from_file.max_num_seqs, from_file.prefix_caching) == \
        ("/models/tiny", 9001, 4, False)
    assert from_file.resolved_served_name() == "tiny"
    cli = parse(["--port", "9002", "--prefix-caching"])
    merged = build_config(cli, config_file=cfg, environ={})
    assert (merged.port, merged.prefix_caching, merged.max_num_seqs) == (9002, True, 4)


def test_cli_only_carries_flags_the_user_gave() -> None:
    assert parse([]) == {}
    got = parse(["--quantization", "nf4", "--no-prefix-caching", "--max-queue-length", "3", "--log-prompts",
                 "--kv-cache-memory-fraction", "0.5"])
    assert got == {"quantization": "nf4", "prefix_caching": False, "max_queue_length": 3, "log_prompts": True,
                   "kv_cache_memory_fraction": 0.5}


def test_api_key_from_environment_and_flag(tmp_path: Path) -> None:
    cfg = tmp_path / "s.yaml"
    cfg.write_text("api_key: from-file\n")
    assert build_config({}, config_file=cfg, environ={}).api_key == "from-file"
    assert build_config({}, config_file=cfg, environ={"FLEETSERVE_API_KEY": "env"}).api_key == "env"
    assert build_config({"api_key": "flag"}, environ={"FLEETSERVE_API_KEY": "env"}).api_key == "flag"
    assert "from-file" not in repr(build_config({}, config_file=cfg, environ={}))


def test_unknown_key_names_it_and_lists_valid_ones(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: x\nmax_num_seq: 4\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) max_num_seq; valid keys are: .*max_num_seqs"):
        build_config({}, config_file=cfg, environ={})


@pytest.mark.parametrize("text, fragment", [
    ("port: 70000\n", "port from --config"),
    ("quantization: int3\n", "quantization from --config"),
    ("- a\n- b\n", "expected a mapping"),
    ("block_size: [\n", "not valid YAML"),
])
def test_bad_values_name_the_key_and_the_source(tmp_path: Path, text: str, fragment: str) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        build_config({}, config_file=cfg, environ={})


def test_invalid_flag_value_is_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    serve_cli.configure(parser)
    args = parser.parse_args(["--max-num-seqs", "0"])
    assert serve_cli.run(args) == 2
    assert "max_num_seqs from --max-num-seqs" in capsys.readouterr().err


def test_served_name_derivation() -> None:
    assert ServerConfig(model="hf:org/My-Model").resolved_served_name() == "My-Model"
    assert ServerConfig(model="/x/y/model.Q4.gguf").resolved_served_name() == "model.Q4"
    assert ServerConfig(model="/x/dir/", served_model_name="alias").resolved_served_name() == "alias"
