"""The operator's /healthz means something (issue 19, point 3).

A user's story: the dev cluster was restarted with a new CA while an operator ran. The operator
can no longer talk to the API server (its CA and client certificate are the old cluster's), so
its /healthz must turn 503 (the liveness probe restarts it) instead of staying "ok" while it logs
certificate errors. A leader, which cannot renew its Lease either, exits non-zero. This runs on a
second cluster of its own (own state dir and ports): restarting the shared one would pull it from
under every other test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fleetserve_devcluster.testing import cluster_env, wait_until
from operator_harness import free_port
from own_cluster import fleetserve, own_cluster_fixture, probe, up  # noqa: F401 (the fixture)


def test_healthz_turns_503_and_the_leader_exits_when_the_cluster_comes_back_with_a_new_ca(
        own_cluster: tuple[Path, int], tmp_path: Path) -> None:
    state, base = own_cluster
    env = cluster_env(state)
    procs: dict[str, tuple[subprocess.Popen[bytes], int, Path]] = {}
    try:
        for name, extra in (("single", ["--no-leader-election"]), ("leader", [])):
            port, log = free_port(), tmp_path / f"{name}.log"
            with open(log, "wb") as out:
                procs[name] = (subprocess.Popen(
                    [sys.executable, "-m", "fleetserve_cli.main", "operator", "--namespace", "default",
                     "--metrics-port", str(port), "--metrics-host", "127.0.0.1", *extra],
                    env=env, stdout=out, stderr=subprocess.STDOUT), port, log)
        for name, (proc, port, log) in procs.items():
            wait_until(lambda proc=proc, port=port: proc.poll() is not None or probe(port, "/readyz")[0] == 200,
                       60, f"{name}'s /readyz")
            assert proc.poll() is None, log.read_text()[-3000:]
            assert probe(port, "/healthz") == (200, "ok\n")

        # The cluster restarts: `down` deletes the state dir, so `up` makes a new CA (and client certificates).
        old_ca = (state / "pki" / "ca.crt").read_bytes()
        result = fleetserve("dev-cluster", "down", "--state-dir", str(state))
        assert result.returncode == 0, result.stderr
        up(state, base)
        assert (state / "pki" / "ca.crt").read_bytes() != old_ca

        single, port, _ = procs["single"]
        status, body = wait_until(lambda: (lambda r: r if r[0] == 503 else None)(probe(port, "/healthz")), 60,
                                  "/healthz 503 of the operator without leader election")
        assert "no API contact" in body or "rejects the operator's credentials" in body, body
        assert probe(port, "/readyz")[0] == 503
        assert single.poll() is None  # unhealthy, not dead: the liveness probe decides

        leader, _, leader_log = procs["leader"]
        assert wait_until(lambda: leader.poll(), 60, "the leader to exit") == 1
        assert "lost leadership" in leader_log.read_text()
    finally:
        for proc, _, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
