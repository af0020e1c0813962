"""The emulated link (qmpkit.link): the spec, the model, the relay's timing,
its faults, and a mirror across it between two real qemu-storage-daemons."""

from __future__ import annotations

import asyncio
import statistics
import time

import pytest

from qmpkit import Qemu
from qmpkit.errors import ArgumentError, JobFailedError
from qmpkit.images import compare_images
from qmpkit.link import (
    PRESETS,
    PRESETS_HELP,
    Link,
    LinkProcess,
    LinkSpec,
    model_ceilings,
)

KiB, MiB = 1 << 10, 1 << 20


# -- the spec ------------------------------------------------------------------------------

def test_presets():
    assert LinkSpec.parse("lan") == LinkSpec(0.0002, 1.25e9) == PRESETS["lan"]
    assert LinkSpec.parse("metro") == LinkSpec(0.005, 125e6)
    assert LinkSpec.parse("WAN") == LinkSpec(0.040, 125e6)
    assert PRESETS_HELP == ("lan = 200 us RTT, 10 Gbit/s; metro = 5 ms RTT, 1 Gbit/s; "
                            "wan = 40 ms RTT, 1 Gbit/s")
    assert LinkSpec.parse("wan,rate=100Mbit") == LinkSpec(0.040, 12.5e6)


def test_parse_units():
    assert LinkSpec.parse("rtt=40ms,rate=1Gbit") == LinkSpec(0.040, 125e6, 0.0)
    assert LinkSpec.parse("rtt=40ms,rate=1Gbit,jitter=2ms") == LinkSpec(0.040, 125e6, 0.002)
    assert LinkSpec.parse(" rtt = 0.5s , rate = 100kbit/s ") == LinkSpec(0.5, 12500.0)
    assert LinkSpec.parse("rtt=250us,rate=2.5Mbit") == LinkSpec(250e-6, 312500.0)
    # byte rates are binary, as everywhere in qmpkit
    assert LinkSpec.parse("rtt=0ms,rate=100M").rate_bps == 100 * MiB
    assert LinkSpec.parse("rtt=0ms,rate=100MiB/s").rate_bps == 100 * MiB
    assert LinkSpec.parse("rtt=1ms,rate=4096").rate_bps == 4096
    assert LinkSpec.parse("rtt=1ms").rate_bps is None
    assert LinkSpec.parse("rtt=1ms,rate=unlimited").rate_bps is None
    spec = LinkSpec.parse("rtt=40ms,rate=1Gbit,jitter=2ms")
    assert spec.to_meta() == {"rtt_s": 0.04, "rate_bps": 125e6, "jitter_s": 0.002}
    assert spec.describe() == "40 ms RTT, 1 Gbit/s, ±2 ms jitter"
    assert LinkSpec.parse("wan").describe() == "40 ms RTT, 1 Gbit/s"
    assert LinkSpec.parse("rtt=0ms").describe() == "0 ms RTT, unlimited"
    for s in (spec, LinkSpec(0.0123456789, 1234567.891, 0.001), LinkSpec(0, None)):
        assert LinkSpec.parse(s.to_text()) == s


@pytest.mark.parametrize("text, says", [
    ("", "rtt="),
    ("moon", "no preset 'moon'"),
    ("rate=1Gbit", "no rtt"),
    ("rtt=40", "s, ms, us"),
    ("rtt=-1ms", "s, ms, us"),
    ("rtt=11s", "[0, 10 s]"),
    ("rtt=40ms,rate=0Mbit", "> 0"),
    ("rtt=40ms,rate=0", "> 0"),
    ("rtt=40ms,rate=fast", "cannot read rate"),
    ("rtt=40ms,rate=1Gbps", "cannot read rate"),
    ("rtt=40ms,jitter=21ms", "[0, rtt/2]"),
    ("rtt=40ms,loss=1%", "cannot read 'loss=1%'"),
    ("rtt=40ms,rtt=20ms", "given twice"),
    ("rtt=40ms,,", "cannot read"),
])
def test_parse_refusals_name_link(text, says):
    with pytest.raises(ArgumentError) as info:
        LinkSpec.parse(text)
    assert info.value.argument == "link"
    assert says in str(info.value)


