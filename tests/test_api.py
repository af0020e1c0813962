"""The public surface: what `import qmpkit` gives, and what it does not do."""

import subprocess
import sys

import qmpkit


def test_public_names_are_pinned():
    assert sorted(qmpkit.__all__) == sorted([
        "Qemu", "StorageDaemon", "Client", "BlockGraph", "NodeInfo",
        "start_mirror", "mirror_arguments", "MirrorJob", "Job", "JobState", "JobEnd",
        "create_image", "compare_images", "parse_size", "parse_rate", "format_size",
        "QmpkitError", "ArgumentError", "QemuStartError", "ToolError", "QmpConnectionError",
        "QemuCommandError", "JobError", "JobFailedError", "JobTimeoutError", "VerifyError",
    ])
    for name in qmpkit.__all__:
        assert getattr(qmpkit, name) is not None


def test_every_error_derives_from_one_root():
    for name in qmpkit.__all__:
        obj = getattr(qmpkit, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, qmpkit.QmpkitError), name
    assert issubclass(qmpkit.ArgumentError, ValueError)
    assert issubclass(qmpkit.JobTimeoutError, TimeoutError)


def test_import_is_light_and_starts_nothing():
    code = ("import sys, qmpkit, threading; "
            "heavy = [m for m in ('matplotlib', 'ipywidgets', 'pandas') if m in sys.modules]; "
            "print(heavy, threading.active_count())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"PATH": "/usr/bin:/bin"}).stdout
    assert out.strip() == "[] 1"
