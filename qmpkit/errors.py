"""
The errors qmpkit raises.

Every error derives from `QmpkitError`, and each carries the data a caller
needs to act on it, not just a message::

    QmpkitError
     ├── ArgumentError         bad input, found before anything was sent
     │                         (also a ValueError)         .argument
     ├── QemuStartError        the embedded QEMU did not start
     │                         .argv .output .returncode
     ├── ToolError             qemu-img, qemu-io or fio failed
     │                         .argv .output .returncode
     ├── QmpConnectionError    cannot reach QMP, or the connection dropped
     │   │                     .address
     │   └── QmpTimeoutError   QEMU did not answer a command in time (a
     │                         stopped or hung QEMU); also a TimeoutError
     │                         .command .timeout
     ├── QemuCommandError      QEMU refused a QMP command
     │                         .command .arguments .error_class .desc
     ├── JobError              something went wrong with a block job
     │   │                     .job_id .last_status
     │   ├── JobFailedError    the job ended with an error, or was
     │   │                     cancelled while a caller waited for READY
     │   │                     .message .errors (BLOCK_JOB_ERROR events)
     │   └── JobTimeoutError   a wait passed its deadline (also a TimeoutError)
     │                         .waiting_for .timeout
     ├── UnsupportedError      this QEMU lacks a feature (also an ArgumentError:
     │                         found before anything starts)  .argument .needs .have
     └── VerifyError           source and target differ  .detail

Errors from ``qemu.qmp`` are translated once, in `qmpkit.client`.
``asyncio.CancelledError`` and ``KeyboardInterrupt`` are never caught.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence


class QmpkitError(Exception):
    """The root of every error qmpkit raises."""


class ArgumentError(QmpkitError, ValueError):
    """An argument is invalid. Raised before anything is sent to QEMU."""

    def __init__(self, argument: str, message: str) -> None:
        self.argument = argument
        super().__init__(f"{argument}: {message}")


class QemuStartError(QmpkitError):
    """The embedded QEMU could not be started."""

    def __init__(self, message: str, *, argv: Sequence[str], output: str,
                 returncode: int | None) -> None:
        self.argv = list(argv)
        self.output = output
        self.returncode = returncode
        cmd = " ".join(self.argv)
        super().__init__(f"{message}\ncommand: {cmd}\nexit code: {returncode}\n"
                         f"output:\n{output.rstrip() or '(none)'}")


class ToolError(QmpkitError):
    """An external tool (qemu-img, qemu-io, fio) failed."""

    def __init__(self, message: str, *, argv: Sequence[str], output: str,
                 returncode: int | None) -> None:
        self.argv = list(argv)
        self.output = output
        self.returncode = returncode
        tail = output.rstrip()
        if len(tail) > 2000:  # the whole output stays in .output
            tail = "...\n" + tail[-2000:]
        super().__init__(f"{message} (exit code {returncode}): {' '.join(self.argv)}\n{tail}")


class QmpConnectionError(QmpkitError):
    """QMP could not be reached, or the connection was lost."""

    def __init__(self, message: str, *, address: object = None) -> None:
        self.address = address
        super().__init__(message)


class QmpTimeoutError(QmpConnectionError, TimeoutError):
    """QEMU did not answer a QMP command within its deadline."""

    def __init__(self, command: str, timeout: float, *, address: object = None,
                 message: str | None = None) -> None:
        self.command = command
        self.timeout = timeout
        super().__init__(message or f"QEMU did not answer {command} within {timeout:g} s "
                                    "(is it stopped?)", address=address)


class QemuCommandError(QmpkitError):
    """QEMU refused a QMP command. ``desc`` is QEMU's message, word for word."""

    def __init__(self, command: str, arguments: Mapping[str, Any] | None,
                 error_class: str, desc: str) -> None:
        self.command = command
        self.arguments = dict(arguments or {})
        self.error_class = error_class
        self.desc = desc
        super().__init__(f"QEMU refused {command}: {desc}")


class JobError(QmpkitError):
    """A block job went wrong."""

    def __init__(self, message: str, *, job_id: str, last_status: str | None) -> None:
        self.job_id = job_id
        self.last_status = last_status
        super().__init__(message)


class JobFailedError(JobError):
    """The job ended with an error (or ended before the state waited for)."""

    def __init__(self, message: str, *, job_id: str, last_status: str | None,
                 errors: Sequence[Mapping[str, Any]] = ()) -> None:
        self.message = message
        self.errors = list(errors)
        super().__init__(f"job {job_id!r} failed (last status {last_status}): {message}",
                         job_id=job_id, last_status=last_status)


class JobTimeoutError(JobError, TimeoutError):
    """A wait on a job passed its deadline."""

    def __init__(self, *, job_id: str, last_status: str | None, waiting_for: str,
                 timeout: float) -> None:
        self.waiting_for = waiting_for
        self.timeout = timeout
        super().__init__(
            f"timed out after {timeout:g} s waiting for job {job_id!r} to {waiting_for} "
            f"(last status {last_status})", job_id=job_id, last_status=last_status)


class UnsupportedError(ArgumentError):
    """This QEMU does not have a feature (read from its QMP schema, not guessed)."""

    def __init__(self, argument: str, what: str, *, needs: str, have: str) -> None:
        self.needs = needs
        self.have = have
        super().__init__(argument, f"{what} needs QEMU >= {needs} (this QEMU is {have})")


class VerifyError(QmpkitError):
    """Source and target do not hold the same data."""

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(f"copy does not match the source: {detail}")
