"""
Sources and targets as QEMU block nodes, added with ``blockdev-add``.

`BlockGraph` builds the node kinds a mirror experiment needs:

==========================  ==================================================
`BlockGraph.add_image`      a raw/qcow2 file (created, optionally filled)
`BlockGraph.add_file`       an existing raw/qcow2 file
`BlockGraph.add_throttled`  a ``throttle`` filter over a node: a slow disk
`BlockGraph.add_null`       a ``null-co`` node that discards writes
`BlockGraph.add_overlay`    a qcow2 overlay over a backing node (sync=top/none)
`BlockGraph.add_blkdebug`   a node that injects I/O errors (``blkdebug``)
`BlockGraph.add_nbd`        a remote NBD export as a node
`BlockGraph.add_quorum`     a ``quorum`` node over children (``replaces`` tests)
==========================  ==================================================

and exports a node over NBD (`BlockGraph.export_nbd`), the way fio writes
into a source like a guest would. An export always attaches to the top of the
node's job-filter chain: from QEMU 8.2 the mirror's dirty bitmap lives on its
filter node, and a writer attached *under* the filter would never be copied.
"""

from __future__ import annotations

import logging
import os
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .client import Client
from .errors import ArgumentError, QemuCommandError
from .images import FORMATS, create_image
from .names import NODE_NAME_MAX, check_new_node_name, check_node_ref, derived_name
from .units import parse_rate, parse_size

__all__ = ["BlockGraph", "NodeInfo", "ERRNO", "parse_nbd_uri", "graph_children",
           "check_node_options", "AIO_MODES", "DETECT_ZEROES"]

log = logging.getLogger(__name__)

#: errno values blkdebug can inject, by name.
ERRNO = {"EIO": 5, "ENOSPC": 28, "EPERM": 1, "EROFS": 30}
#: the implicit filters that block jobs insert above their source: a new parent
#: of the source must attach above them, or its writes bypass the job.
JOB_FILTERS = frozenset({"mirror_top", "commit_top", "copy-before-write"})
BLKDEBUG_EVENTS = ("read_aio", "write_aio", "flush_to_disk", "none")
DISCARD = ("ignore", "unmap")
_FILE_SUFFIX = "-file"


@dataclass(frozen=True)
class NodeInfo:
    """One row of the node graph."""
    node_name: str
    driver: str
    size: int
    file: str
    read_only: bool
    dirty_bitmaps: tuple[dict[str, Any], ...] = ()

    @classmethod
    def from_qmp(cls, d: dict[str, Any]) -> "NodeInfo":
        return cls(node_name=d["node-name"], driver=d["drv"],
                   size=int(d.get("image", {}).get("virtual-size", 0)),
                   file=d.get("file", ""), read_only=bool(d.get("ro")),
                   dirty_bitmaps=tuple(d.get("dirty-bitmaps", ())))


def parse_nbd_uri(uri: str) -> tuple[dict[str, Any], str]:
    """``nbd+unix:///EXPORT?socket=PATH`` or ``nbd://HOST[:PORT]/EXPORT`` -> (server, export).

    :raise ArgumentError: for any other form.
    """
    u = urllib.parse.urlsplit(uri)
    export = urllib.parse.unquote(u.path.lstrip("/"))
    if u.scheme == "nbd+unix":
        sock = urllib.parse.parse_qs(u.query).get("socket")
        if not sock:
            raise ArgumentError("uri", f"nbd+unix URI needs ?socket=PATH: {uri!r}")
        return {"type": "unix", "path": sock[0]}, export
    if u.scheme in ("nbd", "nbd+tcp"):
        if not u.hostname:
            raise ArgumentError("uri", f"nbd URI needs a host: {uri!r}")
        return {"type": "inet", "host": u.hostname, "port": str(u.port or 10809)}, export
    raise ArgumentError("uri", "expected nbd://HOST[:PORT]/EXPORT or "
                               f"nbd+unix:///EXPORT?socket=PATH; got {uri!r}")


AIO_MODES = ("threads", "native", "io_uring")
DETECT_ZEROES = ("off", "on", "unmap")


