"""
The probe: how fast a live disk's guest dirties new data, at each granularity,
before any mirror starts.

QEMU keeps extra dirty bitmaps on a node cheaply (``block-dirty-bitmap-add``,
``persistent: false``). The probe adds one per granularity, named
``qmpkit-probe-<id>-<granularity>``, reads their counts once a second (one
``query-named-block-nodes`` per tick for all of them) together with the node's
write statistics (``query-blockstats``), and removes them at the end: on
success, error, timeout, Ctrl-C and SIGTERM alike. A probe that was killed
outright leaves its bitmaps; `stale_bitmaps` lists them (``qmpkit nodes`` shows
them) and `clean` removes them (``qmpkit probe --clean``).

The result is a `Profile`: plain data, saved as ``probe.json``, from which
`qmpkit.predict` predicts each mirror configuration (`Profile.load`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

from .errors import ArgumentError, QemuCommandError, QmpkitError
from .predict import Load
from .session import Qemu
from .trace import write_atomic
from .units import format_rate, format_size, parse_size

__all__ = ["Profile", "probe", "stale_bitmaps", "clean", "PREFIX", "DEFAULT_GRANULARITIES",
           "check_probe_granularity"]

log = logging.getLogger(__name__)

PREFIX = "qmpkit-probe-"
DEFAULT_GRANULARITIES = (4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20)
#: QEMU's range for a dirty bitmap's granularity (block/dirty-bitmap.c)
GRANULARITY_MIN, GRANULARITY_MAX = 512, 1 << 31
#: the curve has flattened when its slope over the last third is below this
#: fraction of its slope over the first second or two
FLAT = 0.2


def check_probe_granularity(value: int | str) -> int:
    g = parse_size(value, name="granularity")
    if not GRANULARITY_MIN <= g <= GRANULARITY_MAX or g & (g - 1):
        raise ArgumentError("granularity", f"must be a power of 2 in [512 B, 2 GiB] (QEMU's "
                                           f"range for a dirty bitmap); got {value!r}")
    return g


@dataclass
class Profile:
    """What a probe saw: the guest's write rate, and per granularity the curve
    of unique dirty bytes against time since the probe began."""

    node: str
    disk_bytes: int
    seconds: float
    write_bytes: int
    write_ops: int
    curves: dict[int, list[tuple[float, int]]] = field(default_factory=dict)

    @property
    def write_bps(self) -> float:
        return self.write_bytes / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean_write_bytes(self) -> int:
        return int(self.write_bytes / self.write_ops) if self.write_ops else 4096

    def dirty_bps(self, granularity: int) -> float:
        """The new-dirty rate: how fast writes would dirty *clean* chunks, which is
        what a mirror's catch-up races against.

        The curve flattens as the bitmap fills (a write to a chunk already dirty
        adds nothing), so its plain slope understates the rate, badly for a hot
        spot. For writes spread at random over a working set ``W``, the unique
        dirty bytes after time ``t`` are ``W (1 − e^(−r t / W))`` for a rate
        ``r``; so ``r = −W ln(1 − D/W) / t``, read at the last point where the
        set is at most half full (the first point if none is), with ``D/W``
        capped at 0.999 (a lower bound then). ``W`` is the working set where the
        curve flattened, else the disk.
        """
        pts = [p for p in self.curves[granularity] if p[0] > 0]
        if not pts:
            return 0.0
        ws = self.working_set(granularity) or self.disk_bytes or max(b for _, b in pts)
        ws = max(ws, max(b for _, b in pts), 1)
        early = [p for p in pts if p[1] <= ws / 2]
        t, b = early[-1] if early else pts[0]
        frac = min(b / ws, 0.999)
        return -ws * math.log1p(-frac) / t

    def working_set(self, granularity: int) -> int | None:
        """Where the curve flattens (its last value), or None while it still grows."""
        pts = self.curves[granularity]
        if len(pts) < 4:
            return None
        t0, b0 = pts[0]
        start = b0 / t0 if t0 > 0 else 0.0          # the slope of the first reading
        tail = pts[len(pts) * 2 // 3:]
        (ta, ba), (tb, bb) = tail[0], tail[-1]
        slope = (bb - ba) / (tb - ta) if tb > ta else 0.0
        return pts[-1][1] if start > 0 and slope < FLAT * start else None

    def load(self, *, iodepth: int = 4) -> Load:
        """The `qmpkit.predict.Load` this profile measured."""
        return Load(write_bps=self.write_bps, bs=max(512, self.mean_write_bytes),
                    iodepth=iodepth,
                    measured=tuple((g, self.dirty_bps(g), self.working_set(g))
                                   for g in sorted(self.curves)))

    def to_dict(self) -> dict[str, Any]:
        wbps = self.write_bps
        return {
            "node": self.node, "disk_bytes": self.disk_bytes, "seconds": self.seconds,
            "write_bps": wbps, "write_bytes": self.write_bytes, "write_ops": self.write_ops,
            "granularities": [
                {"granularity": g, "dirty_bps": self.dirty_bps(g),
                 "working_set_bytes": self.working_set(g),
                 "amplification": self.dirty_bps(g) / wbps if wbps else None,
                 "curve": [[t, b] for t, b in pts]}
                for g, pts in sorted(self.curves.items())]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Profile":
        return cls(node=d["node"], disk_bytes=d["disk_bytes"], seconds=d["seconds"],
                   write_bytes=d["write_bytes"], write_ops=d["write_ops"],
                   curves={int(g["granularity"]): [(float(t), int(b)) for t, b in g["curve"]]
                           for g in d["granularities"]})

    def save(self, folder: os.PathLike[str] | str) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "probe.json"
        write_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load_file(cls, path: os.PathLike[str] | str) -> "Profile":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def table(self) -> str:
        lines = [f"{'granularity':>11} | {'new dirty data':>14} | {'x writes':>8} | "
                 f"working set"]
        for g in sorted(self.curves):
            ws = self.working_set(g)
            amp = self.dirty_bps(g) / self.write_bps if self.write_bps else float("nan")
            lines.append(f"{format_size(g):>11} | {format_rate(self.dirty_bps(g)):>14} | "
                         f"{amp:8.2f} | {format_size(ws) if ws else 'still growing'}")
        return "\n".join(lines)


async def _node_of(qemu: Qemu, device: str) -> tuple[str, int, bool]:
    """The node name, size and read-only flag of a node or a VM's device (drive id)."""
    try:
        info = await qemu.nodes.node(device)
    except ArgumentError:
        raise ArgumentError("device", f"no node or device {device!r}; see `qmpkit nodes`") \
            from None
    return info.node_name, int(info.size or 0), bool(getattr(info, "read_only", False))


