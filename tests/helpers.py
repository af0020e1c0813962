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


QMPKIT_BIN = os.path.join(os.path.dirname(__import__("sys").executable), "qmpkit")


async def run_cli(*args: str, timeout: float = 120, env: dict | None = None
                  ) -> tuple[int, str, str]:
    """Run the ``qmpkit`` command as a user would; (exit code, stdout, stderr)."""
    import asyncio
    proc = await asyncio.create_subprocess_exec(
        QMPKIT_BIN, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL, env=env)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode, out.decode(), err.decode()


async def qemu_io(*args: str) -> str:
    """Run qemu-io (for guest-like writes through an NBD URI); its output."""
    import asyncio
    proc = await asyncio.create_subprocess_exec(
        "qemu-io", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out.decode()
    return out.decode()
