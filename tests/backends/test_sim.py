"""The simulated VF behaves like a variant driver: arcs, data streams, validation."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator

import pytest

from backends import REGISTRY
from backends.sim import MAX_RECORD, PAGE, RECORD, SimDevice
from backends.states import DeviceState, MigCap
from migd.errors import ConfigError, DeviceError, IncompatibleDevice, NoDataNow

from . import streams

S = DeviceState


@pytest.fixture
def devices() -> Iterator[list[SimDevice]]:
    made: list[SimDevice] = []
    yield made
    for d in made:
        d.close()


def make(devices: list[SimDevice], **opts: str) -> SimDevice:
    dev = REGISTRY.create("sim", f"vf{len(devices)}", opts)
    assert isinstance(dev, SimDevice)
    devices.append(dev)
    return dev


def drain(dev: SimDevice, limit: int | None = None) -> bytes:
    return streams.drain(dev, limit, bufsize=300_000)  # deliberately not record-aligned


def test_registry_rejects_unknown_kinds_and_options(devices: list[SimDevice]) -> None:
    with pytest.raises(ConfigError, match=r"unknown backend 'nope'.*supported: .*sim"):
        REGISTRY.create("nope", "vf0", {})
    with pytest.raises(ConfigError, match="unknown sim option"):
        make(devices, size="1M", colour="blue")
    with pytest.raises(ConfigError, match="multiple of 4096"):
        make(devices, size="1000")
    with pytest.raises(ConfigError, match="is not a size"):
        make(devices, size="lots")
    with pytest.raises(ConfigError, match="state-file"):
        make(devices, **{"state-file": "/nonexistent/x"})


def test_stop_copy_roundtrip_is_byte_exact(devices: list[SimDevice]) -> None:
    src = make(devices, size="3M")
    dst = make(devices, size="3M", content="zero")
    assert src.digest() != dst.digest()
    assert src.set_state(S.STOP) is False
    assert src.set_state(S.STOP_COPY) is True  # STOP->STOP_COPY opens a data stream
    stream = drain(src)
    assert src.read_into(memoryview(bytearray(10))) == 0  # end of stream, permanent
    assert len(stream) == src.stop_copy_size()
    dst.set_state(S.RESUMING)
    for i in range(0, len(stream), 7777):  # segmentation is free
        assert dst.write(memoryview(stream)[i : i + 7777]) == len(stream[i : i + 7777])
    dst.set_state(S.RUNNING)
    assert dst.digest() == src.digest()
    assert dst.describe()["loads_committed"] == 1


def test_precopy_info_and_no_data_for_now(devices: list[SimDevice]) -> None:
    dev = make(devices, size="2M")
    assert dev.set_state(S.PRE_COPY) is True
    info = dev.precopy_info()
    assert info.initial_bytes == 2 * 1024 * 1024 + 2 * RECORD.size and info.dirty_bytes == 0
    drain(dev, limit=100_000)
    assert dev.precopy_info().initial_bytes < info.initial_bytes  # falls as data is read
    drain(dev)
    assert dev.precopy_info().initial_bytes == 0
    with pytest.raises(NoDataNow):  # temporary end, not end of stream
        dev.read_into(memoryview(bytearray(4096)))
    dev.guest_write(5 * PAGE + 8, b"dirty")
    assert dev.precopy_info().dirty_bytes == PAGE + RECORD.size  # rises as the device changes
    assert len(drain(dev)) == PAGE + RECORD.size
    assert dev.precopy_info().dirty_bytes == 0


def test_precopy_then_stop_copy_carries_the_final_delta(devices: list[SimDevice]) -> None:
    src = make(devices, size="2M")
    dst = make(devices, size="2M", content="zero")
    dst.set_state(S.RESUMING)
    src.set_state(S.PRE_COPY)
    dst.write(memoryview(drain(src)))
    src.guest_write(3 * PAGE, b"late change")
    assert src.set_state(S.STOP_COPY) is False  # same stream continues
    assert src.arc_log[-2:] == [(S.PRE_COPY, S.PRE_COPY_P2P), (S.PRE_COPY_P2P, S.STOP_COPY)]
    src.guest_write(4 * PAGE, b"ignored: guest is paused")
    dst.write(memoryview(drain(src)))
    src.set_state(S.STOP)
    dst.set_state(S.STOP)
    assert dst.digest() == src.digest()


def test_workload_dirties_state_only_while_running(devices: list[SimDevice]) -> None:
    dev = make(devices, size="4M", **{"dirty-rate": "4M"})
    dev.set_state(S.PRE_COPY)
    drain(dev)
    deadline = time.monotonic() + 5
    while dev.precopy_info().dirty_bytes == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert dev.precopy_info().dirty_bytes > 0
    dev.set_state(S.STOP_COPY)
    before = dev.digest()
    written = dev.guest_pages_written
    time.sleep(0.05)
    assert dev.guest_pages_written == written and dev.digest() == before


def test_incomplete_or_bad_stream_never_loads(devices: list[SimDevice]) -> None:
    src = make(devices, size="1M")
    src.set_state(S.STOP_COPY)
    stream = drain(src)
    dst = make(devices, size="1M", content="zero")
    zero = dst.digest()
    dst.set_state(S.RESUMING)
    dst.write(memoryview(stream)[: len(stream) - RECORD.size])  # no END record
    with pytest.raises(DeviceError, match="incomplete"):
        dst.set_state(S.STOP)
    assert dst.state == S.RESUMING  # the arc failed: still where it was, still not running
    dst.reset()  # function-level reset: whatever arrived is gone
    assert dst.describe()["state"] == "RUNNING" and dst.digest() == zero
    assert dst.describe()["loads_committed"] == 0

    dst.set_state(S.RESUMING)
    bad = bytearray(stream)
    bad[0:4] = b"XXXX"
    with pytest.raises(DeviceError, match="magic"):
        dst.write(memoryview(bad))


def test_destination_refuses_other_sizes_and_models(devices: list[SimDevice]) -> None:
    src = make(devices, size="1M")
    with pytest.raises(IncompatibleDevice, match="destination VF has"):
        make(devices, size="2M").check_compat(src.compat())
    with pytest.raises(IncompatibleDevice, match="model"):
        make(devices, size="1M", model="other").check_compat(src.compat())
    make(devices, size="1M").check_compat(src.compat())
    src.set_state(S.STOP_COPY)
    other = make(devices, size="2M")
    other.set_state(S.RESUMING)
    with pytest.raises(IncompatibleDevice):
        other.write(memoryview(drain(src)))


def test_record_outside_device_memory_is_refused(devices: list[SimDevice]) -> None:
    dst = make(devices, size="1M")
    dst.set_state(S.RESUMING)
    evil = RECORD.pack(b"SIMR", 0, 0, 1 << 20) + RECORD.pack(b"SIMR", 1, 1 << 20, PAGE)
    with pytest.raises(DeviceError, match="outside device memory"):
        dst.write(memoryview(evil))
    dst.reset()
    dst.set_state(S.RESUMING)
    with pytest.raises(DeviceError, match="outside"):
        dst.write(memoryview(RECORD.pack(b"SIMR", 0, 0, 1 << 20)
                             + RECORD.pack(b"SIMR", 1, 0, MAX_RECORD + PAGE)))


def test_capability_sets_and_reads_in_wrong_states(devices: list[SimDevice]) -> None:
    dev = make(devices, size="1M", caps="stop_copy")
    assert dev.caps == MigCap.STOP_COPY
    dev.set_state(S.STOP)
    assert dev.arc_log == [(S.RUNNING, S.STOP)]  # no P2P: direct arc
    with pytest.raises(DeviceError):
        dev.read_into(memoryview(bytearray(10)))
    with pytest.raises(DeviceError):
        dev.set_state(S.PRE_COPY)


def test_state_file_is_never_written(devices: list[SimDevice], tmp_path: object) -> None:
    import pathlib

    path = pathlib.Path(str(tmp_path)) / "state.img"
    data = bytes(range(256)) * (PAGE // 256) * 16
    path.write_bytes(data)
    dev = make(devices, **{"state-file": str(path)})
    assert dev.digest() == hashlib.sha256(data).hexdigest()
    dev.guest_write(0, b"guest write")
    assert path.read_bytes() == data


def test_lent_views_are_device_memory_and_pages_changed_after_are_sent_again(
        devices: list[SimDevice]) -> None:
    dev = make(devices, size="1M")
    assert dev.lends_memory
    dev.set_state(S.PRE_COPY)
    header, data_header, data = dev.read_views(64 << 10)
    assert RECORD.unpack(header)[1] == 0 and RECORD.unpack(data_header)[1:] == (1, 0, 1 << 20)
    assert len(data) == (64 << 10) - 2 * RECORD.size
    dev.guest_write(4096 + 128, b"\xab" * 64)
    # No copy was made: the guest's write shows through the view already lent ...
    assert bytes(data[4096 + 128 : 4096 + 192]) == b"\xab" * 64
    # ... and since the page is dirty it is sent again (a copy would have been stale).
    rest = bytearray()
    while True:
        try:
            views = dev.read_views(1 << 20)
        except NoDataNow:
            break
        rest += b"".join(views)
    page = RECORD.pack(b"SIMR", 1, 4096, PAGE)
    assert page in rest
    start = rest.index(page) + RECORD.size
    assert rest[start + 128 : start + 192] == b"\xab" * 64


def test_closing_a_device_while_a_lent_view_lives(devices: list[SimDevice]) -> None:
    dev = make(devices, size="1M")
    dev.set_state(S.STOP_COPY)
    *_, data = dev.read_views(64 << 10)
    expected = bytes(data)
    dev.close()  # a daemon shutting down must not fail on a view still referenced
    assert bytes(data) == expected  # and the view still reads mapped memory
    devices.remove(dev)
