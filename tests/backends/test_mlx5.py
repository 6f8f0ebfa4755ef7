"""The mlx5-style backend: PF-owned state, admin commands, the driver's framing."""

from __future__ import annotations

import struct
import time
import uuid
from collections.abc import Iterator

import pytest

import backends
from backends import mlx5
from backends.mlx5 import REC, Mlx5Device
from backends.states import DeviceState
from migd.errors import DeviceError, NoDataNow

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
    with pytest.raises(mlx5.AdminError, match=r"EPERM.*only the PF"):  # issue a command
        guest.admin(mlx5.SUSPEND_VHCA, op_mod=mlx5.SUSPEND_INITIATOR)
    with pytest.raises(mlx5.AdminError, match="EPERM"):  # save (read) the state
        guest.admin(mlx5.SAVE_VHCA_STATE, mkey=dev._mkeys[0], size=4096, set_track=True)
    with pytest.raises(mlx5.AdminError, match=r"EPERM.*another function"):  # the host buffers
        guest.dma_read(dev._mkeys[0])
    with pytest.raises(mlx5.AdminError, match="EPERM"):
        guest.dma_write(dev._load_mkey, b"evil")
    # every attempt reached the firmware and was refused there; nothing changed
    assert [r for r, _, _ in dev.fw.commands] == [1, 1]
    assert not dev.fw._vfs[1].initiator_suspended and dev.digest() == before


def test_framing_chunking_and_read_ahead(made: list[Mlx5Device]) -> None:
    dev = vf(made, f"pf-{uuid.uuid4().hex[:6]}", 1, size="20M")
    dev.set_state(S.STOP)
    dev.set_state(S.STOP_COPY)
    saves = [c for c in dev.fw.commands if c[1] == mlx5.SAVE_VHCA_STATE]
    assert len(saves) == 2  # two chunks saved ahead of the reader, no more
    stream = drain(dev)
    recs = records(stream)
    assert recs[0] == (8, mlx5.REC_OPTIONAL, mlx5.TAG_STOP_COPY_SIZE)  # first, always
    assert struct.unpack_from("<Q", stream, REC.size)[0] >= 20 << 20
    data = [r for r in recs[1:] if r[2] == mlx5.TAG_FW_DATA]
    assert len(data) == 3 and all(r[0] <= mlx5.CHUNK for r in data)
    assert [c[1] for c in dev.fw.commands[:4]] == [mlx5.SUSPEND_VHCA, mlx5.SUSPEND_VHCA,
                                                   mlx5.QUERY_VHCA_MIGRATION_STATE,
                                                   mlx5.SAVE_VHCA_STATE]


def test_dirty_state_is_fetched_only_when_asked(made: list[Mlx5Device]) -> None:
    dev = vf(made, f"pf-{uuid.uuid4().hex[:6]}", 1, size="4M", **{"dirty-rate": "64M"})
    dev.set_state(S.PRE_COPY)
    drain(dev)
    time.sleep(0.05)  # the guest dirties state
    saves = sum(c[1] == mlx5.SAVE_VHCA_STATE for c in dev.fw.commands)
    with pytest.raises(NoDataNow, match="ENOMSG"):  # draining does not fetch it
        dev.read_into(memoryview(bytearray(100)))
    assert sum(c[1] == mlx5.SAVE_VHCA_STATE for c in dev.fw.commands) == saves
    info = dev.precopy_info()  # asking for pre-copy info does: an incremental SAVE
    assert info.initial_bytes == 0 and info.dirty_bytes > 0
    assert sum(c[1] == mlx5.SAVE_VHCA_STATE for c in dev.fw.commands) > saves
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
                     (REC.pack(mlx5.MAX_RECORD + 1, 0, mlx5.TAG_FW_DATA), "ENOMEM"),
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
