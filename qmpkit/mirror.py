"""
``blockdev-mirror`` with every argument QEMU has, checked before it is sent.

`mirror_arguments` is pure: it validates Python-style keyword arguments and
returns the exact QMP arguments. `start_mirror` also refuses a target smaller
than the source (QEMU 7.2 accepts one, and the job then fails on its own),
starts watching the job's events, and sends the command.

Arguments left as ``None`` are not sent, so QEMU's own defaults apply
(`QEMU_DEFAULTS` lists them).
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Mapping

from .client import Client
from .errors import ArgumentError
from .job import Job
from .names import check_job_id, check_new_node_name, check_node_ref, default_job_id
from .units import format_size, parse_rate, parse_size

__all__ = ["mirror_arguments", "start_mirror", "start_drive_mirror", "MirrorJob", "SYNC_MODES", "ON_ERROR",
           "COPY_MODES", "GRANULARITY_MIN", "GRANULARITY_MAX", "QEMU_DEFAULTS"]

log = logging.getLogger(__name__)

SYNC_MODES = ("full", "top", "none")
ON_ERROR = ("report", "ignore", "enospc", "stop")
COPY_MODES = ("background", "write-blocking")
GRANULARITY_MIN = 512
GRANULARITY_MAX = 64 << 20

#: What QEMU uses when an argument is left out (block/mirror.c, QEMU 7.2).
QEMU_DEFAULTS: dict[str, Any] = {
    "sync": "full",
    "speed": 0,                      # unlimited
    "granularity": "target cluster size clamped to [4 KiB, 64 KiB]; 64 KiB for raw",
    "buf-size": 16 << 20,            # 16 MiB
    "on-source-error": "report",
    "on-target-error": "report",
    "copy-mode": "background",
    "auto-finalize": True,
    "auto-dismiss": True,
}

#: QEMU keeps speed as an int64 of bytes/s.
SPEED_MAX = (1 << 63) - 1


def buf_size_max() -> int:
    """The largest buf-size worth asking for: the host's physical memory (QEMU
    has no cap of its own and allocates up to the whole buffer)."""
    import os
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 1 << 40


SyncMode = Literal["full", "top", "none"]
OnError = Literal["report", "ignore", "enospc", "stop"]
CopyMode = Literal["background", "write-blocking"]


def _choice(value: object, allowed: tuple[str, ...], argument: str) -> str:
    if value not in allowed:
        raise ArgumentError(argument, f"must be one of {', '.join(allowed)}; got {value!r}")
    return value  # type: ignore[return-value]


def _flag(value: object, argument: str) -> bool:
    if not isinstance(value, bool):
        raise ArgumentError(argument, f"must be true or false; got {value!r}")
    return value


def check_granularity(value: int | str, argument: str = "granularity") -> int:
    g = parse_size(value, name=argument)
    if not GRANULARITY_MIN <= g <= GRANULARITY_MAX:
        raise ArgumentError(argument, f"must be a power of two in [512 B, 64 MiB]; "
                                      f"got {value!r} ({g} bytes)")
    if g & (g - 1):
        raise ArgumentError(argument, f"must be a power of two in [512 B, 64 MiB]; "
                                      f"got {value!r} ({g} bytes)")
    return g


def mirror_arguments(*, device: str, target: str, job_id: str | None = None,
                     sync: SyncMode = "full", speed: int | str | None = None,
                     granularity: int | str | None = None,
                     buf_size: int | str | None = None, replaces: str | None = None,
                     on_source_error: OnError | None = None,
                     on_target_error: OnError | None = None,
                     copy_mode: CopyMode | None = None,
                     filter_node_name: str | None = None,
                     auto_finalize: bool | None = None,
                     auto_dismiss: bool | None = None) -> dict[str, Any]:
    """Validate mirror settings and return the exact ``blockdev-mirror`` arguments.

    Sizes take ``"64K"``, ``"16MiB"`` or bytes; ``speed`` is bytes/s (0 =
    unlimited). ``job_id`` defaults to ``device``, as in QEMU (or, for a name
    QEMU made itself such as ``#block177``, ``mirror-block177``), and is
    always sent so that the job's events can be told apart.

    :raise ArgumentError: naming the first bad argument and its accepted range.
    """
    check_node_ref(device, argument="device")
    check_node_ref(target, argument="target")
    args: dict[str, Any] = {
        "job-id": check_job_id(job_id if job_id is not None else default_job_id(device),
                               argument="job_id"),
        "device": device,
        "target": target,
        "sync": _choice(sync, SYNC_MODES, "sync"),
    }
    if device == target:
        raise ArgumentError("target", f"must differ from device; both are {device!r}")
    if speed is not None:
        args["speed"] = parse_rate(speed, name="speed")
        if args["speed"] > SPEED_MAX:
            raise ArgumentError("speed", f"must be in [0, {SPEED_MAX}] bytes/s (QEMU's "
                                         f"limit); got {speed!r}")
    if granularity is not None:
        args["granularity"] = check_granularity(granularity)
    if buf_size is not None:
        args["buf-size"] = parse_size(buf_size, name="buf_size")
        limit = buf_size_max()
        if args["buf-size"] > limit:
            raise ArgumentError("buf_size", f"must be in [0, {format_size(limit)}] (the host's "
                                            f"memory: QEMU allocates the buffer); got "
                                            f"{buf_size!r}")
    if replaces is not None:
        args["replaces"] = check_node_ref(replaces, argument="replaces")
    if on_source_error is not None:
        args["on-source-error"] = _choice(on_source_error, ON_ERROR, "on_source_error")
    if on_target_error is not None:
        args["on-target-error"] = _choice(on_target_error, ON_ERROR, "on_target_error")
    if copy_mode is not None:
        args["copy-mode"] = _choice(copy_mode, COPY_MODES, "copy_mode")
    if filter_node_name is not None:
        args["filter-node-name"] = check_new_node_name(filter_node_name,
                                                       argument="filter_node_name")
    if auto_finalize is not None:
        args["auto-finalize"] = _flag(auto_finalize, "auto_finalize")
    if auto_dismiss is not None:
        args["auto-dismiss"] = _flag(auto_dismiss, "auto_dismiss")
    return args


class MirrorJob(Job):
    """A running ``blockdev-mirror``: a `Job` that also knows its arguments."""

    def __init__(self, client: Client, job_id: str, *, arguments: Mapping[str, Any],
                 **kwargs: Any) -> None:
        super().__init__(client, job_id, **kwargs)
        self.arguments = dict(arguments)

    async def change(self, *, copy_mode: CopyMode) -> None:
        """Switch the running mirror's copy mode (``block-job-change``), e.g. from
        background to write-blocking: the rescue for a mirror that cannot converge.

        :raise UnsupportedError: this QEMU has no ``block-job-change`` (before 8.2).
        :raise QemuCommandError: QEMU refused (its message, word for word).
        """
        mode = _choice(copy_mode, COPY_MODES, "copy_mode")
        caps = await self.client.capabilities()
        caps.require("block_job_change", "changing a running mirror's copy mode",
                     argument="copy_mode")
        await self._command("block-job-change", {"id": self.job_id, "type": "mirror",
                                                 "copy-mode": mode})

    @property
    def device(self) -> str:
        return self.arguments["device"]

    @property
    def target(self) -> str:
        return self.arguments["target"]


async def _node_sizes(client: Client) -> dict[str, int]:
    sizes = {n["node-name"]: int(n.get("image", {}).get("virtual-size", 0))
             for n in await client.execute("query-named-block-nodes", {"flat": True})}
    for blk in await client.execute("query-block"):
        ins = blk.get("inserted")
        if ins and blk.get("device"):
            sizes.setdefault(blk["device"], int(ins.get("image", {}).get("virtual-size", 0)))
    return sizes


async def check_target_size(client: Client, device: str, target: str) -> None:
    """Refuse a target smaller than the source.

    Unknown names are left for QEMU to report in its own words.

    :raise ArgumentError: the target is smaller than the device.
    """
    sizes = await _node_sizes(client)
    if device in sizes and target in sizes and sizes[target] < sizes[device]:
        raise ArgumentError("target", f"{target!r} holds {format_size(sizes[target])} "
                                      f"({sizes[target]} bytes) but the source {device!r} "
                                      f"holds {format_size(sizes[device])} ({sizes[device]} "
                                      "bytes); the target must be at least as large")


async def start_mirror(client: Client, *, device: str, target: str,
                       check_sizes: bool = True, **options: Any) -> MirrorJob:
    """Start ``blockdev-mirror`` from ``device`` to ``target`` and return the job.

    ``options`` are those of `mirror_arguments`. The job's events are watched
    from before the command is sent.

    :raise ArgumentError: a bad argument, or a target smaller than the source.
    :raise QemuCommandError: QEMU refused (its message is kept word for word).
    """
    args = mirror_arguments(device=device, target=target, **options)
    if check_sizes:
        await check_target_size(client, device, target)
    return await _watched(client, "blockdev-mirror", args)


async def _watched(client: Client, command: str, args: dict[str, Any]) -> MirrorJob:
    job = MirrorJob.watch(client, args["job-id"], arguments=args,
                          auto_finalize=args.get("auto-finalize", True),
                          auto_dismiss=args.get("auto-dismiss", True))
    job.started()
    try:
        await client.execute(command, args)
    except BaseException:
        await job.abandon()
        raise
    log.info("%s %s started: %s", command, args["job-id"], args)
    return job


async def start_drive_mirror(client: Client, *, device: str, target_path: str, fmt: str,
                             node_name: str, **options: Any) -> MirrorJob:
    """``drive-mirror`` with ``mode=absolute-paths``: QEMU creates the target
    image and, at the pivot, makes the source its backing node (``sync=none``)
    or the source's backing node (``sync=top``). ``blockdev-mirror`` cannot do
    that for ``sync=none``: a target whose backing is the source would make
    the source a non-root node, which ``blockdev-mirror`` refuses.

    ``options`` are those of `mirror_arguments`, without ``filter_node_name``
    (drive-mirror has none).

    :raise ArgumentError: a bad argument.
    :raise QemuCommandError: QEMU refused.
    """
    if options.get("filter_node_name") is not None:
        raise ArgumentError("filter_node_name", "drive-mirror (used to create a sync=none "
                                                "target) has no filter-node-name")
    args = mirror_arguments(device=device, target=node_name, **options)
    args.update(target=target_path, format=fmt, mode="absolute-paths",
                **{"node-name": check_new_node_name(node_name, argument="target_node_name")})
    return await _watched(client, "drive-mirror", args)
