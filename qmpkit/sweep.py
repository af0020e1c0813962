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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .errors import ArgumentError, QmpkitError
from .experiment import Setup, hopeless, measure_offline_copy, run_experiment
from .images import create_image
from .link import LinkSpec
from .mirror import COPY_MODES, check_granularity
from .trace import Trace, write_atomic
from .units import format_latency, format_rate, format_size, parse_rate, parse_size
from .workload import FioLoad

__all__ = ["Config", "grid", "plan_runs", "run_sweep", "aggregate", "recommend", "heatmaps",
           "heatmap_figures", "rounded", "add_predictions", "predicted_vs_measured",
           "QEMU_DEFAULT_BUF_SIZE", "default_granularity"]

log = logging.getLogger(__name__)

QEMU_DEFAULT_BUF_SIZE = 16 << 20
#: node options a sweep can vary (`Setup` fields, set on the source and target images)
NODE_AXES = ("aio", "cache_direct", "detect_zeroes", "preallocation")
_SHORT = {"aio": "aio", "cache_direct": "cd", "detect_zeroes": "dz", "preallocation": "pa"}


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
    #: the emulated network to the target (`LinkSpec.to_text`), None: no link
    link: str | None = None
    #: node options of both images (None: QEMU's default; see `NODE_AXES`)
    aio: str | None = None
    cache_direct: bool | None = None
    detect_zeroes: str | None = None
    preallocation: str | None = None

    @property
    def is_default(self) -> bool:
        """QEMU's own mirror settings (on whatever link and node options): the
        baseline of each."""
        return replace(self, link=None, **{k: None for k in NODE_AXES}) == Config()

    @property
    def link_spec(self) -> LinkSpec | None:
        return LinkSpec.parse(self.link) if self.link is not None else None

    def setup(self, base: Setup) -> Setup:
        """The run's disks: ``base``, across this point's link and with its node
        options, where it has them."""
        change = {k: getattr(self, k) for k in ("link",) + NODE_AXES
                  if getattr(self, k) is not None}
        return replace(base, **change) if change else base

    def node_options(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in NODE_AXES if getattr(self, k) is not None}

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
        key = "_".join([part("g", self.granularity, lambda v: str(v)),
                        part("b", self.buf_size, lambda v: str(v)),
                        part("m", self.copy_mode, str), part("s", self.speed, str)])
        spec = self.link_spec
        if spec is not None:       # only then: the keys of sweeps without links stay
            key += f"_l-{spec.rtt_s * 1000:g}ms-{(spec.rate_bps or 0) * 8 / 1e6:g}Mbit"
            if spec.jitter_s:
                key += f"-j{spec.jitter_s * 1000:g}ms"
        for name, value in self.node_options().items():     # likewise
            key += f"_{_SHORT[name]}-{'on' if value is True else 'off' if value is False else value}"
        return key

    def label(self) -> str:
        g = format_size(self.granularity) if self.granularity else "default"
        b = format_size(self.buf_size) if self.buf_size else "default"
        text = f"granularity {g}, buf-size {b}, {self.copy_mode or 'background'}"
        if self.speed:
            text += f", speed {format_rate(self.speed)}"
        spec = self.link_spec
        if spec is not None:
            text += f"; link {spec.describe()}"
        for name, value in self.node_options().items():
            text += f", {name.replace('_', '-')}={'on' if value is True else 'off' if value is False else value}"
        return ("QEMU defaults: " if self.is_default else "") + text