def test_spec_refusals_name_link():
    for kwargs in ({"rtt_s": -0.1, "rate_bps": None}, {"rtt_s": 10.5, "rate_bps": None},
                   {"rtt_s": 0.01, "rate_bps": 0}, {"rtt_s": 0.01, "rate_bps": float("inf")},
                   {"rtt_s": 0.01, "rate_bps": None, "jitter_s": 0.006},
                   {"rtt_s": "1", "rate_bps": None}):
        with pytest.raises(ArgumentError) as info:
            LinkSpec(**kwargs)
        assert info.value.argument == "link"


# -- the model -------------------------------------------------------------------------------

def test_model_ceilings_by_hand():
    wan = LinkSpec.parse("wan")                  # 40 ms, 125e6 bytes/s
    c = model_ceilings(wan, 1 * MiB, 64 * KiB)
    # one 1 MiB op in flight: 1 MiB / (0.040 + 1048576/125e6 = 0.048389 s)
    assert c.op_bytes == MiB and c.bulk_window == MiB
    assert c.bulk_bps == pytest.approx(1048576 / 0.048388608)
    assert c.bulk_bps / MiB == pytest.approx(20.67, abs=0.01)   # FACTS.md measured 19.3
    # catch-up: 16 chunks of 64 KiB = 1 MiB per (0.040 + 65536/125e6) s
    assert c.catchup_window == MiB
    assert c.catchup_bps == pytest.approx(1048576 / 0.040524288)
    big = model_ceilings(wan, 16 * MiB, 64 * KiB)
    # 16 MiB / (0.040 + 8.39 ms) = 330 MiB/s > the link: the link's rate
    assert big.bulk_bps == 125e6 and big.op_bytes == MiB
    assert model_ceilings(wan, None, 64 * KiB) == model_ceilings(wan, 0, 64 * KiB) == big
    # no rate: buf / RTT exactly
    bare = LinkSpec(0.020, None)
    assert model_ceilings(bare, 4 * MiB, 4 * KiB).bulk_bps == 4 * MiB / 0.020
    assert model_ceilings(bare, 4 * MiB, 4 * KiB).catchup_bps == 16 * 4 * KiB / 0.020
    # buf-size rounded up to the granularity; few chunks fit: fewer ops in flight
    odd = model_ceilings(bare, 3 * MiB + 1, MiB)
    assert odd.buf_size == 4 * MiB and odd.catchup_window == 4 * MiB
    assert odd.op_bytes == MiB
    assert model_ceilings(LinkSpec(0, None), None, 65536).bulk_bps == float("inf")
    with pytest.raises(ArgumentError, match="granularity"):
        model_ceilings(wan, MiB, 3000)
    with pytest.raises(ArgumentError, match="buf_size"):
        model_ceilings(wan, -1, 65536)


# -- the relay, against a local server ----------------------------------------------------------

