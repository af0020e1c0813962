"""pytest set-up shared by tests/ and notebooks/ (nbval).

- The notebooks run quick (small disks, short loads): QMPKIT_NOTEBOOK_QUICK=1
  is inherited by the kernels nbval starts.
- nbval waits only 5 s for a cell's late output; that is flaky on 2 cores.
- Widget views, HTML and stderr are not compared (widget ids are random).
"""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    os.environ["QMPKIT_NOTEBOOK_QUICK"] = "1"


def pytest_collectstart(collector: pytest.Collector) -> None:
    if collector.__class__.__name__ == "IPyNbFile":
        collector.skip_compare += ("text/html", "application/javascript", "stderr",
                                   "application/vnd.jupyter.widget-view+json")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.__class__.__name__ == "IPyNbCell":
            item.output_timeout = 60
