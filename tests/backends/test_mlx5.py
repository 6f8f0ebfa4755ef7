"""The mlx5-style backend: PF-owned state, admin commands, the driver's framing."""

from __future__ import annotations

import struct
import time
import uuid
from collections.abc import Iterator

import pytest

import backends
import backends.base
from backends import mlx5
from backends.emulated import mlx5_firmware as fw
from backends.mlx5 import REC, Mlx5Device
from backends.states import DeviceState
from migd.errors import DeviceError, LentOut, NoDataNow

from . import streams

S = DeviceState


@pytest.fixture
def made() -> Iterator[list[Mlx5Device]]:
    devs: list[Mlx5Device] = []
    yield devs
    for d in devs:
        d.close()


def vf(made: list[Mlx5Device], pf: str, vhca: int, **opts: str) -> Mlx5Device:
    dev = backends.REGISTRY.create("mlx5", f"vf{vhca}", {"pf": pf, "vhca-id": str(vhca), **opts})
    assert isinstance(dev, Mlx5Device)
    made.append(dev)
    return dev


def records(stream: bytes) -> list[tuple[int, int, int]]:
    out, pos = [], 0
    while pos < len(stream):
        size, flags, tag = REC.unpack_from(stream, pos)
        out.append((size, flags, tag))
        pos += REC.size + size
    assert pos == len(stream)
    return out


def drain(dev: Mlx5Device) -> bytes:
    return streams.drain(dev, bufsize=3 << 20)


def test_the_guest_cannot_reach_migration_state(made: list[Mlx5Device]) -> None:
    pf = f"pf-{uuid.uuid4().hex[:6]}"
    dev = vf(made, pf, 1, size="4M")
    before = dev.digest()
    guest = dev.guest()
    with pytest.raises(fw.AdminError, match=r"EPERM.*only the PF"):  # issue a command
        guest.admin(fw.SUSPEND_VHCA, op_mod=fw.SUSPEND_INITIATOR)
    with pytest.raises(fw.AdminError, match="EPERM"):  # save (read) the state
        guest.admin(fw.SAVE_VHCA_STATE, mkey=dev._mkeys[0], size=4096, set_track=True)
    with pytest.raises(fw.AdminError, match=r"EPERM.*another function"):  # the host buffers
        guest.dma_read(dev._mkeys[0])
    with pytest.raises(fw.AdminError, match="EPERM"):
        guest.dma_write(dev._load_mkey, b"evil")
    # every attempt reached the firmware and was refused there; nothing changed
    assert [r for r, _, _ in dev.fw.commands] == [1, 1]
    assert not dev.fw._vfs[1].initiator_suspended and dev.digest() == before


def test_framing_chunking_and_read_ahead(made: list[Mlx5Device]) -> None:
    dev = vf(made, f"pf-{uuid.uuid4().hex[:6]}", 1, size="20M")
    dev.set_state(S.STOP)
    dev.set_state(S.STOP_COPY)
    saves = [c for c in dev.fw.commands if c[1] == fw.SAVE_VHCA_STATE]
    assert len(saves) == 2  # two chunks saved ahead of the reader, no more
    stream = drain(dev)
    recs = records(stream)
    assert recs[0] == (8, mlx5.REC_OPTIONAL, mlx5.TAG_STOP_COPY_SIZE)  # first, always
    # It carries the buffer the driver pre-allocates (one chunk here), not the state size.
    assert struct.unpack_from("<Q", stream, REC.size)[0] == fw.CHUNK
    data = [r for r in recs[1:] if r[2] == mlx5.TAG_FW_DATA]
    assert len(data) == 3 and all(r[0] <= fw.CHUNK for r in data)
    assert [c[1] for c in dev.fw.commands[:4]] == [fw.SUSPEND_VHCA, fw.SUSPEND_VHCA,
                                                   fw.QUERY_VHCA_MIGRATION_STATE,
                                                   fw.SAVE_VHCA_STATE]


def test_dirty_state_is_fetched_only_when_asked(made: list[Mlx5Device]) -> None:
    dev = vf(made, f"pf-{uuid.uuid4().hex[:6]}", 1, size="4M", **{"dirty-rate": "64M"})
    dev.set_state(S.PRE_COPY)
    drain(dev)
    time.sleep(0.05)  # the guest dirties state
    saves = sum(c[1] == fw.SAVE_VHCA_STATE for c in dev.fw.commands)
    with pytest.raises(NoDataNow, match="ENOMSG"):  # draining does not fetch it
        dev.read_into(memoryview(bytearray(100)))
    assert sum(c[1] == fw.SAVE_VHCA_STATE for c in dev.fw.commands) == saves
    info = dev.precopy_info()  # asking for pre-copy info does: an incremental SAVE
    assert info.initial_bytes == 0 and info.dirty_bytes > 0
    assert sum(c[1] == fw.SAVE_VHCA_STATE for c in dev.fw.commands) > saves
    assert len(drain(dev)) == info.dirty_bytes


def test_loading_side_framing_rules(made: list[Mlx5Device]) -> None:
    pf = f"pf-{uuid.uuid4().hex[:6]}"
    src, dst = vf(made, pf, 1, size="4M"), vf(made, pf, 2, size="4M", content="zero")
    src.set_state(S.STOP_COPY)
    stream = drain(src)
    # unknown optional records are skipped
    dst.set_state(S.RESUMING)
    dst.write(memoryview(REC.pack(5, mlx5.REC_OPTIONAL, 77) + b"hello" + stream))
    dst.set_state(S.STOP)
    assert dst.digest() == src.digest()
    for bad, why in [(REC.pack(5, 0, 77) + b"hello", "unknown mandatory"),
                     (REC.pack(mlx5.MAX_LOAD_SIZE + 1, 0, mlx5.TAG_FW_DATA), "ENOMEM"),
                     (REC.pack(3, 0, mlx5.TAG_STOP_COPY_SIZE) + b"abc", "STOP_COPY_SIZE"),
                     (REC.pack(40, 0, mlx5.TAG_FW_DATA) + struct.pack("<QII", 1 << 40, 16, 0)
                      + bytes(24), "LOAD_VHCA_STATE failed")]:
        dst.reset()
        dst.set_state(S.RESUMING)
        with pytest.raises(DeviceError, match=why):
            dst.write(memoryview(bad))
    dst.reset()
    dst.set_state(S.RESUMING)
    dst.write(memoryview(stream[:-100]))  # truncated inside a record
    with pytest.raises(DeviceError, match="ends inside a record"):
        dst.set_state(S.STOP)


def test_several_vfs_on_one_pf_are_separate(made: list[Mlx5Device]) -> None:
    pf = f"pf-{uuid.uuid4().hex[:6]}"
    a, b = vf(made, pf, 1, size="4M", seed="1"), vf(made, pf, 2, size="4M", seed="2")
    assert a.fw is b.fw and a.digest() != b.digest()
    from migd.errors import ConfigError

    with pytest.raises(ConfigError, match="already has a VF with vhca_id 1"):
        vf(made, pf, 1, size="4M")


def fw_data(stream: bytes) -> bytes:
    """The firmware image of a saving stream: its FW_DATA payloads, in order."""
    out, pos = bytearray(), 0
    while pos < len(stream):
        size, _, tag = REC.unpack_from(stream, pos)
        if tag == mlx5.TAG_FW_DATA:
            out += stream[pos + REC.size : pos + REC.size + size]
        pos += REC.size + size
    return bytes(out)


def test_a_whole_image_in_one_record_loads(made: list[Mlx5Device]) -> None:
    # A device not in chunk mode sends its image as one record, far over 8 MiB.
    pf = f"pf-{uuid.uuid4().hex[:6]}"
    src, dst = vf(made, pf, 1, size="20M"), vf(made, pf, 2, size="20M", content="zero")
    src.set_state(S.STOP_COPY)
    image = fw_data(drain(src))
    assert len(image) > 20 << 20
    dst.set_state(S.RESUMING)
    dst.write(memoryview(REC.pack(len(image), 0, mlx5.TAG_FW_DATA) + image))
    dst.set_state(S.STOP)
    assert dst.digest() == src.digest()


def test_pre_copy_from_running_p2p_saves_with_tracking(made: list[Mlx5Device]) -> None:
    pf = f"pf-{uuid.uuid4().hex[:6]}"
    src, dst = vf(made, pf, 1, size="4M"), vf(made, pf, 2, size="4M", content="zero")
    src.set_state(S.RUNNING_P2P)
    assert src.set_state(S.PRE_COPY_P2P) is True  # a new data stream, with the image in it
    assert src.precopy_info().initial_bytes > 4 << 20
    stream = drain(src)
    src.set_state(S.STOP_COPY)
    stream += drain(src)
    dst.set_state(S.RESUMING)
    dst.write(memoryview(stream))
    dst.set_state(S.STOP)
    assert dst.digest() == src.digest()


def test_pre_copy_info_of_a_suspended_vf_asks_the_firmware_nothing(
        made: list[Mlx5Device]) -> None:
    dev = vf(made, f"pf-{uuid.uuid4().hex[:6]}", 1, size="4M", **{"dirty-rate": "64M"})
    dev.set_state(S.PRE_COPY)
    drain(dev)
    time.sleep(0.05)  # the guest dirties state before it is suspended
    dev.set_state(S.PRE_COPY_P2P)
    before = len(dev.fw.commands)
    info = dev.precopy_info()
    assert dev.fw.commands[before:] == []  # no QUERY, no SAVE: it cannot save now
    assert info.initial_bytes == info.dirty_bytes == 0
    with pytest.raises(NoDataNow):
        dev.read_into(memoryview(bytearray(100)))


