"""
libvirt-managed VMs: mirror through libvirt's API, sample through its passthrough.

A QEMU that libvirt manages must be driven through libvirt, never behind its
back: a mirror started on a second QMP socket is invisible to libvirt, and after
an outside pivot libvirt's XML names a file the guest no longer writes (issue
#18). So here all control goes through libvirt's API (``virDomainBlockCopy``,
``blockJobSetSpeed``, ``blockJobAbort``, ``blockJobInfo`` and the
``BLOCK_JOB_2`` events), and sampling uses read-only passthrough queries
(``virDomainQemuMonitorCommand``), or only ``blockJobInfo`` with
``passthrough=False``, which avoids the domain's ``custom-monitor`` taint::

    dom = await LibvirtDomain.open("qemu:///system", "vm1")
    async with LibvirtSampler(dom, "vda", hz=10) as rec:
        await dom.block_copy("vda", "/var/lib/libvirt/images/vm1-new.qcow2",
                             granularity="4K", buf_size="1M")
        await dom.wait_ready("vda", timeout=600)
        await dom.complete("vda")              # pivot: the XML names the new file
    rec.trace().save("out/vm1")
    await dom.close()

What differs from a raw ``blockdev-mirror``: the job always covers the disk's
whole virtual size; the target is created by libvirt (qcow2, 64 KiB clusters)
unless ``reuse_ext``; ``filter-node-name``, ``target-is-zero`` and error policies
other than QEMU's default (``report``) cannot be passed, and are refused before
anything starts. ``blockJobInfo`` reports ``cur = end - 1`` until READY and its
bandwidth in MiB/s (here asked in bytes/s). libvirt renames the disk's nodes
after each copy (``libvirt-N-format``), so the sampler finds them again from
the job's id (``copy-vda-libvirt-N-format``).

``libvirt-python`` is optional (``pip install qmpkit[libvirt]``) and imported
only when a function here needs it. Each libvirt call runs in a worker thread
(they take about a millisecond); libvirt's events are dispatched by one daemon
thread running libvirt's default event loop, registered once per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping
from xml.etree import ElementTree
from xml.sax.saxutils import quoteattr

from .aio import ticks, within
from .analysis import rate, summarize
from .errors import ArgumentError, JobFailedError, JobTimeoutError, QmpkitError
from .trace import SPEED_EVENT, Sample, Trace
from .units import parse_rate, parse_size

__all__ = ["LibvirtDomain", "LibvirtDisk", "LibvirtSampler", "LibvirtError",
           "block_copy_arguments", "managed_by_libvirt", "READ_ONLY_COMMANDS"]

log = logging.getLogger(__name__)

#: the passthrough commands qmpkit sends: all read-only
READ_ONLY_COMMANDS = frozenset({"query-block-jobs", "query-named-block-nodes", "query-block",
                                "query-jobs", "query-version"})

# libvirt's ABI constants, so that the pure builder needs no libvirt import
_COPY_SHALLOW, _COPY_REUSE_EXT, _COPY_TRANSIENT_JOB, _COPY_SYNCHRONOUS_WRITES = 1, 2, 4, 8
_PARAM_BANDWIDTH, _PARAM_GRANULARITY, _PARAM_BUF_SIZE = "bandwidth", "granularity", "buf-size"
# virConnectDomainEventBlockJobStatus -> the QMP event a trace keeps
_JOB_EVENTS = {0: ("BLOCK_JOB_COMPLETED", "completed"), 1: ("BLOCK_JOB_COMPLETED", "failed"),
               2: ("BLOCK_JOB_CANCELLED", "cancelled"), 3: ("BLOCK_JOB_READY", "ready")}
#: the error policy libvirt's blockdev-mirror leaves to QEMU's default
LIBVIRT_ERROR_POLICY = "report"
INSTALL_HINT = "pip install qmpkit[libvirt]"


class LibvirtError(QmpkitError):
    """libvirt refused or failed a call. ``message`` is libvirt's, word for word.

    ``call`` is the API (``blockCopy``...), ``code`` libvirt's error number."""

    def __init__(self, call: str, message: str, *, code: int | None = None) -> None:
        self.call = call
        self.code = code
        self.message = message
        super().__init__(f"libvirt refused {call}: {message}")


