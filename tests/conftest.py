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

TOOLS = ("qemu-storage-daemon", "qemu-img", "qemu-io", "qemu-system-x86_64", "fio")


def pytest_sessionstart(session: pytest.Session) -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise pytest.UsageError(
            f"missing {', '.join(missing)}: the tests need a real QEMU. "
            "Run `make test` (it installs qemu-system-common, qemu-system-x86, qemu-utils and fio) or "
            "apt-get install qemu-system-common qemu-system-x86 qemu-utils fio")


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



class VM:
    """A real ``qemu-system-x86_64`` (TCG, CPUs stopped with -S: no guest code
    runs, the block layer and QMP are live), its disks given with ``-drive``
    as an operator would, in a private temp dir. Stopped by its Popen handle."""

    def __init__(self, workdir: Path, disks: list[Path], *, blockdev: bool = False,
                 paused: bool = True) -> None:
        import subprocess
        self.workdir = workdir
        self.qmp = workdir / "vm-qmp.sock"
        self.qmp2 = workdir / "vm-qmp2.sock"       # the second client: qmpkit's CLI
        argv = ["qemu-system-x86_64", "-machine", "q35,accel=tcg", "-nodefaults",
                "-display", "none", *(["-S"] if paused else []),
                "-qmp", f"unix:{self.qmp},server=on,wait=off",
                "-qmp", f"unix:{self.qmp2},server=on,wait=off"]
        for i, disk in enumerate(disks):
            if blockdev:
                argv += ["-blockdev", f"driver=file,filename={disk},node-name=disk{i}-file",
                         "-blockdev", f"driver=raw,file=disk{i}-file,node-name=disk{i}",
                         "-device", f"virtio-blk-pci,drive=disk{i},id=vd{i}"]
            else:
                argv += ["-drive", f"file={disk},if=virtio,id=vd{i},format=raw"]
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=open(workdir / "vm.log", "wb"),
                                     stderr=subprocess.STDOUT, cwd=workdir)

    async def connect(self) -> Qemu:
        import asyncio
        for _ in range(200):
            if self.qmp.exists() or self.proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        assert self.proc.poll() is None, (self.workdir / "vm.log").read_text()
        return await Qemu.open(str(self.qmp))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def vm_factory(tmp_path):
    """Start VMs with ``vm_factory(disks, blockdev=False, paused=True)`` (``paused=False``:
    the CPUs run, SeaBIOS finds nothing to boot and waits); all are killed after the test."""
    vms: list[VM] = []

    def start(disks: list[Path], *, blockdev: bool = False, paused: bool = True) -> VM:
        vm = VM(tmp_path, disks, blockdev=blockdev, paused=paused)
        vms.append(vm)
        return vm

    yield start
    for vm in vms:
        vm.stop()
