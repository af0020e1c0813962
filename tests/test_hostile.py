"""Hostile conditions (issue #11): a hung or flooding QEMU, signals, a full disk,
fake QMP peers, damaged files. Every wait is bounded; nothing is left behind.

Each test cleans up by its own handles: processes by PID or Popen object, the
tmpfs it mounted by its path."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import QMPKIT_BIN, run_cli, running

from qmpkit import Qemu, create_image

MiB = 1 << 20


def qmp(qemu) -> str:
    return str(qemu.daemon.monitor_path(1))


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                found.append(int(entry))
    return found


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


async def start_cli(*args: str, **popen: object) -> subprocess.Popen:
    return subprocess.Popen([QMPKIT_BIN, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, **popen)


async def wait_exit(proc: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    t0 = time.monotonic()
    while proc.poll() is None and time.monotonic() - t0 < timeout:
        await asyncio.sleep(0.1)
    if proc.poll() is None:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"qmpkit still ran after {timeout} s:\n{out.decode()}\n"
                             f"{err.decode()}")
    out, err = proc.communicate()
    return proc.returncode, out.decode(), err.decode()


async def wait_for(predicate, timeout: float = 30.0) -> None:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, "timed out waiting"
        await asyncio.sleep(0.1)


# -- 1. a hung QEMU ----------------------------------------------------------------------

async def test_a_stopped_qemu_is_a_timeout_not_a_hang(qemu, tmp_path):
    await qemu.nodes.add_image("src", 32 * MiB, fill="mixed")
    await qemu.nodes.add_image("dst", 32 * MiB)
    proc = await start_cli("mirror", "--qmp", qmp(qemu), "--device", "src", "--target", "dst",
                           "--speed", "1M", "--timeout", "4", "--out", str(tmp_path / "t"))
    try:
        await wait_for(lambda: (tmp_path / "t" / "trace.csv").exists())
        os.kill(qemu.daemon.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        code, out, err = await wait_exit(proc, 4 + 15)
        assert time.monotonic() - t0 < 4 + 15
    finally:
        os.kill(qemu.daemon.pid, signal.SIGCONT)
    assert code == 3, out + err
    assert "QEMU does not answer" in err
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert "error" not in summary or summary["error"]
    # QEMU answers again: the job the hung QEMU kept is ours to end
    for job in await qemu.client.execute("query-jobs"):
        await qemu.client.execute("job-cancel", {"id": job["id"]})


async def test_a_stopped_embedded_qemu_is_killed_and_its_dir_removed(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = await start_cli("--qmp-timeout", "3", "mirror", "--size", "32M", "--no-load",
                           "--speed", "1M", "--timeout", "4", env=env)
    await wait_for(lambda: any(comm(p).startswith("qemu-storage") for p in children_of(proc.pid)))
    (qsd,) = [p for p in children_of(proc.pid) if comm(p).startswith("qemu-storage")]
    await asyncio.sleep(1)
    os.kill(qsd, signal.SIGSTOP)
    code, out, err = await wait_exit(proc, 4 + 15)
    assert code == 3, out + err
    await wait_for(lambda: not running(qsd), 10)
    assert not list(tmp_path.glob("qmpkit-*"))


# -- 2. an error flood ------------------------------------------------------------------

@pytest.fixture
def full_tmpfs(tmp_path):
    """A 4 MiB tmpfs: writes past it fail with a real ENOSPC."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


async def test_an_error_flood_stays_bounded_and_obeys_sigterm(qemu, tmp_path, full_tmpfs):
    await qemu.nodes.add_image("src", 64 * MiB, fill="mixed")
    target = full_tmpfs / "t.raw"
    await create_image(target, 64 * MiB)                     # sparse: fits until written
    proc = await start_cli("mirror", "--qmp", qmp(qemu), "--device", "src",
                           "--target-file", str(target), "--on-target-error", "ignore",
                           "--max-errors", "500000", "--out", str(tmp_path / "trace"))
    try:
        await wait_for(lambda: (tmp_path / "trace" / "trace.csv").exists())
        await asyncio.sleep(1.5)                             # thousands of errors a second
        status = Path(f"/proc/{proc.pid}/status").read_text()
        rss_kib = int(next(line.split()[1] for line in status.splitlines()
                           if line.startswith("VmHWM:")))
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        code, out, err = await wait_exit(proc, 15)
        assert time.monotonic() - t0 < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rss_kib < 200 * 1024, f"peak RSS {rss_kib} KiB"
    assert code == 143, out + err
    assert out.count("\n") < 400                             # coalesced, not 243k lines
    assert "more events like these" in out
    summary = json.loads((tmp_path / "trace" / "summary.json").read_text())
    assert summary["error"] == "interrupted" and summary["error_events"] > 100
    events = (tmp_path / "trace" / "events.jsonl").read_text().splitlines()
    assert len(events) < 200
    code, out, err = await run_cli("plot", str(tmp_path / "trace"), timeout=60)
    assert code == 0, err
    assert await qemu.client.execute("query-jobs") == []
    assert target.exists()                                    # the user's file stays


