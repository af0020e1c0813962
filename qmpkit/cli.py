"""
The ``qmpkit`` command.

Exit codes: 0 done as asked; 1 the job failed, QEMU refused a command
(QEMU's message is printed) or the copy differs; 2 bad arguments, nothing
started; 3 timeout (the job is cancelled unless ``--then leave``); 4 done,
but ``--verify`` could not check the copy (the disks were written during the
compare); 130 interrupted (SIGINT); 143 terminated (SIGTERM or SIGHUP).

The faces only turn options into calls: every mirror runs through
`qmpkit.lifecycle.MirrorRun`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

from . import __version__
from .analysis import forecast, rate, report
from .demo import run_demo, table_text, write_plots
from .errors import (ArgumentError, JobFailedError, JobTimeoutError, QemuCommandError,
                     QmpkitError)
from .experiment import Setup, check_free_space, hopeless, run_experiment
from .lifecycle import MirrorRun
from .link import PRESETS_HELP
from .mirror import COPY_MODES, ON_ERROR, SYNC_MODES, mirror_arguments
from .nodes import AIO_MODES, DETECT_ZEROES
from .session import Qemu
from .trace import Trace, prepare_out_dir
from .units import format_rate, format_size, parse_rate, parse_size
from .workload import RW_MODES, FioLoad

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TIMEOUT, EXIT_UNVERIFIED = 0, 1, 2, 3, 4
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143

log = logging.getLogger(__name__)
MiB = 1 << 20


class UsageError(Exception):
    """A bad command line: exit 2, nothing started."""


class _Parser(argparse.ArgumentParser):
    """argparse with qmpkit's one error format: ``qmpkit: error: --opt: why``,
    exit 2, no usage dump (``--help`` has it)."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        import re
        # our option types already name the option: do not say it twice
        message = re.sub(r"^argument (\S+?)(?:/\S+)?: (\1: )", r"\2", message)
        self.exit(EXIT_USAGE, f"qmpkit: error: {message}\n")


def _option_type(parser: Any, kind: str, name: str) -> Any:
    """An argparse ``type`` whose error names the option (``--granularity: ...``)."""
    def parse(text: str) -> int:
        try:
            return parser(text, name=name)
        except ArgumentError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse.__name__ = kind
    return parse


def _size(name: str) -> Any:
    return _option_type(parse_size, "size", name)


def _rate(name: str) -> Any:
    return _option_type(parse_rate, "rate", name)


def _positive_float(name: str) -> Any:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"{name}: must be a finite number > 0; "
                                             f"got {text!r}")
        return value
    parse.__name__ = "number"
    return parse


def _hz(text: str) -> float:
    value = _positive_float("--hz")(text)
    if value > 1000:
        raise argparse.ArgumentTypeError(f"--hz: must be in (0, 1000] samples per second; "
                                         f"got {text!r}")
    return value


def _count(name: str) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = -1
        if value < 0:
            raise argparse.ArgumentTypeError(f"{name}: must be an integer >= 0; got {text!r}")
        return value
    parse.__name__ = "integer"
    return parse


def add_load_options(p: argparse.ArgumentParser) -> None:
    """The fio load options: the same names on every command that has a load."""
    g = p.add_argument_group("write load (fio over NBD into the source, like a guest)")
    g.add_argument("--load-rw", choices=RW_MODES, default="randwrite",
                   help="pattern: randwrite (default), write (sequential) or randrw")
    g.add_argument("--load-bs", type=_size("--load-bs"), default="4K", metavar="SIZE",
                   help="block size of each write (default 4K)")
    g.add_argument("--load-rate", type=_rate("--load-rate"), default="20M", metavar="RATE",
                   help="write rate per second, 0 = unlimited (default 20M)")
    g.add_argument("--load-iodepth", type=int, default=4, metavar="N",
                   help="writes in flight (default 4)")
    g.add_argument("--load-seed", type=int, default=1, metavar="N",
                   help="fio's random seed, so runs repeat (default 1)")
    g.add_argument("--no-load", action="store_true", help="run without a write load")


def add_setup_options(p: argparse.ArgumentParser) -> None:
    """The embedded disks: the same names on every command that makes them."""
    g = p.add_argument_group("embedded disks (a fresh qemu-storage-daemon per run)")
    g.add_argument("--size", type=_size("--size"), default="1G", metavar="SIZE",
                   help="source and target size (default 1G)")
    g.add_argument("--format", choices=("raw", "qcow2"), default="raw",
                   help="image format of source and target (default raw)")
    g.add_argument("--target-speed", type=_rate("--target-speed"), default="100M",
                   metavar="RATE", help="throttle the target's writes to RATE per second, "
                                        "0 = unthrottled (default 100M)")
    g.add_argument("--remote-target", action="store_true",
                   help="put the target in a second qemu-storage-daemon and mirror to it "
                        "over NBD, like a disk on another host")
    g.add_argument("--link", action="append", metavar="SPEC",
                   help="an emulated network between source and target (implies "
                        "--remote-target): rtt=40ms,rate=1Gbit[,jitter=2ms], or a preset: "
                        f"{PRESETS_HELP}. A sweep takes it several times (a link axis; "
                        "'none' for no link)")
    g.add_argument("--reconnect-delay", type=_count("--reconnect-delay"), metavar="SECONDS",
                   help="the NBD client's reconnect-delay: a broken connection to the target "
                        "is retried this long before the mirror sees an error (QEMU's "
                        "default 0)")