def check_node_options(*, aio: str | None = None, cache_direct: bool = False,
                       detect_zeroes: str | None = None, discard: str | None = None) -> None:
    """Refuse, before QEMU is asked, the node options QEMU refuses, with its reason.

    :raise ArgumentError: naming the option.
    """
    if aio is not None and aio not in AIO_MODES:
        raise ArgumentError("aio", f"must be one of {', '.join(AIO_MODES)}; got {aio!r}")
    if aio == "native" and not cache_direct:
        raise ArgumentError("aio", "aio=native needs cache.direct=on (QEMU refuses it "
                                   "otherwise: Linux native AIO is only asynchronous with "
                                   "O_DIRECT)")
    if detect_zeroes is not None and detect_zeroes not in DETECT_ZEROES:
        raise ArgumentError("detect_zeroes", f"must be one of {', '.join(DETECT_ZEROES)}; "
                                             f"got {detect_zeroes!r}")
    if detect_zeroes == "unmap" and discard != "unmap":
        raise ArgumentError("detect_zeroes", "detect-zeroes=unmap needs discard=unmap (QEMU "
                                             "refuses it otherwise: zeroes are unmapped by "
                                             "discarding)")


async def graph_children(client: Client, parent_type: str, parent: str) -> dict[str, str]:
    """The children of one parent in QEMU's block graph, by edge name.

    ``parent_type`` is ``block-driver`` (a node, by node name) or ``block-job`` (a
    job, by job id). Uses the unstable ``x-debug-query-block-graph``.

    :raise QemuCommandError: this QEMU does not have that command.
    """
    graph = await client.execute("x-debug-query-block-graph")
    ids = {n["id"]: n for n in graph["nodes"]}
    return {e["name"]: ids[e["child"]]["name"] for e in graph["edges"]
            if ids[e["parent"]]["type"] == parent_type and ids[e["parent"]]["name"] == parent}


