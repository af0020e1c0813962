"""
The demo: why granularity matters, on the embedded QEMU, with no arguments.

Three mirrors of the same source under the same 4 KiB random-write load into
a throttled target: QEMU's defaults, 4 KiB granularity, and write-blocking
mode. Each run gets fresh images. The demo writes each run's trace folder,
overlaid ``convergence.png``, ``throughput.png`` and ``latency.png``, and a
``demo.csv`` table.
"""

from __future__ import annotations

import csv
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .experiment import RunResult, Setup, measure_offline_copy, run_experiment
from .images import create_image
from .trace import Trace
from .units import format_rate, format_size
from .workload import FioLoad

__all__ = ["DEMO_CONFIGS", "run_demo", "DemoRow", "table_text", "write_plots", "wan_configs"]

#: (label, mirror arguments) of the three runs the demo compares.
DEMO_CONFIGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("QEMU defaults (64 KiB granularity)", {}),
    ("granularity 4 KiB, buf-size 1 MiB", {"granularity": "4K", "buf_size": "1M"}),
    ("copy-mode write-blocking", {"copy_mode": "write-blocking"}),
)


def wan_configs(setup: Setup, load: FioLoad | None) -> tuple[tuple[str, dict[str, Any]], ...]:
    """QEMU's defaults, 4 KiB/1 MiB (the LAN's winner), and the configuration
    `qmpkit.predict` ranks first for ``setup``'s link under ``load``."""
    from .link import LinkSpec
    from .predict import Load, predict, rank
    assert isinstance(setup.link, LinkSpec)
    guest = Load.of_fio(load, int(setup.size))
    grid = [predict(disk_bytes=int(setup.size), load=guest, granularity=g, buf_size=b,
                    copy_mode=m, target_bps=setup.target_speed, link=setup.link)
            for g in (4 << 10, 64 << 10, 1 << 20) for b in (1 << 20, 4 << 20, 16 << 20, 64 << 20)
            for m in ("background", "write-blocking")]
    best = rank(grid)[0]
    label = (f"model's pick: granularity {format_size(best.granularity)}, buf-size "
             f"{format_size(best.buf_size)}, {best.copy_mode}")
    return DEMO_CONFIGS[:2] + ((label, best.mirror_options()),)


@dataclass(frozen=True)
class DemoRow:
    label: str
    folder: str
    time_to_ready_s: float | None
    amplification: float | None
    guest_p99_ms: float | None
    guest_write_bps: float | None
    verified: bool | None

    @classmethod
    def from_trace(cls, trace: Trace, folder: Path) -> "DemoRow":
        s = trace.summary
        guest = s.get("guest") or {}
        p99 = guest.get("write_p99_us")
        return cls(label=trace.label, folder=folder.name, time_to_ready_s=s.get("time_to_ready_s"),
                   amplification=s.get("amplification"),
                   guest_p99_ms=p99 / 1000.0 if p99 is not None else None,
                   guest_write_bps=guest.get("write_bw_bps"), verified=s.get("verified"))


def slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")[:40]


def table_text(rows: Sequence[DemoRow], time_limit: float) -> str:
    """The demo's table, for a terminal."""
    head = f"{'run':<38} {'READY after':>12} {'amplification':>13} {'guest p99':>10} " \
           f"{'guest writes':>13}"
    lines = [head, "-" * len(head)]
    for r in rows:
        ready = f"{r.time_to_ready_s:.1f} s" if r.time_to_ready_s is not None \
            else f"no (>{time_limit:g} s)"
        amp = f"{r.amplification:.2f}x" if r.amplification is not None else "-"
        p99 = f"{r.guest_p99_ms:.1f} ms" if r.guest_p99_ms is not None else "-"
        bw = format_rate(r.guest_write_bps) if r.guest_write_bps is not None else "-"
        lines.append(f"{r.label:<38} {ready:>12} {amp:>13} {p99:>10} {bw:>13}")
    return "\n".join(lines)


def write_plots(traces: Sequence[Trace], out: Path) -> list[Path]:
    """Overlaid convergence, throughput (and latency) plots as PNGs in ``out``."""
    from . import plots
    written = []
    for name, make in (("convergence.png", plots.convergence),
                       ("throughput.png", plots.throughput)):
        path = out / name
        make(traces).savefig(path)
        written.append(path)
    if any(t.fio_latency for t in traces):
        path = out / "latency.png"
        plots.latency(traces).savefig(path)
        written.append(path)
    return written


async def run_demo(out: os.PathLike[str] | str, *, setup: Setup = Setup(),
                   load: FioLoad | None = FioLoad(latency_log=True),
                   time_limit: float = 20.0, hz: float = 10.0,
                   configs: Sequence[tuple[str, dict[str, Any]]] | None = None,
                   report: Callable[[str], None] = lambda text: None,
                   on_start: Callable[[Any, Any], None] | None = None) -> list[DemoRow]:
    """Run the comparison; write traces, plots and ``demo.csv`` under ``out``.

    ``configs`` defaults to `DEMO_CONFIGS`, or across a link (``setup.link``) to
    `wan_configs`: the model's pick for that link beside the LAN's winner.
    """
    if configs is None:
        configs = wan_configs(setup, load) if setup.link is not None else DEMO_CONFIGS
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report(f"measuring the offline copy speed (qemu-img convert of "
           f"{format_size(setup.size)})...")
    with tempfile.TemporaryDirectory(prefix="qmpkit-offline-") as tmp:
        src = await create_image(Path(tmp) / "src.img", setup.size, fmt=setup.fmt, fill="mixed")
        offline = await measure_offline_copy(src, tmp, fmt=setup.fmt)
    report(f"offline copy: {format_rate(offline)}")
    rows: list[DemoRow] = []
    traces: list[Trace] = []
    for i, (label, options) in enumerate(configs, 1):
        folder = out / f"{i}-{slug(label)}"
        report(f"run {i}/{len(configs)}: {label}")
        result: RunResult = await run_experiment(
            setup=setup, load=load, mirror=options, time_limit=time_limit, hz=hz, out=folder,
            label=label, offline_copy_bps=offline, on_start=on_start)
        s = result.trace.summary
        if result.converged:
            report(f"  READY after {s['time_to_ready_s']:.1f} s; completed, "
                   f"{'verified' if s.get('verified') else 'NOT verified'}")
        else:
            report(f"  not READY within {time_limit:g} s; cancelled (source untouched)")
        traces.append(result.trace)
        rows.append(DemoRow.from_trace(result.trace, folder))
    for path in write_plots(traces, out):
        report(f"wrote {path}")
    with open(out / "demo.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["label", "folder", "time_to_ready_s", "amplification", "guest_p99_ms",
                    "guest_write_bps", "verified"])
        for r in rows:
            w.writerow([r.label, r.folder, r.time_to_ready_s, r.amplification, r.guest_p99_ms,
                        r.guest_write_bps, r.verified])
    return rows
