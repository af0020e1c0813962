"""Does recording slow the mirror down?

The same mirror (one source filled with data, mirrored to a fresh target each
run, until READY) runs with no sampler, with the sampler at 10 Hz and at 100 Hz.
Runs alternate (none, 10 Hz, 100 Hz, none, ...) so that machine drift hits
all three alike. It prints each run and the median ratio of times to READY,
sampled over unsampled. Goal: <= 1.02 at 10 Hz.

    .venv/bin/python benchmarks/sampler_overhead.py [--size 2G] [--pairs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from qmpkit import Qemu, create_image
from qmpkit.record import Recorder
from qmpkit.units import parse_size


async def one_run(src: Path, size: int, hz: float | None) -> float:
    async with await Qemu.open() as qemu:
        await qemu.nodes.add_file("src", src, read_only=True)
        await qemu.nodes.add_image("dst", size)
        recorder = Recorder(qemu.client, hz=hz) if hz else None
        t0 = time.monotonic()
        job = await qemu.mirror(device="src", target="dst", granularity="1M")
        if recorder:
            recorder.add(job)
            recorder.start()
        await job.wait_ready(timeout=600)
        took = time.monotonic() - t0
        if recorder:
            await recorder.stop()
        await job.cancel(timeout=60)
        return took


async def run_rounds(src: Path, size: int, pairs: int, modes: list[float | None],
                     times: dict[float | None, list[float]]) -> None:
    await one_run(src, size, None)   # warm-up (page cache), not counted
    for i in range(pairs):
        for m in modes:
            t = await one_run(src, size, m)
            times[m].append(t)
            print(f"round {i + 1}: sampler {'off' if m is None else f'{m:g} Hz':>7}: "
                  f"READY after {t:.3f} s", flush=True)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="2G")
    ap.add_argument("--pairs", type=int, default=5)
    ns = ap.parse_args()
    size = parse_size(ns.size)
    modes: list[float | None] = [None, 10.0, 100.0]
    times: dict[float | None, list[float]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory(prefix="qmpkit-bench-") as tmp:
        src = await create_image(Path(tmp) / "src.raw", size, fill="mixed")
        await run_rounds(src, size, ns.pairs, modes, times)
    print()
    print(f"sampler overhead, {ns.size} mirror to READY, {ns.pairs} alternating rounds")
    for m in modes[1:]:
        ratios = [a / b for a, b in zip(times[m], times[None])]
        print(f"  {m:g} Hz / off: median ratio {statistics.median(ratios):.3f} "
              f"(per round: {', '.join(f'{r:.3f}' for r in ratios)})")
    print(f"  median time to READY: off {statistics.median(times[None]):.3f} s, "
          f"10 Hz {statistics.median(times[10.0]):.3f} s, "
          f"100 Hz {statistics.median(times[100.0]):.3f} s")


if __name__ == "__main__":
    asyncio.run(main())