def _libvirt() -> Any:
    """The ``libvirt`` module, imported on first use.

    :raise QmpkitError: libvirt-python is not installed.
    """
    try:
        import libvirt
    except ImportError as exc:
        raise QmpkitError("the libvirt backend needs libvirt-python: "
                          f"{INSTALL_HINT} (it builds against libvirt-dev and pkg-config)"
                          ) from exc
    return libvirt


def _libvirt_qemu() -> Any:
    _libvirt()
    import libvirt_qemu
    return libvirt_qemu


# -- the pure part: what a copy sends -----------------------------------------

def block_copy_arguments(dest_path: str, *, granularity: int | str | None = None,
                         buf_size: int | str | None = None,
                         bandwidth: int | str | None = None,
                         copy_mode: str = "background", shallow: bool = False,
                         reuse_ext: bool = False, dest_format: str = "qcow2",
                         sync: str = "full", **qmp_options: Any,
                         ) -> tuple[str, dict[str, int], int]:
    """``(destxml, params, flags)`` for ``virDomain.blockCopy``. Does no I/O.

    ``bandwidth`` is in bytes/s (libvirt's BANDWIDTH parameter of blockCopy is
    bytes/s). ``sync="top"`` is libvirt's SHALLOW. ``qmp_options`` takes the
    other ``blockdev-mirror`` arguments by their QMP names (``filter-node-name``
    or ``filter_node_name``) only to refuse those libvirt cannot pass.

    :raise ArgumentError: an argument is invalid, or libvirt cannot pass it.
    """
    for key, value in qmp_options.items():
        name = key.replace("_", "-")
        if name in ("on-source-error", "on-target-error"):
            if value is None or value == LIBVIRT_ERROR_POLICY:
                continue
            raise ArgumentError(name, f"libvirt cannot pass {value!r}: its blockdev-mirror "
                                      f"leaves QEMU's default policy ({LIBVIRT_ERROR_POLICY!r})")
        if value is None or value is False:
            continue
        if name == "filter-node-name":
            raise ArgumentError(name, "libvirt cannot pass it: libvirt names the nodes itself "
                                      "(libvirt-N-format) and gives the mirror filter none")
        if name == "target-is-zero":
            raise ArgumentError(name, "libvirt cannot pass it: blockCopy sets no target-is-zero")
        raise ArgumentError(name, "libvirt's blockCopy has no such parameter")
    if sync not in ("full", "top"):
        raise ArgumentError("sync", f"libvirt cannot pass sync={sync!r}: blockCopy copies "
                                    "'full', or 'top' with shallow")
    if copy_mode not in ("background", "write-blocking"):
        raise ArgumentError("copy_mode", f"expected 'background' or 'write-blocking', "
                                         f"got {copy_mode!r}")
    if dest_format not in ("qcow2", "raw"):
        raise ArgumentError("dest_format", f"expected 'qcow2' or 'raw', got {dest_format!r}")
    if not dest_path or not os.path.isabs(dest_path):
        raise ArgumentError("dest_path", f"libvirt needs an absolute path, got {dest_path!r}")
    params: dict[str, int] = {}
    if granularity is not None:
        g = parse_size(granularity, name="granularity")
        if g & (g - 1) or not 512 <= g <= 64 << 20:
            raise ArgumentError("granularity", f"expects a power of 2 in [512B, 64MB], got {g}")
        params[_PARAM_GRANULARITY] = g
    if buf_size is not None:
        params[_PARAM_BUF_SIZE] = parse_size(buf_size, name="buf_size")
    if bandwidth is not None:
        params[_PARAM_BANDWIDTH] = parse_rate(bandwidth, name="bandwidth")
    # persistent domains refuse a copy unless the job is transient (libvirt 9)
    flags = _COPY_TRANSIENT_JOB
    if shallow or sync == "top":
        flags |= _COPY_SHALLOW
    if reuse_ext:
        flags |= _COPY_REUSE_EXT
    if copy_mode == "write-blocking":
        flags |= _COPY_SYNCHRONOUS_WRITES
    destxml = (f"<disk type='file'><source file={quoteattr(dest_path)}/>"
               f"<driver type='{dest_format}'/></disk>")
    return destxml, params, flags


# -- libvirt's event loop: one daemon thread per process -----------------------

_loop_lock = threading.Lock()
_loop_thread: threading.Thread | None = None


