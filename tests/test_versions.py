"""Features of newer QEMU, detected from QEMU's schema (issue #12), and job control
after the fact (issue #13). Each test runs on QEMU 7.2 (the host) and QEMU 10
(the Debian 13 root of `make test-matrix`): where a feature is missing, the test
asserts the "needs QEMU >= 8.2" refusal; where it is there, it asserts the feature."""

from __future__ import annotations

import json

import pytest

from helpers import run_cli

from qmpkit.capabilities import Capabilities
from qmpkit.errors import UnsupportedError
from qmpkit.lifecycle import MirrorRun
from qmpkit.trace import COPY_MODE_EVENT
from qmpkit.workload import FioLoad, FioRunner

MiB = 1 << 20


def qmp(qemu) -> str:
    return str(qemu.daemon.monitor_path(1))


def test_capabilities_are_read_from_the_schema_not_the_version():
    schema = [{"name": "query-block-jobs", "meta-type": "command", "ret-type": "[1]",
               "arg-type": "0"},
              {"name": "[1]", "meta-type": "array", "element-type": "1"},
              {"name": "1", "meta-type": "object",
               "members": [{"name": "device"}, {"name": "actively-synced"}]},
              {"name": "block-job-change", "meta-type": "command", "arg-type": "0"},
              {"name": "blockdev-mirror", "meta-type": "command", "arg-type": "2"},
              {"name": "2", "meta-type": "object", "members": [{"name": "device"}]}]
    caps = Capabilities.from_qmp({"qemu": {"major": 7, "minor": 2, "micro": 0}}, schema)
    # a backport into "7.2" still counts: the schema says so
    assert caps.block_job_change and caps.actively_synced and not caps.target_is_zero
    with pytest.raises(UnsupportedError, match=r"x needs QEMU >= 10.1 \(this QEMU is 7.2.0\)"):
        caps.require("target_is_zero", "x")


@pytest.fixture
async def loaded(qemu, tmp_path):
    """A source under 4 KiB random writes, a throttled target: 64 KiB granularity
    cannot converge here."""
    await qemu.nodes.add_image("src", 64 * MiB, fill="mixed")
    await qemu.nodes.add_image("disk", 64 * MiB)
    await qemu.nodes.add_throttled("dst", "disk", bps_write="16M")
    fio = FioRunner(FioLoad(rate="4M", bs="4K"), await qemu.nodes.export_nbd("src"),
                    tmp_path / "fio")
    await fio.start()
    yield qemu
    await fio.kill()


async def test_dirty_bytes_are_seen_while_a_load_runs(loaded):
    """The bitmap sits on the source (7.2) or on the mirror's filter (>= 8.2)."""
    async with MirrorRun(loaded, device="src", target="dst", granularity="64K") as run:
        await run.start()
        assert await run.wait_ready(timeout=4) == "timeout"
        dirty = [s.dirty_bytes for s in run.recording.samples if s.dirty_bytes]
        assert dirty and max(dirty) > 0


async def test_block_job_change_switches_a_stuck_mirror_to_write_blocking(loaded):
    caps = await loaded.client.capabilities()
    async with MirrorRun(loaded, device="src", target="dst", granularity="64K") as run:
        await run.start()
        await run.wait_ready(timeout=2)
        if not caps.block_job_change:
            with pytest.raises(UnsupportedError,
                               match=rf"needs QEMU >= 8.2 \(this QEMU is {caps.version_text}\)"):
                await run.change(copy_mode="write-blocking")
            return
        await run.change(copy_mode="write-blocking")
        assert await run.wait_ready(timeout=60) == "ready"
        await run.recorder.sample()
        assert any(s.actively_synced for s in run.recording.samples)
        assert any(e["event"] == COPY_MODE_EVENT for e in run.trace().events)


async def test_rescue_after_on_the_command_line(qemu, tmp_path):
    caps = await qemu.client.capabilities()
    code, out, err = await run_cli("mirror", "--size", "64M", "--target-speed", "16M",
                                   "--load-rate", "4M", "--granularity", "64K",
                                   "--rescue-after", "2", "--timeout", "60",
                                   "--out", str(tmp_path / "t"), timeout=120)
    if not caps.block_job_change:
        assert code == 2, out + err
        assert f"needs QEMU >= 8.2 (this QEMU is {caps.version_text})" in err
        return
    assert code == 0, out + err
    events = [json.loads(line) for line in
              (tmp_path / "t" / "events.jsonl").read_text().splitlines()]
    (switch,) = [e for e in events if e["event"] == COPY_MODE_EVENT]
    assert switch["data"]["copy-mode"] == "write-blocking"
    assert switch["data"]["reason"].startswith("rescue: not converging")


