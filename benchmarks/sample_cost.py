"""What one sample costs, and how fast the sampler can go.

- the QMP round trip of one sample (query-jobs + query-named-block-nodes),
  with the dirty bitmap read and without it;
- the highest rate the sampler holds, on 1 job and on 16 concurrent jobs on
  one daemon (the Recorder samples all its jobs with the same two commands).

Jobs are speed-limited so that they run for the whole measurement.

    .venv/bin/python benchmarks/sample_cost.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from qmpkit import Qemu
from qmpkit.record import Recorder

MiB = 1 << 20


async def achieved(qemu: Qemu, jobs: list, hz: float, seconds: float, dirty: bool) -> float:
    rec = Recorder(qemu.client, hz=hz, dirty=dirty)
    recs = [rec.add(j) for j in jobs]
    async with rec:
        await asyncio.sleep(seconds)
    return statistics.median(r.trace().summary["achieved_hz"] or 0.0 for r in recs)


async def round_trip(qemu: Qemu, jobs: list, n: int, dirty: bool) -> float:
    rec = Recorder(qemu.client, dirty=dirty)
    for j in jobs:
        rec.add(j)
    await rec.sample()          # the first one also locates the bitmaps
    t0 = time.perf_counter()
    for _ in range(n):
        await rec.sample()
    return (time.perf_counter() - t0) / n


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ns = ap.parse_args()
    async with await Qemu.open() as qemu:
        jobs = []
        for i in range(16):
            await qemu.nodes.add_image(f"s{i}", 64 * MiB, fill=i + 1)
            await qemu.nodes.add_null(f"d{i}", 64 * MiB)
            jobs.append(await qemu.mirror(device=f"s{i}", target=f"d{i}", speed="1M"))
        nodes = len(await qemu.nodes.nodes())
        print(f"one daemon, 16 speed-limited mirrors, {nodes} named nodes")
        for count in (1, 16):
            sel = jobs[:count]
            for dirty in (True, False):
                rt = await round_trip(qemu, sel, 200, dirty)
                top = await achieved(qemu, sel, 1000.0, ns.seconds, dirty)
                print(f"  {count:2d} job(s), dirty bitmap {'read' if dirty else 'skipped'}: "
                      f"{rt * 1e3:.2f} ms a sample, holds {top:.0f} Hz (asked 1000)")
        for j in jobs:
            await j.cancel(timeout=60)


if __name__ == "__main__":
    asyncio.run(main())
