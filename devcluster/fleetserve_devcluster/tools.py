"""Where the dev cluster's external tools live, and which versions they are.

`hack/install-tools.sh` provisions every tool into the user cache dir, one
directory per tool and version, and reads the versions from this module
(``python -m fleetserve_devcluster.tools versions``) so that the pins live in
exactly one place:

    <cache>/k8s/<K8S_VERSION>/bin/{kube-apiserver,kube-controller-manager,kube-scheduler,kubectl}
    <cache>/etcd/<ETCD_VERSION>/bin/etcd
    <cache>/helm/<HELM_VERSION>/bin/helm
    <cache>/prometheus/<PROMETHEUS_VERSION>/bin/{prometheus,promtool}
    <cache>/k8s/<K8S_VERSION>/bin/{kubelet,kube-proxy}       (the real nodes of `up --real-nodes`)
    <cache>/node-runtime/<NODE_RUNTIME>/{root,bin,images}    (Debian's containerd, runc, CNI plugins,
                                                              iptables; the pause and probe images)
    <cache>/bin/<tool> -> one of the above      (tools_bin_dir(): put it first on PATH)

Invariant: `tool_path()` only ever returns a path to an existing executable
of the pinned version; everything else is a `ToolMissingError` that names the
fix (`make install`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

K8S_VERSION = "v1.36.3"
ETCD_VERSION = "v3.6.8"
HELM_VERSION = "v3.19.0"
# Debian bookworm's `prometheus` package (2.42.0+ds-5+deb12u1), keyed by its upstream version.
PROMETHEUS_VERSION = "2.42.0"
# The real nodes' runtime (`dev-cluster up --real-nodes`): Debian bookworm's packages, keyed by their
# upstream versions (hack/install-tools.sh node-runtime checks what apt-get download fetched).
CONTAINERD_VERSION = "1.6.20"
RUNC_VERSION = "1.1.5"
CNI_PLUGINS_VERSION = "1.1.1"
IPTABLES_VERSION = "1.8.9"
# `make images` (hack/images/build.sh): Debian's buildah and mmdebstrap, unpacked the same way.
BUILDAH_VERSION = "1.28.2"
MMDEBSTRAP_VERSION = "1.3.5"
IMAGE_TOOLS = f"buildah-{BUILDAH_VERSION}_mmdebstrap-{MMDEBSTRAP_VERSION}"
NODE_RUNTIME = (f"containerd-{CONTAINERD_VERSION}_runc-{RUNC_VERSION}_cni-{CNI_PLUGINS_VERSION}"
                f"_iptables-{IPTABLES_VERSION}")

# tool name -> (cache subdirectory, version)
TOOLS: dict[str, tuple[str, str]] = {
    "kube-apiserver": ("k8s", K8S_VERSION),
    "kube-controller-manager": ("k8s", K8S_VERSION),
    "kube-scheduler": ("k8s", K8S_VERSION),
    "kubectl": ("k8s", K8S_VERSION),
    "etcd": ("etcd", ETCD_VERSION),
    "helm": ("helm", HELM_VERSION),
    "promtool": ("prometheus", PROMETHEUS_VERSION),
    "prometheus": ("prometheus", PROMETHEUS_VERSION),
}


class ToolMissingError(RuntimeError):
    """A provisioned tool is not in the cache; the message says how to get it."""


def cache_dir() -> Path:
    """The root of everything fleetserve caches: ``$FLEETSERVE_CACHE_DIR`` or ``~/.cache/fleetserve``."""
    override = os.environ.get("FLEETSERVE_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fleetserve"


def tool_dir(name: str) -> Path:
    """The version-keyed ``bin`` directory that holds tool ``name``."""
    try:
        subdir, ver = TOOLS[name]
    except KeyError:
        raise ValueError(f"unknown tool {name!r}; known tools: {', '.join(sorted(TOOLS))}") from None
    return cache_dir() / subdir / ver / "bin"


def tool_path(name: str) -> Path:
    """The executable of tool ``name`` at its pinned version.

    Raises `ToolMissingError` (with the ``make install`` hint) when it was
    not provisioned yet, and `ValueError` for a name that is no tool of ours.
    """
    path = tool_dir(name) / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        _, ver = TOOLS[name]
        raise ToolMissingError(
            f"{name} {ver} is not installed (expected {path}); run `make install` "
            f"(or hack/install-tools.sh) to provision the dev cluster tools"
        )
    return path


def tools_bin_dir() -> Path:
    """A directory of symlinks to every provisioned tool, meant to go first on PATH.

    The links are refreshed on every call, so a version bump in this module
    takes effect without re-running the installer; missing tools are left out
    (and a stale link to one is removed).
    """
    bin_dir = cache_dir() / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in TOOLS:
        link = bin_dir / name
        try:
            target = tool_path(name)
        except ToolMissingError:
            if link.is_symlink():
                link.unlink()
            continue
        if link.is_symlink() and Path(os.readlink(link)) == target:
            continue
        tmp = bin_dir / f".{name}.tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(target)
        tmp.replace(link)  # atomic: a concurrent reader sees the old or the new link
    return bin_dir


def missing_tools() -> list[str]:
    """Names of the tools that are not provisioned yet."""
    missing = []
    for name in TOOLS:
        try:
            tool_path(name)
        except ToolMissingError:
            missing.append(name)
    return missing


def tools_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``base`` (default: os.environ) with the tools directory first on PATH."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = f"{tools_bin_dir()}{os.pathsep}{env.get('PATH', '')}"
    return env


def _main(argv: list[str]) -> int:
    """``python -m fleetserve_devcluster.tools versions|bin-dir|check`` for the shell scripts."""
    cmd = argv[0] if argv else "versions"
    if cmd == "versions":
        print(f"K8S_VERSION={K8S_VERSION}")
        print(f"ETCD_VERSION={ETCD_VERSION}")
        print(f"HELM_VERSION={HELM_VERSION}")
        print(f"PROMETHEUS_VERSION={PROMETHEUS_VERSION}")
        print(f"CONTAINERD_VERSION={CONTAINERD_VERSION}")
        print(f"RUNC_VERSION={RUNC_VERSION}")
        print(f"CNI_PLUGINS_VERSION={CNI_PLUGINS_VERSION}")
        print(f"IPTABLES_VERSION={IPTABLES_VERSION}")
        print(f"NODE_RUNTIME={NODE_RUNTIME}")
        print(f"BUILDAH_VERSION={BUILDAH_VERSION}")
        print(f"MMDEBSTRAP_VERSION={MMDEBSTRAP_VERSION}")
        print(f"IMAGE_TOOLS={IMAGE_TOOLS}")
        print(f"FLEETSERVE_CACHE={cache_dir()}")
        return 0
    if cmd == "bin-dir":
        print(tools_bin_dir())
        return 0
    if cmd == "check":
        missing = missing_tools()
        for name in TOOLS:
            print(f"{name:<24} {'MISSING' if name in missing else tool_dir(name) / name}")
        return 1 if missing else 0
    print(f"usage: python -m fleetserve_devcluster.tools versions|bin-dir|check (got {cmd!r})", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
