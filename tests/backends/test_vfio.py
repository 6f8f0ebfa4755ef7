"""The kernel VFIO backend's own rules, against the kernel model."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import backends
from backends import vfio
from backends.base import Device
from backends.states import DeviceState
from backends.vfio import VfioDevice
from migd.errors import ConfigError, DeviceError, IncompatibleDevice

from . import kernel_model
from .kernel_model import KernelModel

S = DeviceState
PATH = {"path": "/dev/vfio/devices/vfio0"}


@pytest.fixture
def inner() -> Iterator[list[Device]]:
    made: list[Device] = []
    yield made
    for d in made:
        d.close()


def hisi(inner: list[Device], **opts: str) -> Device:
    dev = backends.REGISTRY.create("hisi", f"h{len(inner)}", opts)
    inner.append(dev)
    return dev


def test_not_migratable_and_open_errors(inner: list[Device]) -> None:
    with pytest.raises(ConfigError, match=r"not migratable.*ENOTTY"):
        VfioDevice("vf0", PATH, ops=KernelModel(None, "mlx5"))
    with pytest.raises(ConfigError, match="cannot open /dev/vfio/devices/vfio9: ENOENT"):
        VfioDevice("vf0", {"path": "/dev/vfio/devices/vfio9"}, ops=KernelModel(None, "mlx5"))
    with pytest.raises(ConfigError, match="give path="):
        VfioDevice("vf0", {}, ops=KernelModel(None, "mlx5"))
    with pytest.raises(ConfigError, match="unknown vfio option"):
        VfioDevice("vf0", {"path": "x", "colour": "red"}, ops=KernelModel(None, "mlx5"))


def test_one_data_fd_per_saving_group(inner: list[Device]) -> None:
    model = KernelModel(hisi(inner), "hisi")
    dev = VfioDevice("vf0", PATH, ops=model)
    assert dev.caps == 5 and dev.state == S.RUNNING
    dev.set_state(S.PRE_COPY)
    first = model.data_fd
    assert first > 0
    dev.set_state(S.STOP_COPY)  # PRE_COPY -> STOP_COPY keeps the group's fd
    assert model.data_fd == first
    dev.set_state(S.STOP)
    assert first not in model.open_fds  # leaving the group closed it
    dev.set_state(S.STOP_COPY)  # STOP -> STOP_COPY: a new group, a new fd
    assert model.data_fd > first
    dev.close()
    assert not model.open_fds


def test_failed_set_reads_the_state_back(inner: list[Device]) -> None:
    model = KernelModel(hisi(inner), "hisi")
    dev = VfioDevice("vf0", PATH, ops=model)
    model.fail_arc = (S.PRE_COPY, S.STOP_COPY)
    dev.set_state(S.PRE_COPY)
    with pytest.raises(DeviceError, match="EIO"):
        dev.set_state(S.STOP_COPY)
    assert dev.state == S.PRE_COPY  # GET says where it is; not assumed ERROR
    dev.recover()
    assert dev.describe()["state"] == "RUNNING" and "reset" not in model.calls


def test_a_busy_pause_stays_running_and_a_device_in_error_is_reset(
        inner: list[Device]) -> None:
    behind = hisi(inner, stuck="yes")  # pausing never completes: the driver fails the arc
    model = KernelModel(behind, "hisi")
    dev = VfioDevice("vf0", PATH, ops=model)
    with pytest.raises(DeviceError, match="busy"):
        dev.set_state(S.STOP)
    assert dev.state == S.RUNNING  # hisi leaves it RUNNING on EBUSY; GET says so
    dev.recover()
    assert "reset" not in model.calls
    # Other drivers may report ERROR after a failed arc: then only a reset helps.
    behind._state = S.ERROR
    with pytest.raises(DeviceError):
        dev.set_state(S.STOP)
    assert dev.describe()["state"] == "ERROR"
    dev.recover()
    assert "reset" in model.calls and dev.describe()["state"] == "RUNNING"


def test_short_writes_and_efault(inner: list[Device]) -> None:
    src = VfioDevice("s", PATH, ops=KernelModel(hisi(inner), "hisi"))
    model = KernelModel(hisi(inner, seed="3"), "hisi", max_write=7)
    dst = VfioDevice("d", PATH, ops=model)
    src.set_state(S.STOP_COPY)
    data = bytearray(4096)
    n = src.read_into(memoryview(data))
    assert n == 176
    dst.set_state(S.RESUMING)
    assert dst.write(memoryview(data)[:n]) == 7  # short: the caller must loop
    wrong = VfioDevice("w", PATH, ops=KernelModel(hisi(inner, **{"dev-id": "0x77"}), "hisi"))
    wrong.set_state(S.RESUMING)
    with pytest.raises(IncompatibleDevice, match="EFAULT"):
        wrong.write(memoryview(data)[:n])


def test_precopy_info_ignores_output_flags(inner: list[Device]) -> None:
    model = KernelModel(hisi(inner), "hisi")
    dev = VfioDevice("vf0", PATH, ops=model)
    model.flags_out = 0xFFFF_FFFF  # drivers echo or scribble on output flags
    dev.set_state(S.PRE_COPY)
    info = dev.precopy_info()
    assert (info.initial_bytes, info.dirty_bytes) == (40, 0)
    dev.set_state(S.STOP_COPY)
    with pytest.raises(DeviceError):  # only in PRE_COPY states
        dev.precopy_info()


TOKEN = uuid.UUID("2ab74924-c335-45f4-9b16-8569e5b08258")
GROUP_OPTS = {"group": kernel_model.GROUP, "address": kernel_model.ADDRESS}


@pytest.mark.parametrize("opts", [PATH, GROUP_OPTS], ids=["cdev", "group"])
def test_a_vf_guarded_by_its_pfs_token_opens_only_with_it(inner: list[Device],
                                                           opts: dict[str, str]) -> None:
    model = KernelModel(hisi(inner), "hisi")
    model.vf_token = TOKEN
    with pytest.raises(ConfigError, match=r"EACCES: its PF is bound to vfio-pci.*vf-token=UUID"):
        VfioDevice("vf0", opts, ops=model)
    with pytest.raises(ConfigError, match="EACCES: the PF's owner set another VF token"):
        VfioDevice("vf0", {**opts, "vf-token": str(uuid.uuid4())}, ops=model)
    dev = VfioDevice("vf0", {**opts, "vf-token": str(TOKEN)}, ops=model)
    assert dev.state == S.RUNNING
    if opts is PATH:
        assert model.bound_with is not None and model.bound_with[1] == TOKEN
    with pytest.raises(ConfigError, match="is not a UUID"):
        VfioDevice("vf0", {**opts, "vf-token": "yes"}, ops=model)


def test_without_a_token_the_first_16_bytes_of_bind_are_sent(inner: list[Device]) -> None:
    model = KernelModel(hisi(inner), "hisi")
    VfioDevice("vf0", PATH, ops=model)
    assert model.bound_with is not None and model.bound_with[1] is None
    assert vfio.BIND_IOMMUFD.size == 24 and vfio.BIND_IOMMUFD_MIN == 16


@pytest.mark.parametrize("opts", [PATH, GROUP_OPTS], ids=["cdev", "group"])
def test_a_vf_qemu_holds_cannot_be_opened_again_and_says_use_fd(inner: list[Device],
                                                                 opts: dict[str, str]) -> None:
    model = KernelModel(hisi(inner), "hisi")
    model.held = True
    with pytest.raises(ConfigError, match=r"(EINVAL|EBUSY): it is in use by another process\. "
                                          r"A VF that QEMU holds opens only once: use fd=N"):
        VfioDevice("vf0", opts, ops=model)


def test_holders_names_the_process_and_its_guest(tmp_path: Any) -> None:
    node = tmp_path / "vfio7"
    node.write_text("")
    held = subprocess.Popen([sys.executable, "-c", "import sys, time; f = open(sys.argv[1]); "
                             "print(flush=True); time.sleep(30)", str(node), "-name",
                             "guest=vm-7,debug-threads=on"], stdout=subprocess.PIPE)
    try:
        assert held.stdout is not None and held.stdout.readline()  # it holds the file now
        found = vfio.holders(str(node))
        assert found == [f"{held.pid} ({os.path.basename(sys.executable)}, guest vm-7)"]
        assert vfio.holders(str(tmp_path / "nobody-holds-this")) == []
    finally:
        held.kill()
        held.wait()
