"""
Will a mirror converge, and when? A model of ``block/mirror.c``, before the mirror starts.

Pure functions of plain numbers: no QMP, no I/O. The inputs are the disk, the
guest's writes, the target's write rate and the link (`qmpkit.link.LinkSpec`);
the output is a `Prediction` per configuration (granularity ``g``, buf-size
``B``, copy mode).

The equations, and why each term is there:

1. **Ceilings of the in-flight limits** (`qmpkit.link.model_ceilings`): at most
   16 operations, together at most ``B`` bytes, each waiting one round trip.
   The bulk pass (one contiguous dirty region) copies at
   ``bulk = min(target, rate, B / (RTT + op/rate))``; scattered dirty chunks
   (what random guest writes leave) copy one chunk per operation at
   ``catchup = min(target, rate, 16·g / (RTT + g/rate))``.
2. **New dirty data at granularity g.** A guest write of ``bs`` bytes dirties
   whole chunks: ``dirty(g) = write_bps · max(g, bs) / bs`` for scattered
   (random) writes, ``write_bps`` for sequential ones (they fill chunks).
   Coarse granularity multiplies small random writes: that is why 64 KiB
   loses to 4 KiB under 4 KiB random writes.
3. **Background mode** converges only when catch-up outruns new dirt:
   ``catchup > dirty(g)`` (within ``BORDERLINE`` it is too close to call).
   The bulk pass takes ``T1 = disk / bulk``; meanwhile the dirty set grows to
   ``D0 = min(disk, working set, dirty(g) · T1)`` (it cannot exceed the disk,
   nor the region the guest writes to: a probe measures both); catching up
   takes ``T2 = D0 / (catchup − dirty(g))``. READY after ``T1 + T2``; bytes
   copied ``disk + D0 + dirty(g)·T2``.
4. **Write-blocking mode** copies each guest write to the target before the
   guest's write completes, so the dirty set only shrinks: READY after
   ``disk / (bulk − w)``, where ``w`` is the guest's write rate, now capped by
   the target's round trip: ``w = min(write_bps, iodepth · bs / (RTT + bs/rate))``.
   The price is the guest's: its write latency gains a round trip.

Where it is wrong: it assumes uniform random (or purely sequential) writes with
no hot spot (a hot spot dirties fewer new chunks: the probe of #15 measures
that), a steady guest, and a target whose rate does not depend on the request
size. It ignores QEMU's 100 ms slices and the zero detection of the bulk pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

from .errors import ArgumentError
from .link import LinkSpec, model_ceilings

__all__ = ["Load", "Prediction", "predict", "rank", "advise", "BORDERLINE", "ADVISE_BUF_SIZES"]

MiB = 1 << 20
#: catch-up within this fraction of the new-dirty rate: "borderline"
BORDERLINE = 0.10
DEFAULT_GRANULARITY = 64 << 10


@dataclass(frozen=True)
class Load:
    """The guest's writes: ``write_bps`` bytes/s in ``bs``-byte writes, random
    (scattered) or sequential, ``iodepth`` in flight.

    ``measured`` holds what a probe saw instead of equation 2: per granularity,
    ``(granularity, new-dirty bytes/s, working set bytes or None)``; between
    measured granularities the rate is interpolated on log axes.
    """

    write_bps: float
    bs: int = 4096
    random: bool = True
    iodepth: int = 4
    measured: tuple[tuple[int, float, float | None], ...] = ()
    #: the region the guest writes into (a hot spot), bytes; None: the whole disk
    region_bytes: float | None = None

    def __post_init__(self) -> None:
        if not self.write_bps >= 0 or math.isinf(self.write_bps):
            raise ArgumentError("write_bps", f"must be >= 0 and finite; got {self.write_bps!r}")
        if self.bs < 512:
            raise ArgumentError("bs", f"must be >= 512 bytes; got {self.bs!r}")
        if self.iodepth < 1:
            raise ArgumentError("iodepth", f"must be >= 1; got {self.iodepth!r}")

    @classmethod
    def of_fio(cls, fio: object | None, disk_bytes: int) -> "Load":
        """The load a `qmpkit.workload.FioLoad` puts on a disk of ``disk_bytes``
        (None: no writes): its rate, block size, pattern, depth and hot region."""
        if fio is None:
            return cls(write_bps=0.0, iodepth=1)
        region = getattr(fio, "region", None)
        return cls(write_bps=float(getattr(fio, "rate") or 0), bs=int(getattr(fio, "bs")),
                   random=getattr(fio, "rw") != "write", iodepth=int(getattr(fio, "iodepth")),
                   region_bytes=region * disk_bytes if region else None)

    def dirty_bps(self, granularity: int) -> float:
        """New dirty bytes per second at ``granularity`` (measured, or equation 2)."""
        if self.measured:
            pts = sorted((g, r) for g, r, _ in self.measured)
            if granularity <= pts[0][0]:     # finer: by equation 2's ratio
                return pts[0][1] * max(granularity, self.bs) / max(pts[0][0], self.bs)
            if granularity >= pts[-1][0]:
                return pts[-1][1] * granularity / pts[-1][0]
            for (g0, r0), (g1, r1) in zip(pts, pts[1:]):
                if g0 <= granularity <= g1:
                    if r0 <= 0 or r1 <= 0:
                        return r0 + (r1 - r0) * (granularity - g0) / (g1 - g0)
                    f = math.log(granularity / g0) / math.log(g1 / g0)
                    return math.exp(math.log(r0) + f * math.log(r1 / r0))
        if not self.random:
            return self.write_bps
        return self.write_bps * max(granularity, self.bs) / self.bs

    def working_set(self, granularity: int) -> float | None:
        """The bytes the guest keeps dirtying at ``granularity`` (a probe's plateau), or None."""
        sets = [(abs(math.log(g / granularity)), w) for g, _, w in self.measured if w]
        return min(sets)[1] if sets else self.region_bytes


@dataclass(frozen=True)
class Prediction:
    granularity: int
    buf_size: int
    copy_mode: str
    converges: str                 # "yes", "no" or "borderline"
    time_to_ready_s: float | None
    amplification: float | None
    bulk_bps: float
    catchup_bps: float
    dirty_bps: float
    guest_write_bps: float
    reason: str

    def mirror_options(self) -> dict[str, object]:
        return {"granularity": self.granularity, "buf_size": self.buf_size,
                "copy_mode": self.copy_mode}


def _rate(bps: float) -> str:
    return "unlimited" if math.isinf(bps) else f"{bps / MiB:.3g} MiB/s"


def predict(*, disk_bytes: int, load: Load, granularity: int | None = None,
            buf_size: int | None = None, copy_mode: str = "background",
            target_bps: float | None = None, link: LinkSpec | None = None) -> Prediction:
    """One configuration's fate (see the module's equations).

    :param target_bps: the target's write rate (None: no limit but the link's).
    :raise ArgumentError: a value out of range, naming it.
    """
    if disk_bytes <= 0:
        raise ArgumentError("disk_bytes", f"must be > 0; got {disk_bytes!r}")
    if copy_mode not in ("background", "write-blocking"):
        raise ArgumentError("copy_mode", f"must be background or write-blocking; "
                                         f"got {copy_mode!r}")
    if target_bps is not None and not target_bps > 0:
        raise ArgumentError("target_bps", f"must be > 0, or None; got {target_bps!r}")
    g = granularity or DEFAULT_GRANULARITY
    spec = link or LinkSpec(rtt_s=0.0, rate_bps=None)
    ceil = model_ceilings(spec, buf_size, g)
    target = target_bps if target_bps is not None else math.inf
    bulk = min(target, ceil.bulk_bps)
    catchup = min(target, ceil.catchup_bps)
    dirty = load.dirty_bps(g)
    buf = ceil.buf_size
    if math.isinf(bulk):
        raise ArgumentError("target_bps", "give the target's rate or a link: with neither, "
                                          "the copy has no ceiling to predict from")
    if copy_mode == "write-blocking":
        per_write = spec.rtt_s + (load.bs / spec.rate_bps if spec.rate_bps else 0.0) \
            + load.bs / target
        w = load.write_bps if per_write <= 0 else min(load.write_bps,
                                                      load.iodepth * load.bs / per_write)
        net = bulk - w
        if net <= 0:
            return Prediction(g, buf, copy_mode, "no", None, None, bulk, catchup, 0.0, w,
                              f"write-blocking: the guest's {_rate(w)} of writes take all "
                              f"of the {_rate(bulk)} the target path carries")
        t = disk_bytes / net
        slowed = (f"; the guest's writes slow to {_rate(w)} (each waits a round trip)"
                  if w < load.write_bps * 0.95 else "")
        return Prediction(g, buf, copy_mode, "yes", t, (disk_bytes + w * t) / disk_bytes,
                          bulk, catchup, 0.0, w,
                          f"write-blocking: no new dirty data; READY in about {t:.0f} s at "
                          f"{_rate(net)}" + slowed)
    margin = catchup - dirty
    if margin <= BORDERLINE * dirty or margin <= 0:
        verdict = "no" if margin <= 0 else "borderline"
        return Prediction(g, buf, copy_mode, verdict, None, None, bulk, catchup, dirty,
                          load.write_bps,
                          f"{_rate(dirty)} of new dirty data at {g // 1024} KiB granularity "
                          f"against {_rate(catchup)} of catch-up: "
                          + ("never" if verdict == "no" else "too close to call"))
    t1 = disk_bytes / bulk
    d0 = min(disk_bytes, dirty * t1, load.working_set(g) or math.inf)
    t2 = d0 / margin
    copied = disk_bytes + d0 + dirty * t2
    return Prediction(g, buf, copy_mode, "yes", t1 + t2, copied / disk_bytes, bulk, catchup,
                      dirty, load.write_bps,
                      f"{_rate(dirty)} of new dirty data at {g // 1024} KiB granularity "
                      f"against {_rate(catchup)} of catch-up: READY in about {t1 + t2:.0f} s "
                      f"({t1:.0f} s bulk at {_rate(bulk)}, then {t2:.0f} s catching up)")


def rank(predictions: Iterable[Prediction]) -> list[Prediction]:
    """Converging first (background before write-blocking, which costs the
    guest), fastest first; then borderline; then the rest."""
    order = {"yes": 0, "borderline": 1, "no": 2}
    return sorted(predictions, key=lambda p: (
        order[p.converges], p.copy_mode != "background",
        p.time_to_ready_s if p.time_to_ready_s is not None else math.inf,
        p.buf_size, p.granularity))


#: the buf-sizes `advise` tries
ADVISE_BUF_SIZES = (1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB)


def advise(*, disk_bytes: int, load: Load, granularities: Iterable[int],
           target_bps: float | None = None, link: LinkSpec | None = None,
           buf_sizes: Iterable[int] = ADVISE_BUF_SIZES,
           copy_modes: Iterable[str] = ("background", "write-blocking")) -> list[Prediction]:
    """Every configuration of the grid, predicted and ranked (`rank`)."""
    return rank(predict(disk_bytes=disk_bytes, load=load, granularity=g, buf_size=b,
                        copy_mode=m, target_bps=target_bps, link=link)
                for g in granularities for b in buf_sizes for m in copy_modes)
