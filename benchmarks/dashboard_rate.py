"""Does the notebook's live dashboard starve the sampler?

A `MirrorPanel` samples its job at ``--hz`` (default 10) on the event loop that
the notebook's widgets share. A `Dashboard` redraws two matplotlib PNGs up to
``--fps`` (default 2) times a second. The same speed-limited mirror runs in
three modes, alternated round by round so that machine drift hits all alike:

- ``none``: no dashboard;
- ``loop``: the dashboard drawing on the event loop (qmpkit 0.1's way);
- ``thread``: the dashboard drawing in a worker thread (the way it is now).

It prints, per run, the sampler's achieved rate (samples per second of the
recording) and its longest gap, then the median achieved rate of each mode as
a ratio of the rate asked. Goal: ``thread`` >= 0.95 of the asked rate.

    .venv/bin/python benchmarks/dashboard_rate.py [--rounds 3] [--seconds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from qmpkit import Qemu
from qmpkit.widgets import Dashboard, MirrorPanel

MiB = 1 << 20
MODES = ("none", "loop", "thread")


async def one_run(mode: str, hz: float, fps: float, seconds: float) -> tuple[float, float, int]:
    speed = 32 * MiB
    size = int(speed * seconds)
    async with await Qemu.open() as qemu:
        await qemu.nodes.add_image("src", size, fill="mixed")
        await qemu.nodes.add_image("dst", size)
        panel = MirrorPanel(qemu, hz=hz, verify=False)
        dash = None
        if mode != "none":
            dash = Dashboard(panel, fps=fps)
            dash._offload = mode == "thread"
        panel.granularity.value = "64K"
        panel.speed.value = "32M"
        await panel.start()
        await panel.wait_ready(timeout=seconds * 10 + 60)
        rec = panel.recording
        assert rec is not None
        ts = [s.t_s for s in rec.samples]
        await panel.cancel()
        if dash is not None:
            await dash.stop()
    ts = [t for t in ts if t is not None]
    achieved = (len(ts) - 1) / (ts[-1] - ts[0])
    gap = max(b - a for a, b in zip(ts, ts[1:]))
    return achieved, gap, dash.frames if dash else 0


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8.0,
                    help="length of each mirror (a 32 MiB/s speed limit)")
    ap.add_argument("--hz", type=float, default=10.0)
    ap.add_argument("--fps", type=float, default=2.0)
    ns = ap.parse_args()
    rates: dict[str, list[float]] = {m: [] for m in MODES}
    gaps: dict[str, list[float]] = {m: [] for m in MODES}
    t0 = time.monotonic()
    for r in range(ns.rounds):
        for mode in MODES:
            hz, gap, frames = await one_run(mode, ns.hz, ns.fps, ns.seconds)
            rates[mode].append(hz)
            gaps[mode].append(gap)
            print(f"round {r + 1}: dashboard {mode:>6}: sampler {hz:5.2f} Hz of {ns.hz:g}, "
                  f"longest gap {gap * 1000:5.0f} ms, {frames} frames", flush=True)
    print(f"\n{ns.rounds} rounds in {time.monotonic() - t0:.0f} s; sampler asked {ns.hz:g} Hz, "
          f"dashboard {ns.fps:g} fps")
    print(f"{'dashboard':>10} | {'median Hz':>9} | {'of asked':>8} | {'vs none':>7} | longest gap")
    base = statistics.median(rates["none"])
    for mode in MODES:
        med = statistics.median(rates[mode])
        print(f"{mode:>10} | {med:9.2f} | {med / ns.hz:8.3f} | {med / base:7.3f} | "
              f"{max(gaps[mode]) * 1000:.0f} ms")
    ok = statistics.median(rates["thread"]) / ns.hz >= 0.95
    print(f"goal: thread >= 0.95 of the asked rate: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    asyncio.run(main())
