"""Sweeps: the grid, the plan, the recommendation (pure), and a real small sweep."""

from __future__ import annotations

import asyncio
import json
import math

import pandas as pd
import pytest
from test_cli import run

from qmpkit import ArgumentError
from qmpkit.experiment import Setup
from qmpkit.sweep import (
    Config,
    aggregate,
    grid,
    heatmap_figures,
    plan_runs,
    recommend,
    rounded,
    run_sweep,
)
from qmpkit.units import format_latency
from qmpkit.workload import FioLoad

MiB = 1 << 20


def test_grid_checks_values_and_always_holds_the_defaults():
    configs = grid(granularity=["4K", "64K"], buf_size=["1M"])
    assert Config() in configs and len(configs) == 3
    assert Config(granularity=4096, buf_size=MiB) in configs
    with pytest.raises(ArgumentError, match="granularity: must be a power of two"):
        grid(granularity=[3000])
    with pytest.raises(ArgumentError, match="copy_mode"):
        grid(copy_mode=["sync"])
    with pytest.raises(ArgumentError, match="buf_size"):
        grid(buf_size=["-1"])


def test_the_same_seed_gives_the_same_shuffled_plan():
    configs = grid(granularity=["4K", "64K", "1M"], buf_size=["1M", "16M"])
    a, b = plan_runs(configs, 3, seed=7), plan_runs(configs, 3, seed=7)
    assert a == b
    assert a != plan_runs(configs, 3, seed=8)
    assert len(a) == (len(configs) + 1) * 3          # with one offline copy per repeat
    names = [n for n, _, _ in a]
    assert names != sorted(names)                      # shuffled, not grouped


def _results(rows):
    base = {"label": "", "copy_mode": "background", "speed": None, "early_stopped": False,
            "failed": False, "time_to_complete_s": None, "mean_throughput_bps": 1.0,
            "throughput_fraction": 0.5, "peak_dirty_bytes": 1, "guest_p50_us": 50.0,
            "guest_iops": 100.0, "dirty_left_bytes": None, "amplification": 1.1}
    out = []
    for cfg, times, p99 in rows:
        for rep, t in enumerate(times):
            out.append({**base, "config": cfg.key(), "label": cfg.label(), "repeat": rep,
                        "granularity": cfg.granularity, "buf_size": cfg.buf_size,
                        "converged": t is not None, "time_to_ready_s": t,
                        "guest_p99_us": p99,
                        "dirty_left_bytes": None if t is not None else 300 * MiB})
    return pd.DataFrame(out)


def test_recommendation_converges_fastest_within_the_latency_budget():
    fast_but_slow_guest = Config(copy_mode="write-blocking")
    g4k = Config(granularity=4096, buf_size=MiB)
    g1m = Config(granularity=1 << 20, buf_size=16 * MiB)
    results = _results([(Config(), [None, None, None], 900.0),
                        (g4k, [11.0, 12.0, 11.5], 950.0),
                        (g1m, [20.0, None, 21.0], 800.0)])
    results.loc[results["config"] == g1m.key(), "copy_mode"] = "background"
    wb = _results([(fast_but_slow_guest, [9.0, 9.5, 9.2], 170_000.0)])
    wb["copy_mode"] = "write-blocking"
    summary = aggregate(pd.concat([results, wb], ignore_index=True))
    rec = recommend(summary, latency_budget_us=5000)
    assert (rec["granularity"], rec["buf_size"], rec["speed"], rec["copy_mode"]) == \
        (4096, MiB, 0, "background")
    assert rec["defaults"]["converged_runs"] == 0
    assert any("QEMU's defaults reached READY in only 0 of 3" in r for r in rec["reasons"])
    assert rec["confidence"] == "high"
    # Without a budget, write-blocking is faster and wins.
    assert recommend(summary)["copy_mode"] == "write-blocking"
    # The same summary, the same recommendation.
    assert recommend(summary, latency_budget_us=5000) == rec
    json.dumps(rec)


def test_no_recommendation_when_nothing_converges():
    rec = recommend(aggregate(_results([(Config(), [None], 100.0)])))
    assert rec["chosen"] is None and rec["granularity"] is None
    assert "no configuration reached READY" in rec["reasons"][0]