def grid(*, granularity: Iterable[int | str | None] = (None,),
         buf_size: Iterable[int | str | None] = (None,),
         copy_mode: Iterable[str | None] = (None,),
         speed: Iterable[int | str | None] = (None,),
         link: Iterable[LinkSpec | str | None] = (None,),
         aio: Iterable[str | None] = (None,), cache_direct: Iterable[bool | None] = (None,),
         detect_zeroes: Iterable[str | None] = (None,),
         preallocation: Iterable[str | None] = (None,),
         with_defaults: bool = True) -> list[Config]:
    """Every combination, checked; QEMU's defaults are added (on every link)
    unless told not to. ``link`` is the link axis: `LinkSpec`, its text or a
    preset (``"wan"``), or None for no link.

    :raise ArgumentError: a value out of range (naming the argument).
    """
    gs = [None if g is None else check_granularity(g) for g in granularity]
    bs = [None if b is None else parse_size(b, name="buf_size") for b in buf_size]
    ms = list(copy_mode)
    for m in ms:
        if m is not None and m not in COPY_MODES:
            raise ArgumentError("copy_mode", f"must be one of {', '.join(COPY_MODES)}; got {m!r}")
    ss = [None if v is None else parse_rate(v, name="speed") for v in speed]
    ls = list(dict.fromkeys(None if v is None else LinkSpec.parse(v).to_text() for v in link))
    node_axes = [list(dict.fromkeys(v)) for v in (aio, cache_direct, detect_zeroes,
                                                  preallocation)]
    for combo in itertools.product(*node_axes):      # what QEMU refuses, refused first
        Setup(size="1M", **dict(zip(NODE_AXES, combo)))
    configs = sorted({Config(*c[:5], *c[5:]) for c in
                      itertools.product(gs, bs, ms, ss, ls, *node_axes)},
                     key=lambda c: c.key())
    if with_defaults:
        for lk in reversed(ls):
            for combo in reversed(list(itertools.product(*node_axes))):
                base = Config(link=lk, **dict(zip(NODE_AXES, combo)))
                if base not in configs:
                    configs.insert(0, base)
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
        **{k: getattr(cfg, k) for k in NODE_AXES},
        "link": cfg.link, "link_rtt_s": cfg.link_spec.rtt_s if cfg.link_spec else None,
        "link_rate_bps": cfg.link_spec.rate_bps if cfg.link_spec else None,
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
                    fresh: bool = False, predict: bool = False) -> dict[str, Any]:
    """Run the sweep into ``out``; returns ``{"results": DataFrame, "summary": DataFrame,
    "recommendation": dict}``. Finished runs found in ``out`` are not run again, but
    only when ``out`` was made with exactly these settings; failed runs are redone.

    :param progress: called as ``progress(k, n, label, eta_s)`` before run k of n.
    :param fresh: discard a previous sweep in ``out`` (its runs and results).
    :param predict: add `qmpkit.predict`'s forecast beside every measured run
        (``predicted_converges``, ``predicted_time_to_ready_s``) and draw
        ``predicted_vs_measured.png``.
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
                  "remote_target": setup.remote_target,
                  **({"reconnect_delay_s": setup.reconnect_delay}
                     if setup.reconnect_delay is not None else {})},
        "workload": load.to_dict() if load else None,
        # a config's link only when it has one: the settings of link-less sweeps stay
        "configs": [{k: v for k, v in asdict(c).items()
                     if k not in ("link", *NODE_AXES) or v is not None} for c in configs]}
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
                await run_experiment(setup=cfg.setup(setup), load=load,
                                     mirror=cfg.mirror_options(),
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
    if predict and not results.empty:
        add_predictions(results, setup, load)
        predicted_vs_measured(results).savefig(out / "predicted_vs_measured.png", dpi=100)
    results.to_csv(out / "results.csv", index=False)
    summary = aggregate(results)
    rounded(summary).to_csv(out / "summary.csv", index=False)
    rec = recommend(summary, latency_budget_us=latency_budget_us, fmt=setup.fmt)
    (out / "recommendation.json").write_text(
        json.dumps(rec, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    heatmaps(summary, out, fmt=setup.fmt)
    return {"results": results, "summary": summary, "recommendation": rec}


#: what a sweep writes into its folder (and ``fresh`` removes)
_SWEEP_FILES = ("sweep.json", "results.csv", "summary.csv", "recommendation.json",
                "predicted_vs_measured.png")


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
                               "speed": first["speed"], "link": _none(first.get("link")),
                               **{k: _none(first.get(k)) for k in NODE_AXES},
                               "runs": len(g),
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
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    # sizes by value, QEMU's defaults (None) first: 4 KiB, 64 KiB, 1 MiB, not as text
    order = sorted(range(len(df)), key=lambda i: tuple(
        (v is not None, v or 0) for v in (_link_rtt(df["link"].iloc[i]),
                                          _none(df["granularity"].iloc[i]),
                                          _none(df["buf_size"].iloc[i]),
                                          _none(df["speed"].iloc[i])))
        + (str(df["copy_mode"].iloc[i]),
           str([_none(df[k].iloc[i]) for k in NODE_AXES if k in df])))
    return df.iloc[order].reset_index(drop=True)


#: the columns that hold a run's settings, never rounded
_SETTINGS = ("granularity", "buf_size", "speed")


def rounded(table: Any, digits: int = 3) -> Any:
    """A copy of a table for people: floats to ``digits`` significant digits
    (``summary.csv``); ``results.csv`` keeps full precision."""
    def r(v: Any) -> Any:
        if isinstance(v, float) and math.isfinite(v) and v != 0:
            return float(f"{v:.{digits}g}")
        return v
    out = table.copy()
    for col in out.columns:
        if out[col].dtype.kind == "f" and col not in _SETTINGS:   # settings stay exact
            out[col] = out[col].map(r)
    return out


def add_predictions(results: Any, setup: Setup, load: FioLoad | None) -> None:
    """``predicted_converges`` and ``predicted_time_to_ready_s`` for each row,
    from the sweep's own setup and load (`qmpkit.predict`)."""
    from .predict import Load, predict
    guest = Load.of_fio(load, int(setup.size))
    conv, ttr = [], []
    for r in results.to_dict("records"):
        lk = _none(r.get("link"))
        try:
            p = predict(disk_bytes=int(setup.size), load=guest,
                        granularity=_int(r["granularity"]) or default_granularity(setup.fmt),
                        buf_size=_int(r["buf_size"]), copy_mode=r["copy_mode"],
                        target_bps=setup.target_speed,
                        link=LinkSpec.parse(lk) if lk else None)
        except ArgumentError:           # nothing to predict from (no target rate, no link)
            conv.append(None)
            ttr.append(None)
            continue
        conv.append(p.converges)
        ttr.append(p.time_to_ready_s)
    results["predicted_converges"] = conv
    results["predicted_time_to_ready_s"] = ttr


