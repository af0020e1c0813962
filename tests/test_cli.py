"""The `qmpkit` command, run as a user runs it, against a real daemon."""

from __future__ import annotations


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
    assert out.splitlines()[0].split() == ["NODE", "DRIVER", "SIZE", "DEVICE", "JOB", "EXPORT",
                                           "FILE"]
    assert any(line.split()[:4] == ["src", "raw", "32", "MiB"] for line in out.splitlines())


async def test_nodes_shows_the_job_the_export_and_the_throttled_file(src, tmp_path):
    import json
    await src.nodes.add_image("disk", 32 * MiB, path=tmp_path / "disk.raw")
    await src.nodes.add_throttled("dst", "disk", bps_write="1M")
    await src.nodes.export_nbd("src")
    job = await src.mirror(device="src", target="dst", job_id="m")
    code, out, err = await run("nodes", "--qmp", qmp(src), "--json")
    await job.cancel()
    assert code == 0, err
    rows = {r["node"]: r for r in json.loads(out)}
    assert rows["dst"]["file"] == str(tmp_path / "disk.raw")    # not a json:{...} string
    assert rows["dst"]["job"] == "m (target)" and rows["src"]["job"] == "m (source)"
    filt = next(r for r in rows.values() if r["driver"] == "mirror_top")
    assert filt["export"] == "exp-src"


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
    assert text.count("\r[") == 2 and "50.0%" in text and "32 MiB/64 MiB" in text
    plain = io.StringIO()
    q = Progress(plain, tty=False)
    q.update("running", 1, 2)
    q.update("running", 2, 2)          # same second: no second line
    assert plain.getvalue().count("\n") == 1 and "\r" not in plain.getvalue()


def test_the_progress_line_fits_80_columns_and_explains_recopies():
    import io
    from qmpkit.cli import Progress
    buf = io.StringIO()
    p = Progress(buf, tty=True, width=80)
    p.update("running", 1380 * MiB, 1400 * MiB,
             "not converging (+220 MiB/s) and a very long note that would wrap", rate=82 * MiB,
             t_s=12.3, dirty=640 * MiB, disk=1024 * MiB)
    line = buf.getvalue().split("\r")[-1].replace("\x1b[K", "")
    assert len(line) <= 79
    assert "12.3s  copying  98.6%  dirty 640 MiB  82 MiB/s  not converging" in line
    wide = io.StringIO()
    Progress(wide, tty=False, width=200).update("running", 1380 * MiB, 1400 * MiB,
                                                disk=1024 * MiB)
    assert "1.3 GiB/1.4 GiB (1.35x disk: recopies)" in wide.getvalue()
    plain = io.StringIO()
    Progress(plain, tty=False, width=80).update("ready", 10, 10, "in sync", rate=0, t_s=1,
                                                dirty=0)
    assert "in sync" in plain.getvalue() and len(plain.getvalue().rstrip("\n")) <= 80


async def test_mirror_json_and_the_end_of_run_report(src, tmp_path):
    import json
    code, out, err = await run("mirror", "--qmp", qmp(src), "--device", "src",
                               "--target-file", str(tmp_path / "n.raw"), "--create",
                               "--json")
    assert code == 0, err
    rep = json.loads(out)                       # stdout holds the JSON alone
    assert rep["completed"] is True and rep["bytes_copied"] >= 32 * MiB
    assert rep["disk_bytes"] == 32 * MiB and rep["time_to_ready_s"] > 0
    assert set(rep) >= {"amplification", "mean_throughput_bps", "peak_throughput_bps",
                        "peak_dirty_bytes", "total_s", "guest_write_p99_ms"}
    assert "READY: job src is in sync" in err   # the messages went to stderr
    code, out, err = await run("mirror", "--qmp", qmp(src), "--device", "src",
                               "--target-file", str(tmp_path / "m.raw"), "--create")
    assert code == 0, err
    assert "  time        READY after" in out and "  copied      32 MiB" in out


async def test_sweep_and_demo_json(tmp_path):
    import json
    code, out, err = await run("sweep", "--granularity", "4K", "--buf-size", "1M",
                               "--size", "8M", "--no-load", "--repeat", "1", "--json",
                               "--out", str(tmp_path / "s"), timeout=300)
    assert code == 0, err
    data = json.loads(out)
    assert {r["label"] for r in data["summary"]} >= {"granularity 4 KiB, buf-size 1 MiB, "
                                                     "background"}
    assert "granularity" in data["recommendation"]


