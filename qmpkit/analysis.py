"""
What samples mean: copy rate, the convergence forecast, and a run's summary.

Pure functions over `Sample` lists and `Trace` objects; no I/O.

The forecast compares two rates over the last few seconds:

- the **copy rate** C, how fast ``current_progress`` grows;
- the **dirty rate** D, how fast ``total_progress`` grows: bytes that writes
  made dirty again and added to the work.

The remaining work falls at C - D. When C > D the job reaches READY in about
remaining / (C - D) seconds; otherwise it does not converge, and the text
says both rates, so the user sees why (for example 4 KiB random writes
dirtying whole 64 KiB chunks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from .trace import Sample, Trace
from .units import format_rate

__all__ = ["rate", "Forecast", "forecast", "summarize", "SUMMARY_KEYS"]

SUMMARY_KEYS = ("time_to_ready_s", "converged", "completed", "verified", "bytes_copied",
                "disk_bytes", "amplification", "mean_throughput_bps", "peak_dirty_bytes",
                "samples", "achieved_hz", "params", "workload")


#: the work left must shrink by this fraction of the copy rate to count as converging
CONVERGING_MARGIN = 0.05


def rate(samples: Sequence[Sample], attr: str, window_s: float) -> float | None:
    """How fast ``attr`` grew over the last ``window_s`` seconds (per second), or None
    when the samples span too little time."""
    if len(samples) < 2:
        return None
    last = samples[-1]
    first = None
    for s in reversed(samples):
        first = s
        if last.t_s - s.t_s >= window_s:
            break
    assert first is not None
    dt = last.t_s - first.t_s
    if dt <= 0:
        return None
    return (getattr(last, attr) - getattr(first, attr)) / dt


@dataclass(frozen=True)
class Forecast:
    """The outlook of a running mirror; `text` says it in one line."""

    ready: bool
    converging: bool | None
    eta_s: float | None
    copy_bps: float | None
    dirty_bps: float | None
    remaining_bytes: int

    @property
    def text(self) -> str:
        if self.ready:
            return "READY: source and target are in sync"
        if self.converging is None:
            return "measuring..."
        if self.converging:
            return f"READY in about {self.eta_s:.0f} s"
        return (f"not converging: writes dirty {format_rate(self.dirty_bps or 0)}, "
                f"the mirror copies {format_rate(self.copy_bps or 0)}")


def forecast(samples: Sequence[Sample], *, ready: bool = False,
             window_s: float = 3.0) -> Forecast:
    """Forecast from the last ``window_s`` seconds of samples.

    A job that is not yet measured (less than half the window) is
    ``converging=None``.
    """
    remaining = samples[-1].remaining_bytes if samples else 0
    if ready:
        return Forecast(True, True, 0.0, None, None, remaining)
    if len(samples) < 2 or samples[-1].t_s - samples[0].t_s < window_s / 2:
        return Forecast(False, None, None, None, None, remaining)
    copy = rate(samples, "current_progress", window_s) or 0.0
    dirty = rate(samples, "total_progress", window_s) or 0.0
    # How fast the work left shrinks: the least-squares slope over the window,
    # steadier than two end points when the job hovers near equilibrium.
    recent = [s for s in samples if s.t_s >= samples[-1].t_s - window_s]
    net = -_slope([s.t_s for s in recent], [s.remaining_bytes for s in recent])
    # Converging only when the work shrinks by a clear margin: 5% of the copy rate.
    # Near equilibrium (writes dirty about what is copied) the sign flips with
    # noise, and an "ETA" of minutes that never arrives helps nobody.
    if net > CONVERGING_MARGIN * max(copy, 1.0):
        return Forecast(False, True, remaining / net, copy, dirty, remaining)
    return Forecast(False, False, None, copy, dirty, remaining)


def _slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def summarize(trace: Trace, *, completed: bool | None = None,
              verified: bool | None = None) -> dict[str, Any]:
    """The derived metrics of ``summary.json`` (see `SUMMARY_KEYS`)."""
    s = trace.samples
    ready_t = trace.ready_time()
    copied = max([x.current_progress for x in s] +
                 [int(ev["data"].get("offset", 0)) for ev in trace.events
                  if ev["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")], default=0)
    disk = trace.meta.get("disk_bytes")
    duration = s[-1].t_s if s else 0.0
    span = s[-1].t_s - s[0].t_s if len(s) > 1 else 0.0
    dirty = [x.dirty_bytes for x in s if x.dirty_bytes is not None]
    if completed is None:
        completed = any(ev["event"] == "BLOCK_JOB_COMPLETED" and not ev["data"].get("error")
                        for ev in trace.events) if trace.events else None
    return {
        "time_to_ready_s": ready_t,
        "converged": ready_t is not None,
        "completed": completed,
        "verified": verified,
        "bytes_copied": copied,
        "disk_bytes": disk,
        "amplification": copied / disk if disk else None,
        "mean_throughput_bps": copied / duration if duration > 0 else None,
        "peak_dirty_bytes": max(dirty) if dirty else None,
        "samples": len(s),
        "achieved_hz": (len(s) - 1) / span if span > 0 else None,
        "params": trace.meta.get("params", {}),
        "workload": trace.meta.get("workload"),
    }
