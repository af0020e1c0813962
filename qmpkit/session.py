"""
`Qemu`: the one object a user opens. It is the embedded ``qemu-storage-daemon``
by default, or a QEMU that already runs when given its QMP address::

    async with await Qemu.open() as qemu:                  # embedded
        await qemu.nodes.add_image("src", "1G", fill="mixed")
        await qemu.nodes.add_image("dst", "1G")
        job = await qemu.mirror(device="src", target="dst", granularity="4K")
        await job.wait_ready(timeout=120)
        await job.complete()
        await qemu.verify("src", "dst")

    qemu = await Qemu.open("/run/vm1/qmp.sock")            # a running VM
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

from .client import Client
from .daemon import StorageDaemon
from .errors import ArgumentError, QmpkitError
from .images import FORMATS, compare_images
from .mirror import MirrorJob, start_mirror
from .nodes import BlockGraph
from .process import OWNER_FILE, mark_owner, remove_stale_dirs

__all__ = ["Qemu"]

#: drivers that pass data through to their ``file`` child unchanged
FILTERS = ("throttle", "copy-on-read", "preallocate", "compress")


class Qemu:
    """A QEMU to mirror on, with its node graph (`nodes`) and a private workdir."""

    def __init__(self, client: Client, *, workdir: Path,
                 daemon: StorageDaemon | None = None, own_workdir: bool = False) -> None:
        self.client = client
        self.daemon = daemon
        self.workdir = workdir
        self.nodes = BlockGraph(client, workdir)
        self._own_workdir = own_workdir

    @classmethod
    async def open(cls, qmp: str | tuple[str, int] | None = None, *,
                   workdir: os.PathLike[str] | str | None = None,
                   binary: str = "qemu-storage-daemon", spare_monitors: int = 0,
                   timeout: float = 15.0, command_timeout: float | None = None,
                   extra_args: Sequence[str] = ()) -> "Qemu":
        """Start the embedded daemon (``qmp=None``) or attach to ``qmp``.

        ``spare_monitors`` gives the embedded daemon more QMP sockets, for
        other clients such as the ``qmpkit`` command (see `StorageDaemon`).
        ``command_timeout`` is how long one QMP command may take (see
        `Client.execute`). ``extra_args`` go to the embedded daemon's command line
        (``["--trace", "mirror_*"]``).

        :raise QemuStartError: the embedded daemon did not start.
        :raise QmpConnectionError: nothing answers QMP at ``qmp``.
        """
        if qmp is None:
            daemon = StorageDaemon(binary=binary, base_dir=workdir,
                                   spare_monitors=spare_monitors, extra_args=extra_args)
            client = await daemon.start(timeout=timeout)
            if command_timeout is not None:
                client.command_timeout = command_timeout
            assert daemon.workdir is not None
            return cls(client, workdir=daemon.workdir, daemon=daemon)
        client = await Client.attach(qmp, timeout=timeout)
        if command_timeout is not None:
            client.command_timeout = command_timeout
        if workdir is None:
            remove_stale_dirs()
            own = Path(tempfile.mkdtemp(prefix="qmpkit-"))
            mark_owner(own)
            return cls(client, workdir=own, own_workdir=True)
        return cls(client, workdir=Path(workdir))

    @property
    def embedded(self) -> bool:
        return self.daemon is not None

    async def mirror(self, *, device: str, target: str, **options: Any) -> MirrorJob:
        """`start_mirror` on this QEMU."""
        return await start_mirror(self.client, device=device, target=target, **options)

    async def jobs(self) -> list[dict[str, Any]]:
        """Every block job as plain data: ``id``, ``type``, ``device`` (the source
        node, from the block graph), ``status``, ``current_progress``,
        ``total_progress``, ``speed``, ``ready``, ``paused``, ``io_status``."""
        jobs = await self.client.execute("query-block-jobs")
        sources: dict[str, str] = {}
        try:
            # a VM's disk is known by its drive id (vd0), not by its node (#block138)
            drives = {b["inserted"]["node-name"]: b["device"]
                      for b in await self.client.execute("query-block")
                      if b.get("inserted") and b.get("device")}
            graph = await self.client.execute("x-debug-query-block-graph")
            ids = {n["id"]: n for n in graph["nodes"]}
            for e in graph["edges"]:
                parent = ids[e["parent"]]
                if parent["type"] == "block-job" and e["name"] == "source":
                    node = ids[e["child"]]["name"]
                    sources[parent["name"]] = drives.get(node, node)
        except QmpkitError:
            pass
        rows = []
        for j in jobs:
            rows.append({"id": j["device"], "type": j["type"],
                         "device": sources.get(j["device"], ""),
                         "status": j.get("status", ""), "current_progress": j["offset"],
                         "total_progress": j["len"], "speed": j["speed"],
                         "ready": bool(j.get("ready")), "paused": bool(j.get("paused")),
                         "io_status": j.get("io-status", "ok")})
        return rows

    async def image_of(self, node_name: str) -> tuple[str, str]:
        """(file path, format) of a node that is a raw/qcow2 image on a local file.

        :raise ArgumentError: the node is not such an image.
        """
        info = await self.nodes.node(node_name)
        seen = {info.node_name}
        while info.driver not in FORMATS:
            # A filter (throttle, ...) over an image: look through it.
            child = (await self.nodes.children(info.node_name)).get("file")
            if info.driver not in FILTERS or child is None or child in seen:
                raise ArgumentError("node", f"{node_name!r} is a {info.driver} node, not a "
                                            "raw/qcow2 image on a local file (or a filter "
                                            "over one): it cannot be compared")
            seen.add(child)
            info = await self.nodes.node(child)
        path = await self.nodes.image_file(info)
        return path, info.driver

    async def verify(self, source: str, target: str) -> None:
        """Check that two image nodes hold the same data (``qemu-img compare``).

        Call it after the job has ended: a running mirror holds the target.

        :raise VerifyError: the data differ.
        """
        src, src_fmt = await self.image_of(source)
        dst, dst_fmt = await self.image_of(target)
        await compare_images(src, dst, fmt_a=src_fmt, fmt_b=dst_fmt)

    async def close(self) -> None:
        """Stop the embedded daemon (or just disconnect). Safe to call twice."""
        if self.daemon is not None:
            await self.daemon.stop()
        else:
            await self.client.close()
            if self._own_workdir:
                # Images made here may now belong to the VM: remove the dir only if empty.
                with contextlib.suppress(OSError):
                    (self.workdir / OWNER_FILE).unlink()
                    self.workdir.rmdir()

    async def __aenter__(self) -> "Qemu":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
