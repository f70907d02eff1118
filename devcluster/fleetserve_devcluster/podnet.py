"""Pod and node addresses on the loopback interface (the dev cluster's pod network)."""

from __future__ import annotations

import subprocess


def add_address(ip: str) -> None:
    """Make `ip` a local address (on `lo`, /32), so a pod can bind it and everyone on the host reach it."""
    done = subprocess.run(["ip", "addr", "replace", f"{ip}/32", "dev", "lo"], capture_output=True, text=True)
    if done.returncode != 0:
        raise OSError(f"cannot add pod IP {ip} to lo (the node agent needs root / CAP_NET_ADMIN): "
                      f"{done.stderr.strip()}")


def remove_address(ip: str) -> None:
    subprocess.run(["ip", "addr", "del", f"{ip}/32", "dev", "lo"], capture_output=True)


def local_addresses(prefix: str) -> list[str]:
    """The addresses on `lo` that start with `prefix` (stale pod IPs of an agent that was killed)."""
    out = subprocess.run(["ip", "-o", "-4", "addr", "show", "dev", "lo"], capture_output=True, text=True).stdout
    return [f.split("/")[0] for line in out.splitlines() for f in line.split()[3:4] if f.startswith(prefix)]
