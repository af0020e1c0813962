"""The sampler's cost on a big block graph (a VM host with many disks).

``query-named-block-nodes`` describes every node, so one sample costs more as
the node count grows. For 64, 256 and 1024 named nodes (raw images on sparse
files: a file node and a format node per disk) it prints, side by side in one
run:

- the QMP round trip of ``query-named-block-nodes`` (flat) and of
  ``query-block-jobs`` (the two queries of a sample);
- one `Recorder.sample`, averaged over 30 ticks: above 10 ms a bitmap read, the
  Recorder reads the bitmaps only every k-th tick (``dirty_budget``, 2% of the
  time), so this is the amortized cost, with k;
- the share of QEMU's main loop the sampler takes at 10 Hz (round trip × 10);
- time to READY of the same unthrottled mirror with the sampler at 10 Hz
  against no sampler, alternated (``--rounds``), as a median ratio.
  Goal: <= 1.02 at 1024 nodes.

    .venv/bin/python benchmarks/sampler_scale.py [--counts 64,256,1024] [--rounds 3]
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

MiB = 1 << 20


async def add_disks(qemu: Qemu, folder: Path, nodes: int) -> None:
    """``nodes`` named nodes: nodes/2 raw images, each a file node and a raw node."""
    for i in range(nodes // 2):
        path = folder / f"disk{i}.img"
        with open(path, "wb") as f:
            f.truncate(MiB)
        await qemu.client.execute("blockdev-add", {
            "driver": "raw", "node-name": f"disk{i}",
            "file": {"driver": "file", "filename": str(path), "node-name": f"disk{i}-file"}})


async def timed(qemu: Qemu, cmd: str, args: dict | None, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        await qemu.client.execute(cmd, args)
    return (time.perf_counter() - t0) / n


async def one_mirror(qemu: Qemu, src: Path, size: int, hz: float | None, k: int) -> float:
    await qemu.nodes.add_file(f"src{k}", src, read_only=True)
    await qemu.nodes.add_image(f"dst{k}", size)
    recorder = Recorder(qemu.client, hz=hz) if hz else None
    t0 = time.monotonic()
    job = await qemu.mirror(device=f"src{k}", target=f"dst{k}", granularity="1M",
                            job_id=f"m{k}")
    if recorder:
        recorder.add(job)
        recorder.start()
    await job.wait_ready(timeout=600)
    took = time.monotonic() - t0
    if recorder:
        await recorder.stop()
    await job.cancel(timeout=60)
    await qemu.nodes.delete(f"dst{k}")
    await qemu.nodes.delete(f"src{k}")
    return took


async def measure(count: int, src: Path, size: int, rounds: int, tmp: Path) -> dict:
    async with await Qemu.open() as qemu:
        await add_disks(qemu, tmp, count - 4)      # the mirror's 4 nodes make up the count
        await qemu.nodes.add_file("s0", src, read_only=True)
        await qemu.nodes.add_null("d0", size)
        total = len(await qemu.nodes.nodes())
        job = await qemu.mirror(device="s0", target="d0", speed="1M", job_id="slow")
        rec = Recorder(qemu.client, hz=10)
        rec.add(job)
        await rec.sample()
        qnbn = await timed(qemu, "query-named-block-nodes", {"flat": True}, 30)
        qbj = await timed(qemu, "query-block-jobs", None, 30)
        t0 = time.perf_counter()
        for _ in range(30):
            await rec.sample()
        one = (time.perf_counter() - t0) / 30
        every = rec.dirty_every
        await job.cancel(timeout=60)
        await qemu.nodes.delete("d0")
        await qemu.nodes.delete("s0")
        times: dict[str, list[float]] = {"off": [], "10 Hz": []}
        await one_mirror(qemu, src, size, None, 0)            # warm-up (page cache)
        for r in range(rounds):
            for mode, hz in (("off", None), ("10 Hz", 10.0)):
                times[mode].append(await one_mirror(qemu, src, size, hz, 1 + 2 * r
                                                    + (hz is not None)))
        ratio = statistics.median(times["10 Hz"]) / statistics.median(times["off"])
    return {"nodes": total, "qnbn_ms": qnbn * 1e3, "qbj_ms": qbj * 1e3,
            "sample_ms": one * 1e3, "share_10hz": one * 10, "ratio": ratio, "every": every,
            "ready_off_s": statistics.median(times["off"])}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="64,256,1024")
    ap.add_argument("--size", default="1G", help="the mirrored disk")
    ap.add_argument("--rounds", type=int, default=3)
    ns = ap.parse_args()
    size = parse_size(ns.size)
    rows = []
    with tempfile.TemporaryDirectory(prefix="qmpkit-scale-") as tmp:
        src = await create_image(Path(tmp) / "src.img", size, fill="mixed")
        for count in [int(c) for c in ns.counts.split(",")]:
            sub = Path(tmp) / f"n{count}"
            sub.mkdir()
            row = await measure(count, src, size, ns.rounds, sub)
            rows.append(row)
            print(f"{row['nodes']:5d} nodes: query-named-block-nodes {row['qnbn_ms']:6.2f} ms, "
                  f"query-block-jobs {row['qbj_ms']:.2f} ms, one sample {row['sample_ms']:6.2f} "
                  f"ms; READY {row['ready_off_s']:.2f} s unsampled, ratio {row['ratio']:.3f}",
                  flush=True)
    print(f"\n{'nodes':>5} | {'bitmap read (ms)':>16} | {'sample (ms)':>11} | "
          f"{'bitmaps every':>13} | {'main loop at 10 Hz':>18} | {'READY ratio 10 Hz/off':>21}")
    for r in rows:
        print(f"{r['nodes']:5d} | {r['qnbn_ms']:16.2f} | {r['sample_ms']:11.2f} | "
              f"{r['every']:>7d} ticks | {r['share_10hz'] * 100:17.1f}% | {r['ratio']:21.3f}")


if __name__ == "__main__":
    asyncio.run(main())
