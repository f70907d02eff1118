"""Tool lookup in the version-keyed cache."""

from __future__ import annotations

from pathlib import Path

import pytest
from fleetserve_devcluster import tools


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FLEETSERVE_CACHE_DIR", str(tmp_path))
    return tmp_path


def _install(cache: Path, name: str) -> Path:
    subdir, ver = tools.TOOLS[name]
    path = cache / subdir / ver / "bin" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_cache_dir_honours_the_override(cache: Path) -> None:
    assert tools.cache_dir() == cache


def test_cache_dir_defaults_to_user_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FLEETSERVE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tools.cache_dir() == tmp_path / "fleetserve"


def test_missing_tool_names_version_path_and_make_install(cache: Path) -> None:
    with pytest.raises(tools.ToolMissingError) as exc:
        tools.tool_path("kube-apiserver")
    msg = str(exc.value)
    assert tools.K8S_VERSION in msg and "make install" in msg and str(cache / "k8s") in msg


def test_unknown_tool_is_a_value_error(cache: Path) -> None:
    with pytest.raises(ValueError, match="known tools"):
        tools.tool_path("docker")


def test_installed_tool_is_found_and_linked_into_the_bin_dir(cache: Path) -> None:
    path = _install(cache, "kubectl")
    assert tools.tool_path("kubectl") == path
    bin_dir = tools.tools_bin_dir()
    assert (bin_dir / "kubectl").resolve() == path.resolve()
    assert not (bin_dir / "helm").exists()
    assert "kubectl" not in tools.missing_tools() and "helm" in tools.missing_tools()


def test_non_executable_file_counts_as_missing(cache: Path) -> None:
    _install(cache, "etcd").chmod(0o644)
    with pytest.raises(tools.ToolMissingError):
        tools.tool_path("etcd")


def test_stale_link_is_removed_when_the_tool_goes_away(cache: Path) -> None:
    path = _install(cache, "promtool")
    bin_dir = tools.tools_bin_dir()
    assert (bin_dir / "promtool").exists()
    path.unlink()
    tools.tools_bin_dir()
    assert not (bin_dir / "promtool").is_symlink()
