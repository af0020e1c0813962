"""
The embedded QEMU: a ``qemu-storage-daemon`` in a private temp dir.

The daemon owns its directory (mode 0700), its QMP socket and its log. A
failed start raises `QemuStartError` with the command line and QEMU's own
output. `StorageDaemon.stop` sends ``quit``, then kills the process by its
handle if it does not exit; it is safe to call twice, and a finalizer kills
the process if the object is dropped without being stopped.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import shutil
import subprocess
import tempfile
import weakref
from pathlib import Path
from typing import Sequence

from .aio import within
from .client import Client
from .errors import QemuStartError, QmpConnectionError, QmpkitError
from .process import die_with_parent, mark_owner, remove_stale_dirs

__all__ = ["StorageDaemon", "DaemonState"]

log = logging.getLogger(__name__)

DEFAULT_BINARY = "qemu-storage-daemon"


def _opt(value: str) -> str:
    """Escape a value inside a QEMU ``key=value,...`` option (commas double)."""
    return value.replace(",", ",,")


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


class DaemonState(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    STOPPED = "stopped"


class StorageDaemon:
    """A ``qemu-storage-daemon`` with a QMP socket, driven over qemu.qmp.

    ::

        async with StorageDaemon() as qsd:
            await qsd.client.execute("query-version")

    :param binary: the daemon to run (name on PATH, or a path).
    :param extra_args: more command-line arguments for the daemon.
    :param base_dir: where to make the private temp dir (default: the system's).
    :param keep_workdir: leave the temp dir (images, log) in place after stop.
    :param spare_monitors: more QMP sockets (`monitor_path` 1, 2, ...) for other
        clients, such as the ``qmpkit`` command: QEMU serves one client per socket.
    """

    def __init__(self, *, binary: str = DEFAULT_BINARY, extra_args: Sequence[str] = (),
                 base_dir: str | os.PathLike[str] | None = None,
                 keep_workdir: bool = False, spare_monitors: int = 0) -> None:
        self.binary = binary
        self.spare_monitors = spare_monitors
        self.extra_args = list(extra_args)
        self.base_dir = base_dir
        self.keep_workdir = keep_workdir
        self.state = DaemonState.IDLE
        self.workdir: Path | None = None
        self.client: Client | None = None
        self.argv: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def qmp_path(self) -> Path:
        assert self.workdir is not None, "daemon not started"
        return self.workdir / "qmp.sock"

    def monitor_path(self, index: int) -> Path:
        """The QMP socket of spare monitor ``index`` (1 .. spare_monitors)."""
        assert self.workdir is not None, "daemon not started"
        if not 1 <= index <= self.spare_monitors:
            raise IndexError(f"spare monitor {index} does not exist "
                             f"(spare_monitors={self.spare_monitors})")
        return self.workdir / f"qmp-{index}.sock"

    @property
    def pid_path(self) -> Path:
        assert self.workdir is not None, "daemon not started"
        return self.workdir / "qsd.pid"

    @property
    def log_path(self) -> Path:
        assert self.workdir is not None, "daemon not started"
        return self.workdir / "qemu.log"

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    def output(self) -> str:
        """What the daemon printed so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except (OSError, AssertionError):
            return ""

    async def start(self, *, timeout: float = 15.0) -> Client:
        """Launch the daemon and connect to its QMP socket.

        :raise QemuStartError: the binary is missing, the daemon exited, or its
            socket did not answer within ``timeout`` (the process is then killed).
        """
        if self.state is not DaemonState.IDLE:
            raise QmpkitError(f"daemon already {self.state.value}")
        for stale in remove_stale_dirs(self.base_dir):
            log.info("removed %s, left by a qmpkit that was killed", stale)
        self.workdir = Path(tempfile.mkdtemp(prefix="qmpkit-", dir=self.base_dir))
        os.chmod(self.workdir, 0o700)
        mark_owner(self.workdir)
        paths = [self.qmp_path] + [self.monitor_path(i)
                                   for i in range(1, self.spare_monitors + 1)]
        self.argv = [self.binary, "--pidfile", str(self.pid_path)]
        for i, path in enumerate(paths):
            self.argv += ["--chardev", f"socket,id=qmp{i},path={_opt(str(path))},server=on,"
                                       "wait=off", "--monitor", f"chardev=qmp{i}"]
        self.argv += self.extra_args
        log.info("starting %s", " ".join(self.argv))
        try:
            with open(self.log_path, "wb") as logf:
                self._proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=logf,
                                              stderr=subprocess.STDOUT, cwd=self.workdir,
                                              preexec_fn=die_with_parent,
                                              start_new_session=True)
        except OSError as exc:
            self._cleanup_dir()
            self.state = DaemonState.STOPPED
            raise QemuStartError(f"cannot run {self.binary}: {exc.strerror}. Install it "
                                 "(Debian: apt-get install qemu-system-common)",
                                 argv=self.argv, output="", returncode=None) from exc
        self._finalizer = weakref.finalize(self, _kill, self._proc)
        self.state = DaemonState.RUNNING
        try:
            self.client = await self._connect(timeout)
        except BaseException:
            await self.stop()
            raise
        return self.client

    async def _connect(self, timeout: float) -> Client:
        assert self._proc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # qemu-storage-daemon writes its pid file once its monitors exist and
        # before it accepts connections (a documented order). Connecting
        # earlier races the monitor's set-up and can miss the greeting.
        while not self._pidfile_written():
            if self._proc.poll() is not None:
                raise QemuStartError("qemu-storage-daemon exited during start-up",
                                     argv=self.argv, output=self.output(),
                                     returncode=self._proc.returncode)
            if loop.time() > deadline:
                raise QemuStartError(f"not ready after {timeout:g} s (no pid file)",
                                     argv=self.argv, output=self.output(), returncode=None)
            await asyncio.sleep(0.005)
        try:
            return await Client.attach(str(self.qmp_path),
                                       timeout=max(1.0, deadline - loop.time()))
        except QmpConnectionError as exc:
            raise QemuStartError(f"QMP did not answer: {exc}", argv=self.argv,
                                 output=self.output(), returncode=self._proc.poll()) from exc

    def _pidfile_written(self) -> bool:
        try:
            return self.pid_path.read_text().strip() == str(self._proc.pid if self._proc else "")
        except OSError:
            return False

    async def stop(self, *, timeout: float = 10.0) -> int | None:
        """Quit gracefully, then kill. Returns the exit code. Safe to call twice.

        A daemon that does not answer ``quit`` within 3 s (stopped, hung) is killed
        at once: SIGKILL works on a stopped process too."""
        if self.state is DaemonState.STOPPED:
            return self.returncode
        self.state = DaemonState.STOPPED
        proc = self._proc
        try:
            if self.client is not None and proc is not None and proc.poll() is None:
                try:
                    self.client.expect_close()
                    await self.client.execute("quit", timeout=min(timeout, 3.0))
                except QmpkitError as exc:
                    log.info("quit failed, the daemon will be killed: %s", exc)
                    proc.kill()
            if self.client is not None:
                await self.client.close()
            elif proc is not None and proc.poll() is None:
                # stopped while starting (no QMP yet, so no quit): SIGTERM is the
                # daemon's own graceful exit, not a 10 s wait for a quit never sent
                proc.terminate()
                timeout = min(timeout, 3.0)
            if proc is not None:
                try:
                    await within(asyncio.to_thread(proc.wait), timeout)
                except asyncio.TimeoutError:
                    log.warning("qemu-storage-daemon (pid %d) ignored quit; killing it", proc.pid)
                    proc.kill()
                    await asyncio.to_thread(proc.wait)
        finally:
            if proc is not None and proc.poll() is None:  # cancelled part-way: still no leak
                _kill(proc)
            if self._finalizer is not None:
                self._finalizer.detach()
            self._cleanup_dir()
        return proc.returncode if proc else None

    def kill(self) -> None:
        """Kill the daemon at once by its PID (no quit). `stop` still cleans up."""
        if self._proc is not None:
            _kill(self._proc)

    def _cleanup_dir(self) -> None:
        if self.workdir is not None and not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    async def __aenter__(self) -> "StorageDaemon":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def __repr__(self) -> str:
        return f"<StorageDaemon pid={self.pid} state={self.state.value} dir={self.workdir}>"
