"""How close does the mirror come to the disk's own limit?

On one disk image of ``--size`` (default 4G, so each copy lasts seconds), in
``--rounds`` interleaved rounds (default 5), with no write load and no throttle:

- the disk's limit: fio sequential read of the source and sequential write of a
  fresh file, 1 MiB blocks, queue depth 16, with O_DIRECT and through the page cache;
- ``qemu-img convert``: with ``-t none -T none`` (O_DIRECT both ends), the default
  (page cache), and ``-m 16 -W`` (16 requests, out of order) with O_DIRECT;
- the mirror (``blockdev-mirror``, until READY): QEMU's defaults, and the
  configuration given by ``--best`` (default granularity 1M, buf-size 64M), each
  through the page cache and with ``cache.direct=on`` on both nodes.

Each is printed as a ratio of the disk's O_DIRECT limit (min of read and write)
and of ``qemu-img convert`` with the same cache mode. Goals: the best mirror,
cache modes matched, >= 0.9x qemu-img convert and >= 0.8x the O_DIRECT limit.

    .venv/bin/python benchmarks/mirror_limit.py [--size 4G] [--rounds 5] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from qmpkit import Qemu, create_image
from qmpkit.units import format_rate, parse_size

MiB = 1 << 20


def fio(path: Path, rw: str, size: int, direct: bool) -> float:
    out = subprocess.run(["fio", "--name=limit", f"--filename={path}", f"--rw={rw}",
                          "--bs=1M", "--iodepth=16", "--ioengine=libaio",
                          f"--direct={int(direct)}", f"--size={size}",
                          "--output-format=json"], check=True, capture_output=True, text=True)
    job = json.loads(out.stdout)["jobs"][0]
    return float(job["read" if rw == "read" else "write"]["bw_bytes"])


def convert(src: Path, dst: Path, size: int, extra: list[str]) -> float:
    dst.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(dst), str(size)], check=True)
    t0 = time.monotonic()
    subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", *extra,
                    str(src), str(dst)], check=True)
    return size / (time.monotonic() - t0)


async def mirror(src: Path, dst: Path, size: int, direct: bool, best: dict | None) -> float:
    dst.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(dst), str(size)], check=True)
    async with await Qemu.open() as qemu:
        await qemu.nodes.add_file("src", src, read_only=True, cache_direct=direct,
                                  aio="native" if direct else None)
        await qemu.nodes.add_file("dst", dst, cache_direct=direct,
                                  aio="native" if direct else None)
        t0 = time.monotonic()
        job = await qemu.mirror(device="src", target="dst", **(best or {}))
        await job.wait_ready(timeout=3600)
        took = time.monotonic() - t0
        await job.cancel(timeout=120)
    return size / took


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="4G")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default="/var/tmp", help="where the images go (a real disk)")
    ap.add_argument("--best", default="granularity=1M,buf_size=64M",
                    help="the mirror configuration to compare with QEMU's defaults")
    ns = ap.parse_args()
    size = parse_size(ns.size)
    best = dict(kv.split("=") for kv in ns.best.split(","))
    results: dict[str, list[float]] = {}

    def add(name: str, bps: float) -> None:
        results.setdefault(name, []).append(bps)
        print(f"  {name:<44} {format_rate(bps):>12}", flush=True)

    with tempfile.TemporaryDirectory(prefix="qmpkit-limit-", dir=ns.dir) as tmp:
        src, dst = Path(tmp) / "src.raw", Path(tmp) / "dst.raw"
        await create_image(src, size, fill="mixed")
        os.sync()
        for r in range(ns.rounds):
            print(f"round {r + 1} of {ns.rounds}", flush=True)
            add("fio read, O_DIRECT", fio(src, "read", size, True))
            dst.unlink(missing_ok=True)
            add("fio write, O_DIRECT", fio(dst, "write", size, True))
            add("fio read, page cache", fio(src, "read", size, False))
            dst.unlink(missing_ok=True)
            add("fio write, page cache", fio(dst, "write", size, False))
            add("qemu-img convert -t none -T none", convert(src, dst, size,
                                                            ["-t", "none", "-T", "none"]))
            add("qemu-img convert -t none -T none -m 16 -W",
                convert(src, dst, size, ["-t", "none", "-T", "none", "-m", "16", "-W"]))
            add("qemu-img convert (page cache)", convert(src, dst, size, []))
            add("mirror, QEMU defaults, O_DIRECT", await mirror(src, dst, size, True, None))
            add(f"mirror, {ns.best}, O_DIRECT", await mirror(src, dst, size, True, best))
            add("mirror, QEMU defaults, page cache", await mirror(src, dst, size, False, None))
            add(f"mirror, {ns.best}, page cache", await mirror(src, dst, size, False, best))
    med = {k: statistics.median(v) for k, v in results.items()}
    limit = min(med["fio read, O_DIRECT"], med["fio write, O_DIRECT"])
    conv = {"O_DIRECT": med["qemu-img convert -t none -T none"],
            "page cache": med["qemu-img convert (page cache)"]}
    print(f"\nmedians of {ns.rounds} interleaved rounds, {ns.size}; the disk's O_DIRECT limit "
          f"(min of read and write) {format_rate(limit)}")
    print(f"{'what':<44} | {'median':>12} | {'/ O_DIRECT limit':>16} | / qemu-img convert, "
          "same cache")
    for k, v in med.items():
        mode = "page cache" if "page cache" in k else "O_DIRECT"
        print(f"{k:<44} | {format_rate(v):>12} | {v / limit:16.2f} | {v / conv[mode]:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
