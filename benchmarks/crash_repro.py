"""Does qemu-storage-daemon survive cancelling a mirror that did not converge?

QEMU 7.2 was seen to die of SIGSEGV when a mirror with granularity 64 KiB and
buf-size 1 MiB, into a throttled target under 4 KiB random writes, was
cancelled (the README's sweep section). This runs that case ``--runs`` times
and counts the crashes, so the same question can be asked of any QEMU (``make
test-matrix`` with ``MATRIX_COMMAND`` runs it on the other Debian's QEMU).

    .venv/bin/python benchmarks/crash_repro.py [--runs 4] [--size 256M]
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from qmpkit import Qemu
from qmpkit.experiment import Setup, run_experiment
from qmpkit.workload import FioLoad


async def main(runs: int, size: str) -> int:
    async with await Qemu.open() as q:
        version = ".".join(map(str, await q.client.version()))
    crashed = 0
    for i in range(runs):
        r = await run_experiment(setup=Setup(size=size, target_speed="100M"),
                                 load=FioLoad(rate="20M"),
                                 mirror={"granularity": "64K", "buf_size": "1M"},
                                 time_limit=8, verify=False, measure_offline=False)
        sig = r.trace.summary.get("qemu_crashed")
        crashed += bool(sig)
        print(f"run {i + 1}: {'died of ' + sig if sig else 'survived'} "
              f"({'READY' if r.converged else 'not converged, cancelled'})", flush=True)
    print(f"QEMU {version}: crashed in {crashed} of {runs} runs")
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--size", default="256M")
    a = ap.parse_args()
    sys.exit(asyncio.run(main(a.runs, a.size)))
