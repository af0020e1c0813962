"""Faults on a real qemu-storage-daemon: I/O errors under each policy, a dying QEMU,
a dropped QMP connection, many mirrors at once, and what cancel/complete leave behind."""

from __future__ import annotations

import asyncio

import pytest
from helpers import sha256

from qmpkit import (Client, JobFailedError, QmpConnectionError, Qemu, QmpkitError,
                    compare_images)
from qmpkit.record import Recorder
from qmpkit.trace import Trace

MiB = 1 << 20


@pytest.mark.parametrize("errno", ["ENOSPC", "EIO"])
@pytest.mark.parametrize("policy", ["report", "ignore", "stop", "enospc"])
async def test_target_write_errors_under_each_policy(qemu, errno, policy):
    """What QEMU documents for on-target-error: report fails the job; ignore goes on;
    stop pauses it; enospc pauses on ENOSPC and reports other errors."""
    await qemu.nodes.add_image("src", 16 * MiB, fill="mixed")
    await qemu.nodes.add_blkdebug("dst", size=16 * MiB, errno=errno, once=True)
    job = await qemu.mirror(device="src", target="dst", on_target_error=policy)
    pauses = policy == "stop" or (policy == "enospc" and errno == "ENOSPC")
    fails = policy == "report" or (policy == "enospc" and errno == "EIO")
    if pauses:
        await job.wait_status("paused", timeout=30)
        assert (await job.block_info())["io-status"] == ("nospace" if errno == "ENOSPC"
                                                         else "failed")
        await job.resume(timeout=30)           # `once`: the fault is gone
    if fails:
        with pytest.raises(JobFailedError) as ei:
            await job.wait_ready(timeout=30)
        assert ei.value.errors[0]["action"] == "report"
        return
    await job.wait_ready(timeout=60)
    error = job.state.errors[0]
    assert error["operation"] == "write"
    assert error["action"] == ("ignore" if policy == "ignore" else "stop")
    await job.complete(timeout=60)
    if policy != "ignore":                     # ignore skips the failed write: no promise
        await compare_images(qemu.workdir / "src.raw", qemu.workdir / "dst.raw")


@pytest.mark.parametrize("policy", ["report", "stop"])
async def test_source_read_errors(qemu, tmp_path, policy):
    from qmpkit import create_image
    await create_image(tmp_path / "s.raw", 16 * MiB, fill="mixed")
    await qemu.nodes.add_blkdebug("src", tmp_path / "s.raw", errno="EIO", io="read", once=True)
    await qemu.nodes.add_image("dst", 16 * MiB)
    job = await qemu.mirror(device="src", target="dst", on_source_error=policy)
    if policy == "report":
        with pytest.raises(JobFailedError, match="Input/output error"):
            await job.wait_ready(timeout=30)
        assert job.state.errors[0]["operation"] == "read"
        return
    await job.wait_status("paused", timeout=30)
    await job.resume(timeout=30)
    await job.wait_ready(timeout=60)
    await job.complete(timeout=60)
    await compare_images(tmp_path / "s.raw", qemu.workdir / "dst.raw")


async def test_qemu_killed_mid_mirror_is_a_clear_bounded_error(tmp_path):
    qemu = await Qemu.open(workdir=tmp_path)
    try:
        await qemu.nodes.add_image("src", 64 * MiB, fill="mixed")
        await qemu.nodes.add_image("dst", 64 * MiB)
        job = await qemu.mirror(device="src", target="dst", speed="4M")
        recorder = Recorder(qemu.client, hz=20)
        rec = recorder.add(job)
        await job.wait_status("running", timeout=10)
        await recorder.sample()
        recorder.start()
        qemu.daemon.kill()                     # by its PID
        with pytest.raises(QmpConnectionError, match="connection lost while waiting"):
            await job.wait_ready(timeout=30)   # raised as soon as the socket closes
        try:                                   # the sampler may or may not have hit the
            await recorder.stop()              # dead socket yet: either way it stops
        except QmpkitError as exc:
            assert "not connected" in str(exc) or "lost" in str(exc)
        folder = rec.trace().save(tmp_path / "trace")
        assert len(Trace.load(folder).samples) >= 1
    finally:
        await qemu.close()
    assert qemu.daemon.returncode == -9
    assert list(tmp_path.glob("qmpkit-*")) == []   # nothing left behind


