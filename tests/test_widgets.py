"""The widget panels without a browser: set values, click, and check QEMU."""

from __future__ import annotations

import asyncio

import pytest

from qmpkit import ArgumentError
from qmpkit.widgets import Dashboard, MirrorPanel, TargetPanel, WorkloadPanel

MiB = 1 << 20


async def click(panel, button):
    button.click()
    assert panel.last_task is not None
    return await asyncio.wait_for(panel.last_task, 60)


async def test_target_panel_creates_nodes_and_shows_the_graph(qemu):
    panel = TargetPanel(qemu, size="16M")
    panel.kind.value = "throttled"
    panel.limit.value = 50
    src, dst = await click(panel, panel.create_button)
    assert (src, dst) == ("src", "dst")
    names = {n.node_name: n.driver for n in await qemu.nodes.nodes()}
    assert names["dst"] == "throttle" and names["src"] == "raw" and names["dst-disk"] == "raw"
    assert "<td>dst</td><td>throttle</td><td>16 MiB</td>" in panel.graph.value
    assert "created src (16 MiB) and a throttled target dst" in panel.message.value


async def test_target_panel_refuses_bad_input_before_creating_anything(qemu):
    panel = TargetPanel(qemu, size="lots")
    with pytest.raises(ArgumentError, match="size"):
        await panel.create()
    assert "size: expected a size" in panel.message.value
    assert await qemu.nodes.nodes() == []
    panel.size.value, panel.kind.value, panel.uri.value = "4M", "nbd", ""
    panel.create_button.click()
    with pytest.raises(ArgumentError):
        await panel.last_task
    assert "uri" in panel.message.value


def test_mirror_panel_refuses_invalid_values_in_the_panel():
    panel = MirrorPanel(qemu=None)         # no QEMU needed to refuse
    panel.granularity.value = "3000"
    assert panel.start_button.disabled
    assert "granularity: must be a power of two in [512 B, 64 MiB]" in panel.message.value
    panel.granularity.value = "4K"
    assert not panel.start_button.disabled and panel.message.value == ""
    panel.buf_size.value = "-1"
    assert panel.start_button.disabled and "buf-size: must be &gt;= 0" in panel.message.value
    panel.buf_size.value = ""
    panel.job_id.value = "9x"
    assert panel.start_button.disabled and "job-id" in panel.message.value


async def test_mirror_panel_start_pause_slider_complete(qemu):
    await qemu.nodes.add_image("src", 64 * MiB, fill="mixed")
    await qemu.nodes.add_image("dst", 64 * MiB)
    panel = MirrorPanel(qemu, hz=20)
    dash = Dashboard(panel, fps=4)
    panel.granularity.value = "4K"
    panel.buf_size.value = "1M"
    panel.speed.value = "8M"
    panel.copy_mode.value = "background"
    panel.job_id.value = "widget-job"
    job = await click(panel, panel.start_button)
    assert job.arguments == {"job-id": "widget-job", "device": "src", "target": "dst",
                             "sync": "full", "granularity": 4096, "buf-size": MiB,
                             "speed": 8 * MiB, "copy-mode": "background"}
    assert panel.speed_slider.value == 8
    assert panel.complete_button.disabled               # not READY yet
    await click(panel, panel.pause_button)
    assert (await job.info())["status"] == "paused"
    assert panel.pause_button.description == "Resume"
    assert "widget-job: paused" in panel.status.value
    await dash.wait_frames(2, timeout=20)                 # it redraws while the job lives
    first = dash.convergence.value
    await click(panel, panel.pause_button)               # Resume
    assert (await job.info())["status"] == "running"
    panel.speed_slider.value = 40                         # moved by a person, or a cell
    await asyncio.wait_for(panel.last_task, 30)
    assert (await job.block_info())["speed"] == 40 * MiB
    panel.speed_slider.value = 0
    await asyncio.wait_for(panel.last_task, 30)
    await panel.wait_ready(timeout=60)
    assert not panel.complete_button.disabled
    await dash.wait_frames(dash.frames + 1, timeout=20)
    assert dash.convergence.value[:4] == b"\x89PNG" and dash.convergence.value != first
    await click(panel, panel.complete_button)
    assert job.state.end.value == "completed"
    assert "ended: completed" in panel.status.value
    await dash.stop()
    await qemu.verify("src", "dst")
    assert panel.recording.trace().ready_time() is not None


async def test_workload_panel_runs_fio(qemu):
    await qemu.nodes.add_image("src", 16 * MiB)
    load = WorkloadPanel(qemu, rate="2M")
    await click(load, load.start_button)
    assert load.runner.running and load.stop_button.disabled is False
    await asyncio.sleep(0.5)                  # the guest writes for half a second
    result = await click(load, load.stop_button)
    assert result.write_bytes > 0 and not load.runner.running
    assert "p99" in load.message.value
    load.bs.value = "1000"
    with pytest.raises(ArgumentError, match="bs"):
        await load.start()


async def test_dashboard_saves_a_trace(qemu, tmp_path):
    await qemu.nodes.add_image("src", 16 * MiB, fill="mixed")
    await qemu.nodes.add_image("dst", 16 * MiB)
    panel = MirrorPanel(qemu)
    dash = Dashboard(panel, folder=str(tmp_path / "t"))
    with pytest.raises(ArgumentError, match="nothing recorded"):
        await dash.save()
    await panel.start()
    await panel.wait_ready(timeout=60)
    await panel.cancel()
    folder = await click(dash, dash.save_button)
    assert (folder / "trace.csv").exists() and (folder / "summary.json").exists()


async def test_sweep_panel_refuses_a_bad_grid_before_any_run(tmp_path):
    from qmpkit.widgets import SweepPanel, recommendation_html
    panel = SweepPanel(out=str(tmp_path / "s"), granularity="4K,3000")
    panel.run_button.click()
    with pytest.raises(ArgumentError, match="granularity"):
        await panel.last_task
    assert "granularity: must be a power of two" in panel.message.value
    assert not (tmp_path / "s").exists()
    assert "No recommendation" in recommendation_html({"chosen": None, "reasons": ["x"]})


async def test_the_status_line_shows_the_last_error_event(qemu):
    await qemu.nodes.add_image("src", 16 * MiB, fill="mixed")
    await qemu.nodes.add_blkdebug("dst", size=16 * MiB, errno="ENOSPC", once=True)
    panel = MirrorPanel(qemu)
    panel.on_target_error.value = "stop"
    job = await click(panel, panel.start_button)
    await job.wait_status("paused", timeout=30)
    panel._update_status()
    assert "last error: write error, action stop" in panel.status.value
    assert panel.pause_button.description == "Resume"
    await click(panel, panel.pause_button)
    await panel.wait_ready(timeout=60)
    await click(panel, panel.complete_button)
    assert panel.verified is True
