"""The notebooks in a real browser: JupyterLab + Playwright + Debian's Chromium.

A person's paths:

- open each committed notebook before any cell runs: every panel reads as its text form
  ("MirrorPanel: run this cell to get the live panel"), never as raw `VBox(...` text;
- 01_targets.ipynb: build the target panel, click Create, see the node graph;
- 02_live_mirror.ipynb: build the panels, set granularity 4K in the mirror panel, click
  Start, watch the status reach READY and the live plot move, stop the load, click Complete,
  and see "completed" and "verified";
- 03_tune_buf_size_granularity.ipynb: build the sweep panel, click Run sweep, click Stop
  while a run is under way: the panel says it stopped, no QEMU is left, and the kernel
  answers; Run sweep then resumes the sweep to its recommendation.

Screenshots of each step go to tmp_path/screens. With QMPKIT_SCREENSHOTS_DIR set (unset in
CI) the tests also write the docs' pictures there, one per notebook
(notebook-01-targets.png, notebook-02-live-mirror.png, notebook-03-sweep.png), each cropped
to its panel.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import free_port
from test_cli_record import _processes_under, _wait_gone

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
VIEWPORT = {"width": 1280, "height": 900}
RAW_WIDGET_TEXT = ("VBox(", "HBox(", "HTML(value=", "Error displaying widget")
pytestmark = pytest.mark.browser


@pytest.fixture
def lab(tmp_path):
    """JupyterLab on a free loopback port, serving a copy of the notebooks."""
    assert Path(CHROMIUM).exists(), "Debian's chromium is missing: make test installs it"
    root = tmp_path / "nb"
    shutil.copytree(ROOT / "notebooks", root, ignore=shutil.ignore_patterns("traces"))
    settings = tmp_path / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port, token = free_port(), "qmpkit-browser-test"
    env = dict(os.environ, TMPDIR=str(tmp_path), QMPKIT_NOTEBOOK_QUICK="1",
               JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "settings"))
    argv = [str(Path(sys.executable).parent / "jupyter-lab"), "--no-browser",
            "--ip=127.0.0.1", f"--port={port}", f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={root}", "--allow-root",
            f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}",
            "--LabApp.extension_manager=readonly", "--LabApp.expose_app_in_browser=True"]
    log = open(tmp_path / "lab.log", "wb")
    server = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:    # the server's start-up: poll its status page, bounded
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "lab.log").read_text()
                assert time.monotonic() < deadline, "JupyterLab did not start in 60 s"
                time.sleep(0.2)
        yield base, token, root
    finally:
        # Shut down kernels (and the QEMU in them) through the server, then the server.
        try:
            req = urllib.request.Request(f"{base}/api/shutdown?token={token}", method="POST")
            urllib.request.urlopen(req, timeout=10)
        except OSError:
            pass
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.send_signal(signal.SIGKILL)
            server.wait(10)
        log.close()
        assert _wait_gone(_processes_under(tmp_path)) == [], "a kernel or QEMU outlived the test"


@pytest.fixture
def browser():
    """Debian's Chromium, headless, driven by Playwright (never a downloaded browser)."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def shots(tmp_path):
    folder = tmp_path / "screens"
    folder.mkdir()
    return folder


def _doc_shot(page, panel, shots: Path, name: str) -> None:
    """Screenshot ``panel`` (a locator) as ``name``; also into the docs folder named by
    QMPKIT_SCREENSHOTS_DIR, when set. The notebook scrolls inside the page, so a panel
    taller than the window would be cut: the window grows to fit it for this one shot."""
    box = panel.bounding_box(timeout=10_000)
    assert box is not None, f"{name}: the panel is not shown"
    page.set_viewport_size({"width": VIEWPORT["width"],
                            "height": max(VIEWPORT["height"], int(box["height"]) + 200)})
    try:
        panel.scroll_into_view_if_needed(timeout=10_000)
        panel.screenshot(path=shots / name, animations="disabled")
    finally:
        page.set_viewport_size(VIEWPORT)
    docs = os.environ.get("QMPKIT_SCREENSHOTS_DIR")
    if docs:
        shutil.copy(shots / name, Path(docs) / name)


