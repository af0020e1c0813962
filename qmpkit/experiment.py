"""
One recorded mirror run on the embedded QEMU, end to end.

`run_experiment` makes a fresh ``qemu-storage-daemon`` with a source filled
with data and a (throttled) target, starts the fio load, then the mirror
under a `Recorder`, waits for READY up to a time limit, and then completes and
verifies the copy (or cancels it, recorded as not converged). The trace folder
is written in a ``finally``: a run that fails or is interrupted still leaves
everything recorded up to that point.

The mirror itself is a `qmpkit.lifecycle.MirrorRun`, which owns the job,
the recorder, the verification and the cleanup. The demo, the embedded
``qmpkit mirror`` and sweeps all run through `run_experiment`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .analysis import mirror_ops
from .errors import ArgumentError, QmpConnectionError, QmpkitError
from .images import convert_image, create_image, image_info
from .lifecycle import MirrorRun, hopeless
from .link import LinkProcess, LinkSpec
from .mirror import mirror_arguments
from .session import Qemu
from .trace import Trace, prepare_out_dir
from .units import format_rate, format_size, parse_rate, parse_size
from .workload import FioLoad, FioRunner

__all__ = ["Setup", "run_experiment", "measure_offline_copy", "RunResult", "hopeless",
           "check_free_space"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Setup:
    """The disks of a run: a source of ``size`` filled with data, and a target
    throttled to ``target_speed`` bytes/s (None: as fast as the disk).

    With ``remote_target`` the target lives in a second qemu-storage-daemon and
    the mirror writes to it over NBD, as to a disk on another host. A ``link``
    (a `LinkSpec`, or its text: ``"wan"``, ``"rtt=40ms,rate=1Gbit"``) puts an
    emulated network between the two (`qmpkit.link`), and implies
    ``remote_target``. ``reconnect_delay`` (seconds) is set on the NBD client.
    """

    size: int | str = "1G"
    fmt: str = "raw"
    target_speed: int | str | None = "100M"
    aio: str | None = None
    remote_target: bool = False
    link: LinkSpec | str | None = None
    reconnect_delay: int | None = None
    #: node options of the source and target images (`qmpkit.nodes.add_image`):
    #: ``cache.direct`` (O_DIRECT), ``detect-zeroes`` and the target's preallocation
    cache_direct: bool | None = None
    detect_zeroes: str | None = None
    preallocation: str | None = None

    def __post_init__(self) -> None:
        if self.fmt not in ("raw", "qcow2"):
            raise ArgumentError("format", f"must be raw or qcow2; got {self.fmt!r}")
        size = parse_size(self.size, name="size")
        if size < 1 << 20:
            raise ArgumentError("size", f"must be at least 1 MiB; got {self.size!r}")
        object.__setattr__(self, "size", size)
        if self.target_speed is not None:
            ts = parse_rate(self.target_speed, name="target_speed")
            if ts <= 0:
                raise ArgumentError("target_speed", f"must be > 0 bytes/s, or None for "
                                                    f"unthrottled; got {self.target_speed!r}")
            object.__setattr__(self, "target_speed", ts)
        if self.link is not None:
            object.__setattr__(self, "link", LinkSpec.parse(self.link))
            object.__setattr__(self, "remote_target", True)
        from .nodes import check_node_options
        check_node_options(aio=self.aio, cache_direct=bool(self.cache_direct),
                           detect_zeroes=self.detect_zeroes,
                           discard="unmap" if self.detect_zeroes == "unmap" else None)
        if self.preallocation not in (None, "off", "falloc", "full", "metadata"):
            raise ArgumentError("preallocation", f"must be off, falloc, full or metadata; "
                                                 f"got {self.preallocation!r}")
        if self.preallocation == "metadata" and self.fmt != "qcow2":
            raise ArgumentError("preallocation", "metadata needs format qcow2 (qemu-img "
                                                 "refuses it for raw)")

    def node_options(self) -> dict[str, Any]:
        """The options `add_image` takes for both images (not preallocation)."""
        opts: dict[str, Any] = {"aio": self.aio}
        if self.cache_direct:
            opts["cache_direct"] = True
        if self.detect_zeroes:
            opts["detect_zeroes"] = self.detect_zeroes
            if self.detect_zeroes == "unmap":
                opts["discard"] = "unmap"
        return opts

    def describe(self) -> str:
        speed = f"target throttled to {format_rate(self.target_speed)}" \
            if self.target_speed else "unthrottled target"
        where = ", over NBD in a second qemu-storage-daemon" if self.remote_target else ""
        if isinstance(self.link, LinkSpec):
            where += f", across a {self.link.describe()} link"
        return f"{format_size(self.size)} {self.fmt} source, {speed}{where}"

    def link_meta(self) -> dict[str, Any] | None:
        """The trace's ``link`` key: ``rtt_s``, ``rate_bps`` (bytes/s), ``jitter_s``."""
        return self.link.to_meta() if isinstance(self.link, LinkSpec) else None


