"""Link rates as an operator writes them, and the clear errors of ``--link``."""

from __future__ import annotations

import os

import pytest

from migd import topology
from migd.errors import ConfigError
from migd.topology import describe_rate, parse_rate


@pytest.mark.parametrize("text, bits", [
    ("10gbit", 10_000_000_000), ("10G", 10_000_000_000), ("2.5g", 2_500_000_000),
    ("500mbit", 500_000_000), ("100M", 100_000_000), ("1000000", 1_000_000),
    ("unlimited", None), ("none", None),
])
def test_rates_are_read_as_bits_per_second(text: str, bits: int | None) -> None:
    assert parse_rate(text) == bits


@pytest.mark.parametrize("text", ["fast", "10GB/s", "10gbps", "-1gbit", "", "500kbit", "1e9"])
def test_a_bad_rate_is_named(text: str) -> None:
    with pytest.raises(ConfigError, match="link rate"):
        parse_rate(text)


def test_rates_read_back() -> None:
    assert describe_rate(parse_rate("10G")) == "10 Gbit/s"
    assert describe_rate(parse_rate("500mbit")) == "500 Mbit/s"
    assert describe_rate(None) == "unlimited"


def test_without_root_a_link_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ConfigError, match="needs root"), topology.two_hosts(None):
        pass