def test_tables_sort_sizes_by_value_and_round_for_people():
    configs = [Config(granularity=g, buf_size=b) for g in (1 << 20, 4096, 65536)
               for b in (16 * MiB, MiB)]
    summary = aggregate(_results([(c, [10.123456], 900.0) for c in configs]
                                 + [(Config(), [12.0], 900.0)]))
    assert [None if g != g else int(g) for g in summary["granularity"]] == \
        [None, 4096, 4096, 65536, 65536, 1 << 20, 1 << 20]
    assert list(summary["buf_size"])[1:3] == [MiB, 16 * MiB]
    people = rounded(summary)
    assert people["time_to_ready_s"].iloc[1] == 10.1          # 3 significant digits
    assert summary["time_to_ready_s"].iloc[1] == 10.123456    # the full value stays
    assert people["granularity"].iloc[1] == 4096


def test_recommendation_wording():
    g4k = Config(granularity=4096, buf_size=MiB)
    rec = recommend(aggregate(_results([(g4k, [11.0], 900.0), (Config(), [None], 900.0)])),
                    latency_budget_us=50_000)
    text = " | ".join(rec["reasons"])
    assert "reached READY in 1 of 1 runs" in text and "run(s)" not in text
    assert "within the p99 budget of 50 ms" in text and "50000 µs" not in text
    assert "the guest's p99 write latency was 900 µs" in text
    assert "QEMU's defaults reached READY in only 0 of 1 runs" in text
    assert (format_latency(850.0), format_latency(1250.0)) == ("850 µs", "1.25 ms")


def _cells(ax):
    (im,) = ax.get_images()
    return im.get_array()


