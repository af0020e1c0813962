"""`MirrorRun` on a real qemu-storage-daemon: every exit path leaves the node
graph and the file system as they were, plus the kept target where asked."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from qmpkit import ArgumentError, JobFailedError, compare_images
from qmpkit.lifecycle import MirrorRun

MiB = 1 << 20
SIZE = 16 * MiB


async def node_names(qemu) -> set[str]:
    return {n.node_name for n in await qemu.nodes.nodes()}


def files(folder) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.fixture
async def src(qemu, tmp_path):
    await qemu.nodes.add_image("src", SIZE, fill="mixed", path=tmp_path / "src.raw")
    os.chmod(tmp_path / "src.raw", 0o640)
    return qemu


async def test_completed_keeps_the_target_the_guest_now_runs_on(src, tmp_path):
    before_nodes, before_files = await node_names(src), files(tmp_path)
    target = tmp_path / "new.raw"
    async with MirrorRun(src, device="src", target_file=target, create=True,
                         out=tmp_path / "trace", granularity="64K") as run:
        await run.start()
        assert await run.wait_ready(timeout=60) == "ready"
        await run.complete(verify=True)
    assert run.completed and run.verification.outcome == "verified"
    assert await node_names(src) == before_nodes | {"qmpkit-src", "qmpkit-src-file"}
    assert files(tmp_path) == before_files | {"new.raw", "trace"}
    assert oct(os.stat(target).st_mode & 0o777) == "0o640"     # the source file's mode
    summary = json.loads((tmp_path / "trace" / "summary.json").read_text())
    assert summary["completed"] is True and summary["verified"] is True
    assert "error" not in summary
    await compare_images(tmp_path / "src.raw", target)


async def test_cancelled_before_ready_removes_what_it_made(src, tmp_path):
    before_nodes, before_files = await node_names(src), files(tmp_path)
    run = MirrorRun(src, device="src", target_file=tmp_path / "new.raw", create=True,
                    speed="1M")
    await run.start()
    assert "qmpkit-src" in await node_names(src)
    await run.cancel()
    await run.close()
    assert await node_names(src) == before_nodes
    assert files(tmp_path) == before_files
    assert await src.client.execute("query-jobs") == []


async def test_cancelled_in_ready_keeps_a_point_in_time_copy(src, tmp_path):
    before_nodes, before_files = await node_names(src), files(tmp_path)
    async with MirrorRun(src, device="src", target_file=tmp_path / "copy.raw",
                         create=True) as run:
        await run.start()
        await run.wait_ready(timeout=60)
        await run.cancel()
        assert run.point_in_time_copy
    assert await node_names(src) == before_nodes            # the node is closed
    assert files(tmp_path) == before_files | {"copy.raw"}   # the copy is kept
    await compare_images(tmp_path / "src.raw", tmp_path / "copy.raw")


async def test_failed_job_removes_the_created_target(qemu, tmp_path):
    await qemu.nodes.add_blkdebug("bad", size=SIZE, fill="mixed", io="read", errno="EIO")
    before_nodes, before_files = await node_names(qemu), files(tmp_path)
    run = MirrorRun(qemu, device="bad", target_file=tmp_path / "new.raw", create=True,
                    out=tmp_path / "trace")
    try:
        await run.start()
        with pytest.raises(JobFailedError, match="Input/output error"):
            await run.wait_ready(timeout=60)
    finally:
        await run.close()
    assert await node_names(qemu) == before_nodes
    assert files(tmp_path) == before_files | {"trace"}
    summary = json.loads((tmp_path / "trace" / "summary.json").read_text())
    assert "Input/output error" in summary["error"]


async def test_qemu_died_closes_without_hanging_and_removes_the_file(tmp_path):
    from qmpkit import Qemu
    qemu = await Qemu.open(workdir=tmp_path)
    try:
        await qemu.nodes.add_image("src", SIZE, fill="mixed", path=tmp_path / "src.raw")
        before = files(tmp_path)
        run = MirrorRun(qemu, device="src", target_file=tmp_path / "new.raw", create=True,
                        speed="1M", out=tmp_path / "trace")
        await run.start()
        qemu.daemon.kill()
        await asyncio.wait_for(run.close(), 30)
        assert files(tmp_path) == before | {"trace"}
        assert (tmp_path / "trace" / "trace.csv").exists()
    finally:
        await qemu.close()


async def test_interrupted_run_cancels_the_job_and_says_interrupted(src, tmp_path):
    before_nodes, before_files = await node_names(src), files(tmp_path)
    run = MirrorRun(src, device="src", target_file=tmp_path / "new.raw", create=True,
                    speed="1M", out=tmp_path / "trace")

    async def operator() -> None:
        async with run:
            await run.start()
            await run.wait_ready(timeout=600)

    task = asyncio.ensure_future(operator())
    while run.job is None or not run.recording or not run.recording.samples:
        await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await node_names(src) == before_nodes
    assert files(tmp_path) == before_files | {"trace"}
    assert await src.client.execute("query-jobs") == []
    summary = json.loads((tmp_path / "trace" / "summary.json").read_text())
    assert summary["error"] == "interrupted"


async def test_an_error_in_cleanup_does_not_skip_the_other_steps(src, tmp_path):
    before_nodes, before_files = await node_names(src), files(tmp_path)
    run = MirrorRun(src, device="src", target_file=tmp_path / "new.raw", create=True,
                    speed="1M", out=tmp_path / "trace")
    await run.start()

    async def broken_stop(**_kw) -> None:
        raise RuntimeError("the recorder broke")

    run.recorder.stop = broken_stop
    await run.close(RuntimeError("the caller failed"))
    await run.close()                                   # twice is safe
    assert await node_names(src) == before_nodes
    assert files(tmp_path) == before_files | {"trace"}
    summary = json.loads((tmp_path / "trace" / "summary.json").read_text())
    assert summary["cleanup_errors"] == ["recorder: the recorder broke"]
    assert summary["error"] == "RuntimeError: the caller failed"


async def test_a_file_the_user_gave_is_never_removed(src, tmp_path):
    from qmpkit import create_image
    await create_image(tmp_path / "mine.raw", SIZE)
    run = MirrorRun(src, device="src", target_file=tmp_path / "mine.raw", speed="1M")
    await run.start()
    await run.close(RuntimeError("failed"))
    assert (tmp_path / "mine.raw").exists()
    assert "qmpkit-src" not in await node_names(src)


async def test_left_running_is_neither_cancelled_nor_removed(src, tmp_path):
    run = MirrorRun(src, device="src", target_file=tmp_path / "new.raw", create=True,
                    copy_mode="write-blocking")
    await run.start()
    await run.wait_ready(timeout=60)
    run.leave()
    await run.close()
    (job,) = await src.client.execute("query-jobs")
    assert job["status"] == "ready" and (tmp_path / "new.raw").exists()
    # attach to it later by id, as `qmpkit job watch` does, and complete it
    again = await MirrorRun.attach(src, job["id"])
    assert again.state.ready
    await again.job.complete()
    await again.close()
    assert await src.client.execute("query-jobs") == []
    with pytest.raises(ArgumentError, match="no block job 'nosuch'"):
        await MirrorRun.attach(src, "nosuch")


async def test_bad_input_is_refused_before_anything_starts(src, tmp_path):
    with pytest.raises(ArgumentError, match="sync=top needs a qcow2 target"):
        MirrorRun(src, device="src", target_file=tmp_path / "t.raw", create=True,
                  target_format="raw", sync="top")
    with pytest.raises(ArgumentError, match="out: cannot write"):
        MirrorRun(src, device="src", target="x", out="/proc/version/sub")
    with pytest.raises(ArgumentError, match="granularity"):
        MirrorRun(src, device="src", target="x", granularity=3000)
    assert await src.client.execute("query-jobs") == []


async def test_a_pivot_whose_outcome_is_unknown_keeps_the_target(tmp_path):
    """Found by review: job-complete sent to a QEMU that stopped answering; it runs the
    pivot when it wakes. The created file must still be there (the guest runs on it)."""
    import signal
    from qmpkit import Qemu, QmpConnectionError
    qemu = await Qemu.open(workdir=tmp_path)
    try:
        await qemu.nodes.add_image("src", SIZE, fill="mixed", path=tmp_path / "src.raw")
        target = tmp_path / "new.raw"
        run = MirrorRun(qemu, device="src", target_file=target, create=True)
        await run.start()
        await run.wait_ready(timeout=60)
        qemu.client.command_timeout = 2
        os.kill(qemu.daemon.pid, signal.SIGSTOP)
        try:
            with pytest.raises(QmpConnectionError):
                await run.complete(timeout=5)
            await run.close()
        finally:
            os.kill(qemu.daemon.pid, signal.SIGCONT)
        assert target.exists()
        assert any("the guest may run (or soon run) on the target" in e
                   for e in run.cleanup_errors)
        qemu.client.command_timeout = 30
        for _ in range(300):                                 # QEMU runs the queued pivot
            if await qemu.client.execute("query-jobs") == []:
                break
            await asyncio.sleep(0.1)
        assert await qemu.client.execute("query-jobs") == []
        assert "qmpkit-src" in await node_names(qemu)
    finally:
        await qemu.close()
