"""The dev cluster's lock files: in a private directory, opened without following symlinks,
exclusive while held, removed on release (real files and real flocks)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fleetserve_devcluster import agent, controlplane, locks


@pytest.fixture
def lock_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "locks"
    monkeypatch.setenv(locks.LOCK_DIR_ENV, str(directory))
    monkeypatch.setattr(agent, "LEGACY_NET_LOCKS", tmp_path / "legacy")
    return directory


def test_network_blocks_are_exclusive_while_held_and_leave_no_file(lock_dir: Path) -> None:
    first = agent.claim_network_block()
    second = agent.claim_network_block()
    assert (first.index, second.index) == (0, 1)
    assert (lock_dir.stat().st_mode & 0o777) == 0o700
    first.release()  # the first agent exits: its block is free again, and its lock file is gone
    assert not (lock_dir / "net-0.lock").exists()
    third = agent.claim_network_block()
    assert third.index == 0
    second.release()
    third.release()
    assert list(lock_dir.iterdir()) == []


def test_a_block_an_older_agent_holds_in_the_temporary_directory_is_skipped(lock_dir: Path, tmp_path: Path) -> None:
    import fcntl

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    with open(legacy / "0.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        block = agent.claim_network_block()
        assert block.index == 1
        block.release()


def test_a_symlink_planted_at_a_lock_path_is_neither_followed_nor_truncated(lock_dir: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    locks.private_dir(lock_dir)
    (lock_dir / "net-0.lock").symlink_to(victim)
    with pytest.raises(locks.LockDirError, match="is a symlink"):
        agent.claim_network_block()
    assert victim.read_text() == "precious"


def test_a_lock_dir_others_can_write_or_a_symlinked_one_is_refused(tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(locks.LockDirError, match="writable by other users"):
        locks.private_dir(open_dir)
    (tmp_path / "link").symlink_to(tmp_path / "open")
    with pytest.raises(locks.LockDirError, match="must be a directory"):
        locks.private_dir(tmp_path / "link")
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 65534, 65534)
        with pytest.raises(locks.LockDirError, match="belongs to uid 65534"):
            locks.private_dir(theirs)


def test_the_up_down_lock_is_not_next_to_a_state_dir_in_a_shared_directory(lock_dir: Path, tmp_path: Path) -> None:
    shared = tmp_path / "tmp"  # stands for /tmp: a state dir there must not put its lock there
    shared.mkdir()
    with controlplane._locked(shared / "cluster"):
        assert list(shared.iterdir()) == []
        assert [p.name for p in lock_dir.iterdir()] == [locks.state_lock_path(shared / "cluster").name]
    assert list(lock_dir.iterdir()) == [] and list(shared.iterdir()) == []


def test_a_removed_lock_file_never_lets_two_holders_in(lock_dir: Path) -> None:
    path = locks.private_dir(lock_dir) / "x.lock"
    first = locks.acquire(path)
    assert first is not None
    assert locks.acquire(path, blocking=False) is None
    locks.release(first, path)
    second = locks.acquire(path, blocking=False)
    assert second is not None and path.exists()
    assert locks.acquire(path, blocking=False) is None
    locks.release(second, path)
