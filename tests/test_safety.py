"""Safe on a production VM (issue #10): no silent data loss, no stale job state,
no misleading verification. Each test failed before its fix."""

from __future__ import annotations

import asyncio
import json

import pytest

from helpers import qemu_io, run_cli

from qmpkit import JobEnd, JobFailedError, compare_images, create_image
from qmpkit.images import image_info
from qmpkit.lifecycle import MirrorRun
from qmpkit.workload import FioLoad, FioRunner

MiB = 1 << 20
SIZE = 16 * MiB


def qmp(qemu) -> str:
    return str(qemu.daemon.monitor_path(1))


async def names(qemu) -> set[str]:
    return {n.node_name for n in await qemu.nodes.nodes()}


@pytest.fixture
async def chain(qemu, tmp_path):
    """base.raw (data everywhere) <- top.qcow2 (new data in its first MiB), as node 'top'."""
    base = await create_image(tmp_path / "base.raw", SIZE, fill="mixed")
    await create_image(tmp_path / "top.qcow2", SIZE, fmt="qcow2", backing=base)
    await qemu_io("-f", "qcow2", "-c", "write -P 0xee 0 1M", str(tmp_path / "top.qcow2"))
    await qemu.nodes.add_file("top", tmp_path / "top.qcow2", fmt="qcow2")
    return qemu


# -- 1. --create with sync top / none --------------------------------------------

async def test_create_with_sync_top_backs_the_target_by_the_sources_backing_file(chain, tmp_path):
    target = tmp_path / "new.qcow2"
    code, out, err = await run_cli("mirror", "--qmp", qmp(chain), "--device", "top",
                                   "--target-file", str(target), "--create", "--sync", "top")
    assert code == 0, out + err
    info = await image_info(target)
    assert info["format"] == "qcow2"
    assert info["full-backing-filename"] == str(tmp_path / "base.raw")
    # what the guest now reads through the target equals what it read before
    await compare_images(tmp_path / "top.qcow2", target, fmt_a="qcow2", fmt_b="qcow2")


async def test_create_with_sync_none_backs_the_target_by_the_source(qemu, tmp_path):
    await qemu.nodes.add_image("src", SIZE, fill="mixed", path=tmp_path / "src.raw")
    async with MirrorRun(qemu, device="src", target_file=tmp_path / "new.qcow2", create=True,
                         sync="none") as run:
        await run.start()
        uri = await qemu.nodes.export_nbd("src")          # a guest writes during the job
        await qemu_io("-f", "raw", "-c", "write -P 0x5a 2M 1M", uri)
        await run.wait_ready(timeout=60)
        await run.complete()
    info = await image_info(tmp_path / "new.qcow2")
    assert info["full-backing-filename"] == str(tmp_path / "src.raw")
    await compare_images(tmp_path / "src.raw", tmp_path / "new.qcow2", fmt_b="qcow2")


async def test_a_raw_target_for_sync_top_is_refused_before_anything_starts(chain, tmp_path):
    code, out, err = await run_cli("mirror", "--qmp", qmp(chain), "--device", "top",
                                   "--target-file", str(tmp_path / "x.raw"), "--create",
                                   "--sync", "top", "--target-format", "raw")
    assert code == 2
    assert "--target-format: sync=top needs a qcow2 target" in err and "backing file" in err
    assert not (tmp_path / "x.raw").exists()
    assert await chain.client.execute("query-jobs") == []


async def test_a_target_without_the_chain_is_never_pivoted(chain, tmp_path):
    await chain.nodes.add_image("bare", SIZE, fmt="qcow2")        # no backing file
    before = await names(chain)
    code, out, err = await run_cli("mirror", "--qmp", qmp(chain), "--device", "top",
                                   "--target", "bare", "--sync", "top")
    assert code == 1
    assert "refused to pivot: the target bare has no backing file" in out
    assert "job top cancelled; the source is untouched" in out
    assert await chain.client.execute("query-jobs") == []
    assert await names(chain) == before
    # the device still reads through its own chain
    top = await chain.nodes.node("top")
    assert top.driver == "qcow2"


# -- 2. a writer attached after the mirror started ---------------------------------

async def test_an_export_made_after_the_mirror_started_is_copied(qemu, tmp_path):
    await qemu.nodes.add_image("src", SIZE, fill="mixed", path=tmp_path / "src.raw")
    await qemu.nodes.add_image("disk", SIZE, path=tmp_path / "dst.raw")
    await qemu.nodes.add_throttled("dst", "disk", bps_write="4M")
    job = await qemu.mirror(device="src", target="dst", job_id="m")
    uri = await qemu.nodes.export_nbd("src")
    filt = await qemu.nodes.export_node_of("exp-src")
    assert filt != "src"                                   # above the mirror's filter
    assert (await qemu.nodes.node(filt)).driver == "mirror_top"
    await qemu_io("-f", "raw", "-c", "write -P 0xab 8M 2M", uri)
    await job.wait_ready(timeout=60)
    await job.complete(timeout=60)
    assert await qemu.nodes.export_node_of("exp-src") == "dst"     # followed the pivot
    await qemu.nodes.unexport_nbd("src")
    await compare_images(tmp_path / "src.raw", tmp_path / "dst.raw")


