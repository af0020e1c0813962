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

import re

from dataclasses import dataclass
from typing import Any, Sequence

from .trace import Sample, Trace
from .units import format_rate

__all__ = ["rate", "Forecast", "forecast", "summarize", "report", "mirror_ops",
           "SUMMARY_KEYS"]

SUMMARY_KEYS = ("time_to_ready_s", "converged", "completed", "verified", "bytes_copied",
                "disk_bytes", "amplification", "mean_throughput_bps", "peak_dirty_bytes",
                "samples", "achieved_hz", "params", "workload", "link")


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
    """The outlook of a running mirror; `text` says it in one line.

    ``verdict`` is one of ``ready``, ``paused``, ``measuring`` (not enough data
    yet), ``converging`` (with an ETA: the work left shrank steadily over the
    window), ``unsteady`` (it shrank, but not steadily enough for an ETA),
    ``too close`` (the work left neither clearly shrinks nor grows) and ``not
    converging`` (it grows). ``net_bps`` is how fast the work left shrinks
    (negative: grows); the text compares exactly the rates it names.
    """

    ready: bool
    converging: bool | None
    eta_s: float | None
    copy_bps: float | None
    dirty_bps: float | None
    remaining_bytes: int
    verdict: str = "measuring"
    net_bps: float | None = None

    @property
    def short(self) -> str:
        """The verdict in a few words, for a progress line."""
        if self.verdict == "converging":
            return f"READY in ~{self.eta_s:.0f} s"
        if self.verdict == "not converging":
            return f"not converging (+{format_rate(-(self.net_bps or 0))})"
        return {"ready": "in sync", "paused": "paused", "measuring": "measuring",
                "unsteady": "shrinking, no estimate yet",
                "too close": "too close to call"}[self.verdict]

    @property
    def text(self) -> str:
        if self.verdict == "ready":
            return "READY: source and target are in sync"
        if self.verdict == "paused":
            return "paused"
        if self.verdict == "measuring":
            return "not enough data yet"
        copy, dirty = format_rate(self.copy_bps or 0), format_rate(self.dirty_bps or 0)
        if self.verdict == "converging":
            return f"READY in about {self.eta_s:.0f} s"
        if self.verdict == "unsteady":
            return (f"the work left shrinks ({format_rate(self.net_bps or 0)}), but too "
                    "unsteadily for an estimate")
        if self.verdict == "too close":
            return f"copies {copy} against {dirty} of new dirty data: too close to call"
        return (f"not converging: {dirty} of new dirty data against {copy} copied; the work "
                f"left grows by {format_rate(-(self.net_bps or 0))}")


def forecast(samples: Sequence[Sample], *, ready: bool = False,
             window_s: float = 3.0) -> Forecast:
    """Forecast from the last ``window_s`` seconds of samples.

    A job that is not yet measured (less than half the window) is
    ``converging=None``. An ETA is given only when the work left shrank by a
    clear margin (5% of the copy rate) in both halves of the window, at rates
    within a factor of 2 of each other: a mirror that hovers near equilibrium
    would otherwise be promised "READY in 13 s", then 15, then 130.
    """
    remaining = samples[-1].remaining_bytes if samples else 0
    if ready:
        return Forecast(True, True, 0.0, None, None, remaining, "ready")
    if samples and samples[-1].status in ("paused", "standby"):
        return Forecast(False, None, None, None, None, remaining, "paused")
    if len(samples) < 2 or samples[-1].t_s - samples[0].t_s < window_s / 2:
        return Forecast(False, None, None, None, None, remaining, "measuring")
    copy = rate(samples, "current_progress", window_s) or 0.0
    dirty = rate(samples, "total_progress", window_s) or 0.0
    # How fast the work left shrinks: the least-squares slope over the window,
    # steadier than two end points when the job hovers near equilibrium.
    recent = [s for s in samples if s.t_s >= samples[-1].t_s - window_s]
    net = -_slope([s.t_s for s in recent], [s.remaining_bytes for s in recent])
    margin = CONVERGING_MARGIN * max(copy, 1.0)
    if dirty <= margin and remaining > 0:
        # Nothing new is dirtied: the mirror converges for sure, at its long-run
        # copy rate. A speed limit makes QEMU copy in bursts, so a short window may
        # see no progress at all; the whole run so far is the better measure.
        span = samples[-1].t_s - samples[0].t_s
        long_copy = (samples[-1].current_progress - samples[0].current_progress) / span \
            if span > 0 else 0.0
        if long_copy > 0:
            return Forecast(False, True, remaining / long_copy, copy, dirty, remaining,
                            "converging", max(net, long_copy))
    if net > margin:
        half = len(recent) // 2
        first, second = recent[:half + 1], recent[half:]
        nets = [-_slope([s.t_s for s in part], [s.remaining_bytes for s in part])
                for part in (first, second) if len(part) >= 2]
        steady = len(nets) == 2 and all(n > margin for n in nets) and \
            max(nets) <= 2 * min(nets)
        if steady:
            return Forecast(False, True, remaining / net, copy, dirty, remaining,
                            "converging", net)
        return Forecast(False, True, None, copy, dirty, remaining, "unsteady", net)
    if net >= -margin:
        return Forecast(False, False, None, copy, dirty, remaining, "too close", net)
    return Forecast(False, False, None, copy, dirty, remaining, "not converging", net)


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
        "link": trace.meta.get("link"),
    }