def test_heatmaps_read_at_a_glance():
    g4k, g64k = Config(granularity=4096, buf_size=MiB), Config(granularity=65536, buf_size=MiB)
    summary = aggregate(_results([(Config(), [None, None], 1100.0),
                                  (g4k, [11.0, 12.0], 900.0), (g64k, [20.0, 21.0], 1100.0)]))
    figs = heatmap_figures(summary, fmt="raw")
    assert set(figs) == {"time_to_ready_s", "throughput_fraction", "amplification",
                         "guest_p99_ms"}                       # named after their units
    ax = figs["guest_p99_ms"].axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["default (64 KiB)", "4 KiB", "64 KiB"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["default (16 MiB)", "1 MiB"]
    cells = _cells(ax)
    # the defaults never reached READY: no colour, whatever their latency
    assert cells.mask[0, 0] or math.isnan(cells[0, 0])
    assert cells[1, 1] == pytest.approx(0.9) and cells[2, 1] == pytest.approx(1.1)
    # a scale from 0: 0.9 ms against 1.1 ms are near neighbours, not black against yellow
    (im,) = ax.get_images()
    assert im.get_clim() == (0.0, pytest.approx(1.1))
    notes = [t.get_text() for t in ax.texts]
    assert "1.1\nnot READY\n0/2" in notes
    assert len(figs["guest_p99_ms"].axes) == 2           # the panel and its colour bar
    # one value alone gets no colour bar
    one = heatmap_figures(aggregate(_results([(g4k, [11.0], 900.0)])))
    assert len(one["time_to_ready_s"].axes) == 1


async def test_a_small_real_sweep_recommends_what_converges(tmp_path):
    """A 4 KiB random-write load into a throttled target: 64 KiB granularity dirties 16x
    what is written, more than the target takes; 4 KiB granularity does not."""
    calls = []
    configs = grid(granularity=["4K"], buf_size=["1M"])
    kwargs = dict(configs=configs, repeat=1, setup=Setup(size="64M", target_speed="16M"),
                  load=FioLoad(rate="4M", bs="4K"), time_limit=15, seed=3, early_stop=True,
                  progress=lambda k, n, label, eta: calls.append((k, n, label)), predict=True)
    result = await run_sweep(tmp_path, **kwargs)
    assert [c[:2] for c in calls] == [(1, 3), (2, 3), (3, 3)]
    # the model, beside each run: 64 KiB (the default) never, 4 KiB yes, and close
    res = result["results"]
    pred = dict(zip(res["granularity"].fillna(0), res["predicted_converges"]))
    assert pred == {0: "no", 4096: "yes"}
    row = res[res["granularity"] == 4096].iloc[0]
    assert 0.5 < row["predicted_time_to_ready_s"] / row["time_to_ready_s"] < 2
    assert (tmp_path / "predicted_vs_measured.png").stat().st_size > 0
    rec = result["recommendation"]
    assert rec["granularity"] == 4096 and rec["buf_size"] == MiB
    assert rec["defaults"]["converged_runs"] == 0
    res = pd.read_csv(tmp_path / "results.csv")
    assert len(res) == 2 and set(res["converged"]) == {True, False}
    defaults = res[res["granularity"].isna()].iloc[0]
    assert defaults["dirty_left_bytes"] > 0 and 0 < defaults["throughput_fraction"] < 1
    assert bool(defaults["early_stopped"])            # the forecast said so before 15 s
    for name in ("time_to_ready_s", "throughput_fraction", "amplification", "guest_p99_ms"):
        assert (tmp_path / f"heatmap_{name}.png").stat().st_size > 0
    saved = json.loads((tmp_path / "recommendation.json").read_text())
    assert saved["granularity"] == 4096 and isinstance(saved["buf_size"], int)
    # Started again on the same folder: nothing is run again, the result is the same.
    calls.clear()
    again = await run_sweep(tmp_path, **kwargs)
    assert calls == [] and again["recommendation"] == rec


async def test_sweep_cli_refuses_bad_lists(tmp_path):
    code, out, err = await run("sweep", "--granularity", "4K,3000", "--out", str(tmp_path))
    assert code == 2 and "--granularity: must be a power of two" in err
    code, out, err = await run("sweep", "--repeat", "0", "--out", str(tmp_path))
    assert code == 2 and "--repeat: must be >= 1" in err


async def test_a_sweep_over_a_remote_nbd_target(tmp_path):
    """The target is in a second qemu-storage-daemon, reached over NBD."""
    result = await run_sweep(tmp_path, configs=grid(granularity=["4K"], buf_size=["1M"],
                                                    with_defaults=False),
                             repeat=1, load=FioLoad(rate="2M"), time_limit=30,
                             setup=Setup(size="16M", target_speed="16M", remote_target=True))
    (row,) = result["results"].to_dict("records")
    assert row["converged"] and row["verified"] is True and not row["failed"]
    meta = json.loads((tmp_path / "runs" / row["folder"] / "summary.json").read_text())["meta"]
    assert meta["setup"]["remote_target"] is True
    assert result["recommendation"]["granularity"] == 4096


async def test_resume_only_with_the_same_settings(tmp_path):
    """Issue #10.12: a sweep folder made with other settings is never relabelled."""
    kwargs = dict(configs=grid(granularity=["4K"], buf_size=["1M"], with_defaults=False),
                  repeat=1, setup=Setup(size="8M", target_speed="16M"), load=None,
                  time_limit=15)
    await run_sweep(tmp_path, **kwargs)
    with pytest.raises(ArgumentError, match=r"other settings.*size: was .*8388608.*16777216"):
        await run_sweep(tmp_path, **{**kwargs, "setup": Setup(size="16M", target_speed="16M")})
    code, out, err = await run("sweep", "--granularity", "4K", "--buf-size", "1M",
                               "--size", "16M", "--no-load", "--repeat", "1",
                               "--out", str(tmp_path))
    assert code == 2 and "--fresh" in err and "Traceback" not in err
    calls = []
    await run_sweep(tmp_path, **{**kwargs, "setup": Setup(size="16M", target_speed="16M")},
                    fresh=True, progress=lambda *a: calls.append(a))
    assert len(calls) == 2                            # everything ran again
    meta = json.loads(next((tmp_path / "runs").glob("g-*/summary.json")).read_text())["meta"]
    assert meta["disk_bytes"] == 16 * MiB


def test_failed_runs_are_kept_apart_from_not_converged():
    """Issue #10.13: three outcomes, everywhere."""
    from qmpkit.cli import sweep_table
    cfg = Config(granularity=65536, buf_size=MiB)
    results = _results([(Config(), [None, None], 900.0), (cfg, [None, 8.0, 9.0], 900.0)])
    results.loc[(results["config"] == cfg.key()) & (results["repeat"] == 0), "failed"] = True
    results.loc[(results["config"] == cfg.key()) & (results["repeat"] == 0), "converged"] = False
    summary = aggregate(results)
    row = summary[summary["config"] == cfg.key()].iloc[0]
    assert (row["converged_runs"], row["not_converged_runs"], row["failed_runs"]) == (2, 0, 1)
    defaults = summary[summary["config"] == Config().key()].iloc[0]
    assert (defaults["not_converged_runs"], defaults["failed_runs"]) == (2, 0)
    assert "2/3 (1 failed)" in sweep_table(summary)
    rec = recommend(summary)
    assert any("1 of 3 runs failed" in r for r in rec["reasons"])


async def test_a_failed_run_is_redone_on_resume(tmp_path):
    kwargs = dict(configs=grid(granularity=["4K"], buf_size=["1M"], with_defaults=False),
                  repeat=1, setup=Setup(size="8M", target_speed="16M"), load=None,
                  time_limit=15)
    await run_sweep(tmp_path, **kwargs)
    (folder,) = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("g-")]
    summary = json.loads((folder / "summary.json").read_text())
    summary["error"] = "qemu-storage-daemon died of SIGSEGV"
    (folder / "summary.json").write_text(json.dumps(summary))
    res = pd.read_csv(tmp_path / "results.csv")
    calls = []
    again = await run_sweep(tmp_path, **kwargs, progress=lambda *a: calls.append(a))
    assert [c[2] for c in calls] == [Config(4096, MiB).label()]     # only the failed one
    assert list(again["results"]["outcome"]) == ["converged"]
    assert len(res) == 1