def _open(page, lab, notebook: str) -> None:
    """Open ``notebook`` in a workspace of its own, and wait for its kernel to be idle
    (or a "Select Kernel" dialog gets in the way of running cells)."""
    base, token, _root = lab
    workspace = re.sub(r"\W", "-", notebook.removesuffix(".ipynb"))
    page.goto(f"{base}/lab/workspaces/{workspace}/tree/{notebook}?token={token}")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
    page.wait_for_function(
        "() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
        " const k = w && w.sessionContext && w.sessionContext.session &&"
        " w.sessionContext.session.kernel; return k && k.status === 'idle'; }",
        timeout=60_000)
    # The file browser would only take width from the panels.
    page.evaluate("() => { window.jupyterapp.shell.collapseLeft(); }")


def _run_above(page, source: str) -> None:
    """Run every cell above the first cell whose source holds ``source``."""
    index = page.evaluate(
        "(s) => { const nb = window.jupyterapp.shell.currentWidget.content;"
        " return nb.widgets.findIndex(c => c.model.sharedModel.getSource().includes(s)); }",
        source)
    assert index > 0, f"no cell holds {source!r}"
    page.evaluate(f"() => {{ window.jupyterapp.shell.currentWidget.content"
                  f".activeCellIndex = {index}; }}")
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-above'); }")


def _kernel_execute(page, code: str, timeout_ms: int = 30_000) -> str:
    """Run ``code`` in the notebook's kernel; its reply's status ('ok', 'error'), or
    'timeout' when the kernel did not answer in time."""
    return page.evaluate(
        "([code, ms]) => { const k = window.jupyterapp.shell.currentWidget.sessionContext"
        ".session.kernel; const reply = k.requestExecute({code, store_history: false}).done"
        ".then(r => r.content.status);"
        " return Promise.race([reply, new Promise(r => setTimeout(() => r('timeout'), ms))]); }",
        [code, timeout_ms])


def _kernel_pid(page) -> int:
    kernel_id = page.evaluate(
        "() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.id")
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if f"kernel-{kernel_id}.json".encode() in cmd:
                return int(entry)
    raise AssertionError(f"no process for kernel {kernel_id}")


def _descendants(pid: int, name: str) -> list[int]:
    """The running descendants of ``pid`` whose command is ``name``."""
    parents: dict[int, int] = {}
    comms: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                comm = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] != "Z":
                parents[int(entry)] = int(fields[1])
                comms[int(entry)] = os.path.basename(comm.decode(errors="replace"))
    found = []
    for child in parents:
        p = child
        while p in parents and p != pid:
            p = parents[p]
        if p == pid and child != pid and comms[child] == name:
            found.append(child)
    return found


def _saved_text_forms(notebook: str) -> list[str]:
    """The text form saved with each widget output of ``notebook``."""
    nb = json.loads((ROOT / "notebooks" / notebook).read_text())
    return ["".join(o["data"]["text/plain"]) if isinstance(o["data"]["text/plain"], list)
            else o["data"]["text/plain"]
            for c in nb["cells"] for o in c.get("outputs", ())
            if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]


def test_fresh_notebooks_show_no_raw_widget_text(lab, browser, shots):
    from playwright.sync_api import expect
    page = browser.new_page(viewport=VIEWPORT)
    try:
        for notebook in NOTEBOOKS:
            _open(page, lab, notebook)
            cells = page.locator(".jp-Notebook")
            # Freshly opened, before any cell runs: each saved panel shows its text form
            # (or nothing), never raw widget text or dead widgets from an old run.
            for text in _saved_text_forms(notebook):
                assert text.endswith("run this cell to get the live panel"), (notebook, text)
                shown = cells.get_by_text(text, exact=True)
                shown.scroll_into_view_if_needed(timeout=30_000)
                expect(shown).to_be_visible(timeout=30_000)
            assert cells.locator(".widget-button").count() == 0, notebook
            for where in (cells.inner_text(), cells.text_content()):
                for raw in RAW_WIDGET_TEXT:
                    assert raw not in where, (notebook, raw)
            page.screenshot(path=shots / f"fresh-{notebook.removesuffix('.ipynb')}.png",
                            full_page=True)
    except BaseException:
        page.screenshot(path=shots / "failure.png", full_page=True)
        raise


