"""How much time does early stopping save on a sweep?

Runs the same sweep twice, with and without --early-stop, each on a fresh
folder, and prints both wall times and their ratio. By default it is the
default CLI sweep (granularity 4K,64K,1M x buf-size 1M,16M, 3 repeats, 1 GiB,
20 MiB/s of 4 KiB random writes into a 100 MiB/s target): about 20 minutes
here. Pass smaller settings for a quick look:

    .venv/bin/python benchmarks/sweep_early_stop.py --size 256M --repeat 1
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time

from qmpkit.experiment import Setup
from qmpkit.sweep import grid, run_sweep
from qmpkit.workload import FioLoad


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--time-limit", type=float, default=30.0)
    ap.add_argument("--granularity", default="4K,64K,1M")
    ap.add_argument("--buf-size", default="1M,16M")
    ns = ap.parse_args()
    configs = grid(granularity=ns.granularity.split(","), buf_size=ns.buf_size.split(","))
    times = {}
    recs = {}
    for early in (False, True):
        with tempfile.TemporaryDirectory(prefix="qmpkit-sweep-bench-") as out:
            t0 = time.monotonic()
            result = await run_sweep(out, configs=configs, repeat=ns.repeat,
                                     setup=Setup(size=ns.size), load=FioLoad(),
                                     time_limit=ns.time_limit, early_stop=early)
            times[early] = time.monotonic() - t0
            r = result["recommendation"]
            recs[early] = (r["granularity"], r["buf_size"], r["copy_mode"])
            stopped = int(result["results"]["early_stopped"].sum())
        print(f"early stop {'on ' if early else 'off'}: {times[early]:.1f} s "
              f"({len(configs)} configs x {ns.repeat}, {stopped} runs stopped early), "
              f"recommends {recs[early]}", flush=True)
    print(f"early stopping: {times[True] / times[False]:.2f} of the time "
          f"({times[False] - times[True]:.0f} s saved); same recommendation: "
          f"{recs[True] == recs[False]}")


if __name__ == "__main__":
    asyncio.run(main())