async def stale_bitmaps(qemu: Qemu) -> list[tuple[str, str]]:
    """``(node, bitmap)`` of every probe bitmap on this QEMU (left by a killed probe)."""
    nodes = await qemu.client.execute("query-named-block-nodes", {"flat": True})
    return [(n["node-name"], b["name"]) for n in nodes for b in n.get("dirty-bitmaps", [])
            if str(b.get("name", "")).startswith(PREFIX)]


async def clean(qemu: Qemu) -> list[tuple[str, str]]:
    """Remove every probe bitmap; returns what was removed."""
    gone = await stale_bitmaps(qemu)
    for node, name in gone:
        with contextlib.suppress(QemuCommandError):
            await qemu.client.execute("block-dirty-bitmap-remove", {"node": node, "name": name})
    return gone


async def probe(qemu: Qemu, device: str, *,
                granularities: Sequence[int | str] = DEFAULT_GRANULARITIES,
                seconds: float = 30.0, interval: float = 1.0,
                on_tick: Callable[[Profile], None] | None = None,
                write_counter: Callable[[], Awaitable[tuple[int, int]]] | None = None
                ) -> Profile:
    """Watch ``device`` (a node name, or a VM's drive id) for ``seconds``.

    :param write_counter: returns (bytes, operations) written so far; by default
        QEMU's ``query-blockstats`` of the device that uses the node. QEMU counts
        writes per device only: a node that no device uses (an NBD export's, on
        the storage daemon) has no count, and is refused unless a counter is given.
    :raise ArgumentError: a bad granularity or duration, an unknown or read-only
        node, or no write statistics (checked before any bitmap is added).
    """
    gs = sorted({check_probe_granularity(g) for g in granularities})
    if not gs:
        raise ArgumentError("granularity", "give at least one")
    if not 1.0 <= seconds <= 3600:
        raise ArgumentError("seconds", f"must be in [1, 3600]; got {seconds!r}")
    if not 0.05 <= interval <= seconds:
        raise ArgumentError("interval", f"must be in [0.05, seconds]; got {interval!r}")
    node, size, read_only = await _node_of(qemu, device)
    if read_only:
        raise ArgumentError("device", f"{node} is read-only: no guest writes to it, so "
                                      "there is nothing to probe")
    if write_counter is None:
        write_counter = await _blockstats_counter(qemu, node, device)
    stale = await stale_bitmaps(qemu)
    if stale:
        log.warning("stale probe bitmaps (from a killed probe): %s; `qmpkit probe --clean` "
                    "removes them", ", ".join(f"{n}/{b}" for n, b in stale))
    tag = f"{PREFIX}{os.getpid()}-{int(time.time() * 1000) % 100000}"
    names = {g: f"{tag}-{g}" for g in gs}
    added: list[str] = []
    profile = Profile(node=node, disk_bytes=size, seconds=0.0, write_bytes=0, write_ops=0,
                      curves={g: [] for g in gs})
    try:
        w0 = await write_counter()
        for g, name in names.items():
            await qemu.client.execute("block-dirty-bitmap-add", {
                "node": node, "name": name, "granularity": g, "persistent": False})
            added.append(name)
        t0 = time.monotonic()
        next_t = t0
        while True:
            next_t += interval
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))
            counts, w = await asyncio.gather(_counts(qemu, node), write_counter())
            now = time.monotonic() - t0
            for g, name in names.items():
                profile.curves[g].append((round(now, 3), counts.get(name, 0)))
            profile.seconds = now
            profile.write_bytes, profile.write_ops = w[0] - w0[0], w[1] - w0[1]
            if on_tick is not None:
                on_tick(profile)
            if now >= seconds - interval / 2:
                break
    finally:
        # every path: success, error, timeout, Ctrl-C, SIGTERM (a cancelled task)
        await asyncio.shield(_remove(qemu, node, added))
    return profile


