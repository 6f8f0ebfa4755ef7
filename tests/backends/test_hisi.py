"""The HiSilicon-style backend: a register page, pause/poll, match data, quirks."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

import backends
from backends import hisi
from backends.emulated import hisi_hardware as hw
from backends.hisi import HisiDevice
from backends.states import DeviceState
from migd.errors import DeviceBusy, DeviceError, IncompatibleDevice

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
    assert g.size == hw.BAR2_SIZE // 2
    assert len(g.read(0, 64)) == 64
    g.write(0x100, b"\x01")  # its own doorbells are fine
    # Straddling the half: clipped at the guest's end, as the driver does.
    assert len(g.read(hw.MIG_BASE - 4, 8)) == 4
    assert g.write(hw.MIG_BASE - 2, b"abcd") == 2
    for attempt in (lambda: g.read(hw.MIG_BASE, 4), lambda: g.write(hw.MIG_BASE + 8, b"x"),
                    lambda: g.mmap(hw.MIG_BASE - 4, 8), lambda: g.mmap(0, hw.BAR2_SIZE)):
        with pytest.raises(PermissionError, match="beyond the guest's"):
            attempt()
    d = made[0]
    assert d.bar.u32(hw.MIG_BASE + hw.MAILBOX) == 0  # the migration half untouched


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


def test_pause_polls_four_registers_and_a_busy_one_leaves_it_running(
        made: list[HisiDevice]) -> None:
    d = dev(made, traffic="yes")
    d.set_state(S.STOP)
    assert all(d.bar.u32(hw.MIG_BASE + off) == 0 for off in hw.INT_STATUS.values())
    assert d._qm.polls >= 4 * 3  # each register read until it drained
    d.set_state(S.RUNNING)
    # No save in between: the driver does not hold the QM ready, rings nothing.
    assert d.describe()["doorbells_rung"] == 0 and d.describe()["queues"] == "paused"
    d.set_state(S.STOP_COPY)
    d.set_state(S.STOP)
    d.set_state(S.RUNNING)  # after a save it does: every queue's doorbell
    assert d.describe()["doorbells_rung"] == d.qp_num and d.describe()["queues"] == "running"
    stuck = dev(made, stuck="yes")
    with pytest.raises(DeviceBusy, match=r"EBUSY.*core-int-status still set after 101 reads"):
        stuck.set_state(S.STOP)
    assert stuck.state == S.RUNNING  # where the driver leaves it (its queues paused)
    assert stuck.describe()["queues"] == "paused"


@pytest.mark.parametrize("opts, why", [({"dev-id": "0x1"}, "dev_id"), ({"qp-num": "8"}, "qp_num"),
                                       ({"que-iso-cfg": "0"}, "que_iso_cfg"),
                                       ({"magic": "0x1234"}, "magic"),
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


def test_a_v1_image_from_an_older_kernel_loads_with_its_dma_addresses_derived(
        made: list[HisiDevice]) -> None:
    src, dst = dev(made, seed="1", magic=hex(hisi.MAGIC_V1), major="0"), dev(made, seed="2")
    src.set_state(S.STOP_COPY)
    image = bytearray(read(src))
    assert hisi.MATCH.unpack_from(image)[0] == hisi.MAGIC_V1
    eqc = struct.unpack_from("<7I", image, hisi.EQC_DW)
    aeqc = struct.unpack_from("<7I", image, hisi.AEQC_DW)
    dst.set_state(S.RESUMING)
    dst.write(memoryview(image))
    dst.set_state(S.RUNNING)
    loaded = dst._vf_data()
    eqe, aeqe, sqc, cqc = hisi.DMA.unpack_from(loaded, hisi.MATCH_SIZE + hisi.REGS.size)
    assert (eqe, aeqe) == (eqc[2] << 32 | eqc[1], aeqc[2] << 32 | aeqc[1])
    assert (sqc, cqc) == hisi.DMA.unpack_from(image, hisi.MATCH_SIZE + hisi.REGS.size)[2:]
    assert loaded[: hisi.MATCH_SIZE + hisi.REGS.size] == image[: hisi.MATCH_SIZE + hisi.REGS.size]
    assert dst.describe()["doorbells_rung"] == dst.qp_num


def test_resuming_with_only_the_match_data_loads_nothing(made: list[HisiDevice]) -> None:
    src, dst = dev(made, seed="1"), dev(made, seed="2")
    src.set_state(S.STOP_COPY)
    image = read(src)
    before = dst.digest()
    dst.set_state(S.RESUMING)
    dst.write(memoryview(image)[: hisi.MATCH_SIZE])
    dst.set_state(S.STOP)  # the driver's rule: match data alone is a success
    assert dst.digest() == before
    for n in (0, 100):  # any other short stream is EINVAL, and it stays RESUMING
        dst.reset()
        dst.set_state(S.RESUMING)
        dst.write(memoryview(image)[:n])
        with pytest.raises(DeviceError, match="EINVAL"):
            dst.set_state(S.STOP)
        assert dst.state == S.RESUMING


def test_an_image_with_a_null_dma_address_loads_nothing(made: list[HisiDevice]) -> None:
    src, dst = dev(made, seed="1"), dev(made, seed="2")
    src.set_state(S.STOP_COPY)
    image = bytearray(read(src))
    struct.pack_into("<Q", image, hisi.MATCH_SIZE + hisi.REGS.size, 0)  # eqe_dma
    before = dst.digest()
    dst.set_state(S.RESUMING)
    dst.write(memoryview(image))
    dst.set_state(S.RUNNING)
    assert dst.digest() == before and dst.describe()["doorbells_rung"] == 0
