"""
qmpkit: watch QEMU's ``blockdev-mirror`` converge, and tune it with evidence.

The package is async first. Its layers, from QEMU up:

- `qmpkit.process` how children start: own session, die with qmpkit; temp-dir owners
- `qmpkit.daemon`  the embedded ``qemu-storage-daemon`` (the default QEMU)
- `qmpkit.client`  one QMP connection (qemu.qmp underneath)
- `qmpkit.nodes`   sources and targets as block nodes (``blockdev-add``)
- `qmpkit.link`    an emulated network (RTT, rate, faults) between two QEMUs
- `qmpkit.mirror`  ``blockdev-mirror`` arguments, checked, and the job
- `qmpkit.job`     block jobs driven by QMP events
- `qmpkit.images`  image files, with qemu-img and qemu-io
- `qmpkit.session` `Qemu`, the object that ties them together
- `qmpkit.workload` a guest-like write load: fio over NBD
- `qmpkit.record`  the sampler (`Recorder`), as an asyncio task
- `qmpkit.trace`   recorded runs, saved as folders
- `qmpkit.analysis` copy rate, the convergence forecast, summaries
- `qmpkit.predict` the mirror model: convergence and time to READY, before it starts
- `qmpkit.plots`   matplotlib figures of traces
- `qmpkit.lifecycle` `MirrorRun`: one mirror from start to end, and its cleanup
- `qmpkit.experiment` one recorded run on the embedded QEMU
- `qmpkit.demo`, `qmpkit.sweep`, `qmpkit.soak`  comparisons, tuning, integrity
- `qmpkit.widgets` ipywidgets panels for notebooks
- `qmpkit.cli`     the ``qmpkit`` command

Importing qmpkit starts nothing and reads no environment variable.
"""

import logging

from .client import Client
from .daemon import StorageDaemon
from .errors import (
    ArgumentError,
    JobError,
    JobFailedError,
    JobTimeoutError,
    QemuCommandError,
    QemuStartError,
    QmpConnectionError,
    QmpkitError,
    ToolError,
    VerifyError,
)
from .images import compare_images, create_image
from .job import Job, JobEnd, JobState
from .mirror import MirrorJob, mirror_arguments, start_mirror
from .nodes import BlockGraph, NodeInfo
from .session import Qemu
from .units import format_size, parse_rate, parse_size

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "Qemu", "StorageDaemon", "Client", "BlockGraph", "NodeInfo",
    "start_mirror", "mirror_arguments", "MirrorJob", "Job", "JobState", "JobEnd",
    "create_image", "compare_images", "parse_size", "parse_rate", "format_size",
    "QmpkitError", "ArgumentError", "QemuStartError", "ToolError", "QmpConnectionError",
    "QemuCommandError", "JobError", "JobFailedError", "JobTimeoutError", "VerifyError",
]
