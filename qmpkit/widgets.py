"""
ipywidgets panels for notebooks: targets, the fio load, the mirror, and a live dashboard.

Every button calls a coroutine of its panel that a notebook cell (or a test)
can also await directly: ``await panel.start()`` does what a click on
**Start** does. Clicks schedule that coroutine on the kernel's asyncio loop
and return its task; nothing here uses threads, and output of background
tasks goes to the panel's own output area, never to whichever cell ran last.

Plots are pushed into ``ipywidgets.Image`` widgets as PNG frames (a figure
displayed from an asyncio task would stay empty in JupyterLab).

Panels read traces and call the package; they never build QMP themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import io
import logging
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import ipywidgets as W

from .aio import within
from . import plots
from .errors import ArgumentError, QmpkitError
from .lifecycle import MirrorRun
from .link import LinkSpec, model_ceilings
from .mirror import COPY_MODES, ON_ERROR, SYNC_MODES, MirrorJob, mirror_arguments
from .record import Recording
from .session import Qemu
from .units import format_latency, format_rate, format_size, parse_rate, parse_size
from .workload import RW_MODES, FioLoad, FioResult, FioRunner

__all__ = ["TargetPanel", "WorkloadPanel", "MirrorPanel", "Dashboard", "SweepPanel",
           "node_table_html", "recommendation_html"]

log = logging.getLogger(__name__)

MiB = 1 << 20
TARGET_KINDS = ("file", "throttled", "null", "faulty", "nbd")
_LAYOUT = W.Layout(width="auto")
_DESC = {"description_width": "140px"}


def _text(description: str, value: str = "", placeholder: str = "") -> W.Text:
    # wide enough that a placeholder ("default: 64K for raw (power of 2)") is not cut off
    width = f"{max(300, 150 + 7 * len(placeholder))}px"
    return W.Text(value=value, placeholder=placeholder, description=description, style=_DESC,
                  layout=W.Layout(width=width))


def _drop(description: str, options: Any, value: Any = None) -> W.Dropdown:
    d = W.Dropdown(options=options, description=description, style=_DESC)
    if value is not None:
        d.value = value
    return d


class _Panel:
    """Shared plumbing: an output area, and buttons that run coroutines as tasks."""

    def __init__(self) -> None:
        self.out = W.Output(layout=W.Layout(max_height="160px", overflow="auto"))
        # one status line; the full text of errors behind a closed "details" toggle
        self.details = W.Accordion(children=[self.out], selected_index=None)
        self.details.set_title(0, "details")
        self.message = W.HTML()
        self._error_shown = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self.last_task: asyncio.Task[Any] | None = None   # what the last click started
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self.widget: W.Widget = W.VBox()

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        """The live widget, and a readable text form for where widgets cannot
        render (an untrusted notebook, nbval, a terminal): never ``VBox(children=...``."""
        bundle = dict(self.widget._repr_mimebundle_(**kwargs) or {})
        bundle["text/plain"] = self.text_form()
        return bundle

    def text_form(self) -> str:
        return f"{type(self).__name__}: run this cell to get the live panel"

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"

    def say(self, text: str, *, error: bool = False) -> None:
        self._error_shown = bool(text) and error
        if not text:
            self.message.value = ""
            return
        color = "#b00020" if error else "#333"
        self.message.value = f"<span style='color:{color}'>{html.escape(text)}</span>"

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        # Clicks may be delivered outside the loop the panel (and its QMP
        # connection) lives on: always run the coroutine on that loop.
        loop = self._loop
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if loop is None or here is loop:
            return self._track(coro)
        return asyncio.run_coroutine_threadsafe(self._on_loop(coro), loop)  # type: ignore

    async def _on_loop(self, coro: Awaitable[Any]) -> Any:
        return await self._track(coro)

    def _track(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            # A task's exception would vanish: show it in this panel.
            self.say(str(exc) if isinstance(exc, QmpkitError)
                     else f"{type(exc).__name__}: {exc}", error=True)
            self.out.clear_output()
            self.out.append_stderr(f"{type(exc).__name__}: {exc}\n")

    def _button(self, label: str, action: Callable[[], Awaitable[Any]], **kw: Any) -> W.Button:
        b = W.Button(description=label, **kw)

        def clicked(_b: W.Button) -> None:
            log.debug("%s clicked (thread %s)", label, threading.current_thread().name)
            self.last_task = self._spawn(action())

        b.on_click(clicked)
        return b

    async def _guard(self, coro: Awaitable[Any]) -> Any:
        """Run ``coro``; show a qmpkit error in the panel and re-raise it. An old
        error goes away when the next action succeeds."""
        try:
            result = await coro
        except QmpkitError as exc:
            self.say(str(exc), error=True)
            raise
        if self._error_shown:
            self.say("")
        return result


def node_table_html(rows: list[dict[str, Any]]) -> str:
    head = "<tr><th>node</th><th>driver</th><th>size</th><th>file</th></tr>"
    body = "".join(
        f"<tr><td>{html.escape(r['node'])}</td><td>{html.escape(r['driver'])}</td>"
        f"<td>{format_size(r['size'])}</td><td>{html.escape(r['file'])}</td></tr>"
        for r in rows)
    return f"<table>{head}{body}</table>"


class TargetPanel(_Panel):
    """Create a source and a target node, then show the node graph.

    Target kinds: ``file`` (raw/qcow2), ``throttled`` (a file behind a
    MiB/s limit), ``null``, ``faulty`` (blkdebug write errors), ``nbd`` (a
    remote export, by URI). The source is node ``source``; the target node
    is ``target``.
    """

    def __init__(self, qemu: Qemu, *, size: str = "1G", source: str = "src",
                 target: str = "dst") -> None:
        super().__init__()
        self.qemu = qemu
        self.source_name, self.target_name = source, target
        self.size = _text("size", size, "e.g. 1G, 512M")
        self.fmt = _drop("format", ("raw", "qcow2"), "raw")
        self.fill = _drop("source data", [("mixed pattern", "mixed"), ("empty", None)], "mixed")
        self.kind = _drop("target", TARGET_KINDS, "throttled")
        self.target_fmt = _drop("target format", ("raw", "qcow2"), "raw")
        self.limit = W.FloatText(value=100.0, description="limit (MiB/s)", style=_DESC)
        self.errno = _drop("fault", ("ENOSPC", "EIO"), "ENOSPC")
        self.once = W.Checkbox(value=True, description="fail only once")
        self.uri = _text("NBD URI", "", "nbd://host:port/export or nbd+unix:///x?socket=PATH")
        self.create_button = self._button("Create", self.create, button_style="primary")
        self.graph = W.HTML()
        self.widget = W.VBox([
            W.HTML("<b>Source and target</b>"),
            W.HBox([self.size, self.fmt, self.fill]),
            W.HBox([self.kind, self.target_fmt]),
            W.HBox([self.limit, self.errno, self.once]),
            self.uri, self.create_button, self.message, self.graph, self.details])
        self.kind.observe(lambda _c: self._show_fields(), names="value")
        self._show_fields()

    #: the fields each target kind uses (the others are hidden)
    FIELDS = {"file": ("target_fmt",), "throttled": ("target_fmt", "limit"), "null": (),
              "faulty": ("target_fmt", "errno", "once"), "nbd": ("uri",)}

    def _show_fields(self) -> None:
        wanted = self.FIELDS[self.kind.value]
        for name in ("target_fmt", "limit", "errno", "once", "uri"):
            getattr(self, name).layout.display = "" if name in wanted else "none"

    async def create(self) -> tuple[str, str]:
        """Create the source and the target as chosen; returns their node names.

        :raise ArgumentError: a bad size, limit or URI (nothing is created).
        """
        return await self._guard(self._create())

    async def _create(self) -> tuple[str, str]:
        size = parse_size(self.size.value, name="size")
        if size <= 0:
            raise ArgumentError("size", f"must be > 0, got {self.size.value!r}")
        kind = self.kind.value
        if kind == "throttled" and not self.limit.value > 0:
            raise ArgumentError("limit", f"must be > 0 MiB/s, got {self.limit.value}")
        if kind == "nbd" and not self.uri.value.strip():
            raise ArgumentError("uri", "give the NBD URI of the remote target")
        self.create_button.disabled = True
        try:
            g = self.qemu.nodes
            src, dst = self.source_name, self.target_name
            await g.add_image(src, size, fmt=self.fmt.value, fill=self.fill.value)
            if kind == "file":
                await g.add_image(dst, size, fmt=self.target_fmt.value)
            elif kind == "throttled":
                await g.add_image(f"{dst}-disk", size, fmt=self.target_fmt.value)
                await g.add_throttled(dst, f"{dst}-disk", bps_write=int(self.limit.value * MiB))
            elif kind == "null":
                await g.add_null(dst, size)
            elif kind == "faulty":
                await g.add_blkdebug(dst, size=size, fmt=self.target_fmt.value,
                                     errno=self.errno.value, once=self.once.value)
            else:
                await g.add_nbd(dst, self.uri.value.strip())
            await self.refresh()
            self.say(f"created {src} ({format_size(size)}) and a {kind} target {dst}")
            return src, dst
        finally:
            self.create_button.disabled = False

    async def refresh(self) -> list[dict[str, Any]]:
        rows = await self.qemu.nodes.table()
        self.graph.value = node_table_html(rows)
        return rows


class WorkloadPanel(_Panel):
    """Start and stop a fio write load into a node (through an NBD export)."""

    def __init__(self, qemu: Qemu, *, node: str = "src", rate: str = "20M", bs: str = "4K",
                 rw: str = "randwrite") -> None:
        super().__init__()
        self.qemu, self.node = qemu, node
        self.rate = _text("rate (per s)", rate, "0 = unlimited")
        self.bs = _text("block size", bs)
        self.rw = _drop("pattern", RW_MODES, rw)
        self.start_button = self._button("Start load", self.start, button_style="success")
        self.stop_button = self._button("Stop load", self.stop, disabled=True)
        self.runner: FioRunner | None = None
        self.result: FioResult | None = None
        self._uri: str | None = None
        self.widget = W.VBox([W.HTML("<b>Guest-like write load (fio)</b>"),
                              W.HBox([self.rw, self.bs, self.rate]),
                              W.HBox([self.start_button, self.stop_button]), self.message,
                              self.details])

    def load(self) -> FioLoad:
        return FioLoad(rw=self.rw.value, bs=self.bs.value, rate=self.rate.value,
                       latency_log=True)

    async def start(self) -> None:
        """Start fio; returns once it writes. :raise ArgumentError, ToolError:"""
        await self._guard(self._start())

    async def _start(self) -> None:
        load = self.load()
        if self.runner is not None and self.runner.running:
            raise ArgumentError("load", "a load is already running")
        if self._uri is None:
            self._uri = await self.qemu.nodes.export_nbd(self.node)
        self.runner = FioRunner(load, self._uri, self.qemu.workdir / "fio")
        await self.runner.start()
        self.start_button.disabled, self.stop_button.disabled = True, False
        self.say(f"{load.describe()} into {self.node}")

    def latency_for(self, recording: Recording) -> list[tuple[float, float]]:
        """fio's latency log on the recording's clock (seconds since its job started)."""
        if self.runner is None:
            return []
        return self.runner.latency_since(recording.started_at)

    async def stop(self) -> FioResult | None:
        """Stop fio and keep its results (None if it was not running)."""
        if self.runner is None or not self.runner.running:
            return None
        self.result = await self._guard(self.runner.stop())
        self.start_button.disabled, self.stop_button.disabled = False, True
        r = self.result

        def us(v: float | None) -> str:
            return format_latency(v) if v is not None else "-"
        self.say(f"stopped: {format_rate(r.write_bw_bps)} written, p50 {us(r.write_p50_us)}, "
                 f"p99 {us(r.write_p99_us)}")
        return r


def _opt(default_text: str, values: tuple[str, ...]) -> list[tuple[str, Any]]:
    return [(f"default ({default_text})", None)] + [(v, v) for v in values]


class MirrorPanel(_Panel):
    """Every ``blockdev-mirror`` argument, Start/Pause/Cancel/Complete, a live speed
    slider and a status line. Invalid values are refused here, before QEMU is asked.
    """

    def __init__(self, qemu: Qemu, *, device: str = "src", target: str = "dst",
                 hz: float = 10.0, verify: bool = True) -> None:
        super().__init__()
        self.qemu, self.hz = qemu, hz
        self.verify_after = verify
        self.verified: bool | None = None
        self.device = _text("device", device)
        self.target = _text("target", target)
        self.job_id = _text("job-id", "", "default: the device name")
        self.sync = _drop("sync", SYNC_MODES, "full")
        self.granularity = _text("granularity", "", "default: 64K for raw (power of 2)")
        self.buf_size = _text("buf-size", "", "default: 16M")
        self.speed = _text("speed", "", "default: 0 = unlimited")
        self.replaces = _text("replaces", "", "default: the device")
        self.on_source_error = _drop("on-source-error", _opt("report", ON_ERROR))
        self.on_target_error = _drop("on-target-error", _opt("report", ON_ERROR))
        self.copy_mode = _drop("copy-mode", _opt("background", COPY_MODES))
        self.filter_node_name = _text("filter-node-name", "", "default: QEMU picks")
        self.auto_finalize = _drop("auto-finalize", [("default (true)", None), ("true", True),
                                                     ("false", False)])
        self.auto_dismiss = _drop("auto-dismiss", [("default (true)", None), ("true", True),
                                                   ("false", False)])
        self.start_button = self._button("Start", self.start, button_style="primary")
        self.pause_button = self._button("Pause", self.toggle_pause, disabled=True)
        self.cancel_button = self._button("Cancel", self.cancel, disabled=True,
                                          button_style="warning")
        self.complete_button = self._button("Complete", self.complete, disabled=True,
                                            button_style="success")
        # shown only when this QEMU has block-job-change (8.2 and later)
        self.rescue_button = self._button("Switch to write-blocking", self.switch_to_write_blocking,
                                          disabled=True, button_style="info",
                                          layout=W.Layout(display="none", width="auto"))
        self.speed_slider = W.IntSlider(value=0, min=0, max=1000, step=10,
                                        description="speed MiB/s (0 = unlimited)",
                                        style={"description_width": "200px"},
                                        layout=W.Layout(width="520px"), continuous_update=False)
        self.speed_slider.observe(self._slider_moved, names="value")
        self.status = W.HTML("<b>status:</b> not started")
        self.run: MirrorRun | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.started_callbacks: list[Callable[[], Any]] = []   # e.g. a Dashboard's start
        for w in self._inputs():
            w.observe(lambda _c: self.validate(), names="value")
        self.widget = W.VBox([
            W.HTML("<b>blockdev-mirror</b> (empty fields and defaults are left to QEMU)"),
            W.HBox([self.device, self.target, self.job_id]),
            W.HBox([self.sync, self.granularity, self.buf_size]),
            W.HBox([self.speed, self.copy_mode, self.replaces]),
            W.HBox([self.on_source_error, self.on_target_error, self.filter_node_name]),
            W.HBox([self.auto_finalize, self.auto_dismiss]),
            self.message,
            W.HBox([self.start_button, self.pause_button, self.cancel_button,
                    self.complete_button, self.rescue_button]),
            self.speed_slider, self.status, self.details])

    @property
    def job(self) -> MirrorJob | None:
        """The job of the current (or last) run."""
        return self.run.job if self.run is not None else None

    @property
    def recording(self) -> Recording | None:
        return self.run.recording if self.run is not None else None

    def _inputs(self) -> list[W.Widget]:
        return [self.device, self.target, self.job_id, self.sync, self.granularity,
                self.buf_size, self.speed, self.replaces, self.on_source_error,
                self.on_target_error, self.copy_mode, self.filter_node_name,
                self.auto_finalize, self.auto_dismiss]

    def options(self) -> dict[str, Any]:
        """The panel's settings as `mirror_arguments` keywords (empty = QEMU's default)."""
        def text(w: W.Text) -> str | None:
            return w.value.strip() or None
        return dict(device=self.device.value.strip(), target=self.target.value.strip(),
                    job_id=text(self.job_id), sync=self.sync.value,
                    granularity=text(self.granularity), buf_size=text(self.buf_size),
                    speed=text(self.speed), replaces=text(self.replaces),
                    on_source_error=self.on_source_error.value,
                    on_target_error=self.on_target_error.value,
                    copy_mode=self.copy_mode.value, filter_node_name=text(self.filter_node_name),
                    auto_finalize=self.auto_finalize.value, auto_dismiss=self.auto_dismiss.value)

    def validate(self) -> dict[str, Any] | None:
        """Check the settings; show the first problem and disable Start. Returns the
        exact QMP arguments, or None when something is invalid."""
        try:
            args = mirror_arguments(**self.options())
        except ArgumentError as exc:
            self.say(f"{exc.argument.replace('_', '-')}: {str(exc).split(': ', 1)[1]}",
                     error=True)
            self.start_button.disabled = True
            return None
        self.say("")
        self.start_button.disabled = self.job is not None and not self.job.state.finished
        return args

    # -- actions (each also callable from a cell) ------------------------------

    async def start(self) -> MirrorJob:
        """Start the mirror with the panel's settings, and record it.

        :raise ArgumentError: a setting is invalid (nothing is sent).
        """
        if self.validate() is None:
            raise ArgumentError("settings", self.message.value)
        opts = self.options()
        device, target = opts.pop("device"), opts.pop("target")
        self.start_button.disabled = True
        run = MirrorRun(self.qemu, device=device, target=target, hz=self.hz, **opts)
        run.on_event(self._on_event)
        try:
            job = await self._guard(run.start())
        except BaseException as exc:
            await run.close(exc)
            self.start_button.disabled = False
            raise
        self.run = run
        caps = await self.qemu.client.capabilities()
        self.rescue_button.layout.display = "" if caps.block_job_change else "none"
        self._watcher = asyncio.ensure_future(self._watch())
        for callback in self.started_callbacks:
            callback()
        self.pause_button.disabled = self.cancel_button.disabled = False
        # the slider shows the new job's speed, whatever the last job was left at
        self.speed_slider.unobserve(self._slider_moved, names="value")
        self.speed_slider.value = min(1000, parse_rate(self.speed.value) // MiB) \
            if self.speed.value.strip() else 0
        self.speed_slider.observe(self._slider_moved, names="value")
        self._update_status()
        return job

    async def wait_ready(self, *, timeout: float = 120.0) -> None:
        assert self.job is not None, "start the mirror first"
        await self.job.wait_ready(timeout=timeout)
        self._update_status()

    async def toggle_pause(self) -> None:
        assert self.job is not None
        if self.job.state.status in ("paused", "standby"):
            await self.resume()
        else:
            await self.pause()

    async def pause(self) -> None:
        assert self.job is not None, "start the mirror first"
        await self._guard(self.job.pause())
        self.pause_button.description = "Resume"
        self._update_status()

    async def resume(self) -> None:
        assert self.job is not None, "start the mirror first"
        await self._guard(self.job.resume())
        self.pause_button.description = "Pause"
        self._update_status()

    async def cancel(self) -> None:
        """Cancel (a READY mirror ends with a point-in-time copy and no pivot)."""
        assert self.run is not None, "start the mirror first"
        try:
            await self._guard(self.run.cancel())
        finally:
            await self._finish()

    async def complete(self) -> None:
        """Pivot to the target, wait until the job has ended, then (with ``verify``)
        compare source and target while checking that nothing writes to them:
        with a writer still running the panel says "cannot verify", never a
        false mismatch."""
        assert self.run is not None, "start the mirror first"
        try:
            await self._guard(self.run.complete(verify=self.verify_after))
        finally:
            await self._finish()
        v = self.run.verification
        if v is not None:
            self.verified = v.ok
            # the status line says it; the message line repeats only what needs a
            # look: a mismatch (an error) or a verification that could not be done
            self.say(str(v) if v.ok is not True else "", error=v.ok is False)
            self._update_status()

    async def switch_to_write_blocking(self) -> None:
        """Switch the running mirror to write-blocking (``block-job-change``, QEMU >=
        8.2): the rescue for a mirror whose forecast says it cannot converge."""
        assert self.run is not None, "start the mirror first"
        await self._guard(self.run.change(copy_mode="write-blocking", reason="panel"))
        self.say("switched to write-blocking: guest writes now go to both disks")
        self._update_status()

    async def set_speed(self, mib_per_s: int) -> None:
        assert self.job is not None, "start the mirror first"
        assert self.run is not None
        await self._guard(self.run.set_speed(int(mib_per_s) * MiB))
        self._update_status()

    def _slider_moved(self, change: dict[str, Any]) -> None:
        if self.job is not None and not self.job.state.finished:
            self.last_task = self._spawn(self.set_speed(change["new"]))

    async def _finish(self) -> None:
        if self.run is not None:
            await self.run.close()
            if self.run.cleanup_errors:
                self.say("; ".join(self.run.cleanup_errors), error=True)
        if self._watcher is not None:
            self._watcher.cancel()
        self._update_status()

    # -- status ------------------------------------------------------------------

    def _on_event(self, event: dict[str, Any]) -> None:
        self._update_status()

    async def _watch(self) -> None:
        while self.job is not None and not self.job.state.finished:
            self._update_status()
            await asyncio.sleep(0.25)
        self._update_status()

    def status_text(self) -> str:
        if self.job is None:
            return "not started"
        st = self.job.state
        if st.end is not None:
            parts = [f"job {self.job.job_id} ended: {st.end.value}" +
                     (f" ({st.error})" if st.error else "")]
            v = self.run.verification if self.run is not None else None
            if v is not None:
                parts.append(str(v) if v.ok is not False
                             else "NOT verified: target differs from source")
        else:
            parts = [f"job {self.job.job_id}: {st.status or 'starting'}"]
            if self.recording is not None:
                parts.append(self.recording.forecast().text)
        if st.recent_errors:
            e = st.recent_errors[-1]
            many = f" ({st.error_count} errors)" if st.error_count > 1 else ""
            parts.append(f"last error: {e.get('operation')} error, action {e.get('action')}"
                         f"{many}")
        return " | ".join(parts)

    def _update_status(self) -> None:
        self.status.value = f"<b>status:</b> {html.escape(self.status_text())}"
        if self.job is None:
            return
        st = self.job.state
        live = not st.finished
        self.complete_button.disabled = not (live and st.status == "ready")
        self.rescue_button.disabled = not live or (self.run is not None
                                                   and self.run.rescued_at is not None)
        self.pause_button.disabled = self.cancel_button.disabled = not live
        self.pause_button.description = "Resume" if st.status in ("paused", "standby") \
            else "Pause"
        self.start_button.disabled = live


class Dashboard(_Panel):
    """Live convergence and throughput plots of a `MirrorPanel`'s job.

    Frames are PNGs pushed into two Image widgets, at most ``fps`` times a
    second (default 2), from an asyncio task, so buttons and the slider stay
    live. The figures are drawn in a worker thread, never on the event loop
    that the sampler shares: a drawing there stalled the sampler (5.2 of 10 Hz
    asked, gaps of 2 s). When a frame takes longer than ``busy`` (default 50%)
    of the time between frames, the next waits longer, so drawing never takes
    more than that share of a core. ``benchmarks/dashboard_rate.py`` measures
    the sampler's achieved rate with the dashboard drawing and without.
    """

    def __init__(self, mirror: MirrorPanel, *, fps: float = 2.0, folder: str = "traces/run",
                 busy: float = 0.5) -> None:
        super().__init__()
        if not 0 < fps <= 30:
            raise ArgumentError("fps", f"must be in (0, 30]; got {fps!r}")
        if not 0 < busy <= 1:
            raise ArgumentError("busy", f"must be in (0, 1]; got {busy!r}")
        self.mirror, self.fps, self.busy = mirror, fps, busy
        self.draw_seconds = 0.0          # time spent drawing, all frames
        self._offload = True             # False draws on the loop (the benchmark's "before")
        # hidden until the first frame: an empty Image shows a broken-image icon
        self.convergence = W.Image(format="png", layout=W.Layout(width="640px", display="none"))
        self.throughput = W.Image(format="png", layout=W.Layout(width="640px", display="none"))
        self.waiting = W.HTML("<i>waiting for a job: press Start in the mirror panel</i>")
        self.folder = _text("save to", folder)
        self.save_button = self._button("Save trace", self.save)
        self.frames = 0
        self._drawn = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        mirror.started_callbacks.append(self.start)   # redraw from the moment it starts
        self.widget = W.VBox([W.HTML("<b>Live dashboard</b>"), self.waiting, self.convergence,
                              self.throughput, W.HBox([self.folder, self.save_button]),
                              self.message, self.details])

    def start(self) -> asyncio.Task[None]:
        """Redraw until the job ends (called when the mirror panel starts its job)."""
        if self._task is None or self._task.done():
            self._task = self._spawn(self._run())
        return self._task

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.render()

    async def _run(self) -> None:
        period = 1.0 / self.fps
        while True:
            t0 = time.monotonic()
            await self.draw()
            took = time.monotonic() - t0
            job = self.mirror.job
            if job is not None and job.state.finished:
                return
            # at most `busy` of the wall time drawing, and never more often than fps
            await asyncio.sleep(max(period - took, took * (1 / self.busy - 1)))

    async def draw(self) -> bool:
        """Draw one frame in a worker thread; False when there is nothing yet."""
        rec = self.mirror.recording
        if rec is None or not rec.samples:
            return False
        trace = rec.trace()          # a snapshot, taken on the loop
        t0 = time.monotonic()
        if self._offload:
            pngs = await asyncio.to_thread(_frame, trace)
        else:
            pngs = _frame(trace)
        self.draw_seconds += time.monotonic() - t0
        self._show(*pngs)
        return True

    def render(self) -> bool:
        """Draw one frame now, on the caller's thread; False when there is nothing yet."""
        rec = self.mirror.recording
        if rec is None or not rec.samples:
            return False
        self._show(*_frame(rec.trace()))
        return True

    def _show(self, convergence: bytes, throughput: bytes) -> None:
        self.convergence.value, self.throughput.value = convergence, throughput
        if self.frames == 0:
            self.waiting.layout.display = "none"
            self.convergence.layout.display = self.throughput.layout.display = ""
        self.frames += 1
        self._drawn.set()

    async def wait_frames(self, count: int, *, timeout: float = 30.0) -> None:
        """Wait until ``count`` frames have been drawn in all."""
        async def drawn() -> None:
            while self.frames < count:
                self._drawn.clear()
                await self._drawn.wait()
        await within(drawn(), timeout)

    async def save(self) -> Path:
        """Save the run so far as a trace folder (also mid-run)."""
        rec = self.mirror.recording
        if rec is None:
            raise ArgumentError("trace", "nothing recorded yet: start the mirror first")
        folder = rec.trace().save(self.folder.value)
        self.say(f"saved {folder}")
        return folder


