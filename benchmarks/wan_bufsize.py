"""Across a WAN, buf-size decides the copy rate: measured against the model.

Part 1 (bulk): on an emulated link (default 40 ms RTT, 1 Gbit/s; `qmpkit.link`)
with no write load and an unthrottled target, mirror a ``--size`` source at
buf-size 1, 4, 16 and 64 MiB, with granularity 64 KiB and 1 MiB, ``--repeat``
times each, alternated. The bulk throughput (disk size / time to READY) is
printed next to `qmpkit.link.model_ceilings` (buf-size per round trip, capped
by the link). Goals: each within 20% of the model; 16 MiB >= 4x 1 MiB.

Part 2 (``--flip``): the demo's load (4 KiB random writes at 20 MiB/s, target
throttled to 100 MiB/s) at several RTTs, granularity 4 KiB, 64 KiB and 1 MiB
in background mode: which converge (time limit ``--time-limit``, stopped early
when hopeless), against `qmpkit.predict`.

    .venv/bin/python benchmarks/wan_bufsize.py [--size 1G] [--repeat 3] [--flip]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from qmpkit.experiment import Setup, hopeless, run_experiment
from qmpkit.link import LinkSpec, model_ceilings
from qmpkit.predict import Load, predict
from qmpkit.units import format_size, parse_size
from qmpkit.workload import FioLoad

MiB = 1 << 20
BUFS = (1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB)
GRANS = (64 << 10, 1 * MiB)


async def bulk(size: int, spec: LinkSpec, repeat: int) -> None:
    setup = Setup(size=size, target_speed=None, link=spec)
    got: dict[tuple[int, int], list[float]] = {(g, b): [] for g in GRANS for b in BUFS}
    t0 = time.monotonic()
    for r in range(repeat):
        for g in GRANS:
            for b in BUFS:
                res = await run_experiment(setup=setup, load=None, time_limit=600,
                                           mirror={"granularity": g, "buf_size": b},
                                           verify=False, measure_offline=False)
                t = res.trace.ready_time()
                bps = size / t if t else 0.0
                got[(g, b)].append(bps)
                print(f"round {r + 1}: granularity {format_size(g):>7}, buf-size "
                      f"{format_size(b):>6}: {bps / MiB:6.1f} MiB/s", flush=True)
    print(f"\nbulk copy of {format_size(size)} across {spec.describe()}, no write load, "
          f"median of {repeat} ({time.monotonic() - t0:.0f} s in all)")
    print(f"{'granularity':>11} | {'buf-size':>8} | {'measured':>12} | {'model':>12} | "
          f"{'ratio':>5}")
    for (g, b), vals in got.items():
        m = statistics.median(vals)
        model = model_ceilings(spec, b, g).bulk_bps
        print(f"{format_size(g):>11} | {format_size(b):>8} | {m / MiB:7.1f} MiB/s | "
              f"{model / MiB:7.1f} MiB/s | {m / model:5.2f}")
    for g in GRANS:
        ratio = statistics.median(got[(g, 16 * MiB)]) / statistics.median(got[(g, MiB)])
        print(f"granularity {format_size(g)}: 16 MiB / 1 MiB = {ratio:.2f}x (goal >= 4)")


async def flip(size: int, rtts: list[float], time_limit: float, repeat: int) -> None:
    load = FioLoad(rw="randwrite", bs="4K", rate="20M", latency_log=False)
    guest = Load(write_bps=20 * MiB, bs=4096)
    rows = []
    for rtt in rtts:
        spec = LinkSpec(rtt_s=rtt / 1000, rate_bps=125e6)
        setup = Setup(size=size, target_speed="100M", link=spec)
        for g in (4 << 10, 64 << 10, 1 * MiB):
            times = []
            for _ in range(repeat):
                res = await run_experiment(setup=setup, load=load, time_limit=time_limit,
                                           mirror={"granularity": g}, verify=False,
                                           measure_offline=False, give_up=hopeless())
                times.append(res.trace.ready_time())
            p = predict(disk_bytes=size, load=guest, granularity=g, target_bps=100 * MiB,
                        link=spec)
            ok = sum(t is not None for t in times)
            rows.append((rtt, g, ok, times, p))
            print(f"RTT {rtt:g} ms, granularity {format_size(g)}: READY in {ok} of {repeat} "
                  f"runs {[round(t, 1) if t else None for t in times]}; model: {p.converges}"
                  f" ({p.reason})", flush=True)
    print(f"\nthe demo's load across links of 1 Gbit/s, {format_size(size)}, background mode")
    print(f"{'RTT':>7} | {'granularity':>11} | {'READY':>5} | {'time to READY':>13} | model")
    for rtt, g, ok, times, p in rows:
        done = [t for t in times if t is not None]
        tt = f"{statistics.median(done):.1f} s" if done else "-"
        pt = f", {p.time_to_ready_s:.0f} s" if p.time_to_ready_s else ""
        print(f"{rtt:5g} ms | {format_size(g):>11} | {ok}/{len(times)} | {tt:>13} | "
              f"{p.converges}{pt}")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--link", default="wan", help="the link of part 1 (default wan)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--flip", action="store_true", help="also run part 2")
    ap.add_argument("--flip-size", default="1G")
    ap.add_argument("--rtts", default="0.2,5,20,40,80", help="part 2's RTTs in ms")
    ap.add_argument("--time-limit", type=float, default=60.0)
    ns = ap.parse_args()
    await bulk(parse_size(ns.size), LinkSpec.parse(ns.link), ns.repeat)
    if ns.flip:
        await flip(parse_size(ns.flip_size), [float(x) for x in ns.rtts.split(",")],
                   ns.time_limit, max(1, ns.repeat // 2))


if __name__ == "__main__":
    asyncio.run(main())
