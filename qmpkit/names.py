"""
QEMU's naming rules for node names and job ids, checked before QEMU is asked.

QEMU (``id_wellformed``) wants a letter first, then letters, digits, ``-``,
``.`` or ``_``. Node names are at most 31 characters. Nodes QEMU names
itself look like ``#block123``; those may be referred to, never created.
"""

from __future__ import annotations

import re

from .errors import ArgumentError

__all__ = ["check_new_node_name", "check_node_ref", "check_job_id", "NODE_NAME_MAX",
           "default_job_id", "derived_name"]

NODE_NAME_MAX = 31
_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
_AUTO_RE = re.compile(r"#block\d+")
_RULE = "a letter, then letters, digits, '-', '.' or '_'"


def check_job_id(value: object, *, argument: str = "job_id") -> str:
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise ArgumentError(argument, f"must be {_RULE}; got {value!r}")
    return value


def check_new_node_name(value: object, *, argument: str = "node_name") -> str:
    """A node name for a node we are about to create."""
    check_job_id(value, argument=argument)
    assert isinstance(value, str)
    if len(value) > NODE_NAME_MAX:
        raise ArgumentError(argument, f"must be at most {NODE_NAME_MAX} characters "
                                      f"(QEMU's limit); {value!r} has {len(value)}")
    return value


def check_node_ref(value: object, *, argument: str = "node") -> str:
    """A reference to an existing node or device (a VM's drive id may be longer
    than a node name), or a name QEMU made itself (``#blockN``)."""
    if isinstance(value, str) and _AUTO_RE.fullmatch(value):
        return value
    return check_job_id(value, argument=argument)


def default_job_id(device: str) -> str:
    """A valid job id for a mirror of ``device``: the device name where QEMU would
    take it, else ``mirror-`` and its letters (``#block177`` -> ``mirror-block177``)."""
    if _ID_RE.fullmatch(device):
        return device
    return "mirror-" + re.sub(r"[^A-Za-z0-9_.-]", "", device)


def derived_name(prefix: str, base: str, taken: set[str] | frozenset[str] = frozenset(), *,
                 limit: int = NODE_NAME_MAX) -> str:
    """A node name ``PREFIX-BASE`` that fits ``limit`` characters and is not in
    ``taken`` (``-2``, ``-3``... are added until it is free)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "", f"{prefix}-{base}")[:limit]
    name, n = stem, 2
    while name in taken:
        suffix = f"-{n}"
        name = stem[:limit - len(suffix)] + suffix
        n += 1
    return name
