"""The Prometheus Operator's ServiceMonitor and PrometheusRule CRDs, generated — never hand-written.

``controller-gen`` (sigs.k8s.io/controller-tools, pinned) runs over the pinned Go module
``github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring`` — the same way the
Prometheus Operator builds the CRDs kube-prometheus-stack installs. The result is cached under
``<fleetserve cache>/prometheus-operator-crds/<version>/``; the first run needs Go and the Go
module proxy (a minute or two), later runs only read the cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from fleetserve_devcluster.tools import cache_dir

PROMETHEUS_OPERATOR_VERSION = "v0.79.2"
CONTROLLER_TOOLS_VERSION = "v0.16.5"
MODULE = "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring"
FILES = ("monitoring.coreos.com_servicemonitors.yaml", "monitoring.coreos.com_prometheusrules.yaml")


def crd_files() -> list[Path]:
    """The two CRD files, generating them on first use."""
    out = cache_dir() / "prometheus-operator-crds" / PROMETHEUS_OPERATOR_VERSION
    if not all((out / f).is_file() for f in FILES):
        _generate(out)
    return [out / f for f in FILES]


def _generate(out: Path) -> None:
    go = shutil.which("go")
    if go is None:
        raise RuntimeError("generating the Prometheus Operator CRDs needs Go (`make install` provisions it)")
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local"}
    with tempfile.TemporaryDirectory(prefix="promcrds-") as tmp:
        work = Path(tmp)
        env["GOBIN"] = str(work / "bin")
        subprocess.run([go, "install", f"sigs.k8s.io/controller-tools/cmd/controller-gen@{CONTROLLER_TOOLS_VERSION}"],
                       check=True, env=env, cwd=work)
        info = json.loads(subprocess.run([go, "mod", "download", "-json", f"{MODULE}@{PROMETHEUS_OPERATOR_VERSION}"],
                                         check=True, env=env, cwd=work, capture_output=True, text=True).stdout)
        src = work / "src"
        shutil.copytree(info["Dir"], src)
        for path in src.rglob("*"):  # the module cache is read-only; controller-gen only reads, go may write
            path.chmod(path.stat().st_mode | 0o200)
        subprocess.run([str(work / "bin" / "controller-gen"), "crd:crdVersions=v1,allowDangerousTypes=true",
                        "paths=./v1/...", f"output:crd:dir={work / 'crds'}"], check=True, env=env, cwd=src)
        out.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            shutil.copy(work / "crds" / name, out / name)
