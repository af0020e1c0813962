"""How faithful the emulated link (qmpkit.link) is, measured with fio over NBD.

A qemu-storage-daemon exports a 256 MiB raw image over NBD; fio's ``nbd``
ioengine reads it through the link, run as a `LinkProcess` (its own process,
as a measurement should use it):

- latency: 4 KiB random reads at queue depth 1, RTT 0 (the relay's own
  latency), 5, 20 and 40 ms; the error is (mean latency − the same reads
  without a link) against the set RTT (goal: within ±10 %);
- rate: 1 MiB sequential reads at queue depth 16 through a 0.5 ms link paced at
  100 Mbit, 500 Mbit and 1 Gbit/s, against the set rate (goal: within 5 %);
- the relay's own ceiling: the same bulk reads with no delay and no limit,
  through the relay as a process and in this process's event loop, against a
  direct connection.

Rounds are interleaved and repeated (``--repeats``), and medians are printed:
the machine is noisy.

    .venv/bin/python benchmarks/link_accuracy.py [--repeats 3] [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics

from qmpkit import Qemu
from qmpkit.images import run_tool
from qmpkit.link import Link, LinkProcess, LinkSpec

MiB = 1 << 20
RTTS_MS = (0, 5, 20, 40)
RATES_MBIT = (100, 500, 1000)


async def fio(uri: str, *, rw: str, bs: str, depth: int, seconds: float) -> dict:
    """One fio run over NBD; returns its ``read`` section."""
    _, out = await run_tool(["fio", "--name=link", "--ioengine=nbd", f"--uri={uri}",
                             f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}",
                             "--time_based", f"--runtime={seconds:g}", "--ramp_time=0.5",
                             "--output-format=json"])
    return json.loads(out[out.index("{"):])["jobs"][0]["read"]


async def qd1_latency(uri: str, seconds: float) -> float:
    """Mean completion latency (s) of 4 KiB random reads at queue depth 1."""
    read = await fio(uri, rw="randread", bs="4k", depth=1, seconds=seconds)
    return read["lat_ns"]["mean"] / 1e9


async def bulk_rate(uri: str, seconds: float) -> float:
    """Bytes/s of 1 MiB sequential reads at queue depth 16."""
    read = await fio(uri, rw="read", bs="1M", depth=16, seconds=seconds)
    return float(read["bw_bytes"])


def med(values: list[float]) -> float:
    return statistics.median(values)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0, help="per fio run")
    ns = ap.parse_args()
    async with await Qemu.open() as qemu:
        await qemu.nodes.add_image("disk", 256 * MiB, fill="mixed")
        direct_uri = await qemu.nodes.export_nbd("disk", export="dst")
        sock = await qemu.nodes.nbd_socket()
        base: list[float] = []
        lat: dict[int, list[float]] = {r: [] for r in RTTS_MS}
        rate: dict[int, list[float]] = {r: [] for r in RATES_MBIT}
        ceil: dict[str, list[float]] = {"direct": [], "process": [], "in-process": []}
        for round_ in range(ns.repeats):
            print(f"round {round_ + 1}/{ns.repeats}", flush=True)
            base.append(await qd1_latency(direct_uri, ns.seconds))
            for rtt in RTTS_MS:
                async with await LinkProcess.start(LinkSpec(rtt / 1e3, None), sock) as link:
                    lat[rtt].append(await qd1_latency(link.nbd_uri("dst"), ns.seconds))
            for mbit in RATES_MBIT:
                spec = LinkSpec(0.0005, mbit * 1e6 / 8)
                async with await LinkProcess.start(spec, sock) as link:
                    rate[mbit].append(await bulk_rate(link.nbd_uri("dst"), ns.seconds))
            ceil["direct"].append(await bulk_rate(direct_uri, ns.seconds))
            async with await LinkProcess.start(LinkSpec(0, None), sock) as link:
                ceil["process"].append(await bulk_rate(link.nbd_uri("dst"), ns.seconds))
            async with await Link.start(LinkSpec(0, None), sock) as link:
                ceil["in-process"].append(await bulk_rate(link.nbd_uri("dst"), ns.seconds))

    b = med(base)
    print(f"\n4 KiB reads at QD1 (fio nbd), without a link: {b * 1e3:.3f} ms "
          f"(runs: {', '.join(f'{x * 1e3:.3f}' for x in base)})")
    print(f"{'set RTT':>8} | {'measured':>9} | {'minus direct':>12} | {'error':>7} | runs (ms)")
    for rtt in RTTS_MS:
        m = med(lat[rtt])
        err = f"{(m - b) / (rtt / 1e3) - 1:>+7.1%}" if rtt else "    n/a"
        print(f"{rtt:>5} ms | {m * 1e3:>6.2f} ms | {(m - b) * 1e3:>9.2f} ms | {err} | "
              + ", ".join(f"{x * 1e3:.2f}" for x in lat[rtt]))
    print("\n1 MiB sequential reads at QD16 through a 0.5 ms link")
    print(f"{'set rate':>9} | {'set MiB/s':>9} | {'measured':>8} | {'ratio':>6} | runs (MiB/s)")
    for mbit in RATES_MBIT:
        want = mbit * 1e6 / 8
        m = med(rate[mbit])
        print(f"{mbit:>5} Mbit | {want / MiB:>9.1f} | {m / MiB:>8.1f} | {m / want:>6.3f} | "
              + ", ".join(f"{x / MiB:.1f}" for x in rate[mbit]))
    print("\nThe relay's own ceiling (no delay, no limit), bulk reads")
    d = med(ceil["direct"])
    for name, values in ceil.items():
        m = med(values)
        print(f"{name:>11} | {m / MiB:>7.1f} MiB/s | {m / d:>5.2f}x direct | runs: "
              + ", ".join(f"{x / MiB:.0f}" for x in values))


if __name__ == "__main__":
    asyncio.run(main())