# -- 3. output paths checked first ---------------------------------------------------

@pytest.mark.parametrize("command", [
    ["mirror", "--qmp", "QMP", "--device", "src", "--target", "dst"],
    ["mirror", "--size", "8M", "--no-load"],
    ["demo", "--size", "8M"],
    ["sweep", "--size", "8M", "--repeat", "1"],
])
@pytest.mark.parametrize("bad", ["/etc/passwd/sub", "/proc/version/x"])
async def test_an_unwritable_out_exits_2_before_anything_starts(qemu, command, bad):
    await qemu.nodes.add_image("src", SIZE)
    await qemu.nodes.add_image("dst", SIZE)
    args = [qmp(qemu) if a == "QMP" else a for a in command]
    code, out, err = await run_cli(*args, "--out", bad, timeout=60)
    assert code == 2, out + err
    assert err.startswith("qmpkit: error: --out: cannot write to") and err.count("\n") == 1
    assert "Traceback" not in out + err
    assert await qemu.client.execute("query-jobs") == []


async def test_plot_into_an_unwritable_out_exits_2(tmp_path):
    code, out, err = await run_cli("plot", str(tmp_path), "--out", "/etc/passwd/sub")
    assert code == 2 and "--out: cannot write" in err


# -- 4. verification only of a quiet source ----------------------------------------

async def test_verify_while_the_guest_writes_says_cannot_verify_never_mismatch(qemu, tmp_path):
    await qemu.nodes.add_image("src", SIZE, fill="mixed", path=tmp_path / "src.raw")
    uri = await qemu.nodes.export_nbd("src")
    fio = FioRunner(FioLoad(rate="2M", bs="4K"), uri, tmp_path / "fio")
    await fio.start()
    try:
        code, out, err = await run_cli("mirror", "--qmp", qmp(qemu), "--device", "src",
                                       "--target-file", str(tmp_path / "new.raw"), "--create",
                                       "--granularity", "4K", "--verify")
    finally:
        await fio.stop()
    assert code == 4, out + err
    assert "cannot verify: the disks were written during the compare" in out
    assert "mismatch" not in out and "NOT verified" not in out


async def test_verify_a_point_in_time_copy_of_a_quiet_source(qemu, tmp_path):
    await qemu.nodes.add_image("src", SIZE, fill="mixed")
    code, out, err = await run_cli("mirror", "--qmp", qmp(qemu), "--device", "src",
                                   "--target-file", str(tmp_path / "copy.raw"), "--create",
                                   "--then", "cancel", "--verify")
    assert code == 0, out + err
    assert "verified: source and target hold the same data" in out


async def test_pause_guest_to_verify_needs_a_vm(qemu, tmp_path):
    await qemu.nodes.add_image("src", SIZE)
    code, out, err = await run_cli("mirror", "--qmp", qmp(qemu), "--device", "src",
                                   "--target-file", str(tmp_path / "c.raw"), "--create",
                                   "--verify", "--pause-guest-to-verify")
    assert code == 2 and "needs a VM" in err
    assert not (tmp_path / "c.raw").exists()


# -- 5.-8. job state ------------------------------------------------------------------

async def test_wait_status_concluded_after_completion(qemu):
    await qemu.nodes.add_image("src", SIZE, fill="mixed")
    await qemu.nodes.add_image("dst", SIZE)
    job = await qemu.mirror(device="src", target="dst", auto_dismiss=False)
    await job.wait_ready(timeout=60)
    await job.client.execute("job-complete", {"id": job.job_id})
    assert await job.wait_status("concluded", timeout=30) == "concluded"
    await job.dismiss()
    await job.abandon()


async def test_finalize_then_wait_done_finalizes_once(qemu):
    await qemu.nodes.add_image("src", SIZE, fill="mixed")
    await qemu.nodes.add_image("dst", SIZE)
    job = await qemu.mirror(device="src", target="dst", auto_finalize=False)
    await job.wait_ready(timeout=60)
    await job.complete(timeout=None)
    await job.wait_status("pending", timeout=30)
    await job.finalize()
    assert await job.wait_done(timeout=30) is JobEnd.COMPLETED