def test_target_panel_creates_nodes_in_chromium(lab, browser, shots):
    from playwright.sync_api import expect
    page = browser.new_page(viewport=VIEWPORT)
    try:
        _open(page, lab, "01_targets.ipynb")
        _run_above(page, "await targets.create()")
        out = page.locator(".jp-OutputArea-output")
        create = out.get_by_role("button", name="Create", exact=True)
        expect(create).to_be_visible(timeout=120_000)
        page.screenshot(path=shots / "1-panel.png")
        # A person picks the throttled target at 32 MiB/s and clicks Create.
        out.locator(".widget-dropdown", has_text="target").first.locator("select") \
            .select_option("throttled")
        limit = out.locator(".widget-text", has_text="limit (MiB/s)").locator("input")
        limit.fill("32")
        limit.press("Enter")
        create.click()
        expect(out.get_by_text("created src (64 MiB) and a throttled target dst")) \
            .to_be_visible(timeout=60_000)
        graph = out.locator(".widget-html table", has_text="dst-disk")
        expect(graph).to_contain_text("throttle")
        body = page.locator(".jp-Notebook").inner_text()
        assert not any(raw in body for raw in RAW_WIDGET_TEXT)
        panel = page.locator(".jp-Cell").filter(has=create).locator(".jp-Cell-outputArea")
        _doc_shot(page, panel, shots, "notebook-01-targets.png")
    except BaseException:
        page.screenshot(path=shots / "failure.png", full_page=True)
        raise


def test_live_mirror_notebook_in_chromium(lab, browser, shots):
    from playwright.sync_api import expect
    page = browser.new_page(viewport=VIEWPORT)
    try:
        _open(page, lab, "02_live_mirror.ipynb")
        # Freshly opened, before any cell runs: no raw widget text, no dead widgets
        # from the run that saved the notebook, just the panels' text form.
        fresh = page.locator(".jp-Notebook").inner_text()
        assert "VBox(" not in fresh and "Error displaying widget" not in fresh
        assert "MirrorPanel: run this cell to get the live panel" in fresh
        assert "ended: completed" not in fresh
        # Run every cell above the one that calls mirror.start(): the panels are built.
        _run_above(page, "await mirror.start()")
        out = page.locator(".jp-OutputArea-output")
        start = out.get_by_role("button", name="Start", exact=True)
        expect(start).to_be_visible(timeout=120_000)
        page.screenshot(path=shots / "1-panels.png")
        body = page.locator(".jp-Notebook").inner_text()
        assert "VBox(children=" not in body and "Error displaying widget" not in body

        # A person sets granularity 4K (the cell already did; type it again) and starts.
        gran = out.locator(".widget-text", has_text="granularity").locator("input")
        gran.fill("3000")
        gran.press("Enter")
        expect(out.get_by_text("granularity: must be a power of two")).to_be_visible()
        expect(start).to_be_disabled()
        gran.fill("4K")
        gran.press("Enter")
        expect(start).to_be_enabled()
        start.click()
        status = out.locator(".widget-html", has_text="status:")
        expect(status).to_contain_text("running", timeout=60_000)
        plot = out.locator(".widget-image").first
        expect(plot).to_be_visible(timeout=30_000)
        first, first_src = plot.screenshot(), plot.get_attribute("src")
        assert first_src, "the live plot shows no frame"
        page.screenshot(path=shots / "2-running.png")
        expect(status).to_contain_text("ready", timeout=300_000)
        # The dashboard redraws (at most twice a second, less on busy cores) while the
        # job lives: each frame is a new image source.
        expect(plot).not_to_have_attribute("src", first_src, timeout=30_000)
        second = plot.screenshot()
        assert first != second, "the live plot did not change"
        page.screenshot(path=shots / "3-ready.png")

        out.get_by_role("button", name="Stop load", exact=True).click()
        expect(out.get_by_text("stopped:")).to_be_visible(timeout=60_000)
        complete = out.get_by_role("button", name="Complete", exact=True)
        expect(complete).to_be_enabled()
        complete.click()
        expect(status).to_contain_text("ended: completed", timeout=120_000)
        expect(status).to_contain_text("verified: source and target hold the same data",
                                       timeout=120_000)
        page.screenshot(path=shots / "4-completed.png", full_page=True)
        plot.scroll_into_view_if_needed()
        page.screenshot(path=shots / "dashboard.png")
        panels = page.locator(".jp-Cell").filter(has=complete).locator(".jp-Cell-outputArea")
        _doc_shot(page, panels, shots, "notebook-02-live-mirror.png")
    except BaseException:
        page.screenshot(path=shots / "failure.png", full_page=True)
        raise


