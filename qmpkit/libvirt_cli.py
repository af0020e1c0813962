"""
The command line's libvirt path (``--libvirt URI --domain NAME``): ``mirror``,
``jobs``, ``job`` and ``nodes`` through libvirt's own API (`qmpkit.libvirt`),
so that libvirt's XML and its view of the job stay right. A face: options in,
text out; the work is in `qmpkit.libvirt`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, TextIO

from .errors import ArgumentError, JobFailedError, JobTimeoutError, QmpkitError
from .libvirt import LibvirtDomain, LibvirtSampler
from .units import format_rate, format_size

__all__ = ["cmd_mirror", "cmd_jobs", "cmd_nodes", "cmd_job", "LIBVIRT_MIRROR_OPTIONS"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TIMEOUT = 0, 1, 2, 3

#: the options of ``qmpkit mirror`` that the libvirt path takes
LIBVIRT_MIRROR_OPTIONS = ("granularity", "buf_size", "speed", "copy_mode", "sync")


class LibvirtUsage(ArgumentError):
    pass


def _need(ns: argparse.Namespace, *names: str) -> None:
    for name in names:
        if not getattr(ns, name, None):
            raise LibvirtUsage(name, "is needed with --libvirt")


async def cmd_mirror(ns: argparse.Namespace, qmp_options: dict[str, Any], out: TextIO) -> int:
    """``qmpkit mirror --libvirt URI --domain NAME --disk vda --target-file PATH``."""
    _need(ns, "domain", "disk", "target_file")
    opts = dict(qmp_options)
    args = {k: opts.pop(k) for k in LIBVIRT_MIRROR_OPTIONS if k in opts}
    opts.pop("job_id", None)                    # libvirt names its jobs itself
    if args.get("sync") in (None, "full"):
        args.pop("sync", None)
    bandwidth = args.pop("speed", None)
    copy_mode = args.pop("copy_mode", None) or "background"
    dest = str(Path(ns.target_file).resolve())
    # every check before anything starts (raises ArgumentError naming the option)
    from .libvirt import block_copy_arguments
    block_copy_arguments(dest, bandwidth=bandwidth, copy_mode=copy_mode,
                         reuse_ext=bool(ns.reuse_ext), **args, **opts)
    async with await LibvirtDomain.open(ns.libvirt, ns.domain) as dom:
        sampler = LibvirtSampler(dom, ns.disk, hz=ns.hz, passthrough=not ns.no_passthrough)
        out.write(f"blockCopy {ns.disk} of {ns.domain} -> {dest} "
                  f"({'passthrough sampling' if sampler.passthrough else 'blockJobInfo only'})\n")
        outcome = "failed"
        try:
            async with sampler:
                await dom.block_copy(ns.disk, dest, bandwidth=bandwidth, copy_mode=copy_mode,
                                     reuse_ext=bool(ns.reuse_ext), **args, **opts)
                try:
                    await dom.wait_ready(ns.disk, timeout=ns.timeout)
                except JobTimeoutError as exc:
                    out.write(f"qmpkit: timeout: {exc}; cancelling (the source is untouched)\n")
                    await dom.cancel(ns.disk)
                    await dom.wait_ended(ns.disk, timeout=60)
                    outcome = "timeout"
                    return EXIT_TIMEOUT
                info = await dom.job_info(ns.disk) or {}
                out.write(f"READY: {ns.disk} is in sync ({format_size(info.get('end', 0))})\n")
                if ns.then == "leave":
                    outcome = "left"
                    out.write(f"job on {ns.disk} left running in READY; see `qmpkit jobs "
                              f"--libvirt {ns.libvirt} --domain {ns.domain}`\n")
                    return EXIT_OK
                if ns.then == "cancel":
                    await dom.cancel(ns.disk)
                else:
                    await dom.complete(ns.disk)
                await dom.wait_ended(ns.disk, timeout=60)
                outcome = "completed" if ns.then == "complete" else "cancelled"
        except JobFailedError as exc:
            out.write(f"qmpkit: the copy failed: {exc}\n")
            return EXIT_FAILED
        finally:
            if ns.out is not None:
                trace = sampler.trace(meta={"outcome": outcome},
                                      completed=outcome == "completed")
                out.write(f"trace saved in {trace.save(ns.out)}\n")
        now = {d.target: d for d in await dom.disks()}.get(ns.disk)
        source = now.source if now else "?"
        if outcome == "completed":
            if source != dest:
                out.write(f"qmpkit: libvirt's XML names {source}, not {dest}\n")
                return EXIT_FAILED
            out.write(f"completed: {ns.disk} now writes to {dest} (libvirt's XML agrees)\n")
        else:
            out.write(f"cancelled: {ns.disk} still writes to {source}\n")
    return EXIT_OK


async def cmd_jobs(ns: argparse.Namespace, out: TextIO) -> int:
    _need(ns, "domain")
    async with await LibvirtDomain.open(ns.libvirt, ns.domain) as dom:
        rows = []
        for d in await dom.disks():
            info = await dom.job_info(d.target)
            if info is not None:
                rows.append({"id": d.target, "type": "copy", "device": d.target,
                             "status": "ready" if info.get("cur") == info.get("end")
                             and info.get("end") else "running",
                             "current_progress": info.get("cur"),
                             "total_progress": info.get("end"),
                             "speed": info.get("bandwidth"), "ready": None, "paused": False,
                             "io_status": None})
    if ns.json:
        out.write(json.dumps(rows, indent=2) + "\n")
        return EXIT_OK
    out.write(f"{'DISK':<8} {'STATUS':<8} {'PROGRESS':>21} {'SPEED':>11}\n")
    for r in rows:
        prog = f"{format_size(r['current_progress'] or 0)} / {format_size(r['total_progress'] or 0)}"
        speed = format_rate(r["speed"]) if r["speed"] else "unlimited"
        out.write(f"{r['id']:<8} {r['status']:<8} {prog:>21} {speed:>11}\n")
    if not rows:
        out.write("(no block jobs)\n")
    return EXIT_OK


async def cmd_nodes(ns: argparse.Namespace, out: TextIO) -> int:
    _need(ns, "domain")
    async with await LibvirtDomain.open(ns.libvirt, ns.domain) as dom:
        rows = [{"disk": d.target, "node": d.node_name, "format": d.format,
                 "file": d.source} for d in await dom.disks()]
    if ns.json:
        out.write(json.dumps(rows, indent=2) + "\n")
        return EXIT_OK
    out.write(f"{'DISK':<8} {'NODE':<22} {'FORMAT':<7} FILE\n")
    for r in rows:
        out.write(f"{r['disk']:<8} {r['node'] or '-':<22} {r['format'] or '-':<7} "
                  f"{r['file']}\n")
    return EXIT_OK


async def cmd_job(ns: argparse.Namespace, out: TextIO) -> int:
    """``qmpkit job ACTION --libvirt URI --domain NAME DISK``: the job of a disk."""
    _need(ns, "domain")
    disk = ns.job_id
    if ns.action in ("pause", "resume", "change"):
        raise LibvirtUsage("action", f"libvirt has no block-job {ns.action}: it offers "
                                     "speed, complete (pivot), cancel and watch")
    async with await LibvirtDomain.open(ns.libvirt, ns.domain) as dom:
        if await dom.job_info(disk) is None:
            disks = ", ".join(d.target for d in await dom.disks())
            raise LibvirtUsage("JOB", f"no block job on disk {disk!r} of {ns.domain} "
                                      f"(its disks: {disks})")
        try:
            if ns.action == "speed":
                await dom.set_speed(disk, ns.rate)
                out.write(f"job on {disk} speed limit now "
                          f"{format_rate(ns.rate) if ns.rate else 'unlimited'}\n")
            elif ns.action == "complete":
                await dom.complete(disk)
                await dom.wait_ended(disk, timeout=ns.timeout)
                now = {d.target: d for d in await dom.disks()}.get(disk)
                out.write(f"job on {disk} completed: it now writes to "
                          f"{now.source if now else '?'}\n")
            elif ns.action == "cancel":
                await dom.cancel(disk)
                await dom.wait_ended(disk, timeout=ns.timeout)
                out.write(f"job on {disk} cancelled\n")
            else:                                                # watch
                await dom.wait_ready(disk, timeout=ns.timeout)
                out.write(f"job on {disk} is ready\n")
        except JobTimeoutError as exc:
            out.write(f"qmpkit: timeout: {exc}\n")
            return EXIT_TIMEOUT
        except QmpkitError as exc:
            out.write(f"qmpkit: {exc}\n")
            return EXIT_FAILED
    return EXIT_OK