async def _echo(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _round_trips(address, n=40, warmup=5):
    reader, writer = await asyncio.open_connection(*address)
    times = []
    try:
        for i in range(n + warmup):
            t = time.perf_counter()
            writer.write(b"ping%04d" % i)
            await writer.drain()
            assert await reader.readexactly(8) == b"ping%04d" % i
            times.append(time.perf_counter() - t)
    finally:
        writer.close()
    return times[warmup:]


@pytest.mark.parametrize("kind", [Link, LinkProcess])
async def test_latency_of_small_messages(kind):
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    up = server.sockets[0].getsockname()[:2]
    try:
        async with await kind.start("rtt=0ms", up) as link:
            bare = statistics.mean(await _round_trips(link.address))
        async with await kind.start("rtt=20ms,rate=1Gbit", up) as link:
            rtts = await _round_trips(link.address)
            stats = link.stats() if kind is Link else await link.stats()
    finally:
        server.close()
        await server.wait_closed()
    # The machine is shared: a few round trips wait for a CPU, for the link and
    # the echo alike. The mean of the middle 80 % is the link's own delay.
    middle = sorted(rtts)[len(rtts) // 10:-(len(rtts) // 10)]
    mean = statistics.mean(middle)
    assert bare < 0.005, f"the relay alone adds {bare * 1e3:.2f} ms"
    assert 0.018 <= mean <= 0.022, (f"mean RTT {mean * 1e3:.2f} ms (all: "
                                    f"{statistics.mean(rtts) * 1e3:.2f} ms), set 20 ms")
    assert min(rtts) >= 0.0185         # never much early
    assert stats["bytes_up"] == stats["bytes_down"] == 45 * 8
    assert stats["connections"] == 1


async def _sink(reader, writer):
    n = 0
    while data := await reader.read(1 << 20):
        n += len(data)
    writer.write(b"%d" % n)
    await writer.drain()
    writer.close()


async def test_rate_of_a_bulk_transfer():
    server = await asyncio.start_server(_sink, "127.0.0.1", 0)
    rate = 20 * MiB
    total = 16 * MiB
    try:
        async with await Link.start(LinkSpec(0.002, rate), server.sockets[0].getsockname()[:2]
                                    ) as link:
            reader, writer = await asyncio.open_connection(*link.address)
            block = b"r" * MiB
            t = time.perf_counter()
            for _ in range(total // MiB):
                writer.write(block)
                await writer.drain()
            writer.write_eof()
            got = int(await reader.read())
            elapsed = time.perf_counter() - t
            writer.close()
            # bounded queue: the BDP (40 KiB) plus 1 MiB
            assert link.queue_bytes == int(rate * 0.002) + MiB
    finally:
        server.close()
        await server.wait_closed()
    assert got == total
    ratio = total / elapsed / rate
    assert 0.8 <= ratio <= 1.1, f"{total / elapsed / MiB:.1f} MiB/s through a 20 MiB/s link"


@pytest.mark.parametrize("kind", [Link, LinkProcess])
async def test_outage_holds_and_reset_closes(kind, tmp_path):
    server = await asyncio.start_unix_server(_echo, str(tmp_path / "echo.sock"))
    try:
        async with await kind.start("rtt=2ms", str(tmp_path / "echo.sock")) as link:
            assert link.nbd_uri("dst") == f"nbd://127.0.0.1:{link.address[1]}/dst"
            reader, writer = await asyncio.open_connection(*link.address)
            writer.write(b"before")
            assert await reader.readexactly(6) == b"before"
            await link.outage(1.0)
            t = time.perf_counter()
            writer.write(b"during")
            await writer.drain()
            assert await asyncio.wait_for(reader.readexactly(6), 5) == b"during"
            held = time.perf_counter() - t
            assert 0.9 <= held <= 1.5, f"held {held:.2f} s by a 1 s outage"
            assert not reader.at_eof()
            assert await link.reset() == 1
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(reader.readexactly(1), 5)
            writer.close()
            # the link still listens: a new connection works
            r2, w2 = await asyncio.open_connection(*link.address)
            w2.write(b"again!")
            assert await r2.readexactly(6) == b"again!"
            w2.close()
            stats = link.stats() if kind is Link else await link.stats()
            assert stats["connections"] == 2 and stats["resets"] == 1
            with pytest.raises(ArgumentError):
                await link.outage(-1)
    finally:
        server.close()
        await server.wait_closed()


async def test_unix_listener_in_a_private_dir(tmp_path):
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    try:
        link = await LinkProcess.start("rtt=1ms", server.sockets[0].getsockname()[:2],
                                       unix=True, base_dir=tmp_path)
        try:
            assert link.address.startswith(str(tmp_path))
            assert link.nbd_uri("d") == f"nbd+unix:///d?socket={link.address}"
            reader, writer = await asyncio.open_unix_connection(link.address)
            writer.write(b"hi")
            assert await reader.readexactly(2) == b"hi"
            writer.close()
        finally:
            assert await link.close() is not None
            await link.close()                        # twice is fine
        assert not any(tmp_path.iterdir())
    finally:
        server.close()
        await server.wait_closed()


# -- a mirror across the link: two real qemu-storage-daemons ------------------------------------

async def _remote_target(tmp_path, size):
    remote = await Qemu.open(workdir=tmp_path)
    await remote.nodes.add_image("disk", size)
    await remote.nodes.export_nbd("disk", export="dst")
    return remote, await remote.nodes.nbd_socket()


async def test_mirror_across_a_20ms_link(qemu, tmp_path):
    remote, sock = await _remote_target(tmp_path, 32 * MiB)
    try:
        async with await LinkProcess.start("rtt=20ms,rate=1Gbit", sock) as link:
            await qemu.nodes.add_image("src", 32 * MiB, fill="mixed")
            await qemu.nodes.add_nbd("far", link.nbd_uri("dst"))
            t = time.perf_counter()
            job = await qemu.mirror(device="src", target="far", buf_size="1M")
            await job.wait_ready(timeout=60)
            elapsed = time.perf_counter() - t
            await job.complete(timeout=60)
            stats = await link.stats()
            await qemu.nodes.delete("far")
        assert stats["bytes_up"] >= 32 * MiB
        # 1 MiB in flight per 20 ms round trip: at most ~50 MiB/s, so >= 0.6 s
        assert elapsed >= 0.6, f"32 MiB in {elapsed:.2f} s: faster than the link allows"
        await compare_images(qemu.workdir / "src.raw", remote.workdir / "disk.raw")
    finally:
        await remote.close()


async def _mirror_through_faults(qemu, tmp_path, reconnect_delay):
    remote, sock = await _remote_target(tmp_path, 32 * MiB)
    try:
        # 8 MiB/s: the 32 MiB copy lasts about 4 s, the faults hit it half-way
        async with await LinkProcess.start("rtt=20ms,rate=64Mbit", sock) as link:
            await qemu.nodes.add_image("src", 32 * MiB, fill="mixed")
            await qemu.nodes.add_nbd("far", link.nbd_uri("dst"),
                                     reconnect_delay=reconnect_delay)
            job = await qemu.mirror(device="src", target="far", on_target_error="report")
            await asyncio.sleep(1.0)
            await link.outage(2.0)
            await asyncio.sleep(0.5)
            assert await link.reset() == 1
            try:
                await job.wait_ready(timeout=60)
                await job.complete(timeout=60)
            finally:
                stats = await link.stats()
                await qemu.nodes.delete("far")
        return remote, job, stats
    except BaseException:
        await remote.close()
        raise


async def test_reconnect_delay_rides_out_an_outage_and_a_reset(qemu, tmp_path):
    remote, job, stats = await _mirror_through_faults(qemu, tmp_path, reconnect_delay=5)
    try:
        assert stats["connections"] == 2           # QEMU came back through the link
        assert job.state.errors == []
        await compare_images(qemu.workdir / "src.raw", remote.workdir / "disk.raw")
    finally:
        await remote.close()


async def test_without_reconnect_delay_a_reset_fails_the_mirror(qemu, tmp_path):
    with pytest.raises(JobFailedError) as info:
        await _mirror_through_faults(qemu, tmp_path, reconnect_delay=None)
    assert info.value.errors, "expected BLOCK_JOB_ERROR events"
    assert {e.get("operation") for e in info.value.errors} <= {"write", "read"}


async def test_add_nbd_checks_reconnect_delay(qemu):
    for bad in (-1, 1 << 32, 1.5, True, "5"):
        with pytest.raises(ArgumentError) as info:
            await qemu.nodes.add_nbd("far", "nbd://127.0.0.1:1/x", reconnect_delay=bad)
        assert info.value.argument == "reconnect_delay"
        assert "[0, 4294967295]" in str(info.value)