def _ensure_event_loop() -> None:
    """Register libvirt's default event implementation and run it in a daemon
    thread, once. It must happen before a connection opens, or that
    connection delivers no events."""
    global _loop_thread
    with _loop_lock:
        if _loop_thread is not None:
            return
        lv = _libvirt()
        lv.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                if lv.virEventRunDefaultImpl() < 0:
                    log.warning("libvirt event loop iteration failed")
                    time.sleep(0.1)

        _loop_thread = threading.Thread(target=run, name="qmpkit-libvirt-events", daemon=True)
        _loop_thread.start()


async def _call(name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Run one blocking libvirt call in a worker thread; libvirt's errors become
    `LibvirtError` here, once."""
    lv = _libvirt()
    try:
        return await asyncio.to_thread(fn, *args)
    except lv.libvirtError as exc:
        raise LibvirtError(name, exc.get_error_message() or str(exc),
                           code=exc.get_error_code()) from exc


@dataclass(frozen=True)
class LibvirtDisk:
    """One disk of a domain: ``target`` (``vda``), its ``source`` file, its
    ``format``, and its current format node in QEMU (``libvirt-2-format``; None
    when unknown)."""

    target: str
    source: str | None
    format: str | None
    node_name: str | None
    alias: str | None = None


class LibvirtDomain:
    """One libvirt domain, opened by ``(uri, name)``, and its block jobs.

    Every method is a coroutine; each libvirt call runs in a worker thread.
    ``events`` holds the domain's ``BLOCK_JOB_2`` events as they arrived
    (``disk``, ``event``, ``status``, ``received`` on the monotonic clock).
    """

    def __init__(self, conn: Any, dom: Any, *, uri: str, name: str) -> None:
        self.conn = conn
        self.dom = dom
        self.uri = uri
        self.name = name
        self.events: list[dict[str, Any]] = []
        self.copy_started: dict[str, float] = {}     # disk -> monotonic time of blockCopy
        self.speed_changes: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._callback_id: int | None = None
        self._closed = False

    @classmethod
    async def open(cls, uri: str, domain: str, *, timeout: float = 30.0) -> "LibvirtDomain":
        """Connect to libvirt at ``uri`` and find ``domain`` (a name).

        :raise QmpkitError: libvirt-python is missing (with how to install it).
        :raise LibvirtError: no daemon at ``uri``, or no such domain.
        :raise TimeoutError: libvirt did not answer within ``timeout``.
        """
        lv = _libvirt()
        _ensure_event_loop()
        conn = await within(_call("open", lv.open, uri), timeout)
        try:
            dom = await within(_call("lookupByName", conn.lookupByName, domain),
                                         timeout)
            with contextlib.suppress(lv.libvirtError):
                conn.setKeepAlive(5, 3)          # a dead daemon is noticed in ~20 s
            self = cls(conn, dom, uri=uri, name=domain)
            self._callback_id = conn.domainEventRegisterAny(
                dom, lv.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, self._on_block_job, None)
        except BaseException:
            with contextlib.suppress(Exception):
                conn.close()
            raise
        return self

    # -- events ---------------------------------------------------------------

    def _on_block_job(self, _conn: Any, _dom: Any, disk: str, job_type: int, status: int,
                      _opaque: Any) -> None:
        # libvirt's event thread
        event, word = _JOB_EVENTS.get(status, ("BLOCK_JOB_2", str(status)))
        with self._lock:
            self.events.append({"disk": disk, "event": event, "status": word,
                                "type": job_type, "received": time.monotonic(),
                                "timestamp": time.time()})
            waiters = list(self._waiters)
        log.debug("<-- BLOCK_JOB_2 %s %s %s", self.name, disk, word)
        for loop, ev in waiters:
            with contextlib.suppress(RuntimeError):      # that loop has closed
                loop.call_soon_threadsafe(ev.set)

    def job_events(self, disk: str, *, since: float | None = None) -> list[dict[str, Any]]:
        """The ``BLOCK_JOB_2`` events of ``disk`` (from ``since``, monotonic)."""
        with self._lock:
            return [e for e in self.events if e["disk"] == disk
                    and (since is None or e["received"] >= since)]

    # -- what the domain has --------------------------------------------------

    async def xml(self) -> str:
        """The domain's live XML (``XMLDesc``)."""
        return str(await _call("XMLDesc", self.dom.XMLDesc, 0))

    async def disks(self) -> list[LibvirtDisk]:
        """The domain's disks, each with its current format node (found through the
        passthrough ``query-block`` when the domain runs; None otherwise)."""
        root = ElementTree.fromstring(await self.xml())
        found = []
        for d in root.iter("disk"):
            target = d.find("target")
            if target is None or d.get("device", "disk") not in ("disk", "lun"):
                continue
            src, drv, alias = d.find("source"), d.find("driver"), d.find("alias")
            found.append(LibvirtDisk(
                target=target.get("dev", ""),
                source=(src.get("file") or src.get("dev") or src.get("name"))
                if src is not None else None,
                format=drv.get("type") if drv is not None else None, node_name=None,
                alias=alias.get("name") if alias is not None else None))
        if not found or not await self.active():
            return found
        nodes = await self.current_nodes()
        return [replace(d, node_name=nodes.get(d.alias or "")) for d in found]

    async def current_nodes(self) -> dict[str, str]:
        """Device alias (``virtio-disk0``) -> its current format node, from the
        passthrough ``query-block`` (libvirt renames nodes after each copy)."""
        out = {}
        for b in await self.monitor("query-block"):
            qdev, node = b.get("qdev", ""), (b.get("inserted") or {}).get("node-name")
            m = re.match(r"^/machine/peripheral/([^/]+)", qdev)
            if m and node:
                out[m.group(1)] = node
        return out

    async def active(self) -> bool:
        return bool(await _call("isActive", self.dom.isActive))

    async def taints(self) -> list[str]:
        """libvirt's taint messages for the running domain (``virDomainGetMessages``)."""
        lv = _libvirt()
        return list(await _call("messages", self.dom.messages,
                                lv.VIR_DOMAIN_MESSAGE_TAINTING))

    async def monitor(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """One read-only QMP command through libvirt's passthrough. The first one
        per domain run taints the domain ``custom-monitor``.

        :raise ArgumentError: ``command`` is not in `READ_ONLY_COMMANDS`.
        :raise LibvirtError: libvirt or QEMU refused it.
        """
        if command not in READ_ONLY_COMMANDS:
            raise ArgumentError("command", f"{command!r} is not a read-only query: state "
                                           "changes go through libvirt's API, never behind it")
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = dict(arguments)
        lq = _libvirt_qemu()
        log.debug("--> %s", msg)
        reply = json.loads(await _call(command, lq.qemuMonitorCommand, self.dom,
                                       json.dumps(msg), 0))
        if "error" in reply:
            raise LibvirtError(command, reply["error"].get("desc", str(reply["error"])))
        return reply["return"]

    # -- the job --------------------------------------------------------------

    async def block_copy(self, disk: str, dest_path: str, *,
                         granularity: int | str | None = None,
                         buf_size: int | str | None = None,
                         bandwidth: int | str | None = None,
                         copy_mode: str = "background", shallow: bool = False,
                         reuse_ext: bool = False, dest_format: str = "qcow2",
                         **qmp_options: Any) -> dict[str, Any]:
        """Start a mirror of ``disk`` to ``dest_path`` (``virDomainBlockCopy``).

        Returns what was sent (``params``, ``flags``, ``destxml``). See
        `block_copy_arguments` for the arguments and what is refused.

        :raise ArgumentError: before anything starts.
        :raise LibvirtError: libvirt refused the copy.
        """
        destxml, params, flags = block_copy_arguments(
            dest_path, granularity=granularity, buf_size=buf_size, bandwidth=bandwidth,
            copy_mode=copy_mode, shallow=shallow, reuse_ext=reuse_ext,
            dest_format=dest_format, **qmp_options)
        started = time.monotonic()
        log.debug("--> blockCopy %s %s %s flags=%#x", disk, destxml, params, flags)
        await _call("blockCopy", self.dom.blockCopy, disk, destxml, params, flags)
        self.copy_started[disk] = started
        return {"disk": disk, "destxml": destxml, "params": params, "flags": flags}

    async def set_speed(self, disk: str, bytes_per_s: int | str) -> None:
        """Set the job's speed limit, in bytes/s (0 = none). libvirt's default
        unit is MiB/s: the BYTES flag is always given."""
        lv = _libvirt()
        speed = parse_rate(bytes_per_s, name="bytes_per_s")
        await _call("blockJobSetSpeed", self.dom.blockJobSetSpeed, disk, speed,
                    lv.VIR_DOMAIN_BLOCK_JOB_SPEED_BANDWIDTH_BYTES)
        with self._lock:
            self.speed_changes.append({"disk": disk, "speed": speed,
                                       "received": time.monotonic()})

    async def job_info(self, disk: str) -> dict[str, int] | None:
        """``blockJobInfo`` as ``{type, bandwidth (bytes/s), cur, end}``, or None
        when ``disk`` has no job. libvirt reports ``cur = end - 1`` until READY."""
        lv = _libvirt()
        info = await _call("blockJobInfo", self.dom.blockJobInfo, disk,
                           lv.VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES)
        return dict(info) if info else None

    async def complete(self, disk: str) -> None:
        """Pivot to the copy (``blockJobAbort`` with PIVOT); libvirt's XML then
        names the new file. Refused by libvirt before READY."""
        lv = _libvirt()
        await _call("blockJobAbort", self.dom.blockJobAbort, disk,
                    lv.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)

    async def cancel(self, disk: str) -> None:
        """End the job without a pivot (``blockJobAbort``): the domain stays on its
        source, and the XML keeps it."""
        await _call("blockJobAbort", self.dom.blockJobAbort, disk, 0)

    async def wait_ready(self, disk: str, *, timeout: float, poll_s: float = 1.0) -> None:
        """Wait for the job on ``disk`` to be READY: on its ``BLOCK_JOB_2`` event,
        or, should the event be lost, on ``blockJobInfo`` (``cur == end``),
        which is read every ``poll_s``.

        :raise JobFailedError: the job failed, was cancelled, or is gone.
        :raise JobTimeoutError: not READY within ``timeout``.
        """
        since = self.copy_started.get(disk)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        wake = asyncio.Event()
        entry = (loop, wake)
        job_id = f"{self.name}/{disk}"
        with self._lock:
            self._waiters.append(entry)
        last = "running"
        try:
            while True:
                wake.clear()
                for e in self.job_events(disk, since=since):
                    if e["status"] == "ready":
                        return
                    raise JobFailedError(f"libvirt reported the job {e['status']}",
                                         job_id=job_id, last_status=e["status"])
                info = await self.job_info(disk)
                if info is None:
                    # it may have ended between the two looks: its event says how
                    if not self.job_events(disk, since=since):
                        raise JobFailedError("the job is gone", job_id=job_id,
                                             last_status=last)
                    continue
                if info["end"] > 0 and info["cur"] == info["end"]:
                    return
                left = deadline - loop.time()
                if left <= 0:
                    raise JobTimeoutError(job_id=job_id, last_status=last,
                                          waiting_for="be ready", timeout=timeout)
                with contextlib.suppress(asyncio.TimeoutError):
                    await within(wake.wait(), min(poll_s, left))
        finally:
            with self._lock:
                self._waiters.remove(entry)

    async def wait_ended(self, disk: str, *, timeout: float, poll_s: float = 0.2) -> None:
        """Wait until ``disk`` has no block job (after `complete` or `cancel`).

        :raise JobTimeoutError: it still has one after ``timeout``.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while await self.job_info(disk) is not None:
            if loop.time() >= deadline:
                raise JobTimeoutError(job_id=f"{self.name}/{disk}", last_status=None,
                                      waiting_for="end", timeout=timeout)
            await asyncio.sleep(poll_s)

    async def close(self) -> None:
        """Drop the event callback and the connection. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        lv = _libvirt()
        if self._callback_id is not None:
            with contextlib.suppress(lv.libvirtError):
                await asyncio.to_thread(self.conn.domainEventDeregisterAny, self._callback_id)
        with contextlib.suppress(lv.libvirtError):
            await asyncio.to_thread(self.conn.close)

    async def __aenter__(self) -> "LibvirtDomain":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# -- sampling -----------------------------------------------------------------

def _dirty_count(nodes: list[dict[str, Any]], source: str) -> int | None:
    """The count of the job's anonymous bitmap: on the source node (QEMU <= 8.1)
    or on the mirror filter above it (8.2 and later)."""
    by_name = {n.get("node-name"): n for n in nodes}
    src = by_name.get(source)
    if src is None:
        return None
    places = [src]
    for n in nodes:
        if n.get("drv") != "mirror_top":
            continue
        kids = {c.get("node-name") for c in n.get("children", [])}
        if source in kids or (not kids and n.get("file") == src.get("file")):
            places.append(n)
    counts = [b["count"] for n in places for b in n.get("dirty-bitmaps", ()) if "name" not in b]
    return sum(counts) if counts else None


class LibvirtSampler:
    """Samples the block job of one disk of a `LibvirtDomain` at ``hz``, as an
    asyncio task, into `Sample` rows like `qmpkit.record.Recorder`'s.

    With ``passthrough=True`` each tick sends two read-only passthrough queries
    (``query-block-jobs`` and ``query-named-block-nodes`` flat: about 2 ms) and
    fills ``dirty_bytes`` from the job's anonymous bitmap on the disk's current
    format node, found from the job's id (libvirt names it
    ``copy-vda-libvirt-N-format``) at every tick, so a new copy after a pivot is
    followed. With ``passthrough=False`` each tick reads only ``blockJobInfo``
    (no dirty bytes, ``cur = end - 1`` until READY) and the domain is not
    tainted ``custom-monitor``.
    """

    def __init__(self, domain: LibvirtDomain, disk: str, *, hz: float = 10.0,
                 passthrough: bool = True, throughput_window_s: float = 0.5) -> None:
        if not 0 < hz <= 1000:
            raise ArgumentError("hz", f"must be in (0, 1000]; got {hz!r}")
        self.domain = domain
        self.disk = disk
        self.hz = hz
        self.passthrough = passthrough
        self.window = throughput_window_s
        self.samples: list[Sample] = []
        self.ticks = 0
        self.error: BaseException | None = None
        self.job_ids: list[str] = []
        self.started = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    @property
    def t0(self) -> float:
        """Time zero of the samples and events: the copy's start, else the sampler's."""
        return self.domain.copy_started.get(self.disk, self.started)

    def start(self) -> "asyncio.Task[None]":
        if self._task is None:
            self.started = time.monotonic()
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="qmpkit-libvirt-sampler")
        return self._task

    async def stop(self, *, final_sample: bool = True) -> None:
        """Stop sampling, after one last sample (which may take at most 2 s).

        :raise QmpkitError: the sampler itself failed.
        """
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            if final_sample and self.error is None:
                with contextlib.suppress(QmpkitError, asyncio.TimeoutError):
                    await within(self.sample(), 2.0)
        if self.error is not None:
            raise self.error

    async def _run(self) -> None:
        try:
            async for _ in ticks(self.hz):
                await self.sample()
        except QmpkitError as exc:
            log.warning("libvirt sampler stopped: %s", exc)
            self.error = exc

    async def sample(self) -> Sample | None:
        """Take one sample (None when the disk has no job now)."""
        if self.passthrough:
            s = await self._sample_passthrough()
        else:
            s = await self._sample_info()
        self.ticks += 1
        if s is None:
            return None
        tp = rate(self.samples + [s], "current_progress", self.window)
        s = replace(s, throughput_bps=round(max(0.0, tp or 0.0), 1))
        self.samples.append(s)
        return s

    def _ready(self) -> bool:
        return any(e["status"] == "ready"
                   for e in self.domain.job_events(self.disk, since=self.t0))

    async def _sample_passthrough(self) -> Sample | None:
        jobs, nodes = await asyncio.gather(
            self.domain.monitor("query-block-jobs"),
            self.domain.monitor("query-named-block-nodes", {"flat": True}))
        now = time.monotonic()
        prefix = f"copy-{self.disk}-"
        job = next((j for j in jobs if j["device"].startswith(prefix)), None)
        if job is None:
            return None
        if job["device"] not in self.job_ids:
            self.job_ids.append(job["device"])
        source = job["device"][len(prefix):]
        cur, tot = int(job["offset"]), int(job["len"])
        return Sample(t_s=round(now - self.t0, 6), status=job["status"],
                      dirty_bytes=_dirty_count(nodes, source), current_progress=cur,
                      total_progress=tot, remaining_bytes=tot - cur, throughput_bps=0.0,
                      actively_synced=job.get("actively-synced"))

    async def _sample_info(self) -> Sample | None:
        info = await self.domain.job_info(self.disk)
        now = time.monotonic()
        if info is None:
            return None
        cur, tot = int(info["cur"]), int(info["end"])
        return Sample(t_s=round(now - self.t0, 6),
                      status="ready" if self._ready() or (tot > 0 and cur == tot) else "running",
                      dirty_bytes=None, current_progress=cur, total_progress=tot,
                      remaining_bytes=tot - cur, throughput_bps=0.0)

    def trace_events(self) -> list[dict[str, Any]]:
        """libvirt's job events, named as QMP names them (so `Trace.ready_time`
        works), and qmpkit's speed changes."""
        t0 = self.t0
        out = [{"t_s": round(e["received"] - t0, 6), "event": e["event"],
                "data": {"device": self.disk, "libvirt_status": e["status"],
                         **({"error": "libvirt reported the job failed"}
                            if e["status"] == "failed" else {})},
                "timestamp": e["timestamp"]}
               for e in self.domain.job_events(self.disk, since=t0)]
        with self.domain._lock:
            speeds = [c for c in self.domain.speed_changes
                      if c["disk"] == self.disk and c["received"] >= t0]
        out += [{"t_s": round(c["received"] - t0, 6), "event": SPEED_EVENT,
                 "data": {"speed": c["speed"]}, "timestamp": None} for c in speeds]
        return sorted(out, key=lambda e: e["t_s"])

    def trace(self, *, meta: Mapping[str, Any] | None = None,
              completed: bool | None = None, verified: bool | None = None) -> Trace:
        """A `Trace` of everything so far; its meta says the backend and the mode."""
        lv = _libvirt()
        m = {"backend": "libvirt", "passthrough": self.passthrough,
             "libvirt_version": _version(lv.getVersion()), "uri": self.domain.uri,
             "domain": self.domain.name, "disk": self.disk, "hz": self.hz,
             "job_ids": list(self.job_ids), **dict(meta or {})}
        t = Trace(samples=list(self.samples), events=self.trace_events(), meta=m)
        t.summary = summarize(t, completed=completed, verified=verified)
        return t

    async def __aenter__(self) -> "LibvirtSampler":
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _version(n: int) -> str:
    return f"{n // 1000000}.{n // 1000 % 1000}.{n % 1000}"


# -- is this QEMU libvirt's? ---------------------------------------------------

_LIBVIRT_PATHS = ("/var/lib/libvirt/", "/run/libvirt/", "/var/run/libvirt/")
_LIBVIRT_NODE = re.compile(r"^libvirt-\d+-(format|storage)$")


def _peer_pid(client: Any) -> int | None:
    """The PID at the other end of a unix QMP socket (SO_PEERCRED), or None."""
    with contextlib.suppress(Exception):
        writer = client._qmp._writer           # qemu.qmp's asyncio StreamWriter
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                    struct.calcsize("3i"))
            pid = struct.unpack("3i", creds)[0]
            return pid if pid > 0 else None
    return None