def _frame(trace: Any) -> tuple[bytes, bytes]:
    """The dashboard's two PNGs. Thread-safe: Figure objects, no pyplot state."""
    return _png(plots.convergence(trace)), _png(plots.throughput(trace))


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return buf.getvalue()


class SweepPanel(_Panel):
    """Choose a grid, a load and a latency budget; **Run sweep** runs it with a
    progress bar, then shows the recommendation and the heatmaps."""

    def __init__(self, *, out: str = "sweeps/notebook", granularity: str = "4K,64K",
                 buf_size: str = "1M,16M", copy_mode: str = "background", repeat: int = 2,
                 size: str = "1G", target_speed: str = "100M", load_rate: str = "20M",
                 time_limit: float = 30.0, latency_budget_ms: float = 50.0,
                 seed: int = 0) -> None:
        super().__init__()
        self.granularity = _text("granularity", granularity, "e.g. 4K,64K,1M or default")
        self.buf_size = _text("buf-size", buf_size, "e.g. 1M,16M or default")
        self.copy_mode = _text("copy-mode", copy_mode, "background,write-blocking")
        # a plain IntText: 0 is refused with a message, never silently clamped to 1
        self.repeat = W.IntText(value=repeat, description="repeat", style=_DESC)
        self.size = _text("disk size", size)
        self.fmt = _drop("format", ("raw", "qcow2"), "raw")
        self.target_speed = _text("target speed (per s)", target_speed, "e.g. 100M; 0 = none")
        self.remote = W.Checkbox(value=False, description="target over NBD (remote)")
        self.load_rw = _drop("load pattern", RW_MODES, "randwrite")
        self.load_bs = _text("load block size", "4K")
        self.load_rate = _text("load rate (per s)", load_rate, "e.g. 20M; 0 = unlimited")
        self.time_limit = W.BoundedFloatText(value=time_limit, min=1, max=3600,
                                             description="time limit (s)", style=_DESC)
        self.budget = W.BoundedFloatText(value=latency_budget_ms, min=0.001, max=1e6,
                                         description="p99 budget (ms)", style=_DESC)
        self.early_stop = W.Checkbox(value=True, description="stop hopeless runs early")
        self.out_dir = _text("folder", out)
        self.seed = seed
        self.run_button = self._button("Run sweep", self.run, button_style="primary")
        self.stop_button = self._button("Stop", self.stop, disabled=True,
                                        button_style="warning")
        self._sweep_task: asyncio.Task[Any] | None = None
        self.bar = W.IntProgress(value=0, min=0, max=1, description="runs", style=_DESC)
        self.progress_text = W.Label()
        self.recommendation = W.HTML()
        # hidden until a sweep has drawn it: an empty Image shows a broken-image icon
        self.heatmap = W.Image(format="png", layout=W.Layout(width="720px", display="none"))
        self.result: dict[str, Any] | None = None
        self.estimate = W.HTML()
        self.widget = W.VBox([
            W.HTML("<b>Sweep</b>: granularity × buf-size (× copy-mode), fresh disks each run"),
            W.HBox([self.granularity, self.buf_size, self.copy_mode]),
            W.HBox([self.repeat, self.size, self.fmt]),
            W.HBox([self.target_speed, self.remote]),
            W.HBox([self.load_rw, self.load_bs, self.load_rate]),
            W.HBox([self.time_limit, self.budget, self.early_stop]),
            self.out_dir, self.estimate, W.HBox([self.run_button, self.stop_button]),
            W.HBox([self.bar, self.progress_text]), self.message, self.recommendation,
            self.heatmap, self.details])

    def plan(self) -> tuple[list[Any], Any, Any, int]:
        """(configs, setup, load, runs) from the fields; shows the estimated
        duration. :raise ArgumentError: a bad value, naming the field."""
        from .experiment import Setup
        from .sweep import grid
        if self.repeat.value < 1:
            raise ArgumentError("repeat", f"must be >= 1; got {self.repeat.value}")
        configs = grid(**self._lists())
        setup = Setup(size=self.size.value, fmt=self.fmt.value,
                      target_speed=parse_rate(self.target_speed.value, name="target_speed")
                      or None, remote_target=self.remote.value)
        load = FioLoad(rw=self.load_rw.value, bs=self.load_bs.value, rate=self.load_rate.value)
        runs = (len(configs) + 1) * self.repeat.value
        # each mirror lasts at most the time limit, plus about 5 s of set-up
        worst = len(configs) * self.repeat.value * (self.time_limit.value + 5)
        self.estimate.value = (f"{runs} runs ({len(configs)} configurations and the offline "
                               f"copy, x{self.repeat.value}); at most about "
                               f"{worst / 60:.0f} min")
        return configs, setup, load, runs

    def _lists(self) -> dict[str, list[Any]]:
        def split(text: str) -> list[Any]:
            items = [t.strip() for t in text.split(",") if t.strip()]
            return [None if t == "default" else t for t in items]
        return {"granularity": split(self.granularity.value),
                "buf_size": split(self.buf_size.value),
                "copy_mode": split(self.copy_mode.value)}

    async def run(self) -> dict[str, Any]:
        """Run (or resume) the sweep. :raise ArgumentError: a bad value, before any run."""
        return await self._guard(self._run())

    async def _run(self) -> dict[str, Any]:
        from .sweep import run_sweep
        configs, setup, load, _runs = self.plan()

        def progress(k: int, n: int, label: str, eta: float | None) -> None:
            self.bar.max, self.bar.value = n, k - 1
            eta_text = f", about {eta:.0f} s left" if eta is not None else ""
            self.progress_text.value = f"run {k} of {n}{eta_text}: {label}"

        self.run_button.disabled = True
        self.stop_button.disabled = False
        self._sweep_task = asyncio.current_task()
        try:
            self.result = await run_sweep(
                self.out_dir.value, configs=configs, repeat=self.repeat.value, setup=setup,
                load=load, time_limit=self.time_limit.value, seed=self.seed,
                early_stop=self.early_stop.value, progress=progress,
                latency_budget_us=self.budget.value * 1000.0)
        except asyncio.CancelledError:
            self.progress_text.value = "stopped: the current run was cancelled cleanly; " \
                                       "Run sweep resumes where it stopped"
            raise
        finally:
            self._sweep_task = None
            self.run_button.disabled = False
            self.stop_button.disabled = True
        self.bar.value = self.bar.max
        self.progress_text.value = "done"
        self.recommendation.value = recommendation_html(self.result["recommendation"])
        self.heatmap.value = (Path(self.out_dir.value) / "heatmap_time_to_ready_s.png").read_bytes()
        self.heatmap.layout.display = ""
        return self.result

    async def stop(self) -> None:
        """Stop the sweep: the current run's job is cancelled and its QEMU stopped by
        qmpkit (never killed from outside), and the run is not recorded as done."""
        task = self._sweep_task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def traces(self, which: str) -> list[Any]:
        """The trace folders of the ``best`` (recommended) or ``worst`` (slowest or
        not converged) configuration, one per repeat."""
        from .trace import Trace
        assert self.result is not None, "run the sweep first"
        res = self.result["results"]
        summary = self.result["summary"]
        if which == "best":
            label = (self.result["recommendation"]["chosen"] or {}).get("label")
        else:
            # a failed run (QEMU crashed...) is not a slow run: never the "worst"
            measured = summary[summary["failed_runs"] < summary["runs"]]
            worst = measured.sort_values(["converged_runs", "time_to_ready_s"],
                                         ascending=[True, False]).iloc[0]
            label = worst["label"]
        folders = res[(res["label"] == label) & (res["outcome"] != "failed")]["folder"]
        return [Trace.load(Path(self.out_dir.value) / "runs" / f, require_samples=False) for f in folders]


