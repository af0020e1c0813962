"""
How qmpkit starts child processes (QEMU, qemu-img, qemu-io, fio).

Every child runs in its own session, so the SIGINT that a terminal's Ctrl-C
or JupyterLab's "Interrupt Kernel" sends to the whole process group reaches
qmpkit only, and qmpkit decides when its children stop. Every child also
gets ``PR_SET_PDEATHSIG``: the kernel kills it when qmpkit dies, even by
SIGKILL, so nothing keeps writing after qmpkit is gone.

qmpkit's temp dirs name their owner (PID and start time): a dir left by a
process that was killed is removed by the next qmpkit that starts a QEMU.
"""

from __future__ import annotations

import ctypes
import os
import signal
from pathlib import Path

__all__ = ["die_with_parent", "mark_owner", "remove_stale_dirs", "OWNER_FILE"]

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn`` for the children qmpkit starts: the kernel kills them when
    the thread that started them dies (PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


#: the file in each of qmpkit's temp dirs that names the process owning it
OWNER_FILE = ".qmpkit-owner"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot, or None if it is gone:
    with the PID it names one process, even after PIDs wrap around."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[19] if fields[0] != "Z" else None


def mark_owner(folder: os.PathLike[str] | str) -> None:
    """Say in ``folder`` that this process owns it (see `remove_stale_dirs`)."""
    pid = os.getpid()
    Path(folder, OWNER_FILE).write_text(f"{pid} {_start_time(pid)}\n")


def remove_stale_dirs(base: os.PathLike[str] | str | None = None,
                      prefix: str = "qmpkit-") -> list[Path]:
    """Remove qmpkit's temp dirs whose owner process is dead (killed by SIGKILL, a
    kernel restart in JupyterLab...). A live owner's dir, a dir without an owner
    file, and another user's dir are never touched. Returns what was removed."""
    import shutil
    import tempfile
    removed = []
    root = Path(base) if base is not None else Path(tempfile.gettempdir())
    try:
        entries = list(root.iterdir())
    except OSError:
        return removed
    for d in entries:
        if not d.name.startswith(prefix) or d.is_symlink() or not d.is_dir():
            continue
        try:
            if d.stat().st_uid != os.getuid():
                continue
            pid_text, _, start = (d / OWNER_FILE).read_text().strip().partition(" ")
            pid = int(pid_text)
        except (OSError, ValueError):
            continue
        if _start_time(pid) == start:
            continue                      # the owner still runs
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed
