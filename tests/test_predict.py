"""The mirror model of qmpkit.predict, on numbers worked out by hand."""

from __future__ import annotations

import pytest

from qmpkit import ArgumentError
from qmpkit.link import LinkSpec
from qmpkit.predict import Load, predict, rank

MiB = 1 << 20
GiB = 1 << 30
DEMO = Load(write_bps=20 * MiB, bs=4096)        # the demo's 4 KiB random writes at 20 MiB/s


def test_the_lan_demo_4k_converges_and_64k_does_not():
    # bulk: 1 GiB at the target's 100 MiB/s = 10.24 s; meanwhile 20 MiB/s dirty 204.8 MiB;
    # catch-up at 100 - 20 = 80 MiB/s takes 2.56 s: READY after 12.8 s (measured: 11.8 s)
    p = predict(disk_bytes=GiB, load=DEMO, granularity=4096, buf_size=MiB, target_bps=100 * MiB)
    assert p.converges == "yes"
    assert p.time_to_ready_s == pytest.approx(10.24 + 2.56)
    assert p.amplification == pytest.approx((1024 + 204.8 + 20 * 2.56) / 1024)
    # 64 KiB chunks: each 4 KiB write dirties 64 KiB, 320 MiB/s against 100 MiB/s
    p = predict(disk_bytes=GiB, load=DEMO, granularity=65536, target_bps=100 * MiB)
    assert p.converges == "no" and p.time_to_ready_s is None
    assert p.dirty_bps == 320 * MiB
    assert "320 MiB/s of new dirty data" in p.reason and "never" in p.reason


def test_a_catch_up_just_above_the_dirt_is_borderline():
    p = predict(disk_bytes=GiB, load=Load(write_bps=95 * MiB, bs=4096), granularity=4096,
                target_bps=100 * MiB)
    assert p.converges == "borderline" and "too close to call" in p.reason


def test_across_a_wan_the_in_flight_limit_caps_catch_up():
    wan = LinkSpec.parse("wan")                   # 40 ms, 1 Gbit/s
    p = predict(disk_bytes=GiB, load=DEMO, granularity=4096, buf_size=MiB, link=wan)
    # 16 chunks of 4 KiB per (40 ms + 4 KiB / 125 MB/s): 1.56 MiB/s
    assert p.catchup_bps == pytest.approx(16 * 4096 / (0.04 + 4096 / 125e6))
    assert p.converges == "no"
    # write-blocking: no new dirt; the guest's 4 writes in flight each wait a round trip
    wb = predict(disk_bytes=GiB, load=DEMO, buf_size=16 * MiB, copy_mode="write-blocking",
                 link=wan)
    w = 4 * 4096 / (0.04 + 4096 / 125e6)
    assert wb.guest_write_bps == pytest.approx(w)
    assert wb.time_to_ready_s == pytest.approx(GiB / (125e6 - w))
    assert "slow to" in wb.reason
    # buf-size 1 MiB: 1 MiB per (40 ms + 1 MiB/125 MB/s): about 20.7 MiB/s of bulk
    small = predict(disk_bytes=GiB, load=DEMO, buf_size=MiB, copy_mode="write-blocking",
                    link=wan)
    assert small.bulk_bps == pytest.approx(MiB / (0.04 + MiB / 125e6))
    assert small.time_to_ready_s > 4 * wb.time_to_ready_s


def test_rank_puts_converging_background_first_then_write_blocking():
    kw = dict(disk_bytes=GiB, load=DEMO, target_bps=100 * MiB)
    ps = [predict(granularity=65536, **kw), predict(copy_mode="write-blocking", **kw),
          predict(granularity=4096, **kw)]
    assert [(p.granularity, p.copy_mode) for p in rank(ps)] == \
        [(4096, "background"), (65536, "write-blocking"), (65536, "background")]


def test_bad_input_names_the_argument():
    with pytest.raises(ArgumentError, match="disk_bytes"):
        predict(disk_bytes=0, load=DEMO, target_bps=1.0)
    with pytest.raises(ArgumentError, match="copy_mode"):
        predict(disk_bytes=GiB, load=DEMO, copy_mode="sync", target_bps=1.0)
    with pytest.raises(ArgumentError, match="target_bps"):
        predict(disk_bytes=GiB, load=DEMO)          # no target rate, no link: no ceiling
    with pytest.raises(ArgumentError, match="write_bps"):
        Load(write_bps=-1)


def test_a_probe_of_a_hot_spot_is_corrected_for_saturation():
    """20 MiB/s of 4 KiB random writes into a 25.6 MiB hot spot of a 512 MiB disk:
    at 64 KiB the hot set is all dirty within the first second, so the curve's
    slope (25.6 MiB/s, then 0) hides a rate far above the target's 100 MiB/s;
    at 4 KiB it is half full after 1 s (1 - e^-0.78 = 0.54)."""
    from qmpkit.probe import Profile
    hot = 25.6 * MiB
    at_4k = [0.54, 0.79, 0.90, 0.96, 0.99, 1.0]
    prof = Profile(node="n", disk_bytes=512 * MiB, seconds=6, write_bytes=120 * MiB,
                   write_ops=30720,
                   curves={65536: [(t, int(hot)) for t in range(1, 7)],
                           4096: [(t, int(f * hot)) for t, f in zip(range(1, 7), at_4k)]})
    assert prof.working_set(4096) == prof.working_set(65536) == int(hot)
    assert prof.dirty_bps(4096) == pytest.approx(20 * MiB, rel=0.05)   # -W ln(0.46) / 1 s
    assert prof.dirty_bps(65536) > 150 * MiB                             # a lower bound
    load = prof.load()
    kw = dict(disk_bytes=512 * MiB, load=load, target_bps=100 * MiB)
    assert predict(granularity=4096, **kw).converges == "yes"
    assert predict(granularity=65536, **kw).converges == "no"