async def test_a_dropped_qmp_connection_is_reattached_by_job_id(qemu):
    await qemu.nodes.add_image("src", 64 * MiB, fill="mixed")
    await qemu.nodes.add_image("dst", 64 * MiB)
    side = await Client.attach(str(qemu.daemon.monitor_path(1)))
    job = await qemu.mirror(device="src", target="dst", speed="8M", job_id="keep")
    recorder = Recorder(qemu.client, hz=20)
    rec = recorder.add(job)
    await job.wait_status("running", timeout=10)
    await recorder.sample()                             # recorded before the drop
    recorder.start()
    # The connection the job was watched on goes away; QEMU and the job go on.
    await job.client.close()
    with pytest.raises(QmpConnectionError):
        await job.wait_ready(timeout=5)
    before = len(rec.samples)
    await job.reattach(side)
    await recorder.reattach(side)
    assert job.state.status == "running" and job.client is side
    await job.set_speed(0)
    await job.wait_ready(timeout=60)
    await recorder.stop()
    assert before >= 1 and len(rec.samples) > before    # the recording went on
    assert rec.samples[-1].t_s > rec.samples[before - 1].t_s
    assert rec.samples[-1].current_progress > rec.samples[before - 1].current_progress
    jobs = await side.execute("query-jobs")
    assert [j["id"] for j in jobs] == ["keep"]          # not lost, not started twice
    await job.complete(timeout=60)
    await side.close()


async def test_eight_mirrors_at_once_one_failing(qemu):
    for i in range(8):
        await qemu.nodes.add_image(f"s{i}", 16 * MiB, fill="mixed")
        if i == 3:
            await qemu.nodes.add_blkdebug(f"d{i}", size=16 * MiB, errno="EIO")
        else:
            await qemu.nodes.add_image(f"d{i}", 16 * MiB)
    jobs = [await qemu.mirror(device=f"s{i}", target=f"d{i}", job_id=f"m{i}", speed="8M")
            for i in range(8)]
    recorder = Recorder(qemu.client, hz=10)
    recs = [recorder.add(j) for j in jobs]
    async with recorder:
        await jobs[5].pause()
        for j in jobs:
            if j is not jobs[5]:
                await j.set_speed(0)
        results = await asyncio.gather(*(j.wait_ready(timeout=60) for j in jobs
                                          if j is not jobs[5]), return_exceptions=True)
        assert (await jobs[5].info())["status"] == "paused"   # controlled on its own
        await jobs[5].resume()
        await jobs[5].set_speed(0)
        await jobs[5].wait_ready(timeout=60)
    failed = [r for r in results if isinstance(r, BaseException)]
    assert len(failed) == 1 and isinstance(failed[0], JobFailedError)
    assert failed[0].job_id == "m3"
    for i, j in enumerate(jobs):
        if i != 3:
            await j.complete(timeout=60)
            await qemu.verify(f"s{i}", f"d{i}")
            assert recs[i].samples and recs[i].trace().ready_time() is not None
    assert recs[3].trace().summary.get("error") == "Input/output error"


async def test_cancel_in_ready_leaves_a_point_in_time_copy(qemu):
    await qemu.nodes.add_image("src", 32 * MiB, fill="mixed")
    await qemu.nodes.add_image("dst", 32 * MiB)
    before = sha256(qemu.workdir / "src.raw")
    job = await qemu.mirror(device="src", target="dst")
    await job.wait_ready(timeout=60)
    await job.cancel(force=False, timeout=60)
    assert job.state.end.value == "completed" and job.state.failure() is None
    await compare_images(qemu.workdir / "src.raw", qemu.workdir / "dst.raw")
    assert sha256(qemu.workdir / "src.raw") == before


@pytest.mark.parametrize("case", ["busy", "read-only"])
async def test_qemu_refusals_reach_the_user_word_for_word(qemu, tmp_path, case):
    from qmpkit import QemuCommandError, create_image
    await qemu.nodes.add_image("src", 16 * MiB, fill="mixed")
    if case == "busy":
        await qemu.nodes.add_image("dst", 16 * MiB)
        await qemu.nodes.add_image("dst2", 16 * MiB)
        first = await qemu.mirror(device="src", target="dst", speed="1M")
        with pytest.raises(QemuCommandError) as ei:
            await qemu.mirror(device="src", target="dst2", job_id="second")
        # src is now under the mirror's filter node: QEMU 7.2's own words
        assert ei.value.desc == "Need a root block node"
        await first.cancel(timeout=30)
    else:
        await create_image(tmp_path / "ro.raw", 16 * MiB)
        await qemu.nodes.add_file("ro", tmp_path / "ro.raw", read_only=True)
        with pytest.raises(QemuCommandError) as ei:
            await qemu.mirror(device="src", target="ro")
        assert "read-only" in ei.value.desc.lower() or "permission" in ei.value.desc.lower()
    assert ei.value.command == "blockdev-mirror"
    assert str(ei.value) == f"QEMU refused blockdev-mirror: {ei.value.desc}"
