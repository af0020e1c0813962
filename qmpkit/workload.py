"""
A guest-like write load: ``fio`` writing into the source through an NBD export.

The writes pass through the mirror's filter node and dirty the job's bitmap,
just as a guest's would. fio's own results (bandwidth, IOPS, latency p50/p99,
and optionally its per-interval latency log) are the guest's view of what the
mirror costs.

::

    load = FioLoad(rw="randwrite", bs="4K", rate="20M", iodepth=4, seed=1)
    async with FioRunner(load, uri, workdir) as fio:   # returns once fio writes
        ...                                             # run the mirror
    print(fio.result.write_p99_us)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .aio import within
from .process import die_with_parent
from .errors import ArgumentError, ToolError
from .units import format_rate, format_size, parse_rate, parse_size

__all__ = ["FioLoad", "FioResult", "FioRunner", "RW_MODES", "verify_image"]

log = logging.getLogger(__name__)

RW_MODES = ("randwrite", "write", "randrw")
_CONNECTED = b"connected to NBD server"


@dataclass(frozen=True)
class FioLoad:
    """What fio writes. Sizes and rates take ``"4K"``, ``"20M"`` or bytes.

    :param rw: ``randwrite``, ``write`` (sequential) or ``randrw``.
    :param bs: block size of each request.
    :param rate: write rate limit per second (0 = as fast as it can).
    :param iodepth: requests in flight.
    :param runtime: seconds to run (it is stopped earlier when the run ends).
    :param seed: fio's ``randseed``, so runs repeat.
    :param latency_log: keep fio's per-interval latency log (100 ms averages).
    :param io_size: write this many bytes and stop (instead of running for ``runtime``).
    :param verify: write blocks with crc32c headers, so that `verify_image` can later
        check every block fio wrote, wherever the data ended up.
    :param region: write only into the first ``region`` of the disk, a fraction in
        (0, 1] (a hot spot: ``0.05`` is 5%); None writes anywhere.
    """

    rw: str = "randwrite"
    bs: int | str = "4K"
    rate: int | str = "20M"
    iodepth: int = 4
    runtime: float = 600.0
    seed: int = 1
    latency_log: bool = False
    io_size: int | str | None = None
    verify: bool = False
    region: float | None = None

    def __post_init__(self) -> None:
        if self.region is not None and not 0 < self.region <= 1:
            raise ArgumentError("region", f"must be a fraction in (0, 1]; got {self.region!r}")
        if self.io_size is not None:
            n = parse_size(self.io_size, name="io_size")
            if n <= 0:
                raise ArgumentError("io_size", f"must be > 0; got {self.io_size!r}")
            object.__setattr__(self, "io_size", n)
        if self.rw not in RW_MODES:
            raise ArgumentError("rw", f"must be one of {', '.join(RW_MODES)}; got {self.rw!r}")
        bs = parse_size(self.bs, name="bs")
        if not 512 <= bs <= 64 << 20 or bs % 512:
            raise ArgumentError("bs", f"must be a multiple of 512 in [512 B, 64 MiB]; "
                                      f"got {self.bs!r}")
        object.__setattr__(self, "bs", bs)
        object.__setattr__(self, "rate", parse_rate(self.rate, name="rate"))
        if isinstance(self.iodepth, bool) or not isinstance(self.iodepth, int) \
                or not 1 <= self.iodepth <= 1024:
            raise ArgumentError("iodepth", f"must be an integer in [1, 1024]; got {self.iodepth!r}")
        if not self.runtime > 0:
            raise ArgumentError("runtime", f"must be > 0 seconds; got {self.runtime!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ArgumentError("seed", f"must be an integer >= 0; got {self.seed!r}")

    def describe(self) -> str:
        rate = format_rate(self.rate) if self.rate else "unlimited"
        where = f" in {self.region * 100:g}% of the disk" if self.region else ""
        return (f"fio {self.rw} bs={format_size(self.bs)} rate={rate} "
                f"iodepth={self.iodepth}{where}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["region"] is None:       # only when set: the settings of older sweeps stay
            del d["region"]
        return d

    def _pattern_args(self) -> list[str]:
        """What decides which blocks are written with what: shared by the write
        and the verify passes."""
        args = [f"--rw={self.rw}", f"--bs={self.bs}", f"--randseed={self.seed}"]
        if self.io_size is not None:
            args.append(f"--io_size={self.io_size}")
        if self.region is not None:
            args.append(f"--size={self.region * 100:g}%")
        if self.verify:
            args.append("--verify=crc32c")
        return args

    def argv(self, uri: str, lat_prefix: Path | None) -> list[str]:
        # No --output: fio's "connected" line then comes on stdout before the
        # JSON, and tells us when the load has begun.
        argv = ["fio", "--name=guest", "--ioengine=nbd", f"--uri={uri}",
                *self._pattern_args(), *(["--do_verify=0"] if self.verify else []),
                f"--iodepth={self.iodepth}",
                "--output-format=json", "--thread"]  # one process: it dies with us
        if self.io_size is None:
            argv += ["--time_based", f"--runtime={max(1, round(self.runtime))}s"]
        if self.rate:
            argv.append(f"--rate={self.rate}" if self.rw != "randrw"
                        else f"--rate={self.rate},{self.rate}")
        if lat_prefix is not None:
            argv += [f"--write_lat_log={lat_prefix}", "--log_avg_msec=100"]
        return argv


@dataclass
class FioResult:
    """The guest's view: what fio measured while the mirror ran."""

    write_bw_bps: float
    write_iops: float
    write_p50_us: float | None
    write_p99_us: float | None
    write_bytes: int
    runtime_s: float
    latency_log: list[tuple[float, float]] = field(default_factory=list)  # (t_s, lat_us)

    @classmethod
    def from_json(cls, data: dict[str, Any], latency_log: list[tuple[float, float]]) -> "FioResult":
        w = data["jobs"][0]["write"]
        pct = w.get("clat_ns", {}).get("percentile", {})

        def us(key: str) -> float | None:
            return pct[key] / 1000.0 if key in pct else None

        return cls(write_bw_bps=float(w["bw_bytes"]), write_iops=float(w["iops"]),
                   write_p50_us=us("50.000000"), write_p99_us=us("99.000000"),
                   write_bytes=int(w["io_bytes"]),
                   runtime_s=data["jobs"][0]["job_runtime"] / 1000.0, latency_log=latency_log)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("latency_log")
        return d


