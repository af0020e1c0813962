"""Plot functions return figures with the axes and lines they promise."""

import math

import pytest
from matplotlib.figure import Figure
from test_trace import make_trace

from qmpkit import plots
from qmpkit.trace import SPEED_EVENT

MiB = 1 << 20


def legend_texts(fig):
    return [t.get_text() for leg in fig.legends for t in leg.get_texts()]


def test_convergence_one_trace():
    fig = plots.convergence(make_trace(ready_at=3.0))
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert [line.get_gid() for line in ax.get_lines()][:2] == ["dirty", "remaining"]
    assert legend_texts(fig) == ["dirty (the job's bitmap)", "remaining (dirty + in flight)"]
    ready_lines = [line for line in ax.get_lines() if list(line.get_xdata()) == [3.0, 3.0]]
    assert ready_lines, "READY is marked"
    assert ax.get_ylabel() == "MiB" and "time" in ax.get_xlabel()
    assert "granularity 4 KiB" in ax.get_title() or "test" in ax.get_title()
    assert max(ax.get_lines()[0].get_ydata()) == pytest.approx(63.0)   # in MiB
    assert ax.get_legend() is None, "the legend sits below the axes, not over the lines"


def test_convergence_overlays_several_traces_and_marks_errors():
    a, b = make_trace(ready_at=3.0), make_trace(ready_at=None)
    b.meta["label"] = "other"
    b.events.append({"t_s": 2.0, "event": "BLOCK_JOB_ERROR",
                     "data": {"device": "j", "operation": "write", "action": "stop"}})
    fig = plots.convergence([a, b])
    ax = fig.axes[0]
    texts = legend_texts(fig)
    # one entry per run, and the line styles explained once
    assert texts.count("test") == 1 and texts.count("other") == 1
    assert texts.count("dirty (the job's bitmap)") == 1
    assert texts.count("remaining (dirty + in flight)") == 1
    assert not any(t.startswith("dirty test") for t in texts)
    assert "error event" in texts
    assert "2 runs" in ax.get_title()


def paused_and_sped_up():
    tr = make_trace(ready_at=None)
    tr.meta["params"]["speed"] = 10 * MiB
    tr.events += [
        {"t_s": 1.0, "event": "JOB_STATUS_CHANGE", "data": {"id": "j", "status": "paused"}},
        {"t_s": 2.0, "event": "JOB_STATUS_CHANGE", "data": {"id": "j", "status": "running"}},
        {"t_s": 2.5, "event": SPEED_EVENT, "data": {"id": "j", "speed": 30 * MiB}},
        {"t_s": 3.5, "event": SPEED_EVENT, "data": {"id": "j", "speed": 0}}]
    return tr


def test_pauses_and_speed_changes_are_marked():
    tr = paused_and_sped_up()
    assert tr.paused_spans() == [(1.0, 2.0)]
    assert tr.speed_steps() == [(0.0, 10 * MiB), (2.5, 30 * MiB), (3.5, 0)]
    for fig in (plots.convergence(tr), plots.throughput(tr)):
        ax = fig.axes[0]
        spans = [p for p in ax.patches if p.get_x() == pytest.approx(1.0)]
        assert spans and spans[0].get_width() == pytest.approx(1.0), "the pause is shaded"
        notes = [t.get_text() for t in ax.texts]
        assert "paused" in notes and "speed 30 MiB/s" in notes and "speed unlimited" in notes
    # the --speed cap as a step line: 10, then 30 MiB/s, then none (not drawn)
    ax = plots.throughput(tr).axes[0]
    (cap,) = [line for line in ax.get_lines() if line.get_label() == "speed limit (--speed)"]
    ys = list(cap.get_ydata())
    assert ys[:2] == [10.0, 30.0] and math.isnan(ys[2])


def test_a_pause_that_never_ended_runs_to_the_end():
    tr = make_trace()
    tr.events.append({"t_s": 4.0, "event": "JOB_STATUS_CHANGE",
                      "data": {"id": "j", "status": "paused"}})
    assert tr.paused_spans() == [(4.0, None)]
    ax = plots.convergence(tr).axes[0]
    (span,) = [p for p in ax.patches if p.get_x() == pytest.approx(4.0)]
    assert span.get_width() == pytest.approx(tr.samples[-1].t_s - 4.0)


