"""hack/install-tools.sh downloads Debian's prometheus package without a world-writable directory.

Runs the real script with `apt-get` and `apt-cache` stand-ins first on PATH (no network): the
stand-in records the directory it was run in and its arguments, and builds a small .deb with
`dpkg-deb` in place of the download, which the script then unpacks and installs as usual.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from fleetserve_devcluster.tools import PROMETHEUS_VERSION

REPO = Path(__file__).resolve().parents[2]

FAKE_APT_GET = """#!/bin/sh
set -e
printf '%s\\n' "$(stat -c %a "$PWD") $*" >> "$RECORD"
root="$(mktemp -d)"
mkdir -p "$root/DEBIAN" "$root/usr/bin"
printf 'Package: prometheus\\nVersion: {version}+ds-5+deb12u1\\nArchitecture: all\\nMaintainer: t <t@t>\\nDescription: t\\n' \\
  > "$root/DEBIAN/control"
for b in promtool prometheus; do printf '#!/bin/sh\\necho "%s, version {version}"\\n' "$b" > "$root/usr/bin/$b"; \\
  chmod 755 "$root/usr/bin/$b"; done
dpkg-deb -b "$root" "$PWD/prometheus_{version}+ds-5+deb12u1_all.deb" >/dev/null
rm -rf "$root"
"""


@pytest.mark.skipif(not shutil.which("dpkg-deb"), reason="needs dpkg-deb")
def test_the_prometheus_download_directory_is_private(tmp_path: Path) -> None:
    bin_dir, record, cache = tmp_path / "bin", tmp_path / "apt-get.calls", tmp_path / "cache"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text(FAKE_APT_GET.format(version=PROMETHEUS_VERSION))
    (bin_dir / "apt-cache").write_text("#!/bin/sh\nexit 0\n")
    for tool in ("apt-get", "apt-cache"):
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record),
           "FLEETSERVE_CACHE_DIR": str(cache)}
    done = subprocess.run(["bash", str(REPO / "hack" / "install-tools.sh"), "prometheus"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    [call] = record.read_text().splitlines()
    mode, args = call.split(" ", 1)
    assert not int(mode, 8) & (stat.S_IWOTH | stat.S_IWGRP), f"apt-get download ran in a dir of mode {mode}"
    if os.geteuid() == 0:  # as root, apt keeps root rather than needing a directory its _apt user can write
        assert "-o APT::Sandbox::User=root" in args
    assert args.endswith("download -qq -o APT::Sandbox::User=root prometheus") or os.geteuid() != 0
    assert (cache / "prometheus" / PROMETHEUS_VERSION / "bin" / "promtool").is_file()