def test_mig_data_size_is_the_firmwares_remaining_total(made: list[Mlx5Device]) -> None:
    dev = vf(made, f"pf-{uuid.uuid4().hex[:6]}", 1, size="20M")
    full = dev.stop_copy_size()
    assert full == (20 << 20) + 3 * fw.SEG.size  # RUNNING: what a full save gives
    dev.set_state(S.STOP_COPY)
    saved_ahead = 2 * fw.CHUNK  # two chunks already in host buffers
    assert dev.stop_copy_size() == full - saved_ahead
    drain(dev)
    assert dev.stop_copy_size() == full  # nothing left of this image: a new one would be full
    dev.set_state(S.STOP)
    dev.set_state(S.RUNNING)
    dev.set_state(S.PRE_COPY)
    drain(dev)
    assert dev.stop_copy_size() == 0  # tracking, nothing dirty: nothing left


def test_a_failed_arc_leaves_the_last_state_reached(made: list[Mlx5Device]) -> None:
    dev = vf(made, f"pf-{uuid.uuid4().hex[:6]}", 1, size="4M")
    dev.set_state(S.PRE_COPY)
    drain(dev)
    # The firmware refuses the final save: SUSPEND_RESPONDER went through, SAVE did not.
    real = dev.fw._save

    def refuse(vf_: object, args: dict[str, object]) -> dict[str, int]:
        raise fw.AdminError(5, "injected")

    dev.fw._save = refuse  # type: ignore[method-assign,assignment]
    try:
        with pytest.raises(DeviceError, match="injected"):
            dev.set_state(S.STOP_COPY)
    finally:
        dev.fw._save = real  # type: ignore[method-assign]
    assert dev.state == S.PRE_COPY_P2P  # where the driver's loop stopped, not ERROR
    dev.recover()
    assert dev.describe()["state"] == "RUNNING"


def lend_all(dev: Mlx5Device, limit: int = 3 << 20) -> tuple[bytes, list[backends.base.Lease]]:
    """Lend the stream to its end, releasing nothing: its bytes and the leases."""
    out, leases = bytearray(), list[backends.base.Lease]()
    while True:
        lease = dev.lend(limit)
        if not lease.views:
            return bytes(out), leases
        out += b"".join(lease.views)
        leases.append(lease)


def test_lent_chunks_are_the_host_buffers_and_pin_them(made: list[Mlx5Device]) -> None:
    pf = f"pf-{uuid.uuid4().hex[:6]}"
    twin, dev = vf(made, pf, 1, size="80M"), vf(made, pf, 2, size="80M")
    for d in (twin, dev):
        d.set_state(S.STOP)
        d.set_state(S.STOP_COPY)
    expected = drain(twin)
    first = dev.lend(fw.CHUNK)
    assert any(v.obj is dev._bufs[0] for v in first.views)  # no copy: the host buffer
    held = bytes(b"".join(first.views))
    # Every other buffer can still be saved into and read through; this one is pinned.
    got, leases = bytearray(held), []
    with pytest.raises(LentOut, match="every host buffer is lent"):
        while True:
            lease = dev.lend(fw.CHUNK)
            assert lease.views, "the stream ended with a buffer pinned"
            got += b"".join(lease.views)
            leases.append(lease)
    pinned = {id(v.obj) for lease in [first, *leases] for v in lease.views}
    assert pinned >= {id(b) for b in dev._bufs}  # every buffer, then nothing more
    assert bytes(b"".join(first.views)) == held  # the firmware did not save over it
    on_first = [x for x in [first, *leases] if any(v.obj is dev._bufs[0] for v in x.views)]
    for x in on_first[:-1]:
        x.release()
        x.release()  # idempotent: the count does not go below zero
        with pytest.raises(LentOut):  # held until the last lease on it is back
            dev.lend(fw.CHUNK)
    on_first[-1].release()
    lease = dev.lend(fw.CHUNK)  # the pinned buffer went back to the firmware
    assert lease.views and all(v.obj is dev._bufs[0] for v in lease.views if len(v) > 16)
    got += b"".join(lease.views)
    for old in [*leases, lease]:
        old.release()
    rest, more = lend_all(dev)
    assert bytes(got) + rest == expected
    for old in more:
        old.release()


def test_a_lease_of_a_closed_stream_gives_nothing_back_to_the_next(
        made: list[Mlx5Device]) -> None:
    dev = vf(made, f"pf-{uuid.uuid4().hex[:6]}", 1, size="80M")
    dev.set_state(S.STOP)
    dev.set_state(S.STOP_COPY)
    stale = dev.lend(fw.CHUNK)
    dev.set_state(S.STOP)  # the stream ends (a failed migration, say) with it lent
    dev.set_state(S.STOP_COPY)
    live = [dev.lend(fw.CHUNK)]
    stale.release()  # must not count against the new stream's leases
    with pytest.raises(LentOut):
        while True:
            live.append(dev.lend(fw.CHUNK))
            assert live[-1].views, "the stream ended"
    # Every buffer is pinned by the new stream's leases alone: had the stale release
    # freed one, more would have come.
    assert {id(v.obj) for lease in live for v in lease.views} >= {id(b) for b in dev._bufs}
    for lease in live:
        lease.release()