async def test_jobs_and_job_control_after_the_fact(qemu, tmp_path):
    await qemu.nodes.add_image("src", 32 * MiB, fill="mixed")
    await qemu.nodes.add_image("dst", 32 * MiB)
    code, out, err = await run_cli("mirror", "--qmp", qmp(qemu), "--device", "src",
                                   "--target", "dst", "--then", "leave", "--job-id", "m1")
    assert code == 0, out + err
    code, out, err = await run_cli("jobs", "--qmp", qmp(qemu), "--json")
    assert code == 0, err
    (row,) = json.loads(out)
    assert set(row) >= {"id", "type", "device", "status", "current_progress",
                        "total_progress", "speed", "ready", "paused"}
    assert (row["id"], row["type"], row["device"], row["ready"]) == ("m1", "mirror", "src",
                                                                     True)
    code, out, err = await run_cli("job", "speed", "--qmp", qmp(qemu), "m1", "4M")
    assert code == 0, err
    assert (await qemu.jobs())[0]["speed"] == 4 * MiB
    for action in ("pause", "resume"):
        code, out, err = await run_cli("job", action, "--qmp", qmp(qemu), "m1")
        assert code == 0, out + err
    code, out, err = await run_cli("job", "watch", "--qmp", qmp(qemu), "m1", "--until",
                                   "ready", "--out", str(tmp_path / "w"))
    assert code == 0 and "is ready" in out, out + err
    assert (tmp_path / "w" / "trace.csv").exists()
    # a second mirror of the same device: said plainly, not "Need a root block node"
    await qemu.nodes.add_image("dst2", 32 * MiB)
    code, out, err = await run_cli("mirror", "--qmp", qmp(qemu), "--device", "src",
                                   "--target", "dst2")
    assert code == 2 and "device src already has job m1 (ready); see `qmpkit jobs`" in err
    code, out, err = await run_cli("job", "complete", "--qmp", qmp(qemu), "nosuch")
    assert code == 2 and "no block job 'nosuch'" in err and "m1 (mirror, ready)" in err
    caps = await qemu.client.capabilities()
    code, out, err = await run_cli("job", "change", "--qmp", qmp(qemu), "m1",
                                   "--copy-mode", "write-blocking")
    assert code == (0 if caps.block_job_change else 2), out + err
    if caps.block_job_change:
        # QEMU 10.0 switches only towards write-blocking, and says so
        code, out, err = await run_cli("job", "change", "--qmp", qmp(qemu), "m1",
                                       "--copy-mode", "background")
        assert code == 1 and "Change to copy mode 'background' is not implemented" in err
    else:
        assert "needs QEMU >= 8.2" in err
    code, out, err = await run_cli("job", "complete", "--qmp", qmp(qemu), "m1")
    assert code == 0 and "completed: the device now writes to the target" in out, out + err
    assert await qemu.client.execute("query-jobs") == []


async def test_the_mirror_panel_offers_the_switch_only_where_qemu_has_it(qemu):
    from qmpkit.widgets import MirrorPanel
    await qemu.nodes.add_image("src", 16 * MiB, fill="mixed")
    await qemu.nodes.add_image("dst", 16 * MiB)
    panel = MirrorPanel(qemu)
    panel.speed.value = "1M"
    assert panel.rescue_button.layout.display == "none"      # before Start: unknown
    await panel.start()
    caps = await qemu.client.capabilities()
    if caps.block_job_change:
        assert panel.rescue_button.layout.display == "" and not panel.rescue_button.disabled
        await panel.switch_to_write_blocking()
        assert panel.rescue_button.disabled
        assert "switched to write-blocking" in panel.message.value
    else:
        assert panel.rescue_button.layout.display == "none"
    await panel.cancel()


async def test_job_cancel_after_leave_removes_the_node_an_earlier_qmpkit_added(qemu, tmp_path):
    await qemu.nodes.add_image("src", 16 * MiB, fill="mixed")
    code, out, err = await run_cli("mirror", "--qmp", qmp(qemu), "--device", "src",
                                   "--target-file", str(tmp_path / "n.raw"), "--create",
                                   "--then", "leave")
    assert code == 0, out + err
    assert "qmpkit-src" in {n.node_name for n in await qemu.nodes.nodes()}
    code, out, err = await run_cli("job", "cancel", "--qmp", qmp(qemu), "src")
    assert code == 0 and "ended with a point-in-time copy" in out, out + err
    names = {n.node_name for n in await qemu.nodes.nodes()}
    assert "qmpkit-src" not in names and "qmpkit-src-file" not in names
    assert (tmp_path / "n.raw").exists()                    # the copy stays
