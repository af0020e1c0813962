"""mirror_arguments is pure: every argument, every refusal, no QEMU needed."""

import pytest
from hypothesis import given, strategies as st

from qmpkit import ArgumentError, mirror_arguments


def test_all_arguments_map_to_exact_qmp():
    args = mirror_arguments(
        device="src", target="dst", job_id="m1", sync="top", speed="10M",
        granularity="4K", buf_size="1M", replaces="q1", on_source_error="stop",
        on_target_error="enospc", copy_mode="write-blocking", filter_node_name="mf",
        auto_finalize=False, auto_dismiss=False)
    assert args == {
        "job-id": "m1", "device": "src", "target": "dst", "sync": "top",
        "speed": 10 << 20, "granularity": 4096, "buf-size": 1 << 20, "replaces": "q1",
        "on-source-error": "stop", "on-target-error": "enospc",
        "copy-mode": "write-blocking", "filter-node-name": "mf",
        "auto-finalize": False, "auto-dismiss": False,
    }


def test_defaults_are_left_to_qemu():
    assert mirror_arguments(device="src", target="dst") == {
        "job-id": "src", "device": "src", "target": "dst", "sync": "full"}


def test_zero_buf_size_and_speed_are_valid():
    args = mirror_arguments(device="s", target="t", buf_size=0, speed=0)
    assert args["buf-size"] == 0 and args["speed"] == 0


@pytest.mark.parametrize("kwargs, argument, message", [
    ({"granularity": 3000}, "granularity", "power of two in [512 B, 64 MiB]"),
    ({"granularity": 256}, "granularity", "power of two in [512 B, 64 MiB]"),
    ({"granularity": "128M"}, "granularity", "power of two in [512 B, 64 MiB]"),
    ({"granularity": "-4K"}, "granularity", ">= 0"),
    ({"buf_size": -5}, "buf_size", ">= 0"),
    ({"speed": -1}, "speed", ">= 0"),
    ({"speed": "fast"}, "speed", "expected a rate"),
    ({"sync": "incremental"}, "sync", "one of full, top, none"),
    ({"on_source_error": "auto"}, "on_source_error", "one of report, ignore, enospc, stop"),
    ({"on_target_error": "panic"}, "on_target_error", "one of report, ignore, enospc, stop"),
    ({"copy_mode": "sync"}, "copy_mode", "one of background, write-blocking"),
    ({"auto_finalize": "yes"}, "auto_finalize", "true or false"),
    ({"auto_dismiss": 1}, "auto_dismiss", "true or false"),
    ({"job_id": "1job"}, "job_id", "a letter, then"),
    ({"job_id": "my job"}, "job_id", "a letter, then"),
    ({"filter_node_name": "f" * 32}, "filter_node_name", "at most 31"),
    ({"replaces": "a#b"}, "replaces", "a letter, then"),
    ({"target": "src"}, "target", "must differ from device"),
    ({"device": ""}, "device", "a letter, then"),
])
def test_each_bad_argument_is_named(kwargs, argument, message):
    base = {"device": "src", "target": "dst"}
    with pytest.raises(ArgumentError) as ei:
        mirror_arguments(**{**base, **kwargs})
    assert ei.value.argument == argument
    assert message in str(ei.value)


def test_qemu_auto_node_names_may_be_referred_to():
    assert mirror_arguments(device="#block123", target="dst", job_id="j")["device"] == "#block123"


@given(st.integers(min_value=9, max_value=26))
def test_every_power_of_two_in_range_is_sent_as_is(exp):
    assert mirror_arguments(device="s", target="t", granularity=1 << exp)["granularity"] == 1 << exp


@given(st.integers(min_value=0, max_value=1 << 40).filter(
    lambda g: not (512 <= g <= 64 << 20 and g & (g - 1) == 0)))
def test_every_other_granularity_is_refused(g):
    with pytest.raises(ArgumentError, match="granularity"):
        mirror_arguments(device="s", target="t", granularity=g)