def _add_libvirt(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("a libvirt-managed VM (instead of --qmp; needs qmpkit[libvirt])")
    g.add_argument("--libvirt", metavar="URI",
                   help="libvirt's connection URI, e.g. qemu:///system: everything goes "
                        "through libvirt's API, so its XML and job view stay right")
    g.add_argument("--domain", metavar="NAME", help="the libvirt domain")


def _add_qmp(p: argparse.ArgumentParser, *, json_keys: str | None = None) -> None:
    """``--qmp ADDR`` (or ``--libvirt URI --domain NAME``), and ``--json`` where
    the command lists things."""
    p.add_argument("--qmp", metavar="ADDR",
                   help="QMP socket: a unix socket path or host:port")
    _add_libvirt(p)
    if json_keys is not None:
        p.add_argument("--json", action="store_true",
                       help=f"print a JSON list of objects with the keys {json_keys}")


def add_run_options(p: argparse.ArgumentParser, *,
                    hz_help: str = "samples per second (default 10)") -> None:
    """What every command that records runs on the embedded QEMU takes: the
    sampling rate, the disks and the load."""
    p.add_argument("--hz", type=_hz, default=10.0, metavar="N", help=hz_help)
    add_setup_options(p)
    add_load_options(p)


def load_from_args(ns: argparse.Namespace) -> FioLoad | None:
    if ns.no_load:
        return None
    try:
        return FioLoad(rw=ns.load_rw, bs=ns.load_bs, rate=ns.load_rate, iodepth=ns.load_iodepth,
                       seed=ns.load_seed, latency_log=True)
    except ArgumentError as exc:
        raise UsageError(f"--load-{exc.argument}: {str(exc).split(': ', 1)[1]}") from None


def setup_from_args(ns: argparse.Namespace) -> Setup:
    try:
        links = [v for v in (ns.link or []) if v != "none"]
        if len(links) > 1 and ns.command != "sweep":
            raise UsageError("--link: give one link here; a sweep takes several")
        if ns.reconnect_delay is not None and not (links or ns.remote_target):
            raise UsageError("--reconnect-delay: needs --remote-target or --link (it is an "
                             "option of the NBD client)")
        setup = Setup(size=ns.size, fmt=ns.format, target_speed=ns.target_speed or None,
                      remote_target=ns.remote_target or bool(links),
                      link=links[0] if len(links) == 1 and ns.command != "sweep" else None,
                      reconnect_delay=ns.reconnect_delay)
        check_free_space(setup, None, copies=3)
        return setup
    except ArgumentError as exc:
        raise UsageError(f"--{exc.argument.replace('_', '-')}: "
                         f"{str(exc).split(': ', 1)[1]}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="qmpkit",
        description="Run and watch QEMU blockdev-mirror jobs. Sizes take 4K, 64KiB, 16M, 1G "
                    "or bytes (binary units); rates take the same, per second.")
    parser.add_argument("--version", action="version", version=f"qmpkit {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more: -v warnings and progress of each step, -vv QMP "
                             "traffic")
    parser.add_argument("--qmp-timeout", type=_positive_float("--qmp-timeout"), default=30.0,
                        metavar="SECONDS",
                        help="how long QEMU may take to answer one QMP command before qmpkit "
                             "says it is stopped or hung (default 30)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    m = sub.add_parser(
        "mirror", help="mirror a block node of a running QEMU to a target",
        description="Start blockdev-mirror on a running QEMU (--qmp), show its progress, and "
                    "at READY complete it (pivot), cancel it (keep a point-in-time copy) or "
                    "leave it running. Without --qmp it runs on the embedded QEMU instead: a "
                    "fresh source of --size under the --load-* write load, mirrored into a "
                    "target throttled to --target-speed. Exit codes: 0 done; 1 job failed or "
                    "QEMU refused a command; 2 bad arguments (nothing started); 3 timeout.")
    m.add_argument("--qmp", metavar="ADDR",
                   help="QMP socket of the QEMU: a unix socket path or host:port "
                        "(omit it to run on the embedded QEMU)")
    m.add_argument("--device", metavar="NODE",
                   help="the source: a node name, or a device (drive) name of a VM")
    tgt = m.add_mutually_exclusive_group()
    tgt.add_argument("--target", metavar="NODE",
                     help="an existing target node (added with blockdev-add)")
    tgt.add_argument("--target-file", metavar="PATH", type=Path,
                     help="an image file to open as the target node")
    m.add_argument("--target-format", choices=("raw", "qcow2"), default=None,
                   help="format of --target-file (default with --create: qcow2 for --sync "
                        "top or none, else the source's format)")
    m.add_argument("--create", action="store_true",
                   help="create --target-file, as large as the source, mode 0600 (or the "
                        "source file's), backed as --sync needs: top by the source's backing "
                        "file, none by the source itself (as drive-mirror does)")
    m.add_argument("--target-node-name", "--target-node", dest="target_node_name",
                   metavar="NAME",
                   help="node name for --target-file (default: qmpkit-JOBID, unique)")
    tg = m.add_argument_group("node options of --target-file (set on the node qmpkit opens)")
    tg.add_argument("--target-aio", choices=AIO_MODES,
                    help="threads (QEMU's default), native (needs --target-cache-direct on) "
                         "or io_uring")
    tg.add_argument("--target-cache-direct", choices=("on", "off"),
                    help="on: O_DIRECT, no page cache (default off)")
    tg.add_argument("--target-cache-no-flush", choices=("on", "off"),
                    help="on: ignore flushes (fast, unsafe on a host crash; default off)")
    tg.add_argument("--target-detect-zeroes", choices=DETECT_ZEROES,
                    help="off (default), on, or unmap (also sets discard=unmap)")
    tg.add_argument("--target-preallocation", choices=("off", "falloc", "full", "metadata"),
                    help="with --create: qemu-img's preallocation (metadata: qcow2 only)")
    m.add_argument("--job-id", metavar="ID",
                   help="job id (default: the device name, or mirror-blockN for #blockN)")
    m.add_argument("--sync", choices=SYNC_MODES, default="full",
                   help="what to copy: full (all), top (only the top image's data), "
                        "none (only new writes). Default: full")
    m.add_argument("--granularity", type=_size("--granularity"), metavar="SIZE",
                   help="dirty-tracking chunk, a power of two in [512 B, 64 MiB] "
                        "(QEMU default: target cluster size in [4K, 64K]; 64K for raw)")
    m.add_argument("--buf-size", type=_size("--buf-size"), metavar="SIZE",
                   help="copy buffer, >= 0 (QEMU default 16M; 0 means the default)")
    m.add_argument("--speed", type=_rate("--speed"), metavar="RATE",
                   help="copy speed limit per second, >= 0 (0 = unlimited, the default)")
    m.add_argument("--copy-mode", choices=COPY_MODES,
                   help="background (default) or write-blocking (guest writes go to both "
                        "disks at once: converges under heavy writes, costs write latency)")
    m.add_argument("--on-source-error", choices=ON_ERROR,
                   help="what a source read error does (QEMU default: report)")
    m.add_argument("--on-target-error", choices=ON_ERROR,
                   help="what a target write error does (QEMU default: report); stop pauses "
                        "the job so it can be resumed")
    m.add_argument("--replaces", metavar="NODE",
                   help="on completion, the target replaces this node instead of the device "
                        "(e.g. a quorum child)")
    m.add_argument("--filter-node-name", metavar="NAME",
                   help="node name for the mirror's filter node")
    m.add_argument("--no-auto-finalize", action="store_true",
                   help="pass auto-finalize=false (qmpkit finalizes the job itself)")
    m.add_argument("--no-auto-dismiss", action="store_true",
                   help="pass auto-dismiss=false (qmpkit dismisses the job itself)")
    m.add_argument("--until", choices=("ready", "done"), default=None,
                   help="ready: return once READY is reached and --then was sent; done: also "
                        "wait until the job has ended. Default: done, or ready with "
                        "--then leave")
    _add_libvirt(m)
    m.add_argument("--disk", metavar="DEV", help="with --libvirt: the domain's disk (vda)")
    m.add_argument("--no-passthrough", action="store_true",
                   help="with --libvirt: record only what blockJobInfo gives (no monitor "
                        "passthrough, so no custom-monitor taint on the domain; no dirty bytes)")
    m.add_argument("--reuse-ext", action="store_true",
                   help="with --libvirt: the --target-file exists already (REUSE_EXT); "
                        "otherwise libvirt creates it (qcow2, 64 KiB clusters)")
    m.add_argument("--i-know-libvirt-is-blind", action="store_true",
                   help="act over --qmp on a QEMU that libvirt manages (libvirt will not "
                        "see the job; its XML can end up naming a file the guest no longer "
                        "writes)")
    m.add_argument("--then", choices=("complete", "cancel", "leave"), default="complete",
                   help="at READY: complete (pivot to the target, the default), cancel "
                        "(keep a point-in-time copy, no pivot) or leave it running")
    m.add_argument("--timeout", type=_positive_float("--timeout"), default=3600.0,
                   metavar="SECONDS", help="overall deadline in seconds, > 0 (default 3600)")
    m.add_argument("--early-stop", type=float, default=10.0, metavar="SECONDS",
                   help="without --qmp: stop (exit 3) once the forecast has said 'not "
                        "converging' for this long, rather than run until --timeout on a "
                        "setting that cannot converge (default 10; 0 = never)")
    m.add_argument("--qemu-trace", action="store_true",
                   help="without --qmp: turn on QEMU's mirror_* trace events and report why "
                        "the copy runs at its rate (operations, their mean size, waits for "
                        "one of the 16 in-flight slots); summary.json key qemu_ops")
    m.add_argument("--rescue-after", type=_positive_float("--rescue-after"), metavar="SECONDS",
                   help="when the forecast has said 'not converging' for this long, switch the "
                        "running mirror to write-blocking, once (block-job-change, QEMU >= "
                        "8.2); the switch is an event of the trace")
    m.add_argument("--max-errors", type=_count("--max-errors"), default=1000, metavar="N",
                   help="cancel the job once QEMU reported more than N I/O errors: with "
                        "--on-*-error ignore a full disk retries thousands of times a "
                        "second, for ever (default 1000; 0 = no limit)")
    m.add_argument("--verify", action="store_true",
                   help="after the job ends, compare source and target with qemu-img compare "
                        "while checking that nothing writes to them; if something does, say "
                        "'cannot verify' (exit 4), never a false mismatch")
    m.add_argument("--pause-guest-to-verify", action="store_true",
                   help="with --verify on a VM: pause the guest (stop/cont) from just before "
                        "the pivot until the compare is done")
    m.add_argument("--json", action="store_true",
                   help="print the end-of-run figures as one JSON object on stdout (the "
                        "progress and messages go to stderr)")
    m.add_argument("--out", type=Path, metavar="DIR",
                   help="record the job and write its trace folder (trace.csv, "
                        "events.jsonl, summary.json) and plots here")
    add_run_options(m, hz_help="samples per second when recording (default 10; QEMU works "
                               "in 100 ms slices, so faster samples look saw-toothed)")

    d = sub.add_parser(
        "demo", help="show why granularity matters, on the embedded QEMU",
        description="Mirror the same source three times under the same 4 KiB random-write "
                    "load into a throttled target: QEMU's defaults, 4 KiB granularity, and "
                    "write-blocking mode. Writes each run's trace folder, overlaid "
                    "convergence.png, throughput.png and latency.png, and demo.csv to --out, "
                    "and prints time to READY, amplification and the guest's p99 latency.")
    d.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="where the traces and plots go")
    d.add_argument("--json", action="store_true",
                   help="print the table as a JSON list on stdout (messages go to stderr)")
    d.add_argument("--time-limit", type=_positive_float("--time-limit"), default=20.0,
                   metavar="SECONDS",
                   help="wait this long for READY; a run past it counts as not converged "
                        "(default 20)")
    d.add_argument("--wan", action="store_true",
                   help="the same load across a 40 ms, 1 Gbit/s link (--link wan unless "
                        "--link is given): QEMU's defaults, 4 KiB/1 MiB (the LAN's winner) "
                        "and the configuration qmpkit.predict picks for this link")
    add_run_options(d)

    sw = sub.add_parser(
        "sweep", help="tune granularity and buf-size: a grid of mirrors, heatmaps, a pick",
        description="Run every combination of --granularity x --buf-size (x --copy-mode x "
                    "--speed), plus QEMU's defaults, --repeat times each on fresh images of "
                    "the embedded QEMU under one write load, in a shuffled order, with the "
                    "offline copy (qemu-img convert) as baseline. Writes results.csv, "
                    "summary.csv, heatmap_*.png and recommendation.json to --out. Started "
                    "again on the same --out, it resumes without redoing finished runs.")
    sw.add_argument("--granularity", default="4K,64K,1M", metavar="LIST",
                    help="comma-separated sizes, powers of two in [512 B, 64 MiB], or "
                         "'default' (default: 4K,64K,1M)")
    sw.add_argument("--buf-size", default="1M,16M", metavar="LIST",
                    help="comma-separated sizes >= 0, or 'default' (default: 1M,16M)")
    sw.add_argument("--copy-mode", default="background", metavar="LIST",
                    help="comma-separated: background, write-blocking (default: background)")
    sw.add_argument("--speed", default="default", metavar="LIST",
                    help="comma-separated rates, or 'default' for unlimited")
    sw.add_argument("--repeat", type=int, default=3, metavar="N",
                    help="runs per configuration (default 3)")
    sw.add_argument("--json", action="store_true",
                    help="print the summary and the recommendation as JSON on stdout "
                         "(progress goes to stderr)")
    sw.add_argument("--out", type=Path, required=True, metavar="DIR",
                    help="where runs, results and plots go (and where a sweep resumes)")
    sw.add_argument("--time-limit", type=_positive_float("--time-limit"), default=30.0,
                    metavar="SECONDS", help="a run not READY by then is censored: not "
                                            "converged (default 30)")
    sw.add_argument("--early-stop", action="store_true",
                    help="stop a run early once its forecast has said 'not converging' for 3 s")
    ng = sw.add_argument_group("node options of both images, as axes (comma-separated lists)")
    ng.add_argument("--aio", metavar="LIST", help="threads, native (needs --cache-direct on), "
                                                  "io_uring")
    ng.add_argument("--cache-direct", metavar="LIST", help="on, off (O_DIRECT)")
    ng.add_argument("--detect-zeroes", metavar="LIST", help="off, on, unmap")
    ng.add_argument("--preallocation", metavar="LIST",
                    help="the target's: off, falloc, full (metadata: qcow2 only)")
    sw.add_argument("--predict", action="store_true",
                    help="write qmpkit.predict's forecast beside every run (results.csv: "
                         "predicted_converges, predicted_time_to_ready_s) and "
                         "predicted_vs_measured.png")
    sw.add_argument("--latency-budget-ms", type=_positive_float("--latency-budget-ms"),
                    metavar="MS", help="the guest's p99 write latency the pick must keep")
    sw.add_argument("--fresh", action="store_true",
                    help="discard a sweep already in --out (its runs and results) instead "
                         "of resuming it; a resume needs exactly the same settings")
    sw.add_argument("--seed", type=int, default=0, metavar="N",
                    help="shuffles the run order (default 0); the same seed, the same order")
    add_run_options(sw)

    pl = sub.add_parser("plot", help="redraw or overlay saved traces",
                        description="Draw convergence.png, throughput.png (and latency.png "
                                    "when fio's log is there) from one or more trace folders; "
                                    "several folders are overlaid.")
    pl.add_argument("traces", nargs="+", type=Path, metavar="DIR",
                    help="trace folders, or the output folder of `qmpkit demo` (its runs "
                         "overlaid) or of `qmpkit sweep` (one run per configuration)")
    pl.add_argument("--out", type=Path, metavar="DIR",
                    help="where the PNGs go (default: the one folder given; required with "
                         "several folders)")

    for name in ("probe", "advise"):
        pr = sub.add_parser(
            name, help="measure how fast the guest dirties a disk, at each granularity"
            if name == "probe" else "probe, then predict and rank mirror settings",
            description="Add one dirty bitmap per --granularity to the disk's node (named "
                        "qmpkit-probe-*, never persistent), read them once a second for "
                        "--seconds with the device's write statistics, remove them, and "
                        "print the new-dirty rate, the working set and the amplification per "
                        "granularity (probe.json with --out)."
            + (" Then predict every granularity x buf-size (1, 4, 16, 64 MiB) x copy-mode "
               "with qmpkit.predict, rank them, and print the qmpkit mirror command of the "
               "best." if name == "advise" else "")
            + " Without --qmp it probes the embedded lab's own fio load (--size, --load-*).")
        pr.add_argument("--qmp", metavar="ADDR", help="QMP socket of a running QEMU")
        pr.add_argument("--device", metavar="NODE",
                        help="the node (or a VM's drive id) to probe; required with --qmp")
        pr.add_argument("--granularity", default="4K,16K,64K,256K,1M", metavar="LIST",
                        help="bitmap granularities (default 4K,16K,64K,256K,1M)")
        pr.add_argument("--seconds", type=_positive_float("--seconds"), default=30.0,
                        help="how long to watch (default 30)")
        pr.add_argument("--json", action="store_true", help="print probe.json on stdout")
        pr.add_argument("--out", type=Path, metavar="DIR", help="write probe.json here")
        pr.add_argument("--size", type=_size("--size"), default="1G", metavar="SIZE",
                        help="embedded: the disk's size (default 1G)")
        add_load_options(pr)
        pr.add_argument("--i-know-libvirt-is-blind", action="store_true",
                        help="probe over --qmp a QEMU that libvirt manages")
        if name == "probe":
            pr.add_argument("--clean", action="store_true",
                            help="with --qmp: remove the probe bitmaps a killed probe left")
        else:
            pr.add_argument("--target-speed", type=_rate("--target-speed"), metavar="RATE",
                            help="the target's write rate (embedded default 100M)")
            pr.add_argument("--link", metavar="SPEC",
                            help=f"the network to the target: rtt=…,rate=… or {PRESETS_HELP}")

    n = sub.add_parser("nodes", help="list the block nodes of a running QEMU",
                       description="Show the block nodes of the QEMU at --qmp: node name, "
                                   "driver, size, the device that uses it, the block job that "
                                   "holds it, the export that serves it, and its file.")
    _add_qmp(n, json_keys="node, driver, size, file, device, job, export")

    js = sub.add_parser("jobs", help="list the block jobs of a running QEMU",
                        description="Every block job of the QEMU at --qmp: id, type, device, "
                                    "status, progress, speed, ready, paused, I/O status.")
    _add_qmp(js, json_keys="id, type, device, status, current_progress, total_progress, "
                           "speed, ready, paused, io_status")

    j = sub.add_parser("job", help="control a block job after the fact (like virsh blockjob)",
                       description="Watch or steer a job that runs already, for example one "
                                   "left by `qmpkit mirror --then leave`. Exit codes as for "
                                   "mirror: 0, 1 (QEMU refused, the job failed), 2 (bad "
                                   "arguments, unknown job), 3 (timeout).")
    jsub = j.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, text in (("watch", "show (and with --out record) its progress"),
                         ("pause", "pause it"), ("resume", "resume it"),
                         ("cancel", "cancel it (in READY: keep a point-in-time copy)"),
                         ("complete", "pivot to the target (READY only)"),
                         ("speed", "change its speed limit"),
                         ("change", "switch its copy mode (QEMU >= 8.2)")):
        a = jsub.add_parser(action, help=text, description=text)
        _add_qmp(a)
        a.add_argument("--i-know-libvirt-is-blind", action="store_true",
                       help="act over --qmp on a QEMU that libvirt manages")
        a.add_argument("job_id", metavar="JOB", help="the job id (see `qmpkit jobs`)")
        a.add_argument("--timeout", type=_positive_float("--timeout"), default=60.0,
                       metavar="SECONDS", help="how long to wait (default 60; watch: 3600)")
        if action == "speed":
            a.add_argument("rate", type=_rate("RATE"), metavar="RATE",
                           help="bytes per second, 0 = unlimited (4M, 100M, ...)")
        if action == "change":
            a.add_argument("--copy-mode", choices=COPY_MODES, required=True,
                           help="background or write-blocking")
        if action == "watch":
            a.add_argument("--until", choices=("ready", "done"), default="done",
                           help="stop watching at READY, or when the job ends (default)")
            a.add_argument("--out", type=Path, metavar="DIR",
                           help="record what is watched as a trace folder")
            a.add_argument("--hz", type=_hz, default=10.0, metavar="N",
                           help="samples per second (default 10)")
    return parser