def test_sweep_panel_stops_cleanly_in_chromium(lab, browser, shots):
    from playwright.sync_api import expect
    page = browser.new_page(viewport=VIEWPORT)
    try:
        _open(page, lab, "03_tune_buf_size_granularity.ipynb")
        _run_above(page, "await sweep.run()")
        out = page.locator(".jp-OutputArea-output")
        run = out.get_by_role("button", name="Run sweep", exact=True)
        stop = out.get_by_role("button", name="Stop", exact=True)
        expect(run).to_be_visible(timeout=120_000)
        expect(stop).to_be_disabled()
        page.screenshot(path=shots / "1-panel.png")
        kernel = _kernel_pid(page)

        run.click()
        status = out.locator(".widget-label", has_text=re.compile(r"^(run \d|stopped|done)"))
        expect(status).to_contain_text(re.compile(r"run \d+ of \d+"), timeout=60_000)
        expect(stop).to_be_enabled(timeout=10_000)
        # Under way: a mirror run's QEMU is up and its write load runs (the offline copy,
        # if it comes first, has neither). Nothing announces them, so look, bounded.
        deadline = time.monotonic() + 120
        while not ((daemons := _descendants(kernel, "qemu-storage-daemon"))
                   and _descendants(kernel, "fio")):
            assert time.monotonic() < deadline, "no mirror run got under way in 120 s"
            time.sleep(0.2)
        page.screenshot(path=shots / "2-running.png")

        stop.click()
        expect(status).to_have_text("stopped: the current run was cancelled cleanly; "
                                    "Run sweep resumes where it stopped", timeout=60_000)
        expect(run).to_be_enabled(timeout=10_000)
        expect(stop).to_be_disabled()
        page.screenshot(path=shots / "3-stopped.png")
        assert _wait_gone(daemons, timeout=30) == [], "the run's QEMU outlived Stop"
        assert _descendants(kernel, "qemu-storage-daemon") == []
        assert _descendants(kernel, "fio") == []
        # The kernel answers, and the panel has no task left running.
        assert _kernel_execute(page, "assert not sweep._sweep_task and "
                                     "not sweep.run_button.disabled") == "ok"

        # Run sweep again resumes the sweep up to its recommendation.
        run.click()
        expect(status).to_have_text("done", timeout=300_000)
        expect(out.get_by_text("Recommendation:")).to_be_visible(timeout=10_000)
        panel = page.locator(".jp-Cell").filter(has=run).locator(".jp-Cell-outputArea")
        _doc_shot(page, panel, shots, "notebook-03-sweep.png")
        assert _descendants(kernel, "qemu-storage-daemon") == []
    except BaseException:
        page.screenshot(path=shots / "failure.png", full_page=True)
        raise
