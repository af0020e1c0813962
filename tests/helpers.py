"""Small helpers for the tests (imported as `helpers`)."""

from __future__ import annotations

import hashlib
import os
import socket


def sha256(path: os.PathLike[str] | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def progress(job) -> int:
    info = await job.info()
    assert info is not None, f"job {job.job_id} is gone"
    return info["current-progress"]


def stop_pid(pid: int, timeout: float = 10.0) -> None:
    """Stop a process that is not our child (e.g. a --daemonize'd QEMU) by its PID,
    waiting on a pidfd for it to go: SIGTERM first, SIGKILL after ``timeout``."""
    import select
    import signal
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        os.kill(pid, signal.SIGTERM)
        if not select.select([fd], [], [], timeout)[0]:
            os.kill(pid, signal.SIGKILL)
            select.select([fd], [], [], timeout)
    finally:
        os.close(fd)


def running(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its parent does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"
