"""A VF outlives the daemon that drives it: a restarted daemon finds it as it was.

The emulated devices keep their memory and FSM state under ``dir`` (as a VF's
memory and state live in the hardware, not in the process); the real VFIO
backend asks the kernel (GET) what state a device is in when it opens it.
"""

from __future__ import annotations

import hashlib
import pathlib
from collections.abc import Mapping

import pytest

import backends
from backends.base import Device
from backends.states import DeviceState
from backends.vfio import VfioDevice
from migd.errors import ConfigError

from .kernel_model import KernelModel

S = DeviceState
SIZE = 1 << 20


def state(dev: Device) -> DeviceState:
    return dev.state  # read afresh: each arc changes it


def make(kind: str, options: Mapping[str, str]) -> Device:
    return backends.REGISTRY.create(kind, "vf0", dict(options, size=str(SIZE)))


@pytest.mark.parametrize("kind", ["sim", "mlx5"])
def test_a_stopped_source_vf_keeps_its_state_across_a_daemon_restart(
        kind: str, tmp_path: pathlib.Path) -> None:
    opts = {"dir": str(tmp_path), "seed": "5"}
    dev = make(kind, opts)
    assert not dev.restored
    before = dev.digest()
    dev.set_state(S.STOP_COPY)  # stopped for switchover, then the daemon dies
    dev.close()
    again = make(kind, {"dir": str(tmp_path), "seed": "99"})  # not refilled: found
    try:
        assert again.restored and state(again) == S.STOP_COPY
        assert again.digest() == before
        again.recover()  # no decision: back to RUNNING, state intact
        assert state(again) == S.RUNNING and again.digest() == before
    finally:
        again.close()
    third = make(kind, {"dir": str(tmp_path)})
    assert state(third) == S.RUNNING and third.digest() == before
    third.close()


@pytest.mark.parametrize("kind", ["sim", "mlx5"])
def test_a_half_loaded_destination_vf_is_found_loading_and_reset_wipes_it(
        kind: str, tmp_path: pathlib.Path) -> None:
    src = make(kind, {"seed": "3", **({"vhca-id": "2"} if kind == "mlx5" else {})})
    dst = make(kind, {"dir": str(tmp_path), "content": "zero"})
    try:
        src.set_state(S.STOP_COPY)
        dst.set_state(S.RESUMING)
        buf = bytearray(SIZE // 2)
        n = src.read_into(memoryview(buf))
        dst.write(memoryview(buf)[:n])
    finally:
        src.close()
        dst.close()
    again = make(kind, {"dir": str(tmp_path), "content": "zero"})
    try:
        # Only a reset is right for it (the journal says it never voted): what it
        # loaded is wiped.
        assert state(again) == S.RESUMING and again.describe()["loading"]
        again.reset()
        assert state(again) == S.RUNNING
        assert again.digest() == hashlib.sha256(bytes(SIZE)).hexdigest()
    finally:
        again.close()


def test_one_vf_is_driven_by_one_daemon(tmp_path: pathlib.Path) -> None:
    dev = make("sim", {"dir": str(tmp_path)})
    try:
        with pytest.raises(ConfigError, match="is in use by another process"):
            make("sim", {"dir": str(tmp_path)})
    finally:
        dev.close()
    with pytest.raises(ConfigError, match="holds 1048576 bytes of device memory, the device is "
                                          "configured with 2097152"):
        backends.REGISTRY.create("sim", "vf0", {"dir": str(tmp_path), "size": "2M"})


def test_a_damaged_state_file_is_named(tmp_path: pathlib.Path) -> None:
    make("sim", {"dir": str(tmp_path)}).close()
    (tmp_path / "vf0.state").write_text("{half")
    with pytest.raises(ConfigError, match=f"{tmp_path}/vf0.state is damaged"):
        make("sim", {"dir": str(tmp_path)})


def test_the_vfio_backend_asks_the_kernel_what_state_the_device_is_in() -> None:
    inner = backends.REGISTRY.create("hisi", "h0", {})
    try:
        inner.set_state(S.STOP)  # left stopped by a daemon that died
        dev = VfioDevice("vf0", {"path": "/dev/vfio/devices/vfio0"},
                         ops=KernelModel(inner, "hisi"))
        assert state(dev) == S.STOP
        dev.recover()
        assert state(dev) == S.RUNNING and inner.state == S.RUNNING
        dev.close()
    finally:
        inner.close()
