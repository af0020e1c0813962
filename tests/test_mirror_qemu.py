"""blockdev-mirror on a real qemu-storage-daemon: every argument, every control."""

from __future__ import annotations

import asyncio

import pytest
from helpers import progress, sha256

from qmpkit import (ArgumentError, JobEnd, JobFailedError, JobTimeoutError, QemuCommandError,
                    VerifyError, compare_images)
from qmpkit.images import image_map, run_tool

MiB = 1 << 20
SIZE = 64 * MiB


async def nbd_write(qemu, node, offset, length, pattern):
    """Write into a node the way a guest would: through an NBD export of it."""
    uri = await qemu.nodes.export_nbd(node)
    await run_tool(["qemu-io", "-f", "raw", "-c", f"write -P {pattern} {offset} {length}", uri])
    await qemu.nodes.unexport_nbd(node)


async def test_full_mirror_ready_complete_verify(qemu):
    await qemu.nodes.add_image("src", SIZE, fill="mixed")
    await qemu.nodes.add_image("dst", SIZE, fmt="qcow2")
    job = await qemu.mirror(device="src", target="dst", granularity="4K", buf_size="1M")
    await job.wait_ready(timeout=60)
    assert job.state.ready and job.state.status == "ready"
    assert job.state.offset == SIZE
    assert await job.complete(timeout=60) is JobEnd.COMPLETED
    assert await job.info() is None                      # auto-dismissed
    await qemu.verify("src", "dst")
    names = [e["event"] for e in job.state.events]
    assert "BLOCK_JOB_READY" in names and names[-1] == "JOB_STATUS_CHANGE"
    assert job.state.status == "null"


async def test_verify_catches_a_difference(qemu):
    await qemu.nodes.add_image("a", 4 * MiB, fill="mixed")
    await qemu.nodes.add_image("b", 4 * MiB, fill=7)
    with pytest.raises(VerifyError, match="Content mismatch"):
        await qemu.verify("a", "b")


async def test_sync_top_copies_only_the_overlay(qemu, tmp_path):
    await qemu.nodes.add_image("base", SIZE, fill="mixed")
    await qemu.nodes.add_overlay("top", "base")
    await nbd_write(qemu, "top", 3 * MiB, MiB, 0x5A)       # only this is in the overlay
    top_file, _ = await qemu.image_of("top")
    base_file, _ = await qemu.image_of("base")
    from qmpkit import create_image
    await create_image(tmp_path / "dst.qcow2", SIZE, fmt="qcow2", backing=base_file,
                       backing_fmt="raw")
    await qemu.nodes.add_file("dst", tmp_path / "dst.qcow2", fmt="qcow2", backing="base")
    job = await qemu.mirror(device="top", target="dst", sync="top")
    await job.wait_ready(timeout=60)
    await job.complete(timeout=60)
    extents = await image_map(tmp_path / "dst.qcow2", fmt="qcow2")
    own = [(e["start"], e["length"]) for e in extents if e["depth"] == 0 and e["data"]]
    assert own == [(3 * MiB, MiB)], extents
    await compare_images(top_file, tmp_path / "dst.qcow2", fmt_a="qcow2", fmt_b="qcow2")


async def test_sync_none_copies_only_new_writes(qemu, tmp_path):
    await qemu.nodes.add_image("src", SIZE, fill="mixed")
    await qemu.nodes.add_image("dst", SIZE)
    job = await qemu.mirror(device="src", target="dst", sync="none")
    await job.wait_ready(timeout=60)
    await nbd_write(qemu, "src", 5 * MiB, 64 * 1024, 0xC3)
    await job.complete(timeout=60)
    data = (qemu.workdir / "dst.raw").read_bytes()
    assert data[5 * MiB:5 * MiB + 65536] == b"\xc3" * 65536
    rest = data[:5 * MiB] + data[5 * MiB + 65536:]
    assert rest.count(0) == len(rest)                   # nothing else was copied


async def test_replaces_repairs_a_quorum_child(qemu):
    """QEMU iotest 041's quorum repair: the new node takes a child's place."""
    for name in ("q0", "q1", "q2"):
        await qemu.nodes.add_image(name, 16 * MiB, fill=0x42)
    await qemu.nodes.add({"driver": "quorum", "node-name": "quorum0", "vote-threshold": 2,
                          "children": ["q0", "q1", "q2"]})
    await qemu.nodes.add_image("repair", 16 * MiB)
    job = await qemu.mirror(device="quorum0", target="repair", replaces="q1", job_id="fix")
    await job.wait_ready(timeout=60)
    await job.complete(timeout=60)
    graph = await qemu.client.execute("x-debug-query-block-graph")
    ids = {n["id"]: n["name"] for n in graph["nodes"]}
    children = {e["name"]: ids[e["child"]] for e in graph["edges"]
                if ids[e["parent"]] == "quorum0"}
    assert children == {"children.0": "q0", "children.1": "repair", "children.2": "q2"}


