"""How right is `qmpkit.predict`, fed by a probe, against the real sweep?

For each load: probe the lab once (``--probe-seconds``), predict the grid
(granularity 4K, 64K, 1M x buf-size 1M, 16M, background, plus QEMU's
defaults) from the probe's profile, then run the real sweep of the same grid
(``--repeat`` runs each, ``--early-stop``) and compare:

- converged or not, predicted right (goal >= 90% of configurations);
- the median relative error of time to READY where both say READY (goal <= 25%);
- the probe's time against the sweep's (goal <= 0.1).

Loads: the demo's (4 KiB random writes at 20 MiB/s, target throttled to
100 MiB/s); sequential 64 KiB writes; a hot spot (4 KiB random writes in 5% of
the disk); the demo's across the 40 ms, 1 Gbit/s link.

``--guest-cost`` also measures the probe's cost to the guest: fio's p99 write
latency with five probe bitmaps on the node against none, alternated.

    .venv/bin/python benchmarks/prediction_accuracy.py [--size 1G] [--repeat 2] [--guest-cost]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from qmpkit import Qemu
from qmpkit.experiment import Setup, probe_lab
from qmpkit.predict import predict
from qmpkit.probe import DEFAULT_GRANULARITIES
from qmpkit.sweep import default_granularity, grid, run_sweep
from qmpkit.units import parse_size
from qmpkit.workload import FioLoad, FioRunner

MiB = 1 << 20
DEMO = FioLoad(rw="randwrite", bs="4K", rate="20M")
LOADS = {
    "demo (4K random, 20 MiB/s)": (DEMO, None),
    "sequential 64K, 20 MiB/s": (FioLoad(rw="write", bs="64K", rate="20M"), None),
    "hot spot (4K random in 5%)": (FioLoad(rw="randwrite", bs="4K", rate="20M", region=0.05),
                                   None),
    "demo across 40 ms, 1 Gbit/s": (DEMO, "wan"),
}


async def one_load(name: str, load: FioLoad, link: str | None, size: int, repeat: int,
                   seconds: float, time_limit: float, out: Path) -> dict:
    t0 = time.monotonic()
    profile = await probe_lab(size=size, load=load, granularities=DEFAULT_GRANULARITIES,
                              seconds=seconds)
    probe_s = time.monotonic() - t0
    setup = Setup(size=size, target_speed="100M", link=link)
    configs = grid(granularity=["4K", "64K", "1M"], buf_size=["1M", "16M"])
    t0 = time.monotonic()
    result = await run_sweep(out, configs=configs, repeat=repeat, setup=setup, load=load,
                             time_limit=time_limit, early_stop=True, fresh=True)
    sweep_s = time.monotonic() - t0
    rows = []
    for r in result["summary"].to_dict("records"):
        g = r["granularity"]
        g = int(g) if g == g and g is not None else default_granularity("raw")
        b = r["buf_size"]
        b = int(b) if b == b and b is not None else None
        p = predict(disk_bytes=size, load=profile.load(iodepth=load.iodepth), granularity=g,
                    buf_size=b, copy_mode=r["copy_mode"], target_bps=setup.target_speed,
                    link=setup.link)
        measured = r["converged_runs"] == r["runs"]
        right = (p.converges == "yes") == measured
        err = None
        if measured and p.time_to_ready_s is not None and r["time_to_ready_s"]:
            err = abs(p.time_to_ready_s - r["time_to_ready_s"]) / r["time_to_ready_s"]
        rows.append((r["label"], p.converges, p.time_to_ready_s, measured,
                     r["time_to_ready_s"], right, err))
        print(f"  {r['label'][:60]:<60} predicted {p.converges:<10} "
              f"{p.time_to_ready_s or float('nan'):6.1f} s | measured READY "
              f"{r['converged_runs']}/{r['runs']} {r['time_to_ready_s'] or float('nan'):6.1f} s"
              f" | {'right' if right else 'WRONG'}", flush=True)
    return {"name": name, "rows": rows, "probe_s": probe_s, "sweep_s": sweep_s,
            "write_bps": profile.write_bps}


async def guest_cost(size: int, rounds: int, seconds: float) -> None:
    load = FioLoad(rw="randwrite", bs="4K", rate="20M", runtime=seconds)
    p99: dict[bool, list[float]] = {False: [], True: []}
    for r in range(rounds):
        for bitmaps in (False, True):
            async with await Qemu.open() as qemu:
                await qemu.nodes.add_image("src", size)
                if bitmaps:
                    for g in DEFAULT_GRANULARITIES:
                        await qemu.client.execute("block-dirty-bitmap-add", {
                            "node": "src", "name": f"bench-{g}", "granularity": g})
                fio = FioRunner(load, await qemu.nodes.export_nbd("src"), qemu.workdir / "f")
                await fio.start()
                res = await fio.wait(timeout=seconds + 60)
            p99[bitmaps].append(res.write_p99_us)
            print(f"round {r + 1}: {'5 bitmaps' if bitmaps else 'no bitmap'}: p99 "
                  f"{res.write_p99_us:.0f} us", flush=True)
    ratio = statistics.median(p99[True]) / statistics.median(p99[False])
    print(f"guest p99 write latency, five probe bitmaps / none: {ratio:.3f} (goal <= 1.05)")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--probe-seconds", type=float, default=15.0)
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--guest-cost", action="store_true")
    ap.add_argument("--loads", default="", help="comma-separated indices into the loads "
                                                 "(default all)")
    ns = ap.parse_args()
    size = parse_size(ns.size)
    names = list(LOADS)
    pick = [names[int(i)] for i in ns.loads.split(",")] if ns.loads else names
    results = []
    with tempfile.TemporaryDirectory(prefix="qmpkit-predict-") as tmp:
        for i, name in enumerate(pick):
            load, link = LOADS[name]
            print(f"== {name}", flush=True)
            results.append(await one_load(name, load, link, size, ns.repeat, ns.probe_seconds,
                                          ns.time_limit, Path(tmp) / f"s{i}"))
    print(f"\n{'load':<30} | {'converged right':>15} | {'median error':>12} | probe/sweep")
    everything = []
    for res in results:
        rows = res["rows"]
        everything += rows
        errs = [r[6] for r in rows if r[6] is not None]
        print(f"{res['name']:<30} | {sum(r[5] for r in rows):>7} of {len(rows):<5} | "
              f"{(statistics.median(errs) * 100 if errs else float('nan')):11.0f}% | "
              f"{res['probe_s'] / res['sweep_s']:.3f}")
    errs = [r[6] for r in everything if r[6] is not None]
    right = sum(r[5] for r in everything)
    print(f"{'all':<30} | {right:>7} of {len(everything):<5} | "
          f"{(statistics.median(errs) * 100 if errs else float('nan')):11.0f}% |")
    print(f"goals: converged right {right / len(everything) * 100:.0f}% (>= 90%); median "
          f"error {statistics.median(errs) * 100 if errs else float('nan'):.0f}% (<= 25%)")
    if ns.guest_cost:
        await guest_cost(size, 3, 10.0)


if __name__ == "__main__":
    asyncio.run(main())
