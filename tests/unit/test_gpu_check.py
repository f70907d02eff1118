"""benchmarks/gpu_check.sh on a machine without a GPU, and the CPU-side pieces it relies on: the
roofline arithmetic (benchmarks/decode_roofline.py) and the near-tie rule of the CUDA identity
tests (tests/integration/identity_util.py)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def _load(path: Path):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


roofline_mod = _load(REPO / "benchmarks" / "decode_roofline.py")
identity = _load(REPO / "tests" / "integration" / "identity_util.py")


def test_script_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def _bin_dir(tmp_path: Path, nvidia_smi: str | None) -> dict[str, str]:
    """A PATH with only the tools the script's first lines use, plus an optional fake nvidia-smi."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "grep", "head", "cat"):
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    if nvidia_smi is not None:
        fake = bin_dir / "nvidia-smi"
        fake.write_text(f"#!/bin/sh\n{nvidia_smi}\n")
        fake.chmod(0o755)
    return {"PATH": str(bin_dir), "HOME": str(tmp_path), "GPU_CHECK_SKIP_INSTALL": "1"}


def _run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    bash = shutil.which("bash")
    assert bash
    return subprocess.run([bash, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120, cwd=REPO)


def test_without_nvidia_smi_it_exits_0_with_one_line_saying_why(tmp_path: Path) -> None:
    result = _run(_bin_dir(tmp_path, None))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["gpu_check: skipped: no NVIDIA GPU on this machine (nvidia-smi not found); "
                                          "nothing to check"]


def test_with_nvidia_smi_but_no_gpu_listed_it_exits_0(tmp_path: Path) -> None:
    result = _run(_bin_dir(tmp_path, 'echo "No devices were found"; exit 6'))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("gpu_check: skipped: no NVIDIA GPU on this machine (nvidia-smi lists no GPU")
    assert len(result.stdout.splitlines()) == 1


@pytest.mark.skipif(not (REPO / ".venv" / "bin" / "python").exists(), reason="needs the repo's .venv")
def test_a_gpu_that_torch_cannot_see_is_a_setup_failure(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    env = _bin_dir(tmp_path, 'case "$1" in -L) echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-x)";; '
                             '*) echo "550.54";; esac')
    env["PATH"] += os.pathsep + "/usr/bin:/bin"
    result = _run(env)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "gpu_check: setup failed: nvidia-smi lists a GPU but torch sees none" in result.stdout


def test_peak_bandwidth_by_device_name() -> None:
    assert roofline_mod.peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert roofline_mod.peak_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert roofline_mod.peak_bandwidth("NVIDIA H200") == 4.8e12
    assert roofline_mod.peak_bandwidth("NVIDIA GH200 480GB") == 4.0e12
    assert roofline_mod.peak_bandwidth("NVIDIA A100-SXM4-80GB") == 2.039e12
    assert roofline_mod.peak_bandwidth("NVIDIA L4") == 300e9
    assert roofline_mod.peak_bandwidth("Some Future GPU") is None


def test_decode_bytes_per_step_and_roofline() -> None:
    # 270 MB of weights, 4 sequences of 100 context tokens, 92,160 KV bytes per token
    moved = roofline_mod.decode_bytes_per_step(270_000_000, 92_160, [100] * 4)
    assert moved == 270_000_000 + 404 * 92_160
    r = roofline_mod.roofline(moved, 0.001, 3.35e12)
    assert r["achieved_bytes_per_second"] == pytest.approx(moved / 0.001)
    assert r["fraction_of_peak"] == pytest.approx(moved / 0.001 / 3.35e12)
    with pytest.raises(ValueError):
        roofline_mod.roofline(moved, 0.0, 3.35e12)


def test_near_tie_rule() -> None:
    prompts = [[1, 2], [3]]
    expected = [[5, 6, 7], [8, 9]]
    logits = {(1, 2, 5): [0.0] * 5 + [0.0, 3.0, 2.95], (3,): [0.0] * 8 + [4.0]}

    def logits_at(context: list[int]) -> list[float]:
        return logits[tuple(context)]

    # identical: nothing to report, and no logits are asked for
    assert identity.check_greedy_close(prompts, expected, expected, logits_at, 0.1) == []
    # prompt 0 diverges at position 1 on a near-tie (6: 3.0 vs 7: 2.95), later tokens are not compared
    assert identity.check_greedy_close(prompts, [[5, 7, 0], [8, 9]], expected, logits_at, 0.1) == []
    # prompt 1 diverges at its first token where the reference prefers 8 by 4.0: a real difference
    bad = identity.check_greedy_close(prompts, [[5, 6, 7], [0, 9]], expected, logits_at, 0.1)
    assert [(d.prompt, d.position, d.got, d.expected, d.gap) for d in bad] == [(1, 0, 0, 8, 4.0)]
    # one output stopping early is never a near-tie
    assert len(identity.check_greedy_close(prompts, [[5, 6], [8, 9]], expected, logits_at, 0.1)) == 1
