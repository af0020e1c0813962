"""Traces: save, load, save again byte-identical; summaries; the forecast."""

from __future__ import annotations

import pytest

from qmpkit.analysis import SUMMARY_KEYS, forecast, rate, summarize
from qmpkit.trace import Sample, Trace

MiB = 1 << 20


def make_trace(n=50, ready_at=None, dirty=True) -> Trace:
    samples = []
    for i in range(n):
        t = round(i * 0.1, 6)   # as the recorder keeps it: µs
        cur = int(i * 2 * MiB)
        tot = 64 * MiB + int(i * 0.5 * MiB)
        samples.append(Sample(t_s=t, status="ready" if ready_at and t >= ready_at else "running",
                              dirty_bytes=max(0, tot - cur - MiB) if dirty else None,
                              current_progress=cur, total_progress=tot,
                              remaining_bytes=tot - cur, throughput_bps=20.0 * MiB))
    events = [{"t_s": 0.0, "event": "JOB_STATUS_CHANGE", "data": {"id": "j", "status": "created"},
               "timestamp": {"seconds": 1, "microseconds": 2}}]
    if ready_at is not None:
        events.append({"t_s": ready_at, "event": "BLOCK_JOB_READY",
                       "data": {"device": "j", "len": 64 * MiB, "offset": 64 * MiB},
                       "timestamp": {"seconds": 3, "microseconds": 4}})
    tr = Trace(samples=samples, events=events,
               meta={"disk_bytes": 64 * MiB, "params": {"job-id": "j", "granularity": 4096},
                     "workload": {"rw": "randwrite"}, "label": "test"},
               fio_latency=[(0.1, 50.5), (0.2, 70.25)])
    tr.summary = summarize(tr, completed=True, verified=True)
    return tr