class Progress:
    """A progress line: redrawn in place on a terminal (clipped to its width, 80
    columns at most), one plain line a second otherwise."""

    def __init__(self, stream: TextIO, *, tty: bool | None = None,
                 width: int | None = None) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.width = width or min(80, shutil.get_terminal_size((80, 24)).columns)
        self._last_line = 0.0
        self._last: tuple[float, int] | None = None
        self._drawn = False

    def update(self, status: str, current: int, total: int, note: str = "",
               rate: float | None = None, *, t_s: float | None = None,
               dirty: int | None = None, disk: int | None = None) -> None:
        now = time.monotonic()
        if rate is None:
            rate = 0.0
            if self._last is not None and now > self._last[0]:
                rate = max(0.0, (current - self._last[1]) / (now - self._last[0]))
        frac = min(1.0, current / total) if total else 0.0
        phase = {"running": "copying", "ready": "in sync" if not dirty else "catching up",
                 "paused": "paused", "standby": "paused"}.get(status, status)
        if status == "running" and total and current >= total and not dirty:
            phase = "in sync"          # all copied; QEMU's READY event is on its way
        # most telling first: a narrow terminal clips the end of the line
        parts = [f"{t_s:.1f}s" if t_s is not None else "", phase, f"{frac * 100:.1f}%"]
        if dirty is not None:
            parts.append(f"dirty {format_size(dirty)}")
        parts.append(format_rate(rate))
        if note:
            parts.append(note)
        copied = f"{format_size(current)}/{format_size(total)}"
        if disk and current > disk:
            # QEMU's progress counts recopies too: say so rather than show more than the disk
            copied += f" ({current / disk:.2f}x disk: recopies)"
        parts.append(copied)
        text = "  ".join(p for p in parts if p)
        if self.tty:
            bar = 10
            fill = int(frac * bar)
            line = f"[{'#' * fill}{'.' * (bar - fill)}] {text}"
            self.stream.write("\r" + line[:self.width - 1] + "\x1b[K")
            self.stream.flush()
            self._drawn = True
            self._last = (now, current)
        elif now - self._last_line >= 1.0:
            self.stream.write(text[:self.width] + "\n")
            self.stream.flush()
            self._last_line = now
            self._last = (now, current)

    def message(self, text: str) -> None:
        self.end()
        self.stream.write(text + "\n")
        self.stream.flush()

    def end(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self._drawn = False


async def _watch(run: MirrorRun, progress: Progress, until: Any) -> Any:
    """Redraw the run's progress until ``until`` (an awaitable) finishes; its result."""
    task = asyncio.ensure_future(until)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            _show(run, progress)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _show(run: MirrorRun, progress: Progress) -> None:
    if run.job is None or run.recording is None or not run.recording.samples:
        return
    live = run.live()
    if live.ended is not None:
        return
    note = live.forecast.short if live.forecast is not None else ""
    if live.stale_s > 3 * (1.0 / (run.hz or 1.0)) + 2.0:
        note = f"no answer from QEMU for {live.stale_s:.0f} s (is it stopped?)"
    # 2 s of progress: QEMU copies in 100 ms slices, and a --speed cap lets a slice
    # through now and then; a shorter window flickers between 0 and the buffer size
    smooth = rate(run.recording.samples, "current_progress", 2.0)
    progress.update(live.status or "starting", live.current_bytes, live.total_bytes, note,
                    rate=max(0.0, smooth) if smooth is not None else live.throughput_bps,
                    t_s=live.t_s, dirty=live.dirty_bytes, disk=live.disk_bytes)


class _EventLines:
    """Prints a job's events, at most ``per_s`` lines a second: an error flood
    (thousands of BLOCK_JOB_ERROR a second) becomes one summary line a second."""

    def __init__(self, progress: Progress, per_s: float = 5.0) -> None:
        self.progress = progress
        self.per_s = per_s
        self._window = (0.0, 0)
        self._held = 0

    def __call__(self, event: dict[str, Any]) -> None:
        text = _describe_event(event)
        if not text:
            return
        now = time.monotonic()
        start, n = self._window
        if now - start >= 1.0:
            if self._held:
                self.progress.message(f"... and {self._held} more events like these")
            self._window, self._held = (now, 0), 0
            start, n = self._window
        if n < self.per_s:
            self._window = (start, n + 1)
            self.progress.message(text)
        else:
            self._held += 1


def _describe_event(event: dict[str, Any]) -> str | None:
    name, data = event["event"], event.get("data", {})
    if name == "BLOCK_JOB_ERROR":
        return f"error: {data.get('operation')} error on job {data.get('device')}, " \
               f"action {data.get('action')}"
    if name == "BLOCK_JOB_READY":
        return f"READY: job {data.get('device')} is in sync ({format_size(data.get('len', 0))})"
    if name == "JOB_STATUS_CHANGE" and data.get("status") in ("paused", "aborting"):
        return f"job {data.get('id')} is {data['status']}"
    return None


async def _rows(ns: argparse.Namespace, out: TextIO,
                fetch: Callable[[Qemu], Any]) -> list[dict[str, Any]] | None:
    """Rows read from the QEMU at ``--qmp``; None when ``--json`` printed them already."""
    qemu = await Qemu.open(ns.qmp, command_timeout=ns.qmp_timeout)
    try:
        rows = await fetch(qemu)
    finally:
        await qemu.close()
    if ns.json:
        out.write(json.dumps(rows, indent=2) + "\n")
        return None
    return rows


async def _cmd_nodes(ns: argparse.Namespace, out: TextIO) -> int:
    from .probe import stale_bitmaps
    stale: list[tuple[str, str]] = []

    async def fetch(qemu: Qemu) -> Any:
        stale.extend(await stale_bitmaps(qemu))
        return await qemu.nodes.table()
    rows = await _rows(ns, out, fetch)
    for node, name in stale:
        sys.stderr.write(f"qmpkit: stale probe bitmap {name} on {node} (a probe was killed); "
                         f"`qmpkit probe --qmp {ns.qmp} --clean` removes it\n")
    if rows is None:
        return EXIT_OK
    # 72 columns before the file's path
    out.write(f"{'NODE':<20} {'DRIVER':<9} {'SIZE':>9}  {'DEVICE':<7} {'JOB':<12} "
              f"{'EXPORT':<8} FILE\n")
    for r in rows:
        out.write(f"{r['node']:<20} {r['driver']:<9} {format_size(r['size']):>9}  "
                  f"{r['device'] or '-':<7} {r['job'] or '-':<12} {r['export'] or '-':<8} "
                  f"{r['file']}\n")
    return EXIT_OK


async def _cmd_jobs(ns: argparse.Namespace, out: TextIO) -> int:
    rows = await _rows(ns, out, lambda qemu: qemu.jobs())
    if rows is None:
        return EXIT_OK
    # 80 columns for names of up to 14 characters
    out.write(f"{'JOB':<14} {'TYPE':<6} {'DEVICE':<12} {'STATUS':<8} {'PROGRESS':>19} "
              f"{'SPEED':>11}  IO\n")
    for r in rows:
        prog = f"{format_size(r['current_progress'])} / {format_size(r['total_progress'])}"
        speed = format_rate(r["speed"]) if r["speed"] else "unlimited"
        out.write(f"{r['id']:<14} {r['type']:<6} {r['device']:<12} {r['status']:<8} "
                  f"{prog:>19} {speed:>11}  {r['io_status']}\n")
    if not rows:
        out.write("(no block jobs)\n")
    return EXIT_OK


async def _cmd_job(ns: argparse.Namespace, out: TextIO) -> int:
    if ns.action == "watch" and getattr(ns, "out", None) is not None:
        _check_out(ns.out)
    progress = Progress(out)
    qemu = await Qemu.open(ns.qmp, command_timeout=ns.qmp_timeout)
    run: MirrorRun | None = None
    failure: BaseException | None = None
    try:
        if ns.action != "watch":              # watching changes nothing
            await _refuse_behind_libvirt(qemu, ns)
        try:
            run = await MirrorRun.attach(
                qemu, ns.job_id, hz=ns.hz if ns.action == "watch" else None,
                out=getattr(ns, "out", None))
        except ArgumentError as exc:
            raise UsageError(str(exc)) from None
        job = run.job
        assert job is not None
        timeout = ns.timeout if ns.action != "watch" or ns.timeout != 60.0 else 3600.0
        try:
            if ns.action == "pause":
                await job.pause(timeout=timeout)
            elif ns.action == "resume":
                await job.resume(timeout=timeout)
            elif ns.action == "speed":
                await run.set_speed(ns.rate)
            elif ns.action == "change":
                await run.change(copy_mode=ns.copy_mode)
            elif ns.action == "complete":
                await run.complete(timeout=timeout)
            elif ns.action == "cancel":
                await run.cancel(timeout=timeout)
            else:
                run.on_event(_EventLines(progress))
                if ns.until == "ready":
                    await _watch(run, progress, job.wait_ready(timeout=timeout))
                else:
                    await _watch(run, progress, job.wait_done(timeout=timeout))
        except JobFailedError as exc:
            return _job_failed(exc, progress)
        except JobTimeoutError as exc:
            progress.message(f"qmpkit: timeout: {exc}")
            return EXIT_TIMEOUT
        st = job.state
        rate = getattr(ns, "rate", None)
        what = {"pause": "paused", "resume": "resumed",
                "speed": "speed limit now " + (format_rate(rate) if rate else "unlimited"),
                "change": f"copy mode now {getattr(ns, 'copy_mode', '')}",
                "complete": "completed: the device now writes to the target",
                "cancel": ("ended with a point-in-time copy" if run.point_in_time_copy
                           else "cancelled"),
                "watch": "is ready" if getattr(ns, "until", "") == "ready" else "ended"}[ns.action]
        # a job that ended is gone from QEMU: no status to show then
        tail = f" (status {st.status})" if st.status and not st.finished else ""
        progress.message(f"job {ns.job_id} {what}{tail}")
        return EXIT_OK
    except BaseException as exc:
        failure = exc
        raise
    finally:
        progress.end()
        if run is not None:
            await run.close(failure)
            if getattr(ns, "out", None) is not None:
                progress.message(f"trace saved in {ns.out}")
        await qemu.close()


def _mirror_options(ns: argparse.Namespace) -> dict[str, Any]:
    return dict(job_id=ns.job_id, sync=ns.sync, speed=ns.speed, granularity=ns.granularity,
                buf_size=ns.buf_size, replaces=ns.replaces,
                on_source_error=ns.on_source_error, on_target_error=ns.on_target_error,
                copy_mode=ns.copy_mode, filter_node_name=ns.filter_node_name,
                auto_finalize=False if ns.no_auto_finalize else None,
                auto_dismiss=False if ns.no_auto_dismiss else None)


def _target_options(ns: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if ns.target_aio:
        opts["aio"] = ns.target_aio
    if ns.target_cache_direct:
        opts["cache_direct"] = ns.target_cache_direct == "on"
    if ns.target_cache_no_flush:
        opts["cache_no_flush"] = ns.target_cache_no_flush == "on"
    if ns.target_detect_zeroes:
        opts["detect_zeroes"] = ns.target_detect_zeroes
        if ns.target_detect_zeroes == "unmap":
            opts["discard"] = "unmap"
    if ns.target_preallocation:
        opts["preallocation"] = ns.target_preallocation
    if opts and ns.target_file is None:
        raise UsageError("--target-aio, --target-cache-*, --target-detect-zeroes and "
                         "--target-preallocation need --target-file")
    return opts


#: API argument names that the command line spells with a prefix
_CLI_NAMES = {"aio": "target_aio", "detect_zeroes": "target_detect_zeroes",
              "preallocation": "target_preallocation", "target_options": "target_file"}


def _usage(exc: ArgumentError) -> UsageError:
    """An `ArgumentError` as the command line names it (``--buf-size: ...``)."""
    name = _CLI_NAMES.get(exc.argument, exc.argument)
    return UsageError(f"--{name.replace('_', '-')}: {str(exc).split(': ', 1)[1]}")


def _check_mirror_options(device: str, target: str, options: dict[str, Any]) -> None:
    try:
        mirror_arguments(device=device, target=target, **options)  # all checks, no I/O
    except ArgumentError as exc:
        raise _usage(exc) from None


def _check_out(folder: Path | None) -> None:
    if folder is not None:
        try:
            prepare_out_dir(folder)
        except ArgumentError as exc:
            raise UsageError(str(exc)) from None


async def _cmd_mirror(ns: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    until = ns.until or ("ready" if ns.then == "leave" else "done")
    if until == "done" and ns.then == "leave":
        raise UsageError("--then leave cannot be combined with --until done")
    options = _mirror_options(ns)
    _target_options(ns)           # --target-* options need --target-file
    if ns.json:
        out = sys.stderr          # stdout carries the JSON report alone
    if ns.qmp is None:
        return await _cmd_mirror_embedded(ns, out, options)
    if ns.device is None or (ns.target is None and ns.target_file is None):
        raise UsageError("with --qmp, give --device and one of --target or --target-file")
    if ns.create and ns.target_file is None:
        raise UsageError("--create needs --target-file")
    if ns.pause_guest_to_verify and not ns.verify:
        raise UsageError("--pause-guest-to-verify needs --verify")
    _check_mirror_options(ns.device, ns.target or "qmpkit-target", options)
    _check_out(ns.out)
    progress = Progress(out)
    qemu = await Qemu.open(ns.qmp, command_timeout=ns.qmp_timeout)
    run: MirrorRun | None = None
    failure: BaseException | None = None
    try:
        await _refuse_behind_libvirt(qemu, ns)
        try:
            run = MirrorRun(qemu, device=ns.device, target=ns.target,
                            target_file=ns.target_file, create=ns.create,
                            target_format=ns.target_format,
                            target_node_name=ns.target_node_name, hz=ns.hz, out=ns.out,
                            pause_guest_to_verify=ns.pause_guest_to_verify,
                            max_errors=ns.max_errors or None,
                            rescue_after=ns.rescue_after, target_options=_target_options(ns),
                            meta={"qmp": ns.qmp, "workload": None,
                                  "workload_text": f"attached to {ns.qmp}; the load is "
                                                   "whatever writes there"},
                            **options)
        except ArgumentError as exc:
            raise _usage(exc) from None
        return await _drive_attached(ns, run, progress, until)
    except BaseException as exc:
        failure = exc
        if isinstance(exc, (KeyboardInterrupt, asyncio.CancelledError)) and run is not None \
                and run.job is not None and run.phase.value == "running":
            progress.message("qmpkit: interrupted; cancelling the job")
        raise
    finally:
        progress.end()
        if run is not None:
            was_running = run.job is not None and not run.job.state.finished \
                and run.phase.value == "running"
            await run.close(failure)
            if failure is not None and run.completed:
                progress.message(f"job {run.job_id} completed (pivoted to the target) before "
                                 "the interruption; the verification did not finish")
            elif was_running and run.job is not None and run.job.state.end is not None:
                progress.message(f"job {run.job_id} cancelled; the source is untouched")
            for problem in run.cleanup_errors:
                err.write(f"qmpkit: cleanup: {_clip(problem)}\n")
            if run.recording is not None and run.job is not None:
                rep = report(run.trace())
                if ns.json:
                    sys.stdout.write(json.dumps(rep, indent=2) + "\n")
                elif failure is None:
                    progress.message(report_text(rep))
            if ns.out is not None and run.recording is not None:
                if isinstance(failure, (KeyboardInterrupt, asyncio.CancelledError)):
                    # stopping fast matters more than pictures: plot them later
                    progress.message(f"trace saved in {ns.out} (plots: qmpkit plot {ns.out})")
                else:
                    write_plots([run.trace()], ns.out)
                    progress.message(f"trace saved in {ns.out}")
        await qemu.close()


async def _drive_attached(ns: argparse.Namespace, run: MirrorRun, progress: Progress,
                          until: str) -> int:
    run.on_event(_EventLines(progress))
    await run.start()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ns.timeout
    left = lambda: max(0.1, deadline - loop.time())  # noqa: E731
    started = time.monotonic()
    try:
        outcome = await _watch(run, progress, run.wait_ready(timeout=left()))
    except JobFailedError as exc:
        return _job_failed(exc, progress)
    if outcome != "ready":
        progress.message(f"qmpkit: timeout: timed out after {ns.timeout:g} s waiting for job "
                         f"{run.job_id!r} to become ready (last status {run.state.status})")
        return EXIT_TIMEOUT
    if ns.then == "leave":
        run.leave()
        progress.message(f"job {run.job_id} left running in READY; see `qmpkit jobs`")
        return EXIT_OK
    try:
        if ns.then == "complete":
            end = await _watch(run, progress, run.complete(
                timeout=left() if until == "done" else None, verify=ns.verify))
        else:
            end = await _watch(run, progress, run.cancel(
                timeout=left() if until == "done" else None))
            if ns.verify and end is not None:
                await run.verify()
    except JobFailedError as exc:
        code = _job_failed(exc, progress)
        if run.error is not None and run.error.startswith("refused to pivot"):
            progress.message(f"job {run.job_id} cancelled; the source is untouched")
        return code
    except JobTimeoutError as exc:
        progress.message(f"qmpkit: timeout: {exc}")
        return EXIT_TIMEOUT
    if end is None:
        progress.message(f"job {run.job_id}: {ns.then} sent; not waiting for the end "
                         "(--until ready)")
        return EXIT_OK
    copied = run.state.offset or 0
    secs = time.monotonic() - started
    verb = "completed (pivoted to the target)" if run.completed else \
        "ended with a point-in-time copy"
    progress.message(f"job {run.job_id} {verb}: {format_size(copied)} in {secs:.1f} s "
                     f"({format_rate(copied / secs if secs else 0)})")
    if run.verification is not None:
        progress.message(str(run.verification))
        if run.verification.ok is False:
            return EXIT_FAILED
        if run.verification.ok is None:
            return EXIT_UNVERIFIED
    return EXIT_OK


def report_text(rep: dict[str, Any]) -> str:
    """The end-of-run report, a few aligned lines (like fio's)."""
    def secs(v: Any) -> str:
        return f"{v:.1f} s" if v is not None else "-"
    lines = [f"  time        READY after {secs(rep['time_to_ready_s'])}, "
             f"{secs(rep['total_s'])} in all"]
    if rep["bytes_copied"] is not None:
        amp = (f" (amplification {rep['amplification']:.2f}x of "
               f"{format_size(rep['disk_bytes'])})" if rep.get("amplification") else "")
        lines.append(f"  copied      {format_size(rep['bytes_copied'])}{amp}")
    if rep["mean_throughput_bps"]:
        peak = rep["peak_throughput_bps"] or 0
        why = (" (above --speed: QEMU lets the first buf-size through at once)"
               if rep.get("speed_bps") and peak > 1.5 * rep["speed_bps"] else "")
        lines.append(f"  throughput  mean {format_rate(rep['mean_throughput_bps'])}, peak "
                     f"{format_rate(peak)}{why}")
    if rep["peak_dirty_bytes"] is not None:
        lines.append(f"  dirty       peak {format_size(rep['peak_dirty_bytes'])} (the job's "
                     "bitmap: what was left to copy at most)")
    if rep["guest_write_p99_ms"] is not None:
        lines.append(f"  guest       write latency p50 {rep['guest_write_p50_ms']:.1f} ms, "
                     f"p99 {rep['guest_write_p99_ms']:.1f} ms")
    ops = rep.get("qemu_ops")
    if ops:
        size = format_size(ops["mean_op_bytes"]) if ops["mean_op_bytes"] else "-"
        waits = (f"; waited {ops['waits_for_a_slot']} times for a free slot or buffer "
                 f"({ops['mean_in_flight_when_waiting']:.1f} in flight)"
                 if ops["waits_for_a_slot"] else "")
        throttled = (f"; {ops['throttled_slices']} slices slept for --speed"
                     if ops["throttled_slices"] and rep.get("speed_bps") else "")
        lines.append(f"  QEMU        {ops['ops']} copy operations of {size} on average"
                     f"{waits}{throttled}")
    if rep["error_events"]:
        lines.append(f"  I/O errors  {rep['error_events']}")
    return "\n".join(lines)


def _job_failed(exc: JobFailedError, progress: Progress) -> int:
    progress.message(f"qmpkit: {_clip(str(exc))}")
    for e in exc.errors[:3]:
        progress.message(f"  I/O error: {e.get('operation')} ({e.get('action')})")
    return EXIT_FAILED


def _clip(text: str, limit: int = 300) -> str:
    """One line of at most ``limit`` characters, control characters escaped
    (text from QEMU or a QMP peer must not drive the terminal)."""
    clean = "".join(c if c.isprintable() else repr(c)[1:-1] for c in " ".join(text.split()))
    return clean if len(clean) <= limit else clean[:limit - 5] + " [..]"


def _live_progress(progress: Progress) -> tuple[Callable[[MirrorRun], None],
                                                list[asyncio.Task[None]]]:
    """An ``on_start`` for `run_experiment` that shows each new run's progress and
    forecast (replacing the previous run's), and the tasks to cancel at the end."""
    watcher: list[asyncio.Task[None]] = []

    async def follow(run: MirrorRun) -> None:
        while run.job is not None and not run.job.state.finished:
            _show(run, progress)
            await asyncio.sleep(0.25)

    def on_start(run: MirrorRun) -> None:
        for task in watcher:
            task.cancel()
        run.on_event(_EventLines(progress))
        watcher.append(asyncio.ensure_future(follow(run)))

    return on_start, watcher


async def _cmd_mirror_embedded(ns: argparse.Namespace, out: TextIO,
                               options: dict[str, Any]) -> int:
    if ns.device or ns.target or ns.target_file or ns.create or ns.replaces:
        raise UsageError("--device, --target, --target-file, --create and --replaces need "
                         "--qmp (without it, qmpkit makes its own source and target)")
    if ns.then == "leave":
        raise UsageError("--then leave needs --qmp: the embedded QEMU stops when qmpkit exits")
    if ns.early_stop < 0 or ns.early_stop != ns.early_stop:
        raise UsageError(f"--early-stop: must be >= 0 seconds; got {ns.early_stop}")
    if ns.pause_guest_to_verify:
        raise UsageError("--pause-guest-to-verify needs --qmp of a VM: the embedded QEMU "
                         "has no guest (its write load is stopped before the pivot)")
    _check_mirror_options("src", "dst", options)
    _check_out(ns.out)
    setup, load = setup_from_args(ns), load_from_args(ns)
    progress = Progress(out)
    progress.message(f"embedded QEMU: {setup.describe()}; "
                     f"{load.describe() if load else 'no write load'}")
    on_start, watcher = _live_progress(progress)
    try:
        result = await run_experiment(setup=setup, load=load, mirror=options,
                                      time_limit=ns.timeout, hz=ns.hz, out=ns.out,
                                      give_up=hopeless(ns.early_stop) if ns.early_stop > 0
                                      else None,
                                      on_start=on_start, max_errors=ns.max_errors or None,
                                      rescue_after=ns.rescue_after,
                                      command_timeout=ns.qmp_timeout,
                                      qemu_trace=ns.qemu_trace)
    finally:
        for task in watcher:
            task.cancel()
        progress.end()
    s = result.trace.summary
    if ns.out is not None:
        write_plots([result.trace], ns.out)
        progress.message(f"trace saved in {ns.out}")
    rep = report(result.trace)
    if ns.json:
        sys.stdout.write(json.dumps(rep, indent=2) + "\n")
    else:
        progress.message(report_text(rep))
    if not result.converged:
        if result.extra.get("early_stopped"):
            why = result.extra.get("early_stop_reason") or forecast(result.trace.samples).text
            progress.message(f"qmpkit: stopped early: the forecast said '{why}' for "
                             f"{ns.early_stop:g} s; the job was cancelled. Try --granularity "
                             "4K (each small write then dirties less), or --copy-mode "
                             "write-blocking")
        else:
            progress.message(f"qmpkit: timeout: not READY within {ns.timeout:g} s; "
                             f"{result.trace.summary.get('error') or 'the job was cancelled'}")
        return EXIT_TIMEOUT
    progress.message(f"READY after {s['time_to_ready_s']:.1f} s, completed, "
                     f"{s.get('verification') or 'NOT verified'}; "
                     f"{format_size(s['bytes_copied'])} copied "
                     f"(amplification {s['amplification']:.2f})")
    return EXIT_OK if s.get("verified") else EXIT_FAILED if s.get("verified") is False \
        else EXIT_UNVERIFIED


async def _cmd_demo(ns: argparse.Namespace, out: TextIO) -> int:
    if ns.json:
        out = sys.stderr
    if ns.wan and not ns.link:
        ns.link = ["wan"]
    setup, load = setup_from_args(ns), load_from_args(ns)
    _check_out(ns.out)
    progress = Progress(out)
    on_start, watcher = _live_progress(progress)
    progress.message(f"qmpkit demo: {setup.describe()}; "
                     f"{load.describe() if load else 'no write load'}")
    try:
        rows = await run_demo(ns.out, setup=setup, load=load, time_limit=ns.time_limit,
                              hz=ns.hz, report=progress.message, on_start=on_start)
    finally:
        for task in watcher:
            task.cancel()
        progress.end()
    if ns.json:
        sys.stdout.write(json.dumps([dataclasses.asdict(r) for r in rows], indent=2) + "\n")
        return EXIT_OK
    progress.message("")
    progress.message(table_text(rows, ns.time_limit))
    return EXIT_OK


def _list(text: str, option: str, parse: Any) -> list[Any]:
    values = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise UsageError(f"{option}: empty item in {text!r}")
        if item == "default":
            values.append(None)
            continue
        try:
            values.append(parse(item))
        except ArgumentError as exc:
            raise UsageError(f"{option}: {str(exc).split(': ', 1)[1]}") from None
    return values


async def _cmd_probe(ns: argparse.Namespace, out: TextIO) -> int:
    """``qmpkit probe`` and ``qmpkit advise``."""
    from .link import LinkSpec
    from .predict import advise
    from .probe import check_probe_granularity, clean, probe
    advising = ns.command == "advise"
    gs = _list(ns.granularity, "--granularity", check_probe_granularity)
    if None in gs:
        raise UsageError("--granularity: give sizes ('default' is not a bitmap granularity)")
    link = None
    if advising and ns.link:
        try:
            link = LinkSpec.parse(ns.link)
        except ArgumentError as exc:
            raise UsageError(f"--link: {str(exc).split(': ', 1)[1]}") from None
    if ns.qmp is None and (ns.device or getattr(ns, "clean", False)):
        raise UsageError("--device and --clean need --qmp (without it the embedded lab is "
                         "probed)")
    if ns.qmp is not None and not ns.device and not getattr(ns, "clean", False):
        raise UsageError("--device: say which node or drive to probe")
    _check_out(ns.out)
    if getattr(ns, "clean", False):
        qemu = await Qemu.open(ns.qmp, command_timeout=ns.qmp_timeout)
        try:
            for node, name in await clean(qemu):
                out.write(f"removed {name} from {node}\n")
        finally:
            await qemu.close()
        return EXIT_OK
    msg = sys.stderr if ns.json else out
    device = ns.device or "src"
    msg.write(f"probing {device} for {ns.seconds:g} s at "
              f"{', '.join(format_size(g) for g in gs)}...\n")
    try:
        if ns.qmp is None:                      # the lab: a disk and fio writing into it
            from .experiment import probe_lab
            load = load_from_args(ns)
            if load is None:
                raise UsageError("--no-load: the embedded probe watches the lab's load")
            profile = await probe_lab(size=ns.size, load=load, granularities=gs,
                                      seconds=ns.seconds)
        else:
            qemu = await Qemu.open(ns.qmp, command_timeout=ns.qmp_timeout)
            try:
                await _refuse_behind_libvirt(qemu, ns)
                profile = await probe(qemu, device, granularities=gs, seconds=ns.seconds)
            finally:
                await qemu.close()
    except ArgumentError as exc:
        raise UsageError(f"--{exc.argument.replace('_', '-')}: "
                         f"{str(exc).split(': ', 1)[1]}") from None
    if ns.out is not None:
        msg.write(f"wrote {profile.save(ns.out)}\n")
    data = profile.to_dict()
    if not advising:
        if ns.json:
            out.write(json.dumps(data, indent=2) + "\n")
        else:
            out.write(f"guest writes: {format_rate(profile.write_bps)} in "
                      f"{format_size(profile.mean_write_bytes)} writes, over "
                      f"{profile.seconds:.0f} s\n{profile.table()}\n")
        return EXIT_OK
    target = ns.target_speed or (100 * MiB if ns.qmp is None else None)
    if target is None and link is None:
        raise UsageError("--target-speed or --link: the prediction needs the target's write "
                         "rate or the link to it")
    ranked = advise(disk_bytes=profile.disk_bytes, load=profile.load(), granularities=gs,
                    target_bps=target, link=link)
    best = ranked[0]
    where = (f"--qmp {ns.qmp} --device {device} --target-file ... --create" if ns.qmp
             else f"--size {format_size(profile.disk_bytes)}")
    command = (f"qmpkit mirror {where} --granularity {format_size(best.granularity)}"
               f" --buf-size {format_size(best.buf_size)} --copy-mode {best.copy_mode}"
               ).replace(" KiB", "K").replace(" MiB", "M")
    if ns.json:
        out.write(json.dumps({"probe": data, "command": command,
                              "ranked": [dataclasses.asdict(p) for p in ranked]}, indent=2)
                  + "\n")
        return EXIT_OK
    out.write(f"guest writes: {format_rate(profile.write_bps)}; {profile.table()}\n\n")
    out.write(f"{'#':>2} {'granularity':>11} {'buf-size':>8} {'mode':<14} {'converges':<10} "
              f"{'READY':>8}  why\n")
    for i, p in enumerate(ranked, 1):
        t = f"~{p.time_to_ready_s:.0f} s" if p.time_to_ready_s is not None else "-"
        out.write(f"{i:>2} {format_size(p.granularity):>11} {format_size(p.buf_size):>8} "
                  f"{p.copy_mode:<14} {p.converges:<10} {t:>8}  {p.reason}\n")
    out.write(f"\nbest: {command}\n  because {best.reason}\n")
    return EXIT_OK


async def _libvirt_command(ns: argparse.Namespace, out: TextIO) -> int:
    """``--libvirt URI --domain NAME``: the command through libvirt's API."""
    from . import libvirt_cli
    if getattr(ns, "qmp", None):
        raise UsageError("--qmp and --libvirt: give one (with --libvirt, libvirt owns the "
                         "QMP monitor)")
    try:
        if ns.command == "mirror":
            return await libvirt_cli.cmd_mirror(ns, _mirror_options(ns), out)
        if ns.command == "jobs":
            return await libvirt_cli.cmd_jobs(ns, out)
        if ns.command == "nodes":
            return await libvirt_cli.cmd_nodes(ns, out)
        if ns.command == "job":
            return await libvirt_cli.cmd_job(ns, out)
    except ArgumentError as exc:
        raise UsageError(f"--{exc.argument.replace('_', '-')}: "
                         f"{str(exc).split(': ', 1)[1]}") from None
    raise UsageError(f"--libvirt: not available for `qmpkit {ns.command}`")


async def _refuse_behind_libvirt(qemu: Qemu, ns: argparse.Namespace) -> None:
    """A state-changing command over QMP to a QEMU that libvirt manages is
    refused: libvirt would not see it, and a later libvirt pivot or restart can
    lose the guest's data. ``--i-know-libvirt-is-blind`` overrides."""
    if getattr(ns, "i_know_libvirt_is_blind", False):
        return
    from .libvirt import managed_by_libvirt
    reason = await managed_by_libvirt(qemu.client)
    if reason:
        raise UsageError(f"this QEMU is managed by libvirt ({reason}). A change made over "
                         "QMP is invisible to libvirt: its XML would name a file the guest no "
                         "longer writes. Use --libvirt URI --domain NAME instead (or "
                         "--i-know-libvirt-is-blind)")


def _node_axes(ns: argparse.Namespace) -> dict[str, list[Any]]:
    """The sweep's node-option axes, each checked against its accepted values."""
    accepted = {"aio": AIO_MODES, "cache_direct": ("on", "off"),
                "detect_zeroes": DETECT_ZEROES, "preallocation": ("off", "falloc", "full",
                                                                  "metadata")}
    axes: dict[str, list[Any]] = {}
    for name, values in accepted.items():
        text = getattr(ns, name)
        if text is None:
            continue
        option = f"--{name.replace('_', '-')}"

        def check(v: str, values: Any = values, name: str = name) -> Any:
            if v not in values:
                raise ArgumentError(name, f"must be one of {', '.join(values)}; got {v!r}")
            return v == "on" if name == "cache_direct" else v
        axes[name] = _list(text, option, check)
    return axes


def _links(given: list[str] | None) -> list[Any]:
    """The sweep's link axis: each --link (``none``: no link), checked."""
    from .link import LinkSpec
    values: list[Any] = []
    for text in given or ["none"]:
        try:
            values.append(None if text == "none" else LinkSpec.parse(text))
        except ArgumentError as exc:
            raise UsageError(f"--link: {str(exc).split(': ', 1)[1]}") from None
    return values


async def _cmd_sweep(ns: argparse.Namespace, out: TextIO) -> int:
    from .mirror import check_granularity
    from .sweep import grid, run_sweep
    if ns.json:
        out = sys.stderr

    def copy_mode(v: str) -> str:
        if v not in COPY_MODES:
            raise ArgumentError("copy_mode", f"must be one of {', '.join(COPY_MODES)}; "
                                             f"got {v!r}")
        return v

    if ns.repeat < 1:
        raise UsageError(f"--repeat: must be >= 1, got {ns.repeat}")
    try:
        configs = grid(granularity=_list(ns.granularity, "--granularity", check_granularity),
                       buf_size=_list(ns.buf_size, "--buf-size",
                                      lambda v: parse_size(v, name="buf_size")),
                       copy_mode=_list(ns.copy_mode, "--copy-mode", copy_mode),
                       speed=_list(ns.speed, "--speed", lambda v: parse_rate(v, name="speed")),
                       link=_links(ns.link), **_node_axes(ns))
    except ArgumentError as exc:
        raise UsageError(f"--{exc.argument.replace('_', '-')}: "
                         f"{str(exc).split(': ', 1)[1]}") from None
    setup, load = setup_from_args(ns), load_from_args(ns)
    _check_out(ns.out)
    stream = out

    def progress(k: int, n: int, label: str, eta: float | None) -> None:
        eta_text = f", ETA {eta / 60:.0f} min {eta % 60:.0f} s" if eta is not None else ""
        bar = "#" * int(30 * (k - 1) / n) + "." * (30 - int(30 * (k - 1) / n))
        stream.write(f"[{bar}] run {k} of {n}{eta_text}: {label}\n")
        stream.flush()

    out.write(f"qmpkit sweep: {len(configs)} configurations x {ns.repeat} + offline copy; "
              f"{setup.describe()}; {load.describe() if load else 'no write load'}\n")
    budget_us = ns.latency_budget_ms * 1000.0 if ns.latency_budget_ms else None
    result = await _sweep_or_usage(run_sweep(
        ns.out, configs=configs, repeat=ns.repeat, setup=setup, load=load,
        time_limit=ns.time_limit, seed=ns.seed, early_stop=ns.early_stop, hz=ns.hz,
        progress=progress, fresh=ns.fresh, latency_budget_us=budget_us, predict=ns.predict))
    rec = result["recommendation"]
    if ns.json:
        summary = json.loads(result["summary"].to_json(orient="records"))
        sys.stdout.write(json.dumps({"summary": summary, "recommendation": rec},
                                    indent=2) + "\n")
        return EXIT_OK
    out.write("\n" + sweep_table(result["summary"]) + "\n\n")
    if rec["chosen"] is None:
        out.write("no recommendation: " + "; ".join(rec["reasons"]) + "\n")
    else:
        out.write(f"recommendation: granularity {format_size(rec['granularity'])}, buf-size "
                  f"{format_size(rec['buf_size'])}, copy-mode {rec['copy_mode']}, speed "
                  f"{format_rate(rec['speed']) if rec['speed'] else 'unlimited'}\n")
        for reason in rec["reasons"]:
            out.write(f"  - {reason}\n")
    out.write(f"wrote {ns.out / 'results.csv'}, heatmaps and recommendation.json\n")
    return EXIT_OK


async def _sweep_or_usage(coro: Any) -> Any:
    """A sweep folder that cannot be resumed is a usage error (``--out: ...``)."""
    try:
        return await coro
    except ArgumentError as exc:
        if exc.argument == "out":
            raise _usage(exc) from None
        raise


def sweep_table(summary: Any) -> str:
    lines = [f"{'configuration':<66} {'READY':>18} {'time to READY':>15} {'ampl.':>6} "
             f"{'p99':>9}"]
    for r in summary.to_dict("records"):
        t = r["time_to_ready_s"]
        sd = r["time_to_ready_s_sd"] or 0.0
        ready = f"{r['converged_runs']}/{r['runs']}" + \
            (f" ({r['failed_runs']} failed)" if r.get("failed_runs") else "")
        tt = f"{t:.1f} ± {sd:.1f} s" if t == t and t is not None else "-"
        amp = f"{r['amplification']:.2f}" if r["amplification"] == r["amplification"] else "-"
        p99 = r["guest_p99_us"]
        p99t = f"{p99 / 1000:.1f} ms" if p99 is not None and p99 == p99 else "-"
        lines.append(f"{r['label']:<66} {ready:>18} {tt:>15} {amp:>6} {p99t:>9}")
    return "\n".join(lines)


#: traces overlaid at most in one plot (matplotlib's ten colours)
MAX_OVERLAID = 10


def _trace_folders(folder: Path) -> list[Path]:
    """A trace folder itself; the run folders of a demo's output; or one run per
    configuration (the first repeat) of a sweep's output."""
    if (folder / "trace.csv").exists() or not folder.is_dir():
        return [folder]                   # Trace.load says what is wrong with it
    runs = folder / "runs" if (folder / "sweep.json").exists() else folder
    found = sorted(d for d in runs.iterdir() if (d / "trace.csv").exists())
    if runs is not folder:                # a sweep: repeat 0 of each configuration
        first = [d for d in found if d.name.endswith("_r0")]
        found = first or found
    if not found:
        raise UsageError(f"{folder}: not a trace folder, nor a demo's or a sweep's output "
                         "(no trace.csv in it or in its run folders)")
    if len(found) > MAX_OVERLAID:
        raise UsageError(f"{folder}: {len(found)} runs are too many to overlay (at most "
                         f"{MAX_OVERLAID}); name the run folders to compare, for example "
                         f"{found[0]} {found[1]}")
    return found


def _cmd_plot(ns: argparse.Namespace, out: TextIO) -> int:
    if len(ns.traces) > 1 and ns.out is None:
        raise UsageError("--out: several trace folders are overlaid into one set of plots; "
                         "say where they go (never the working directory by default)")
    _check_out(ns.out)
    traces = []
    for folder in [f for given in ns.traces for f in _trace_folders(given)]:
        try:
            traces.append(Trace.load(folder))
        except ValueError as exc:
            raise UsageError(f"damaged trace: {exc}") from None
        except OSError as exc:
            raise UsageError(f"{folder}: not a trace folder ({exc.strerror}: "
                             f"{Path(exc.filename or folder).name})") from None
    dest = ns.out or ns.traces[0]
    dest.mkdir(parents=True, exist_ok=True)
    for path in write_plots(traces, dest):
        out.write(f"wrote {path}\n")
    return EXIT_OK


def _run(coro: Any) -> int:
    """``asyncio.run`` at the edge. SIGTERM and SIGHUP cancel the work (as
    SIGINT does), so that every ``finally`` runs: jobs are cancelled, nodes
    and temp dirs removed, traces saved."""
    async def guarded() -> int:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, task.cancel)
        try:
            return await coro
        finally:
            for sig in (signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
    return asyncio.run(guarded())


def main(argv: Sequence[str] | None = None) -> int:
    # A qmpkit started with SIGINT ignored (a background job of a script) must
    # still stop cleanly on Ctrl-C: asyncio only handles SIGINT when it has
    # Python's default handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(level=(logging.ERROR, logging.INFO, logging.DEBUG)[min(ns.verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s")
    # qmpkit reports QMP failures itself, in one line; qemu.qmp's own log only with -vv.
    logging.getLogger("qemu.qmp").setLevel(logging.DEBUG if ns.verbose >= 2 else logging.CRITICAL)
    out, err = sys.stdout, sys.stderr
    try:
        if getattr(ns, "libvirt", None):
            return _run(_libvirt_command(ns, out))
        if ns.command in ("nodes", "jobs", "job") and not ns.qmp:
            raise UsageError("--qmp ADDR or --libvirt URI --domain NAME: say which QEMU")
        if ns.command == "nodes":
            return _run(_cmd_nodes(ns, out))
        if ns.command in ("probe", "advise"):
            return _run(_cmd_probe(ns, out))
        if ns.command == "jobs":
            return _run(_cmd_jobs(ns, out))
        if ns.command == "job":
            return _run(_cmd_job(ns, out))
        if ns.command == "demo":
            return _run(_cmd_demo(ns, out))
        if ns.command == "plot":
            return _cmd_plot(ns, out)
        if ns.command == "sweep":
            return _run(_cmd_sweep(ns, out))
        return _run(_cmd_mirror(ns, out, err))
    except (UsageError, ArgumentError) as exc:
        err.write(_clip(f"qmpkit: error: {exc}") + "\n")
        return EXIT_USAGE
    except QemuCommandError as exc:
        err.write(_clip(f"qmpkit: QEMU refused {exc.command}: {exc.desc}") + "\n")
        return EXIT_FAILED
    except QmpkitError as exc:
        err.write(_clip(f"qmpkit: {exc}") + "\n")
        return EXIT_FAILED
    except KeyboardInterrupt:
        err.write("qmpkit: interrupted\n")
        return EXIT_INTERRUPTED
    except asyncio.CancelledError:
        err.write("qmpkit: terminated\n")
        return EXIT_TERMINATED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
