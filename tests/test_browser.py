"""The live-mirror notebook in a real browser: JupyterLab + Playwright + Debian's Chromium.

A person's path: open 02_live_mirror.ipynb, run the cells that build the panels, set
granularity 4K in the mirror panel, click Start, watch the status reach READY and the
live plot move, stop the load, click Complete, and see "completed" and "verified".
Screenshots of each step go to tmp_path/screens (the last one is the README's).
"""

from __future__ import annotations

import json
import os
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


def test_live_mirror_notebook_in_chromium(lab, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    base, token, root = lab
    shots = tmp_path / "screens"
    shots.mkdir()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{base}/lab/tree/02_live_mirror.ipynb?token={token}")
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
            # Wait for the kernel to be idle, or a "Select Kernel" dialog gets in the way.
            page.wait_for_function(
                "() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
                " const k = w && w.sessionContext && w.sessionContext.session &&"
                " w.sessionContext.session.kernel; return k && k.status === 'idle'; }",
                timeout=60_000)
            # Freshly opened, before any cell runs: no raw widget text, no dead widgets
            # from the run that saved the notebook, just the panels' text form.
            fresh = page.locator(".jp-Notebook").inner_text()
            assert "VBox(" not in fresh and "Error displaying widget" not in fresh
            assert "MirrorPanel: run this cell to get the live panel" in fresh
            assert "ended: completed" not in fresh
            # Run every cell above the one that calls mirror.start(): the panels are built.
            index = page.evaluate(
                "() => { const nb = window.jupyterapp.shell.currentWidget.content;"
                " return nb.widgets.findIndex(c => c.model.sharedModel.getSource()"
                ".includes('await mirror.start()')); }")
            assert index > 0
            page.evaluate(f"() => {{ window.jupyterapp.shell.currentWidget.content"
                          f".activeCellIndex = {index}; }}")
            page.evaluate("() => { window.jupyterapp.commands.execute("
                          "'notebook:run-all-above'); }")
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
            first = plot.screenshot()
            page.screenshot(path=shots / "2-running.png")
            expect(status).to_contain_text("ready", timeout=300_000)
            # The dashboard redraws twice a second while the job lives.
            page.wait_for_timeout(1500)
            second = plot.screenshot()
            assert first != second, "the live plot did not change"
            page.screenshot(path=shots / "3-ready.png")

            out.get_by_role("button", name="Stop load", exact=True).click()
            expect(out.get_by_text("stopped:")).to_be_visible(timeout=60_000)
            complete = out.get_by_role("button", name="Complete", exact=True)
            expect(complete).to_be_enabled()
            complete.click()
            expect(status).to_contain_text("ended: completed", timeout=120_000)
            expect(status).to_contain_text("verified: source and target hold the same data", timeout=120_000)
            page.screenshot(path=shots / "4-completed.png", full_page=True)
            plot.scroll_into_view_if_needed()
            page.screenshot(path=shots / "dashboard.png")
        except BaseException:
            page.screenshot(path=shots / "failure.png", full_page=True)
            raise
        finally:
            browser.close()
    if os.environ.get("QMPKIT_UPDATE_SCREENSHOT") == "1":
        shutil.copy(shots / "dashboard.png", ROOT / "docs" / "dashboard.png")
