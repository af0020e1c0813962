"""
Plots of traces, as matplotlib `Figure` objects (no pyplot, no display).

Every function takes one trace or several (overlaid, to compare settings),
draws in human units (MiB, MiB/s, s), and names the mirror's parameters in
its title or legend. Save with ``fig.savefig(path)``.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from .trace import COPY_MODE_EVENT, Trace
from .units import format_rate, format_size

__all__ = ["convergence", "throughput", "latency", "describe", "save"]

MiB = float(1 << 20)
_SIZE = (8.0, 4.2)


def _figure() -> Any:
    from matplotlib.figure import Figure
    fig = Figure(figsize=_SIZE, dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def _as_list(traces: Trace | Iterable[Trace]) -> list[Trace]:
    return [traces] if isinstance(traces, Trace) else list(traces)


def describe(trace: Trace) -> str:
    """``'granularity 4 KiB, buf-size 1 MiB, background'`` from a trace's parameters."""
    if trace.meta.get("label"):
        return str(trace.meta["label"])
    p = trace.meta.get("params", {})
    parts = [f"granularity {format_size(p['granularity'])}" if "granularity" in p
             else "granularity default",
             f"buf-size {format_size(p['buf-size'])}" if "buf-size" in p else "buf-size default",
             p.get("copy-mode", "background")]
    if p.get("speed"):
        parts.append(f"speed {format_rate(p['speed'])}")
    if p.get("sync", "full") != "full":
        parts.append(f"sync {p['sync']}")
    return ", ".join(parts)


def _title(ax: Any, what: str, traces: Sequence[Trace]) -> None:
    sub = describe(traces[0]) if len(traces) == 1 else f"{len(traces)} runs"
    load = traces[0].meta.get("workload_text")
    ax.set_title(f"{what}: {sub}" + (f"\n{load}" if load else ""), fontsize=10)


#: error events drawn at most (the rest are counted in the legend)
MAX_ERROR_MARKS = 200


def _mark_events(ax: Any, trace: Trace, color: Any, row: int = 0) -> None:
    ready = trace.ready_time()
    if ready is not None:
        ax.axvline(ready, color=color, linestyle="--", linewidth=1)
        ax.annotate(f"READY {ready:.1f} s", (ready, 1), xycoords=("data", "axes fraction"),
                    xytext=(3, -12 * (row + 1)), textcoords="offset points", fontsize=8,
                    color=color)
    synced = next((x.t_s for x in trace.samples if x.actively_synced), None)
    if synced is not None:
        ax.axvline(synced, color=color, linestyle="-.", linewidth=1)
        ax.annotate(f"actively synced {synced:.1f} s", (synced, 0.5),
                    xycoords=("data", "axes fraction"), xytext=(3, 0),
                    textcoords="offset points", fontsize=8, color=color, rotation=90)
    for ev in trace.events:
        if ev["event"] == COPY_MODE_EVENT:
            ax.axvline(ev["t_s"], color=color, linestyle=(0, (1, 3)), linewidth=1.2)
            ax.annotate(f"→ {ev['data'].get('copy-mode')}", (ev["t_s"], 0.9),
                        xycoords=("data", "axes fraction"), xytext=(3, 0),
                        textcoords="offset points", fontsize=8, color=color)
    errs = trace.error_events()
    if errs:
        # One collection, at most MAX_ERROR_MARKS lines: a flood of thousands of
        # error events must not cost one artist each.
        step = max(1, len(errs) // MAX_ERROR_MARKS)
        ts = [e["t_s"] for e in errs[::step]]
        ax.vlines(ts, 0, 1, transform=ax.get_xaxis_transform(), colors="red",
                  linestyles=":", linewidth=1)
        n = trace.summary.get("error_events") or len(errs)
        ax.plot(ts, [0] * len(ts), "rx", markersize=8,
                label=f"error event ({n})" if n > 1 else "error event")


def convergence(traces: Trace | Iterable[Trace]) -> Any:
    """Dirty bytes (solid) and remaining bytes (dashed) over time, READY and errors marked."""
    ts = _as_list(traces)
    fig, ax = _figure()
    for i, tr in enumerate(ts):
        color = f"C{i}"
        t = [s.t_s for s in tr.samples]
        name = describe(tr) if len(ts) > 1 else ""
        dirty = [(s.t_s, s.dirty_bytes / MiB) for s in tr.samples if s.dirty_bytes is not None]
        if dirty:
            ax.plot(*zip(*dirty), color=color, linewidth=1.6,
                    label=f"dirty {name}".strip())
        ax.plot(t, [s.remaining_bytes / MiB for s in tr.samples], color=color, linestyle="--",
                linewidth=1, label=f"remaining {name}".strip())
        _mark_events(ax, tr, color, i)
    ax.set_xlabel("time since the mirror started (s)")
    ax.set_ylabel("MiB")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    _title(ax, "Convergence", ts)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    return fig


def throughput(traces: Trace | Iterable[Trace], *, offline_bps: float | None = None) -> Any:
    """Copy throughput over time; a reference line for the offline copy when known."""
    ts = _as_list(traces)
    fig, ax = _figure()
    for i, tr in enumerate(ts):
        ax.plot([s.t_s for s in tr.samples], [s.throughput_bps / MiB for s in tr.samples],
                color=f"C{i}", linewidth=1.4, label=describe(tr))
        ready = tr.ready_time()
        if ready is not None:
            ax.axvline(ready, color=f"C{i}", linestyle="--", linewidth=1)
    ref = offline_bps if offline_bps is not None else ts[0].summary.get("offline_copy_bps")
    if ref:
        ax.axhline(ref / MiB, color="black", linestyle=":", linewidth=1.2,
                   label=f"offline copy (qemu-img convert) {format_rate(ref)}")
    limit = (ts[0].meta.get("setup") or {}).get("target_speed_bps")
    if limit:
        ax.axhline(limit / MiB, color="grey", linestyle="-.", linewidth=1,
                   label=f"target throttled to {format_rate(limit)}")
    ax.set_xlabel("time since the mirror started (s)")
    ax.set_ylabel("MiB/s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    _title(ax, "Mirror throughput", ts)
    ax.legend(fontsize=8, loc="best")
    return fig


def latency(traces: Trace | Iterable[Trace]) -> Any:
    """The guest's write latency over time, from fio's latency log."""
    ts = [t for t in _as_list(traces) if t.fio_latency]
    if not ts:
        raise ValueError("no trace has a fio latency log (run the load with latency_log=True)")
    fig, ax = _figure()
    for i, tr in enumerate(ts):
        ax.plot([t for t, _ in tr.fio_latency],
                [max(v, 1.0) / 1000.0 for _, v in tr.fio_latency],   # log axis: no zeros
                color=f"C{i}", linewidth=1.2, label=describe(tr))
        ready = tr.ready_time()
        if ready is not None:
            ax.axvline(ready, color=f"C{i}", linestyle="--", linewidth=1)
    ax.set_xlabel("time since the mirror started (s)")
    ax.set_ylabel("guest write latency (ms, 100 ms mean)")
    ax.set_yscale("log")   # write-blocking costs 100x: one linear axis would hide the rest
    ax.grid(alpha=0.3)
    _title(ax, "Guest write latency", ts)
    ax.legend(fontsize=8, loc="best")
    return fig


def save(fig: Any, path: Any) -> None:
    fig.savefig(path, dpi=100)
