"""
Plots of traces, as matplotlib `Figure` objects (no pyplot, no display).

Every function takes one trace or several (overlaid, to compare settings),
draws in human units (MiB, MiB/s, s), and names the mirror's parameters in
its title or legend. Save with ``fig.savefig(path)``.
"""

from __future__ import annotations

import textwrap
from typing import Any, Iterable, Sequence

from .trace import COPY_MODE_EVENT, Trace
from .units import format_rate, format_size

__all__ = ["convergence", "throughput", "latency", "probe", "describe", "save"]

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
    if load:      # a long setup (a link, a remote target) wraps rather than being cut off
        load = textwrap.fill(load, width=100)
    ax.set_title(f"{what}: {sub}" + (f"\n{load}" if load else ""), fontsize=10)


#: error events drawn at most (the rest are counted in the legend)
MAX_ERROR_MARKS = 200
#: an offline-copy reference more than this many times the data's peak is
#: written as a note, not drawn as a line that squashes the data
OFF_SCALE = 3.0


def _mark_events(ax: Any, trace: Trace, color: Any, row: int = 0) -> None:
    """READY, active sync, pauses (shaded), speed changes and copy-mode switches."""
    ready = trace.ready_time()
    if ready is not None:
        ax.axvline(ready, color=color, linestyle="--", linewidth=1)
        late = bool(trace.samples) and ready > 0.85 * trace.samples[-1].t_s
        ax.annotate(f"READY {ready:.1f} s", (ready, 1), xycoords=("data", "axes fraction"),
                    xytext=(-3 if late else 3, -12 * (row + 1)), textcoords="offset points",
                    fontsize=8, color=color, ha="right" if late else "left")
    synced = next((x.t_s for x in trace.samples if x.actively_synced), None)
    if synced is not None:
        ax.axvline(synced, color=color, linestyle="-.", linewidth=1)
        ax.annotate(f"actively synced {synced:.1f} s", (synced, 0.5),
                    xycoords=("data", "axes fraction"), xytext=(3, 0),
                    textcoords="offset points", fontsize=8, color=color, rotation=90)
    end = trace.samples[-1].t_s if trace.samples else 0.0
    for a, b in trace.paused_spans():
        ax.axvspan(a, end if b is None else b, color=color, alpha=0.12, linewidth=0)
        ax.annotate("paused", (a, 0.97), xycoords=("data", "axes fraction"), xytext=(2, -2),
                    textcoords="offset points", fontsize=8, color=color, va="top")
    for t, speed in trace.speed_steps()[1:]:
        ax.axvline(t, color=color, linestyle=(0, (1, 2)), linewidth=1)
        ax.annotate(f"speed {format_rate(speed) if speed else 'unlimited'}", (t, 0.8),
                    xycoords=("data", "axes fraction"), xytext=(3, -12 * row),
                    textcoords="offset points", fontsize=8, color=color)
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


def _legend(fig: Any, ax: Any, extra: Sequence[tuple[Any, str]] = ()) -> None:
    """One legend below the axes, where it never covers the lines' ends."""
    handles, labels = ax.get_legend_handles_labels()
    for h, label in extra:
        handles.append(h)
        labels.append(label)
    seen: set[str] = set()
    keep = [(h, lb) for h, lb in zip(handles, labels) if not (lb in seen or seen.add(lb))]
    if keep:
        wide = max(len(lb) for _, lb in keep) > 45
        fig.legend(*zip(*keep), loc="outside lower center", fontsize=8,
                   ncols=min(2 if wide else 3, len(keep)), frameon=False)


def convergence(traces: Trace | Iterable[Trace]) -> Any:
    """Dirty bytes (solid) and remaining bytes (dashed) over time; READY, pauses,
    speed changes and errors marked. One legend entry per run: the line style
    tells dirty from remaining once, for all runs."""
    from matplotlib.lines import Line2D
    ts = _as_list(traces)
    fig, ax = _figure()
    any_dirty = False
    runs: list[tuple[Any, str]] = []
    for i, tr in enumerate(ts):
        color = f"C{i}"
        t = [s.t_s for s in tr.samples]
        dirty = [(s.t_s, s.dirty_bytes / MiB) for s in tr.samples if s.dirty_bytes is not None]
        if dirty:
            any_dirty = True
            ax.plot(*zip(*dirty), color=color, linewidth=1.6, gid="dirty")
        ax.plot(t, [s.remaining_bytes / MiB for s in tr.samples], color=color, linestyle="--",
                linewidth=1, gid="remaining")
        if len(ts) > 1:
            runs.append((Line2D([], [], color=color, linewidth=4), describe(tr)))
        _mark_events(ax, tr, color, i)
    ax.set_xlabel("time since the mirror started (s)")
    ax.set_ylabel("MiB")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    _title(ax, "Convergence", ts)
    style = ([(Line2D([], [], color="black", linewidth=1.6), "dirty (the job's bitmap)")]
             if any_dirty else [])
    style.append((Line2D([], [], color="black", linestyle="--", linewidth=1),
                  "remaining (dirty + in flight)"))
    _legend(fig, ax, runs + style)
    return fig