class BlockGraph:
    """Adds, lists and removes block nodes on one QEMU.

    :param client: the QMP connection.
    :param workdir: where images are created when no path is given.
    """

    def __init__(self, client: Client, workdir: os.PathLike[str] | str) -> None:
        self.client = client
        self.workdir = Path(workdir)
        self._nbd_socket: Path | None = None

    # -- reading the graph ---------------------------------------------------

    async def nodes(self) -> list[NodeInfo]:
        """Every named node (QEMU's ``query-named-block-nodes``, flat)."""
        raw = await self.client.execute("query-named-block-nodes", {"flat": True})
        return [NodeInfo.from_qmp(d) for d in raw]

    async def node(self, name: str) -> NodeInfo:
        """:raise ArgumentError: no node (or device) by that name."""
        for info in await self.nodes():
            if info.node_name == name:
                return info
        # A device name (a VM's drive) is not a node name: look it up too.
        for blk in await self.client.execute("query-block"):
            if blk.get("device") == name and "inserted" in blk:
                ins = blk["inserted"]
                return NodeInfo(node_name=ins["node-name"], driver=ins["drv"],
                                size=int(ins.get("image", {}).get("virtual-size", 0)),
                                file=ins.get("file", ""), read_only=bool(ins.get("ro")))
        raise ArgumentError("node", f"QEMU has no block node or device named {name!r}")

    async def children(self, node_name: str) -> dict[str, str]:
        """A node's children by edge name (``file``, ``backing``...), from QEMU's block graph."""
        return await graph_children(self.client, "block-driver", node_name)

    async def table(self) -> list[dict[str, Any]]:
        """The node graph as rows, for display: ``node``, ``driver``, ``size``,
        ``file`` (a path, also for a filter whose own name is a ``json:`` string),
        ``device`` (the drive id or qdev that uses the node), ``job`` (``JOB (role)``
        of a block job that holds it) and ``export`` (the export id that serves it)."""
        nodes = await self.nodes()
        by_name = {n.node_name: n for n in nodes}
        devices = {}
        for b in await self.client.execute("query-block"):
            ins = b.get("inserted")
            if ins:
                devices[ins["node-name"]] = b.get("device") or b.get("qdev", "")
        exports: dict[str, str] = {}
        try:
            for e in await self.client.execute("query-block-exports"):
                exports[e["node-name"]] = e["id"]
        except QemuCommandError:
            pass
        jobs: dict[str, str] = {}
        children: dict[str, str] = {}
        try:
            graph = await self.client.execute("x-debug-query-block-graph")
            ids = {g["id"]: g for g in graph["nodes"]}
            for e in graph["edges"]:
                parent, child = ids[e["parent"]], ids[e["child"]]
                if parent["type"] == "block-job":
                    jobs.setdefault(child["name"], f"{parent['name']} ({e['name']})")
                elif parent["type"] == "block-driver" and e["name"] == "file":
                    children[parent["name"]] = child["name"]
        except QemuCommandError:
            pass

        def path(n: NodeInfo) -> str:
            seen = {n.node_name}
            while n.file.startswith("json:") and children.get(n.node_name) in by_name:
                n = by_name[children[n.node_name]]
                if n.node_name in seen:
                    break
                seen.add(n.node_name)
            return n.file

        return [{"node": n.node_name, "driver": n.driver, "size": n.size, "file": path(n),
                 "device": devices.get(n.node_name, ""), "job": jobs.get(n.node_name, ""),
                 "export": exports.get(n.node_name, "")} for n in nodes]

    # -- adding nodes --------------------------------------------------------

    async def add(self, options: dict[str, Any]) -> str:
        """``blockdev-add`` with raw QAPI options; returns the node name."""
        await self.client.execute("blockdev-add", options)
        return options["node-name"]

    async def add_file(self, node_name: str, path: os.PathLike[str] | str, *,
                       fmt: str = "raw", read_only: bool = False,
                       aio: Literal["threads", "native", "io_uring"] | None = None,
                       cache_direct: bool = False,
                       backing: str | None | Literal[False] = False,
                       discard: Literal["ignore", "unmap"] | None = None,
                       cache_no_flush: bool = False,
                       detect_zeroes: Literal["off", "on", "unmap"] | None = None) -> str:
        """Open an existing image as ``node_name`` (format node over ``NAME-file``).

        :param backing: for qcow2, the node to use as backing (``None`` means
            no backing); by default QEMU opens the backing file the image names.
        :param discard: ``unmap`` passes discards down to the file (QEMU's default
            is ``ignore``).
        :param aio: ``threads`` (QEMU's default), ``native`` (needs
            ``cache_direct``) or ``io_uring``.
        :param cache_direct: open with O_DIRECT (``cache.direct=on``): no page cache.
        :param cache_no_flush: ignore flushes (``cache.no-flush=on``): fast, unsafe.
        :param detect_zeroes: ``off``, ``on`` or ``unmap`` (needs ``discard="unmap"``).
        :raise ArgumentError: a combination QEMU refuses, with QEMU's reason.
        """
        check_node_options(aio=aio, cache_direct=cache_direct, detect_zeroes=detect_zeroes,
                           discard=discard)
        self._check_stacked_name(node_name)
        if fmt not in FORMATS:
            raise ArgumentError("format", f"must be one of {', '.join(FORMATS)}; got {fmt!r}")
        path = Path(path)
        if not path.exists():
            raise ArgumentError("path", f"no such image file: {str(path)!r}")
        proto: dict[str, Any] = {"driver": "file", "filename": str(path.resolve()),
                                 "node-name": node_name + _FILE_SUFFIX}
        if aio is not None:
            proto["aio"] = aio
        if cache_direct or cache_no_flush:
            proto["cache"] = {"direct": bool(cache_direct), "no-flush": bool(cache_no_flush)}
        opts: dict[str, Any] = {"driver": fmt, "node-name": node_name, "file": proto,
                                "read-only": read_only}
        if detect_zeroes is not None:
            opts["detect-zeroes"] = detect_zeroes
        if discard is not None:
            if discard not in DISCARD:
                raise ArgumentError("discard", f"must be one of {', '.join(DISCARD)}; "
                                               f"got {discard!r}")
            opts["discard"] = proto["discard"] = discard
        if backing is not False:
            if fmt != "qcow2":
                raise ArgumentError("backing", "only qcow2 nodes have a backing node")
            opts["backing"] = backing
        return await self.add(opts)

    async def add_image(self, node_name: str, size: int | str, *, fmt: str = "raw",
                        fill: int | Literal["mixed"] | None = None,
                        path: os.PathLike[str] | str | None = None,
                        aio: Literal["threads", "native", "io_uring"] | None = None,
                        cluster_size: int | str | None = None,
                        discard: Literal["ignore", "unmap"] | None = None,
                        cache_direct: bool = False, cache_no_flush: bool = False,
                        detect_zeroes: Literal["off", "on", "unmap"] | None = None,
                        preallocation: str | None = None) -> str:
        """Create an image file (in the workdir unless ``path``) and add it as a node,
        with the node options of `add_file` and qemu-img's ``preallocation``."""
        self._check_stacked_name(node_name)
        check_node_options(aio=aio, cache_direct=cache_direct, detect_zeroes=detect_zeroes,
                           discard=discard)
        path = Path(path) if path is not None else self.workdir / f"{node_name}.{fmt}"
        await create_image(path, size, fmt=fmt, fill=fill, cluster_size=cluster_size,
                           preallocation=preallocation)
        return await self.add_file(node_name, path, fmt=fmt, aio=aio, discard=discard,
                                   cache_direct=cache_direct, cache_no_flush=cache_no_flush,
                                   detect_zeroes=detect_zeroes)

    async def add_throttled(self, node_name: str, child: str, *, bps_write: int | str,
                            bps_read: int | str | None = None) -> str:
        """Put a ``throttle`` filter named ``node_name`` over ``child``.

        The limit lives in a ``throttle-group`` object called ``NAME-tg``.
        Mirror into ``node_name`` to mirror into a slow disk.
        """
        check_new_node_name(node_name, argument="node_name")
        check_node_ref(child, argument="child")
        limits = {"bps-write": self._positive_rate(bps_write, "bps_write")}
        if bps_read is not None:
            limits["bps-read"] = self._positive_rate(bps_read, "bps_read")
        group = f"{node_name}-tg"
        await self.client.execute("object-add", {"qom-type": "throttle-group", "id": group,
                                                 "limits": limits})
        try:
            return await self.add({"driver": "throttle", "node-name": node_name,
                                   "throttle-group": group, "file": child})
        except QemuCommandError:
            await self.client.execute("object-del", {"id": group})
            raise

    async def set_throttle(self, node_name: str, *, bps_write: int | str) -> None:
        """Change a throttled node's write limit while it runs."""
        await self.client.execute("qom-set", {"path": f"{node_name}-tg", "property": "limits",
                                              "value": {"bps-write": self._positive_rate(
                                                  bps_write, "bps_write")}})

    async def add_null(self, node_name: str, size: int | str) -> str:
        """A ``null-co`` node of ``size``: writes vanish, reads return zeroes."""
        check_new_node_name(node_name, argument="node_name")
        nbytes = self._positive_size(size)
        return await self.add({"driver": "null-co", "node-name": node_name, "size": nbytes,
                               "read-zeroes": True})

    async def add_overlay(self, node_name: str, backing: str, *,
                          path: os.PathLike[str] | str | None = None) -> str:
        """Create a qcow2 overlay whose backing file is ``backing``'s image, and add it
        with ``backing`` as its backing node: the top layer for ``sync=top``.
        """
        self._check_stacked_name(node_name)
        base = await self.node(check_node_ref(backing, argument="backing"))
        base_file = await self.image_file(base)
        base_fmt = base.driver if base.driver in FORMATS else "raw"
        path = Path(path) if path is not None else self.workdir / f"{node_name}.qcow2"
        await create_image(path, base.size, fmt="qcow2", backing=base_file,
                           backing_fmt=base_fmt)
        return await self.add_file(node_name, path, fmt="qcow2", backing=backing)

    async def add_blkdebug(self, node_name: str, path: os.PathLike[str] | str | None = None, *,
                           size: int | str | None = None, fmt: str = "raw",
                           fill: int | Literal["mixed"] | None = None,
                           errno: int | str = "ENOSPC",
                           io: Literal["write", "read", "flush"] = "write",
                           once: bool = False, sector: int | None = None,
                           rules: list[dict[str, Any]] | None = None,
                           set_state: list[dict[str, Any]] | None = None) -> str:
        """An image node whose I/O fails: ``fmt`` over ``blkdebug`` over the file.

        Give an existing image ``path``, or a ``size`` to create one (in the
        workdir unless ``path``). Nodes: ``NAME`` (format), ``NAME-dbg``
        (blkdebug), ``NAME-file`` (file).

        :param errno: the error to inject, by number or name (EIO, ENOSPC...).
        :param io: which requests fail: ``write``, ``read`` or ``flush``.
        :param once: fail only the first matching request; later ones succeed.
        :param sector: fail only requests touching this 512-byte sector.
        :param rules: instead of the single rule above, blkdebug's own
            ``inject-error`` rules: dicts with ``event`` (``read_aio``,
            ``write_aio``, ``flush_to_disk`` or ``none``), ``errno`` (number or
            name), and optionally ``once``, ``state``, ``sector``, ``iotype``,
            ``immediately``.
        :param set_state: blkdebug's ``set-state`` rules (``event``, ``state``,
            ``new_state``), for faults that start after some event.
        """
        self._check_stacked_name(node_name)
        if isinstance(errno, str):
            if errno.upper() not in ERRNO:
                raise ArgumentError("errno", f"must be a number or one of "
                                             f"{', '.join(ERRNO)}; got {errno!r}")
            errno = ERRNO[errno.upper()]
        if isinstance(errno, bool) or not isinstance(errno, int) or errno <= 0:
            raise ArgumentError("errno", f"must be a positive errno value; got {errno!r}")
        if io not in ("write", "read", "flush"):
            raise ArgumentError("io", f"must be write, read or flush; got {io!r}")
        if path is None and size is None:
            raise ArgumentError("path", "give an existing image path, or a size to create one")
        path = Path(path) if path is not None else self.workdir / f"{node_name}.{fmt}"
        if size is not None:
            await create_image(path, size, fmt=fmt, fill=fill)
        elif not path.exists():
            raise ArgumentError("path", f"no such image file: {str(path)!r}")
        # Event "none" arms the rule when the node opens; iotype picks the requests.
        rule: dict[str, Any] = {"event": "none", "iotype": io, "errno": errno,
                                "once": once, "immediately": True}
        if sector is not None:
            rule["sector"] = sector
        inject = [rule] if rules is None else [self._blkdebug_rule(r) for r in rules]
        dbg: dict[str, Any] = {"driver": "blkdebug", "node-name": node_name + "-dbg",
                               "inject-error": inject}
        if set_state:
            for r in set_state:
                if r.get("event") not in BLKDEBUG_EVENTS or "new_state" not in r:
                    raise ArgumentError("set_state", f"each rule needs an event in "
                                                     f"{', '.join(BLKDEBUG_EVENTS)} and a "
                                                     f"new_state; got {r!r}")
            dbg["set-state"] = [{k.replace("_", "-"): v for k, v in r.items()}
                                for r in set_state]
        return await self.add({
            "driver": fmt, "node-name": node_name,
            "file": {**dbg,
                     "image": {"driver": "file", "filename": str(path.resolve()),
                               "node-name": node_name + _FILE_SUFFIX}}})

    @staticmethod
    def _blkdebug_rule(rule: dict[str, Any]) -> dict[str, Any]:
        r = dict(rule)
        if r.get("event") not in BLKDEBUG_EVENTS:
            raise ArgumentError("rules", f"event must be one of {', '.join(BLKDEBUG_EVENTS)}; "
                                         f"got {r.get('event')!r}")
        err = r.get("errno", "EIO")
        if isinstance(err, str):
            if err.upper() not in ERRNO:
                raise ArgumentError("rules", f"errno must be a number or one of "
                                             f"{', '.join(ERRNO)}; got {err!r}")
            err = ERRNO[err.upper()]
        r["errno"] = err
        return r

    async def add_quorum(self, node_name: str, children: list[str], *,
                         vote_threshold: int) -> str:
        """A ``quorum`` node over existing ``children`` (node names): reads are
        voted on, writes go to all. A mirror with ``replaces`` can repair a child."""
        check_new_node_name(node_name, argument="node_name")
        if not children:
            raise ArgumentError("children", "give at least one child node")
        for c in children:
            check_node_ref(c, argument="children")
        if isinstance(vote_threshold, bool) or not isinstance(vote_threshold, int) \
                or not 1 <= vote_threshold <= len(children):
            raise ArgumentError("vote_threshold", f"must be an integer in [1, {len(children)}] "
                                                  f"(the number of children); got "
                                                  f"{vote_threshold!r}")
        return await self.add({"driver": "quorum", "node-name": node_name,
                               "vote-threshold": vote_threshold, "children": list(children)})

    async def resize(self, node_name: str, size: int | str) -> None:
        """``block_resize`` a node (or device) to ``size`` bytes."""
        check_node_ref(node_name, argument="node_name")
        nbytes = parse_size(size, name="size")
        if nbytes < 0:
            raise ArgumentError("size", f"must be >= 0; got {size!r}")
        info = await self.node(node_name)
        await self.client.execute("block_resize", {"node-name": info.node_name, "size": nbytes})

    async def top_of(self, node_name: str) -> str:
        """The node a new parent of ``node_name`` must attach to: the top of the
        chain of job filters (a mirror's ``mirror_top``...) over it, or the node
        itself. Writes attached below a mirror's filter are never copied on QEMU
        >= 8.2, where the job's dirty bitmap lives on the filter.

        :raise ArgumentError: this QEMU cannot show its block graph, and a job
            filter may sit over the node (a running block job).
        """
        node = (await self.node(node_name)).node_name
        drivers = {n.node_name: n.driver for n in await self.nodes()}
        try:
            graph = await self.client.execute("x-debug-query-block-graph")
        except QemuCommandError:
            if any(d in JOB_FILTERS for d in drivers.values()):
                raise ArgumentError("node", f"cannot tell whether a block job's filter sits "
                                            f"over {node!r} (this QEMU has no "
                                            f"x-debug-query-block-graph); attach to it "
                                            f"before the job starts") from None
            return node
        by_id = {n["id"]: n for n in graph["nodes"]}
        current = node
        seen = {current}
        while True:
            ids = {i for i, n in by_id.items() if n["type"] == "block-driver"
                   and n["name"] == current}
            parents = [by_id[e["parent"]]["name"] for e in graph["edges"]
                       if e["child"] in ids and by_id[e["parent"]]["type"] == "block-driver"
                       and drivers.get(by_id[e["parent"]]["name"]) in JOB_FILTERS]
            if not parents or parents[0] in seen:
                return current
            current = parents[0]
            seen.add(current)

    async def export_node_of(self, export_id: str) -> str | None:
        """The node an export serves now (after a pivot it is the new node), or
        None when there is no such export."""
        for e in await self.client.execute("query-block-exports"):
            if e["id"] == export_id:
                return e["node-name"]
        return None

    async def free_name(self, prefix: str, base: str, *, reserve: int = len("-file")) -> str:
        """A new node name ``PREFIX-BASE`` that no node uses (nor its ``-file``
        child would), short enough for QEMU."""
        taken = {n.node_name for n in await self.nodes()}
        taken |= {n[:-len(_FILE_SUFFIX)] for n in taken if n.endswith(_FILE_SUFFIX)}
        return derived_name(prefix, base, taken, limit=NODE_NAME_MAX - reserve)

    async def add_nbd(self, node_name: str, uri: str, *,
                      reconnect_delay: int | None = None) -> str:
        """A remote NBD export as a node (``nbd://host:port/export`` or
        ``nbd+unix:///export?socket=PATH``).

        :param reconnect_delay: seconds (QEMU's ``reconnect-delay``, a uint32,
            since QEMU 4.2; QEMU's default is 0). It matters only when the
            connection *breaks*: for that long, requests in flight and new ones
            wait while QEMU reconnects, and are retried on the new connection;
            after it they fail. With 0, requests in flight when the connection
            breaks fail at once (a mirror reports a target error), and the next
            request makes one attempt to reconnect. A connection that stays open
            but carries nothing (a stalled link) just stalls the I/O, whatever
            this is.
        :raise ArgumentError: ``reconnect_delay`` is not an integer in
            [0, 4294967295], or the URI is not an NBD URI.
        """
        check_new_node_name(node_name, argument="node_name")
        server, export = parse_nbd_uri(uri)
        opts: dict[str, Any] = {"driver": "nbd", "node-name": node_name, "server": server}
        if export:
            opts["export"] = export
        if reconnect_delay is not None:
            if (isinstance(reconnect_delay, bool) or not isinstance(reconnect_delay, int)
                    or not 0 <= reconnect_delay <= 0xFFFFFFFF):
                raise ArgumentError("reconnect_delay", "must be a whole number of seconds in "
                                                       f"[0, 4294967295]; got {reconnect_delay!r}")
            opts["reconnect-delay"] = reconnect_delay
        return await self.add(opts)

    async def delete(self, node_name: str) -> None:
        """``blockdev-del`` a node made here, with the nodes and group under it."""
        check_node_ref(node_name, argument="node_name")
        info = await self.node(node_name)
        await self.client.execute("blockdev-del", {"node-name": node_name})
        names = {n.node_name for n in await self.nodes()}
        for child in (node_name + _FILE_SUFFIX, node_name + "-dbg"):
            if child in names:
                await self.client.execute("blockdev-del", {"node-name": child})
        if info.driver == "throttle":
            await self.client.execute("object-del", {"id": f"{node_name}-tg"})

    # -- NBD exports -----------------------------------------------------------

    async def nbd_socket(self) -> Path:
        """Start QEMU's NBD server on a unix socket in the workdir (once)."""
        if self._nbd_socket is None:
            sock = self.workdir / "nbd.sock"
            # The legacy address form: QEMU 7.2 accepts only this one.
            await self.client.execute("nbd-server-start", {
                "addr": {"type": "unix", "data": {"path": str(sock)}}})
            self._nbd_socket = sock
        return self._nbd_socket

    async def export_nbd(self, node_name: str, *, export: str | None = None,
                         writable: bool = True) -> str:
        """Export ``node_name`` over NBD; returns its ``nbd+unix://`` URI (for fio).

        The export attaches to the top of the node's job filters (`top_of`), so
        its writes pass through a running mirror and are copied, whenever the
        export is made. Its id is ``exp-EXPORT``.
        """
        check_node_ref(node_name, argument="node_name")
        name = export or re.sub(r"[^A-Za-z0-9_.-]", "", node_name) or "export"
        top = await self.top_of(node_name)
        sock = await self.nbd_socket()
        await self.client.execute("block-export-add", {
            "type": "nbd", "id": f"exp-{name}", "node-name": top, "name": name,
            "writable": writable})
        return f"nbd+unix:///{urllib.parse.quote(name)}?socket={sock}"

    async def unexport_nbd(self, export: str) -> None:
        await self.client.execute("block-export-del", {"id": f"exp-{export}"})

    # -- helpers -----------------------------------------------------------------

    @staticmethod
    def _check_stacked_name(node_name: str) -> None:
        # Our own child nodes get a suffix; the whole name must fit QEMU's limit.
        check_new_node_name(node_name, argument="node_name")
        if len(node_name) + len(_FILE_SUFFIX) > NODE_NAME_MAX:
            raise ArgumentError("node_name", f"must be at most "
                                             f"{NODE_NAME_MAX - len(_FILE_SUFFIX)} characters "
                                             f"(its file node adds {_FILE_SUFFIX!r}); "
                                             f"got {node_name!r}")

    @staticmethod
    def _positive_size(size: int | str) -> int:
        n = parse_size(size, name="size")
        if n <= 0:
            raise ArgumentError("size", f"must be > 0, got {size!r}")
        return n

    @staticmethod
    def _positive_rate(rate: int | str, argument: str) -> int:
        n = parse_rate(rate, name=argument)
        if n <= 0:
            raise ArgumentError(argument, f"must be > 0 bytes/s, got {rate!r}")
        return n

    async def image_file(self, info: NodeInfo) -> str:
        """The file name under a format node (its protocol child's filename)."""
        proto = info.node_name + _FILE_SUFFIX
        for n in await self.nodes():
            if n.node_name == proto:
                return n.file
        if info.file and not info.file.startswith("json:"):
            return info.file
        raise ArgumentError("backing", f"node {info.node_name!r} is not backed by a file")

