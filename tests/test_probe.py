"""The probe on real QEMU: what it measures, and that it never leaves a bitmap behind."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
from pathlib import Path

import pytest
from helpers import run_cli as run

from qmpkit import ArgumentError, Qemu
from qmpkit.aio import within
from qmpkit.probe import PREFIX, Profile, probe, stale_bitmaps
from qmpkit.workload import FioLoad, FioRunner

MiB = 1 << 20
QMPKIT = str(Path(sys.executable).parent / "qmpkit")


async def probe_bitmaps(qemu: Qemu) -> list[str]:
    nodes = await qemu.client.execute("query-named-block-nodes", {"flat": True})
    return [b["name"] for n in nodes for b in n.get("dirty-bitmaps", [])
            if str(b.get("name", "")).startswith(PREFIX)]


async def test_the_probe_sees_fios_random_writes(qemu):
    """4 KiB random writes: at 4 KiB granularity each write dirties a new chunk
    (the disk is large against what is written), so the new-dirty rate is the
    write rate; at 64 KiB each 4 KiB write dirties 64 KiB."""
    await qemu.nodes.add_image("src", 512 * MiB)
    fio = FioRunner(FioLoad(rw="randwrite", bs="4K", rate="8M", latency_log=False),
                    await qemu.nodes.export_nbd("src"), qemu.workdir / "fio")
    await fio.start()
    await asyncio.sleep(0.5)

    async def none() -> tuple[int, int]:
        return 0, 0
    try:
        profile = await probe(qemu, "src", granularities=["4K", "64K"], seconds=4,
                              write_counter=none)
    finally:
        result = await fio.stop()
    assert result is not None
    assert 0.8 * result.write_bw_bps <= profile.dirty_bps(4096) <= 1.2 * result.write_bw_bps
    assert profile.dirty_bps(65536) > 4 * profile.dirty_bps(4096)
    assert await probe_bitmaps(qemu) == []
    # the profile as data, back and forth
    again = Profile.from_dict(json.loads(json.dumps(profile.to_dict())))
    assert again.curves == profile.curves


async def test_refusals_come_before_any_bitmap(qemu):
    await qemu.nodes.add_image("src", 16 * MiB)
    with pytest.raises(ArgumentError, match="granularity: must be a power of 2"):
        await probe(qemu, "src", granularities=[3000], seconds=2)
    with pytest.raises(ArgumentError, match="no write statistics"):
        await probe(qemu, "src", seconds=2)         # no device counts this node's writes
    with pytest.raises(ArgumentError, match="no node or device 'nope'"):
        await probe(qemu, "nope", seconds=2)
    await qemu.nodes.add_image("ro", 16 * MiB)
    await qemu.client.execute("blockdev-reopen", {"options": [{
        "driver": "raw", "node-name": "ro", "read-only": True, "file": "ro-file"}]})
    with pytest.raises(ArgumentError, match="read-only"):
        await probe(qemu, "ro", seconds=2)
    assert await probe_bitmaps(qemu) == []


async def test_a_timeout_or_an_error_removes_the_bitmaps(qemu):
    await qemu.nodes.add_image("src", 16 * MiB)

    async def none() -> tuple[int, int]:
        return 0, 0
    with pytest.raises(TimeoutError):
        await within(probe(qemu, "src", seconds=30, write_counter=none), 1.5)
    assert await probe_bitmaps(qemu) == []

    def boom(profile: Profile) -> None:
        raise RuntimeError("the caller's callback failed")
    with pytest.raises(RuntimeError):
        await probe(qemu, "src", seconds=5, write_counter=none, on_tick=boom)
    assert await probe_bitmaps(qemu) == []


async def _guest_writes(qemu: Qemu, stop: asyncio.Event) -> None:
    """Guest-like 4 KiB random writes through the VM's drive (HMP qemu-io
    aio_write: counted in the device's blockstats, as a guest's writes are)."""
    rnd = random.Random(7)
    while not stop.is_set():
        off = rnd.randrange(0, 64 * MiB // 4096) * 4096
        await qemu.client.execute("human-monitor-command", {
            "command-line": f'qemu-io vd0 "aio_write -P 7 {off} 4k"'})
        await asyncio.sleep(0.005)


@pytest.fixture
async def drive_vm(vm_factory, tmp_path):
    disk = tmp_path / "d.img"
    with open(disk, "wb") as f:
        f.truncate(64 * MiB)
    vm = vm_factory([disk])
    qemu = await vm.connect()
    stop = asyncio.Event()
    writer = asyncio.ensure_future(_guest_writes(qemu, stop))
    yield vm, qemu
    stop.set()
    await writer
    await qemu.close()


async def test_the_probe_on_a_drive_vm(drive_vm):
    """A VM started with -drive (auto node names): probed by its drive id."""
    vm, qemu = drive_vm
    code, out, err = await run("probe", "--qmp", str(vm.qmp2), "--device", "vd0",
                               "--seconds", "4", "--granularity", "4K,1M", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["node"].startswith("#block")
    assert data["write_bps"] > 0
    g4k, g1m = data["granularities"]
    assert g4k["granularity"] == 4096 and g1m["granularity"] == MiB
    # random 4 KiB writes over 64 MiB: new chunks at about the write rate at 4 KiB
    assert 0.75 * data["write_bps"] <= g4k["dirty_bps"] <= 1.25 * data["write_bps"]
    assert g1m["dirty_bps"] > 2 * g4k["dirty_bps"]
    assert await probe_bitmaps(qemu) == []
    code, out, err = await run("advise", "--qmp", str(vm.qmp2), "--device", "vd0",
                               "--seconds", "3", "--granularity", "4K,64K",
                               "--target-speed", "100M")
    assert code == 0, err
    assert "best: qmpkit mirror --qmp" in out and "--granularity 4K" in out, out
    assert await probe_bitmaps(qemu) == []


async def until_all_bitmaps(qemu: Qemu) -> None:
    """Wait (bounded) until a probe has added its five bitmaps."""
    for _ in range(200):
        if len(await probe_bitmaps(qemu)) == 5:
            return
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
async def test_ctrl_c_and_sigterm_remove_the_bitmaps(drive_vm, sig, code):
    vm, qemu = drive_vm
    proc = await asyncio.create_subprocess_exec(
        QMPKIT, "probe", "--qmp", str(vm.qmp2), "--device", "vd0", "--seconds", "60",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        await until_all_bitmaps(qemu)
        assert len(await probe_bitmaps(qemu)) == 5
        proc.send_signal(sig)
        await within(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == code
    assert await probe_bitmaps(qemu) == []


async def test_a_killed_probe_is_listed_and_cleaned(drive_vm):
    vm, qemu = drive_vm
    proc = await asyncio.create_subprocess_exec(
        QMPKIT, "probe", "--qmp", str(vm.qmp2), "--device", "vd0", "--seconds", "60",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        await until_all_bitmaps(qemu)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
    left = await stale_bitmaps(qemu)
    assert len(left) == 5
    code, out, err = await run("nodes", "--qmp", str(vm.qmp2))
    assert code == 0 and err.count("stale probe bitmap") == 5 and "--clean" in err
    code, out, err = await run("probe", "--qmp", str(vm.qmp2), "--clean")
    assert code == 0 and out.count("removed qmpkit-probe-") == 5
    assert await probe_bitmaps(qemu) == []
