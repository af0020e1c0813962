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


def test_the_faces_leave_the_mirror_lifecycle_to_MirrorRun():
    """Issue #17: cli.py and widgets.py turn options into calls and state into text or
    widgets; they never reach the QMP client, the job, images or the daemon, and never
    build a Recorder themselves."""
    import ast
    from pathlib import Path
    pkg = Path(qmpkit.__file__).parent
    for face in ("cli.py", "widgets.py"):
        tree = ast.parse((pkg / face).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not imported & {"client", "job", "images", "daemon"}, (face, imported)
        calls = {n.func.id for n in ast.walk(tree)
                 if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert "Recorder" not in calls and "start_mirror" not in calls, face
