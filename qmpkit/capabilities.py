"""
What this QEMU can do, read from QEMU itself and never guessed from a version.

`Capabilities` is built once per connection from ``query-version`` and
``query-qmp-schema`` (`Client.capabilities`). Code asks it by feature::

    caps = await client.capabilities()
    caps.require("block_job_change", "switching a running mirror to write-blocking")

The features qmpkit uses, and the QEMU that brought them:

=====================  ======  ================================================
``block_job_change``   8.2     ``block-job-change``: a running mirror switches
                               from background to write-blocking copy mode
``actively_synced``    8.2     ``actively-synced`` in ``query-block-jobs``: the
                               mirror is in write-blocking mode and in sync
``target_is_zero``     10.1    ``target-is-zero`` of ``blockdev-mirror``
=====================  ======  ================================================

Pure: `Capabilities.from_qmp` takes the two replies and does no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from .errors import UnsupportedError

__all__ = ["Capabilities", "FEATURES"]

#: feature -> the QEMU release that brought it (for messages only)
FEATURES: dict[str, str] = {
    "block_job_change": "8.2",
    "actively_synced": "8.2",
    "target_is_zero": "10.1",
}


def _members(schema: Mapping[str, Mapping[str, Any]], type_name: str | None) -> set[str]:
    """Member names of an object type (through an array type), or an empty set."""
    entity = schema.get(type_name or "")
    if entity is None:
        return set()
    if entity.get("meta-type") == "array":
        return _members(schema, entity.get("element-type"))
    return {m["name"] for m in entity.get("members", ())}


@dataclass(frozen=True)
class Capabilities:
    """The features of one QEMU (see the module docstring)."""

    version: tuple[int, int, int]
    package: str
    commands: frozenset[str]
    block_job_change: bool
    actively_synced: bool
    target_is_zero: bool

    @classmethod
    def from_qmp(cls, version: Mapping[str, Any],
                 schema: Iterable[Mapping[str, Any]]) -> "Capabilities":
        """From the replies of ``query-version`` and ``query-qmp-schema``."""
        entities = {e["name"]: e for e in schema}
        commands = frozenset(n for n, e in entities.items() if e.get("meta-type") == "command")

        def args(command: str) -> set[str]:
            return _members(entities, entities.get(command, {}).get("arg-type"))

        def returns(command: str) -> set[str]:
            return _members(entities, entities.get(command, {}).get("ret-type"))

        q = version["qemu"]
        return cls(version=(int(q["major"]), int(q["minor"]), int(q["micro"])),
                   package=str(version.get("package", "")).strip(),
                   commands=commands,
                   block_job_change="block-job-change" in commands,
                   actively_synced="actively-synced" in returns("query-block-jobs"),
                   target_is_zero="target-is-zero" in args("blockdev-mirror"))

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))

    def has(self, feature: str) -> bool:
        if feature not in FEATURES:
            raise KeyError(f"unknown feature {feature!r}; known: {', '.join(FEATURES)}")
        return bool(getattr(self, feature))

    def require(self, feature: str, what: str, *, argument: str | None = None) -> None:
        """:raise UnsupportedError: "ARGUMENT: WHAT needs QEMU >= 8.2 (this QEMU is 7.2.22)"."""
        if not self.has(feature):
            raise UnsupportedError(argument or feature, what, needs=FEATURES[feature],
                                   have=self.version_text)
