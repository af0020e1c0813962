"""No data lost: N randomised mirrors under a verifiable fio load (default 20, about
5 minutes here). Prints runs, bytes mirrored, bytes written during mirrors and
mismatches, which must be 0.

    .venv/bin/python benchmarks/soak_integrity.py [--runs 20] [--size 256M] [--seed 0]
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from qmpkit.soak import soak, totals


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--size", default="256M")
    ap.add_argument("--seed", type=int, default=0)
    ns = ap.parse_args()

    def report(r, i):
        print(f"run {i}: {r.settings} mirrored {r.bytes_mirrored} B, fio wrote "
              f"{r.bytes_written} B, compare {'ok' if r.compare_ok else 'MISMATCH'}, "
              f"fio verify {'ok' if r.fio_verify_ok else 'MISMATCH'} ({r.seconds:.1f} s)",
              flush=True)

    results = asyncio.run(soak(ns.runs, size=ns.size, seed=ns.seed, report=report))
    print(totals(results))
    return 1 if any(r.mismatch for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