async def test_speed_and_live_set_speed(qemu):
    await qemu.nodes.add_image("src", SIZE, fill="mixed")
    await qemu.nodes.add_image("dst", SIZE)
    limit = 2 * MiB
    job = await qemu.mirror(device="src", target="dst", speed=limit, buf_size="1M",
                            granularity="64K")
    assert (await job.block_info())["speed"] == limit
    loop = asyncio.get_running_loop()
    await asyncio.sleep(0.5)                      # sampling, not waiting for an event
    t0, p0 = loop.time(), await progress(job)
    await asyncio.sleep(1.5)
    t1, p1 = loop.time(), await progress(job)
    limited = (p1 - p0) / (t1 - t0)
    # A busy machine can only make it slower: the limit is an upper bound.
    assert limited < 2 * limit, f"{limited / MiB:.1f} MiB/s with a {limit / MiB} MiB/s limit"
    await job.set_speed(0)
    assert (await job.block_info())["speed"] == 0
    t2, p2 = loop.time(), await progress(job)
    await job.wait_ready(timeout=60)              # the rest, unlimited
    t3 = loop.time()
    unlimited = (SIZE - p2) / (t3 - t2)
    assert unlimited > 2 * limited, (limited, unlimited)
    await job.cancel(timeout=30)


async def test_pause_and_resume(qemu):
    await qemu.nodes.add_image("src", SIZE, fill="mixed")
    await qemu.nodes.add_image("dst", SIZE)
    job = await qemu.mirror(device="src", target="dst", speed="4M")
    await job.pause(timeout=30)
    assert job.state.status == "paused"
    p0 = await progress(job)
    await asyncio.sleep(0.5)
    assert await progress(job) == p0              # nothing moves while paused
    await job.resume(timeout=30)
    await job.set_speed(0)
    await job.wait_ready(timeout=60)
    assert [e["data"]["status"] for e in job.state.events
            if e["event"] == "JOB_STATUS_CHANGE"][:4] == ["created", "running", "paused", "running"]
    await job.complete(timeout=60)
    await qemu.verify("src", "dst")


async def test_cancel_before_ready_leaves_the_source_unchanged(qemu, tmp_path):
    await qemu.nodes.add_image("src", SIZE, fill="mixed")
    await qemu.nodes.add_image("dst", SIZE)
    before = sha256(qemu.workdir / "src.raw")
    job = await qemu.mirror(device="src", target="dst", speed="1M")
    await job.wait_status("running", timeout=10)
    assert await job.cancel(timeout=30) is JobEnd.CANCELLED
    assert not job.state.ready
    assert sha256(qemu.workdir / "src.raw") == before
    assert await qemu.client.execute("query-jobs") == []


async def test_target_error_stop_pauses_reports_and_resumes(qemu, tmp_path):
    await qemu.nodes.add_image("src", 16 * MiB, fill="mixed")
    await qemu.nodes.add_blkdebug("dst", size=16 * MiB, errno="ENOSPC", once=True)
    job = await qemu.mirror(device="src", target="dst", on_target_error="stop")
    await job.wait_status("paused", timeout=30)
    assert job.state.errors == [{"device": "src", "operation": "write", "action": "stop"}]
    assert (await job.block_info())["io-status"] == "nospace"
    await job.resume(timeout=30)                  # blkdebug `once`: the fault is gone
    await job.wait_ready(timeout=60)
    await job.complete(timeout=60)
    await compare_images(qemu.workdir / "src.raw", qemu.workdir / "dst.raw")


async def test_a_failing_job_raises_with_qemus_message_even_when_dismissed(qemu):
    await qemu.nodes.add_image("src", 16 * MiB, fill="mixed")
    await qemu.nodes.add_blkdebug("dst", size=16 * MiB, errno="EIO")
    job = await qemu.mirror(device="src", target="dst", on_target_error="report",
                            job_id="doomed")
    with pytest.raises(JobFailedError) as ei:
        await job.wait_ready(timeout=30)
    err = ei.value
    assert err.job_id == "doomed"
    assert err.message == "Input/output error"
    assert err.last_status == "running"
    assert err.errors and err.errors[0]["operation"] == "write"
    assert await qemu.client.execute("query-jobs") == []   # auto-dismissed, yet not silent


