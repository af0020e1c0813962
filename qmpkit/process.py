"""
How qmpkit starts child processes (QEMU, qemu-img, qemu-io, fio).

Every child runs in its own session, so the SIGINT that a terminal's Ctrl-C
or JupyterLab's "Interrupt Kernel" sends to the whole process group reaches
qmpkit only, and qmpkit decides when its children stop. Every child also
gets ``PR_SET_PDEATHSIG``: the kernel kills it when qmpkit dies, even by
SIGKILL, so nothing keeps writing after qmpkit is gone.
"""

from __future__ import annotations

import ctypes
import signal

__all__ = ["die_with_parent"]

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn`` for the children qmpkit starts: the kernel kills them when
    the thread that started them dies (PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