def read_latency_log(path: Path) -> list[tuple[float, float]]:
    """fio's ``*_lat.1.log``: (seconds, average write latency in µs) per interval."""
    rows = []
    for line in path.read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 3 and parts[2] == "1":          # direction 1 = write
            rows.append((int(parts[0]) / 1000.0, int(parts[1]) / 1000.0))
    return rows


async def verify_image(path: os.PathLike[str] | str, load: FioLoad) -> None:
    """Check, with fio's own verify pass, that the raw image ``path`` holds every block
    that ``load`` (``verify=True``, ``io_size`` set) wrote.

    :raise VerifyError: a block is missing or corrupt (fio's message says which).
    """
    from .errors import VerifyError
    from .images import run_tool
    if not load.verify or load.io_size is None:
        raise ArgumentError("load", "needs verify=True and an io_size to be checked")
    path = os.path.abspath(path)
    argv = ["fio", "--name=guest", "--ioengine=psync", f"--filename={path}",
            *load._pattern_args(), "--verify_only", "--do_verify=1", "--thread",
            "--output-format=normal"]
    # fio leaves a verify state file in its working directory: a private one.
    with tempfile.TemporaryDirectory(prefix="qmpkit-fio-") as tmp:
        code, out = await run_tool(argv, ok_codes=(0, 1, 2), cwd=tmp)
    if code != 0 or "verify: bad" in out or "bad magic" in out:
        raise VerifyError(f"fio verify of {os.fspath(path)} failed: "
                          + "; ".join(l for l in out.splitlines() if "verify" in l)[:500])


