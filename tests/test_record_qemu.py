"""Recording a mirror under a real fio load on a real qemu-storage-daemon."""

from __future__ import annotations

import asyncio

import pytest

from qmpkit import ToolError
from qmpkit.experiment import Setup, run_experiment
from qmpkit.record import Recorder
from qmpkit.trace import Trace
from qmpkit.workload import FioLoad, FioRunner

MiB = 1 << 20


async def test_trace_under_a_fio_load(qemu, tmp_path):
    size = 64 * MiB
    await qemu.nodes.add_image("src", size, fill="mixed")
    await qemu.nodes.add_image("disk", size)
    await qemu.nodes.add_throttled("dst", "disk", bps_write="32M")
    uri = await qemu.nodes.export_nbd("src")
    fio = FioRunner(FioLoad(rate="4M", bs="4K", latency_log=True), uri, tmp_path / "fio")
    await fio.start()
    try:
        recorder = Recorder(qemu.client, hz=20)
        job = await qemu.mirror(device="src", target="dst", granularity="4K")
        rec = recorder.add(job, meta={"disk_bytes": size})
        async with recorder:
            await job.wait_ready(timeout=60)
            await asyncio.sleep(0.5)              # keep sampling in READY
        result = await fio.stop()
    finally:
        await fio.kill()
    await job.complete(timeout=60)
    await qemu.verify("src", "disk")

    trace = rec.trace(completed=True, verified=True)
    s = trace.samples
    assert len(s) >= 20
    # The guest's writes grow the work: total_progress rises past the disk size.
    assert s[0].total_progress <= s[-1].total_progress
    assert s[-1].total_progress > size
    assert all(a.current_progress <= b.current_progress for a, b in zip(s, s[1:]))
    # The dirty bitmap was found and counted, and it falls to near zero at READY.
    dirty = [x.dirty_bytes for x in s if x.dirty_bytes is not None]
    assert len(dirty) == len(s) and max(dirty) > size // 2
    ready_t = trace.ready_time()
    assert ready_t is not None
    after = [x.dirty_bytes for x in s if ready_t <= x.t_s <= ready_t + 0.5]
    assert after and min(after) <= MiB, after
    # READY comes from the event; the samples' status agrees with it.
    status_ready = [e["t_s"] for e in trace.events if e["event"] == "JOB_STATUS_CHANGE"
                    and e["data"]["status"] == "ready"]
    assert status_ready and abs(status_ready[0] - ready_t) < 0.05
    assert all(x.t_s <= ready_t + 0.1 for x in s if x.status == "running")
    assert all(x.t_s >= ready_t - 0.1 for x in s if x.status == "ready")
    assert trace.summary["achieved_hz"] > 10
    assert max(x.throughput_bps for x in s) > 0
    # fio's view of the same run
    assert result.write_bytes > 0 and result.write_iops > 0
    assert result.write_p99_us >= result.write_p50_us > 0
    assert len(result.latency_log) >= 5


async def test_sampler_holds_50_hz_on_one_job(qemu):
    await qemu.nodes.add_image("src", 64 * MiB, fill="mixed")
    await qemu.nodes.add_image("dst", 64 * MiB)
    job = await qemu.mirror(device="src", target="dst", speed="16M")
    recorder = Recorder(qemu.client, hz=50)
    rec = recorder.add(job)
    async with recorder:
        await asyncio.sleep(1.5)
    await job.cancel(timeout=30)
    # The rate is a promise of the sampler's scheduling, measured on its own samples.
    assert rec.trace().summary["achieved_hz"] >= 45


async def test_fio_failure_is_reported(tmp_path):
    runner = FioRunner(FioLoad(), f"nbd+unix:///x?socket={tmp_path}/none.sock", tmp_path)
    with pytest.raises(ToolError, match="fio exited before it wrote anything") as ei:
        await runner.start()
    assert "nbd" in ei.value.output.lower()
    assert runner.pid is not None and not runner.running


def test_bad_load_settings_are_refused():
    from qmpkit import ArgumentError
    for kwargs, arg in [({"rw": "read"}, "rw"), ({"bs": "3000"}, "bs"), ({"iodepth": 0}, "iodepth"),
                        ({"rate": -1}, "rate"), ({"seed": -2}, "seed")]:
        with pytest.raises(ArgumentError) as ei:
            FioLoad(**kwargs)
        assert ei.value.argument == arg


async def test_run_experiment_saves_a_complete_trace_folder(tmp_path):
    out = tmp_path / "run"
    result = await run_experiment(
        setup=Setup(size="32M", target_speed="32M"), load=FioLoad(rate="2M", latency_log=True),
        mirror={"granularity": "4K"}, time_limit=60, hz=10, out=out, label="g4k",
        base_dir=tmp_path)
    assert result.converged
    loaded = Trace.load(out)
    s = loaded.summary
    assert s["converged"] and s["completed"] and s["verified"] is True
    assert s["params"]["granularity"] == 4096 and s["workload"]["rw"] == "randwrite"
    assert s["guest"]["write_bytes"] > 0 and s["offline_copy_bps"] > 0
    assert loaded.meta["qemu_version"].startswith(("7.", "8.", "9.", "10."))
    assert loaded.fio_latency and loaded.samples
    assert [e["event"] for e in loaded.events].count("BLOCK_JOB_COMPLETED") == 1
    assert list(tmp_path.glob("qmpkit-*")) == []          # the daemon's dir is gone


async def test_a_run_past_its_time_limit_is_censored_and_the_source_kept(tmp_path):
    out = tmp_path / "slow"
    result = await run_experiment(
        setup=Setup(size="64M", target_speed="4M"), load=None, mirror={}, time_limit=1.0,
        out=out, base_dir=tmp_path)
    assert not result.converged
    s = Trace.load(out).summary
    assert s["converged"] is False and s["time_to_ready_s"] is None
    assert s["completed"] is False and s["verified"] is None
    assert 0 < s["bytes_copied"] < 64 * MiB


async def test_slow_bitmap_reads_are_thinned_out(qemu, monkeypatch):
    """On a big graph (query-named-block-nodes slower than 10 ms) the Recorder reads
    the bitmaps only every k-th tick, within its time budget; progress every tick."""
    import qmpkit.record
    monkeypatch.setattr(qmpkit.record, "SLOW_BITMAP_READ_S", 0.0)   # every read is "slow"
    await qemu.nodes.add_image("src", 16 * MiB, fill="mixed")
    await qemu.nodes.add_null("dst", 16 * MiB)
    job = await qemu.mirror(device="src", target="dst", speed="1M")
    rec = Recorder(qemu.client, hz=50, dirty_budget=0.01)
    recording = rec.add(job)
    for _ in range(30):
        await rec.sample()
    await job.cancel(timeout=30)
    assert rec.dirty_every > 1
    with_dirty = [s for s in recording.samples if s.dirty_bytes is not None]
    assert len(recording.samples) == 30 and 1 <= len(with_dirty) <= 15
    assert all(s.remaining_bytes >= 0 for s in recording.samples)
