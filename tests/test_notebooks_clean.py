"""The committed notebooks open clean (issue #13): no saved widget state, no raw
widget text, and the panels have a readable text form."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_no_widget_state_is_committed():
    notebooks = sorted(str(p) for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "strip-widget-state"), "--check",
                        *notebooks], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    for nb in notebooks:
        assert "VBox(children" not in Path(nb).read_text()


def test_a_panel_shows_a_readable_text_form():
    from qmpkit.widgets import SweepPanel
    bundle = SweepPanel()._repr_mimebundle_()
    assert bundle["text/plain"] == "SweepPanel: run this cell to get the live panel"
    assert "application/vnd.jupyter.widget-view+json" in bundle
