"""The HiSilicon-style backend: a register page, pause/poll, match data, quirks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import backends
from backends import hisi
from backends.hisi import HisiDevice
from backends.states import DeviceState
from migd.errors import DeviceBusy, IncompatibleDevice

S = DeviceState


@pytest.fixture
def made() -> Iterator[list[HisiDevice]]:
    devs: list[HisiDevice] = []
    yield devs
    for d in devs:
        d.close()


def dev(made: list[HisiDevice], **opts: str) -> HisiDevice:
    d = backends.REGISTRY.create("hisi", f"h{len(made)}", opts)
    assert isinstance(d, HisiDevice)
    made.append(d)
    return d


def read(d: HisiDevice) -> bytes:
    buf = bytearray(4096)
    return bytes(buf[: d.read_into(memoryview(buf))])


def test_guest_sees_half_a_bar(made: list[HisiDevice]) -> None:
    g = dev(made).guest()
    assert g.size == hisi.BAR2_SIZE // 2
    assert len(g.read(0, 64)) == 64
    g.write(0x100, b"\x01")  # its own doorbells are fine
    for attempt in (lambda: g.read(hisi.MIG_BASE, 4), lambda: g.write(hisi.MIG_BASE + 8, b"x"),
                    lambda: g.mmap(hisi.MIG_BASE - 4, 8), lambda: g.mmap(0, hisi.BAR2_SIZE)):
        with pytest.raises(PermissionError, match="beyond the guest's"):
            attempt()


def test_precopy_offers_only_match_data_then_zero_byte_reads(made: list[HisiDevice]) -> None:
    d = dev(made, traffic="yes")
    d.set_state(S.PRE_COPY)
    assert d.precopy_info() == backends.PrecopyInfo(40, 0)
    assert len(read(d)) == 40
    assert read(d) == b"" and d.state == S.PRE_COPY  # the quirk: 0 bytes, not the end
    assert d.precopy_info().dirty_bytes == 0
    d.set_state(S.STOP_COPY)
    assert len(read(d)) == hisi.STATE_SIZE - 40
    assert read(d) == b""


def test_queue_manager_not_ready_sends_40_bytes(made: list[HisiDevice]) -> None:
    d = dev(made, **{"qm-ready": "no"})
    d.set_state(S.STOP_COPY)
    assert len(read(d)) == 40


def test_pause_polls_and_device_busy(made: list[HisiDevice]) -> None:
    d = dev(made)
    d.set_state(S.STOP)
    assert d.bar.u32(hisi.MIG_BASE + hisi.INT_STATUS) == 0  # drained after a few polls
    d.set_state(S.RUNNING)
    assert d.describe()["doorbells_rung"] == d.qp_num  # start rings every queue
    stuck = dev(made, stuck="yes")
    with pytest.raises(DeviceBusy, match="did not quiesce after pause"):
        stuck.set_state(S.STOP)


@pytest.mark.parametrize("opts, why", [({"dev-id": "0x1"}, "dev_id"), ({"qp-num": "8"}, "qp_num"),
                                       ({"que-iso-cfg": "0"}, "que_iso_cfg"),
                                       ({"magic": hex(hisi.MAGIC_V1)}, "magic"),
                                       ({"major": "2"}, "major version")])
def test_target_checks_match_data_at_40_bytes(made: list[HisiDevice], opts: dict[str, str],
                                              why: str) -> None:
    if "magic" in opts or "major" in opts:
        src, dst = dev(made, **opts), dev(made)
    else:
        src, dst = dev(made), dev(made, **opts)
    src.set_state(S.PRE_COPY)
    match = read(src)
    dst.set_state(S.RESUMING)
    dst.write(memoryview(match)[:39])  # not yet
    with pytest.raises(IncompatibleDevice, match=f"EFAULT.*{why}"):
        dst.write(memoryview(match)[39:])


def test_round_trip_rings_doorbells_on_the_target(made: list[HisiDevice]) -> None:
    src, dst = dev(made, seed="1"), dev(made, seed="2")
    src.set_state(S.STOP_COPY)
    dst.set_state(S.RESUMING)
    dst.write(memoryview(read(src)))
    dst.set_state(S.RUNNING)
    assert dst.digest() == src.digest() and dst.describe()["doorbells_rung"] == dst.qp_num
