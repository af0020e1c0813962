"""The `qmpkit` command, run as a user runs it, against a real daemon."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from helpers import run_cli as run

from qmpkit import compare_images

MiB = 1 << 20


def qmp(qemu) -> str:
    """The spare QMP socket: the test itself holds the first one."""
    return str(qemu.daemon.monitor_path(1))


@pytest.fixture
async def src(qemu):
    await qemu.nodes.add_image("src", 32 * MiB, fill="mixed")
    return qemu


async def test_mirror_to_a_new_file_completes_and_verifies(src, tmp_path):
    target = tmp_path / "new target.qcow2"
    code, out, err = await run("mirror", "--qmp", qmp(src), "--device", "src",
                               "--target-file", str(target), "--target-format", "qcow2",
                               "--create", "--granularity", "64KiB", "--buf-size", "4M",
                               "--verify")
    assert code == 0, err
    assert "READY: job src is in sync" in out
    assert "job src completed (pivoted to the target): 32 MiB" in out
    assert "verified: source and target hold the same data" in out
    # Not a terminal: plain lines, no carriage-return progress bar.
    assert "\r" not in out
    await compare_images(src.workdir / "src.raw", target, fmt_b="qcow2")
    assert await src.client.execute("query-jobs") == []


async def test_then_cancel_keeps_a_point_in_time_copy_and_closes_the_target(src, tmp_path):
    target = tmp_path / "copy.raw"
    code, out, err = await run("mirror", "--qmp", qmp(src), "--device", "src",
                               "--target-file", str(target), "--create", "--then", "cancel",
                               "--job-id", "snap")
    assert code == 0, err
    assert "job snap ended with a point-in-time copy" in out
    await compare_images(src.workdir / "src.raw", target)
    assert "qmpkit-target" not in {n.node_name for n in await src.nodes.nodes()}


async def test_then_leave_exits_in_ready_with_the_job_running(src):
    await src.nodes.add_image("dst", 32 * MiB)
    code, out, err = await run("mirror", "--qmp", qmp(src), "--device", "src",
                               "--target", "dst", "--then", "leave", "--copy-mode",
                               "write-blocking")
    assert code == 0, err
    assert "left running in READY" in out
    (job,) = await src.client.execute("query-jobs")
    assert job["status"] == "ready"
    await src.client.execute("job-cancel", {"id": job["id"]})


@pytest.mark.parametrize("args, message", [
    (["--granularity", "3000"], "--granularity: must be a power of two in [512 B, 64 MiB]"),
    (["--granularity", "128M"], "--granularity: must be a power of two in [512 B, 64 MiB]"),
    (["--buf-size", "-5"], "--buf-size: must be >= 0"),
    (["--speed", "-1"], "--speed: must be >= 0"),
    (["--speed", "fast"], "--speed: expected a rate"),
    (["--sync", "bitmap"], "argument --sync: invalid choice: 'bitmap'"),
    (["--on-target-error", "panic"], "argument --on-target-error: invalid choice"),
    (["--copy-mode", "x"], "argument --copy-mode: invalid choice"),
    (["--job-id", "9lives"], "--job-id: must be a letter, then letters"),
    (["--then", "leave", "--until", "done"], "--then leave cannot be combined with --until done"),
    (["--filter-node-name", "f" * 40], "--filter-node-name: must be at most 31 characters"),
])
async def test_bad_arguments_exit_2_with_one_clear_line_and_start_nothing(src, args, message):
    await src.nodes.add_image("dst", 32 * MiB)
    code, out, err = await run("mirror", "--qmp", qmp(src), "--device", "src",
                               "--target", "dst", *args)
    assert code == 2
    assert message in err
    assert "Traceback" not in err + out
    assert await src.client.execute("query-jobs") == []


async def test_qemu_refusal_exits_1_with_qemus_message(src):
    code, out, err = await run("mirror", "--qmp", qmp(src), "--device", "src",
                               "--target", "nosuch")
    assert code == 1
    assert err.strip() == ("qmpkit: QEMU refused blockdev-mirror: "
                           "Cannot find device='nosuch' nor node-name='nosuch'")


async def test_small_target_exits_2(src):
    await src.nodes.add_image("small", 8 * MiB)
    code, out, err = await run("mirror", "--qmp", qmp(src), "--device", "src",
                               "--target", "small")
    assert code == 2 and "target: 'small' holds 8 MiB" in err
    assert await src.client.execute("query-jobs") == []


async def test_timeout_exits_3_and_cancels_the_job(src):
    await src.nodes.add_image("dst", 32 * MiB)
    code, out, err = await run("mirror", "--qmp", qmp(src), "--device", "src",
                               "--target", "dst", "--speed", "1M", "--timeout", "1")
    assert code == 3
    assert "timed out after" in out and "become ready" in out
    assert "cancelled; the source is untouched" in out
    assert await src.client.execute("query-jobs") == []


async def test_failed_job_exits_1_and_shows_the_error_event(src):
    await src.nodes.add_blkdebug("bad", size=32 * MiB, errno="EIO")
    code, out, err = await run("mirror", "--qmp", qmp(src), "--device", "src",
                               "--target", "bad", "--job-id", "j1")
    assert code == 1
    assert "error: write error on job j1, action report" in out
    assert "job 'j1' failed (last status running): Input/output error" in out


async def test_unreachable_qmp_exits_1(tmp_path):
    code, out, err = await run("mirror", "--qmp", str(tmp_path / "none.sock"), "--device", "a",
                               "--target", "b")
    assert code == 1 and "cannot connect to QMP" in err and "Traceback" not in err


async def test_nodes_lists_the_graph(src):
    code, out, err = await run("nodes", "--qmp", qmp(src))
    assert code == 0, err
    assert out.splitlines()[0].split() == ["NODE", "DRIVER", "SIZE", "FILE"]
    assert any(line.split()[:4] == ["src", "raw", "32", "MiB"] for line in out.splitlines())


async def test_help_explains_every_option():
    code, out, _ = await run("mirror", "--help")
    assert code == 0
    for opt in ("--qmp", "--device", "--target", "--target-file", "--target-format", "--create",
                "--job-id", "--sync", "--granularity", "--buf-size", "--speed", "--copy-mode",
                "--on-source-error", "--on-target-error", "--replaces", "--filter-node-name",
                "--until", "--then", "--timeout", "--no-auto-finalize", "--no-auto-dismiss"):
        assert opt in out, opt
    code, out, _ = await run("--help")
    assert code == 0 and "mirror" in out and "nodes" in out


def test_progress_bar_on_a_terminal():
    import io
    from qmpkit.cli import Progress
    buf = io.StringIO()
    p = Progress(buf, tty=True)
    p.update("running", 16 * MiB, 64 * MiB)
    p.update("running", 32 * MiB, 64 * MiB)
    p.end()
    text = buf.getvalue()
    assert text.count("\r[") == 2 and "50.0%" in text and "32 MiB / 64 MiB" in text
    plain = io.StringIO()
    q = Progress(plain, tty=False)
    q.update("running", 1, 2)
    q.update("running", 2, 2)          # same second: no second line
    assert plain.getvalue().count("\n") == 1 and "\r" not in plain.getvalue()
