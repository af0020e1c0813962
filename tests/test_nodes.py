"""Each node kind on a real qemu-storage-daemon, and the checks before blockdev-add."""

from __future__ import annotations

import asyncio

import pytest

from qmpkit import ArgumentError, Qemu, QemuCommandError, compare_images, create_image
from qmpkit.images import image_info
from qmpkit.nodes import parse_nbd_uri

MiB = 1 << 20


async def test_images_raw_and_qcow2_with_fill(qemu):
    await qemu.nodes.add_image("r", 4 * MiB, fill=0x11)
    await qemu.nodes.add_image("q", "4M", fmt="qcow2", fill=0x11)
    rows = {r["node"]: r for r in await qemu.nodes.table()}
    assert rows["r"]["driver"] == "raw" and rows["q"]["driver"] == "qcow2"
    assert rows["r"]["size"] == rows["q"]["size"] == 4 * MiB
    assert (qemu.workdir / "r.raw").read_bytes() == b"\x11" * (4 * MiB)
    await qemu.verify("r", "q")


async def test_mixed_fill_differs_per_mib(tmp_path):
    p = await create_image(tmp_path / "m.raw", 3 * MiB, fill="mixed")
    data = p.read_bytes()
    assert len({data[0], data[MiB], data[2 * MiB]}) == 3 and 0 not in (data[0], data[MiB])


async def test_paths_with_spaces_quotes_and_dashes(tmp_path):
    for name in ("with space.raw", "quo'te\".raw", "-dash.raw"):
        p = tmp_path / name
        await create_image(p, MiB, fill=3)
        assert (await image_info(p))["virtual-size"] == MiB
    await compare_images(tmp_path / "with space.raw", tmp_path / "-dash.raw")


@pytest.mark.parametrize("kwargs, argument, message", [
    ({"node_name": "1bad", "size": MiB}, "node_name", "a letter, then"),
    ({"node_name": "x" * 27, "size": MiB}, "node_name", "at most 26"),
    ({"node_name": "ok", "size": 0}, "size", "> 0"),
    ({"node_name": "ok", "size": "12Q"}, "size", "expected a size"),
    ({"node_name": "ok", "size": MiB, "fmt": "vmdk"}, "format", "raw, qcow2"),
    ({"node_name": "ok", "size": MiB, "fill": 256}, "fill", "[0, 255]"),
])
async def test_bad_image_arguments_are_refused_before_anything_is_made(qemu, kwargs, argument,
                                                                      message):
    node = kwargs.pop("node_name")
    with pytest.raises(ArgumentError) as ei:
        await qemu.nodes.add_image(node, **kwargs)
    assert ei.value.argument == argument and message in str(ei.value)
    assert await qemu.nodes.nodes() == []
    assert list(qemu.workdir.glob("*.raw")) == [] and list(qemu.workdir.glob("*.vmdk")) == []


async def test_duplicate_node_name_is_qemus_word(qemu):
    await qemu.nodes.add_null("n", MiB)
    with pytest.raises(QemuCommandError, match="Duplicate nodes with node-name='n'"):
        await qemu.nodes.add_null("n", MiB)


async def test_null_target_takes_a_mirror(qemu):
    await qemu.nodes.add_image("src", 16 * MiB, fill="mixed")
    await qemu.nodes.add_null("sink", "16M")
    job = await qemu.mirror(device="src", target="sink")
    await job.wait_ready(timeout=60)
    await job.cancel(force=False, timeout=60)
    assert job.state.failure() is None


async def test_throttled_target_is_slow_and_can_be_sped_up(qemu):
    await qemu.nodes.add_image("src", 32 * MiB, fill="mixed")
    await qemu.nodes.add_image("disk", 32 * MiB)
    await qemu.nodes.add_throttled("slow", "disk", bps_write="4M")
    rows = {r["node"]: r["driver"] for r in await qemu.nodes.table()}
    assert rows["slow"] == "throttle"
    job = await qemu.mirror(device="src", target="slow")
    await asyncio.sleep(1.0)                                   # sample the progress
    copied = (await job.info())["current-progress"]
    assert copied < 16 * MiB, f"{copied} bytes in 1 s through a 4 MiB/s throttle"
    await qemu.nodes.set_throttle("slow", bps_write="1G")
    await job.wait_ready(timeout=60)
    await job.complete(timeout=60)
    await compare_images(qemu.workdir / "src.raw", qemu.workdir / "disk.raw")
    with pytest.raises(ArgumentError, match="bps_write: must be > 0"):
        await qemu.nodes.add_throttled("slow2", "disk", bps_write=0)