def recommendation_html(rec: dict[str, Any]) -> str:
    if rec.get("chosen") is None:
        return "<b>No recommendation</b><ul>" + "".join(
            f"<li>{html.escape(r)}</li>" for r in rec["reasons"]) + "</ul>"
    head = (f"<b>Recommendation:</b> granularity {format_size(rec['granularity'])}, "
            f"buf-size {format_size(rec['buf_size'])}, copy-mode {rec['copy_mode']}, speed "
            f"{format_rate(rec['speed']) if rec['speed'] else 'unlimited'} "
            f"(confidence {rec['confidence']})")
    return head + "<ul>" + "".join(f"<li>{html.escape(r)}</li>" for r in rec["reasons"]) + \
        "</ul>"


class LinkPanel(_Panel):
    """An emulated network link (`qmpkit.link`): RTT and rate, and what the
    mirror's in-flight limits make of them (`qmpkit.link.model_ceilings`) at
    the chosen buf-size and granularity. ``spec`` is the `LinkSpec` to pass as
    ``Setup(link=...)``; no QEMU is involved."""

    RATES = (("100 Mbit/s", 100e6), ("1 Gbit/s", 1e9), ("10 Gbit/s", 10e9))

    def __init__(self, *, rtt_ms: float = 40.0, rate_bit: float = 1e9,
                 buf_size: str = "16M", granularity: str = "64K") -> None:
        super().__init__()
        self.rtt = W.FloatSlider(value=rtt_ms, min=0.0, max=200.0, step=0.5,
                                 description="RTT (ms)", continuous_update=False,
                                 style={"description_width": "initial"})
        self.rate = W.Dropdown(options=self.RATES, value=rate_bit, description="rate")
        self.buf_size = _text("buf-size", buf_size)
        self.granularity = _text("granularity", granularity)
        self.model = W.HTML()
        for w in (self.rtt, self.rate, self.buf_size, self.granularity):
            w.observe(lambda change: self.update(), names="value")
        self.widget = W.VBox([W.HTML("<b>Link</b>"), W.HBox([self.rtt, self.rate]),
                              W.HBox([self.buf_size, self.granularity]), self.model,
                              self.message])
        self.update()

    @property
    def spec(self) -> LinkSpec:
        return LinkSpec(rtt_s=self.rtt.value / 1000.0, rate_bps=self.rate.value / 8)

    def update(self) -> None:
        """Redraw the model's ceilings; a bad buf-size or granularity says why."""
        try:
            buf = parse_size(self.buf_size.value, name="buf_size")
            g = parse_size(self.granularity.value, name="granularity")
            c = model_ceilings(self.spec, buf, g)
        except ArgumentError as exc:
            self.model.value = ""
            self.say(str(exc), error=True)
            return
        self.say("")
        self.model.value = (
            f"{html.escape(self.spec.describe())}: the bulk copy reaches at most "
            f"<b>{format_rate(c.bulk_bps)}</b> (buf-size {format_size(c.buf_size)} per round "
            f"trip); scattered dirty chunks are caught up at most at "
            f"<b>{format_rate(c.catchup_bps)}</b> (16 × {format_size(g)} per round trip)")

    def text_form(self) -> str:
        return f"LinkPanel: {self.spec.describe()}; run this cell to get the live panel"


