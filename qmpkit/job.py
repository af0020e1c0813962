"""
Block jobs, driven by QEMU's events.

`JobState` is the pure state machine: it takes QMP job events one by one and
knows the job's status, whether it was READY, its errors and how it ended. It
does no I/O, so it is tested on its own.

`Job` binds a state to a live QMP connection. It registers its event
listener *before* the job is created, so no event is missed, and a pump task
feeds every event into the state. Waits (`Job.wait_ready`,
`Job.wait_status`, `Job.wait_done`) are woken by events, never by polling,
and each has one overall deadline::

    job = await start_mirror(client, device="src", target="dst")
    await job.wait_ready(timeout=60)
    await job.complete(timeout=60)   # pivot, finalize, dismiss as needed
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from qemu.qmp import EventListener

from .aio import within
from .client import Client, event_matches
from .errors import JobFailedError, JobTimeoutError, QmpConnectionError

__all__ = ["JobState", "Job", "JobEnd", "JOB_EVENTS", "TERMINAL"]

log = logging.getLogger(__name__)

JOB_EVENTS = ("JOB_STATUS_CHANGE", "BLOCK_JOB_READY", "BLOCK_JOB_ERROR",
              "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_PENDING")
#: statuses after which the job does no more work
TERMINAL = frozenset({"concluded", "null"})
#: BLOCK_JOB_ERROR events kept in full at the start and at the end of a flood
#: (``on-*-error=ignore`` on a full disk sends thousands a second); the rest
#: are only counted, so memory stays bounded whatever the event rate.
KEEP_ERRORS = 20


class JobEnd(enum.Enum):
    """How a job ended."""
    COMPLETED = "completed"   # BLOCK_JOB_COMPLETED without error
    CANCELLED = "cancelled"   # BLOCK_JOB_CANCELLED
    FAILED = "failed"         # BLOCK_JOB_COMPLETED with an error


def _event_job_id(event: Mapping[str, Any]) -> str | None:
    data = event.get("data", {})
    return data.get("id", data.get("device"))


@dataclass
class JobState:
    """What the events of one job said so far. Pure: no I/O."""

    job_id: str
    status: str | None = None
    ready: bool = False
    ready_at: float | None = None
    end: JobEnd | None = None
    error: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)   # the first KEEP_ERRORS
    events: list[dict[str, Any]] = field(default_factory=list)
    error_count: int = 0
    recent_errors: collections.deque[dict[str, Any]] = field(
        default_factory=lambda: collections.deque(maxlen=KEEP_ERRORS))
    recent_error_events: collections.deque[dict[str, Any]] = field(
        default_factory=lambda: collections.deque(maxlen=KEEP_ERRORS))
    offset: int | None = None
    length: int | None = None
    connection_lost: bool = False

    def accepts(self, event: Mapping[str, Any]) -> bool:
        return event.get("event") in JOB_EVENTS and _event_job_id(event) == self.job_id

    def apply(self, event: Mapping[str, Any]) -> None:
        """Take one QMP event (a dict with ``event``, ``data``, ``timestamp``)."""
        if not self.accepts(event):
            return
        name, data = event["event"], event.get("data", {})
        if name == "BLOCK_JOB_ERROR":
            self.error_count += 1
            self.recent_errors.append(dict(data))
            if self.error_count > KEEP_ERRORS:
                # A flood: keep the count and the latest few, not every event.
                self.recent_error_events.append(dict(event))
                return
        self.events.append(dict(event))
        if name == "JOB_STATUS_CHANGE":
            self.status = data["status"]
        elif name == "BLOCK_JOB_READY":
            self._mark_ready(event)
        elif name == "BLOCK_JOB_ERROR":
            self.errors.append(dict(data))
        elif name == "BLOCK_JOB_COMPLETED":
            self.error = data.get("error")
            self.end = JobEnd.FAILED if self.error else JobEnd.COMPLETED
        elif name == "BLOCK_JOB_CANCELLED":
            self.end = JobEnd.CANCELLED
        if name in ("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
            self.offset, self.length = data.get("offset"), data.get("len")

    def _mark_ready(self, event: Mapping[str, Any]) -> None:
        # READY comes from BLOCK_JOB_READY (it carries offset/len), not from
        # the status change that precedes it.
        if not self.ready:
            self.ready = True
            ts = event.get("timestamp")
            self.ready_at = ts["seconds"] + ts["microseconds"] / 1e6 if ts else None

    def refresh(self, info: Mapping[str, Any] | None) -> None:
        """Take a ``query-jobs`` entry (or None: the job is gone) after a reconnect."""
        if info is None:
            if self.status not in TERMINAL:
                self.status = "null"
            return
        self.status = info["status"]
        if self.status in ("ready", "standby"):
            self.ready = True
        if info.get("error"):
            self.error = info["error"]
            self.end = JobEnd.FAILED

    def all_events(self) -> list[dict[str, Any]]:
        """Every kept event in order: the first errors of a flood, the others,
        and the latest errors (the events in between are only counted)."""
        if not self.recent_error_events:
            return list(self.events)
        return sorted(self.events + list(self.recent_error_events),
                      key=lambda e: e.get("received", 0.0))

    @property
    def dropped_errors(self) -> int:
        """BLOCK_JOB_ERROR events counted but not kept."""
        return max(0, self.error_count - KEEP_ERRORS - len(self.recent_error_events))

    @property
    def finished(self) -> bool:
        """The job does no more work (its end is known, or it is gone)."""
        return self.end is not None or self.status in TERMINAL

    def failure(self) -> str | None:
        """QEMU's error message if the job failed, else None."""
        if self.end is JobEnd.FAILED:
            return self.error or "job failed"
        if self.status in TERMINAL and self.error:
            return self.error
        return None


