"""`up`, a pod with a mount point, an operator started as `make demo` starts it, then `down`:
the machine is as before — no process, mount, loopback address, lock file or file under the cache
and temporary directories is left behind.

A helper process runs the whole sequence as a child subreaper (PR_SET_CHILD_SUBREAPER): every
process the dev cluster starts, detached or not, is its descendant and comes back to it as an
orphan, so "no process left" is checked exactly, even on a machine shared with other clusters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from fleetserve_devcluster import locks, tools
from fleetserve_devcluster.testing import free_port_base

HELPER = r'''
import ctypes, json, os, subprocess, sys, time

ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER: orphans of the dev cluster come back to us
fleetserve, kubectl, state, base, mount_point = sys.argv[1:6]
env = {**os.environ, "KUBECONFIG": os.path.join(state, "kubeconfig")}

def run(*argv, check=True):
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, check=check)

def wait(fn, what, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn():
            return
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}")

run(fleetserve, "dev-cluster", "up", "--state-dir", state, "--port-base", base, "--nodes", "1")
run(kubectl, "create", "namespace", "clean")
wait(lambda: run(kubectl, "get", "sa", "default", "-n", "clean", check=False).returncode == 0, "the default SA")
pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "clean"}, "spec": {
    "terminationGracePeriodSeconds": 2, "volumes": [{"name": "v", "emptyDir": {}}],
    "containers": [{"name": "c", "image": "fleetserve/echo", "command": ["fleetserve", "dev-cluster", "echo"],
                    "volumeMounts": [{"name": "v", "mountPath": mount_point}]}]}}
subprocess.run([kubectl, "apply", "-f", "-"], input=json.dumps(pod), env=env, check=True, capture_output=True,
               text=True)
wait(lambda: run(kubectl, "get", "pod", "p", "-n", "clean", "-o", "jsonpath={.status.phase}").stdout == "Running",
     "the pod running")
# Phase Running comes when the launcher starts; its mount points follow once it holds the machine's
# mount-point lock (mountpoints.py), which another cluster's pod start or cleanup may hold a moment.
try:
    wait(lambda: os.path.isdir(mount_point), "the pod's mount point on the host", timeout=60)
except SystemExit:
    pass
mounted = os.path.isdir(mount_point)
try:
    block = json.load(open(os.path.join(state, "network.json")))["block"]
except OSError:
    block = None
# The operator, started exactly as hack/demo.sh starts it: detached, its pid file in the state dir.
os.makedirs(os.path.join(state, "logs"), exist_ok=True)
with open(os.path.join(state, "logs", "demo-operator.log"), "ab") as log:
    op = subprocess.Popen(["setsid", fleetserve, "operator", "--namespace", "default", "--metrics-port", "0",
                           "--no-leader-election"],
                          env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
open(os.path.join(state, "pids", "demo-operator.pid"), "w").write(f"{op.pid}\n")
time.sleep(2)
def children():
    """Our live children: with the subreaper, every process the dev cluster left running."""
    out = {}
    for p in os.listdir("/proc"):
        try:
            fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            if fields[1] == str(os.getpid()) and fields[0] != "Z":
                out[p] = open(f"/proc/{p}/cmdline").read().replace("\0", " ")
        except OSError:
            continue
    return out

running = children()
down = run(fleetserve, "dev-cluster", "down", "--state-dir", state)
time.sleep(1)
while True:  # reap what exited
    try:
        if os.waitpid(-1, os.WNOHANG) == (0, 0):
            break
    except ChildProcessError:
        break
left = children()
print(json.dumps({"left": left, "before_down": len(running), "block": block, "mounted": mounted,
                  "down": down.stdout}))
'''


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def _mount_points() -> set[str]:
    return {line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()}


def _addresses() -> set[str]:
    out = subprocess.run(["ip", "-o", "-4", "addr", "show", "dev", "lo"], capture_output=True, text=True).stdout
    return {line.split()[3].split("/")[0] for line in out.splitlines()}


def _tmp_names() -> set[str]:
    return {p.name for p in Path("/tmp").iterdir() if "fleetserve" in p.name or "devcluster" in p.name}


@pytest.mark.skipif(os.geteuid() != 0, reason="the node agent needs root (pod addresses on lo, mount namespaces)")
def test_down_leaves_the_machine_as_it_was_before_up(tmp_path: Path) -> None:
    if tools.missing_tools():
        pytest.fail(f"dev cluster tools not provisioned: {tools.missing_tools()}; run `make install`")
    # A cache dir of its own (the built tools linked in) and a temporary directory of its own.
    real_cache, cache, tmp = tools.cache_dir(), tmp_path / "cache", tmp_path / "tmp"
    cache.mkdir()
    tmp.mkdir()
    for name in ("bin", "k8s", "etcd", "helm", "prometheus"):
        if (real_cache / name).exists():
            (cache / name).symlink_to(real_cache / name)
    state = cache / "dev-cluster"
    mount_point = f"/fleetserve-clean-test-{uuid.uuid4().hex[:8]}/data"
    before = (_files(cache), _files(tmp), _mount_points(), _addresses(), _tmp_names(),
              _files(locks.lock_dir()))
    env = {**os.environ, "FLEETSERVE_CACHE_DIR": str(cache), "TMPDIR": str(tmp)}
    env.pop("FLEETSERVE_DEV_CLUSTER_KEEP", None)
    done = subprocess.run([sys.executable, "-c", HELPER, str(Path(sys.executable).parent / "fleetserve"),
                           str(tools.tool_path("kubectl")), str(state), str(free_port_base(17200, 30000)),
                           mount_point], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["mounted"] and report["before_down"] >= 6, report  # it did run: 5 components + the operator
    assert report["left"] == {}, f"processes left after down: {report['left']}\n{report['down']}"
    after = (_files(cache), _files(tmp), _mount_points(), _addresses(), _tmp_names(), _files(locks.lock_dir()))
    assert after[0] == before[0], "files left under the cache dir"
    assert after[1] == before[1] == set(), "files left under the temporary directory"
    assert after[2] - before[2] == set(), "mounts left"
    assert after[4] - before[4] == set(), "entries left in /tmp"
    # A lock file that another running dev cluster's agent holds (its pod-network block, claimed while this
    # test ran) is not this cluster's: only a new file nobody holds is one `down` left behind.
    left_locks = {n for n in after[5] - before[5] if not locks.held_elsewhere(locks.lock_dir() / n)}
    assert left_locks == set(), "lock files left"
    assert not Path(mount_point).parent.exists(), "the pod's mount point was left on the host"
    net = report["block"]
    assert net is not None, "the node agent did not record its pod-network block in the state dir"
    block_prefixes = tuple(f"198.{18 + net // 16}.{16 * (net % 16) + i}." for i in range(16))
    assert [a for a in _addresses() if a.startswith(block_prefixes)] == []
