"""
A recorded mirror run: samples, events and metadata, saved as a folder.

A trace folder holds:

- ``trace.csv``     one row per sample (`Sample`'s fields, in order);
- ``events.jsonl``  one QMP event of the job per line, with ``t_s``;
- ``summary.json``  metadata and derived metrics (see `qmpkit.analysis.summarize`);
- ``fio_latency.csv`` fio's per-interval write latency, when it was kept.

Saving is deterministic: save, load and save again gives the same bytes.
Plots and widgets read traces; they never talk to QEMU.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

__all__ = ["Sample", "Trace", "TRACE_FILES", "COPY_MODE_EVENT", "SPEED_EVENT",
           "prepare_out_dir", "write_atomic"]

TRACE_FILES = ("trace.csv", "events.jsonl", "summary.json")
#: qmpkit's own event in ``events.jsonl``: the copy mode of a running mirror was
#: switched (``block-job-change``; ``--rescue-after`` does it by itself)
COPY_MODE_EVENT = "QMPKIT_COPY_MODE_CHANGED"
#: qmpkit's own event: the running job's speed limit was set (``data.speed``, bytes/s,
#: 0 = unlimited); QEMU sends no event for ``block-job-set-speed``
SPEED_EVENT = "QMPKIT_SPEED_CHANGED"


@dataclass(frozen=True)
class Sample:
    """One look at a running mirror.

    ``t_s`` is seconds since the job started (monotonic clock). ``dirty_bytes``
    is the count of the job's dirty bitmap (None when QEMU did not show it).
    ``remaining_bytes`` is ``total_progress - current_progress``: the dirty
    bytes plus the bytes in flight. ``throughput_bps`` is the copy rate over
    the last half second. ``actively_synced`` is QEMU's own word (8.2 and
    later; None where QEMU does not report it): the mirror copies in
    write-blocking mode and source and target are in sync.
    """

    t_s: float
    status: str
    dirty_bytes: int | None
    current_progress: int
    total_progress: int
    remaining_bytes: int
    throughput_bps: float
    actively_synced: bool | None = None


_FIELDS = [f.name for f in fields(Sample)]
_INT_FIELDS = {"dirty_bytes", "current_progress", "total_progress", "remaining_bytes"}
_NULLABLE = {"dirty_bytes", "actively_synced"}


def _fmt(name: str, value: Any) -> str:
    if value is None:
        return ""
    if name == "t_s":
        return f"{value:.6f}"
    if name == "throughput_bps":
        return f"{value:.1f}"
    if name == "actively_synced":
        return "true" if value else "false"
    return str(value)


def _parse(name: str, text: str) -> Any:
    if text == "":
        return None
    if name in _INT_FIELDS:
        return int(text)
    if name in ("t_s", "throughput_bps"):
        return float(text)
    if name == "actively_synced":
        if text not in ("true", "false"):
            raise ValueError(text)
        return text == "true"
    return text


def prepare_out_dir(path: os.PathLike[str] | str, *, option: str = "--out") -> Path:
    """Make sure ``path`` is a folder qmpkit can write, creating it if needed:
    called before anything starts, so a run never ends unable to save.

    :raise ArgumentError: naming ``option``, with the reason.
    """
    from .errors import ArgumentError
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not folder.is_dir():
            raise NotADirectoryError(f"{folder} is not a folder")
        fd, probe = tempfile.mkstemp(prefix=".qmpkit-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise ArgumentError(option, f"cannot write to {str(folder)!r}: {why}") from None
    return folder


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a fresh temp file in the same folder
    (``O_EXCL``, never a predictable name a symlink could sit on), then rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"


@dataclass
class Trace:
    """Samples, events and metadata of one mirror run.

    ``meta`` holds what describes the run (``params``, ``disk_bytes``,
    ``qemu_version``, ``workload``, ``started_at`` ...); ``summary`` the
    derived metrics, filled by `qmpkit.analysis.summarize`.
    """

    samples: list[Sample] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    fio_latency: list[tuple[float, float]] = field(default_factory=list)  # (t_s, µs)

    @property
    def label(self) -> str:
        return str(self.meta.get("label") or self.meta.get("params", {}).get("job-id", "mirror"))

    def ready_time(self) -> float | None:
        """When BLOCK_JOB_READY arrived (seconds since the job started), or None."""
        for ev in self.events:
            if ev["event"] == "BLOCK_JOB_READY":
                return float(ev["t_s"])
        return None

    def paused_spans(self) -> list[tuple[float, float | None]]:
        """When the job was paused: (from, to) in seconds, ``to`` None if it never resumed."""
        spans: list[tuple[float, float | None]] = []
        start: float | None = None
        for ev in self.events:
            if ev["event"] != "JOB_STATUS_CHANGE":
                continue
            status = ev.get("data", {}).get("status")
            if status in ("paused", "standby") and start is None:
                start = float(ev["t_s"])
            elif status in ("running", "ready", "aborting", "concluded") and start is not None:
                spans.append((start, float(ev["t_s"])))
                start = None
        if start is not None:
            spans.append((start, None))
        return spans

    def speed_steps(self) -> list[tuple[float, int]]:
        """The speed limit over time: (since, bytes/s, 0 = none), from the start's
        ``speed`` and every later change (`SPEED_EVENT`)."""
        steps = [(0.0, int(self.meta.get("params", {}).get("speed") or 0))]
        for ev in self.events:
            if ev["event"] == SPEED_EVENT:
                steps.append((float(ev["t_s"]), int(ev.get("data", {}).get("speed") or 0)))
        return steps

    def error_events(self) -> list[dict[str, Any]]:
        return [ev for ev in self.events if ev["event"] == "BLOCK_JOB_ERROR"
                or (ev["event"] == "BLOCK_JOB_COMPLETED" and ev.get("data", {}).get("error"))]

    # -- files ---------------------------------------------------------------

    def save(self, folder: os.PathLike[str] | str) -> Path:
        """Write the trace folder (created if needed); returns its path.

        Each file is written to a temporary name and renamed, so a folder is
        never left half-written by an interruption.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(_FIELDS)
        for s in self.samples:
            w.writerow([_fmt(n, getattr(s, n)) for n in _FIELDS])
        files = {
            "trace.csv": buf.getvalue(),
            "events.jsonl": "".join(json.dumps(ev, sort_keys=True) + "\n" for ev in self.events),
            "summary.json": _dump_json({"meta": self.meta, **self.summary}),
        }
        if self.fio_latency:
            files["fio_latency.csv"] = "t_s,write_lat_us\n" + "".join(
                f"{t:.3f},{lat:.3f}\n" for t, lat in self.fio_latency)
        for name, text in files.items():
            write_atomic(folder / name, text)
        return folder

    @classmethod
    def load(cls, folder: os.PathLike[str] | str, *, require_samples: bool = True) -> "Trace":
        """Read a trace folder. A trace with no sample is refused unless
        ``require_samples`` is False (a run that failed at once).

        :raise FileNotFoundError: the folder holds no trace.
        :raise ValueError: a file is damaged; the message says which and where,
            in one line.
        """
        folder = Path(folder)
        name = "trace.csv"
        try:
            with open(folder / name, newline="") as f:
                rows = list(csv.reader(f))
            # a trace written before a column was added has a shorter header
            if not rows or not rows[0] or rows[0] != _FIELDS[:len(rows[0])] \
                    or len(rows[0]) < _FIELDS.index("throughput_bps") + 1:
                raise ValueError(f"not a qmpkit trace (header {rows[0][:8] if rows else []})")
            header = rows[0]
            if len(rows) == 1 and require_samples:
                raise ValueError("no samples")
            samples = []
            for i, row in enumerate(rows[1:], 2):
                if len(row) != len(header):
                    raise ValueError(f"line {i} has {len(row)} columns, not {len(header)}")
                try:
                    values = {n: _parse(n, v) for n, v in zip(header, row)}
                except ValueError:
                    raise ValueError(f"line {i} holds a value that is not a number") from None
                empty = [n for n, v in values.items() if v is None and n not in _NULLABLE]
                if empty:
                    raise ValueError(f"line {i} has no {empty[0]}")
                samples.append(Sample(**values))
            name = "events.jsonl"
            events = []
            for i, line in enumerate((folder / name).read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    ev = json.loads(line)
                except ValueError:
                    raise ValueError(f"line {i} is not JSON") from None
                if not isinstance(ev, dict) or "event" not in ev or "t_s" not in ev:
                    raise ValueError(f"line {i} is not an event")
                events.append(ev)
            name = "summary.json"
            try:
                summary = json.loads((folder / name).read_text())
            except ValueError:
                raise ValueError("not JSON") from None
            if not isinstance(summary, dict):
                raise ValueError("not a JSON object")
            meta = summary.pop("meta", {})
            if not isinstance(meta, dict):
                raise ValueError("its meta is not an object")
            name = "fio_latency.csv"
            lat: list[tuple[float, float]] = []
            lat_path = folder / name
            if lat_path.exists():
                for i, line in enumerate(lat_path.read_text().splitlines()[1:], 2):
                    try:
                        t, v = line.split(",")
                        lat.append((float(t), float(v)))
                    except ValueError:
                        raise ValueError(f"line {i} is not 't_s,write_lat_us'") from None
        except (UnicodeDecodeError, csv.Error):
            raise ValueError(f"{folder / name}: not a text table") from None
        except ValueError as exc:
            raise ValueError(f"{folder / name}: {exc}") from None
        return cls(samples=samples, events=events, meta=meta, summary=summary, fio_latency=lat)

    def to_dataframe(self) -> "Any":
        """The samples as a pandas DataFrame (one row per sample, indexed by t_s)."""
        import pandas as pd
        df = pd.DataFrame([{n: getattr(s, n) for n in _FIELDS} for s in self.samples],
                          columns=_FIELDS)
        return df.astype({"dirty_bytes": "Int64"})

    def events_dataframe(self) -> "Any":
        import pandas as pd
        return pd.DataFrame([{"t_s": ev["t_s"], "event": ev["event"],
                              "data": json.dumps(ev.get("data", {}), sort_keys=True)}
                             for ev in self.events], columns=["t_s", "event", "data"])

    def extend(self, samples: Iterable[Sample]) -> None:
        self.samples.extend(samples)