async def test_soft_cancel_in_ready_returns_what_qemu_reports(qemu):
    await qemu.nodes.add_image("src", SIZE, fill="mixed")
    await qemu.nodes.add_image("dst", SIZE)
    job = await qemu.mirror(device="src", target="dst")
    await job.wait_ready(timeout=60)
    assert await job.cancel(force=False) is JobEnd.COMPLETED
    assert [e for e in job.state.events if e["event"] == "BLOCK_JOB_COMPLETED"]


async def test_a_refused_mirror_leaves_no_task_behind(qemu):
    await qemu.nodes.add_image("src", SIZE)
    before = set(asyncio.all_tasks())
    from qmpkit import QemuCommandError
    with pytest.raises(QemuCommandError):
        await qemu.mirror(device="src", target="nosuch")
    await asyncio.sleep(0)
    assert set(asyncio.all_tasks()) - before == set()


async def test_wait_event_on_the_job_and_the_client(qemu):
    await qemu.nodes.add_image("src", SIZE, fill="mixed")
    await qemu.nodes.add_image("dst", SIZE)
    job = await qemu.mirror(device="src", target="dst", job_id="w")
    ev = await job.wait_event("BLOCK_JOB_READY", {"device": "w"}, timeout=60)
    assert ev["data"]["len"] == SIZE
    waiting = asyncio.ensure_future(qemu.client.wait_event(
        "JOB_STATUS_CHANGE", {"status": "null"}, timeout=30))
    await asyncio.sleep(0)
    await job.complete()
    assert (await waiting)["data"]["id"] == "w"


# -- 9.-11. names on a real VM ------------------------------------------------------------

async def test_a_drive_vm_with_two_disks_mirrored_disk_after_disk(vm_factory, tmp_path):
    disks = []
    for i in (0, 1):
        disks.append(await create_image(tmp_path / f"disk{i}.raw", SIZE, fill="mixed"))
    vm = vm_factory(disks)
    qemu = await vm.connect()
    try:
        for i in (0, 1):
            code, out, err = await run_cli("mirror", "--qmp", str(vm.qmp2), "--device",
                                           f"vd{i}", "--target-file",
                                           str(tmp_path / f"new{i}.raw"), "--create",
                                           "--verify")
            assert code == 0, out + err
            assert "verified" in out
        blocks = {b["device"]: b["inserted"] for b in await qemu.client.execute("query-block")}
        assert blocks["vd0"]["node-name"] == "qmpkit-vd0"
        assert blocks["vd1"]["node-name"] == "qmpkit-vd1"
        assert blocks["vd1"]["file"] == str(tmp_path / "new1.raw")
        for i in (0, 1):
            await compare_images(disks[i], tmp_path / f"new{i}.raw")
        # once more on vd0: the name qmpkit-vd0 is taken by the running disk now
        code, out, err = await run_cli("mirror", "--qmp", str(vm.qmp2), "--device", "vd0",
                                       "--target-file", str(tmp_path / "again.raw"),
                                       "--create")
        assert code == 0, out + err
        blocks = {b["device"]: b["inserted"] for b in await qemu.client.execute("query-block")}
        assert blocks["vd0"]["node-name"] == "qmpkit-vd0-2"
    finally:
        await qemu.close()


async def test_an_auto_named_node_gets_a_valid_job_id(vm_factory, tmp_path):
    disk = await create_image(tmp_path / "d.raw", SIZE, fill="mixed")
    vm = vm_factory([disk])
    qemu = await vm.connect()
    try:
        code, out, err = await run_cli("nodes", "--qmp", str(vm.qmp2))
        auto = next(line.split()[0] for line in out.splitlines()
                    if line.startswith("#block") and " raw " in line)
        code, out, err = await run_cli("mirror", "--qmp", str(vm.qmp2), "--device", auto,
                                       "--target-file", str(tmp_path / "n.raw"), "--create",
                                       "--then", "cancel")
        assert code == 0, out + err
        assert f"job mirror-{auto[1:]} ended with a point-in-time copy" in out
    finally:
        await qemu.close()


async def test_create_for_a_zero_length_device(qemu, tmp_path):
    await create_image(tmp_path / "empty.raw", 0, allow_empty=True)
    await qemu.nodes.add_file("empty", tmp_path / "empty.raw")
    code, out, err = await run_cli("mirror", "--qmp", qmp(qemu), "--device", "empty",
                                   "--target-file", str(tmp_path / "copy.raw"), "--create")
    assert code == 0, out + err
    assert (tmp_path / "copy.raw").stat().st_size == 0


# -- the block-graph API a tester of QEMU's mirror needs ------------------------------------