def test_throughput_with_offline_reference():
    tr = make_trace(ready_at=3.0)
    tr.meta["setup"] = {"target_speed_bps": 100 << 20}
    fig = plots.throughput(tr, offline_bps=250 << 20)
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert any(label.startswith("offline copy (qemu-img convert) 250 MiB/s") for label in labels)
    assert "target throttled to 100 MiB/s" in labels
    assert ax.get_ylabel() == "MiB/s"
    assert max(ax.get_lines()[0].get_ydata()) == pytest.approx(20.0)


def test_an_offline_copy_far_above_the_data_is_a_note_not_a_line():
    tr = make_trace(ready_at=3.0)                      # peak 20 MiB/s
    fig = plots.throughput(tr, offline_bps=2000 << 20)
    ax = fig.axes[0]
    assert not any("convert" in line.get_label() for line in ax.get_lines())
    assert ax.get_ylim()[1] < 30, "the data keeps the axis"
    (note,) = [t for t in legend_texts(fig) if t.startswith("qemu-img convert")]
    assert note == "qemu-img convert 2.0 GiB/s: 100× the peak, off the scale"


def test_latency_needs_the_fio_log():
    ax = plots.latency(make_trace()).axes[0]
    assert list(ax.get_lines()[0].get_ydata()) == pytest.approx([0.0505, 0.07025])
    assert ax.get_yscale() == "log"
    tr = make_trace()
    tr.fio_latency = []
    with pytest.raises(ValueError, match="no trace has a fio latency log"):
        plots.latency(tr)


def test_figures_save_as_png(tmp_path):
    path = tmp_path / "c.png"
    plots.convergence(make_trace(ready_at=3.0)).savefig(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_across_a_link_shows_the_models_ceilings():
    tr = make_trace(ready_at=3.0)                      # 20 MiB/s, granularity 4 KiB
    tr.meta["link"] = {"rtt_s": 0.04, "rate_bps": 125e6, "jitter_s": 0.0}
    tr.meta["params"]["buf-size"] = MiB
    fig = plots.throughput(tr)
    model = {line.get_label(): line.get_ydata()[0] for line in fig.axes[0].get_lines()
             if line.get_gid() == "model"}
    # 1 MiB per (40 ms + 1 MiB at 125 MB/s) and 16 x 4 KiB per (40 ms + 4 KiB at 125 MB/s)
    assert model["model: bulk ≤ 20.7 MiB/s (1 MiB per RTT)"] == \
        pytest.approx(MiB / (0.04 + MiB / 125e6) / MiB)
    assert model["model: catch-up ≤ 1.6 MiB/s (16 × 4 KiB per RTT)"] == \
        pytest.approx(16 * 4096 / (0.04 + 4096 / 125e6) / MiB)
    assert "link rate 119.2 MiB/s: off the scale" in legend_texts(fig)
    # no link, no model lines
    assert not [ln for ln in plots.throughput(make_trace()).axes[0].get_lines()
                if ln.get_gid() == "model"]


def test_the_probe_plot_puts_copy_rates_over_the_dirty_bars():
    from qmpkit.predict import Load, predict
    from qmpkit.probe import Profile
    prof = Profile(node="src", disk_bytes=1 << 30, seconds=4.0, write_bytes=80 * MiB,
                   write_ops=20480,
                   curves={4096: [(1.0, 20 * MiB), (2.0, 40 * MiB)],
                           65536: [(1.0, 300 * MiB), (2.0, 600 * MiB)]})
    cand = predict(disk_bytes=1 << 30, load=Load(20 * MiB), granularity=4096,
                   target_bps=100 * MiB)
    ax = plots.probe(prof, [cand]).axes[0]
    # 20 MiB/s at 4 KiB; at 64 KiB, 300 MiB of 1 GiB after 1 s, saturation-corrected:
    # -1024 ln(1 - 300/1024) = 355 MiB/s
    assert [round(b.get_height()) for b in ax.patches] == [20, 355]
    lines = {ln.get_label(): ln.get_ydata()[0] for ln in ax.get_lines()}
    assert lines["catch-up of 4 KiB/16 MiB background: 100 MiB/s"] == pytest.approx(100)
    assert ax.get_yscale() == "log"
