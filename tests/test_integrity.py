"""No data lost (a short soak), bad input by property, and the security promises."""

from __future__ import annotations

import ast
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from qmpkit import ArgumentError, Qemu, VerifyError, create_image, mirror_arguments
from qmpkit.mirror import COPY_MODES, ON_ERROR, SYNC_MODES
from qmpkit.soak import soak, totals
from qmpkit.workload import FioLoad, verify_image

MiB = 1 << 20
PACKAGE = Path(__file__).resolve().parent.parent / "qmpkit"


async def test_short_soak_loses_nothing(tmp_path):
    results = await soak(2, size="32M", seed=11, base_dir=tmp_path)
    assert len(results) == 2
    for r in results:
        assert r.compare_ok and r.fio_verify_ok, r
        assert r.bytes_written > 0 and r.bytes_mirrored >= 32 * MiB
    assert totals(results).endswith("mismatches 0")


async def test_fio_verify_catches_blocks_that_were_never_copied(tmp_path):
    """The soak's second check is not a rubber stamp: an image fio did not write fails."""
    img = await create_image(tmp_path / "x.raw", 32 * MiB, fill="mixed")
    with pytest.raises(VerifyError, match="fio verify"):
        await verify_image(img, FioLoad(io_size="4M", verify=True))


# -- bad input, by property ------------------------------------------------------------

names = st.from_regex(r"[A-Za-z][A-Za-z0-9_.-]{0,20}", fullmatch=True)
sizes = st.integers(min_value=9, max_value=26).map(lambda e: 1 << e)


@settings(max_examples=300)
@given(device=names, target=names, job_id=st.none() | names, sync=st.sampled_from(["full", "top", "none"]),
       speed=st.none() | st.integers(0, 1 << 40), granularity=st.none() | sizes,
       buf_size=st.none() | st.integers(0, 1 << 34),
       on_source_error=st.none() | st.sampled_from(["report", "ignore", "stop", "enospc"]),
       on_target_error=st.none() | st.sampled_from(["report", "ignore", "stop", "enospc"]),
       copy_mode=st.none() | st.sampled_from(["background", "write-blocking"]),
       auto_finalize=st.none() | st.booleans(), auto_dismiss=st.none() | st.booleans())
def test_every_valid_combination_builds_the_exact_qmp_arguments(**kw):
    if kw["device"] == kw["target"]:
        return
    args = mirror_arguments(**kw)
    expected = {"job-id": kw["job_id"] or kw["device"], "device": kw["device"],
                "target": kw["target"], "sync": kw["sync"]}
    for key, qmp in (("speed", "speed"), ("granularity", "granularity"),
                     ("buf_size", "buf-size"), ("on_source_error", "on-source-error"),
                     ("on_target_error", "on-target-error"), ("copy_mode", "copy-mode"),
                     ("auto_finalize", "auto-finalize"), ("auto_dismiss", "auto-dismiss")):
        if kw[key] is not None:
            expected[qmp] = kw[key]
    assert args == expected


@given(st.sampled_from(["granularity", "buf_size", "speed", "sync", "copy_mode", "job_id",
                        "on_target_error", "auto_dismiss", "filter_node_name"]),
       st.one_of(st.integers(max_value=-1), st.text(min_size=1, max_size=8).filter(
           lambda t: not t.strip().isdigit()), st.floats(allow_nan=True)))
def test_every_invalid_value_is_refused_naming_its_argument(argument, value):
    try:
        mirror_arguments(device="src", target="dst", **{argument: value})
    except ArgumentError as exc:
        assert exc.argument == argument
        assert str(exc).startswith(f"{argument}: ")
    else:
        # Only values that are valid after all may pass: the text "4K" for a size, or
        # a random text that happens to be a mode's name ("none" for sync)
        modes = {"sync": SYNC_MODES, "copy_mode": COPY_MODES, "on_target_error": ON_ERROR}
        assert argument in ("granularity", "buf_size", "speed", "job_id", "filter_node_name") \
            or value in modes.get(argument, ())


# -- security ---------------------------------------------------------------------------

async def test_sockets_live_in_private_dirs_and_nothing_listens_on_tcp(tmp_path):
    qemu = await Qemu.open(workdir=tmp_path, spare_monitors=1)
    try:
        await qemu.nodes.add_image("src", MiB)
        uri = await qemu.nodes.export_nbd("src")
        sock = Path(uri.split("socket=")[1])
        for path in (qemu.daemon.qmp_path, qemu.daemon.monitor_path(1), sock):
            assert stat.S_ISSOCK(os.stat(path).st_mode)
            assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        assert _tcp_listeners(qemu.daemon.pid) == []
    finally:
        await qemu.close()


def _tcp_listeners(pid: int) -> list[str]:
    """TCP sockets in LISTEN state that belong to ``pid``."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] == "0A" and parts[9] in inodes:
                found.append(parts[1])
    return found


def test_no_subprocess_goes_through_a_shell():
    """Every child is started from an argument list: no shell=True, no os.system."""
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "shell":
                assert not (isinstance(node.value, ast.Constant) and node.value.value), path
            if isinstance(node, ast.Attribute) and node.attr in ("system", "popen",
                                                                  "create_subprocess_shell"):
                pytest.fail(f"{path.name}: {node.attr}")


@pytest.mark.parametrize("name", ["-rf", "a b", "x;rm", "../up", "é", "a" * 32, ""])
async def test_node_names_are_checked_before_qemu_is_asked(qemu, name):
    with pytest.raises(ArgumentError, match="node_name"):
        await qemu.nodes.add_null(name, MiB)
    assert await qemu.nodes.nodes() == []