@dataclass
class RunResult:
    trace: Trace
    folder: Path | None
    converged: bool
    error: BaseException | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def check_free_space(setup: Setup, base_dir: os.PathLike[str] | str | None, *,
                     copies: int = 2) -> None:
    """Refuse a disk size the temp dir's file system cannot hold (``copies``
    images of ``setup.size``: the source, the target, the offline copy).

    :raise ArgumentError: naming ``size``, with both figures.
    """
    import shutil
    import tempfile
    where = Path(base_dir) if base_dir is not None else Path(tempfile.gettempdir())
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return
    need = copies * int(setup.size)
    if need > free:
        raise ArgumentError("size", f"{copies} images of {format_size(setup.size)} need "
                                    f"{format_size(need)} in {where}, which has "
                                    f"{format_size(free)} free")


async def measure_offline_copy(src: os.PathLike[str] | str, workdir: os.PathLike[str] | str, *,
                               fmt: str = "raw") -> float:
    """Bytes/s of ``qemu-img convert`` of ``src`` into a fresh image: the offline copy
    speed a mirror is compared against."""
    dst = Path(workdir) / "offline-copy.img"
    size = int((await image_info(src))["virtual-size"])
    await create_image(dst, size, fmt=fmt)       # a fresh target, as each mirror gets
    t0 = time.monotonic()
    await convert_image(src, dst, src_fmt=fmt, dst_fmt=fmt, existing=True)
    secs = time.monotonic() - t0
    with contextlib.suppress(OSError):
        dst.unlink()
    return size / secs if secs > 0 else 0.0


