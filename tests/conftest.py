"""Shared fixtures: a real qemu-storage-daemon per test, and a leak check.

CI installs QEMU; a missing qemu-storage-daemon fails the run, it is never
skipped.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from qmpkit import Qemu

TOOLS = ("qemu-storage-daemon", "qemu-img", "qemu-io")


def pytest_sessionstart(session: pytest.Session) -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise pytest.UsageError(
            f"missing {', '.join(missing)}: the tests need a real QEMU. "
            "Run `make test` (it installs qemu-system-common and qemu-utils) or "
            "apt-get install qemu-system-common qemu-utils fio")


def _children() -> list[tuple[int, str]]:
    """Live (non-zombie) child processes of this pytest process."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after ')'
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
        if int(ppid) == me and state != "Z":
            found.append((int(entry), comm))
    return found


@pytest.fixture(autouse=True)
def no_process_left_behind():
    """Every test must stop what it started: fail it if a child still runs."""
    before = {pid for pid, _ in _children()}
    yield
    left = [(pid, comm) for pid, comm in _children() if pid not in before]
    for pid, _ in left:  # stop them by PID so one leak does not cascade
        os.kill(pid, signal.SIGKILL)
    assert not left, f"test left processes running: {left}"


@pytest.fixture
async def qemu(tmp_path):
    """An embedded qemu-storage-daemon; stopped (and checked gone) after the test."""
    q = await Qemu.open(workdir=tmp_path, spare_monitors=1)
    yield q
    await q.close()
    assert q.daemon.returncode is not None, "the daemon outlived its test"

