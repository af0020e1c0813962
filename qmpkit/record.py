"""
Record mirror jobs over time: the sampler.

A `Recorder` samples every job added to it, on one QMP connection, as an
asyncio task beside other work (a notebook's widgets, a fio load). Each tick
costs two QMP commands however many jobs it records: ``query-block-jobs`` for the
progress, and ``query-named-block-nodes`` for the dirty bitmaps.

The dirty count is the job's anonymous dirty bitmap. QEMU 7.2 keeps it on the
source node; QEMU 8.2 and later on the mirror's filter node. The recorder
looks on both: the job's ``source`` and ``main node`` in QEMU's block graph.

READY and errors come from the job's QMP events (each kept with the time it
arrived), never from the samples. QEMU's job works in 100 ms slices, so
samples faster than 10 Hz show a saw-tooth: the progress moves a slice at a
time.

::

    async with Recorder(qemu.client, hz=10) as rec:
        recording = rec.add(job, meta={"disk_bytes": size})
        await job.wait_ready(timeout=120)
    recording.trace().save("out/run1")
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import replace
from typing import Any

from .aio import ticks, within
from .analysis import Forecast, forecast, rate, summarize
from .client import Client
from .errors import ArgumentError, QemuCommandError, QmpkitError, QmpTimeoutError
from .job import Job
from .nodes import graph_children
from .trace import Sample, Trace

__all__ = ["Recorder", "Recording", "checkpoint"]

log = logging.getLogger(__name__)


class Recording:
    """The samples of one job, and its trace on demand."""

    def __init__(self, job: Job, meta: dict[str, Any]) -> None:
        self.job = job
        self.meta = meta
        self.samples: list[Sample] = []
        self.dirty_nodes: tuple[str, ...] | None = None   # where the bitmap may sit
        self.started_wall = time.time()

    @property
    def started_at(self) -> float:
        return self.job.started_at if self.job.started_at is not None else 0.0

    def forecast(self, window_s: float = 3.0) -> Forecast:
        return forecast(self.samples, ready=self.job.state.ready, window_s=window_s)

    def events(self) -> list[dict[str, Any]]:
        """The job's QMP events, each with ``t_s`` since the job started."""
        out = []
        for ev in self.job.state.all_events():
            out.append({"t_s": round(ev.get("received", self.started_at) - self.started_at, 6),
                        "event": ev["event"], "data": ev.get("data", {}),
                        "timestamp": ev.get("timestamp")})
        return out

    def trace(self, *, completed: bool | None = None, verified: bool | None = None,
              extra: dict[str, Any] | None = None) -> Trace:
        """A `Trace` of everything so far (callable at any time, also mid-run)."""
        meta = {"job_id": self.job.job_id, "started_at": self.started_wall, **self.meta}
        t = Trace(samples=list(self.samples), events=self.events(), meta=meta)
        t.summary = summarize(t, completed=completed, verified=verified)
        if self.job.state.failure():
            t.summary["error"] = self.job.state.failure()
        if extra:
            t.summary.update(extra)
        return t


#: a bitmap read slower than this thins the bitmap reads out (see `Recorder`)
SLOW_BITMAP_READ_S = 0.010