async def test_embedded_mirror_stops_early_on_a_setting_that_cannot_converge(tmp_path):
    """64 KiB chunks under 4 KiB random writes into a slow target: the default
    --early-stop ends it with the forecast's reason and a hint, long before --timeout."""
    import time
    t0 = time.monotonic()
    code, out, err = await run("mirror", "--size", "64M", "--target-speed", "16M",
                               "--load-rate", "4M", "--granularity", "64K",
                               "--early-stop", "3", "--timeout", "120", timeout=120)
    assert code == 3, out + err
    assert "stopped early: the forecast said '" in out
    assert "not converging" in out or "too close to call" in out
    assert "Try --granularity 4K" in out
    assert time.monotonic() - t0 < 60


async def test_target_node_options_on_the_command_line(src, tmp_path):
    code, out, err = await run("mirror", "--qmp", qmp(src), "--device", "src",
                               "--target-file", str(tmp_path / "n.raw"), "--create",
                               "--target-aio", "native", "--target-cache-direct", "on",
                               "--target-detect-zeroes", "unmap",
                               "--target-preallocation", "falloc", "--then", "leave")
    assert code == 0, out + err
    nodes = {n["node-name"]: n for n in
             await src.client.execute("query-named-block-nodes", {"flat": True})}
    assert nodes["qmpkit-src-file"]["cache"]["direct"] is True
    assert nodes["qmpkit-src"]["detect_zeroes"] == "unmap"
    await src.client.execute("job-cancel", {"id": "src"})
    code, out, err = await run("mirror", "--qmp", qmp(src), "--device", "src",
                               "--target-file", str(tmp_path / "m.raw"), "--create",
                               "--target-aio", "native")
    assert code == 2 and "--target-aio: aio=native needs cache.direct=on" in err, err
    assert not (tmp_path / "m.raw").exists()
    code, out, err = await run("mirror", "--size", "8M", "--no-load", "--target-aio", "io_uring")
    assert code == 2 and "need --target-file" in err


def test_the_report_and_the_progress_line_say_what_they_mean():
    import io

    from qmpkit.cli import Progress, report_text
    rep = {"time_to_ready_s": 13.0, "total_s": 13.2, "bytes_copied": 256 * MiB,
           "amplification": 1.0, "disk_bytes": 256 * MiB, "mean_throughput_bps": 19.5 * MiB,
           "peak_throughput_bps": 159.2 * MiB, "speed_bps": 20 * MiB,
           "peak_dirty_bytes": 240 * MiB, "guest_write_p99_ms": None, "error_events": 0}
    text = report_text(rep)
    assert "peak 159.2 MiB/s (above --speed: QEMU lets the first buf-size through" in text
    assert "(the job's bitmap: what was left to copy at most)" in text
    assert "above --speed" not in report_text({**rep, "speed_bps": None})
    ops = {"ops": 256, "mean_op_bytes": MiB, "waits_for_a_slot": 245,
           "mean_in_flight_when_waiting": 1.0, "throttled_slices": 0}
    assert ("QEMU        256 copy operations of 1 MiB on average; waited 245 times for a "
            "free slot or buffer (1.0 in flight)") in report_text({**rep, "qemu_ops": ops})
    buf = io.StringIO()
    Progress(buf, tty=False).update("running", 256 * MiB, 256 * MiB, t_s=13.0, dirty=0)
    assert "in sync" in buf.getvalue() and "copying" not in buf.getvalue()


async def test_qemu_trace_says_why_a_mirror_runs_at_its_rate(tmp_path):
    """--qemu-trace: QEMU's own mirror_* events, summarized. buf-size 1 MiB allows
    one 1 MiB operation in flight; QEMU's 16 MiB default allows up to 16."""
    import json
    results = {}
    for buf in ("1M", "16M"):
        code, out, err = await run("mirror", "--size", "128M", "--no-load", "--target-speed",
                                   "0", "--granularity", "64K", "--buf-size", buf,
                                   "--qemu-trace", "--json", timeout=120)
        assert code == 0, err
        results[buf] = json.loads(out)["qemu_ops"]
    one, many = results["1M"], results["16M"]
    assert one["ops"] >= 128 and one["mean_op_bytes"] == MiB
    assert one["mean_in_flight_when_waiting"] == pytest.approx(1.0)
    assert many["mean_in_flight_when_waiting"] > 4