class Job:
    """A block job on a live QEMU, its state kept current by events.

    Create it with `Job.watch` *before* the command that starts the job, then
    call `Job.started` or `Job.abandon`. `start_mirror` does this for you.
    """

    def __init__(self, client: Client, job_id: str, *, auto_finalize: bool = True,
                 auto_dismiss: bool = True) -> None:
        self.client = client
        self.job_id = job_id
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss
        self.state = JobState(job_id)
        self.started_at: float | None = None   # time.monotonic() when started
        self._changed = asyncio.Condition()
        self._listener: EventListener | None = None
        self._pump: asyncio.Task[None] | None = None
        self._inflight: asyncio.Future[Any] | None = None   # the pump's pending read
        self._callbacks: list[Callable[[dict[str, Any]], None]] = []

    # -- lifecycle of the watcher ----------------------------------------------

    @classmethod
    def watch(cls, client: Client, job_id: str, **kwargs: Any) -> "Job":
        job = cls(client, job_id, **kwargs)
        job._attach(client)
        return job

    def _attach(self, client: Client) -> None:
        self.client = client
        self._listener = EventListener(JOB_EVENTS, lambda ev: self.state.accepts(ev))
        client.register_listener(self._listener)
        self._pump = asyncio.get_running_loop().create_task(
            self._run_pump(client, self._listener), name=f"qmpkit-job-{self.job_id}")

    def started(self) -> None:
        """Mark the job's start (call it just before the command that creates it)."""
        self.started_at = time.monotonic()

    async def abandon(self) -> None:
        """Stop watching (the job could not be started, or the caller is done)."""
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
            self._pump = None
        if self._listener is not None:
            self.client.remove_listener(self._listener)
            self._listener = None

    async def reattach(self, client: Client) -> None:
        """Follow the same job over a new QMP connection (after the old one dropped).

        :raise JobFailedError: the job is gone and its end is unknown.
        """
        await self.abandon()
        self._attach(client)
        async with self._changed:
            self.state.connection_lost = False
            self.state.refresh(await self.info())
            self._changed.notify_all()

    def on_event(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """Call ``callback(event)`` for each of this job's events, as it arrives."""
        self._callbacks.append(callback)

    def _deliver(self, event: dict[str, Any]) -> None:
        event = dict(event)
        event["received"] = time.monotonic()   # for traces: QEMU's clock differs
        self.state.apply(event)
        log.debug("job %s: %s %s", self.job_id, event["event"], event.get("data"))
        for cb in self._callbacks:
            try:
                cb(event)
            except Exception:                  # a view's bug must not stop the job's state
                log.exception("job %s: event callback failed", self.job_id)

    def _drain(self) -> bool:
        """Apply every event already received (QEMU sends a command's events before
        its reply, but the pump may not have run yet). True if any was applied."""
        listener = self._listener
        if listener is None:
            return False
        applied = False
        # The pump's own read may hold the oldest event, taken but not yet applied.
        got = self._inflight
        if got is not None and got.done() and not got.cancelled() and got.exception() is None:
            self._inflight = None
            self._deliver(got.result())
            applied = True
        while not listener.empty():
            self._deliver(listener._queue.get_nowait())   # noqa: SLF001 (qemu.qmp's queue)
            applied = True
        return applied

    async def _run_pump(self, client: Client, listener: EventListener) -> None:
        lost = asyncio.ensure_future(client.lost.wait())
        get: asyncio.Future[Any] | None = None
        try:
            while True:
                get = self._inflight = asyncio.ensure_future(listener.get())
                done, _ = await asyncio.wait({get, lost}, return_when=asyncio.FIRST_COMPLETED)
                if get in done:
                    async with self._changed:
                        self._drain()       # this event first (unless a drain took it)
                        self._changed.notify_all()
                else:
                    async with self._changed:
                        self._drain()
                        self.state.connection_lost = True
                        self._changed.notify_all()
                    return
        finally:
            # Cancelled (abandon) or done: no inner task may outlive the pump.
            for task in (get, lost):
                if task is not None and not task.done():
                    task.cancel()
            await asyncio.gather(*(t for t in (get, lost) if t is not None),
                                 return_exceptions=True)

    # -- waiting -------------------------------------------------------------------

    async def _wait(self, predicate: Callable[[JobState], bool], waiting_for: str,
                    timeout: float) -> None:
        def check() -> bool:
            if predicate(self.state):
                return True
            if self.state.connection_lost:
                raise QmpConnectionError(
                    f"QMP connection lost while waiting for job {self.job_id!r} to "
                    f"{waiting_for}", address=self.client.address)
            return False

        try:
            async with self._changed:
                self._drain()      # decide on every event QEMU has sent so far
                await within(self._changed.wait_for(check), timeout)
        except asyncio.TimeoutError:
            raise JobTimeoutError(job_id=self.job_id, last_status=self.state.status,
                                  waiting_for=waiting_for, timeout=timeout) from None

    def _raise_if_failed(self) -> None:
        msg = self.state.failure()
        if msg is not None:
            raise JobFailedError(msg, job_id=self.job_id, last_status=self._last_live_status(),
                                 errors=self.state.errors)

    def _last_live_status(self) -> str | None:
        # The last status before the job wound down says more than "null".
        for ev in reversed(self.state.events):
            if ev["event"] == "JOB_STATUS_CHANGE" and ev["data"]["status"] not in (
                    "aborting", "concluded", "null", "pending", "waiting"):
                return ev["data"]["status"]
        return self.state.status

    async def wait_ready(self, *, timeout: float = 60.0) -> None:
        """Wait for ``BLOCK_JOB_READY``.

        :raise JobFailedError: the job failed or was cancelled first.
        :raise JobTimeoutError: not READY within ``timeout`` seconds.
        """
        await self._wait(lambda s: s.ready or s.finished, "become ready", timeout)
        self._raise_if_failed()
        if not self.state.ready:
            raise JobFailedError(f"job ended ({self.state.end.value if self.state.end else 'gone'})"
                                 " before it was ready", job_id=self.job_id,
                                 last_status=self._last_live_status(), errors=self.state.errors)

    async def wait_status(self, *statuses: str, timeout: float = 30.0) -> str:
        """Wait until the job's status is one of ``statuses``; returns it.

        :raise JobFailedError: the job ended in failure first.
        :raise JobTimeoutError: no such status within ``timeout`` seconds.
        """
        wanted = set(statuses)
        what = f"reach status {'/'.join(statuses)}"
        # Not `finished`: BLOCK_JOB_COMPLETED comes before pending/concluded/null,
        # and a caller may wait for exactly those.
        await self._wait(lambda s: s.status in wanted or s.status in TERMINAL, what, timeout)
        if self.state.status in wanted:
            return self.state.status
        self._raise_if_failed()
        raise JobFailedError(f"job ended ({self.state.status}) before it could {what}",
                             job_id=self.job_id, last_status=self._last_live_status(),
                             errors=self.state.errors)

    async def wait_done(self, *, timeout: float = 60.0) -> JobEnd:
        """Wait until the job has ended, finalizing and dismissing it as its
        ``auto-finalize``/``auto-dismiss`` settings require.

        :raise JobFailedError: the job ended with an error.
        :raise JobTimeoutError: not ended within ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        left = lambda: max(0.0, deadline - loop.time())  # noqa: E731
        if not self.auto_finalize:
            await self._wait(lambda s: s.status in ("pending", "concluded", "null")
                             or s.end is not None, "reach pending", left())
            if self.state.status == "pending":
                await self.finalize()
        if not self.auto_dismiss:
            await self._wait(lambda s: s.status in TERMINAL, "conclude", left())
            if self.state.status == "concluded":
                await self.dismiss()
        await self._wait(lambda s: s.status == "null", "end", left())
        self._raise_if_failed()
        return self.state.end or JobEnd.COMPLETED

    async def wait_event(self, name: str,
                         match: Mapping[str, Any] | Callable[[dict[str, Any]], bool] | None = None,
                         *, timeout: float = 30.0, since: int = 0) -> dict[str, Any]:
        """Wait for this job's event ``name`` whose ``data`` holds ``match`` (a dict
        of fields, or a predicate on the event); events already received from
        index ``since`` of `JobState.events` count. Returns the event.

        :raise JobTimeoutError: no such event within ``timeout`` seconds.
        """
        def matches(ev: dict[str, Any]) -> bool:
            return event_matches(ev, name, match)

        found: list[dict[str, Any]] = []

        def seen(state: JobState) -> bool:
            found[:] = [e for e in state.events[since:] if matches(e)][:1]
            return bool(found)

        await self._wait(seen, f"send {name}", timeout)
        return found[0]

    # -- control --------------------------------------------------------------------

    async def _command(self, command: str, args: Mapping[str, Any]) -> Any:
        """Run a command, then apply the events QEMU sent before its reply."""
        result = await self.client.execute(command, args)
        async with self._changed:
            if self._drain():
                self._changed.notify_all()
        return result

    async def _run(self, command: str, args: Mapping[str, Any] | None = None) -> Any:
        return await self._command(command, {"id": self.job_id, **(args or {})})

    async def set_speed(self, speed: int) -> None:
        """Change the job's speed limit live (bytes/s; 0 = unlimited)."""
        await self._command("block-job-set-speed", {"device": self.job_id, "speed": speed})

    async def pause(self, *, timeout: float | None = 30.0) -> None:
        """Pause; with a timeout, wait until QEMU says ``paused`` (or ``standby``)."""
        await self._run("job-pause")
        if timeout is not None:
            await self.wait_status("paused", "standby", timeout=timeout)

    async def resume(self, *, timeout: float | None = 30.0) -> None:
        await self._run("job-resume")
        if timeout is not None:
            await self.wait_status("running", "ready", timeout=timeout)

    async def complete(self, *, timeout: float | None = 60.0) -> JobEnd | None:
        """Pivot to the target (``job-complete``) and wait until the job has ended.

        With ``timeout=None`` it only sends the command and returns None: how
        the job ends is then known only from its events.

        :raise QemuCommandError: QEMU refused (e.g. the job is not READY yet).
        """
        await self._run("job-complete")
        if timeout is None:
            return None
        return await self.wait_done(timeout=timeout)

    async def cancel(self, *, force: bool = True, timeout: float | None = 60.0) -> JobEnd | None:
        """Cancel the job and wait until it has ended; returns how QEMU ended it.

        ``force=False`` on a READY mirror ends it with a point-in-time copy and
        no pivot (QEMU reports ``BLOCK_JOB_COMPLETED``: `JobEnd.COMPLETED`);
        ``force=True`` abandons the copy (`JobEnd.CANCELLED`). With
        ``timeout=None`` it only sends the command and returns None.
        """
        await self._command("block-job-cancel", {"device": self.job_id, "force": force})
        if timeout is None:
            return None
        return await self.wait_done(timeout=timeout)

    async def finalize(self) -> None:
        """``job-finalize``, unless the job is already past ``pending``."""
        async with self._changed:
            self._drain()
        if self.state.status in ("concluded", "null"):
            return
        await self._run("job-finalize")

    async def dismiss(self) -> None:
        """``job-dismiss``, unless QEMU has already forgotten the job."""
        async with self._changed:
            self._drain()
        if self.state.status == "null":
            return
        await self._run("job-dismiss")

    async def info(self) -> dict[str, Any] | None:
        """This job's ``query-jobs`` entry, or None once QEMU has forgotten it."""
        for j in await self.client.execute("query-jobs"):
            if j["id"] == self.job_id:
                return j
        return None

    async def block_info(self) -> dict[str, Any] | None:
        """This job's ``query-block-jobs`` entry (offset, len, speed, busy...)."""
        for j in await self.client.execute("query-block-jobs"):
            if j["device"] == self.job_id:
                return j
        return None

    def __repr__(self) -> str:
        return f"<Job {self.job_id!r} status={self.state.status} ready={self.state.ready}>"