async def test_stopping_a_button_started_sweep_cancels_cleanly(tmp_path):
    """Issue #10.14: Stop stops the sweep; the current run is not recorded as failed."""
    from qmpkit.widgets import SweepPanel
    panel = SweepPanel(out=str(tmp_path / "s"), granularity="4K", buf_size="1M", repeat=1,
                       size="64M", target_speed="2M", load_rate="1M", time_limit=60)
    panel.early_stop.value = False
    panel.run_button.click()
    task = panel.last_task
    for _ in range(600):
        if any((tmp_path / "s" / "runs").glob("g-*/trace.csv")):
            break
        await asyncio.sleep(0.1)
    assert not panel.stop_button.disabled
    await panel.stop()
    assert task.cancelled()
    assert "stopped" in panel.progress_text.value
    runs = list((tmp_path / "s" / "runs").glob("g-*"))
    assert runs and not any((r / ".done").exists() for r in runs)
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["error"] == "interrupted"


async def test_node_options_reach_qemu_and_the_results(tmp_path):
    """A sweep's node-option axes: set on both images (what QEMU reports for the
    nodes), recorded in results.csv, and refused first where QEMU would refuse."""
    from qmpkit.experiment import run_experiment
    seen = {}

    def look(run):
        async def query():
            seen["nodes"] = await run.qemu.client.execute("query-named-block-nodes",
                                                          {"flat": True})
        seen["task"] = asyncio.ensure_future(query())
    setup = Setup(size="8M", target_speed=None, aio="io_uring", cache_direct=True,
                  detect_zeroes="unmap", preallocation="falloc")
    res = await run_experiment(setup=setup, load=None, mirror={"speed": "2M"}, time_limit=60,
                               on_start=look, measure_offline=False, verify=False)
    await seen["task"]
    assert res.converged
    nodes = {n["node-name"]: n for n in seen["nodes"]}
    for name in ("src", "disk"):
        assert nodes[name + "-file"]["cache"]["direct"] is True
        assert nodes[name]["detect_zeroes"] == "unmap"
    assert res.trace.meta["setup"]["aio"] == "io_uring"
    # the sweep's axes, as results.csv columns
    out = tmp_path / "s"
    code, text, err = await run("sweep", "--granularity", "64K", "--buf-size", "1M",
                                "--size", "8M", "--no-load", "--target-speed", "0",
                                "--aio", "threads,io_uring", "--cache-direct", "on",
                                "--detect-zeroes", "unmap", "--preallocation", "falloc",
                                "--repeat", "1", "--out", str(out), timeout=300)
    assert code == 0, err
    table = pd.read_csv(out / "results.csv")
    assert set(table["aio"]) == {"threads", "io_uring"} and len(table) == 4
    assert set(table["cache_direct"]) == {True} and set(table["detect_zeroes"]) == {"unmap"}
    assert set(table["preallocation"]) == {"falloc"}
    rec = json.loads((out / "recommendation.json").read_text())
    assert rec["node_options"]["cache_direct"] is True
    code, text, err = await run("sweep", "--aio", "native", "--cache-direct", "off",
                                "--out", str(tmp_path / "no"))
    assert code == 2 and "--aio: aio=native needs cache.direct=on" in err
