"""
Image files, made and checked with QEMU's own tools (``qemu-img``, ``qemu-io``).

Every tool runs from an argument list, never through a shell, so paths with
spaces, quotes or leading dashes are safe. A failing tool raises `ToolError`
with its command line and output.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any, Literal, Sequence

from .errors import ArgumentError, ToolError, VerifyError
from .process import die_with_parent
from .units import parse_size

__all__ = ["FORMATS", "create_image", "fill_image", "image_info", "image_map",
           "compare_images", "convert_image", "run_tool",
           "chunk_pattern"]

log = logging.getLogger(__name__)

FORMATS = ("raw", "qcow2")
PREALLOCATION = ("off", "falloc", "full")
_FILL_CHUNK = 1 << 20
_IO_BATCH = 2048  # qemu-io commands per process


async def run_tool(argv: Sequence[str], *, ok_codes: Sequence[int] = (0,),
                   what: str | None = None,
                   cwd: os.PathLike[str] | str | None = None) -> tuple[int, str]:
    """Run a tool, return (exit code, output). The child dies with the caller.

    :raise ToolError: the tool is missing, or exits with a code not in ``ok_codes``.
    """
    argv = [os.fspath(a) for a in argv]
    log.debug("run %s", argv)
    try:
        # Its own session: a Ctrl-C meant for qmpkit does not kill it half-way;
        # PDEATHSIG: it dies with qmpkit, even when qmpkit is killed.
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True,
            preexec_fn=die_with_parent, cwd=cwd)
    except OSError as exc:
        raise ToolError(f"cannot run {argv[0]}: {exc.strerror}", argv=argv, output="",
                        returncode=None) from exc
    try:
        out, _ = await proc.communicate()
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    text = out.decode(errors="replace")
    if proc.returncode not in ok_codes:
        raise ToolError(what or f"{Path(argv[0]).name} failed", argv=argv, output=text,
                        returncode=proc.returncode)
    return proc.returncode, text


def _check_format(fmt: str, argument: str = "format") -> str:
    if fmt not in FORMATS:
        raise ArgumentError(argument, f"must be one of {', '.join(FORMATS)}; got {fmt!r}")
    return fmt


def _io_path(path: os.PathLike[str] | str) -> str:
    # A leading dash would read as an option to qemu-img/qemu-io.
    p = os.fspath(path)
    return p if not p.startswith("-") else os.path.join(".", p)


async def create_image(path: os.PathLike[str] | str, size: int | str, *, fmt: str = "raw",
                       backing: os.PathLike[str] | str | None = None,
                       backing_fmt: str | None = None,
                       fill: int | Literal["mixed"] | None = None,
                       cluster_size: int | str | None = None, mode: int = 0o600,
                       exclusive: bool = False, allow_empty: bool = False,
                       preallocation: str | None = None) -> Path:
    """Create an image with ``qemu-img create``, optionally filled with data.

    :param size: virtual size (``"1G"``, bytes, ...). Must be > 0 (or 0 with
        ``allow_empty``, for the copy of an empty disk).
    :param fill: ``None`` leaves it empty; a byte value (0-255) fills every
        byte with it; ``"mixed"`` writes a different byte in each MiB, so a
        copy that lands data at the wrong offset is caught by a compare.
    :param mode: permissions of a new file (default 0600: a disk's copy is as
        private as the disk). The file is made before qemu-img writes it,
        without following a symlink.
    :param exclusive: refuse a path that already exists.
    :param preallocation: qemu-img's ``preallocation``: ``off``, ``falloc``, ``full``
        (and ``metadata`` for qcow2).
    :raise ArgumentError: bad size, format or fill, or ``exclusive`` and the path exists.
    :raise ToolError: qemu-img or qemu-io failed.
    """
    nbytes = parse_size(size, name="size")
    if nbytes < 0 or (nbytes == 0 and not allow_empty):
        raise ArgumentError("size", f"must be > 0, got {size!r}")
    _check_format(fmt)
    _check_fill(fill)
    path = Path(path)
    argv: list[str] = ["qemu-img", "create", "-q", "-f", fmt]
    if cluster_size is not None:
        if fmt != "qcow2":
            raise ArgumentError("cluster_size", "only qcow2 images have clusters")
        argv += ["-o", f"cluster_size={parse_size(cluster_size, name='cluster_size')}"]
    if preallocation is not None:
        allowed = PREALLOCATION + (("metadata",) if fmt == "qcow2" else ())
        if preallocation not in allowed:
            raise ArgumentError("preallocation", f"must be one of {', '.join(allowed)} for "
                                                 f"{fmt}; got {preallocation!r}")
        if backing is not None and preallocation in ("falloc", "full"):
            raise ArgumentError("preallocation", "a qcow2 image with a backing file cannot be "
                                                 f"preallocated ({preallocation}): its data "
                                                 "must come from the backing file")
        argv += ["-o", f"preallocation={preallocation}"]
    if backing is not None:
        if fmt != "qcow2":
            raise ArgumentError("backing", "only a qcow2 image can have a backing file")
        argv += ["-b", os.path.abspath(backing), "-F", _check_format(backing_fmt or "raw",
                                                                   "backing_fmt")]
    argv += ["--", _io_path(path), str(nbytes)]
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_EXCL if exclusive else 0)
    try:
        os.close(os.open(path, flags, mode))
    except FileExistsError:
        raise ArgumentError("path", f"{str(path)!r} already exists") from None
    except OSError as exc:
        raise ArgumentError("path", f"cannot create {str(path)!r}: {exc.strerror}") from None
    await run_tool(argv)
    if fill is not None:
        await fill_image(path, fmt=fmt, fill=fill, length=nbytes)
    return path


def _check_fill(fill: object) -> None:
    if fill is None or fill == "mixed":
        return
    if isinstance(fill, bool) or not isinstance(fill, int) or not 0 <= fill <= 255:
        raise ArgumentError("fill", f"must be None, 'mixed' or a byte value in [0, 255]; "
                                    f"got {fill!r}")


def chunk_pattern(index: int) -> int:
    """The byte ``fill='mixed'`` writes into MiB number ``index`` (never 0)."""
    return (index * 37) % 255 + 1


async def fill_image(path: os.PathLike[str] | str, *, fmt: str = "raw",
                     fill: int | Literal["mixed"] = "mixed", offset: int = 0,
                     length: int | None = None) -> None:
    """Write a pattern into ``[offset, offset+length)`` of an image with qemu-io."""
    _check_fill(fill)
    if length is None:
        length = (await image_info(path))["virtual-size"] - offset
    end = offset + length
    pos = offset
    while pos < end:
        # one batch of commands at a time: a 4 TiB disk must not build 4 M
        # command strings in memory before the first write
        cmds: list[str] = []
        while pos < end and len(cmds) < 2 * _IO_BATCH:
            n = min(_FILL_CHUNK, end - pos)
            byte = chunk_pattern(pos // _FILL_CHUNK) if fill == "mixed" else int(fill)
            cmds += ["-c", f"write -q -P {byte} {pos} {n}"]
            pos += n
        await run_tool(["qemu-io", "-f", fmt, *cmds, _io_path(path)])


async def image_info(path: os.PathLike[str] | str, *, force_share: bool = True) -> dict[str, Any]:
    argv = ["qemu-img", "info", "--output=json"] + (["-U"] if force_share else [])
    _, out = await run_tool(argv + ["--", _io_path(path)])
    return json.loads(out)


async def image_map(path: os.PathLike[str] | str, *, fmt: str | None = None) -> list[dict[str, Any]]:
    """``qemu-img map`` as a list of extents (``start``, ``length``, ``data``, ``depth``...)."""
    argv = ["qemu-img", "map", "-U", "--output=json"] + (["-f", fmt] if fmt else [])
    _, out = await run_tool(argv + ["--", _io_path(path)])
    return json.loads(out)


async def compare_images(a: os.PathLike[str] | str, b: os.PathLike[str] | str, *,
                         fmt_a: str | None = None, fmt_b: str | None = None,
                         strict: bool = False) -> None:
    """Check that two images hold the same data, with ``qemu-img compare``.

    Run it when no job holds the images (after the job ended). ``strict``
    also compares allocation, not just the data seen by a reader.

    :raise VerifyError: the contents differ (QEMU's message says where).
    :raise ToolError: qemu-img could not compare them.
    """
    argv = ["qemu-img", "compare", "-U"] + (["-s"] if strict else [])
    argv += (["-f", fmt_a] if fmt_a else []) + (["-F", fmt_b] if fmt_b else [])
    code, out = await run_tool(argv + [_io_path(a), _io_path(b)], ok_codes=(0, 1),
                               what="qemu-img compare could not read the images")
    if code == 1:
        raise VerifyError(out.strip())


async def convert_image(src: os.PathLike[str] | str, dst: os.PathLike[str] | str, *,
                        src_fmt: str = "raw", dst_fmt: str = "raw",
                        existing: bool = False) -> None:
    """``qemu-img convert``: the offline copy a mirror is compared against."""
    argv = ["qemu-img", "convert", "-U", "-f", src_fmt, "-O", dst_fmt] + (["-n"] if existing else [])
    await run_tool(argv + [_io_path(src), _io_path(dst)])