def test_save_load_save_is_byte_identical(tmp_path):
    tr = make_trace(ready_at=3.0)
    a = tr.save(tmp_path / "a")
    loaded = Trace.load(a)
    assert loaded.samples == tr.samples
    assert loaded.events == tr.events and loaded.meta == tr.meta
    assert loaded.fio_latency == tr.fio_latency
    b = loaded.save(tmp_path / "b")
    for name in ("trace.csv", "events.jsonl", "summary.json", "fio_latency.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_missing_dirty_counts_survive_a_round_trip(tmp_path):
    tr = make_trace(dirty=False)
    assert Trace.load(tr.save(tmp_path / "t")).samples[3].dirty_bytes is None


def test_summary_has_every_documented_key(tmp_path):
    tr = make_trace(ready_at=3.0)
    s = tr.summary
    assert set(SUMMARY_KEYS) <= set(s)
    assert s["time_to_ready_s"] == 3.0 and s["converged"] is True
    assert s["bytes_copied"] == 98 * MiB          # the last current_progress
    assert s["amplification"] == pytest.approx(s["bytes_copied"] / (64 * MiB))
    assert s["samples"] == 50 and s["achieved_hz"] == pytest.approx(10.0)
    assert s["peak_dirty_bytes"] == 63 * MiB
    never = summarize(make_trace(ready_at=None))
    assert never["time_to_ready_s"] is None and never["converged"] is False


def test_dataframes():
    tr = make_trace(ready_at=3.0)
    df = tr.to_dataframe()
    assert list(df.columns) == ["t_s", "status", "dirty_bytes", "current_progress",
                                "total_progress", "remaining_bytes", "throughput_bps",
                                "actively_synced"]
    assert len(df) == 50 and df["current_progress"].is_monotonic_increasing
    assert list(tr.events_dataframe()["event"]) == ["JOB_STATUS_CHANGE", "BLOCK_JOB_READY"]


def test_load_refuses_a_folder_that_is_not_a_trace(tmp_path):
    (tmp_path / "trace.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a qmpkit trace"):
        Trace.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        Trace.load(tmp_path / "nothing")


def s(t, cur, tot):
    return Sample(t_s=t, status="running", dirty_bytes=None, current_progress=cur,
                  total_progress=tot, remaining_bytes=tot - cur, throughput_bps=0.0)


def test_forecast_converging():
    # copies 100 MiB/s, work grows 20 MiB/s: remaining falls 80 MiB/s
    samples = [s(i * 0.1, int(i * 10 * MiB), int(1000 * MiB + i * 2 * MiB)) for i in range(31)]
    f = forecast(samples)
    assert f.converging is True
    assert f.copy_bps == pytest.approx(100 * MiB) and f.dirty_bps == pytest.approx(20 * MiB)
    assert f.eta_s == pytest.approx(f.remaining_bytes / (80 * MiB))
    assert f.text == f"READY in about {f.eta_s:.0f} s"


def test_forecast_not_converging_names_both_rates():
    samples = [s(i * 0.1, int(i * 10 * MiB), int(1000 * MiB + i * 32 * MiB)) for i in range(31)]
    f = forecast(samples)
    assert f.converging is False and f.eta_s is None
    assert f.text == ("not converging: 320 MiB/s of new dirty data against 100 MiB/s copied; "
                      "the work left grows by 220 MiB/s")


def test_forecast_near_equilibrium_says_too_close_never_a_contradiction():
    """Issue #13: 'writes dirty 95 MiB/s, the mirror copies 100 MiB/s' must not be
    called 'not converging'; the text says what it compares."""
    samples = [s(i * 0.1, int(i * 10.03 * MiB), int(1000 * MiB + i * 9.53 * MiB))
               for i in range(31)]
    f = forecast(samples)
    assert f.verdict == "too close" and f.eta_s is None
    assert f.text == "copies 100.3 MiB/s against 95.3 MiB/s of new dirty data: too close to call"


def test_forecast_gives_no_eta_when_the_shrink_rate_falls_away():
    """A run that slows towards equilibrium is never promised READY in 13 s, 15, ... 130."""
    samples, cur, tot = [], 0, 1000 * MiB
    for i in range(31):
        copy, dirty = 100 * MiB, (100 - 40 + i * 1.3) * MiB     # net falls from 40 to ~1
        samples.append(s(i * 0.1, int(cur), int(tot)))
        cur += copy * 0.1
        tot += dirty * 0.1
    f = forecast(samples)
    assert f.verdict in ("unsteady", "too close") and f.eta_s is None
    assert "READY in" not in f.text


def test_forecast_of_a_paused_job():
    from dataclasses import replace
    samples = [replace(x, status="paused") for x in
               [s(i * 0.1, int(i * MiB), 1000 * MiB) for i in range(31)]]
    assert forecast(samples).text == "paused"


def test_forecast_measuring_and_ready():
    assert forecast([s(0, 0, 10)]).text == "not enough data yet"
    assert forecast([s(0, 0, 10), s(0.5, 1, 10)], window_s=2).converging is None
    assert forecast([s(0, 0, 10)], ready=True).text.startswith("READY")


def test_rate_uses_the_window():
    samples = [s(i * 0.1, i * 100, 0) for i in range(11)]
    assert rate(samples, "current_progress", 0.5) == pytest.approx(1000.0)
    assert rate(samples[:1], "current_progress", 0.5) is None


def test_a_trace_from_before_actively_synced_still_loads(tmp_path):
    """QEMU 8.2's actively-synced became a column; older trace folders load as before."""
    folder = make_trace(ready_at=3.0).save(tmp_path / "t")
    lines = (folder / "trace.csv").read_text().splitlines()
    (folder / "trace.csv").write_text("\n".join(",".join(l.split(",")[:-1]) for l in lines))
    old = Trace.load(folder)
    assert len(old.samples) == 50 and old.samples[0].actively_synced is None


def test_actively_synced_round_trips(tmp_path):
    from dataclasses import replace
    tr = make_trace(ready_at=3.0)
    tr.samples[-1] = replace(tr.samples[-1], actively_synced=True)
    back = Trace.load(tr.save(tmp_path / "t"))
    assert back.samples[-1].actively_synced is True and back.samples[0].actively_synced is None


def test_forecast_of_a_speed_limited_mirror_on_a_quiet_disk():
    """--speed makes QEMU copy in bursts: 3 s without progress are no reason to say
    'not converging: writes dirty 0 B/s, the mirror copies 0 B/s'."""
    samples = []
    for i in range(100):                       # 10 s: 16 MiB at once, then 8 MiB every 4 s
        t = i * 0.1
        cur = 16 * MiB + 8 * MiB * int(t // 4)
        samples.append(s(t, cur, 64 * MiB))
    f = forecast(samples)
    assert f.verdict == "converging" and "not converging" not in f.text
    long_rate = (samples[-1].current_progress - samples[0].current_progress) / 9.9
    assert f.eta_s == pytest.approx((64 * MiB - samples[-1].current_progress) / long_rate)


def test_mirror_ops_reads_qemus_trace_events():
    from qmpkit.analysis import mirror_ops
    log = "\n".join([
        "qemu-storage-daemon: some other line",
        "mirror_start bs 0x5601 s 0x5602 opaque (nil)",
        "mirror_one_iteration s 0x5602 offset 0 bytes 4194304",
        "mirror_iteration_done s 0x5602 offset 0 bytes 1048576 ret 0",
        "mirror_iteration_done s 0x5602 offset 1048576 bytes 1048576 ret 0",
        "mirror_yield s 0x5602 dirty count 1024 free buffers 0 in_flight 4",
        "mirror_yield s 0x5602 dirty count 1024 free buffers 0 in_flight 2",
        "mirror_yield_in_flight s 0x5602 offset 0 in_flight 3",
        "mirror_before_sleep s 0x5602 dirty count 67108864 synced 0 delay 100000000ns",
        "mirror_before_sleep s 0x5602 dirty count 0 synced 1 delay 0ns"])
    ops = mirror_ops(log)
    assert ops == {"ops": 2, "mean_op_bytes": 1048576, "iterations": 1,
                   "mean_iteration_bytes": 4194304, "waits_for_a_slot": 2,
                   "mean_in_flight_when_waiting": 3.0, "waits_for_an_overlapping_op": 1,
                   "throttled_slices": 1}
    assert mirror_ops("no events here") is None
