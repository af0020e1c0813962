"""
One mirror from start to end: `MirrorRun`.

A `MirrorRun` owns one ``blockdev-mirror`` on one QEMU the way QEMUMachine
owns its process: it prepares the target, starts the job, records it, offers
the controls, verifies the copy, and on every exit path removes exactly what
it created, QEMU side first::

    async with MirrorRun(qemu, device="vda", target_file="/srv/new.qcow2",
                         create=True, granularity="4K", out="trace") as run:
        await run.start()
        await run.wait_ready(timeout=600)
        await run.complete()                 # checks the target's chain first
        print(run.verification)              # verified / mismatch / cannot verify

What it guarantees, whatever happens (failure, timeout, Ctrl-C, SIGTERM, a
QEMU that dies or hangs, an error in the cleanup itself):

- a job it started and did not leave running on purpose is cancelled, so the
  source is never touched;
- a target node it added is removed unless the guest now runs on it (after a
  pivot) or the job was left running; a target file it created (``create``)
  is removed unless it holds a finished copy (pivot, or point-in-time copy);
  a file the caller gave is never removed;
- the trace (``out``) is saved last, even when the run failed, and says why.

The target it creates has the chain that ``drive-mirror`` would give it:
``sync=top`` backs it by the source's backing file, ``sync=none`` by the
source itself (so a qcow2 target is needed), and before ``complete`` pivots
the guest onto it, the chain is checked: a target that would show the guest
zeroes where its data was is refused, and the job cancelled.

Verification compares the two images with ``qemu-img compare`` only while
nothing writes to them: a temporary dirty bitmap on each node counts the
writes during the compare, and any write turns the result into "cannot
verify" rather than a false "mismatch".

The faces (the CLI, the notebook panels) and `run_experiment` all run mirrors
through this class; none of them starts or cleans up a job itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .aio import within
from .analysis import Forecast, forecast
from .errors import (ArgumentError, JobFailedError, JobTimeoutError, QemuCommandError,
                     QmpConnectionError, QmpkitError, QmpTimeoutError, VerifyError)
from .images import FORMATS, compare_images, create_image
from .job import JobEnd, JobState
from .mirror import MirrorJob, mirror_arguments, start_drive_mirror, start_mirror
from .nodes import check_node_options
from .record import Recorder, Recording, checkpoint
from .session import FILTERS, Qemu
from .trace import COPY_MODE_EVENT, SPEED_EVENT, Trace, prepare_out_dir
from .units import format_size

__all__ = ["MirrorRun", "Verification", "RunPhase", "hopeless", "LiveState"]

log = logging.getLogger(__name__)

#: seconds each QEMU-side cleanup step may take (a hung QEMU must not hang us)
CLEANUP_TIMEOUT = 10.0
#: seconds a QEMU has to answer before cleanup treats it as hung
PROBE_TIMEOUT = 3.0
_bitmap_ids = itertools.count(1)


class RunPhase(enum.Enum):
    """Where a `MirrorRun` is in its life."""
    NEW = "new"
    RUNNING = "running"
    LEFT = "left"          # left running on purpose (``--then leave``)
    ENDED = "ended"
    CLOSED = "closed"


@dataclass(frozen=True)
class Verification:
    """What a verification found: ``verified``, ``mismatch`` or ``unverifiable``."""
    outcome: str
    detail: str

    @property
    def ok(self) -> bool | None:
        """True verified, False a real mismatch, None not checked."""
        return {"verified": True, "mismatch": False}.get(self.outcome)

    def __str__(self) -> str:
        if self.outcome == "verified":
            return "verified: source and target hold the same data"
        if self.outcome == "mismatch":
            return f"NOT verified: content mismatch ({self.detail})"
        return f"cannot verify: {self.detail}"


@dataclass(frozen=True)
class LiveState:
    """A plain-data look at a run, for a progress line or a panel."""
    job_id: str
    status: str | None
    ready: bool
    ended: str | None            # "completed", "cancelled", "failed" or None
    error: str | None
    t_s: float
    current_bytes: int
    total_bytes: int
    dirty_bytes: int | None
    throughput_bps: float
    forecast: Forecast | None
    error_events: int
    last_error: dict[str, Any] | None
    stale_s: float          # seconds since the last sample (QEMU slow to answer)
    disk_bytes: int | None  # the source's size: progress past it is recopies


def hopeless(after_s: float = 3.0) -> Callable[[Recording], bool]:
    """A ``give_up`` rule: the forecast has said "not converging" for the last
    ``after_s`` seconds (and the run is at least twice that old)."""
    def check(recording: Recording) -> bool:
        s = recording.samples
        if not s or s[-1].t_s < 2 * after_s:
            return False
        recent = [x for x in s if x.t_s >= s[-1].t_s - after_s]
        cut = len(s) - len(recent)
        # not converging at the start and at the end of the window
        return (forecast(s[:cut + 1]).converging is False
                and forecast(s).converging is False)
    return check


class MirrorRun:
    """One ``blockdev-mirror`` on ``qemu``, from the target's preparation to cleanup.

    :param device: the source: a node name or a VM's drive id (``#blockN`` too).
    :param target: an existing target node. Or give ``target_file``:
    :param target_file: an image file to open as the target node (named
        ``target_node_name``, by default ``qmpkit-JOBID``, unique on this QEMU).
    :param create: create ``target_file`` as large as the source, with the
        backing chain ``sync`` needs, mode 0600 (or the source file's mode).
    :param target_format: ``raw`` or ``qcow2``; default qcow2 for ``sync`` top
        or none, else the source's format.
    :param hz: samples per second of the recorder (None: no recorder).
    :param out: the trace folder, checked writable now and saved at the end.
    :param meta: more metadata for the trace.
    :param pause_guest_to_verify: pause the VM (``stop``/``cont``) around the
        pivot so that the copy can be verified while the guest is quiet.
    :param max_errors: cancel the job once QEMU has reported more I/O errors than
        this (``on-*-error=ignore`` on a full disk retries thousands of times a second).
    :param target_options: node options of a ``target_file``: ``aio``,
        ``cache_direct``, ``cache_no_flush``, ``detect_zeroes``, ``discard``, and
        with ``create`` also ``preallocation`` (see `BlockGraph.add_file`).
    :param rescue_after: when the forecast has said "not converging" for this many
        seconds, switch the job to write-blocking, once (QEMU >= 8.2).
    :param mirror: `mirror_arguments` keywords (granularity, buf_size, sync...).
    :raise ArgumentError: a bad option, found before anything is sent.
    """

    def __init__(self, qemu: Qemu, *, device: str, target: str | None = None,
                 target_file: os.PathLike[str] | str | None = None, create: bool = False,
                 target_format: str | None = None, target_node_name: str | None = None,
                 hz: float | None = 10.0, out: os.PathLike[str] | str | None = None,
                 meta: dict[str, Any] | None = None, pause_guest_to_verify: bool = False,
                 max_errors: int | None = None, rescue_after: float | None = None,
                 target_options: dict[str, Any] | None = None, **mirror: Any) -> None:
        self.qemu = qemu
        self.device = device
        self.options = dict(mirror)
        if (target is None) == (target_file is None):
            raise ArgumentError("target", "give exactly one of target (a node) or "
                                          "target_file (an image file)")
        if create and target_file is None:
            raise ArgumentError("create", "needs target_file")
        self.target_file = Path(target_file) if target_file is not None else None
        self.create = create
        sync = self.options.get("sync", "full")
        if target_format is not None and target_format not in FORMATS:
            raise ArgumentError("target_format", f"must be one of {', '.join(FORMATS)}; "
                                                 f"got {target_format!r}")
        if create and sync in ("top", "none") and target_format == "raw":
            raise ArgumentError("target_format", f"sync={sync} needs a qcow2 target: the new "
                                                 "image must have a backing file (the "
                                                 + ("source's backing file" if sync == "top"
                                                    else "source itself") + ") so the guest "
                                                 "still sees its data after the pivot, and a "
                                                 "raw image cannot have one")
        self.target_format = target_format
        if self.target_file is not None:
            if self.target_file.is_dir():
                raise ArgumentError("target_file", f"{str(self.target_file)!r} is a directory, "
                                                   "not an image file")
            if create and (self.target_file.exists() or self.target_file.is_symlink()):
                raise ArgumentError("target_file", f"{str(self.target_file)!r} exists; "
                                                   "drop create to use it")
            if not create and not self.target_file.exists():
                raise ArgumentError("target_file", f"{str(self.target_file)!r} does not "
                                                   "exist; add --create (create=True) to make it")
        self.target_node_name = target_node_name
        self.target_options = dict(target_options or {})
        if self.target_options and self.target_file is None:
            raise ArgumentError("target_options", "apply to a target_file only (a node given "
                                                  "by name was opened by whoever added it)")
        unknown = set(self.target_options) - {"aio", "cache_direct", "cache_no_flush",
                                               "detect_zeroes", "discard", "preallocation"}
        if unknown:
            raise ArgumentError("target_options", f"unknown: {', '.join(sorted(unknown))}")
        if "preallocation" in self.target_options and not create:
            raise ArgumentError("preallocation", "applies only to a file that create=True "
                                                 "(--create) makes")
        check_node_options(aio=self.target_options.get("aio"),
                           cache_direct=bool(self.target_options.get("cache_direct")),
                           detect_zeroes=self.target_options.get("detect_zeroes"),
                           discard=self.target_options.get("discard"))
        # every mirror argument is checked now, with the target's final name unknown
        self.arguments = mirror_arguments(device=device, target=target or "qmpkit-target",
                                          **self.options)
        self.target = target
        self.job_id: str = self.arguments["job-id"]
        if hz is not None and not 0 < hz <= 1000:
            raise ArgumentError("hz", f"must be in (0, 1000] samples per second; got {hz!r}")
        self.hz = hz
        self.out = prepare_out_dir(out) if out is not None else None
        self.meta = dict(meta or {})
        self.pause_guest_to_verify = pause_guest_to_verify
        if max_errors is not None and (isinstance(max_errors, bool)
                                       or not isinstance(max_errors, int) or max_errors < 1):
            raise ArgumentError("max_errors", f"must be an integer >= 1; got {max_errors!r}")
        self.max_errors = max_errors
        self._error_stop: asyncio.Future[None] | None = None
        if rescue_after is not None and not 0 < rescue_after < float("inf"):
            raise ArgumentError("rescue_after", f"must be a finite number of seconds > 0; "
                                                f"got {rescue_after!r}")
        if rescue_after is not None and self.arguments.get("copy-mode") == "write-blocking":
            raise ArgumentError("rescue_after", "the mirror already starts in write-blocking "
                                                "mode: there is nothing to switch to")
        self.rescue_after = rescue_after
        self.rescued_at: float | None = None
        self.phase = RunPhase.NEW
        self.job: MirrorJob | None = None
        self.recorder: Recorder | None = None
        self.recording: Recording | None = None
        self.verification: Verification | None = None
        self.error: str | None = None            # why the run failed, for the trace
        self.extra: dict[str, Any] = {}           # more summary keys (guest stats...)
        self.fio_latency: list[tuple[float, float]] = []
        self.completed = False                    # pivoted onto the target
        self.pivot_requested = False              # job-complete was sent
        self.point_in_time_copy = False           # cancelled in READY: a finished copy
        self.cleanup_errors: list[str] = []
        self._created_nodes: list[str] = []       # blockdev-add'ed here, in order
        self._created_files: list[Path] = []
        self._saver: asyncio.Future[None] | None = None
        self._source_node: str | None = None
        self._files: tuple[tuple[str, str], tuple[str, str]] | None = None
        self._expected_backing: str | None = None
        self._paused_guest = False
        self._drive_mirror: dict[str, Any] | None = None    # sync=none into a new file
        self._adopted: str | None = None           # attach(): a qmpkit-... target node
        self._event_callbacks: list[Callable[[dict[str, Any]], None]] = []
        self.started_at: float | None = None

    # -- starting ------------------------------------------------------------

    @classmethod
    async def attach(cls, qemu: Qemu, job_id: str, *, hz: float | None = 10.0,
                     out: os.PathLike[str] | str | None = None,
                     meta: dict[str, Any] | None = None) -> "MirrorRun":
        """Follow a mirror that already runs (started by ``--then leave``, say).
        The run owns nothing: closing it never cancels the job.

        :raise ArgumentError: no block job ``job_id`` (the message lists those there are).
        """
        jobs = await qemu.client.execute("query-block-jobs")
        info = next((j for j in jobs if j["device"] == job_id), None)
        if info is None:
            have = ", ".join(f"{j['device']} ({j['type']}, {j.get('status')})"
                             for j in jobs) or "none"
            raise ArgumentError("job", f"no block job {job_id!r} on this QEMU; jobs: {have}")
        self = cls(qemu, device=job_id, target=f"{job_id}-target", hz=hz, out=out, meta=meta,
                   job_id=job_id)
        self.device, self.target = "", None
        self.job = MirrorJob.watch(qemu.client, job_id, arguments={"job-id": job_id})
        await self.job.reattach(qemu.client)
        # a target that an earlier qmpkit added (qmpkit-...) is adopted: if this run
        # ends the job without a pivot, it removes that node too
        try:
            from .nodes import graph_children
            target = (await graph_children(qemu.client, "block-job", job_id)).get("target")
        except QemuCommandError:
            target = None
        if target and target.startswith("qmpkit-"):
            self._adopted = target
        self.phase = RunPhase.LEFT        # never cancelled by close()
        self.started_at = time.monotonic()
        self.job.started_at = self.started_at
        self._start_recording()
        return self

    async def start(self) -> MirrorJob:
        """Prepare the target and start the job (and the recorder).

        :raise ArgumentError: the device is busy, the target too small, ...
        :raise QemuCommandError: QEMU refused (its message, word for word).
        """
        if self.phase is not RunPhase.NEW:
            raise QmpkitError(f"this run was already started ({self.phase.value})")
        self.phase = RunPhase.RUNNING
        graph = self.qemu.nodes
        source = await graph.node(self.device)
        self._source_node = source.node_name
        await self._refuse_busy_device(source.node_name)
        if self.pause_guest_to_verify:
            cmds = {c["name"] for c in await self.qemu.client.execute("query-commands")}
            if "stop" not in cmds:
                raise ArgumentError("pause_guest_to_verify", "needs a VM (qemu-system): this "
                                                             "QEMU has no guest to pause")
        if self.rescue_after is not None:
            (await self.qemu.client.capabilities()).require(
                "block_job_change", "switching to write-blocking (rescue_after)",
                argument="rescue_after")
        sync = self.arguments["sync"]
        if self.target_file is not None:
            await self._open_target_file(source.node_name, source.size, source.driver, sync)
        elif sync in ("top", "none"):
            self._expected_backing = await self._expected_backing_file(source.node_name, sync)
        self.arguments["target"] = self.target
        if self._drive_mirror is not None:      # QEMU makes the node when the job starts
            src = await self._image_files_of(self.device)
            self._files = (src, (self._drive_mirror["target_path"], "qcow2")) if src else None
        else:
            self._files = await self._image_files()
        self.meta.setdefault("disk_bytes", source.size)
        self.meta.setdefault("qemu_version", ".".join(map(str, await self.qemu.client.version())))
        self.started_at = time.monotonic()
        options = {**self.options, "job_id": self.job_id}
        if self._drive_mirror is not None:
            self.job = await start_drive_mirror(self.qemu.client, device=self.device,
                                                **self._drive_mirror, **options)
        else:
            self.job = await start_mirror(self.qemu.client, device=self.device,
                                          target=self.target, **options)
        self.job.on_event(self._count_errors)
        for cb in self._event_callbacks:
            self.job.on_event(cb)
        self._start_recording()
        return self.job

    def _start_recording(self) -> None:
        assert self.job is not None
        if self.hz is None:
            return
        self.recorder = Recorder(self.qemu.client, hz=self.hz)
        self.recording = self.recorder.add(self.job, meta=self.meta)
        self.recorder.start()
        if self.out is not None:
            self._saver = asyncio.ensure_future(checkpoint(self.recording, self.out))

    async def _refuse_busy_device(self, node: str) -> None:
        """QEMU 7.2 says only "Need a root block node" for a second mirror."""
        for job in await self.qemu.jobs():
            if job["device"] and job["device"] in (node, self.device):
                raise ArgumentError("device", f"device {self.device} already has job "
                                              f"{job['id']} ({job['status']}); see "
                                              "`qmpkit jobs`")

    async def _expected_backing_file(self, source: str, sync: str) -> str | None:
        """The file the target's backing chain must start with: the source's
        backing file (top) or the source's own file (none)."""
        if sync == "none":
            return (await self.qemu.image_of(source))[0]
        backing = (await self.qemu.nodes.children(source)).get("backing")
        if backing is None:
            return None                  # nothing below the top: top copies everything
        return (await self.qemu.image_of(backing))[0]

    async def _open_target_file(self, source: str, size: int, driver: str, sync: str) -> None:
        assert self.target_file is not None
        graph = self.qemu.nodes
        suffix = self.target_file.suffix.lower()
        by_name = "qcow2" if suffix == ".qcow2" else "raw" if suffix in (".raw", ".img") \
            else None
        fmt = self.target_format or ("qcow2" if sync in ("top", "none") else
                                     by_name if self.create and by_name else
                                     driver if driver in FORMATS else "raw")
        backing_node: str | None | bool = False          # False: as the image says
        if sync in ("top", "none"):
            if sync == "none":
                backing_node = source
            else:
                backing_node = (await graph.children(source)).get("backing")
            self._expected_backing = await self._expected_backing_file(source, sync)
        if sync == "none":
            await self._prepare_drive_mirror(fmt)
            return
        if self.create:
            backing_file = backing_fmt = None
            if self._expected_backing is not None:
                backing_file = self._expected_backing
                node = source if sync == "none" else backing_node
                assert isinstance(node, str)
                backing_fmt = (await self.qemu.image_of(node))[1]
            mode = 0o600
            with contextlib.suppress(OSError, ArgumentError):
                src_file = (await self.qemu.image_of(source))[0]
                mode = os.stat(src_file).st_mode & 0o777
            self._created_files.append(self.target_file)
            await create_image(self.target_file, size, fmt=fmt, backing=backing_file,
                               backing_fmt=backing_fmt, mode=mode, exclusive=True,
                               allow_empty=True,
                               preallocation=self.target_options.get("preallocation"))
        else:
            from .images import image_info
            have = int((await image_info(self.target_file))["virtual-size"])
            if have < size:
                raise ArgumentError("target_file", f"{str(self.target_file)!r} holds "
                                                   f"{format_size(have)} but the source holds "
                                                   f"{format_size(size)}; the target must be "
                                                   "at least as large")
            if self._expected_backing is not None:
                await self._check_header(self.target_file, self._expected_backing, sync)
        name = self.target_node_name or await graph.free_name("qmpkit", self.job_id)
        node_options = {k: v for k, v in self.target_options.items() if k != "preallocation"}
        await graph.add_file(name, self.target_file, fmt=fmt,
                             backing=backing_node if fmt == "qcow2" else False, **node_options)
        self._created_nodes.append(name)
        self.target = name

    async def _prepare_drive_mirror(self, fmt: str) -> None:
        """sync=none: the target's backing must be the source itself, which only
        QEMU can attach (at the pivot, once the source takes no more writes):
        ``drive-mirror`` does it. The file is made first, 0600 and empty, so
        that QEMU writes into a file with the right mode."""
        assert self.target_file is not None
        if not self.create:
            raise ArgumentError("target_file", "sync=none into an existing file cannot get the "
                                               "source as its backing node while the guest "
                                               "writes; use --create (create=True), and QEMU "
                                               "attaches it at the pivot as drive-mirror does")
        if fmt != "qcow2":
            raise ArgumentError("target_format", "sync=none needs a qcow2 target")
        mode = 0o600
        with contextlib.suppress(OSError, ArgumentError):
            mode = os.stat((await self.qemu.image_of(self.device))[0]).st_mode & 0o777
        fd = os.open(self.target_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                     mode)
        os.close(fd)
        self._created_files.append(self.target_file)
        name = self.target_node_name or await self.qemu.nodes.free_name("qmpkit", self.job_id)
        self._drive_mirror = {"target_path": str(self.target_file.resolve()), "fmt": fmt,
                              "node_name": name}
        self.target = name          # QEMU owns this node: it goes with the job if no pivot

    async def _check_header(self, path: Path, want: str, sync: str) -> None:
        """An existing target must name the right backing file in its header too,
        or the guest loses its data at the next restart."""
        from .images import image_info
        got = (await image_info(path)).get("full-backing-filename")
        if got is None or os.path.realpath(got) != os.path.realpath(want):
            raise ArgumentError("target_file", f"{str(path)!r} has backing file {got!r}, but "
                                               f"sync={sync} needs {want!r}; create it with "
                                               f"qemu-img create -f qcow2 -b {want} (or use "
                                               "--create)")

    async def _image_files_of(self, node: str) -> tuple[str, str] | None:
        try:
            return await self.qemu.image_of(node)
        except ArgumentError:
            return None

    async def _image_files(self) -> tuple[tuple[str, str], tuple[str, str]] | None:
        """(path, format) of source and target, found now: after a pivot a
        ``-drive`` source node may be gone. None when either is not a local image."""
        try:
            assert self.target is not None
            return (await self.qemu.image_of(self.device),
                    await self.qemu.image_of(self.target))
        except ArgumentError:
            return None

    # -- live state ----------------------------------------------------------

    @property
    def state(self) -> JobState:
        assert self.job is not None, "start the run first"
        return self.job.state

    def forecast(self) -> Forecast | None:
        return self.recording.forecast() if self.recording is not None else None

    def on_event(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """Call ``callback(event)`` for each of the job's QMP events."""
        self._event_callbacks.append(callback)
        if self.job is not None:
            self.job.on_event(callback)

    def live(self) -> LiveState:
        """The run right now, as plain data."""
        assert self.job is not None, "start the run first"
        st = self.job.state
        last = self.recording.samples[-1] if self.recording and self.recording.samples else None
        return LiveState(
            job_id=self.job_id, status=st.status, ready=st.ready,
            ended=st.end.value if st.end else None, error=st.failure(),
            t_s=last.t_s if last else 0.0,
            current_bytes=last.current_progress if last else 0,
            total_bytes=last.total_progress if last else 0,
            dirty_bytes=last.dirty_bytes if last else None,
            throughput_bps=last.throughput_bps if last else 0.0,
            forecast=self.forecast(), error_events=st.error_count,
            last_error=st.recent_errors[-1] if st.recent_errors else None,
            stale_s=(time.monotonic() - (self.started_at or 0.0) - last.t_s) if last else 0.0,
            disk_bytes=self.meta.get("disk_bytes"))

    # -- control ---------------------------------------------------------------

    def _job(self) -> MirrorJob:
        if self.job is None:
            raise QmpkitError("start the mirror first")
        return self.job

    async def wait_ready(self, *, timeout: float,
                         give_up: Callable[[Recording], bool] | None = None) -> str:
        """Wait for READY: returns ``"ready"``, ``"timeout"`` or ``"gave up"``
        (``give_up(recording)``, checked twice a second, said so).

        :raise JobFailedError: the job failed or was cancelled first (also by
            ``max_errors``: then the message says so).
        """
        job = self._job()
        ready = asyncio.ensure_future(job.wait_ready(timeout=timeout))
        try:
            while True:
                done, _ = await asyncio.wait({ready}, timeout=0.5)
                if done:
                    try:
                        ready.result()
                        return "ready"
                    except JobTimeoutError:
                        return "timeout"
                    except JobFailedError:
                        self._raise_if_stopped_for_errors()
                        raise
                if give_up is not None and self.recording is not None \
                        and give_up(self.recording):
                    self.extra["early_stop_reason"] = self.recording.forecast().text
                    return "gave up"
                await self._maybe_rescue()
        finally:
            ready.cancel()
            with contextlib.suppress(asyncio.CancelledError, QmpkitError):
                await ready

    async def _maybe_rescue(self) -> None:
        if self.rescue_after is None or self.rescued_at is not None or self.recording is None:
            return
        if not hopeless(self.rescue_after)(self.recording):
            return
        reason = self.recording.forecast().text
        await self.change(copy_mode="write-blocking", reason=f"rescue: {reason}")

    async def change(self, *, copy_mode: str, reason: str = "asked") -> None:
        """Switch the running job's copy mode (``block-job-change``, QEMU >= 8.2),
        and record the switch as an event of the trace.

        :raise UnsupportedError: this QEMU cannot.
        """
        job = self._job()
        await job.change(copy_mode=copy_mode)  # type: ignore[arg-type]
        now = time.monotonic()
        if copy_mode == "write-blocking":
            self.rescued_at = now
        job.state.events.append({"event": COPY_MODE_EVENT, "received": now, "timestamp": None,
                                 "data": {"id": self.job_id, "copy-mode": copy_mode,
                                          "reason": reason}})
        log.info("job %s switched to %s (%s)", self.job_id, copy_mode, reason)

    def _count_errors(self, event: dict[str, Any]) -> None:
        """Event callback: past ``max_errors`` I/O errors, cancel the job at once,
        from the event itself (a flood can outrun any polling loop)."""
        job = self.job
        if event["event"] != "BLOCK_JOB_ERROR" or job is None or self.max_errors is None \
                or job.state.error_count <= self.max_errors or self._error_stop is not None:
            return
        self.error = (f"cancelled after more than {self.max_errors} I/O errors "
                      f"(max_errors={self.max_errors}); last: {event.get('data')}")
        self._error_stop = asyncio.ensure_future(self._cancel_quietly())

    async def _cancel_quietly(self) -> None:
        with contextlib.suppress(QmpkitError):
            await self._job().cancel(force=True, timeout=None)

    def _raise_if_stopped_for_errors(self) -> None:
        if self._error_stop is not None:
            job = self._job()
            raise JobFailedError(self.error or "too many I/O errors", job_id=self.job_id,
                                 last_status="running", errors=list(job.state.recent_errors))

    async def pause(self) -> None:
        await self._job().pause()

    async def resume(self) -> None:
        await self._job().resume()

    async def set_speed(self, speed: int) -> None:
        """Set the running job's speed limit (bytes/s, 0 = unlimited), and record
        it as an event of the trace (QEMU sends none) for the plots' speed line."""
        job = self._job()
        await job.set_speed(speed)
        job.state.events.append({"event": SPEED_EVENT, "received": time.monotonic(),
                                 "timestamp": None, "data": {"id": self.job_id, "speed": speed}})

    async def check_chain(self) -> str | None:
        """Why pivoting to the target would change what the guest reads, or None.

        With ``sync=top`` the target must be backed by the source's backing
        file, with ``sync=none`` by the source's own image.
        """
        sync = self.arguments.get("sync", "full")
        if sync == "full" or self.target is None:
            return None
        want = self._expected_backing
        if want is None:
            return None
        if self._drive_mirror is not None:
            # QEMU attaches the source at the pivot; the image must name it.
            from .images import image_info
            got = (await image_info(self._drive_mirror["target_path"])).get(
                "full-backing-filename")
            if got is None or os.path.realpath(got) != os.path.realpath(want):
                return (f"the new image names backing file {got!r}, not the source {want}: "
                        "after the pivot the guest would see other data")
            return None
        node = self.target
        graph = self.qemu.nodes
        # look through filters (throttle...) to the target's format node
        for _ in range(8):
            info = await graph.node(node)
            if info.driver not in FILTERS:
                break
            child = (await graph.children(node)).get("file")
            if child is None:
                break
            node = child
        backing = (await graph.children(node)).get("backing")
        if backing is None:
            return (f"the target {self.target} has no backing file, but sync={sync} copies "
                    f"only {'the top layer' if sync == 'top' else 'new writes'}: after the "
                    f"pivot the guest would read zeroes where {want} holds its data")
        try:
            got = (await self.qemu.image_of(backing))[0]
        except ArgumentError as exc:
            return f"cannot check the target's backing node {backing}: {exc}"
        if os.path.realpath(got) != os.path.realpath(want):
            return (f"the target {self.target} is backed by {got}, but sync={sync} needs "
                    f"{want}: after the pivot the guest would see other data")
        return None

    async def complete(self, *, timeout: float = 60.0, verify: bool = False) -> JobEnd | None:
        """Pivot the guest onto the target, after checking the target's chain.

        :param verify: compare source and target after the job ended (see
            `verify`); with ``pause_guest_to_verify`` the guest is paused from
            just before the pivot until the compare is done.
        :raise JobFailedError: the target's chain would lose data: the job is
            cancelled and nothing pivots.
        """
        job = self._job()
        problem = await self.check_chain()
        if problem is not None:
            status = job.state.status
            await self._cancel_now()
            self.error = f"refused to pivot: {problem}"
            raise JobFailedError(f"refused to pivot: {problem} (the job was cancelled; the "
                                 "source is untouched)", job_id=self.job_id,
                                 last_status=status)
        if verify and self.pause_guest_to_verify:
            # pause only a guest that runs; a VM started with -S stays as it was
            status = await self.qemu.client.execute("query-status")
            if status.get("running"):
                await self.qemu.client.execute("stop")
                self._paused_guest = True
        try:
            # From here the pivot may happen even if we never hear of it (a QEMU that
            # hangs and answers later): nothing this run made may be removed unless
            # QEMU says the job ended without one.
            self.pivot_requested = True
            end = await job.complete(timeout=timeout)
            self.completed = end is JobEnd.COMPLETED
            if end is not None:
                self._ended()
            if verify and end is not None:
                await self.verify()
            return end
        finally:
            await self._resume_guest()

    async def cancel(self, *, timeout: float = 60.0) -> JobEnd | None:
        """End the job without a pivot. In READY this leaves a point-in-time
        copy (QEMU reports it completed); before READY the copy is abandoned."""
        job = self._job()
        soft = job.state.ready
        end = await job.cancel(force=not soft, timeout=timeout)
        if end is not None:
            self._ended()
            self.point_in_time_copy = soft and end is JobEnd.COMPLETED
        return end

    def _ended(self) -> None:
        if self.phase is RunPhase.RUNNING:
            self.phase = RunPhase.ENDED

    def leave(self) -> None:
        """Leave the job running: `close` will neither cancel it nor remove its target."""
        self.phase = RunPhase.LEFT

    async def _cancel_now(self) -> None:
        job = self._job()
        if job.state.finished:
            return
        await job.cancel(force=True, timeout=CLEANUP_TIMEOUT * 3)
        self._ended()

    async def _resume_guest(self) -> None:
        if self._paused_guest:
            self._paused_guest = False
            await self.qemu.client.execute("cont", timeout=CLEANUP_TIMEOUT)

    # -- verification ----------------------------------------------------------

    async def verify(self, *, files: tuple[tuple[str, str], tuple[str, str]] | None = None,
                     watch: tuple[str, ...] | None = None) -> Verification:
        """Compare source and target with ``qemu-img compare``, while checking
        that nothing writes to them during the compare.

        :param files: ((source path, format), (target path, format)); by default
            the images found when the run started.
        :param watch: nodes whose writes make the compare meaningless; by
            default the source and the target node.
        """
        files = files or self._files
        if files is None:
            self.verification = Verification(
                "unverifiable", "source or target is not a local raw/qcow2 image")
            return self.verification
        (src, src_fmt), (dst, dst_fmt) = files
        nodes = watch if watch is not None else tuple(
            n for n in (self._source_node, self.target) if n)
        bitmaps = await self._add_write_watch(nodes)
        try:
            try:
                await compare_images(src, dst, fmt_a=src_fmt, fmt_b=dst_fmt)
                result = Verification("verified", f"{src} and {dst} hold the same data")
            except VerifyError as exc:
                result = Verification("mismatch", exc.detail)
            written = await self._written(bitmaps)
        finally:
            await self._remove_write_watch(bitmaps)
        if written:
            who = ", ".join(f"{n} ({format_size(b)})" for n, b in written.items())
            since = " (the guest writes to the target since the pivot)" if self.completed else ""
            result = Verification("unverifiable", f"the disks were written during the compare: "
                                                  f"{who}{since}; pause the guest "
                                                  "(--pause-guest-to-verify), or verify a "
                                                  "point-in-time copy of a quiet source")
        self.verification = result
        return result

    async def _add_write_watch(self, nodes: tuple[str, ...]) -> dict[str, str]:
        added: dict[str, str] = {}
        for node in nodes:
            name = f"qmpkit-verify-{os.getpid()}-{next(_bitmap_ids)}"
            try:
                await self.qemu.client.execute("block-dirty-bitmap-add", {
                    "node": node, "name": name, "granularity": 65536, "persistent": False})
                added[node] = name
            except (QemuCommandError, ArgumentError) as exc:
                # a node that is gone (a -drive source after the pivot) writes nothing
                log.debug("no write watch on %s: %s", node, exc)
        return added

    async def _written(self, bitmaps: dict[str, str]) -> dict[str, int]:
        if not bitmaps:
            return {}
        counts: dict[str, int] = {}
        for n in await self.qemu.client.execute("query-named-block-nodes", {"flat": True}):
            for b in n.get("dirty-bitmaps", ()):
                if b.get("name") == bitmaps.get(n["node-name"]) and b.get("count"):
                    counts[n["node-name"]] = int(b["count"])
        return counts

    async def _remove_write_watch(self, bitmaps: dict[str, str]) -> None:
        for node, name in bitmaps.items():
            try:
                await self.qemu.client.execute("block-dirty-bitmap-remove",
                                                {"node": node, "name": name},
                                                timeout=CLEANUP_TIMEOUT)
            except QmpkitError as exc:
                self.cleanup_errors.append(f"bitmap {name} on {node}: {exc}")

    # -- the end -----------------------------------------------------------------

    def trace(self) -> Trace:
        """The run's trace so far (also mid-run)."""
        if self.recording is None:
            return Trace(meta={"job_id": self.job_id, **self.meta})
        t = self.recording.trace(completed=self.completed or None,
                                 verified=(self.verification.ok
                                           if self.verification is not None else None),
                                 extra=self.extra)
        t.fio_latency = list(self.fio_latency)
        if self.verification is not None:
            t.summary["verification"] = str(self.verification)
        if self.job is not None and self.job.state.error_count:
            t.summary["error_events"] = self.job.state.error_count
        if self.error is not None:
            t.summary["error"] = self.error
        return t

    async def close(self, error: BaseException | None = None) -> None:
        """Clean up on every exit path; safe to call twice.

        Order: stop the checkpointing and the recorder; cancel the job unless it
        ended or was left running; resume a paused guest; remove the nodes this
        run added (unless the guest now runs on them); remove created files that
        hold no finished copy; save the trace last. A hung or dead QEMU skips the
        remaining QEMU-side steps; an error in one step never skips the others.
        """
        if self.phase is RunPhase.CLOSED:
            return
        left = self.phase is RunPhase.LEFT
        if error is not None and self.error is None:
            self.error = ("interrupted" if isinstance(error, (asyncio.CancelledError,
                                                              KeyboardInterrupt))
                          else f"{type(error).__name__}: {error}")
        self.phase = RunPhase.CLOSED
        qemu_ok = await self._answers()

        async def step(what: str, coro: Any) -> None:
            nonlocal qemu_ok
            if not qemu_ok:
                coro.close()
                return
            try:
                await within(coro, CLEANUP_TIMEOUT * 3)
            except (QmpTimeoutError, asyncio.TimeoutError) as exc:
                qemu_ok = False           # hung: the remaining QEMU steps would hang too
                self.cleanup_errors.append(f"{what}: {exc or 'timed out'}")
            except QmpConnectionError as exc:
                qemu_ok = False
                self.cleanup_errors.append(f"{what}: {exc}")
            except Exception as exc:        # one broken step never skips the others
                self.cleanup_errors.append(f"{what}: {exc}")

        if self._error_stop is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._error_stop
        if self._saver is not None:
            self._saver.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._saver
        if self.recorder is not None:
            try:
                await within(self.recorder.stop(final_sample=qemu_ok), CLEANUP_TIMEOUT)
            except Exception as exc:        # noqa: BLE001 (cleanup goes on)
                self.cleanup_errors.append(f"recorder: {exc or 'timed out'}")
        if self.job is not None and not left and not self.job.state.finished:
            await step(f"cancel job {self.job_id}", self._cancel_now())
        await step("resume the guest", self._resume_guest())
        if self.job is not None:
            with contextlib.suppress(Exception):
                await self.job.abandon()
        # job-complete sent, and QEMU never said how the job ended: the guest may be
        # on the target (or soon be): keep it, and say so
        pivot_unknown = self.pivot_requested and not self.completed and (
            self.job is None or self.job.state.end is None)
        if pivot_unknown:
            self.cleanup_errors.append(
                f"job-complete was sent but QEMU did not say how job {self.job_id} ended: "
                f"the guest may run (or soon run) on the target, so it was kept")
        keep_nodes = left or self.completed or pivot_unknown
        if left and self._adopted and self.job is not None and \
                self.job.state.end is not None and not self.completed:
            await step(f"remove node {self._adopted}", self.qemu.nodes.delete(self._adopted))
        if not keep_nodes:
            for node in reversed(self._created_nodes):
                await step(f"remove node {node}", self.qemu.nodes.delete(node))
        finished_copy = self.completed or self.point_in_time_copy or pivot_unknown
        if not left and not finished_copy:
            for path in self._created_files:
                try:
                    path.unlink(missing_ok=True)
                except OSError as exc:
                    self.cleanup_errors.append(f"remove {path}: {exc.strerror}")
        if self.cleanup_errors:
            log.warning("cleanup of %s: %s", self.job_id, "; ".join(self.cleanup_errors))
        if self.out is not None:
            try:
                trace = self.trace()
                if self.cleanup_errors:
                    trace.summary["cleanup_errors"] = list(self.cleanup_errors)
                trace.save(self.out)
            except (OSError, ValueError) as exc:
                log.error("could not save the trace in %s: %s", self.out, exc)
                self.cleanup_errors.append(f"save trace: {exc}")

    async def _answers(self) -> bool:
        """Is QEMU there and answering? A stopped (SIGSTOP) or hung QEMU would make
        every cleanup step wait for its deadline: skip them all instead."""
        if not self.qemu.client.connected:
            return False
        last = self.job.state.events[-1] if self.job and self.job.state.events else None
        recent = self.job.state.recent_error_events[-1] if self.job and \
            self.job.state.recent_error_events else None
        newest = max((e.get("received", 0.0) for e in (last, recent) if e), default=0.0)
        if time.monotonic() - newest < 1.0:
            return True                   # events still flow: QEMU is alive, just busy
        try:
            await self.qemu.client.execute("query-version", timeout=PROBE_TIMEOUT)
            return True
        except QmpkitError as exc:
            self.cleanup_errors.append(f"QEMU does not answer ({exc}): its nodes and job "
                                       "were left as they are")
            return False

    async def __aenter__(self) -> "MirrorRun":
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        await self.close(exc)

    def __repr__(self) -> str:
        status = self.job.state.status if self.job else None
        return f"<MirrorRun {self.job_id!r} {self.phase.value} status={status}>"
