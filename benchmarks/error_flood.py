"""An error flood: a mirror into a full disk with ``on-target-error=ignore``.

QEMU retries the failing write at once, for ever, and sends one BLOCK_JOB_ERROR
event per try: thousands a second. This measures, on a real 4 MiB tmpfs (root
only), what ``qmpkit mirror`` does under it, side by side in one run:

- ``--max-errors 0`` (no limit) for ``--seconds``, then SIGTERM: events per
  second that qmpkit took in, its peak RSS, the lines it printed, and how long
  it took to exit after SIGTERM;
- the default ``--max-errors 1000``: how long until the job is cancelled and
  the command exits (1), and its peak RSS.

    .venv/bin/python benchmarks/error_flood.py [--seconds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qmpkit import Qemu, create_image

MiB = 1 << 20
QMPKIT = str(Path(sys.executable).parent / "qmpkit")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def one_run(qemu: Qemu, mnt: Path, out: Path, limit: int, seconds: float) -> dict:
    target = mnt / "t.raw"
    target.unlink(missing_ok=True)
    await create_image(target, 64 * MiB)
    argv = [QMPKIT, "mirror", "--qmp", str(qemu.daemon.monitor_path(1)), "--device", "src",
            "--target-file", str(target), "--on-target-error", "ignore",
            "--max-errors", str(limit), "--out", str(out)]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    rss, exit_s = 0.0, None
    while proc.poll() is None and time.monotonic() - t0 < seconds:
        rss = max(rss, peak_rss_mib(proc.pid))
        await asyncio.sleep(0.2)
    ran = time.monotonic() - t0
    if proc.poll() is None:
        rss = max(rss, peak_rss_mib(proc.pid))
        t1 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        while proc.poll() is None:
            await asyncio.sleep(0.02)
        exit_s = time.monotonic() - t1
    lines = proc.stdout.read().decode().count("\n") if proc.stdout else 0
    summary = json.loads((out / "summary.json").read_text())
    n = summary.get("error_events", 0)
    for job in await qemu.client.execute("query-jobs"):
        await qemu.client.execute("job-cancel", {"id": job["id"]})
    return {"limit": limit, "exit": proc.returncode, "ran_s": ran, "events": n,
            "events_per_s": n / ran if ran else 0.0, "peak_rss_mib": rss,
            "sigterm_exit_s": exit_s, "lines": lines}


async def main(seconds: float) -> int:
    if os.geteuid() != 0:
        print("error_flood: needs root to mount a tmpfs (a real ENOSPC); not measured")
        return 1
    with tempfile.TemporaryDirectory(prefix="qmpkit-bench-") as tmp:
        mnt = Path(tmp) / "full"
        mnt.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
        try:
            async with await Qemu.open(workdir=tmp, spare_monitors=1) as qemu:
                await qemu.nodes.add_image("src", 64 * MiB, fill="mixed")
                rows = [await one_run(qemu, mnt, Path(tmp) / "unlimited", 0, seconds),
                        await one_run(qemu, mnt, Path(tmp) / "default", 1000, seconds)]
        finally:
            subprocess.run(["umount", "-l", str(mnt)], check=True)
    print(f"{'--max-errors':>12} {'exit':>5} {'ran':>7} {'events':>8} {'events/s':>9} "
          f"{'peak RSS':>9} {'SIGTERM->exit':>14} {'lines':>6}")
    for r in rows:
        term = f"{r['sigterm_exit_s']:.2f} s" if r["sigterm_exit_s"] is not None else "-"
        print(f"{r['limit'] or 'none':>12} {r['exit']:>5} {r['ran_s']:>6.1f}s {r['events']:>8} "
              f"{r['events_per_s']:>9.0f} {r['peak_rss_mib']:>7.0f} MiB {term:>14} "
              f"{r['lines']:>6}")
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    sys.exit(asyncio.run(main(ap.parse_args().seconds)))
