"""
The integrity soak: randomised mirrors under a verifiable write load.

Each run takes a fresh embedded QEMU, a source filled with data, a random
granularity, buf-size and copy-mode, and fio writing blocks with crc32c
headers into the source (through NBD) while the mirror runs. Once READY and
once fio is done, the mirror is completed, and the target is checked twice:
``qemu-img compare`` against the source, and fio's own verify pass over every
block it wrote. A mismatch is data lost.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any, Callable

from .errors import JobTimeoutError, VerifyError
from .lifecycle import MirrorRun
from .mirror import COPY_MODES
from .session import Qemu
from .units import format_size, parse_size
from .workload import FioLoad, FioRunner, verify_image

__all__ = ["SoakRun", "soak"]

MiB = 1 << 20


@dataclass
class SoakRun:
    settings: dict[str, Any]
    bytes_mirrored: int
    bytes_written: int
    compare_ok: bool
    fio_verify_ok: bool
    seconds: float

    @property
    def mismatch(self) -> bool:
        return not (self.compare_ok and self.fio_verify_ok)


async def one_run(rng: random.Random, size: int, *, base_dir: Any = None) -> SoakRun:
    settings = {"granularity": rng.choice([4096, 16384, 65536, 1 << 20]),
                "buf_size": rng.choice([1 << 20, 4 << 20, 16 << 20]),
                "copy_mode": rng.choice(COPY_MODES)}
    load = FioLoad(rw=rng.choice(["randwrite", "write"]), bs=rng.choice(["4K", "16K", "64K"]),
                   rate=rng.choice(["4M", "8M", "16M"]), io_size=size // 8, verify=True,
                   seed=rng.randrange(1 << 16))
    t0 = time.monotonic()
    async with await Qemu.open(workdir=base_dir) as qemu:
        await qemu.nodes.add_image("src", size, fill="mixed")
        await qemu.nodes.add_image("disk", size)
        await qemu.nodes.add_throttled("dst", "disk", bps_write=rng.choice(["32M", "64M"]))
        fio = FioRunner(load, await qemu.nodes.export_nbd("src"), qemu.workdir / "fio")
        await fio.start()
        try:
            async with MirrorRun(qemu, device="src", target="dst", hz=None, **settings) as run:
                await run.start()
                result = await fio.wait(timeout=600)   # the writer finishes while mirrored
                if await run.wait_ready(timeout=600) != "ready":
                    raise JobTimeoutError(job_id=run.job_id, last_status=run.state.status,
                                          waiting_for="become ready", timeout=600)
                await run.complete(timeout=600, verify=True)
        finally:
            await fio.kill()
        fio_ok = True
        compare_ok = run.verification is not None and run.verification.ok is True
        try:
            await verify_image(qemu.workdir / "disk.raw", load)
        except VerifyError:
            fio_ok = False
        copied = run.state.offset or 0
    return SoakRun(settings={**settings, "load": load.describe()}, bytes_mirrored=copied,
                   bytes_written=result.write_bytes, compare_ok=compare_ok,
                   fio_verify_ok=fio_ok, seconds=time.monotonic() - t0)


async def soak(runs: int = 20, *, size: int | str = "64M", seed: int = 0,
               report: Callable[[SoakRun, int], None] | None = None,
               base_dir: Any = None) -> list[SoakRun]:
    rng = random.Random(seed)
    out = []
    for i in range(runs):
        r = await one_run(rng, parse_size(size), base_dir=base_dir)
        out.append(r)
        if report:
            report(r, i + 1)
    return out


def totals(results: list[SoakRun]) -> str:
    return (f"runs {len(results)}, bytes mirrored {format_size(sum(r.bytes_mirrored for r in results))}, "
            f"bytes written during mirrors {format_size(sum(r.bytes_written for r in results))}, "
            f"mismatches {sum(r.mismatch for r in results)}")
