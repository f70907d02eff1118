"""What enforcing a pod's securityContext costs the dev cluster's node agent (run as root, Linux).

Two timings, interleaved, medians of N runs each:

* container start: the agent's `unshare` + launcher until the container's program (`/bin/true`)
  has run, for a root container with nothing asked (masks and read-only /sys only) and for the
  restricted profile fleetserve's pods use (uid 65532, drop ALL, no_new_privs, read-only root);
* an exec probe (`true`) in a running container: `nsenter` straight into the command, as the agent
  did before (as root, the host's identity), and `nsenter` + `setpriv` (the container's user, groups,
  capabilities and no_new_privs), as it does now.

    sudo .venv/bin/python benchmarks/devcluster_confine.py --runs 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fleetserve_devcluster.launch import runtime_paths
from fleetserve_devcluster.pods import default_fleetserve_bin
from fleetserve_devcluster.podworker import UNSHARE
from fleetserve_devcluster.probes import CONTAINER_NAMESPACES, exec_in_container
from fleetserve_devcluster.security import container_security

POD = {"metadata": {"name": "bench", "namespace": "bench", "uid": "u"}, "spec": {}}
RESTRICTED = {"name": "c", "securityContext": {"runAsUser": 65532, "runAsGroup": 65532, "runAsNonRoot": True,
                                               "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                               "capabilities": {"drop": ["ALL"]}}}
LAUNCH = [sys.executable, "-m", "fleetserve_devcluster.launch"]


def _spec(container: dict, volume: str, argv: list[str]) -> dict:  # type: ignore[type-arg]
    security = container_security(POD, container)
    return {"argv": argv, "env": {"PATH": "/usr/bin:/bin"}, "workingDir": "/",
            "mounts": [{"source": volume, "target": "/tmp", "read_only": False, "sub_path": ""}],
            "keep": runtime_paths(default_fleetserve_bin()), "security": security.to_launch(), "hostname": "bench"}


def start_once(spec: dict) -> float:  # type: ignore[type-arg]
    t0 = time.perf_counter()
    done = subprocess.run([*UNSHARE, *LAUNCH], input=json.dumps(spec).encode(), capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.decode())
    return time.perf_counter() - t0


def exec_once(pid: int, spec: dict | None) -> float:  # type: ignore[type-arg]
    t0 = time.perf_counter()
    if spec is None:  # before: nsenter runs the command itself, as root
        done = subprocess.run(["nsenter", "--target", str(pid), *CONTAINER_NAMESPACES, "--", "true"],
                              capture_output=True)
    else:
        ok, message = exec_in_container(pid, spec, ["true"], 10.0)
        if not ok:
            raise RuntimeError(message)
        return time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(done.stderr.decode())
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as volume:
        Path(volume).chmod(0o777)
        specs = {"root, nothing asked": _spec({"name": "c"}, volume, ["/bin/true"]),
                 "restricted (65532, drop ALL, nnp, ro root)": _spec(RESTRICTED, volume, ["/bin/true"])}
        starts: dict[str, list[float]] = {k: [] for k in specs}
        for _ in range(args.runs):
            for name, spec in specs.items():
                starts[name].append(start_once(spec))
        sleeper = _spec(RESTRICTED, volume, ["/bin/sleep", "600"])
        proc = subprocess.Popen([*UNSHARE, *LAUNCH], stdin=subprocess.PIPE)
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(sleeper).encode())
        proc.stdin.close()
        time.sleep(2.0)
        execs: dict[str, list[float]] = {"nsenter only (before)": [], "nsenter + setpriv (now)": []}
        try:
            for _ in range(args.runs):
                execs["nsenter only (before)"].append(exec_once(proc.pid, None))
                execs["nsenter + setpriv (now)"].append(exec_once(proc.pid, sleeper))
        finally:
            proc.kill()
            proc.wait()
    for title, table in (("container start to exit of /bin/true", starts), ("exec probe `true`", execs)):
        for name, values in table.items():
            print(f"{title:<40} {name:<44} median {statistics.median(values) * 1000:7.1f} ms "
                  f"(min {min(values) * 1000:.1f}, max {max(values) * 1000:.1f}, n={len(values)})")


if __name__ == "__main__":
    main()