async def _remove(qemu: Qemu, node: str, names: list[str]) -> None:
    for name in names:
        try:
            await qemu.client.execute("block-dirty-bitmap-remove", {"node": node, "name": name})
        except QmpkitError as exc:
            log.warning("could not remove probe bitmap %s on %s: %s", name, node, exc)


async def _counts(qemu: Qemu, node: str) -> dict[str, int]:
    nodes = await qemu.client.execute("query-named-block-nodes", {"flat": True})
    for n in nodes:
        if n["node-name"] == node:
            return {b["name"]: int(b["count"]) for b in n.get("dirty-bitmaps", [])
                    if "name" in b}
    return {}


async def _blockstats_counter(qemu: Qemu, node: str,
                              device: str) -> Callable[[], Awaitable[tuple[int, int]]]:
    """A counter of the bytes and operations written through the device that
    uses ``node`` (``query-blockstats``: QEMU counts per device, not per node)."""
    def pick(stats: list[dict[str, Any]]) -> dict[str, Any] | None:
        return next((s for s in stats if s.get("node-name") == node
                     or device in (s.get("device"), s.get("qdev"))), None)

    if pick(await qemu.client.execute("query-blockstats")) is None:
        raise ArgumentError("device", f"{node}: QEMU shows no write statistics for it (it "
                                      "counts writes per device, and no device uses this "
                                      "node; an NBD export's writes are not counted), so the "
                                      "probe cannot see the guest's write rate; probe a VM's "
                                      "drive, or the embedded lab (qmpkit probe without --qmp)")

    async def count() -> tuple[int, int]:
        s = pick(await qemu.client.execute("query-blockstats"))
        if s is None:
            return 0, 0
        return int(s["stats"]["wr_bytes"]), int(s["stats"]["wr_operations"])
    return count