class Recorder:
    """Samples jobs at ``hz`` (default 10) until stopped.

    :param client: the QMP connection of the jobs.
    :param hz: samples per second (at least 50 are held on one job here).
    :param throughput_window_s: the window of `Sample.throughput_bps`.
    :param dirty: read the dirty bitmaps (one more QMP command per tick).
    :param dirty_budget: ``query-named-block-nodes`` describes every node, so on a
        big graph it costs QEMU's main loop dearly (55 ms a call at 1024 nodes
        here). Once one call takes more than `SLOW_BITMAP_READ_S`, the bitmaps
        are read only every k-th tick, so that they take at most this share of
        the time (default 2%); progress is still sampled every tick, and the
        samples between have ``dirty_bytes`` None.
    """

    def __init__(self, client: Client, *, hz: float = 10.0, throughput_window_s: float = 0.5,
                 dirty: bool = True, dirty_budget: float = 0.02) -> None:
        if not 0 < hz <= 1000:
            raise ArgumentError("hz", f"must be in (0, 1000]; got {hz!r}")
        self.client = client
        self.hz = hz
        self.window = throughput_window_s
        self.dirty = dirty
        self.recordings: list[Recording] = []
        self.error: BaseException | None = None
        self.ticks = 0
        self.skipped = 0          # ticks lost to a QEMU that did not answer in time
        if not 0 < dirty_budget <= 1:
            raise ArgumentError("dirty_budget", f"must be in (0, 1]; got {dirty_budget!r}")
        self.dirty_budget = dirty_budget
        self.dirty_every = 1      # read the bitmaps every this many ticks
        self._task: asyncio.Task[None] | None = None

    def add(self, job: Job, *, meta: dict[str, Any] | None = None) -> Recording:
        """Record ``job`` from the next tick on."""
        rec = Recording(job, dict(meta or {}))
        rec.meta.setdefault("params", dict(getattr(job, "arguments", {})))
        self.recordings.append(rec)
        return rec

    def start(self) -> "asyncio.Task[None]":
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                 name="qmpkit-recorder")
        return self._task

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self, *, final_sample: bool = True) -> None:
        """Stop sampling (after one last sample of jobs still running, which may take
        at most 2 s: a hung QEMU must not hold up a cleanup).

        :raise QmpkitError: the sampler itself failed (e.g. QMP connection lost).
        """
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            if final_sample and self.error is None and self.client.connected:
                with contextlib.suppress(QmpkitError, asyncio.TimeoutError):
                    await within(self.sample(), 2.0)
        if self.error is not None:
            raise self.error

    async def reattach(self, client: Client) -> None:
        """Go on sampling over a new QMP connection (after the old one dropped).
        Reattach the jobs themselves with `Job.reattach`."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.client = client
        self.error = None
        self.start()

    async def _run(self) -> None:
        try:
            async for _ in ticks(self.hz):
                try:
                    await self.sample()
                except QmpTimeoutError as exc:
                    # QEMU is slow or stopped: skip the tick and go on; it may answer again
                    log.info("sample skipped: %s", exc)
                    self.skipped += 1
        except QmpkitError as exc:
            log.warning("sampler stopped: %s", exc)
            self.error = exc

    async def sample(self) -> None:
        """Take one sample of every recorded job that QEMU still knows."""
        live = [r for r in self.recordings if not r.job.state.finished]
        if not live:
            return
        if self.dirty and any(r.dirty_nodes is None for r in live):
            await self._locate_bitmaps(live)
        # query-block-jobs: the same progress as query-jobs (offset/len), and from
        # QEMU 8.2 also actively-synced
        jobs_q = self.client.execute("query-block-jobs")
        if self.dirty and self.ticks % self.dirty_every == 0:
            t0 = time.perf_counter()
            jobs, nodes = await asyncio.gather(
                jobs_q, self.client.execute("query-named-block-nodes", {"flat": True}))
            cost = time.perf_counter() - t0
            if cost > SLOW_BITMAP_READ_S:     # a big graph: thin the bitmap reads out
                self.dirty_every = max(1, math.ceil(cost * self.hz / self.dirty_budget))
            else:
                self.dirty_every = 1
        else:
            jobs, nodes = await jobs_q, []
        now = time.monotonic()
        by_id = {j["device"]: j for j in jobs}
        bitmaps: dict[str, list[dict[str, Any]]] = {
            n["node-name"]: n.get("dirty-bitmaps", []) for n in nodes}
        self.ticks += 1
        for rec in live:
            info = by_id.get(rec.job.job_id)
            if info is None:
                continue
            dirty = None
            if rec.dirty_nodes:
                counts = [b["count"] for name in rec.dirty_nodes for b in bitmaps.get(name, ())
                          if "name" not in b]      # the job's bitmap is anonymous
                dirty = sum(counts) if counts else None
            cur, tot = int(info["offset"]), int(info["len"])
            # µs and 0.1 B/s: what a trace file keeps, so a loaded trace equals this one
            s = Sample(t_s=round(now - rec.started_at, 6), status=info["status"],
                       dirty_bytes=dirty,
                       current_progress=cur, total_progress=tot, remaining_bytes=tot - cur,
                       throughput_bps=0.0, actively_synced=info.get("actively-synced"))
            tp = rate(rec.samples + [s], "current_progress", self.window)
            rec.samples.append(replace(s, throughput_bps=round(max(0.0, tp or 0.0), 1)))

    async def _locate_bitmaps(self, recs: list[Recording]) -> None:
        for rec in recs:
            if rec.dirty_nodes is not None:
                continue
            try:
                edges = await graph_children(self.client, "block-job", rec.job.job_id)
            except QemuCommandError:
                # An unstable (x-) command: if it is gone, guess from the arguments.
                args = getattr(rec.job, "arguments", {})
                rec.dirty_nodes = tuple(n for n in (args.get("device"),
                                                    args.get("filter-node-name")) if n)
                continue
            rec.dirty_nodes = tuple(v for k, v in edges.items() if k in ("source", "main node"))

    async def __aenter__(self) -> "Recorder":
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def checkpoint(recording: Recording, folder: Any, *, every_s: float = 1.0,
                     **trace_kwargs: Any) -> None:
    """Save ``recording``'s trace to ``folder`` every ``every_s`` seconds until
    cancelled, so that even a killed process leaves a loadable trace (each file
    is replaced atomically)."""
    while True:
        await asyncio.sleep(every_s)
        recording.trace(**trace_kwargs).save(folder)
