"""A model cache shared by replicas (modelCache.persistentVolumeClaim): one process fills an entry,
the others wait on its lock file and then use what it wrote, without converting again."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

from fleetserve_server.runner.builtin import convert_gguf, fill_lock


def _convert(gguf: str, target: str, done: str) -> None:
    # A real conversion of this fake GGUF would fail: returning at all proves it found the cache filled.
    Path(done).write_text(str(convert_gguf(Path(gguf), Path(target), progress=False)))


def test_a_second_process_waits_for_the_filler_then_reuses_its_result(tmp_path: Path) -> None:
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"not a gguf")
    target = tmp_path / "cache" / "models" / "m-c1"
    done = tmp_path / "done"
    with fill_lock(target):  # this test is the filler
        waiter = multiprocessing.get_context("spawn").Process(target=_convert, args=(str(gguf), str(target), str(done)))
        waiter.start()
        time.sleep(1.0)  # give it every chance to run ahead: it must be blocked on the lock
        assert not done.exists() and waiter.is_alive(), "the second process did not wait for the filler"
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
    waiter.join(30)
    assert waiter.exitcode == 0
    assert done.read_text() == str(target)
    assert (target.parent / ".m-c1.lock").exists()


def test_a_dead_filler_never_blocks_the_next_one(tmp_path: Path) -> None:
    target = tmp_path / "models" / "m"
    ctx = multiprocessing.get_context("spawn")
    holder = ctx.Process(target=_hold_forever, args=(str(target),))
    holder.start()
    time.sleep(1.0)
    holder.kill()
    holder.join(10)
    with fill_lock(target):  # the kernel released the dead holder's flock
        pass


def _hold_forever(target: str) -> None:
    with fill_lock(Path(target)):
        time.sleep(3600)
