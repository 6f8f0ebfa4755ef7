"""Reservations of pool VFs for incoming VMs: all or none, expiry, the file."""

from __future__ import annotations

import pathlib

import pytest

from migd.errors import Busy, ConfigError
from migd.reservations import FILE, Reservations
from migd.session import Host


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_vm_is_reserved_whole_or_not_at_all(tmp_path: pathlib.Path) -> None:
    rs = Reservations(str(tmp_path), ttl=60)
    assert rs.reserve_vm("a", ["0000:06:00.1"], ["p0", "p1"]) == {"0000:06:00.1": "p0"}
    with pytest.raises(Busy, match=r"VM b needs 2 free pool VF\(s\), for 0000:06:00.1, "
                                   r"0000:06:00.2; 1 free here"):
        rs.reserve_vm("b", ["0000:06:00.1", "0000:06:00.2"], ["p0", "p1"])
    assert rs.devices() == {"p0"}  # nothing of b's
    # Asked again (libvirt retries), a VM keeps what it has.
    assert rs.reserve_vm("a", ["0000:06:00.1"], ["p0", "p1"]) == {"0000:06:00.1": "p0"}


def test_unclaimed_ones_expire_claimed_ones_stay(tmp_path: pathlib.Path) -> None:
    clock = Clock()
    rs = Reservations(str(tmp_path), ttl=60, clock=clock)
    rs.reserve_vm("a", ["0000:06:00.1"], ["p0"])
    rs.reserve_vm("b", ["0000:06:00.2"], ["p1"])
    rs.claim("b", "0000:06:00.2")
    clock.now += 61
    assert rs.devices() == {"p1"}
    assert rs.listing() == [{"vm": "b", "source-address": "0000:06:00.2", "device": "p1",
                             "claimed": True, "expires-in": None}]


def test_they_survive_a_restart_and_a_damaged_file_is_named(tmp_path: pathlib.Path) -> None:
    rs = Reservations(str(tmp_path), ttl=60)
    rs.reserve_vm("a", ["0000:06:00.1", "0000:06:00.2"], ["p0", "p1"])
    again = Reservations(str(tmp_path), ttl=60)
    assert again.get("a", "0000:06:00.2") == "p1" and again.devices() == {"p0", "p1"}
    again.release_vm("a")
    assert Reservations(str(tmp_path), ttl=60).devices() == set()
    (tmp_path / FILE).write_text("{not json")
    with pytest.raises(ConfigError, match=f"{FILE} is damaged"):
        Reservations(str(tmp_path), ttl=60)


def test_an_incoming_migration_lands_only_where_it_may() -> None:
    host = Host.__new__(Host)
    host.reservations = Reservations(None, ttl=60)
    host.reservations.reserve_vm("web", ["0000:06:00.1"], ["p0"])
    assert host.placed("web", "0000:06:00.1", "vf9") == "p0"
    assert host.reservations.listing()[0]["claimed"] is True
    assert host.placed("", "0000:06:00.1", "vf9") == "p0"  # by address alone: one match
    with pytest.raises(Busy, match="reserved here for VM web, and this migration says VM db"):
        host.placed("db", "0000:06:00.1", "vf9")
    with pytest.raises(Busy, match=r"device p0 is reserved here for VF 0000:06:00.1 of VM web"):
        host.placed("", "0000:07:00.1", "p0")  # naming the reserved VF itself
    assert host.placed("", "0000:07:00.1", "vf9") == "vf9"
