"""
A QMP connection: qemu.qmp underneath, qmpkit's errors on top.

This is the one place where ``qemu.qmp`` exceptions are translated into
qmpkit's (see `qmpkit.errors`). Everything else talks to QEMU through
`Client.execute` and `Client.listener`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

from qemu.qmp import EventListener, ExecInterruptedError, ExecuteError, QMPClient, QMPError, Runstate
from qemu.qmp.events import EventFilter

from .aio import within
from .errors import ArgumentError, QemuCommandError, QmpConnectionError, QmpTimeoutError

if TYPE_CHECKING:
    from .capabilities import Capabilities

__all__ = ["Client", "parse_address", "event_matches", "DEFAULT_COMMAND_TIMEOUT"]

#: seconds a QMP command may take before `Client.execute` gives up on it. QEMU
#: answers in milliseconds; a drain under heavy I/O can take a few seconds.
DEFAULT_COMMAND_TIMEOUT = 30.0

log = logging.getLogger(__name__)

_TCP_RE = re.compile(r"^(?:\[(?P<v6>[0-9a-fA-F:.]+)\]|(?P<host>[A-Za-z0-9.-]+)):(?P<port>\d{1,5})$")


def parse_address(address: str | tuple[str, int]) -> str | tuple[str, int]:
    """Turn ``host:port``, ``[::1]:port`` or a unix socket path into a qemu.qmp address.

    :raise ArgumentError: for an empty address or a port out of range.
    """
    if isinstance(address, tuple):
        host, port = address
        if not 0 < int(port) < 65536:
            raise ArgumentError("qmp", f"port must be in [1, 65535], got {port}")
        return (str(host), int(port))
    text = str(address).strip()
    if not text:
        raise ArgumentError("qmp", "expected a unix socket path or host:port, got ''")
    if text.startswith("unix:"):
        return text[len("unix:"):]
    if text.startswith("tcp:"):
        text = text[len("tcp:"):]
    elif "/" in text:
        return text
    m = _TCP_RE.match(text)
    if not m:
        return text  # a relative socket path
    port = int(m.group("port"))
    if not 0 < port < 65536:
        raise ArgumentError("qmp", f"port must be in [1, 65535], got {port}")
    return (m.group("v6") or m.group("host"), port)


def event_matches(event: Mapping[str, Any], name: str,
                  match: Mapping[str, Any] | Callable[[Any], bool] | None) -> bool:
    """Is ``event`` the event ``name`` whose ``data`` holds every field of
    ``match`` (or for which the predicate ``match`` says True)?"""
    if event.get("event") != name:
        return False
    if match is None:
        return True
    if callable(match):
        return bool(match(event))
    data = event.get("data", {})
    return all(data.get(k) == v for k, v in match.items())


def _none(_event: Any) -> bool:
    return False


def _not_a_socket(path: str) -> str | None:
    """What ``path`` is when it exists and is not a socket ("a regular file"...)."""
    import stat
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISSOCK(mode):
        return None
    for test, kind in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a socket"


class _QMPClient(QMPClient):
    """qemu.qmp's client, logging traffic only when DEBUG is on.

    qemu.qmp's inbound and outbound hooks pretty-print every message for its
    debug log even when that log is off; under a flood of events (thousands of
    BLOCK_JOB_ERROR a second) that doubles the cost of each, and qmpkit falls
    behind QEMU. The hooks exist for subclasses to override."""

    def _cb_inbound(self, msg: Any) -> Any:
        if self.logger.isEnabledFor(logging.DEBUG):
            return super()._cb_inbound(msg)
        return msg

    def _cb_outbound(self, msg: Any) -> Any:
        if self.logger.isEnabledFor(logging.DEBUG):
            return super()._cb_outbound(msg)
        return msg


class Client:
    """One QMP session with a QEMU (system emulator or storage daemon).

    Use `Client.attach` for a QEMU that is already running::

        async with await Client.attach("/run/vm1/qmp.sock") as qmp:
            print(await qmp.execute("query-version"))
    """

    def __init__(self, *, name: str = "qmpkit",
                 command_timeout: float = DEFAULT_COMMAND_TIMEOUT) -> None:
        self._qmp = _QMPClient(name)
        # qemu.qmp keeps every event in a default listener that nobody reads (and
        # that cannot be removed): a flood of BLOCK_JOB_ERROR, thousands a second,
        # would grow it without end. It takes none.
        self._qmp.events.event_filter = _none
        self.command_timeout = command_timeout
        self._caps: Any = None
        self.address: str | tuple[str, int] | None = None
        self._lost = asyncio.Event()
        self._watch: asyncio.Task[None] | None = None
        self._closing = False

    @classmethod
    async def attach(cls, address: str | tuple[str, int], *, timeout: float = 10.0,
                     name: str = "qmpkit") -> "Client":
        """Connect to the QMP socket of a running QEMU.

        :raise ArgumentError: the address is malformed.
        :raise QmpConnectionError: nothing answers QMP there within ``timeout``.
        """
        client = cls(name=name)
        await client.connect(address, timeout=timeout)
        return client

    async def connect(self, address: str | tuple[str, int], *, timeout: float = 10.0) -> None:
        addr = parse_address(address)
        self.address = addr
        shown = addr if isinstance(addr, str) else f"{addr[0]}:{addr[1]}"
        if isinstance(addr, str):
            kind = _not_a_socket(addr)
            if kind is not None:
                raise QmpConnectionError(f"cannot connect to QMP at {shown}: it is {kind}, "
                                         "not a socket", address=addr)
        try:
            await within(self._qmp.connect(addr), timeout)
        except asyncio.TimeoutError:
            with contextlib.suppress(Exception):
                await self._qmp.disconnect()
            raise QmpConnectionError(
                f"no QMP greeting from {shown} within {timeout:g} s (QEMU serves one client "
                "per QMP socket: is another client connected to it?)", address=addr) from None
        except (QMPError, OSError) as exc:
            cause = exc.exc if hasattr(exc, "exc") else exc  # qemu.qmp's ConnectError
            raise QmpConnectionError(f"cannot connect to QMP at {shown}: {cause}",
                                     address=addr) from exc
        self._closing = False
        self._lost = asyncio.Event()
        self._watch = asyncio.get_running_loop().create_task(self._watch_runstate())
        log.debug("connected to QMP at %s", shown)

    async def _watch_runstate(self) -> None:
        while True:
            state = await self._qmp.runstate_changed()
            if state in (Runstate.DISCONNECTING, Runstate.IDLE):
                if not self._closing:
                    log.warning("QMP connection to %s lost", self.address)
                self._lost.set()
                return

    def expect_close(self) -> None:
        """The peer is about to hang up on purpose (``quit``): do not warn about it."""
        self._closing = True

    @property
    def connected(self) -> bool:
        return self._qmp.runstate == Runstate.RUNNING and not self._lost.is_set()

    @property
    def lost(self) -> asyncio.Event:
        """Set once the connection is gone (closed by us, or dropped)."""
        return self._lost

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None, *,
                      timeout: float | None = None) -> Any:
        """Run one QMP command and return its result.

        Every command has a deadline: ``timeout`` seconds, or `command_timeout`.
        A QEMU that is stopped (SIGSTOP) or hung never answers; qemu.qmp drops
        the late reply if it comes after all.

        :raise QemuCommandError: QEMU refused the command; ``desc`` is its message.
        :raise QmpTimeoutError: no answer within the deadline.
        :raise QmpConnectionError: the connection is gone, or went while waiting.
        """
        args = dict(arguments) if arguments else None
        if self._lost.is_set() or self._qmp.runstate != Runstate.RUNNING:
            raise QmpConnectionError(f"cannot run {command}: not connected to QMP",
                                     address=self.address)
        limit = self.command_timeout if timeout is None else timeout
        try:
            return await within(self._qmp.execute(command, args), limit)
        except asyncio.TimeoutError:
            raise QmpTimeoutError(command, limit, address=self.address) from None
        except ExecuteError as exc:
            raise QemuCommandError(command, args, exc.error_class, str(exc)) from exc
        except (ExecInterruptedError, QMPError, EOFError, OSError) as exc:
            raise QmpConnectionError(f"QMP connection lost during {command}: {exc}",
                                     address=self.address) from exc

    @contextlib.contextmanager
    def listener(self, names: str | Iterable[str] | None = None,
                 event_filter: EventFilter | None = None) -> Iterator[EventListener]:
        """Listen for events while the block runs (see qemu.qmp.events)."""
        with self._qmp.listener(names, event_filter) as listener:
            yield listener

    def register_listener(self, listener: EventListener) -> None:
        self._qmp.register_listener(listener)

    def remove_listener(self, listener: EventListener) -> None:
        with contextlib.suppress(Exception):
            self._qmp.remove_listener(listener)

    async def wait_event(self, name: str,
                         match: Mapping[str, Any] | Callable[[Mapping[str, Any]], bool] | None
                         = None, *, timeout: float = 30.0) -> dict[str, Any]:
        """Wait for the next event ``name`` (from now on) whose ``data`` holds
        ``match`` (a dict of fields, or a predicate on the event). To catch an
        event that a command triggers, use `listener` around the command instead.

        :raise QmpTimeoutError: no such event within ``timeout`` seconds.
        :raise QmpConnectionError: the connection went while waiting.
        """
        def wanted(ev: Mapping[str, Any]) -> bool:
            return event_matches(ev, name, match)

        async def first() -> dict[str, Any]:
            with self.listener(name) as listener:
                async for ev in listener:
                    if wanted(ev):
                        return dict(ev)
            raise QmpConnectionError(f"QMP connection lost while waiting for {name}",
                                     address=self.address)

        getter = asyncio.ensure_future(first())
        lost = asyncio.ensure_future(self._lost.wait())
        try:
            done, _ = await asyncio.wait({getter, lost}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                return getter.result()
            if lost in done:
                raise QmpConnectionError(f"QMP connection lost while waiting for {name}",
                                         address=self.address)
            raise QmpTimeoutError(name, timeout, address=self.address,
                                  message=f"no {name} event within {timeout:g} s")
        finally:
            for t in (getter, lost):
                t.cancel()
            await asyncio.gather(getter, lost, return_exceptions=True)

    async def capabilities(self) -> "Capabilities":
        """What this QEMU can do (`qmpkit.capabilities`), read once per connection."""
        if self._caps is None:
            from .capabilities import Capabilities
            self._caps = Capabilities.from_qmp(await self.execute("query-version"),
                                               await self.execute("query-qmp-schema"))
        return self._caps

    async def version(self) -> tuple[int, int, int]:
        v = (await self.execute("query-version"))["qemu"]
        return (v["major"], v["minor"], v["micro"])

    async def close(self, *, timeout: float = 5.0) -> None:
        """Disconnect. Safe to call twice, and after QEMU went away (or hung)."""
        self._closing = True
        try:
            await within(self._qmp.disconnect(), timeout)
        except asyncio.TimeoutError:
            log.debug("QMP disconnect did not finish within %g s", timeout)
        except (EOFError, OSError, QMPError) as exc:
            # QEMU hung up first (quit, or killed): expected at shutdown.
            log.debug("QMP disconnect: %r", exc)
        self._lost.set()
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