async def run_experiment(*, setup: Setup = Setup(), load: FioLoad | None = None,
                         mirror: dict[str, Any] | None = None, time_limit: float = 60.0,
                         hz: float = 10.0, out: os.PathLike[str] | str | None = None,
                         label: str | None = None, verify: bool = True,
                         offline_copy_bps: float | None = None,
                         measure_offline: bool = True,
                         load_lead_s: float = 0.5,
                         give_up: Callable[[Any], bool] | None = None,
                         on_start: Callable[[MirrorRun], None] | None = None,
                         max_errors: int | None = None,
                         command_timeout: float | None = None,
                         rescue_after: float | None = None,
                         base_dir: os.PathLike[str] | str | None = None,
                         qemu_trace: bool = False) -> RunResult:
    """Run one mirror under a load on a fresh embedded QEMU, and record it.

    :param mirror: `mirror_arguments` keywords (granularity, buf_size, copy_mode...).
    :param time_limit: seconds to wait for READY; a run past it is not converged
        (censored) and is cancelled.
    :param out: the trace folder to write (also on failure); None keeps it in memory.
    :param give_up: called with the `Recording` twice a second; True stops waiting
        for READY early (recorded as not converged, ``early_stopped``).
    :param on_start: called with the `MirrorRun` once the mirror runs (for live views).
    :param qemu_trace: turn on QEMU's ``mirror_*`` trace events and summarize them
        into the summary's ``qemu_ops`` (`qmpkit.analysis.mirror_ops`: operations,
        their size, waits for an in-flight slot). Costs a log line per operation.
    :raise ArgumentError: bad settings, before anything starts.
    :raise QmpkitError: the run failed; the trace is saved first.
    """
    options = dict(mirror or {})
    mirror_arguments(device="src", target="dst", **options)   # all checks, before any work
    if not 0 < time_limit < float("inf"):
        raise ArgumentError("time_limit", f"must be > 0 seconds and finite; got {time_limit!r}")
    check_free_space(setup, base_dir, copies=3 if measure_offline else 2)
    folder = prepare_out_dir(out) if out is not None else None
    meta: dict[str, Any] = {"label": label, "disk_bytes": setup.size,
                            "setup": {"size": setup.size, "format": setup.fmt,
                                      "target_speed_bps": setup.target_speed,
                                      "remote_target": setup.remote_target,
                                      "reconnect_delay_s": setup.reconnect_delay,
                                      "aio": setup.aio, "cache_direct": setup.cache_direct,
                                      "detect_zeroes": setup.detect_zeroes,
                                      "preallocation": setup.preallocation},
                            "link": setup.link_meta(),
                            "workload": load.to_dict() if load else None,
                            "workload_text": (load.describe() if load else "no write load") +
                                             f"; {setup.describe()}",
                            "time_limit_s": time_limit, "hz": hz}
    # QEMU's log trace backend prints only events enabled on its command line
    qemu = await Qemu.open(workdir=base_dir, command_timeout=command_timeout,
                           extra_args=["--trace", "mirror_*"] if qemu_trace else ())
    run: MirrorRun | None = None
    fio: FioRunner | None = None
    converged = False
    error: BaseException | None = None
    extra: dict[str, Any] = {}
    remote: Qemu | None = None
    link: LinkProcess | None = None
    try:
        meta["qemu_version"] = ".".join(map(str, await qemu.client.version()))
        await qemu.nodes.add_image("src", setup.size, fmt=setup.fmt, fill="mixed",
                                   **setup.node_options())
        if setup.remote_target:
            remote = await Qemu.open(workdir=base_dir)
        where = remote or qemu
        await where.nodes.add_image("disk", setup.size, fmt=setup.fmt,
                                    preallocation=setup.preallocation, **setup.node_options())
        target = "disk"
        if setup.target_speed:
            target = await where.nodes.add_throttled("dst", "disk",
                                                     bps_write=setup.target_speed)
        if remote is not None:
            uri = await remote.nodes.export_nbd(target, export="dst")
            if isinstance(setup.link, LinkSpec):
                # the source daemon reaches the target only through the link
                link = await LinkProcess.start(setup.link, await remote.nodes.nbd_socket(),
                                               base_dir=base_dir)
                uri = link.nbd_uri("dst")
            target = await qemu.nodes.add_nbd("remote-dst", uri,
                                              reconnect_delay=setup.reconnect_delay)
        if load is not None:
            uri = await qemu.nodes.export_nbd("src")
            fio = FioRunner(load, uri, qemu.workdir / "fio")
            await fio.start()
            await asyncio.sleep(load_lead_s)   # the guest writes before the mirror starts
        run = MirrorRun(qemu, device="src", target=target, hz=hz, out=folder, meta=meta,
                        max_errors=max_errors, rescue_after=rescue_after, **options)
        await run.start()
        if on_start is not None:
            on_start(run)
        outcome = await run.wait_ready(timeout=time_limit, give_up=give_up)
        converged = outcome == "ready"
        run.extra["early_stopped"] = outcome == "gave up"
        if not converged:
            log.info("%s: not READY (censored: %s)", label, outcome)
        if fio is not None:
            result = await fio.stop()
            run.extra["guest"] = result.summary()
            # fio's log counts from fio's start; the trace from the mirror's.
            assert run.started_at is not None
            run.fio_latency = fio.latency_since(run.started_at)
        if converged:
            await run.complete(timeout=max(60.0, time_limit))
            if verify:
                src_file, _ = await qemu.image_of("src")
                dst_file, _ = await where.image_of("disk")
                await run.verify(files=((src_file, setup.fmt), (dst_file, setup.fmt)),
                                 watch=("src",))
        else:
            try:
                await run.cancel(timeout=60)
            except QmpConnectionError as exc:
                # QEMU hung or died while the run ended anyway: say so, clean up below
                run.error = str(exc)
        if offline_copy_bps is None and measure_offline and folder is not None:
            src_file, _ = await qemu.image_of("src")
            offline_copy_bps = await measure_offline_copy(src_file, qemu.workdir, fmt=setup.fmt)
    except BaseException as exc:
        error = exc
        raise
    finally:
        if fio is not None and fio.running:
            await fio.kill()
        if run is not None:
            if offline_copy_bps:
                run.extra["offline_copy_bps"] = offline_copy_bps
            died = qemu.daemon.returncode if qemu.daemon is not None else None
            if died is not None and died < 0:
                # QEMU itself crashed (QEMU 7.2 was seen to segfault when cancelling a
                # mirror): say so, rather than just "connection lost".
                sig = signal.Signals(-died).name
                run.error = f"qemu-storage-daemon died of {sig}"
                run.extra["qemu_crashed"] = sig
                if isinstance(error, QmpkitError):
                    error = QmpkitError(f"qemu-storage-daemon died of {sig} during the run "
                                        f"({error})")
            if qemu_trace and qemu.daemon is not None:
                run.extra["qemu_ops"] = mirror_ops(qemu.daemon.output())
            await run.close(error)
            trace = run.trace()
            extra = run.extra
        else:
            trace = Trace(meta=meta)
            if error is not None:
                trace.summary["error"] = "interrupted" if isinstance(
                    error, (asyncio.CancelledError, KeyboardInterrupt)) \
                    else f"{type(error).__name__}: {error}"
            if folder is not None:
                trace.save(folder)
        with contextlib.suppress(QmpkitError):
            await qemu.close()
        if link is not None:          # after the NBD client side is gone
            with contextlib.suppress(QmpkitError, OSError):
                await link.close()
        if remote is not None:        # after the NBD client side is gone
            with contextlib.suppress(QmpkitError):
                await remote.close()
    return RunResult(trace=trace, folder=folder, converged=converged, error=error, extra=extra)