async def test_delete_removes_a_node_and_its_children(qemu):
    await qemu.nodes.add_image("d", MiB)
    await qemu.nodes.add_throttled("t", "d", bps_write="1M")
    await qemu.nodes.delete("t")
    await qemu.nodes.delete("d")
    assert await qemu.nodes.nodes() == []
    objects = {o["name"] for o in await qemu.client.execute("qom-list", {"path": "/objects"})}
    assert "t-tg" not in objects


async def test_mirror_to_a_remote_nbd_target(qemu, tmp_path):
    remote = await Qemu.open(workdir=tmp_path)
    try:
        await remote.nodes.add_image("disk", 16 * MiB)
        uri = await remote.nodes.export_nbd("disk")
        await qemu.nodes.add_image("src", 16 * MiB, fill="mixed")
        await qemu.nodes.add_nbd("far", uri)
        assert (await qemu.nodes.node("far")).driver == "nbd"
        job = await qemu.mirror(device="src", target="far", granularity="1M")
        await job.wait_ready(timeout=60)
        await job.complete(timeout=60)
        await compare_images(qemu.workdir / "src.raw", remote.workdir / "disk.raw")
    finally:
        await remote.close()


def test_parse_nbd_uri():
    assert parse_nbd_uri("nbd+unix:///exp?socket=/tmp/s.sock") == (
        {"type": "unix", "path": "/tmp/s.sock"}, "exp")
    assert parse_nbd_uri("nbd://127.0.0.1:10810/disk") == (
        {"type": "inet", "host": "127.0.0.1", "port": "10810"}, "disk")
    assert parse_nbd_uri("nbd://localhost/") == (
        {"type": "inet", "host": "localhost", "port": "10809"}, "")
    for bad in ("http://x/y", "nbd+unix:///exp", "nbd:///x"):
        with pytest.raises(ArgumentError, match="uri"):
            parse_nbd_uri(bad)


async def test_node_options_reach_qemu(qemu, tmp_path):
    """Issue #16: what QEMU reports for a node opened with each option."""
    await qemu.nodes.add_image("a", 16 << 20, path=tmp_path / "a.raw", aio="native",
                               cache_direct=True, detect_zeroes="unmap", discard="unmap")
    await qemu.nodes.add_image("b", 16 << 20, path=tmp_path / "b.raw", aio="io_uring",
                               cache_no_flush=True, detect_zeroes="on")
    nodes = {n["node-name"]: n for n in
             await qemu.client.execute("query-named-block-nodes", {"flat": True})}
    assert nodes["a-file"]["cache"]["direct"] is True
    assert nodes["a"]["detect_zeroes"] == "unmap"
    assert nodes["b-file"]["cache"]["no-flush"] is True and nodes["b"]["detect_zeroes"] == "on"


@pytest.mark.parametrize("kwargs, message", [
    ({"aio": "native"}, "aio: aio=native needs cache.direct=on"),
    ({"detect_zeroes": "unmap"}, "detect_zeroes: detect-zeroes=unmap needs discard=unmap"),
    ({"aio": "posix"}, "aio: must be one of threads, native, io_uring"),
    ({"preallocation": "lots"}, "preallocation: must be one of off, falloc, full for raw"),
])
async def test_node_options_qemu_refuses_are_refused_first(qemu, tmp_path, kwargs, message):
    with pytest.raises(ArgumentError, match=message.replace("(", r"\(")):
        await qemu.nodes.add_image("x", 16 << 20, path=tmp_path / "x.raw", **kwargs)
    assert not (tmp_path / "x.raw").exists()
    assert "x" not in {n.node_name for n in await qemu.nodes.nodes()}


async def test_preallocation_full_allocates_the_file(tmp_path):
    from qmpkit import create_image
    await create_image(tmp_path / "f.raw", 8 << 20, preallocation="full")
    await create_image(tmp_path / "o.raw", 8 << 20, preallocation="off")
    assert (tmp_path / "f.raw").stat().st_blocks * 512 >= 8 << 20
    assert (tmp_path / "o.raw").stat().st_blocks * 512 < 1 << 20