def _model_lines(trace: Trace) -> list[tuple[float, str]]:
    """The model's ceilings for a run across a link (`qmpkit.link.model_ceilings`):
    the bulk copy (buf-size per round trip), the catch-up of scattered chunks
    (16 × granularity per round trip) and the link's rate; none without a link."""
    link = trace.meta.get("link")
    if not link:
        return []
    from .link import LinkSpec, model_ceilings
    spec = LinkSpec(rtt_s=link["rtt_s"], rate_bps=link.get("rate_bps"),
                    jitter_s=link.get("jitter_s") or 0.0)
    p = trace.meta.get("params", {})
    c = model_ceilings(spec, p.get("buf-size"), p.get("granularity") or 64 << 10)
    g = format_size(p.get("granularity") or 64 << 10)
    lines = [(c.bulk_bps, f"model: bulk ≤ {format_rate(c.bulk_bps)} "
                          f"({format_size(c.buf_size)} per RTT)"),
             (c.catchup_bps, f"model: catch-up ≤ {format_rate(c.catchup_bps)} "
                             f"(16 × {g} per RTT)")]
    if spec.rate_bps:
        lines.append((spec.rate_bps, f"link rate {format_rate(spec.rate_bps)}"))
    return lines


def throughput(traces: Trace | Iterable[Trace], *, offline_bps: float | None = None) -> Any:
    """Copy throughput over time, with the speed limit as a step line. The offline
    copy is a reference line, or a note when it is off the scale (> 3× the peak)."""
    from matplotlib.lines import Line2D
    ts = _as_list(traces)
    fig, ax = _figure()
    peak = 0.0
    off: list[tuple[Any, str]] = []
    for i, tr in enumerate(ts):
        ys = [s.throughput_bps / MiB for s in tr.samples]
        peak = max([peak, *ys])
        ax.plot([s.t_s for s in tr.samples], ys, color=f"C{i}", linewidth=1.4,
                label=describe(tr))
        _mark_events(ax, tr, f"C{i}", i)
        steps = tr.speed_steps()
        if any(v for _, v in steps) and tr.samples:
            xs = [t for t, _ in steps] + [tr.samples[-1].t_s]
            vs = [v / MiB if v else float("nan") for _, v in steps]
            ax.step(xs, vs + vs[-1:], where="post", color=f"C{i}", linestyle=(0, (4, 2)),
                    linewidth=1, alpha=0.8, label=f"speed limit ({describe(tr)})"
                    if len(ts) > 1 else "speed limit (--speed)")
    drawn: set[str] = set()
    for i, tr in enumerate(ts):
        for value, text in _model_lines(tr):
            if text in drawn:           # the same ceiling for several runs: once
                continue
            drawn.add(text)
            if peak and value / MiB > OFF_SCALE * peak:
                off.append((Line2D([], [], color=f"C{i}", linestyle=(0, (6, 2, 1, 2))),
                            f"{text}: off the scale"))
            else:
                ax.axhline(value / MiB, color=f"C{i}", linestyle=(0, (6, 2, 1, 2)),
                           linewidth=1, alpha=0.7, label=text, gid="model")
    limit = (ts[0].meta.get("setup") or {}).get("target_speed_bps")
    if limit:
        ax.axhline(limit / MiB, color="grey", linestyle="-.", linewidth=1,
                   label=f"target throttled to {format_rate(limit)}")
        peak = max(peak, limit / MiB)
    ref = offline_bps if offline_bps is not None else ts[0].summary.get("offline_copy_bps")
    if ref:
        text = f"offline copy (qemu-img convert) {format_rate(ref)}"
        if peak and ref / MiB > OFF_SCALE * peak:
            text = f"qemu-img convert {format_rate(ref)}"
        if peak and ref / MiB > OFF_SCALE * peak:
            # a legend note, not a line: drawn to scale it would squash the data flat
            off.append((Line2D([], [], color="black", linestyle=":", linewidth=1.2),
                        f"{text}: {ref / MiB / peak:.0f}× the peak, off the scale"))
        else:
            ax.axhline(ref / MiB, color="black", linestyle=":", linewidth=1.2, label=text)
    ax.set_xlabel("time since the mirror started (s)")
    ax.set_ylabel("MiB/s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    _title(ax, "Mirror throughput", ts)
    _legend(fig, ax, off)
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
    _legend(fig, ax)
    return fig


def probe(profile: Any, candidates: Sequence[Any] = ()) -> Any:
    """A probe's new-dirty rate per granularity (bars, log axis), with the copy
    rates of candidate configurations (`qmpkit.predict.Prediction`: their
    catch-up rate) as horizontal lines: where a line sits above a bar, that
    configuration converges at that granularity."""
    fig, ax = _figure()
    gs = sorted(profile.curves)
    xs = list(range(len(gs)))
    ax.bar(xs, [profile.dirty_bps(g) / MiB for g in gs], color="C0", alpha=0.8,
           label="new dirty data (probe)")
    ax.axhline(profile.write_bps / MiB, color="black", linestyle=":", linewidth=1,
               label=f"the guest's writes {format_rate(profile.write_bps)}")
    for i, c in enumerate(candidates):
        ax.axhline(c.catchup_bps / MiB, color=f"C{i + 1}", linestyle="--", linewidth=1.2,
                   label=f"catch-up of {format_size(c.granularity)}/{format_size(c.buf_size)} "
                         f"{c.copy_mode}: {format_rate(c.catchup_bps)}")
    ax.set_xticks(xs, [format_size(g) for g in gs])
    ax.set_yscale("log")
    ax.set_xlabel("granularity")
    ax.set_ylabel("MiB/s (log)")
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(f"Probe of {profile.node}: {profile.seconds:.0f} s", fontsize=10)
    _legend(fig, ax)
    return fig


def save(fig: Any, path: Any) -> None:
    fig.savefig(path, dpi=100)
