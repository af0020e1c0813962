"""
Sweeps: run a grid of mirror settings under one load, and recommend one with reasons.

`run_sweep` runs every configuration of granularity × buf-size (optionally ×
copy-mode × speed) ``repeat`` times, each on fresh images (`run_experiment`),
plus the offline-copy baseline (``qemu-img convert``) once per repeat. QEMU's
defaults are always in the grid, so the recommendation can be compared with
them. The order of runs is shuffled with a seed so that machine drift favours
no configuration. Runs not READY by the time limit are kept as censored (not
converged, with the dirty bytes left), never dropped.

Each finished run writes its trace folder under ``DIR/runs/``; a sweep started
again on the same DIR skips those, so an interrupted sweep resumes. Results go
to ``results.csv`` (one row per run), heatmaps to ``heatmap_*.png``, and the
choice to ``recommendation.json``.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .errors import ArgumentError, QmpkitError
from .experiment import Setup, hopeless, measure_offline_copy, run_experiment
from .images import create_image
from .mirror import COPY_MODES, check_granularity
from .trace import Trace, write_atomic
from .units import format_rate, format_size, parse_rate, parse_size
from .workload import FioLoad

__all__ = ["Config", "grid", "plan_runs", "run_sweep", "aggregate", "recommend", "heatmaps",
           "QEMU_DEFAULT_BUF_SIZE", "default_granularity"]

log = logging.getLogger(__name__)

QEMU_DEFAULT_BUF_SIZE = 16 << 20


def default_granularity(fmt: str, cluster_size: int = 64 << 10) -> int:
    """What QEMU picks: the target's cluster size clamped to [4 KiB, 64 KiB];
    64 KiB for raw (no clusters)."""
    return 64 << 10 if fmt == "raw" else min(max(cluster_size, 4 << 10), 64 << 10)


@dataclass(frozen=True, order=True)
class Config:
    """One point of the grid. ``None`` leaves the setting to QEMU."""

    granularity: int | None = None
    buf_size: int | None = None
    copy_mode: str | None = None
    speed: int | None = None

    @property
    def is_default(self) -> bool:
        return self == Config()

    def mirror_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        if self.granularity is not None:
            opts["granularity"] = self.granularity
        if self.buf_size is not None:
            opts["buf_size"] = self.buf_size
        if self.copy_mode is not None:
            opts["copy_mode"] = self.copy_mode
        if self.speed is not None:
            opts["speed"] = self.speed
        return opts

    def key(self) -> str:
        def part(name: str, v: Any, fmt: Callable[[Any], str]) -> str:
            return f"{name}-{fmt(v) if v is not None else 'default'}"
        return "_".join([part("g", self.granularity, lambda v: str(v)),
                         part("b", self.buf_size, lambda v: str(v)),
                         part("m", self.copy_mode, str), part("s", self.speed, str)])

    def label(self) -> str:
        g = format_size(self.granularity) if self.granularity else "default"
        b = format_size(self.buf_size) if self.buf_size else "default"
        text = f"granularity {g}, buf-size {b}, {self.copy_mode or 'background'}"
        if self.speed:
            text += f", speed {format_rate(self.speed)}"
        return ("QEMU defaults: " if self.is_default else "") + text


def grid(*, granularity: Iterable[int | str | None] = (None,),
         buf_size: Iterable[int | str | None] = (None,),
         copy_mode: Iterable[str | None] = (None,),
         speed: Iterable[int | str | None] = (None,), with_defaults: bool = True) -> list[Config]:
    """Every combination, checked; QEMU's defaults are added unless told not to.

    :raise ArgumentError: a value out of range (naming the argument).
    """
    gs = [None if g is None else check_granularity(g) for g in granularity]
    bs = [None if b is None else parse_size(b, name="buf_size") for b in buf_size]
    ms = list(copy_mode)
    for m in ms:
        if m is not None and m not in COPY_MODES:
            raise ArgumentError("copy_mode", f"must be one of {', '.join(COPY_MODES)}; got {m!r}")
    ss = [None if v is None else parse_rate(v, name="speed") for v in speed]
    configs = sorted({Config(*c) for c in itertools.product(gs, bs, ms, ss)},
                     key=lambda c: c.key())
    if with_defaults and Config() not in configs:
        configs.insert(0, Config())
    if not configs:
        raise ArgumentError("grid", "is empty")
    return configs


def _row(cfg: Config, rep: int, trace: Trace, folder: Path) -> dict[str, Any]:
    s = trace.summary
    guest = s.get("guest") or {}
    completed_t = next((e["t_s"] for e in trace.events if e["event"] == "BLOCK_JOB_COMPLETED"),
                       None)
    last = trace.samples[-1] if trace.samples else None
    return {
        "config": cfg.key(), "label": cfg.label(), "repeat": rep,
        "granularity": cfg.granularity, "buf_size": cfg.buf_size,
        "copy_mode": cfg.copy_mode or "background", "speed": cfg.speed,
        "converged": bool(s.get("converged")) and not s.get("error"),
        "failed": bool(s.get("error")),
        "outcome": ("failed" if s.get("error") else
                    "converged" if s.get("converged") else "not converged"),
        "early_stopped": bool(s.get("early_stopped")),
        "time_to_ready_s": s.get("time_to_ready_s"),
        "time_to_complete_s": completed_t if s.get("converged") else None,
        "dirty_left_bytes": None if s.get("converged") or last is None else last.dirty_bytes,
        "bytes_copied": s.get("bytes_copied"), "amplification": s.get("amplification"),
        "mean_throughput_bps": s.get("mean_throughput_bps"),
        "peak_dirty_bytes": s.get("peak_dirty_bytes"),
        "guest_p50_us": guest.get("write_p50_us"), "guest_p99_us": guest.get("write_p99_us"),
        "guest_iops": guest.get("write_iops"), "verified": s.get("verified"),
        "error": s.get("error"), "folder": folder.name,
    }


def plan_runs(configs: Sequence[Config], repeat: int,
              seed: int) -> list[tuple[str, Config | None, int]]:
    """Every run (name, config or None for the offline copy, repeat index), in a
    shuffled order: the same seed gives the same order."""
    plan: list[tuple[str, Config | None, int]] = []
    for rep in range(repeat):
        plan.append((f"offline-copy_r{rep}", None, rep))
        plan += [(f"{cfg.key()}_r{rep}", cfg, rep) for cfg in configs]
    random.Random(seed).shuffle(plan)
    return plan


async def run_sweep(out: os.PathLike[str] | str, *, configs: Sequence[Config],
                    repeat: int = 3, setup: Setup = Setup(),
                    load: FioLoad | None = FioLoad(), time_limit: float = 60.0,
                    seed: int = 0, early_stop: bool = False, hz: float = 10.0,
                    latency_budget_us: float | None = None,
                    progress: Callable[[int, int, str, float | None], None] | None = None,
                    fresh: bool = False) -> dict[str, Any]:
    """Run the sweep into ``out``; returns ``{"results": DataFrame, "summary": DataFrame,
    "recommendation": dict}``. Finished runs found in ``out`` are not run again, but
    only when ``out`` was made with exactly these settings; failed runs are redone.

    :param progress: called as ``progress(k, n, label, eta_s)`` before run k of n.
    :param fresh: discard a previous sweep in ``out`` (its runs and results).
    :raise ArgumentError: ``out`` holds a sweep with other settings (the message
        lists the differences), and ``fresh`` was not given.
    """
    if repeat < 1:
        raise ArgumentError("repeat", f"must be >= 1, got {repeat!r}")
    out = Path(out)
    plan = plan_runs(configs, repeat, seed)
    settings = {
        "seed": seed, "repeat": repeat, "time_limit_s": time_limit, "early_stop": early_stop,
        "hz": hz,
        "setup": {"size": setup.size, "format": setup.fmt,
                  "target_speed_bps": setup.target_speed,
                  "remote_target": setup.remote_target},
        "workload": load.to_dict() if load else None,
        "configs": [asdict(c) for c in configs]}
    if fresh:
        _discard(out)
    else:
        _check_resume(out, settings)
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "sweep.json", json.dumps({**settings, "order": [p[0] for p in plan]},
                                                indent=2) + "\n")
    give_up = hopeless() if early_stop else None
    durations: list[float] = []
    todo = [p for p in plan if not _finished(runs_dir / p[0])]
    for k, (name, cfg, rep) in enumerate(todo, 1):
        eta = statistics.mean(durations) * (len(todo) - k + 1) if durations else None
        if progress:
            progress(len(plan) - len(todo) + k, len(plan),
                     "offline copy (qemu-img convert)" if cfg is None else cfg.label(), eta)
        t0 = time.monotonic()
        folder = runs_dir / name
        if cfg is None:
            await _offline_run(folder, setup)
        else:
            try:
                await run_experiment(setup=setup, load=load, mirror=cfg.mirror_options(),
                                     time_limit=time_limit, hz=hz, out=folder,
                                     label=cfg.label(), measure_offline=False,
                                     give_up=give_up)
            except QmpkitError as exc:
                # One failed run (QEMU crashed, fio failed...) is a result, not the end
                # of the sweep: its trace and error are kept, and the row says so.
                # It is not marked finished, so a resumed sweep runs it again.
                log.warning("run %s failed: %s", name, exc)
                if progress:
                    progress(len(plan) - len(todo) + k, len(plan), f"FAILED: {exc}", None)
            _mark_finished(folder)
        durations.append(time.monotonic() - t0)
    results = collect(out, configs, repeat)
    results.to_csv(out / "results.csv", index=False)
    summary = aggregate(results)
    summary.to_csv(out / "summary.csv", index=False)
    rec = recommend(summary, latency_budget_us=latency_budget_us, fmt=setup.fmt)
    (out / "recommendation.json").write_text(
        json.dumps(rec, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    heatmaps(summary, out)
    return {"results": results, "summary": summary, "recommendation": rec}


#: what a sweep writes into its folder (and ``fresh`` removes)
_SWEEP_FILES = ("sweep.json", "results.csv", "summary.csv", "recommendation.json")


def _check_resume(out: Path, settings: dict[str, Any]) -> None:
    old_path = out / "sweep.json"
    if not old_path.exists():
        return
    try:
        old = json.loads(old_path.read_text())
        if not isinstance(old, dict):
            raise ValueError("not an object")
    except (OSError, ValueError) as exc:
        raise ArgumentError("out", f"{str(out)!r} holds a damaged sweep.json ({exc}); "
                                   "use --fresh to start over") from None
    def flat(d: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
            else:
                out[k] = v
        return out

    new, was = flat(settings), flat({k: old.get(k) for k in settings})
    diffs = [f"{k}: was {was.get(k)!r}, now {v!r}" for k, v in new.items() if was.get(k) != v]
    if diffs:
        raise ArgumentError("out", f"{str(out)!r} holds a sweep with other settings; use "
                                   "--fresh to discard it, or another --out (" +
                                   "; ".join(diffs) + ")")


def _discard(out: Path) -> None:
    import shutil
    if (out / "runs").is_dir():
        shutil.rmtree(out / "runs")
    for name in _SWEEP_FILES:
        (out / name).unlink(missing_ok=True)
    for png in out.glob("heatmap_*.png"):
        png.unlink()


def _finished(folder: Path) -> bool:
    """A run counts as done when it finished without failing, and its trace loads.
    A failed or damaged run is redone (with a warning for a damaged one)."""
    if not (folder / ".done").exists():
        return False
    if (folder / "offline.json").exists():
        return True
    try:
        trace = Trace.load(folder, require_samples=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("run %s is damaged (%s): running it again", folder.name, exc)
        (folder / ".done").unlink(missing_ok=True)
        return False
    return not trace.summary.get("error")


def _has_result(folder: Path) -> bool:
    """A run that ended (converged, not, or failed) and left a loadable trace."""
    if not (folder / ".done").exists():
        return False
    try:
        Trace.load(folder, require_samples=False)
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def _mark_finished(folder: Path) -> None:
    (folder / ".done").write_text("")


async def _offline_run(folder: Path, setup: Setup) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qmpkit-offline-") as tmp:
        src = await create_image(Path(tmp) / "src.img", setup.size, fmt=setup.fmt, fill="mixed")
        bps = await measure_offline_copy(src, tmp, fmt=setup.fmt)
    (folder / "offline.json").write_text(json.dumps({"offline_copy_bps": bps}) + "\n")
    _mark_finished(folder)


def collect(out: Path, configs: Sequence[Config], repeat: int) -> Any:
    """One row per finished run, read back from the run folders."""
    import pandas as pd
    rows = []
    offline = []
    for rep in range(repeat):
        f = out / "runs" / f"offline-copy_r{rep}" / "offline.json"
        if f.exists():
            offline.append(json.loads(f.read_text())["offline_copy_bps"])
    base = statistics.median(offline) if offline else None
    for cfg in configs:
        for rep in range(repeat):
            folder = out / "runs" / f"{cfg.key()}_r{rep}"
            if _has_result(folder):
                row = _row(cfg, rep, Trace.load(folder, require_samples=False), folder)
                row["offline_copy_bps"] = base
                row["throughput_fraction"] = (row["mean_throughput_bps"] / base
                                              if base and row["mean_throughput_bps"] else None)
                rows.append(row)
    return pd.DataFrame(rows)


def _mean_sd(values: Sequence[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None, None
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def aggregate(results: Any) -> Any:
    """Per configuration: runs, converged runs, and mean ± stdev of each metric."""
    import pandas as pd
    rows = []
    for key, g in results.groupby("config", sort=True):
        first = g.iloc[0]
        row: dict[str, Any] = {"config": key, "label": first["label"],
                               "granularity": first["granularity"],
                               "buf_size": first["buf_size"], "copy_mode": first["copy_mode"],
                               "speed": first["speed"], "runs": len(g),
                               "converged_runs": int(g["converged"].sum()),
                               "early_stopped_runs": int(g["early_stopped"].sum()),
                               "failed_runs": int(g["failed"].sum())}
        # three outcomes, kept apart: converged, not converged (censored), failed
        row["not_converged_runs"] = row["runs"] - row["converged_runs"] - row["failed_runs"]
        ok = g[~g["failed"].astype(bool)]        # a failed run measures nothing
        for metric in ("time_to_ready_s", "time_to_complete_s", "amplification",
                       "mean_throughput_bps", "throughput_fraction", "peak_dirty_bytes",
                       "guest_p99_us", "guest_p50_us", "guest_iops", "dirty_left_bytes"):
            mean, sd = _mean_sd(list(ok[metric]))
            row[metric], row[metric + "_sd"] = mean, sd
        rows.append(row)
    return pd.DataFrame(rows)


def _none(v: Any) -> Any:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return v


def recommend(summary: Any, *, latency_budget_us: float | None = None,
              fmt: str = "raw") -> dict[str, Any]:
    """The configuration that converges fastest (all its runs READY) within the
    guest's p99 latency budget, compared with QEMU's defaults, with reasons.

    Pure: the same summary gives the same recommendation.
    """
    rows = [{k: _none(v) for k, v in r.items()} for r in summary.to_dict("records")]
    defaults = next((r for r in rows if r["granularity"] is None and r["buf_size"] is None
                     and r["copy_mode"] == "background" and r["speed"] is None), None)
    ok = [r for r in rows if r["runs"] and r["converged_runs"] == r["runs"]]
    within = [r for r in ok if latency_budget_us is None or
              (r["guest_p99_us"] is not None and r["guest_p99_us"] <= latency_budget_us)
              or r["guest_p99_us"] is None]
    reasons: list[str] = []
    if not ok:
        reasons.append("no configuration reached READY in every run: nothing to recommend; "
                       "try finer granularity, write-blocking mode or a longer time limit")
    elif not within:
        reasons.append(f"{len(ok)} configuration(s) converged, but none kept the guest's p99 "
                       f"write latency within {latency_budget_us:g} µs")
    best = min(within, key=lambda r: (r["time_to_ready_s"], r["config"])) if within else None

    def describe(r: dict[str, Any] | None) -> dict[str, Any] | None:
        if r is None:
            return None
        return {"label": r["label"], "runs": r["runs"], "converged_runs": r["converged_runs"],
                "time_to_ready_s": r["time_to_ready_s"],
                "time_to_ready_s_sd": r["time_to_ready_s_sd"],
                "amplification": r["amplification"], "guest_p99_us": r["guest_p99_us"],
                "throughput_fraction": r["throughput_fraction"],
                "dirty_left_bytes": r["dirty_left_bytes"]}

    rec: dict[str, Any] = {"granularity": None, "buf_size": None, "speed": None,
                           "copy_mode": None, "chosen": describe(best),
                           "defaults": describe(defaults),
                           "latency_budget_us": latency_budget_us, "reasons": reasons,
                           "confidence": None}
    for r in rows:
        if r["failed_runs"]:
            reasons.append(f"{r['label']}: {r['failed_runs']} of {r['runs']} run(s) failed "
                           "(see results.csv, column error); failed runs count neither as "
                           "converged nor as not converged")
    if best is None:
        return rec
    rec.update(granularity=int(best["granularity"] or default_granularity(fmt)),
               buf_size=int(best["buf_size"] or QEMU_DEFAULT_BUF_SIZE),
               speed=int(best["speed"] or 0), copy_mode=best["copy_mode"])
    t, sd = best["time_to_ready_s"], best["time_to_ready_s_sd"] or 0.0
    reasons.append(f"{best['label']} reached READY in all {best['runs']} run(s), after "
                   f"{t:.1f} ± {sd:.1f} s: the fastest of {len(within)} that converged"
                   + (f" within the p99 budget of {latency_budget_us:g} µs"
                      if latency_budget_us is not None else ""))
    if best["guest_p99_us"] is not None:
        reasons.append(f"the guest's p99 write latency was {best['guest_p99_us']:.0f} µs")
    if defaults is not None and defaults is not best:
        if defaults["converged_runs"] < defaults["runs"]:
            left = defaults["dirty_left_bytes"]
            failed = int(defaults.get("failed_runs") or 0)
            reasons.append(f"QEMU's defaults reached READY in only {defaults['converged_runs']} "
                           f"of {defaults['runs']} run(s) on the same load"
                           + (f" ({failed} failed, not counted as not converged)"
                              if failed else "")
                           + (f", leaving {format_size(left)} dirty" if left else ""))
        else:
            reasons.append(f"QEMU's defaults reached READY after "
                           f"{defaults['time_to_ready_s']:.1f} s on the same load "
                           f"({defaults['time_to_ready_s'] / t:.1f}x as long)")
    elif best is defaults:
        reasons.append("QEMU's defaults are the best choice on this load")
    rel = sd / t if t else 0.0
    rec["confidence"] = ("high" if best["runs"] >= 3 and rel < 0.1 else
                         "medium" if best["runs"] >= 2 and rel < 0.25 else "low")
    reasons.append(f"confidence {rec['confidence']}: {best['runs']} run(s), spread "
                   f"{rel * 100:.0f}% of the mean")
    return rec


def heatmaps(summary: Any, out: Path) -> list[Path]:
    """Heatmaps over granularity × buf-size (one panel per copy-mode/speed):
    time to READY (not-converged cells marked), throughput as a fraction of
    the offline copy, amplification, and guest p99 latency."""
    from matplotlib.figure import Figure
    written = []
    facets = sorted({(r["copy_mode"], _none(r["speed"])) for r in summary.to_dict("records")},
                    key=str)
    gs = sorted({_none(g) for g in summary["granularity"]}, key=lambda v: (v is not None, v or 0))
    bs = sorted({_none(b) for b in summary["buf_size"]}, key=lambda v: (v is not None, v or 0))

    def name(v: Any, default: str) -> str:
        return format_size(v) if v is not None else default

    for metric, title, fmt_v, cmap in (
            ("time_to_ready_s", "time to READY (s)", "{:.1f}", "viridis_r"),
            ("throughput_fraction", "throughput / offline copy", "{:.2f}", "viridis"),
            ("amplification", "amplification (copied / disk)", "{:.2f}", "magma_r"),
            ("guest_p99_us", "guest p99 write latency (ms)", "{:.1f}", "magma_r")):
        fig = Figure(figsize=(4.2 * len(facets) + 1, 3.6), layout="constrained")
        axes = fig.subplots(1, len(facets), squeeze=False)[0]
        for ax, (mode, speed) in zip(axes, facets):
            grid_v = [[math.nan] * len(bs) for _ in gs]
            marks = [[""] * len(bs) for _ in gs]
            for r in summary.to_dict("records"):
                if r["copy_mode"] != mode or _none(r["speed"]) != speed:
                    continue
                i, j = gs.index(_none(r["granularity"])), bs.index(_none(r["buf_size"]))
                v = _none(r[metric])
                if metric == "guest_p99_us" and v is not None:
                    v = v / 1000.0
                converged = r["converged_runs"] == r["runs"]
                if metric == "time_to_ready_s" and not converged:
                    failed = int(r.get("failed_runs") or 0)
                    if failed == r["runs"]:
                        marks[i][j] = f"FAILED\n{failed}/{r['runs']}"
                    else:
                        marks[i][j] = f"not READY\n{r['converged_runs']}/{r['runs']}"
                        if failed:
                            marks[i][j] += f"\n{failed} failed"
                    v = None
                grid_v[i][j] = math.nan if v is None else v
                if v is not None:
                    marks[i][j] = fmt_v.format(v)
            im = ax.imshow(grid_v, cmap=cmap, aspect="auto")
            for i in range(len(gs)):
                for j in range(len(bs)):
                    if marks[i][j]:
                        nan = math.isnan(grid_v[i][j])
                        ax.text(j, i, marks[i][j], ha="center", va="center", fontsize=8,
                                color="red" if nan else "black",
                                fontweight="bold" if nan else "normal",
                                bbox=None if nan else dict(facecolor="white", alpha=0.7,
                                                           edgecolor="none", pad=1.5))
            ax.set_xticks(range(len(bs)), [name(b, "default (16 MiB)") for b in bs], fontsize=8)
            ax.set_yticks(range(len(gs)), [name(g, "default") for g in gs], fontsize=8)
            ax.set_xlabel("buf-size")
            ax.set_ylabel("granularity")
            ax.set_title(f"{mode}" + (f", speed {format_rate(speed)}" if speed else ""),
                         fontsize=9)
            fig.colorbar(im, ax=ax, shrink=0.8)
        fig.suptitle(title, fontsize=10)
        path = out / f"heatmap_{metric}.png"
        fig.savefig(path, dpi=100)
        written.append(path)
    return written
