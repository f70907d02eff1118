"""One thread per pod: the kubelet's pod worker for a pod bound to one of the agent's nodes.

The worker owns the pod's processes from admission to the final deletion:
volumes, container processes (each in its own mount and UTS namespaces, bound
to the pod's IP, with the identity, capabilities and read-only root its
securityContext asks for: security.py, confine.py), probes, restarts with
back-off, status, and graceful termination (preStop, SIGTERM, grace period,
SIGKILL, then the pod's deletion with grace 0).  A container's env is its
spec's plus what a kubelet and the image add, never the agent's own.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import mountpoints
from .fsgroup import file_mode, set_volume_ownership
from .kube import Kube, KubeError, ns_path
from .launch import runtime_paths
from .podnet import add_address, remove_address
from .pods import (
    NOT_RUNNABLE_REASON,
    ContainerConfigError,
    NodeAllocator,
    PodNetwork,
    decode_secret,
    expand_vars,
    gpu_request,
    local_argv,
    resolve_env,
    rewrite_bind_host,
)
from .probes import Probe, ProbeTracker, exec_in_container, run_action
from .security import IMAGE_ENV, ContainerSecurity, SecurityContextError, container_security, failed_event
from .status import ContainerView, PodView, build_status, now_rfc3339, same_status
from .volumes import (
    ATOMIC_KINDS,
    Claims,
    HostPathNotAllowed,
    VolumeNotSupported,
    plan_mounts,
    prepare_volume,
    volume_files,
    write_atomic,
)
from .watch import ObjectCache

JsonObj = dict[str, Any]
log = logging.getLogger("fleetserve.devcluster.agent")
TICK = 0.2
VOLUME_SYNC_SECONDS = 2.0
# The launcher in its own mount and UTS namespaces (probes.exec_in_container enters the same ones).
UNSHARE = ["unshare", "--mount", "--uts", "--propagation", "private"]
# Models the tests make for their pods, part of every pod's "image" (read-only, at the same path).
TEST_MODELS = "test-models"


@dataclass(frozen=True)
class AgentContext:
    """What every pod worker shares."""

    kube: Kube
    fleetserve_bin: str
    api_host: str
    api_port: int
    state_dir: Path
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    host_path_allow: tuple[str, ...] = ()  # directories hostPath volumes may use (ClusterConfig)
    objects: ObjectCache | None = None  # ConfigMaps and Secrets by watch (watch.py); None: a GET each time
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Container:
    """A container of the pod and its current process (restart_count counts restarts, not starts)."""

    spec: JsonObj
    argv: list[str]
    view: ContainerView
    proc: subprocess.Popen[bytes] | None = None
    started_mono: float = 0.0
    next_start: float = 0.0
    backoff: float = 0.0
    kill_deadline: float | None = None
    kill_reason: str = ""
    probes: dict[str, ProbeTracker] = field(default_factory=dict)
    done: bool = False  # exited and will not be restarted
    # The running process's launch spec (env with secret values): kept in memory only, for exec probes/hooks.
    launched: JsonObj = field(default_factory=dict)
    refused: str = ""  # the securityContext refusal already posted as an event


class PodWorker(threading.Thread):
    """Runs one pod. `update()` hands it the latest pod object; `stop()` ends it without API calls."""

    def __init__(self, ctx: AgentContext, node: str, alloc: NodeAllocator, pod: JsonObj) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.ctx, self.node, self.alloc, self.pod = ctx, node, alloc, pod
        self.uid: str = meta["uid"]
        self.ns, self.pod_name = meta["namespace"], meta["name"]
        self.path = ns_path(self.ns, "pods", self.pod_name)
        self.dir = ctx.state_dir / "pods" / f"{self.ns}_{self.pod_name}_{self.uid}"
        self.gone = threading.Event()      # the pod disappeared from the API
        self.halt = threading.Event()      # the agent is shutting down
        self.view = PodView(pod_ip=None, host_ip=alloc.host_ip, start_time=now_rfc3339(),
                            restart_policy=pod["spec"].get("restartPolicy", "Always"))
        self.containers: list[Container] = []
        self.volume_dirs: dict[str, Path] = {}
        self.tokens: dict[tuple[str | None, int], tuple[str, float]] = {}
        self.config_error: str | None = None
        self.last_status: JsonObj | None = None
        self.next_volume_sync = 0.0
        self.gpu_ids: list[int] = []
        fs_group = (pod["spec"].get("securityContext") or {}).get("fsGroup")
        self.fs_group: int | None = int(fs_group) if fs_group is not None else None
        self.terminating = False  # set once the pod is being stopped: exits are final then

    # ------------------------------------------------------------------ API from the agent
    def update(self, pod: JsonObj) -> None:
        self.pod = pod

    def stop(self) -> None:
        self.halt.set()

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        try:
            if self._admit():
                while not (self.gone.is_set() or self.halt.is_set()):
                    if self.pod["metadata"].get("deletionTimestamp"):
                        self._terminate(graceful=True)
                        break
                    try:
                        self._tick()
                        self._report()
                    except (KubeError, OSError) as exc:  # the API server or a file hiccup: retry next tick
                        log.warning("pod %s/%s: %s", self.ns, self.pod_name, exc)
                    time.sleep(TICK)
            else:
                # A failed pod has nothing running: confirm a deletion right away.
                while not (self.gone.is_set() or self.halt.is_set()):
                    if self.pod["metadata"].get("deletionTimestamp"):
                        self._release()
                        self._confirm_deletion()
                        break
                    time.sleep(TICK)
        except Exception:  # a bug must not leave processes behind
            log.exception("pod %s/%s: worker failed", self.ns, self.pod_name)
        finally:
            self._terminate(graceful=False)
            self._release()
            # The processes are gone (and with them the pod's mount namespaces): its mount points can go.
            removed = mountpoints.remove_created(self.dir / mountpoints.RECORD)
            if removed:
                log.info("pod %s/%s: removed mount points %s", self.ns, self.pod_name, ", ".join(removed))
            if self.terminating and not self.halt.is_set():
                shutil.rmtree(self.dir, ignore_errors=True)  # the pod is gone: its volumes and logs go too

    def _release(self) -> None:
        """Give the pod's IP and GPUs back (idempotent); only once its processes are gone."""
        with self.ctx.lock:
            if self.uid in self.alloc.ips:
                remove_address(self.alloc.ips[self.uid])
            self.alloc.free(self.uid)

    def _admit(self) -> bool:
        """Allocate the pod's IP and GPUs, check its containers; False = the pod was failed."""
        spec = self.pod["spec"]
        with self.ctx.lock:
            gpus = gpu_request(self.pod)
            if not self.alloc.can_allocate_gpus(gpus):
                return self._fail("OutOfnvidia.com/gpu",
                                  f"Node didn't have enough resource: nvidia.com/gpu, requested: {gpus}")
            self.gpu_ids = self.alloc.allocate_gpus(self.uid, gpus)
            wanted = self.pod.get("status", {}).get("podIP")
            self.view.pod_ip = self.alloc.allocate_ip(self.uid, wanted)
        try:
            add_address(self.alloc.host_ip)  # idempotent; for nodes the agent adopted too
            add_address(self.view.pod_ip)
        except OSError as exc:
            return self._fail("PodNetworkUnavailable", str(exc))
        if spec.get("initContainers"):
            return self._fail("InitContainersNotSupported",
                              "the dev-cluster node agent does not run initContainers")
        for c in spec["containers"]:
            argv = local_argv(c, self.ctx.fleetserve_bin)
            view = ContainerView(name=c["name"], image=c.get("image", ""))
            if argv is None:
                view.waiting = (NOT_RUNNABLE_REASON, "")
                self.containers.append(Container(c, [], view))
                return self._fail(NOT_RUNNABLE_REASON, (
                    f"container {c['name']!r} (image {c.get('image')!r}) does not run `fleetserve`: the dev-cluster "
                    "node agent runs only fleetserve commands as local processes (command or args must start "
                    "with `fleetserve`)"))
            self.containers.append(Container(c, rewrite_bind_host(argv, self.view.pod_ip), view))
        # Logs and volumes (secrets, tokens) of the pod: nobody else on the machine enters.
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        try:
            for volume in spec.get("volumes") or []:
                self.volume_dirs[volume["name"]] = self._prepare(volume)
        except HostPathNotAllowed as exc:
            return self._fail("HostPathNotAllowed", str(exc))
        except VolumeNotSupported as exc:
            return self._fail("VolumeNotSupported", str(exc))
        except ContainerConfigError as exc:
            self.config_error = str(exc)
        return True

    def _fail(self, reason: str, message: str) -> bool:
        log.warning("pod %s/%s failed: %s: %s", self.ns, self.pod_name, reason, message)
        self.view.failed_reason, self.view.failed_message = reason, message
        for c in self.containers:
            c.view.waiting = (reason, message)
        self._report()
        return False

    def _tick(self) -> None:
        now = time.monotonic()
        if now >= self.next_volume_sync:
            self.next_volume_sync = now + VOLUME_SYNC_SECONDS
            self._sync_volumes()
        for c in self.containers:
            self._step(c, now)

    # ------------------------------------------------------------------ volumes, env
    def _fetch(self, kind: str, namespace: str, name: str) -> JsonObj | None:
        resource = "configmaps" if kind == "configmap" else "secrets"
        if self.ctx.objects is not None:
            return self.ctx.objects.get(resource, namespace, name)
        return self.ctx.kube.get_or_none(ns_path(namespace, resource, name))

    def _lookup(self, kind: str, namespace: str, name: str) -> dict[str, str] | None:
        obj = self._fetch(kind, namespace, name)
        if obj is None:
            return None
        return decode_secret(obj) if kind == "secret" else dict(obj.get("data") or {})

    def _token(self, audience: str | None, expiration: int) -> str:
        """A TokenRequest token bound to this pod, renewed after 80% of its lifetime."""
        key = (audience, expiration)
        cached = self.tokens.get(key)
        if cached and time.monotonic() < cached[1]:
            return cached[0]
        sa = self.pod["spec"].get("serviceAccountName") or "default"
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {
            "audiences": [audience] if audience else [],
            "expirationSeconds": expiration,
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.pod_name, "uid": self.uid}}}
        answer = self.ctx.kube.create(ns_path(self.ns, "serviceaccounts", sa) + "/token", body)
        token = answer["status"]["token"]
        self.tokens[key] = (token, time.monotonic() + 0.8 * expiration)
        return str(token)

    def _claims(self) -> Claims:
        return Claims(self.ctx.kube.get_or_none, self.ns, self.ctx.host_path_allow, self.ctx.state_dir)

    def _net(self) -> PodNetwork:
        return PodNetwork(pod_ip=self.view.pod_ip or "", host_ip=self.alloc.host_ip, node_name=self.node)

    def _sync_volumes(self) -> None:
        """(Re)write the API-backed volumes; a missing object blocks container starts, as in Kubernetes."""
        try:
            for volume in self.pod["spec"].get("volumes") or []:
                if volume["name"] not in self.volume_dirs:  # e.g. a claim not bound yet at admission
                    self.volume_dirs[volume["name"]] = self._prepare(volume)
                if any(k in volume for k in ATOMIC_KINDS):
                    files = {rel: (data, file_mode(mode, self.fs_group)) for rel, (data, mode)
                             in volume_files(volume, self.pod, self._fetch, self._token, self._net()).items()}
                    target = self.volume_dirs[volume["name"]]
                    if write_atomic(target, files):
                        if self.fs_group is not None:
                            set_volume_ownership(target, self.fs_group, read_only=True)
                        if self.config_error is None:
                            log.info("pod %s/%s: volume %s updated", self.ns, self.pod_name, volume["name"])
            self.config_error = None
        except (ContainerConfigError, VolumeNotSupported) as exc:
            self.config_error = str(exc)
        except KubeError as exc:
            self.config_error = f"cannot read a volume's source: {exc}"

    def _prepare(self, volume: JsonObj) -> Path:
        """A volume's host directory; an emptyDir is given to the pod's fsGroup, as the kubelet does."""
        path = prepare_volume(volume, self.dir, self.ctx.host_path_allow, self._claims())
        if "emptyDir" in volume and self.fs_group is not None:
            set_volume_ownership(path, self.fs_group, read_only=False)
        return path

    def _hostname(self) -> str:
        return str(self.pod["spec"].get("hostname") or self.pod_name)[:63]

    def _base_env(self, security: ContainerSecurity) -> dict[str, str]:
        """What a container gets besides its spec's env: the image's env (fleetserve's images: the venv's
        bin first in PATH), HOME from the runtime, HOSTNAME, the kubelet's KUBERNETES_* variables.
        Nothing of the agent's own environment."""
        bin_dir = str(Path(self.ctx.fleetserve_bin).parent)
        env = {
            "PATH": f"{bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            **IMAGE_ENV,
            "HOME": security.home,
            "HOSTNAME": self._hostname(),
            "KUBERNETES_SERVICE_HOST": self.ctx.api_host,
            "KUBERNETES_SERVICE_PORT": str(self.ctx.api_port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(self.ctx.api_port),
            "KUBERNETES_PORT": f"tcp://{self.ctx.api_host}:{self.ctx.api_port}",
            # The address the pod must bind: `fleetserve serve` and the echo helper honour it.
            "FLEETSERVE_HOST": self.view.pod_ip or "",
        }
        if self.gpu_ids:
            env["NVIDIA_VISIBLE_DEVICES"] = ",".join(f"{self.node}-gpu-{g}" for g in self.gpu_ids)
        return env

    # ------------------------------------------------------------------ containers
    def _start(self, c: Container) -> None:
        retry_at = time.monotonic() + 1.0  # a container that cannot start yet is retried each second
        if self.config_error:
            c.view.waiting, c.next_start = ("CreateContainerConfigError", self.config_error), retry_at
            return
        try:
            security = container_security(self.pod, c.spec)
        except SecurityContextError as exc:
            c.view.waiting, c.next_start = ("CreateContainerConfigError", str(exc)), retry_at
            self._refused(c, str(exc))
            return
        try:
            env = resolve_env(self.pod, c.spec, self._lookup, self._net(), self._base_env(security))
            mounts = plan_mounts(c.spec, self.volume_dirs, self.pod["spec"].get("volumes") or [])
        except ContainerConfigError as exc:
            c.view.waiting, c.next_start = ("CreateContainerConfigError", str(exc)), retry_at
            return
        argv = [c.argv[0], *(expand_vars(a, env) for a in c.argv[1:])]
        spec = {"argv": argv, "env": env, "workingDir": c.spec.get("workingDir") or "/",
                "mounts": [m.__dict__ for m in mounts], "keep": runtime_paths(self.ctx.fleetserve_bin),
                "security": security.to_launch(), "hostname": self._hostname(),
                "imageData": [str(self.ctx.state_dir / TEST_MODELS)]}
        spec["parent"] = os.getpid()
        spec["mountpoints"] = str(self.dir / mountpoints.RECORD)  # what the launcher creates on the host
        logfile = open(self.dir / f"{c.spec['name']}.log", "ab")  # noqa: SIM115 (the child owns it)
        # The spec goes through a pipe, never a file: its env holds the pod's secret values.
        cmd = [*UNSHARE, sys.executable, "-m", "fleetserve_devcluster.launch"]
        try:
            c.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=logfile, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        except OSError as exc:  # e.g. no `unshare` on this machine
            c.view.waiting, c.next_start = ("RunContainerError", f"cannot start {cmd[0]}: {exc}"), retry_at
            return
        finally:
            logfile.close()
        try:
            assert c.proc.stdin is not None
            c.proc.stdin.write(json.dumps(spec).encode())
            c.proc.stdin.close()
        except OSError:  # the launcher died at once: its exit is handled as the container's
            pass
        c.launched = spec
        if c.view.running_since is not None or c.view.last_terminated is not None:
            c.view.restart_count += 1
        c.started_mono = time.monotonic()
        c.view.running_since, c.view.waiting, c.view.terminated = now_rfc3339(), None, None
        c.view.container_id = f"fleetserve://{c.proc.pid}"
        c.view.ready = False
        c.kill_deadline = None
        c.probes = {kind: ProbeTracker(Probe.from_spec(c.spec[key]), result=kind == "liveness",
                                       started_at=c.started_mono)
                    for kind, key in (("startup", "startupProbe"), ("liveness", "livenessProbe"),
                                      ("readiness", "readinessProbe")) if c.spec.get(key)}
        c.view.started = "startup" not in c.probes
        log.info("pod %s/%s: started container %s (pid %d, restart %d)", self.ns, self.pod_name,
                 c.spec["name"], c.proc.pid, c.view.restart_count)

    def _refused(self, c: Container, message: str) -> None:
        """The kubelet's `Failed` event for a container its securityContext keeps from starting (once)."""
        if c.refused == message:
            return
        log.warning("pod %s/%s: container %s: %s", self.ns, self.pod_name, c.spec["name"], message)
        c.refused = message  # a POST is never sent twice: after a connection error the event may exist
        try:
            self.ctx.kube.create(ns_path(self.ns, "events"),
                                 failed_event(self.pod, c.spec, self.node, message, now_rfc3339()))
        except (KubeError, OSError) as exc:
            log.warning("pod %s/%s: cannot post the event: %s", self.ns, self.pod_name, exc)

    def _step(self, c: Container, now: float) -> None:
        if c.proc is None:
            if not c.done and now >= c.next_start:
                self._start(c)
            return
        code = c.proc.poll()
        if code is not None:
            self._exited(c, code, now)
            return
        if c.kill_deadline is not None:
            if now >= c.kill_deadline:
                self._kill_group(c)
            return
        self._probe(c, now)

    def _exited(self, c: Container, code: int, now: float) -> None:
        self._kill_group(c)  # leftover children die with the container, as with a cgroup
        reason = c.kill_reason or ("Completed" if code == 0 else "Error")
        exit_code = 128 - code if code < 0 else code  # killed by signal N -> 128+N
        state = {"exitCode": exit_code, "reason": reason, "startedAt": c.view.running_since,
                 "finishedAt": now_rfc3339(), "containerID": c.view.container_id}
        c.proc, c.kill_reason, c.kill_deadline = None, "", None
        c.view.running_since, c.view.ready, c.view.started = None, False, False
        policy = self.view.restart_policy
        if not self.terminating and (policy == "Always" or (policy == "OnFailure" and exit_code != 0)):
            ran = now - c.started_mono
            # A container that ran stably for twice the maximum back-off starts over from the initial delay.
            c.backoff = self.ctx.backoff_initial if (c.backoff == 0 or ran > 2 * self.ctx.backoff_max) \
                else min(2 * c.backoff, self.ctx.backoff_max)
            c.next_start = now + c.backoff
            c.view.last_terminated = state
            c.view.waiting = ("CrashLoopBackOff", f"back-off {c.backoff:g}s restarting failed container="
                              f"{c.spec['name']} pod={self.pod_name}_{self.ns}({self.uid})")
        else:
            c.done, c.view.terminated = True, state
        log.info("pod %s/%s: container %s exited %d (%s)", self.ns, self.pod_name, c.spec["name"], exit_code, reason)

    def _exec(self, c: Container) -> Callable[[list[str], float], tuple[bool, str]]:
        """An exec probe/hook runner for the container's current process (exec_in_container)."""

        def run(argv: list[str], timeout: float) -> tuple[bool, str]:
            if c.proc is None:
                return False, "container is not running"
            return exec_in_container(c.proc.pid, c.launched, argv, timeout)

        return run

    def _probe(self, c: Container, now: float) -> None:
        ip = self.view.pod_ip or ""
        startup = c.probes.get("startup")
        if startup and not c.view.started:
            if startup.due(now):
                startup.record(*startup.probe.check(ip, c.spec, self._exec(c)), now=time.monotonic())
                if startup.result:
                    c.view.started = True
                elif startup.failures >= startup.probe.failure_threshold:
                    self._kill(c, "startup probe failed: " + startup.message)
            return
        liveness = c.probes.get("liveness")
        if liveness and liveness.due(now):
            liveness.record(*liveness.probe.check(ip, c.spec, self._exec(c)), now=time.monotonic())
            if not liveness.result:
                self._kill(c, "liveness probe failed: " + liveness.message)
                return
        readiness = c.probes.get("readiness")
        if readiness is None:
            c.view.ready = True
        elif readiness.due(now):
            readiness.record(*readiness.probe.check(ip, c.spec, self._exec(c)), now=time.monotonic())
            c.view.ready = readiness.result

    def _grace(self) -> float:
        meta, spec = self.pod["metadata"], self.pod["spec"]
        value = meta.get("deletionGracePeriodSeconds", spec.get("terminationGracePeriodSeconds", 30))
        return float(value if value is not None else 30)

    def _kill(self, c: Container, why: str) -> None:
        """Restart a container whose probe failed: SIGTERM now, SIGKILL after the grace period."""
        log.info("pod %s/%s: container %s: %s, killing", self.ns, self.pod_name, c.spec["name"], why)
        c.view.ready = False
        c.kill_reason = "Error"
        c.kill_deadline = time.monotonic() + float(self.pod["spec"].get("terminationGracePeriodSeconds", 30))
        self._signal(c, signal.SIGTERM)

    @staticmethod
    def _signal(c: Container, sig: int) -> None:
        if c.proc is not None:
            try:
                os.kill(c.proc.pid, sig)
            except ProcessLookupError:
                pass

    @staticmethod
    def _kill_group(c: Container) -> None:
        """SIGKILL the container's whole process group (its session leader is the container process)."""
        if c.proc is not None:
            try:
                os.killpg(c.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    # ------------------------------------------------------------------ termination
    def _terminate(self, graceful: bool) -> None:
        """Stop every container: preStop, SIGTERM, wait up to the grace period, SIGKILL; then confirm."""
        self.terminating = True
        running = [c for c in self.containers if c.proc is not None]
        if graceful:
            deadline = time.monotonic() + self._grace()
            log.info("pod %s/%s: terminating (grace %gs)", self.ns, self.pod_name, self._grace())
            threads = [threading.Thread(target=self._stop_container, args=(c, deadline)) for c in running]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        else:
            for c in running:
                self._signal(c, signal.SIGTERM)
            deadline = time.monotonic() + (0 if self.gone.is_set() else 3)
            for c in running:
                self._wait(c, deadline)
        now = time.monotonic()
        for c in running:
            self._kill_group(c)
            if c.proc is not None:
                c.proc.wait()
                self._exited(c, c.proc.returncode, now)
            c.done = True
        if graceful:
            self._report()
            # Free the GPUs before the API object goes: the scheduler may bind a new pod at once.
            self._release()
            self._confirm_deletion()

    def _stop_container(self, c: Container, deadline: float) -> None:
        pre_stop = (c.spec.get("lifecycle") or {}).get("preStop")
        if pre_stop:
            ok, message = run_action(pre_stop, self.view.pod_ip or "", c.spec, self._exec(c),
                                     timeout=max(deadline - time.monotonic(), 0.1))
            if not ok:
                log.warning("pod %s/%s: preStop hook of %s failed: %s", self.ns, self.pod_name,
                            c.spec["name"], message)
        self._signal(c, signal.SIGTERM)
        self._wait(c, deadline)

    @staticmethod
    def _wait(c: Container, deadline: float) -> None:
        if c.proc is None:
            return
        try:
            c.proc.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            pass

    def _confirm_deletion(self) -> None:
        """Delete the pod (grace 0, this uid only); after a connection error, look before sending again."""
        for _ in range(5):
            try:
                self.ctx.kube.delete(self.path, {"gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}})
                return
            except KubeError as exc:
                if exc.status not in (404, 409):
                    raise
                return
            except OSError as exc:  # did it take effect? the pod (with this uid) is gone if it did
                log.warning("pod %s/%s: confirming the deletion: %s", self.ns, self.pod_name, exc)
                time.sleep(0.5)
                try:
                    current = self.ctx.kube.get_or_none(self.path)
                except OSError:
                    continue
                if current is None or current["metadata"].get("uid") != self.uid:
                    return

    # ------------------------------------------------------------------ status
    def _report(self) -> None:
        self.view.containers = [c.view for c in self.containers]
        status = build_status(self.pod, self.view)
        if same_status(self.last_status, status):
            return
        try:
            # metadata.uid is a precondition: never write onto a new pod that reuses the name.
            body = dict(status)
            for key in ("podIPs", "hostIPs"):  # lists merged by ip: replace them, never add a second IP
                if key in body:
                    body[key] = [{"$patch": "replace"}, *body[key]]
            self.ctx.kube.patch(self.path + "/status", {"metadata": {"uid": self.uid}, "status": body},
                                strategic=True)
            self.last_status = status
        except KubeError as exc:
            if exc.status not in (404, 409):
                log.warning("pod %s/%s: status update failed: %s", self.ns, self.pod_name, exc)
        except OSError as exc:  # not resent blindly; the next report sends the then-current status
            log.warning("pod %s/%s: status update failed: %s", self.ns, self.pod_name, exc)
