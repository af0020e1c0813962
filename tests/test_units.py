import pytest
from hypothesis import given, strategies as st

from qmpkit import ArgumentError, format_size, parse_rate, parse_size


@pytest.mark.parametrize("text, expected", [
    ("4K", 4096), ("4k", 4096), ("64KiB", 65536), ("64KB", 65536), ("16M", 16 << 20),
    ("16MiB", 16 << 20), ("1G", 1 << 30), ("1GiB", 1 << 30), ("2T", 2 << 40),
    ("512", 512), ("0", 0), ("512B", 512), (" 1M ", 1 << 20), ("1.5M", 3 << 19), (4096, 4096),
])
def test_parse_size_forms(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "abc", "4X", "-1", "-4K", "1.5", "0.1K", "K", "4 K B x",
                                 -1, 1.5, None, True, [1]])
def test_parse_size_refuses_with_the_argument_name(bad):
    with pytest.raises(ArgumentError) as ei:
        parse_size(bad, name="buf_size")
    assert ei.value.argument == "buf_size"
    assert str(ei.value).startswith("buf_size: ")


def test_parse_rate_accepts_per_second():
    assert parse_rate("10M/s") == 10 << 20
    assert parse_rate("10M") == 10 << 20
    assert parse_rate(0) == 0
    with pytest.raises(ArgumentError, match="speed: must be >= 0"):
        parse_rate(-1)


@given(st.integers(min_value=0, max_value=1 << 50),
       st.sampled_from([("", 1), ("K", 1 << 10), ("KiB", 1 << 10), ("M", 1 << 20),
                        ("MB", 1 << 20), ("G", 1 << 30)]))
def test_parse_size_roundtrip(n, unit):
    suffix, mult = unit
    assert parse_size(f"{n}{suffix}") == n * mult


@given(st.integers(min_value=1, max_value=1 << 60))
def test_parse_size_refuses_every_negative(n):
    with pytest.raises(ArgumentError):
        parse_size(-n)
    with pytest.raises(ArgumentError):
        parse_size(f"-{n}K")


def test_format_size():
    assert format_size(64 << 20) == "64 MiB"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(10) == "10 B"
