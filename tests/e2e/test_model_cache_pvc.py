"""A model cache on a PersistentVolumeClaim, shared by the replicas (issue 14, point 6).

Real throughout: a `local` PersistentVolume on the dev cluster (a directory in
<state dir>/persistent-volumes), a claim bound to it by the real PV controller, the node agent
mounting the bound PV into each pod, `fleetserve operator`, and two `fleetserve serve` pods of
the builtin GGUF model, which the server converts (dequantizes) into its cache on first use.
The example examples/dev-cluster/smollm2-shared-cache.yaml is applied as shipped, in a namespace
that enforces the restricted Pod Security profile.

What a user relies on: of the two replicas started together exactly one converts while the other
waits on the lock file (`.<entry>.lock` beside the cache entry) and then loads the filled cache;
a replica started later on the filled cache converts nothing either, and the converted files are
the very same (inode and mtime) after every pod came up.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fleetserve_devcluster.testing import DevClusterHandle, wait_until
from fleetserve_devcluster.volumes import PERSISTENT_VOLUMES_DIR

sys.path.insert(0, str(Path(__file__).parent))
from autoscaler_harness import Fleet, apply_crds, running_operator  # noqa: E402 - the harness sits next to this file

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "dev-cluster" / "smollm2-shared-cache.yaml"
POD_READY_S = 600  # two pods import torch and one converts the GGUF on a shared, often overloaded CPU
CONVERTING = "(first use only)"  # the server's progress line while it converts a GGUF into the cache


def documents(namespace: str, pv_name: str, pv_dir: Path) -> list[dict[str, Any]]:
    """The shipped example, in the test's namespace, with its PV named for the test."""
    docs = [d for d in yaml.safe_load_all(EXAMPLE.read_text().replace("@STATE_DIR@/persistent-volumes/smollm2-models",
                                                                      str(pv_dir))) if d]
    for doc in docs:
        if doc["kind"] == "PersistentVolume":
            doc["metadata"]["name"] = pv_name
            doc["spec"]["claimRef"]["namespace"] = namespace
        else:
            doc["metadata"]["namespace"] = namespace
            if doc["kind"] == "PersistentVolumeClaim":
                doc["spec"]["volumeName"] = pv_name
    return docs


@pytest.fixture
def pv_dir(dev_cluster: DevClusterHandle, namespace: str) -> Iterator[Path]:
    path = Path(dev_cluster.state_dir) / PERSISTENT_VOLUMES_DIR / namespace
    path.mkdir(parents=True)
    # A local disk's mount point, writable by the server's non-root user (the dev cluster applies the
    # pod's fsGroup to emptyDir and API volumes only, not to a PV as the kubelet would to a local one).
    path.chmod(0o777)
    pv_name = f"{namespace}-models"
    try:
        yield path
    finally:
        dev_cluster.kubectl("delete", "persistentvolume", pv_name, "--wait=false", "--ignore-not-found", check=False)
        shutil.rmtree(path, ignore_errors=True)


def pod_log(cluster: DevClusterHandle, namespace: str, pod: str) -> str:
    return cluster.kubectl("logs", "-n", namespace, pod, "-c", "server").stdout


def cache_entry(pv_dir: Path) -> Path | None:
    """The builtin model's converted directory in the cache (models/<name>/<version>-c<format>)."""
    return next((p for p in (pv_dir / "models" / "smollm2-135m-instruct").glob("*-c*")
                 if not p.name.startswith(".") and (p / "config.json").is_file()), None)


def test_replicas_on_a_pvc_cache_convert_the_model_once(
        dev_cluster: DevClusterHandle, namespace: str, pv_dir: Path, tmp_path: Path) -> None:
    apply_crds(dev_cluster)
    docs = documents(namespace, f"{namespace}-models", pv_dir)
    dev_cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    wait_until(lambda: json.loads(dev_cluster.kubectl("get", "pvc", "smollm2-models", "-n", namespace, "-o", "json")
                                  .stdout).get("status", {}).get("phase") == "Bound", 60,
               "the PV controller to bind the claim to the local PersistentVolume")
    fleet = Fleet(dev_cluster, namespace, "smollm2-shared")
    log = tmp_path / "operator.log"
    try:
        with running_operator(dev_cluster, namespace, log):
            first = wait_until(lambda: (lambda p: p if len(p) == 2 else None)(fleet.ready_pods()), POD_READY_S,
                               "2 ready replicas on the shared cache")
            names = sorted(p.metadata.name for p in first)
            for p in first:
                [cache] = [v for v in p.spec.volumes if v.name == "model-cache"]
                assert cache.persistent_volume_claim.claim_name == "smollm2-models"
                assert p.spec.node_name == "fs-node-0"  # the local PV's node affinity
            converted = [n for n in names if CONVERTING in pod_log(dev_cluster, namespace, n)]
            assert len(converted) == 1, f"pods that converted the model: {converted} of {names}"
            entry = cache_entry(pv_dir)
            assert entry is not None, sorted(str(p.relative_to(pv_dir)) for p in pv_dir.rglob("*"))
            lock = entry.parent / f".{entry.name}.lock"
            assert lock.is_file(), "the filler's lock file beside the cache entry"
            weights = entry / "model.safetensors"
            before = (entry.stat().st_ino, weights.stat().st_ino, weights.stat().st_mtime_ns)
            assert not [p for p in entry.parent.iterdir() if p.name.startswith(f".{entry.name}.")
                        and p != lock], "a temporary conversion directory left behind"

            # A replica started on the filled cache: delete the pod that converted; its replacement loads.
            dev_cluster.kubectl("delete", "pod", converted[0], "-n", namespace, "--wait=false")
            replacement = wait_until(lambda: next((p for p in fleet.ready_pods() if p.metadata.name not in names),
                                                  None), POD_READY_S, "the replacement replica to be ready")
            text = pod_log(dev_cluster, namespace, replacement.metadata.name)
            assert CONVERTING not in text, text[-3000:]
            assert "smollm2-135m-instruct" in text  # it did load and serve the model
            assert (entry.stat().st_ino, weights.stat().st_ino, weights.stat().st_mtime_ns) == before
            print(f"\nshared cache {entry.relative_to(pv_dir)}: converted by {converted[0]} of {names}; "
                  f"{replacement.metadata.name} loaded it without converting; lock {lock.name}")
    finally:
        if log.exists():
            sys.stderr.write(f"--- operator log (tail) ---\n{log.read_text()[-4000:]}\n")
