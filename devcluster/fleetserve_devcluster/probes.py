"""Container probes and lifecycle handlers with the kubelet's semantics.

A `ProbeTracker` turns single check results into the probe's state: the state
flips to failure after `failureThreshold` consecutive failures and to success
after `successThreshold` consecutive successes.  Readiness and startup start
as failed, liveness as succeeded (a container is alive until proven otherwise).
"""

from __future__ import annotations

import http.client
import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .security import CAPABILITIES

JsonObj = dict[str, Any]
# exec_runner(argv, timeout_seconds) -> (exit code 0?, message)
ExecRunner = Callable[[list[str], float], "tuple[bool, str]"]
# The namespaces of a container (podworker's `unshare`) that an exec probe or hook enters.
CONTAINER_NAMESPACES = ["--mount", "--uts"]
SETPRIV = shutil.which("setpriv") or "/usr/bin/setpriv"  # util-linux, as `nsenter` and `unshare`


def as_container_user(security: JsonObj) -> list[str]:
    """`setpriv` taking on a container's user, groups, capability bounding set and no_new_privs
    (what the launcher applies to the container itself: confine.drop_privileges)."""
    caps = ",".join(["-all", *(f"+{CAPABILITIES[c].lower()}" for c in security["capabilities"])])
    return [SETPRIV, f"--reuid={security['uid']}", f"--regid={security['gid']}",
            f"--groups={','.join(str(g) for g in security['groups'])}", f"--bounding-set={caps}",
            "--inh-caps=-all", "--ambient-caps=-all", *(["--no-new-privs"] if security.get("noNewPrivs") else []),
            "--"]


def exec_in_container(pid: int, launched: JsonObj, argv: list[str], timeout: float) -> tuple[bool, str]:
    """Run an exec probe/hook command in the namespaces of container process `pid`, in its working
    directory, with the env, user, groups, capabilities and no_new_privs of its launch spec (never as
    root on the host, never from a preexec_fn): `nsenter`, then `setpriv`, which execs `argv`."""
    cmd = ["nsenter", "--target", str(pid), *CONTAINER_NAMESPACES, f"--wdns={launched['workingDir']}", "--",
           *as_container_user(launched["security"]), *argv]
    try:
        done = subprocess.run(cmd, env=launched["env"], capture_output=True, timeout=max(timeout, 0.1))
    except subprocess.TimeoutExpired:
        return False, f"command {argv} timed out after {timeout:g}s"
    except OSError as exc:  # no nsenter on this machine
        return False, f"cannot run {cmd[0]}: {exc}"
    out = (done.stdout + done.stderr).decode(errors="replace")[-500:]
    return done.returncode == 0, out


def resolve_port(port: int | str, container: JsonObj) -> int:
    """A probe/handler port: a number, or the name of one of the container's ports."""
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    raise ValueError(f"port {port!r} is not a number and no container port has that name")


def http_get(handler: JsonObj, pod_ip: str, container: JsonObj, timeout: float) -> tuple[bool, str]:
    """An httpGet action: success is a status in [200, 400)."""
    host = handler.get("host") or pod_ip
    port = resolve_port(handler.get("port", 80), container)
    path = handler.get("path") or "/"
    headers = {h["name"]: h["value"] for h in handler.get("httpHeaders") or []}
    conn: http.client.HTTPConnection
    if str(handler.get("scheme", "HTTP")).upper() == "HTTPS":
        conn = http.client.HTTPSConnection(host, port, timeout=timeout,
                                           context=ssl._create_unverified_context())  # the kubelet skips verification too
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers)
        status = conn.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        return False, f"Get http://{host}:{port}{path}: {exc}"
    finally:
        conn.close()
    return 200 <= status < 400, f"HTTP probe failed with statuscode: {status}"


def tcp_connect(handler: JsonObj, pod_ip: str, container: JsonObj, timeout: float) -> tuple[bool, str]:
    host = handler.get("host") or pod_ip
    port = resolve_port(handler["port"], container)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return False, f"dial tcp {host}:{port}: {exc}"
    return True, ""


@dataclass(frozen=True)
class Probe:
    """A probe spec with the API defaults filled in."""

    handler: JsonObj
    initial_delay: float = 0.0
    period: float = 10.0
    timeout: float = 1.0
    success_threshold: int = 1
    failure_threshold: int = 3

    @classmethod
    def from_spec(cls, spec: JsonObj) -> Probe:
        return cls(
            handler=spec,
            initial_delay=float(spec.get("initialDelaySeconds", 0)),
            period=float(spec.get("periodSeconds", 10)),
            timeout=float(spec.get("timeoutSeconds", 1)),
            success_threshold=int(spec.get("successThreshold", 1)),
            failure_threshold=int(spec.get("failureThreshold", 3)),
        )

    def check(self, pod_ip: str, container: JsonObj, exec_runner: ExecRunner) -> tuple[bool, str]:
        """Run the probe action once: (succeeded, message)."""
        return run_action(self.handler, pod_ip, container, exec_runner, self.timeout)


def run_action(handler: JsonObj, pod_ip: str, container: JsonObj, exec_runner: ExecRunner,
               timeout: float) -> tuple[bool, str]:
    """A probe or lifecycle-hook action: httpGet, tcpSocket, exec (or sleep, for hooks)."""
    try:
        if "httpGet" in handler:
            return http_get(handler["httpGet"], pod_ip, container, timeout)
        if "tcpSocket" in handler:
            return tcp_connect(handler["tcpSocket"], pod_ip, container, timeout)
        if "exec" in handler:
            return exec_runner(list(handler["exec"].get("command") or []), timeout)
    except ValueError as exc:
        return False, str(exc)
    kinds = sorted(k for k in handler if k in ("grpc", "sleep")) or sorted(handler)
    return False, f"probe/handler {kinds} is not supported by the dev-cluster node agent"


@dataclass
class ProbeTracker:
    """The state of one probe of one container instance.

    Invariant: `result` changes only after `failure_threshold` consecutive failures
    (to False) or `success_threshold` consecutive successes (to True).
    """

    probe: Probe
    result: bool
    started_at: float
    next_at: float = field(init=False)
    successes: int = 0
    failures: int = 0
    message: str = ""

    def __post_init__(self) -> None:
        self.next_at = self.started_at + self.probe.initial_delay

    def due(self, now: float) -> bool:
        return now >= self.next_at

    def record(self, ok: bool, message: str, now: float) -> None:
        """Account one check result and schedule the next check one period later."""
        self.next_at = now + self.probe.period
        self.message = message
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            if self.successes >= self.probe.success_threshold:
                self.result = True
        else:
            self.successes, self.failures = 0, self.failures + 1
            if self.failures >= self.probe.failure_threshold:
                self.result = False