async def test_max_errors_cancels_and_reports(qemu, tmp_path, full_tmpfs):
    await qemu.nodes.add_image("src", 64 * MiB, fill="mixed")
    target = full_tmpfs / "t.raw"
    await create_image(target, 64 * MiB)
    t0 = time.monotonic()
    code, out, err = await run_cli("mirror", "--qmp", qmp(qemu), "--device", "src",
                                   "--target-file", str(target), "--on-target-error",
                                   "ignore", "--max-errors", "500", timeout=60)
    assert time.monotonic() - t0 < 30
    assert code == 1, out + err
    assert "cancelled after more than 500 I/O errors" in out
    assert await qemu.client.execute("query-jobs") == []
    assert target.exists()                                    # the user's file stays


# -- 3.-7. processes and signals ----------------------------------------------------------

async def test_qemu_img_dies_with_a_killed_qmpkit(tmp_path):
    code = ("import asyncio, sys\nfrom qmpkit import create_image\n"
            f"asyncio.run(create_image({str(tmp_path / 'big.raw')!r}, '4G', fill='mixed'))\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        await wait_for(lambda: any(comm(p) == "qemu-io" for p in children_of(proc.pid)), 60)
        (tool,) = [p for p in children_of(proc.pid) if comm(p) == "qemu-io"]
        proc.kill()
        proc.wait()
        await wait_for(lambda: not running(tool), 10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_stale_temp_dirs_of_dead_owners_are_removed(tmp_path):
    from qmpkit.process import OWNER_FILE, _start_time
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live, foreign = (tmp_path / n for n in ("qmpkit-stale", "qmpkit-live", "qmpkit-x"))
    for d in (stale, live, foreign):
        d.mkdir()
        (d / "big.img").write_bytes(b"x" * 4096)
    (stale / OWNER_FILE).write_text(f"{dead.pid} 12345\n")
    (live / OWNER_FILE).write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
    q = await Qemu.open(workdir=tmp_path)
    try:
        assert not stale.exists()
        assert live.exists() and foreign.exists()           # live owner; no owner file
        assert (q.workdir / OWNER_FILE).read_text().split()[0] == str(os.getpid())
    finally:
        await q.close()


async def test_ctrl_c_to_the_process_group_is_handled_by_qmpkit_alone(tmp_path):
    proc = await start_cli("mirror", "--size", "32M", "--no-load", "--speed", "1M",
                           "--out", str(tmp_path / "t"), start_new_session=True)
    await wait_for(lambda: (tmp_path / "t" / "trace.csv").exists(), 60)
    os.killpg(proc.pid, signal.SIGINT)                       # what a terminal's Ctrl-C does
    code, out, err = await wait_exit(proc, 30)
    assert code == 130, out + err
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert summary["error"] == "interrupted"                 # not "died of SIGINT"
    assert "qemu_crashed" not in summary


async def test_sigint_works_even_when_inherited_ignored(qemu, tmp_path):
    await qemu.nodes.add_image("src", 32 * MiB, fill="mixed")
    await qemu.nodes.add_image("dst", 32 * MiB)
    proc = await start_cli("mirror", "--qmp", qmp(qemu), "--device", "src", "--target", "dst",
                           "--speed", "1M", "--out", str(tmp_path / "t"),
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    await wait_for(lambda: (tmp_path / "t" / "trace.csv").exists())
    proc.send_signal(signal.SIGINT)
    code, out, err = await wait_exit(proc, 30)
    assert code == 130, out + err
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert summary["error"] == "interrupted"                 # item 13: attached mode too
    assert await qemu.client.execute("query-jobs") == []


async def test_sighup_cleans_up_like_sigterm(qemu, tmp_path):
    await qemu.nodes.add_image("src", 32 * MiB, fill="mixed")
    target = tmp_path / "new.raw"
    proc = await start_cli("mirror", "--qmp", qmp(qemu), "--device", "src",
                           "--target-file", str(target), "--create", "--speed", "1M",
                           "--out", str(tmp_path / "t"))
    await wait_for(lambda: (tmp_path / "t" / "trace.csv").exists())
    proc.send_signal(signal.SIGHUP)
    code, out, err = await wait_exit(proc, 30)
    assert code == 143, out + err
    assert not target.exists()                               # made by --create: removed
    assert "qmpkit-src" not in {n.node_name for n in await qemu.nodes.nodes()}


# -- 8.-9. files ---------------------------------------------------------------------------

async def test_create_makes_a_private_file_for_a_private_disk(qemu, tmp_path):
    src = await create_image(tmp_path / "s.raw", 8 * MiB, fill="mixed")
    os.chmod(src, 0o600)
    await qemu.nodes.add_file("s", src)
    code, out, err = await run_cli("mirror", "--qmp", qmp(qemu), "--device", "s",
                                   "--target-file", str(tmp_path / "c.raw"), "--create")
    assert code == 0, err
    assert os.stat(tmp_path / "c.raw").st_mode & 0o777 == 0o600


def test_saving_a_trace_never_follows_a_planted_symlink(tmp_path):
    from test_trace import make_trace
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    for name in (".summary.json.tmp", ".trace.csv.tmp", ".events.jsonl.tmp"):
        (out / name).symlink_to(victim)
    make_trace(ready_at=1.0).save(out)
    assert victim.read_text() == "keep me"
    assert json.loads((out / "summary.json").read_text())


async def test_fio_verify_leaves_no_state_file_in_the_working_directory(tmp_path, monkeypatch):
    from qmpkit.workload import FioLoad, verify_image
    monkeypatch.chdir(tmp_path)
    img = await create_image(tmp_path / "x.raw", 8 * MiB)
    load = FioLoad(rw="write", bs="64K", io_size="1M", verify=True, rate=0)
    with pytest.raises(Exception):
        await verify_image(img, load)                    # nothing was written: bad blocks
    assert not list(tmp_path.glob("*verify.state"))


# -- 10.-12. bad input, one line each ------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--timeout", "-5"], "--timeout: must be a finite number > 0"),
    (["--timeout", "nan"], "--timeout: must be a finite number > 0"),
    (["--timeout", "inf"], "--timeout: must be a finite number > 0"),
    (["--hz", "5000"], "--hz: must be in (0, 1000]"),
    (["--buf-size", "1T"], "--buf-size: must be in [0,"),
    (["--speed", str(1 << 64)], "--speed: must be in [0, 9223372036854775807]"),
    (["--speed", "abc"], "--speed: expected a rate"),
    (["--job-id", "j\n"], "--job-id: must be a letter"),
    (["--max-errors", "-1"], "--max-errors: must be an integer >= 0"),
])
async def test_bounds_are_checked_before_anything_starts(qemu, tmp_path, args, message):
    await qemu.nodes.add_image("src", 8 * MiB)
    await qemu.nodes.add_image("dst", 8 * MiB)
    out = tmp_path / "never"
    code, o, err = await run_cli("mirror", "--qmp", qmp(qemu), "--device", "src",
                                 "--target", "dst", "--out", str(out), *args)
    assert code == 2, o + err
    assert err.startswith("qmpkit: error: ") and message in err, err
    assert err.count("\n") == 1 and "usage:" not in err
    assert "--timeout: --timeout" not in err
    assert not out.exists()
    assert await qemu.client.execute("query-jobs") == []


async def test_a_size_larger_than_the_free_space_is_refused(tmp_path):
    code, out, err = await run_cli("mirror", "--size", "64T", "--no-load")
    assert code == 2 and "--size: 3 images of 64 TiB need 192 TiB in" in err
    assert "free" in err


def damage(folder: Path, how: str) -> None:
    csv = folder / "trace.csv"
    if how == "truncated":
        csv.write_text(csv.read_text()[:-20])
    elif how == "missing column":
        lines = csv.read_text().splitlines()
        csv.write_text("\n".join([lines[0]] + [",".join(l.split(",")[:-1]) for l in lines[1:]]))
    elif how == "extra column":
        lines = csv.read_text().splitlines()
        csv.write_text("\n".join([lines[0]] + [l + ",9" for l in lines[1:]]))
    elif how == "not a number":
        lines = csv.read_text().splitlines()
        csv.write_text("\n".join(lines[:2] + [lines[2].replace(lines[2].split(",")[3], "x")]))
    elif how == "header only":
        csv.write_text(csv.read_text().splitlines()[0] + "\n")
    elif how == "summary not an object":
        (folder / "summary.json").write_text("[1, 2]")
    elif how == "summary not json":
        (folder / "summary.json").write_text("{")
    elif how == "bad event line":
        with open(folder / "events.jsonl", "a") as f:
            f.write("{not json\n")
    elif how == "event not an object":
        with open(folder / "events.jsonl", "a") as f:
            f.write("[1]\n")
    elif how == "binary":
        csv.write_bytes(b"\xff\xfe\x00" * 100)
    elif how == "no events file":
        (folder / "events.jsonl").unlink()


@pytest.mark.parametrize("how", ["truncated", "missing column", "extra column", "not a number",
                                 "header only", "summary not an object", "summary not json",
                                 "bad event line", "event not an object", "binary",
                                 "no events file"])
async def test_a_damaged_trace_is_one_line_never_a_traceback(tmp_path, how):
    from test_trace import make_trace
    folder = make_trace(ready_at=1.0).save(tmp_path / "t")
    damage(folder, how)
    code, out, err = await run_cli("plot", str(folder), "--out", str(tmp_path / "p"))
    assert code == 2, out + err
    assert "Traceback" not in err and err.count("\n") == 1 and len(err) <= 320, err
    if how == "header only":
        assert "no samples" in err


@pytest.mark.parametrize("kind", ["file", "dir", "fifo"])
async def test_a_socket_path_that_is_no_socket_says_what_it_is(tmp_path, kind):
    path = tmp_path / "qmp"
    if kind == "file":
        path.write_text("")
    elif kind == "dir":
        path.mkdir()
    else:
        os.mkfifo(path)
    code, out, err = await run_cli("nodes", "--qmp", str(path), timeout=30)
    assert code == 1
    said = {"file": "a regular file", "dir": "a directory", "fifo": "a FIFO"}[kind]
    assert f"it is {said}, not a socket" in err


def reply(request: dict, body: bytes) -> bytes:
    """A QMP reply to ``request``, with its id echoed."""
    ident = request.get("id")
    return body[:-3] + (b', "id": ' + json.dumps(ident).encode() if ident else b"") + b"}\r\n"


async def requests(reader):
    """The QMP requests a client sends (JSON objects, not always ending in a newline)."""
    decoder, buf = json.JSONDecoder(), ""
    while chunk := await reader.read(4096):
        buf += chunk.decode()
        while buf.strip():
            try:
                obj, end = decoder.raw_decode(buf.lstrip())
            except ValueError:
                break
            buf = buf.lstrip()[end:]
            yield obj


async def fake_peer(handler) -> tuple[asyncio.AbstractServer, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


GREETING = (b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, '
            b'"package": ""}, "capabilities": []}}\r\n')


async def test_a_tcp_port_that_does_not_speak_qmp(tmp_path):
    async def silent(reader, writer):
        await reader.read(100)
        writer.close()

    server, port = await fake_peer(silent)
    async with server:
        code, out, err = await run_cli("nodes", "--qmp", f"127.0.0.1:{port}", timeout=60)
    assert code == 1 and f"no QMP greeting from 127.0.0.1:{port} within" in err


async def test_a_peer_that_goes_mute_after_negotiation(tmp_path):
    async def mute(reader, writer):
        writer.write(GREETING)
        async for request in requests(reader):
            if request.get("execute") == "qmp_capabilities":
                writer.write(reply(request, b'{"return": {}}\r\n'))
            # ... and never answers again
        writer.close()

    server, port = await fake_peer(mute)
    async with server:
        t0 = time.monotonic()
        code, out, err = await run_cli("--qmp-timeout", "2", "nodes", "--qmp",
                                       f"127.0.0.1:{port}", timeout=60)
    assert time.monotonic() - t0 < 20
    assert code == 1
    assert "QEMU did not answer query-named-block-nodes within 2 s (is it stopped?)" in err


async def test_text_from_a_hostile_peer_cannot_drive_the_terminal(tmp_path):
    async def hostile(reader, writer):
        writer.write(GREETING)
        async for request in requests(reader):
            if request.get("execute") == "qmp_capabilities":
                writer.write(reply(request, b'{"return": {}}\r\n'))
                continue
            writer.write(reply(request, b'{"error": {"class": "GenericError", "desc": '
                               b'"\\u001b[31mred\\u0007 ' + b"x" * 2000 + b'"}}\r\n'))
            await writer.drain()
        writer.close()

    server, port = await fake_peer(hostile)
    async with server:
        code, out, err = await run_cli("nodes", "--qmp", f"127.0.0.1:{port}", timeout=60)
    assert code == 1
    assert "\x1b" not in err and "\x07" not in err
    assert "\\x1b[31mred" in err
    assert len(err) <= 320