class FioRunner:
    """Runs one fio load against an NBD URI; `start` returns once fio is connected.

    :param workdir: where fio's JSON output and latency log go.
    """

    def __init__(self, load: FioLoad, uri: str, workdir: os.PathLike[str] | str) -> None:
        self.load = load
        self.uri = uri
        self.workdir = Path(workdir)
        self.result: FioResult | None = None
        self.argv: list[str] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._output = b""
        self._reader: asyncio.Task[None] | None = None
        self._interrupted = False
        self.started_at: float | None = None   # time.monotonic() when fio connected

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self, *, timeout: float = 30.0) -> None:
        """Start fio and wait until it has connected to the NBD export.

        :raise ToolError: fio is missing, exits early, or does not connect in time.
        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        lat = self.workdir / "fio" if self.load.latency_log else None
        self.argv = self.load.argv(self.uri, lat)
        log.info("starting %s", " ".join(self.argv))
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, cwd=self.workdir, preexec_fn=die_with_parent,
                start_new_session=True)
        except OSError as exc:
            raise ToolError(f"cannot run fio: {exc.strerror} (Debian: apt-get install fio)",
                            argv=self.argv, output="", returncode=None) from exc
        connected = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read(connected))
        exited = asyncio.ensure_future(self._proc.wait())
        ready = asyncio.ensure_future(connected.wait())
        try:
            done, _ = await asyncio.wait({exited, ready}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            if not exited.done():
                exited.cancel()
        self.started_at = time.monotonic()
        if not connected.is_set():
            await self._reap()
            what = "fio exited before it wrote anything" if self._proc.returncode is not None \
                else f"fio did not connect to {self.uri} within {timeout:g} s"
            raise ToolError(what, argv=self.argv, output=self._messages(),
                            returncode=self._proc.returncode)

    def _messages(self) -> str:
        """fio's messages without its JSON report."""
        text = self._output.decode(errors="replace")
        cut = text.find("\n{")
        return text if cut < 0 else text[:cut]

    async def _read(self, connected: asyncio.Event) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        async for line in self._proc.stdout:
            self._output += line
            if _CONNECTED in line:
                connected.set()

    async def stop(self, *, timeout: float = 30.0) -> FioResult:
        """Stop fio cleanly (SIGINT: it still writes its results) and read them.

        :raise ToolError: fio failed, or left no results.
        """
        if self._proc is None:
            raise ToolError("fio was never started", argv=self.argv, output="", returncode=None)
        if self._proc.returncode is None:
            self._interrupted = True
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGINT)
        await self._reap(timeout)
        return self._collect()

    async def wait(self, *, timeout: float | None = None) -> FioResult:
        """Wait for fio to finish its runtime, then read its results."""
        assert self._proc is not None
        await within(self._proc.wait(), timeout)
        await self._reap()
        return self._collect()

    async def _reap(self, timeout: float = 30.0) -> None:
        assert self._proc is not None
        try:
            await within(self._proc.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("fio (pid %d) did not stop on SIGINT; killing it", self._proc.pid)
            self._proc.kill()
            await self._proc.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await within(self._reader, 5)

    def _collect(self) -> FioResult:
        assert self._proc is not None
        text = self._output.decode(errors="replace")
        # After our SIGINT fio still prints its results, and exits 128 (3.33) or 0.
        ok = (0, 128, 130) if self._interrupted else (0,)
        if self._proc.returncode not in ok:
            raise ToolError("fio failed", argv=self.argv, output=text,
                            returncode=self._proc.returncode)
        try:
            data = json.loads(text[text.index("\n{") + 1:] if not text.startswith("{") else text)
            (self.workdir / "fio.json").write_text(json.dumps(data, indent=1))
        except ValueError as exc:
            raise ToolError(f"fio left no readable results: {exc}", argv=self.argv,
                            output=text, returncode=self._proc.returncode) from exc
        if data["jobs"][0].get("error"):
            raise ToolError(f"fio reported error {data['jobs'][0]['error']}", argv=self.argv,
                            output=text, returncode=self._proc.returncode)
        lat: list[tuple[float, float]] = []
        if self.load.latency_log:
            path = self.workdir / "fio_lat.1.log"
            if path.exists():
                lat = read_latency_log(path)
        self.result = FioResult.from_json(data, lat)
        return self.result

    def latency_since(self, t0: float) -> list[tuple[float, float]]:
        """fio's latency log with times in seconds since ``t0`` (a monotonic time,
        such as a job's start) instead of since fio's start."""
        if self.result is None or self.started_at is None:
            return []
        return [(round(t - (t0 - self.started_at), 3), v) for t, v in self.result.latency_log]

    async def kill(self) -> None:
        """Stop fio at once, without results (used when a run is torn down)."""
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            await self._reap()

    async def __aenter__(self) -> "FioRunner":
        await self.start()
        return self

    async def __aexit__(self, exc_type: Any, *exc: object) -> None:
        if exc_type is not None:
            await self.kill()
        elif self.running:
            await self.stop()