async def probe_lab(*, size: int | str, load: FioLoad, granularities: Any,
                    seconds: float, fmt: str = "raw",
                    base_dir: os.PathLike[str] | str | None = None,
                    lead_s: float = 0.5, on_tick: Callable[[Any], None] | None = None) -> Any:
    """Probe the lab's own load: a fresh embedded QEMU, a source of ``size``
    with ``load`` writing into it over NBD, watched by `qmpkit.probe.probe`.

    QEMU counts no writes for an NBD export's node, so the guest's write rate
    is fio's own: its bandwidth and IOPS over the probe's seconds.
    """
    from .probe import probe

    async def none() -> tuple[int, int]:
        return 0, 0
    async with await Qemu.open(workdir=base_dir) as qemu:
        await qemu.nodes.add_image("src", size, fmt=fmt, fill="mixed")
        fio = FioRunner(load, await qemu.nodes.export_nbd("src"), qemu.workdir / "fio")
        await fio.start()
        try:
            await asyncio.sleep(lead_s)
            profile = await probe(qemu, "src", granularities=granularities, seconds=seconds,
                                  write_counter=none, on_tick=on_tick)
        finally:
            result = await fio.stop()
    if result is not None:
        profile.write_bytes = int(result.write_bw_bps * profile.seconds)
        profile.write_ops = int(result.write_iops * profile.seconds)
    return profile