def _cmdline_reason(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    for i, arg in enumerate(argv[:-1]):
        if arg == "-name" and argv[i + 1].startswith("guest="):
            guest = argv[i + 1][len("guest="):].split(",")[0]
            return (f"QEMU (PID {pid}) was started by libvirt: its command line names "
                    f"-name guest={guest}")
    for arg in argv:
        for p in _LIBVIRT_PATHS:
            if p in arg:
                return f"QEMU (PID {pid}) was started by libvirt: its command line uses {p}"
    return None


async def managed_by_libvirt(qemu_client: Any) -> str | None:
    """Why the QEMU at the end of a raw QMP connection is managed by libvirt, or
    None when nothing says so. ``qemu_client`` is a `qmpkit.client.Client` (or a
    `qmpkit.Qemu`).

    Looks, in order, at the QEMU process's command line (a local unix socket:
    the peer's PID from SO_PEERCRED), at libvirt's monitor chardev
    (``charmonitor``, or a path under libvirt's dirs, from ``query-chardev``),
    and at libvirt's node names (``libvirt-N-format``). Only read-only
    queries are sent. A query QEMU refuses is skipped.
    """
    client = getattr(qemu_client, "client", qemu_client)
    pid = _peer_pid(client)
    if pid is not None:
        reason = _cmdline_reason(pid)
        if reason:
            return reason
    with contextlib.suppress(QmpkitError):
        for ch in await client.execute("query-chardev"):
            label, filename = ch.get("label", ""), ch.get("filename", "")
            if label == "charmonitor" or any(p in filename for p in _LIBVIRT_PATHS):
                return (f"QEMU has libvirt's monitor: chardev {label!r} ({filename}); "
                        "libvirt manages it")
    with contextlib.suppress(QmpkitError):
        for n in await client.execute("query-named-block-nodes", {"flat": True}):
            if _LIBVIRT_NODE.match(n.get("node-name", "")):
                return (f"QEMU's block node {n['node-name']!r} is named the way libvirt "
                        "names its nodes; libvirt manages it")
    return None