async def test_source_read_error_is_reported(qemu, tmp_path):
    from qmpkit import create_image
    await create_image(qemu.workdir / "src.raw", 16 * MiB, fill="mixed")
    await qemu.nodes.add_blkdebug("src", qemu.workdir / "src.raw", errno="EIO", io="read",
                                  once=True)
    await qemu.nodes.add_image("dst", 16 * MiB)
    job = await qemu.mirror(device="src", target="dst", on_source_error="stop")
    await job.wait_status("paused", timeout=30)
    assert job.state.errors[0]["operation"] == "read"
    await job.resume(timeout=30)
    await job.wait_ready(timeout=60)
    await job.complete(timeout=60)
    await compare_images(qemu.workdir / "src.raw", qemu.workdir / "dst.raw")


async def test_manual_finalize_and_dismiss_with_filter_and_write_blocking(qemu):
    await qemu.nodes.add_image("src", SIZE, fill="mixed")
    await qemu.nodes.add_image("dst", SIZE)
    job = await qemu.mirror(device="src", target="dst", copy_mode="write-blocking",
                            filter_node_name="mfilter", auto_finalize=False,
                            auto_dismiss=False)
    await job.wait_ready(timeout=60)
    names = {n.node_name: n.driver for n in await qemu.nodes.nodes()}
    assert names["mfilter"] == "mirror_top"
    assert await job.complete(timeout=60) is JobEnd.COMPLETED
    statuses = [e["data"]["status"] for e in job.state.events if e["event"] == "JOB_STATUS_CHANGE"]
    # QEMU waited for qmpkit's finalize (pending) and dismiss (concluded).
    assert statuses[-3:] == ["pending", "concluded", "null"]
    await qemu.verify("src", "dst")


async def test_complete_before_ready_is_refused_by_qemu(qemu):
    await qemu.nodes.add_image("src", SIZE, fill="mixed")
    await qemu.nodes.add_image("dst", SIZE)
    job = await qemu.mirror(device="src", target="dst", speed="1M")
    with pytest.raises(QemuCommandError) as ei:
        await job.complete()
    assert ei.value.command == "job-complete"
    assert "cannot accept command verb 'complete'" in ei.value.desc
    await job.cancel(timeout=30)


async def test_wait_timeout_names_what_it_waited_for(qemu):
    await qemu.nodes.add_image("src", SIZE, fill="mixed")
    await qemu.nodes.add_image("dst", SIZE)
    job = await qemu.mirror(device="src", target="dst", speed="1M", job_id="slow")
    with pytest.raises(JobTimeoutError) as ei:
        await job.wait_ready(timeout=0.3)
    assert ei.value.waiting_for == "become ready" and ei.value.job_id == "slow"
    assert "timed out after 0.3 s waiting for job 'slow' to become ready" in str(ei.value)
    await job.cancel(timeout=30)


async def test_small_target_is_refused_before_the_job_starts(qemu):
    await qemu.nodes.add_image("src", SIZE)
    await qemu.nodes.add_image("dst", 10 * MiB)
    with pytest.raises(ArgumentError) as ei:
        await qemu.mirror(device="src", target="dst")
    assert ei.value.argument == "target"
    assert "10 MiB" in str(ei.value) and "64 MiB" in str(ei.value)
    assert await qemu.client.execute("query-jobs") == []


@pytest.mark.parametrize("kwargs, message", [
    ({"target": "nosuch"}, "Cannot find device='nosuch' nor node-name='nosuch'"),
    ({"device": "nosuch"}, "Cannot find device='nosuch' nor node-name='nosuch'"),
])
async def test_qemu_refusals_reach_the_user_word_for_word(qemu, kwargs, message):
    await qemu.nodes.add_image("src", MiB)
    await qemu.nodes.add_image("dst", MiB)
    with pytest.raises(QemuCommandError) as ei:
        await qemu.mirror(**{"device": "src", "target": "dst", **kwargs})
    assert ei.value.desc == message and ei.value.command == "blockdev-mirror"
    assert ei.value.arguments["target"] == kwargs.get("target", "dst")


@pytest.mark.parametrize("kwargs, argument", [
    ({"granularity": 3000}, "granularity"), ({"buf_size": -5}, "buf_size"),
    ({"speed": -1}, "speed"), ({"sync": "bitmap"}, "sync"),
])
async def test_bad_arguments_never_reach_qemu(qemu, kwargs, argument):
    await qemu.nodes.add_image("src", MiB)
    await qemu.nodes.add_image("dst", MiB)
    with pytest.raises(ArgumentError) as ei:
        await qemu.mirror(device="src", target="dst", **kwargs)
    assert ei.value.argument == argument
    assert await qemu.client.execute("query-jobs") == []