async def test_quorum_repair_through_the_api(qemu):
    for name in ("q0", "q1", "q2"):
        await qemu.nodes.add_image(name, SIZE, fill=0x42)
    await qemu.nodes.add_quorum("quorum0", ["q0", "q1", "q2"], vote_threshold=2)
    await qemu.nodes.add_image("repair", SIZE)
    job = await qemu.mirror(device="quorum0", target="repair", replaces="q1")
    await job.wait_ready(timeout=60)
    await job.complete()
    assert set(await qemu.nodes.children("quorum0")) == {"children.0", "children.1",
                                                         "children.2"}
    assert (await qemu.nodes.children("quorum0"))["children.1"] == "repair"
    from qmpkit import ArgumentError
    with pytest.raises(ArgumentError, match=r"vote_threshold: must be an integer in \[1, 3\]"):
        await qemu.nodes.add_quorum("q", ["q0", "q2", "repair"], vote_threshold=4)


async def test_discard_unmap_reaches_the_file(qemu, tmp_path):
    await qemu.nodes.add_image("d", SIZE, fill="mixed", path=tmp_path / "d.raw", discard="unmap")
    before = (tmp_path / "d.raw").stat().st_blocks
    uri = await qemu.nodes.export_nbd("d")
    await qemu_io("-f", "raw", "-c", "discard 0 8M", uri)
    assert (tmp_path / "d.raw").stat().st_blocks < before   # holes punched in the file


async def test_blkdebug_rules_fail_one_read_then_succeed(qemu):
    await qemu.nodes.add_blkdebug("flaky", size=SIZE, fill="mixed",
                                  rules=[{"event": "read_aio", "errno": "EIO", "once": True}])
    await qemu.nodes.add_image("dst", SIZE)
    job = await qemu.mirror(device="flaky", target="dst", on_source_error="stop")
    await job.wait_status("paused", timeout=30)
    assert job.state.errors[0]["operation"] == "read"
    await job.resume()
    await job.wait_ready(timeout=60)
    await job.cancel()


async def test_resize_a_node(qemu):
    await qemu.nodes.add_image("r", SIZE)
    await qemu.nodes.resize("r", 2 * SIZE)
    assert (await qemu.nodes.node("r")).size == 2 * SIZE


async def test_the_trace_of_a_refused_pivot_says_why(chain, tmp_path):
    await chain.nodes.add_image("bare", SIZE, fmt="qcow2")
    async with MirrorRun(chain, device="top", target="bare", sync="top",
                         out=tmp_path / "t") as run:
        await run.start()
        await run.wait_ready(timeout=60)
        with pytest.raises(JobFailedError, match="refused to pivot"):
            await run.complete()
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert summary["error"].startswith("refused to pivot: the target bare has no backing")
    assert summary["completed"] is not True


@pytest.mark.parametrize("running", [True, False])
async def test_pause_guest_to_verify_on_a_vm_restores_its_run_state(vm_factory, tmp_path,
                                                                    running):
    """A -blockdev VM: the guest is paused around the pivot and the compare, then runs
    again; a VM that was stopped before (-S) is left stopped."""
    disk = await create_image(tmp_path / "d.raw", SIZE, fill="mixed")
    vm = vm_factory([disk], blockdev=True, paused=not running)
    qemu = await vm.connect()
    try:
        assert (await qemu.client.execute("query-status"))["running"] is running
        code, out, err = await run_cli("mirror", "--qmp", str(vm.qmp2), "--device", "disk0",
                                       "--target-file", str(tmp_path / "n.raw"), "--create",
                                       "--verify", "--pause-guest-to-verify")
        assert code == 0, out + err
        assert "verified: source and target hold the same data" in out
        assert (await qemu.client.execute("query-status"))["running"] is running
        blocks = {b["qdev"]: b["inserted"]["node-name"]
                  for b in await qemu.client.execute("query-block")}
        assert list(blocks.values()) == ["qmpkit-disk0"]
    finally:
        await qemu.close()


async def test_the_mirror_panel_never_shows_a_false_mismatch(qemu, tmp_path):
    """Complete with the load still writing: the panel says "cannot verify", not red."""
    from qmpkit.widgets import MirrorPanel, WorkloadPanel
    await qemu.nodes.add_image("src", SIZE, fill="mixed")
    await qemu.nodes.add_image("dst", SIZE)
    load = WorkloadPanel(qemu, rate="2M")
    mirror = MirrorPanel(qemu)
    mirror.granularity.value = "4K"
    await mirror.start()
    await load.start()                      # after Start: the order of the buttons is free
    await mirror.wait_ready(timeout=60)
    await mirror.complete()
    await load.stop()
    assert mirror.verified is None
    assert "cannot verify" in mirror.message.value and "b00020" not in mirror.message.value
    assert "NOT verified" not in mirror.status_text()
