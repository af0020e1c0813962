"""`--link`: a mirror, a sweep and the demo across the emulated network, on real QEMU."""

from __future__ import annotations

import json

import pandas as pd
from helpers import run_cli as run

from qmpkit.link import LinkSpec, model_ceilings
from qmpkit.trace import Trace

MiB = 1 << 20


async def test_mirror_across_a_link_is_capped_by_its_in_flight_limit(tmp_path):
    """1 MiB of buffer per 20 ms round trip: the copy cannot pass about 45 MiB/s
    (without the link in the path it copies at GB/s here)."""
    spec = LinkSpec.parse("rtt=20ms,rate=1Gbit")
    out = tmp_path / "wan"
    code, text, err = await run("mirror", "--size", "64M", "--no-load", "--target-speed", "0",
                                "--link", "rtt=20ms,rate=1Gbit", "--buf-size", "1M",
                                "--granularity", "1M", "--out", str(out), "--json", timeout=180)
    assert code == 0, err
    tr = Trace.load(out)
    assert tr.meta["link"] == {"rtt_s": 0.02, "rate_bps": 125e6, "jitter_s": 0.0}
    assert tr.summary["link"] == tr.meta["link"]
    assert tr.meta["setup"]["remote_target"] is True
    assert tr.summary["verified"] is True
    ceiling = model_ceilings(spec, MiB, MiB).bulk_bps
    rate = 64 * MiB / tr.ready_time()
    assert rate < 1.25 * ceiling, (rate / MiB, ceiling / MiB)
    assert rate > 0.3 * ceiling, (rate / MiB, ceiling / MiB)
    assert "across a 20 ms RTT" in tr.meta["workload_text"]


async def test_bad_links_are_refused_before_anything_starts(tmp_path):
    code, out, err = await run("mirror", "--size", "8M", "--link", "rtt=-1ms")
    assert code == 2 and "--link:" in err
    code, out, err = await run("mirror", "--size", "8M", "--link", "wan", "--link", "lan")
    assert code == 2 and "--link: give one link here; a sweep takes several" in err
    code, out, err = await run("mirror", "--size", "8M", "--reconnect-delay", "5")
    assert code == 2 and "--reconnect-delay: needs --remote-target or --link" in err
    code, out, err = await run("sweep", "--size", "8M", "--link", "fast", "--out",
                               str(tmp_path / "s"))
    assert code == 2 and "--link:" in err and not (tmp_path / "s").exists()


async def test_a_sweep_with_a_link_axis_recommends_per_link(tmp_path):
    out = tmp_path / "s"
    code, text, err = await run("sweep", "--granularity", "64K", "--buf-size", "1M,16M",
                                "--size", "32M", "--no-load", "--target-speed", "0",
                                "--link", "none", "--link", "rtt=40ms,rate=1Gbit",
                                "--repeat", "1", "--out", str(out), "--json", timeout=400)
    assert code == 0, err
    res = pd.read_csv(out / "results.csv")
    assert set(res["link"].fillna("none")) == {"none", LinkSpec.parse("wan").to_text()}
    assert len(res) == 6                      # 3 configurations (with the defaults) x 2 links
    rec = json.loads((out / "recommendation.json").read_text())
    assert set(rec["per_link"]) == {"no link", "40 ms RTT, 1 Gbit/s"}
    assert rec["link"] == {"rtt_s": 0.04, "rate_bps": 125e6, "jitter_s": 0.0}
    # across the link, buf-size decides: 16 MiB in flight beats 1 MiB (the model says 5x)
    wan = res[res["link"].notna()]
    t = {int(b) if b == b else None: v for b, v in zip(wan["buf_size"], wan["time_to_ready_s"])}
    assert t[MiB] > 2 * t[16 * MiB], t
    assert (out / "heatmap_time_to_ready_s.png").stat().st_size > 0


async def test_demo_wan_runs_the_models_pick(tmp_path):
    """`qmpkit demo --wan`: QEMU's defaults, the LAN's winner and what qmpkit.predict
    picks for a 40 ms link under the demo's load (write-blocking: background mode
    cannot catch up 4 KiB writes at 16 x 4 KiB per 40 ms round trip)."""
    import csv
    out = tmp_path / "demo"
    code, text, err = await run("demo", "--wan", "--out", str(out), "--size", "32M",
                                "--target-speed", "16M", "--load-rate", "2M",
                                "--time-limit", "10", timeout=400)
    assert code == 0, err
    rows = list(csv.DictReader(open(out / "demo.csv")))
    assert [r["label"] for r in rows][:2] == ["QEMU defaults (64 KiB granularity)",
                                             "granularity 4 KiB, buf-size 1 MiB"]
    assert rows[2]["label"].startswith("model's pick: ") and "write-blocking" in rows[2]["label"]
    assert rows[2]["time_to_ready_s"]              # the pick reached READY
    assert not rows[1]["time_to_ready_s"]          # 4 KiB/1 MiB did not, across the WAN
    tr = Trace.load(out / rows[2]["folder"])
    assert tr.meta["link"]["rtt_s"] == 0.04
