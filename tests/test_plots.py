"""Plot functions return figures with the axes and lines they promise."""

import pytest
from matplotlib.figure import Figure
from test_trace import make_trace

from qmpkit import plots


def test_convergence_one_trace():
    fig = plots.convergence(make_trace(ready_at=3.0))
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels[:2] == ["dirty", "remaining"]
    ready_lines = [line for line in ax.get_lines() if list(line.get_xdata()) == [3.0, 3.0]]
    assert ready_lines, "READY is marked"
    assert ax.get_ylabel() == "MiB" and "time" in ax.get_xlabel()
    assert "granularity 4 KiB" in ax.get_title() or "test" in ax.get_title()
    assert max(ax.get_lines()[0].get_ydata()) == pytest.approx(63.0)   # in MiB


def test_convergence_overlays_several_traces_and_marks_errors():
    a, b = make_trace(ready_at=3.0), make_trace(ready_at=None)
    b.meta["label"] = "other"
    b.events.append({"t_s": 2.0, "event": "BLOCK_JOB_ERROR",
                     "data": {"device": "j", "operation": "write", "action": "stop"}})
    ax = plots.convergence([a, b]).axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert "dirty test" in labels and "dirty other" in labels
    assert "error event" in labels
    assert "2 runs" in ax.get_title()


def test_throughput_with_offline_reference():
    tr = make_trace(ready_at=3.0)
    tr.meta["setup"] = {"target_speed_bps": 100 << 20}
    ax = plots.throughput(tr, offline_bps=400 << 20).axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert any(label.startswith("offline copy (qemu-img convert) 400 MiB/s") for label in labels)
    assert "target throttled to 100 MiB/s" in labels
    assert ax.get_ylabel() == "MiB/s"
    assert max(ax.get_lines()[0].get_ydata()) == pytest.approx(20.0)


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