class ProbePanel(_Panel):
    """Predict before you mirror, on the lab: **Start probe** watches the lab's
    load for ``seconds`` (`qmpkit.experiment.probe_lab`) with a live, growing
    curve of unique dirty bytes per granularity; then the ranked predictions
    (`qmpkit.predict.advise`); **Run top two** runs the two best predicted
    configurations for real and overlays them with their predicted READY."""

    def __init__(self, *, setup: Any, load: FioLoad, granularity: str = "4K,64K,1M",
                 seconds: float = 15.0, time_limit: float = 60.0) -> None:
        super().__init__()
        self.setup, self.load, self.time_limit = setup, load, time_limit
        self.granularity = _text("granularities", granularity)
        self.seconds = W.BoundedFloatText(value=seconds, min=1, max=3600, description="seconds",
                                          style=_DESC)
        self.start_button = self._button("Start probe", self.start, button_style="primary")
        self.top_button = self._button("Run top two", self.run_top, disabled=True)
        self.curve = W.Image(format="png", layout=W.Layout(width="640px", display="none"))
        self.table = W.HTML()
        self.profile: Any = None
        self.ranked: list[Any] = []
        self.traces: list[Any] = []
        self.widget = W.VBox([W.HTML(f"<b>Probe</b>: {html.escape(load.describe())}; "
                                     f"{html.escape(setup.describe())}"),
                              W.HBox([self.granularity, self.seconds]),
                              W.HBox([self.start_button, self.top_button]), self.curve,
                              self.table, self.message, self.details])

    async def start(self) -> Any:
        """Probe, then predict and rank; returns the `Profile`."""
        from .experiment import probe_lab
        from .predict import advise
        from .probe import check_probe_granularity
        try:
            gs = [check_probe_granularity(g.strip()) for g in self.granularity.value.split(",")]
        except ArgumentError as exc:
            self.say(str(exc), error=True)
            raise
        self.start_button.disabled = self.top_button.disabled = True
        self.say(f"probing for {self.seconds.value:g} s...")
        try:
            self.profile = await self._guard(probe_lab(
                size=self.setup.size, load=self.load, granularities=gs,
                seconds=self.seconds.value, fmt=self.setup.fmt, on_tick=self._tick))
        finally:
            self.start_button.disabled = False
        self._tick(self.profile)
        self.ranked = advise(disk_bytes=self.profile.disk_bytes,
                             load=self.profile.load(iodepth=self.load.iodepth),
                             granularities=gs, target_bps=self.setup.target_speed,
                             link=self.setup.link, copy_modes=("background",))
        self.table.value = prediction_table_html(self.ranked)
        self.top_button.disabled = False
        self.say(f"guest writes {format_rate(self.profile.write_bps)}; best: "
                 f"{self.ranked[0].reason}")
        return self.profile

    def _tick(self, profile: Any) -> None:
        from matplotlib.figure import Figure
        fig = Figure(figsize=(7, 3.2), layout="constrained")
        ax = fig.add_subplot()
        for i, (g, pts) in enumerate(sorted(profile.curves.items())):
            ax.plot([0.0] + [t for t, _ in pts], [0.0] + [b / MiB for _, b in pts],
                    color=f"C{i}", label=f"{format_size(g)}")
        ax.set_xlabel("seconds of probing")
        ax.set_ylabel("unique dirty MiB")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="granularity", title_fontsize=8)
        self.curve.value = _png(fig)
        self.curve.layout.display = ""

    async def run_top(self, n: int = 2) -> list[Any]:
        """Run the ``n`` best predicted configurations on the lab; their traces."""
        from .experiment import run_experiment
        assert self.ranked, "start the probe first"
        self.top_button.disabled = True
        self.traces = []
        try:
            for p in self.ranked[:n]:
                label = (f"{format_size(p.granularity)}/{format_size(p.buf_size)} "
                         f"{p.copy_mode}")
                self.say(f"running {label} (predicted: {p.converges})...")
                res = await self._guard(run_experiment(
                    setup=self.setup, load=self.load, mirror=p.mirror_options(),
                    time_limit=self.time_limit, label=label, verify=False,
                    measure_offline=False))
                res.trace.meta["predicted_time_to_ready_s"] = p.time_to_ready_s
                self.traces.append(res.trace)
        finally:
            self.top_button.disabled = False
        self.say("ran " + "; ".join(
            f"{t.label}: READY after {t.ready_time():.1f} s (predicted "
            f"{t.meta['predicted_time_to_ready_s'] or float('nan'):.1f} s)"
            if t.ready_time() is not None else f"{t.label}: not READY" for t in self.traces))
        return self.traces


def prediction_table_html(ranked: list[Any]) -> str:
    rows = "".join(
        f"<tr><td>{i}</td><td>{format_size(p.granularity)}</td><td>{format_size(p.buf_size)}"
        f"</td><td>{p.copy_mode}</td><td>{p.converges}</td><td>"
        f"{'' if p.time_to_ready_s is None else f'{p.time_to_ready_s:.0f} s'}</td>"
        f"<td>{html.escape(p.reason)}</td></tr>" for i, p in enumerate(ranked, 1))
    return ("<table><tr><th>#</th><th>granularity</th><th>buf-size</th><th>mode</th>"
            f"<th>converges</th><th>READY</th><th>why</th></tr>{rows}</table>")
