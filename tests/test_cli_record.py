"""`qmpkit demo`, `qmpkit plot` and `qmpkit mirror --out`, run as a user runs them."""

from __future__ import annotations

import asyncio
import csv
import os
import select
import signal
import sys
from pathlib import Path

from test_cli import qmp, run

from qmpkit.trace import Trace

MiB = 1 << 20
QMPKIT = str(Path(sys.executable).parent / "qmpkit")
SMALL = ["--size", "32M", "--target-speed", "16M", "--load-rate", "2M"]


async def test_demo_with_small_disks(tmp_path):
    out = tmp_path / "demo"
    code, text, err = await run("demo", "--out", str(out), *SMALL, "--time-limit", "10",
                                timeout=300)
    assert code == 0, err
    for name in ("convergence.png", "throughput.png", "latency.png", "demo.csv"):
        assert (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(out / "demo.csv")))
    assert [r["label"] for r in rows] == ["QEMU defaults (64 KiB granularity)",
                                          "granularity 4 KiB, buf-size 1 MiB",
                                          "copy-mode write-blocking"]
    traces = [Trace.load(out / r["folder"]) for r in rows]
    # 4 KiB granularity and write-blocking converge on this load, and verify.
    for tr in traces[1:]:
        assert tr.summary["converged"] and tr.summary["verified"] is True
    assert traces[1].summary["params"]["granularity"] == 4096
    assert traces[2].summary["params"]["copy-mode"] == "write-blocking"
    assert all(tr.summary["guest"]["write_p99_us"] > 0 for tr in traces)
    assert "READY after" in text and "amplification" in text and "guest p99" in text
    # `qmpkit plot` takes the demo's own folder: its three runs, overlaid
    code, text, err = await run("plot", str(out), "--out", str(tmp_path / "again"))
    assert code == 0, err
    assert text.count("wrote ") == 3
    assert (tmp_path / "again" / "latency.png").stat().st_size > 0


async def test_plot_redraws_and_overlays(tmp_path):
    from test_trace import make_trace
    a = make_trace(ready_at=3.0).save(tmp_path / "a")
    b = make_trace(ready_at=2.0).save(tmp_path / "b")
    code, out, err = await run("plot", str(a))
    assert code == 0, err
    assert (a / "convergence.png").exists() and (a / "latency.png").exists()
    code, out, err = await run("plot", str(a), str(b), "--out", str(tmp_path / "both"))
    assert code == 0 and (tmp_path / "both" / "throughput.png").exists()
    code, out, err = await run("plot", str(tmp_path / "nope"))
    assert code == 2 and "not a trace folder" in err
    # a sweep's folder: one run per configuration (repeat 0), never the offline copy
    sweep = tmp_path / "sweep"
    (sweep / "runs" / "offline-copy_r0").mkdir(parents=True)
    (sweep / "sweep.json").write_text("{}")
    for name in ("g-4096_r0", "g-4096_r1", "g-65536_r0"):
        make_trace(ready_at=3.0).save(sweep / "runs" / name)
    code, out, err = await run("plot", str(sweep))
    assert code == 0, err
    assert (sweep / "convergence.png").exists()
    from qmpkit.cli import _trace_folders
    assert [f.name for f in _trace_folders(sweep)] == ["g-4096_r0", "g-65536_r0"]
    # several folders need --out; an empty folder is neither kind
    code, out, err = await run("plot", str(sweep), str(a))
    assert code == 2 and "--out" in err
    (tmp_path / "empty").mkdir()
    code, out, err = await run("plot", str(tmp_path / "empty"))
    assert code == 2 and "nor a demo's or a sweep's output" in err


async def test_mirror_out_records_an_attached_qemu(qemu, tmp_path):
    await qemu.nodes.add_image("src", 32 * MiB, fill="mixed")
    await qemu.nodes.add_image("dst", 32 * MiB)
    out = tmp_path / "rec"
    code, text, err = await run("mirror", "--qmp", qmp(qemu), "--device", "src", "--target",
                                "dst", "--granularity", "4K", "--speed", "16M", "--out", str(out),
                                "--hz", "20")
    assert code == 0, err
    tr = Trace.load(out)
    assert tr.ready_time() is not None and tr.summary["completed"] is True
    assert tr.summary["achieved_hz"] > 10
    assert tr.summary["params"]["granularity"] == 4096
    assert (out / "convergence.png").exists() and "trace saved in" in text


def _processes_under(path: Path) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if str(path).encode() in cmd:
                pids.append(int(entry))
    return pids


def _wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    """Wait (on pidfds) for each process to end; return those still running."""
    left = []
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            if not select.select([fd], [], [], timeout)[0]:
                left.append(pid)
        finally:
            os.close(fd)
    return left


async def _start_embedded_mirror(tmp_path: Path, out: Path) -> asyncio.subprocess.Process:
    env = dict(os.environ, TMPDIR=str(tmp_path))   # the daemon's dir lands here
    proc = await asyncio.create_subprocess_exec(
        QMPKIT, "mirror", "--out", str(out), "--size", "256M", "--target-speed", "8M",
        "--load-rate", "2M", "--timeout", "120", env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    # Plain progress lines come once a second: after three, the run is under way
    # and the trace has been checkpointed.
    lines = 0
    while lines < 4:
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line, (await proc.stderr.read()).decode()
        lines += b" copying " in line
    return proc


async def test_a_killed_run_leaves_a_loadable_trace_and_no_process(tmp_path):
    out = tmp_path / "killed"
    proc = await _start_embedded_mirror(tmp_path, out)
    children = _processes_under(tmp_path)
    assert len(children) >= 2          # qemu-storage-daemon and fio
    proc.kill()                        # SIGKILL: no finally runs in qmpkit
    await proc.wait()
    tr = Trace.load(out)
    assert len(tr.samples) >= 5 and tr.samples[-1].current_progress > 0
    assert tr.events[0]["data"]["status"] == "created"
    # Its children die with it (PR_SET_PDEATHSIG): nothing is left running.
    assert _wait_gone(children) == []


async def test_an_interrupted_run_cancels_the_job_and_saves_everything(tmp_path):
    out = tmp_path / "interrupted"
    proc = await _start_embedded_mirror(tmp_path, out)
    children = _processes_under(tmp_path)
    proc.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 130, err.decode()
    tr = Trace.load(out)
    assert tr.summary["error"] == "interrupted" and tr.summary["converged"] is False
    assert _wait_gone(children) == []
    assert not any(tmp_path.glob("qmpkit-*")), "the daemon's temp dir was removed"
