"""
An emulated network link: a userspace TCP relay that adds round-trip time,
paces to a rate, and can stall or break its connections (issue #14).

Put it between the NBD client of one QEMU and the NBD server of another, and a
mirror to a "remote" target behaves as it would across a WAN: the in-flight
limits of ``block/mirror.c`` (16 operations, together at most ``buf-size``)
then cap the copy at about ``buf-size / RTT`` (`model_ceilings`)::

    spec = LinkSpec.parse("rtt=40ms,rate=1Gbit")        # or "wan"
    async with await LinkProcess.start(spec, remote_nbd_socket) as link:
        await qemu.nodes.add_nbd("far", link.nbd_uri("dst"), reconnect_delay=5)
        ...
        await link.outage(2.0)      # the link carries nothing for 2 s
        await link.reset()          # every connection is torn down

How the link behaves, per direction and connection:

- each chunk read from one side is stamped with its arrival time; the rate is a
  token bucket without burst credit: the chunk *departs* at
  ``max(arrival, previous departure) + len / rate``;
- it is *released* to the other side at ``departure + RTT/2`` (plus a uniform
  ``±jitter``), but never before the chunk ahead of it: bytes keep their order;
- the link's queue is bounded (by default the bandwidth-delay product plus
  1 MiB, so the relay itself never caps the rate); when it is full the relay
  stops reading that socket, and TCP pushes back on the sender;
- connection set-up is not delayed, only data is.

`Link` runs in the caller's event loop. `LinkProcess` runs the same relay in
a child process (``python -m qmpkit.link``), so that relaying a gigabit does
not compete with a sampler for the GIL; prefer it for measurements.

Real netem instead
------------------
Where the kernel has ``sch_netem``, a network namespace gives the real thing:
run the NBD server in a namespace joined to the host by a veth pair and delay
both directions (``tc qdisc add dev lo root netem delay 20ms rate 1gbit`` in a
namespace where everything goes over ``lo``; or ``delay 20ms`` on each end of
the veth pair: 2 × 20 ms = 40 ms RTT). The kernels of this project's machines
do not have ``sch_netem`` ("Specified qdisc kind is unknown"; ``tbf`` works),
which is why this relay exists.

Pure asyncio and the standard library; no QMP.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import math
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Union

from .aio import within
from .errors import ArgumentError, QmpkitError
from .process import die_with_parent, mark_owner
from .units import parse_rate

__all__ = ["LinkSpec", "PRESETS", "PRESETS_HELP", "SPEC_FORMS", "Ceilings", "model_ceilings",
           "Link", "LinkProcess", "LinkError", "Upstream", "MIRROR_MAX_IN_FLIGHT",
           "MIRROR_BUF_SIZE_DEFAULT", "main"]

log = logging.getLogger(__name__)

MiB = 1 << 20
#: block/mirror.c: at most this many operations in flight
MIRROR_MAX_IN_FLIGHT = 16
#: block/mirror.c: buf-size when the caller gives none (or 0)
MIRROR_BUF_SIZE_DEFAULT = 16 * MiB
#: block/mirror.c: one operation is at most max(buf-size / 16, this)
_MIRROR_OP_MIN = 1 * MiB

RTT_MAX_S = 10.0
#: how much a relay reads from a socket at once (also the pacing grain)
_CHUNK = 256 * 1024
#: the queue of an unlimited link (it has no bandwidth-delay product)
_UNLIMITED_QUEUE = 64 * MiB
#: Timer wake-ups come late: Python rounds epoll waits up to the next
#: millisecond, and a busy or idle host adds its own scheduling delay. The relay
#: tracks how late they come (a moving average, starting here and capped at
#: _LATE_MAX_S so that a stall does not teach it to be early) and aims that much
#: early, so that the delay is right on average.
_LATE_START_S = 0.0005
_LATE_MAX_S = 0.003

#: the longest unix socket path Linux takes (sun_path is 108 bytes with its NUL)
_UNIX_PATH_MAX = 107

#: where the relay connects: ("host", port), or a unix socket path
Upstream = Union[tuple[str, int], str, os.PathLike]


class LinkError(QmpkitError):
    """The link relay failed: its process did not start, or died."""


# -- the spec --------------------------------------------------------------------------

_BITS = {"": 1, "k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9, "t": 10 ** 12}
_NUM = r"(\d+(?:\.\d*)?(?:e[+-]?\d+)?)"
_TIME_RE = re.compile(rf"^{_NUM}\s*(s|ms|us)$", re.IGNORECASE)
_BIT_RE = re.compile(rf"^{_NUM}\s*([kmgt]?)bit(?:/s)?$", re.IGNORECASE)
_TIME_UNIT = {"s": 1.0, "ms": 1e-3, "us": 1e-6}

SPEC_FORMS = ("'rtt=40ms,rate=1Gbit[,jitter=2ms]' (rtt and jitter in s, ms or us; rate in "
              "bit/s with Kbit, Mbit, Gbit (decimal: 1Gbit = 125000000 bytes/s), or in "
              "bytes/s as elsewhere in qmpkit (binary: 100M = 100MiB/s = 104857600 "
              "bytes/s), or 'unlimited'; rate may be left out: unlimited), or a preset "
              "(lan, metro, wan), optionally followed by overrides ('wan,rate=100Mbit')")


@dataclass(frozen=True)
class LinkSpec:
    """What a link does: round-trip time, rate and jitter.

    :param rtt_s: round-trip time in seconds, in [0, 10]; each direction adds half.
    :param rate_bps: bytes per second (as every rate in qmpkit), per direction;
        None is unlimited.
    :param jitter_s: each direction's delay varies uniformly by ± this much,
        in [0, rtt/2]; bytes are never reordered.
    """
    rtt_s: float
    rate_bps: float | None
    jitter_s: float = 0.0

    def __post_init__(self) -> None:
        rtt, rate, jitter = self.rtt_s, self.rate_bps, self.jitter_s
        if isinstance(rtt, bool) or not isinstance(rtt, (int, float)) \
                or not 0 <= rtt <= RTT_MAX_S:
            raise ArgumentError("link", f"rtt must be in [0, {RTT_MAX_S:g} s]; got {rtt!r}. "
                                        f"Forms: {SPEC_FORMS}")
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float))
                                 or not 0 < rate < math.inf):
            raise ArgumentError("link", f"rate must be > 0 bytes/s (or None: unlimited); "
                                        f"got {rate!r}. Forms: {SPEC_FORMS}")
        if isinstance(jitter, bool) or not isinstance(jitter, (int, float)) \
                or not 0 <= jitter <= rtt / 2:
            raise ArgumentError("link", f"jitter must be in [0, rtt/2] = [0, {rtt / 2:g} s]; "
                                        f"got {jitter!r}. Forms: {SPEC_FORMS}")

    @classmethod
    def parse(cls, text: str | LinkSpec) -> LinkSpec:
        """Read ``rtt=40ms,rate=1Gbit[,jitter=2ms]`` or a preset (see `SPEC_FORMS`).

        :raise ArgumentError: naming ``link``, with the accepted forms and ranges.
        """
        if isinstance(text, LinkSpec):
            return text
        if not isinstance(text, str) or not text.strip():
            raise ArgumentError("link", f"expected {SPEC_FORMS}; got {text!r}")
        items = [p.strip() for p in text.split(",")]
        values: dict[str, Any] = {}
        if items and "=" not in items[0]:
            name = items.pop(0).lower()
            if name not in PRESETS:
                raise ArgumentError("link", f"no preset {name!r} (presets: {PRESETS_HELP}); "
                                            f"expected {SPEC_FORMS}")
            base = PRESETS[name]
            values = {"rtt": base.rtt_s, "rate": base.rate_bps, "jitter": base.jitter_s}
        seen: set[str] = set()
        for item in items:
            key, eq, value = item.partition("=")
            key, value = key.strip().lower(), value.strip()
            if not eq or key not in ("rtt", "rate", "jitter") or not value:
                raise ArgumentError("link", f"cannot read {item!r} in {text!r}; expected "
                                            f"{SPEC_FORMS}")
            if key in seen:
                raise ArgumentError("link", f"{key} given twice in {text!r}")
            seen.add(key)
            values[key] = _parse_rate(value, text) if key == "rate" \
                else _parse_time(key, value, text)
        if "rtt" not in values:
            raise ArgumentError("link", f"no rtt in {text!r}; expected {SPEC_FORMS}")
        return cls(rtt_s=values["rtt"], rate_bps=values.get("rate"),
                   jitter_s=values.get("jitter", 0.0))

    def to_text(self) -> str:
        """The spec as `parse` reads it back, exactly (floats in full)."""
        parts = [f"rtt={float(self.rtt_s)!r}s"]
        if self.rate_bps is not None:
            parts.append(f"rate={float(self.rate_bps) * 8!r}bit")
        if self.jitter_s:
            parts.append(f"jitter={float(self.jitter_s)!r}s")
        return ",".join(parts)

    def to_meta(self) -> dict[str, float | None]:
        return {"rtt_s": self.rtt_s, "rate_bps": self.rate_bps, "jitter_s": self.jitter_s}

    def describe(self) -> str:
        """``'40 ms RTT, 1 Gbit/s'`` (``', ±2 ms jitter'`` when there is jitter)."""
        text = f"{_fmt_time(self.rtt_s)} RTT, " + (
            "unlimited" if self.rate_bps is None else _fmt_bits(self.rate_bps * 8))
        if self.jitter_s:
            text += f", ±{_fmt_time(self.jitter_s)} jitter"
        return text

    @property
    def bdp_bytes(self) -> float:
        """The bandwidth-delay product (rate × RTT); infinite for an unlimited rate."""
        return math.inf if self.rate_bps is None else self.rate_bps * self.rtt_s


def _parse_time(key: str, value: str, text: str) -> float:
    m = _TIME_RE.match(value)
    if not m:
        raise ArgumentError("link", f"{key} must be a time with a unit (s, ms, us), e.g. "
                                    f"40ms; got {value!r} in {text!r}")
    return float(m.group(1)) * _TIME_UNIT[m.group(2).lower()]


def _parse_rate(value: str, text: str) -> float | None:
    if value.lower() in ("unlimited", "none"):
        return None
    m = _BIT_RE.match(value)
    if m:
        bits = float(m.group(1)) * _BITS[m.group(2).lower()]
        if bits <= 0:
            raise ArgumentError("link", f"rate must be > 0; got {value!r} in {text!r}")
        return bits / 8
    try:
        rate = parse_rate(value, name="link")
    except ArgumentError:
        raise ArgumentError("link", f"cannot read rate {value!r} in {text!r}; expected "
                                    f"{SPEC_FORMS}") from None
    if rate <= 0:
        raise ArgumentError("link", f"rate must be > 0; got {value!r} in {text!r}")
    return float(rate)


def _fmt_time(s: float) -> str:
    if s == 0:
        return "0 ms"
    if s >= 1:
        return f"{s:g} s"
    if s >= 1e-3:
        return f"{s * 1e3:g} ms"
    return f"{s * 1e6:g} us"


def _fmt_bits(bits: float) -> str:
    for unit, mult in (("Tbit/s", 1e12), ("Gbit/s", 1e9), ("Mbit/s", 1e6), ("Kbit/s", 1e3)):
        if bits >= mult:
            return f"{bits / mult:g} {unit}"
    return f"{bits:g} bit/s"


#: named links: ``LinkSpec.parse("wan")``
PRESETS: dict[str, LinkSpec] = {
    "lan": LinkSpec(rtt_s=0.0002, rate_bps=10e9 / 8),
    "metro": LinkSpec(rtt_s=0.005, rate_bps=1e9 / 8),
    "wan": LinkSpec(rtt_s=0.040, rate_bps=1e9 / 8),
}
#: one line for --help
PRESETS_HELP = "; ".join(f"{name} = {spec.describe()}" for name, spec in PRESETS.items())


# -- what the link allows a mirror --------------------------------------------------------

class Ceilings(NamedTuple):
    """The rates (bytes/s) a mirror can reach over a link; see `model_ceilings`."""
    bulk_bps: float
    catchup_bps: float
    buf_size: int
    op_bytes: int
    bulk_window: int
    catchup_window: int


def model_ceilings(spec: LinkSpec, buf_size: int | None, granularity: int) -> Ceilings:
    """The ceilings ``block/mirror.c``'s in-flight limits put on a mirror over ``spec``.

    The mirror keeps at most ``MAX_IN_FLIGHT = 16`` operations in flight, together
    at most ``B`` bytes, where ``B`` is buf-size (16 MiB when None or 0) rounded up
    to the granularity ``g``. One operation merges contiguous dirty chunks up to
    ``op = min(B, max(B / 16, 1 MiB))``. Each operation takes a round trip plus its
    own serialization, so with ``W`` bytes in flight the copy runs at::

        ceiling(W, s) = min(rate, W / (RTT + s / rate))

    - **bulk** (one contiguous dirty region, the first pass): ``W = B``, ``s = op``:
      ``min(rate, B / (RTT + op/rate))``, which is ``min(rate, B / RTT)`` when
      ``op/rate`` is small against the RTT;
    - **catch-up** (scattered dirty chunks, as guest writes leave them: every
      operation is one chunk): ``W = min(16, B // g) * g``, ``s = g``:
      about ``16 * g / RTT``.

    Without a rate the ``s/rate`` term is 0; with RTT 0 and no rate, a ceiling
    is infinite. For example (hand-checked in the tests), at 40 ms and 1 Gbit/s
    (125 MB/s): buf-size 1 MiB gives 1 MiB / (40 ms + 8.39 ms) = 20.7 MiB/s (the
    measured 19.3 MiB/s of FACTS.md), 16 MiB gives 119 MiB/s (the link's rate), and
    catch-up at granularity 64 KiB gives 1 MiB / 40.5 ms = 24.7 MiB/s.

    :raise ArgumentError: naming ``buf_size`` (negative) or ``granularity``
        (not a power of two in [512, 64 MiB]).
    """
    if isinstance(granularity, bool) or not isinstance(granularity, int) \
            or not 512 <= granularity <= 64 * MiB or granularity & (granularity - 1):
        raise ArgumentError("granularity", f"must be a power of 2 in [512, 64 MiB]; "
                                           f"got {granularity!r}")
    if buf_size is None or buf_size == 0:
        buf_size = MIRROR_BUF_SIZE_DEFAULT
    if isinstance(buf_size, bool) or not isinstance(buf_size, int) or buf_size < 0:
        raise ArgumentError("buf_size", f"must be a whole number of bytes >= 0 (0: QEMU's "
                                        f"16 MiB); got {buf_size!r}")
    buf = -(-buf_size // granularity) * granularity
    op = min(buf, max(buf // MIRROR_MAX_IN_FLIGHT, _MIRROR_OP_MIN))
    catch_window = min(MIRROR_MAX_IN_FLIGHT, max(1, buf // granularity)) * granularity

    def ceiling(window: int, op_size: int) -> float:
        rate = spec.rate_bps
        per_trip = spec.rtt_s + (op_size / rate if rate is not None else 0.0)
        by_window = window / per_trip if per_trip > 0 else math.inf
        return min(rate if rate is not None else math.inf, by_window)

    return Ceilings(bulk_bps=ceiling(buf, op), catchup_bps=ceiling(catch_window, granularity),
                    buf_size=buf, op_bytes=op, bulk_window=buf, catchup_window=catch_window)


# -- the relay ---------------------------------------------------------------------------

class _Direction:
    """One direction of one connection: read, stamp, queue, release in order."""

    def __init__(self, link: Link, name: str, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.link = link
        self.name = name
        self.reader = reader
        self.writer = writer
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.queued = 0
        self.last_departure = 0.0
        self.last_release = 0.0
        self.changed = asyncio.Event()     # data queued, or the outage changed
        self.room = asyncio.Event()        # the queue has room again

    async def pump_in(self) -> None:
        loop = asyncio.get_running_loop()
        spec, limit = self.link.spec, self.link.queue_bytes
        while True:
            while self.queued >= limit:
                self.room.clear()
                await self.room.wait()
            data = await self.reader.read(min(_CHUNK, max(1, limit - self.queued)))
            now = loop.time()
            if spec.rate_bps is not None:
                self.last_departure = max(now, self.last_departure) + len(data) / spec.rate_bps
            else:
                self.last_departure = now
            delay = spec.rtt_s / 2
            if spec.jitter_s:
                delay += self.link.random.uniform(-spec.jitter_s, spec.jitter_s)
            # never before the chunk ahead: bytes keep their order
            self.last_release = max(self.last_release, self.last_departure + delay)
            self.queue.append((self.last_release, data or None))
            self.queued += len(data)
            self.changed.set()
            if not data:
                return                      # EOF, queued behind the data

    async def pump_out(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.queue:
                self.changed.clear()
                await self.changed.wait()
                continue
            due = max(self.queue[0][0], self.link.outage_until)
            now = loop.time()
            slack = self.link.late_s
            if now < due - slack:
                self.changed.clear()
                aim = due - slack
                timer = loop.call_at(aim, self.changed.set)
                try:
                    await self.changed.wait()
                finally:
                    timer.cancel()
                woke = loop.time()
                if woke >= aim:             # the timer's wake-up, not new data's
                    self.link._learn_lateness(woke - aim)
                continue
            batch: list[bytes] = []
            eof = False
            while self.queue and max(self.queue[0][0], self.link.outage_until) \
                    <= now + slack:
                _, data = self.queue.popleft()
                if data is None:
                    eof = True
                    break
                batch.append(data)
            size = sum(map(len, batch))
            if batch:
                self.writer.writelines(batch)
                self.queued -= size
                self.link._forwarded[self.name] += size
                self.room.set()
                await self.writer.drain()
            if eof:
                if self.writer.can_write_eof():
                    self.writer.write_eof()
                return


class _Connection:
    def __init__(self, link: Link, client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 server: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.writers = (client[1], server[1])
        self.up = _Direction(link, "up", client[0], server[1])
        self.down = _Direction(link, "down", server[0], client[1])
        self.directions = (self.up, self.down)
        self.tasks: list[asyncio.Task[None]] = []

    def wake(self) -> None:
        for d in self.directions:
            d.changed.set()

    def abort(self, *, rst: bool = False) -> None:
        """Tear both sides down at once; with ``rst`` a TCP peer sees a reset, not a FIN."""
        for w in self.writers:
            sock = w.get_extra_info("socket")
            if rst and sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    b"\x01\x00\x00\x00\x00\x00\x00\x00")
            w.transport.abort()


def _upstream(upstream: Upstream) -> tuple[str, int] | str:
    if isinstance(upstream, tuple):
        if len(upstream) != 2 or not isinstance(upstream[0], str) \
                or isinstance(upstream[1], bool) or not isinstance(upstream[1], int) \
                or not 0 < upstream[1] < 65536:
            raise ArgumentError("upstream", f"expected ('host', port) or a unix socket path; "
                                            f"got {upstream!r}")
        return upstream
    if isinstance(upstream, (str, os.PathLike)):
        return os.fspath(upstream)
    raise ArgumentError("upstream", f"expected ('host', port) or a unix socket path; "
                                    f"got {upstream!r}")


def _private_dir(base: os.PathLike[str] | str | None) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="qmpkit-link-", dir=base))
    os.chmod(folder, 0o700)
    mark_owner(folder)
    return folder


class Link:
    """The relay, in this event loop. Start it with `Link.start`::

        async with await Link.start(LinkSpec.parse("rtt=20ms"), ("127.0.0.1", 10809)) as link:
            reader, writer = await asyncio.open_connection(*link.address)

    :ivar address: where it listens: ``("127.0.0.1", port)``, or a unix socket path.
    :ivar queue_bytes: each direction's queue, per connection.
    """

    def __init__(self, spec: LinkSpec, upstream: tuple[str, int] | str, *,
                 queue_bytes: int | None = None, seed: int | None = None) -> None:
        self.spec = spec
        self.upstream = upstream
        if queue_bytes is None:
            bdp = spec.bdp_bytes
            queue_bytes = _UNLIMITED_QUEUE if math.isinf(bdp) else int(bdp) + MiB
        elif isinstance(queue_bytes, bool) or not isinstance(queue_bytes, int) \
                or queue_bytes < _CHUNK:
            raise ArgumentError("queue_bytes", f"must be an int >= {_CHUNK}; got "
                                               f"{queue_bytes!r}")
        self.queue_bytes = queue_bytes
        self.random = random.Random(seed)
        self.outage_until = 0.0
        self.late_s = _LATE_START_S     # how late timer wake-ups come, on average
        self.address: tuple[str, int] | str | None = None
        self._server: asyncio.AbstractServer | None = None
        self._dir: Path | None = None
        self._conns: set[_Connection] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._forwarded = {"up": 0, "down": 0}
        self._accepted = 0
        self._resets = 0
        self._closed = False

    @classmethod
    async def start(cls, spec: LinkSpec | str, upstream: Upstream, *,
                    host: str = "127.0.0.1", port: int = 0,
                    socket_dir: os.PathLike[str] | str | None = None,
                    socket_path: os.PathLike[str] | str | None = None,
                    queue_bytes: int | None = None, seed: int | None = None) -> Link:
        """Listen and relay every connection to ``upstream``.

        :param spec: a `LinkSpec` or its text (`LinkSpec.parse`).
        :param upstream: ``("host", port)`` or a unix socket path (QEMU's NBD
            server, `BlockGraph.nbd_socket`).
        :param host, port: where to listen on TCP (port 0: a free one).
        :param socket_dir: listen on a unix socket instead, in a private temp
            dir made inside this dir (removed by `close`).
        :param socket_path: listen on exactly this unix socket (its dir is the
            caller's to make private and remove).
        :param queue_bytes: each direction's queue; by default the
            bandwidth-delay product plus 1 MiB (64 MiB when the rate is unlimited).
        :param seed: for the jitter.
        :raise ArgumentError: a bad spec, upstream or queue size.
        """
        link = cls(LinkSpec.parse(spec), _upstream(upstream), queue_bytes=queue_bytes, seed=seed)
        limit = max(link.queue_bytes, MiB)
        if socket_dir is not None or socket_path is not None:
            if socket_path is None:
                link._dir = _private_dir(socket_dir)
                socket_path = link._dir / "link.sock"
            path = os.fspath(socket_path)
            if len(os.fsencode(path)) > _UNIX_PATH_MAX:
                if link._dir is not None:
                    shutil.rmtree(link._dir, ignore_errors=True)
                raise ArgumentError("socket_dir", f"the socket path {path!r} is longer than "
                                                  f"{_UNIX_PATH_MAX} bytes (AF_UNIX's limit); "
                                                  "give a shorter dir")
            link._server = await asyncio.start_unix_server(link._accept, path, limit=limit)
            link.address = path
        else:
            link._server = await asyncio.start_server(link._accept, host, port, limit=limit)
            sockname = link._server.sockets[0].getsockname()
            link.address = (sockname[0], sockname[1])
        log.info("link %s listening on %s, relaying to %s", spec, link.address, link.upstream)
        return link

    def nbd_uri(self, export: str) -> str:
        """The URI of ``export`` through this link, for `BlockGraph.add_nbd`."""
        name = urllib.parse.quote(export)
        if isinstance(self.address, tuple):
            return f"nbd://{self.address[0]}:{self.address[1]}/{name}"
        return f"nbd+unix:///{name}?socket={self.address}"

    async def outage(self, seconds: float) -> None:
        """Carry nothing, in either direction, for ``seconds`` from now; returns
        at once. Connections stay open (and new ones are accepted); what is
        sent meanwhile waits in the queues (up to their size, then TCP pushes
        back) and is delivered when the outage ends. A later outage extends it.

        :raise ArgumentError: ``seconds`` is not in [0, 3600].
        """
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) \
                or not 0 <= seconds <= 3600:
            raise ArgumentError("seconds", f"must be in [0, 3600]; got {seconds!r}")
        until = asyncio.get_running_loop().time() + seconds
        self.outage_until = max(self.outage_until, until)
        for conn in self._conns:
            conn.wake()

    async def reset(self) -> int:
        """Tear down every current connection, both sides at once (TCP peers
        see a reset); returns how many. The link keeps listening."""
        conns = list(self._conns)
        for conn in conns:
            conn.abort(rst=True)
        self._resets += len(conns)
        await self._end(conns)
        return len(conns)

    def stats(self) -> dict[str, int]:
        """``bytes_up`` (client to upstream), ``bytes_down``, ``connections``
        (accepted so far), ``active`` and ``resets`` (connections torn down by `reset`)."""
        return {"bytes_up": self._forwarded["up"], "bytes_down": self._forwarded["down"],
                "connections": self._accepted, "active": len(self._conns),
                "resets": self._resets}

    async def close(self) -> None:
        """Stop listening and tear down every connection. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.close()
        conns = list(self._conns)
        for conn in conns:
            conn.abort()
        await self._end(conns)
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def _learn_lateness(self, late: float) -> None:
        self.late_s = 0.9 * self.late_s + 0.1 * min(max(late, 0.0), _LATE_MAX_S)

    async def _end(self, conns: list[_Connection]) -> None:
        tasks = [t for c in conns for t in c.tasks]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in conns:
            self._conns.discard(c)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._relay(reader, writer)
        except asyncio.CancelledError:
            # `close` cancelled it; asyncio's server would log a cancelled handler
            if not self._closed:
                raise
        finally:
            self._handlers.discard(task)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closed:
            writer.transport.abort()
            return
        self._accepted += 1
        limit = max(self.queue_bytes, MiB)
        try:
            if isinstance(self.upstream, tuple):
                server = await asyncio.open_connection(*self.upstream, limit=limit)
            else:
                server = await asyncio.open_unix_connection(self.upstream, limit=limit)
        except OSError as exc:
            log.warning("link: cannot reach %s: %s", self.upstream, exc)
            writer.transport.abort()
            return
        for w in (writer, server[1]):
            sock = w.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Connection(self, (reader, writer), server)
        self._conns.add(conn)
        conn.tasks = [asyncio.create_task(coro) for d in conn.directions
                      for coro in (d.pump_in(), d.pump_out())]
        try:
            # Ends when both directions have forwarded their EOF, when one fails
            # (a reset peer), or when `reset` cancels the pumps.
            done, _ = await asyncio.wait(conn.tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                exc = None if t.cancelled() else t.exception()
                if isinstance(exc, OSError):
                    log.debug("link connection ended: %r", exc)
                elif exc is not None:
                    log.warning("link connection failed: %r", exc)
        finally:
            for t in conn.tasks:
                t.cancel()
            await asyncio.gather(*conn.tasks, return_exceptions=True)
            conn.abort()
            self._conns.discard(conn)

    async def __aenter__(self) -> Link:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<Link {self.spec.describe()} {self.address} -> {self.upstream}>"


# -- the relay in its own process ------------------------------------------------------------

class LinkProcess:
    """The same relay in a child process (``python -m qmpkit.link``): it does
    not compete with the caller's event loop for the GIL. Same surface as
    `Link`, except that `stats` is a coroutine here.

    The child runs in its own session and dies with its parent (qmpkit.process).
    It prints where it listens as its first stdout line, then answers one line
    per command on stdin (``outage SECONDS``, ``reset``, ``stats``). `close`
    terminates it by its handle, and kills it if it has not exited in 5 s.
    """

    def __init__(self, spec: LinkSpec, proc: asyncio.subprocess.Process,
                 address: tuple[str, int] | str, argv: list[str],
                 folder: Path | None) -> None:
        self.spec = spec
        self.address = address
        self.argv = argv
        self._proc = proc
        self._dir = folder
        self._lock = asyncio.Lock()
        self._closed = False

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    @classmethod
    async def start(cls, spec: LinkSpec | str, upstream: Upstream, *,
                    unix: bool = False, base_dir: os.PathLike[str] | str | None = None,
                    queue_bytes: int | None = None, seed: int | None = None,
                    timeout: float = 15.0) -> LinkProcess:
        """Start the relay process (arguments as `Link.start`).

        :param unix: listen on a unix socket, in a private temp dir (made in
            ``base_dir``, or the system's temp dir) that `close` removes;
            otherwise on a free TCP port of 127.0.0.1.
        :raise ArgumentError: a bad spec or upstream.
        :raise LinkError: the process did not start or did not say where it
            listens within ``timeout``.
        """
        spec = LinkSpec.parse(spec)
        target = _upstream(upstream)
        Link(spec, target, queue_bytes=queue_bytes)        # checks the arguments here
        folder = _private_dir(base_dir) if unix else None
        up = target if isinstance(target, str) else f"{target[0]}:{target[1]}"
        argv = [sys.executable, "-m", "qmpkit.link", "--upstream", up,
                "--spec", spec.to_text()]
        if folder is not None:
            path = folder / "link.sock"
            if len(os.fsencode(str(path))) > _UNIX_PATH_MAX:
                shutil.rmtree(folder, ignore_errors=True)
                raise ArgumentError("base_dir", f"the socket path {str(path)!r} is longer "
                                                f"than {_UNIX_PATH_MAX} bytes (AF_UNIX's "
                                                "limit); give a shorter dir")
            argv += ["--socket-path", str(path)]
        if queue_bytes is not None:
            argv += ["--queue-bytes", str(queue_bytes)]
        if seed is not None:
            argv += ["--seed", str(seed)]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, start_new_session=True, preexec_fn=die_with_parent)
        except OSError as exc:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            raise LinkError(f"cannot run the link process {argv}: {exc}") from exc
        try:
            assert proc.stdout is not None
            line = await within(proc.stdout.readline(), timeout)
            hello = json.loads(line) if line else {}
            address = hello.get("path") or (hello["host"], hello["port"])
        except BaseException as exc:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            err = await proc.stderr.read() if proc.stderr else b""
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            if isinstance(exc, (asyncio.TimeoutError, ValueError, KeyError, TypeError)):
                raise LinkError(f"the link process did not start (exit code "
                                f"{proc.returncode}): {' '.join(argv)}\n"
                                f"{err.decode(errors='replace')}") from exc
            raise
        # stderr is kept for diagnostics only when the child fails; do not let a
        # full pipe block it: drain it in the background.
        link = cls(spec, proc, address, argv, folder)
        link._stderr_task = asyncio.create_task(link._drain_stderr())
        return link

    async def _drain_stderr(self) -> None:
        assert self._proc.stderr is not None
        while line := await self._proc.stderr.readline():
            log.info("link process: %s", line.decode(errors="replace").rstrip())

    def nbd_uri(self, export: str) -> str:
        """The URI of ``export`` through this link, for `BlockGraph.add_nbd`."""
        name = urllib.parse.quote(export)
        if isinstance(self.address, tuple):
            return f"nbd://{self.address[0]}:{self.address[1]}/{name}"
        return f"nbd+unix:///{name}?socket={self.address}"

    async def _command(self, line: str, timeout: float = 10.0) -> str:
        async with self._lock:
            if self._closed or self._proc.returncode is not None:
                raise LinkError(f"the link process is gone (exit code {self._proc.returncode})")
            assert self._proc.stdin is not None and self._proc.stdout is not None
            try:
                self._proc.stdin.write(line.encode() + b"\n")
                await self._proc.stdin.drain()
                reply = await within(self._proc.stdout.readline(), timeout)
            except (OSError, asyncio.TimeoutError) as exc:
                raise LinkError(f"the link process did not answer {line!r}: {exc!r}") from exc
            if not reply:
                raise LinkError(f"the link process exited while answering {line!r}")
            text = reply.decode().strip()
            if text.startswith("error"):
                raise LinkError(f"the link process refused {line!r}: {text}")
            return text

    async def outage(self, seconds: float) -> None:
        """See `Link.outage`."""
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) \
                or not 0 <= seconds <= 3600:
            raise ArgumentError("seconds", f"must be in [0, 3600]; got {seconds!r}")
        await self._command(f"outage {float(seconds)!r}")

    async def reset(self) -> int:
        """See `Link.reset`."""
        return int(await self._command("reset"))

    async def stats(self) -> dict[str, int]:
        """See `Link.stats`."""
        return json.loads(await self._command("stats"))

    async def close(self, *, timeout: float = 5.0) -> int | None:
        """Terminate the process (kill it after ``timeout``); returns its exit
        code. Safe to call twice."""
        if not self._closed:
            self._closed = True
            proc = self._proc
            try:
                if proc.returncode is None:
                    proc.terminate()
                    try:
                        await within(proc.wait(), timeout)
                    except asyncio.TimeoutError:
                        proc.kill()
                        await proc.wait()
            finally:
                if proc.returncode is None:          # cancelled part-way: still no leak
                    proc.kill()
                task = getattr(self, "_stderr_task", None)
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                if self._dir is not None:
                    shutil.rmtree(self._dir, ignore_errors=True)
        return self._proc.returncode

    async def __aenter__(self) -> LinkProcess:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<LinkProcess pid={self.pid} {self.spec.describe()} {self.address}>"


# -- the child -----------------------------------------------------------------------------

async def _serve(ns: argparse.Namespace) -> None:
    up: Upstream = ns.upstream
    host, sep, port = ns.upstream.rpartition(":")
    if sep and port.isdigit() and "/" not in ns.upstream:
        up = (host, int(port))
    link = await Link.start(ns.spec, up, socket_path=ns.socket_path,
                            queue_bytes=ns.queue_bytes, seed=ns.seed)
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    out = sys.stdout
    hello = ({"path": link.address} if isinstance(link.address, str)
             else {"host": link.address[0], "port": link.address[1]})
    out.write(json.dumps(hello) + "\n")
    out.flush()
    try:
        while line := await stdin.readline():       # EOF: the parent is gone
            words = line.decode().split()
            try:
                if words[:1] == ["outage"] and len(words) == 2:
                    await link.outage(float(words[1]))
                    reply = "ok"
                elif words == ["reset"]:
                    reply = str(await link.reset())
                elif words == ["stats"]:
                    reply = json.dumps(link.stats())
                else:
                    reply = f"error: unknown command {line.decode().strip()!r}"
            except (ArgumentError, ValueError) as exc:
                reply = f"error: {exc}"
            out.write(reply + "\n")
            out.flush()
    finally:
        await link.close()


def main(argv: list[str] | None = None) -> int:
    """The link process: ``python -m qmpkit.link --upstream HOST:PORT|PATH --spec SPEC``."""
    ap = argparse.ArgumentParser(prog="python -m qmpkit.link",
                                 description="An emulated network link (a TCP relay). "
                                             "Prints where it listens, then reads commands "
                                             "on stdin: outage SECONDS, reset, stats.")
    ap.add_argument("--upstream", required=True, help="HOST:PORT or a unix socket path")
    ap.add_argument("--spec", required=True, help=f"{SPEC_FORMS}. Presets: {PRESETS_HELP}")
    ap.add_argument("--socket-path", help="listen on this unix socket instead of TCP")
    ap.add_argument("--queue-bytes", type=int)
    ap.add_argument("--seed", type=int)
    ns = ap.parse_args(argv)
    try:
        LinkSpec.parse(ns.spec)
    except ArgumentError as exc:
        ap.error(str(exc))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(ns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