def _int(v: Any) -> int | None:
    v = _none(v)
    return int(v) if v is not None else None


def predicted_vs_measured(results: Any) -> Any:
    """Predicted against measured time to READY per run, with the identity line;
    runs not READY (measured) or never (predicted) sit on the axes' edges."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(5.5, 5), layout="constrained")
    ax = fig.add_subplot()
    rows = results.to_dict("records")
    both = [(r["predicted_time_to_ready_s"], r["time_to_ready_s"]) for r in rows
            if _none(r.get("predicted_time_to_ready_s")) is not None
            and _none(r["time_to_ready_s"]) is not None]
    top = max([v for pair in both for v in pair] + [1.0]) * 1.1
    if both:
        ax.plot(*zip(*both), "o", color="C0", label="converged, as predicted")
    wrong = [(_none(r.get("predicted_time_to_ready_s")) or top,
              _none(r["time_to_ready_s"]) or top) for r in rows
             if (_none(r.get("predicted_time_to_ready_s")) is None)
             != (_none(r["time_to_ready_s"]) is None)]
    if wrong:
        ax.plot(*zip(*wrong), "x", color="red", markersize=9,
                label="predicted and measured disagree on READY")
    ax.plot([0, top], [0, top], color="grey", linestyle="--", linewidth=1, label="identity")
    ax.set_xlim(0, top * 1.02)
    ax.set_ylim(0, top * 1.02)
    ax.set_xlabel("predicted time to READY (s)")
    ax.set_ylabel("measured time to READY (s)")
    ax.set_title("qmpkit.predict against the sweep", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return fig


def _link_rtt(text: Any) -> float | None:
    text = _none(text)
    return LinkSpec.parse(text).rtt_s if text else None


def _runs(n: int) -> str:
    return f"{n} run" if n == 1 else f"{n} runs"


def _none(v: Any) -> Any:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return v


def recommend(summary: Any, *, latency_budget_us: float | None = None,
              fmt: str = "raw") -> dict[str, Any]:
    """The configuration that converges fastest (all its runs READY) within the
    guest's p99 latency budget, compared with QEMU's defaults, with reasons.

    With a link axis (several links in the summary), one recommendation per
    link under ``per_link`` (keyed by the link's description), and the top
    level is the recommendation on the slowest link (the longest RTT): the
    setting that must hold where it is hardest. ``link`` names the link of the
    recommendation (`LinkSpec.to_meta`), or None without a link.

    Pure: the same summary gives the same recommendation.
    """
    rows = [{k: _none(v) for k, v in r.items()} for r in summary.to_dict("records")]
    links = sorted({r.get("link") for r in rows}, key=lambda t: (t is not None, _link_rtt(t) or 0))
    if len(links) > 1:
        per = {}
        for lk in links:
            part = summary[[_none(v) == lk for v in summary["link"]]]
            per[LinkSpec.parse(lk).describe() if lk else "no link"] = recommend(
                part, latency_budget_us=latency_budget_us, fmt=fmt)
        top = dict(per[list(per)[-1]])
        top["per_link"] = per
        return top
    link = links[0] if links else None
    rec = _recommend(rows, latency_budget_us, fmt)
    rec["link"] = LinkSpec.parse(link).to_meta() if link else None
    return rec


def _recommend(rows: list[dict[str, Any]], latency_budget_us: float | None,
               fmt: str) -> dict[str, Any]:
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
                       f"write latency within {format_latency(latency_budget_us)}")
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
            reasons.append(f"{r['label']}: {r['failed_runs']} of {r['runs']} runs failed "
                           "(see results.csv, column error); failed runs count neither as "
                           "converged nor as not converged")
    if best is None:
        return rec
    rec.update(granularity=int(best["granularity"] or default_granularity(fmt)),
               buf_size=int(best["buf_size"] or QEMU_DEFAULT_BUF_SIZE),
               speed=int(best["speed"] or 0), copy_mode=best["copy_mode"],
               node_options={k: best.get(k) for k in NODE_AXES
                             if best.get(k) is not None})
    t, sd = best["time_to_ready_s"], best["time_to_ready_s_sd"] or 0.0
    spread = f" ± {sd:.1f}" if best["runs"] > 1 else ""     # one run has no spread
    reasons.append(f"{best['label']} reached READY in {best['runs']} of "
                   f"{best['runs']} runs, after {t:.1f}{spread} s: the fastest of "
                   f"{len(within)} that converged"
                   + (f" within the p99 budget of {format_latency(latency_budget_us)}"
                      if latency_budget_us is not None else ""))
    if best["guest_p99_us"] is not None:
        reasons.append(f"the guest's p99 write latency was "
                       f"{format_latency(best['guest_p99_us'])}")
    if defaults is not None and defaults is not best:
        if defaults["converged_runs"] < defaults["runs"]:
            left = defaults["dirty_left_bytes"]
            failed = int(defaults.get("failed_runs") or 0)
            reasons.append(f"QEMU's defaults reached READY in only {defaults['converged_runs']} "
                           f"of {defaults['runs']} runs on the same load"
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
    reasons.append(f"confidence {rec['confidence']}: {_runs(best['runs'])}, spread "
                   f"{rel * 100:.0f}% of the mean")
    return rec


#: heatmap metrics: (column, title, value format, colour map, file name)
HEATMAPS = (
    ("time_to_ready_s", "time to READY (s)", "{:.1f}", "viridis_r", "time_to_ready_s"),
    ("throughput_fraction", "throughput / offline copy", "{:.2f}", "viridis",
     "throughput_fraction"),
    ("amplification", "amplification (copied / disk)", "{:.2f}", "magma_r", "amplification"),
    ("guest_p99_us", "guest p99 write latency (ms)", "{:.3g}", "magma_r", "guest_p99_ms"),
)


def _color_range(metric: str, values: list[float]) -> tuple[float, float]:
    """A fixed, meaningful scale: from the metric's natural zero (0 s, 0 ms, a
    fraction of 0, an amplification of 1) to the largest value, so that 0.9 ms
    against 1.1 ms reads as the near tie it is, not as black against yellow."""
    top = max(values)
    if metric == "throughput_fraction":
        return 0.0, max(1.0, top)
    if metric == "amplification":
        return 1.0, max(2.0, top)
    return 0.0, top if top > 0 else 1.0


def heatmaps(summary: Any, out: Path, *, fmt: str = "raw") -> list[Path]:
    """`heatmap_figures`, saved as ``heatmap_<name>.png`` in ``out``."""
    written = []
    for file_name, fig in heatmap_figures(summary, fmt=fmt).items():
        path = out / f"heatmap_{file_name}.png"
        fig.savefig(path, dpi=100)
        written.append(path)
    return written


def heatmap_figures(summary: Any, *, fmt: str = "raw") -> dict[str, Any]:
    """Heatmaps over granularity × buf-size (one panel per copy-mode/speed):
    time to READY, throughput as a fraction of the offline copy, amplification,
    and the guest's p99 latency (``heatmap_guest_p99_ms.png``, in ms).

    Only configurations whose every run reached READY are coloured. A
    configuration cut off at the time limit (or failed) is grey, with its
    value written in grey: it is not comparable with the converged ones.
    """
    from matplotlib.figure import Figure
    figures: dict[str, Any] = {}
    records = summary.to_dict("records")
    facets = sorted({(r["copy_mode"], _none(r["speed"]), _none(r.get("link")),
                      tuple(_none(r.get(k)) for k in NODE_AXES))
                     for r in records}, key=lambda f: (_link_rtt(f[2]) or 0, str(f)))
    gs = sorted({_none(g) for g in summary["granularity"]}, key=lambda v: (v is not None, v or 0))
    bs = sorted({_none(b) for b in summary["buf_size"]}, key=lambda v: (v is not None, v or 0))
    g_default = f"default ({format_size(default_granularity(fmt))})"
    b_default = f"default ({format_size(QEMU_DEFAULT_BUF_SIZE)})"

    def name(v: Any, default: str) -> str:
        return format_size(v) if v is not None else default

    for metric, title, fmt_v, cmap, file_name in HEATMAPS:
        fig = Figure(figsize=(4.2 * len(facets) + 1, 3.6), layout="constrained")
        axes = fig.subplots(1, len(facets), squeeze=False)[0]
        for ax, (mode, speed, link, node) in zip(axes, facets):
            grid_v = [[math.nan] * len(bs) for _ in gs]
            marks = [[""] * len(bs) for _ in gs]
            for r in records:
                if r["copy_mode"] != mode or _none(r["speed"]) != speed \
                        or _none(r.get("link")) != link \
                        or tuple(_none(r.get(k)) for k in NODE_AXES) != node:
                    continue
                i, j = gs.index(_none(r["granularity"])), bs.index(_none(r["buf_size"]))
                v = _none(r[metric])
                if metric == "guest_p99_us" and v is not None:
                    v = v / 1000.0
                failed = int(r.get("failed_runs") or 0)
                if r["converged_runs"] == r["runs"]:
                    grid_v[i][j] = math.nan if v is None else v
                    marks[i][j] = "" if v is None else fmt_v.format(v)
                    continue
                # cut off or failed: never coloured as if comparable
                if failed == r["runs"]:
                    marks[i][j] = f"FAILED\n{failed}/{r['runs']}"
                else:
                    marks[i][j] = f"not READY\n{r['converged_runs']}/{r['runs']}"
                    if failed:
                        marks[i][j] += f"\n{failed} failed"
                    if v is not None and metric != "time_to_ready_s":
                        marks[i][j] = f"{fmt_v.format(v)}\n" + marks[i][j]
            values = [v for row in grid_v for v in row if not math.isnan(v)]
            ax.set_facecolor("#e6e6e6")          # cells without a colour
            if values:
                lo, hi = _color_range(metric, values)
                im = ax.imshow(grid_v, cmap=cmap, aspect="auto", vmin=lo, vmax=hi)
            else:
                ax.imshow(grid_v, aspect="auto")
            for i in range(len(gs)):
                for j in range(len(bs)):
                    if marks[i][j]:
                        nan = math.isnan(grid_v[i][j])
                        ax.text(j, i, marks[i][j], ha="center", va="center", fontsize=8,
                                color="dimgrey" if nan else "black",
                                fontweight="bold" if nan else "normal",
                                bbox=None if nan else dict(facecolor="white", alpha=0.7,
                                                           edgecolor="none", pad=1.5))
            ax.set_xticks(range(len(bs)), [name(b, b_default) for b in bs], fontsize=8)
            ax.set_yticks(range(len(gs)), [name(g, g_default) for g in gs], fontsize=8)
            ax.set_xlabel("buf-size")
            ax.set_ylabel("granularity")
            ax.set_title(f"{mode}" + (f", speed {format_rate(speed)}" if speed else "")
                         + (f"\nlink {LinkSpec.parse(link).describe()}" if link else "")
                         + "".join(f"\n{k.replace('_', '-')}={v}"
                                   for k, v in zip(NODE_AXES, node) if v is not None),
                         fontsize=9)
            if len(values) > 1:                  # one value needs no scale
                fig.colorbar(im, ax=ax, shrink=0.8)
        fig.suptitle(title + "; grey: not READY in every run", fontsize=10)
        figures[file_name] = fig
    return figures