_TRACE_LINE = re.compile(r"(mirror_[a-z_]+) (.*)$")
_FIELD = re.compile(r"(\w+) (0x[0-9a-fA-F]+|-?\d+)(?:ns)?(?=\s|$)")


def mirror_ops(log_text: str) -> dict[str, Any] | None:
    """Why a mirror runs at the rate it does, from QEMU's own trace events
    (``mirror_*`` through the ``log`` trace backend, as in the daemon's log):
    how many copy operations, of what mean size; how often the job waited for
    a free in-flight slot or buffer (``mirror_yield``: 16 operations in
    flight, or no buffer left) and with how many in flight; and how many of its
    100 ms slices slept for the speed limit. None when the log holds no event.
    """
    ops = op_bytes = iterations = iter_bytes = yields = yield_in_flight = 0
    waits_overlap = sleeps = 0
    for line in log_text.splitlines():
        m = _TRACE_LINE.search(line)
        if not m:
            continue
        name = m.group(1)
        f = {k: int(v, 0) for k, v in _FIELD.findall(m.group(2))}
        if name == "mirror_iteration_done":
            ops += 1
            op_bytes += f.get("bytes", 0)
        elif name == "mirror_one_iteration":
            iterations += 1
            iter_bytes += f.get("bytes", 0)
        elif name == "mirror_yield":
            yields += 1
            yield_in_flight += f.get("in_flight", 0)
        elif name == "mirror_yield_in_flight":
            waits_overlap += 1
        elif name == "mirror_before_sleep" and f.get("delay", 0) > 0:
            sleeps += 1
    if not (ops or iterations or yields):
        return None
    return {"ops": ops, "mean_op_bytes": op_bytes / ops if ops else None,
            "iterations": iterations,
            "mean_iteration_bytes": iter_bytes / iterations if iterations else None,
            "waits_for_a_slot": yields,
            "mean_in_flight_when_waiting": yield_in_flight / yields if yields else None,
            "waits_for_an_overlapping_op": waits_overlap,
            "throttled_slices": sleeps}


def report(trace: Trace) -> dict[str, Any]:
    """The end-of-run figures an operator reads, as plain data (fio-style): time to
    READY and in all, bytes copied and amplification, mean and peak throughput,
    peak dirty bytes, the guest's p50/p99 write latency when a load ran, and how
    the run ended. Pure: from the trace alone."""
    s, summary = trace.samples, trace.summary
    end_t = max([x.t_s for x in s] + [float(e["t_s"]) for e in trace.events], default=0.0)
    guest = summary.get("guest") or {}

    def ms(key: str) -> float | None:
        v = guest.get(key)
        return v / 1000.0 if v is not None else None

    return {
        "job_id": trace.meta.get("job_id"),
        "completed": summary.get("completed"),
        "error": summary.get("error"),
        "time_to_ready_s": summary.get("time_to_ready_s"),
        "total_s": end_t,
        "bytes_copied": summary.get("bytes_copied"),
        "disk_bytes": summary.get("disk_bytes"),
        "amplification": summary.get("amplification"),
        "mean_throughput_bps": summary.get("mean_throughput_bps"),
        "peak_throughput_bps": max((x.throughput_bps for x in s), default=None),
        "speed_bps": trace.meta.get("params", {}).get("speed") or None,
        "peak_dirty_bytes": summary.get("peak_dirty_bytes"),
        "error_events": summary.get("error_events", 0),
        "guest_write_p50_ms": ms("write_p50_us"),
        "guest_write_p99_ms": ms("write_p99_us"),
        "verification": summary.get("verification"),
        "qemu_ops": summary.get("qemu_ops"),
    }
