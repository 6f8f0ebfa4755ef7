"""``vfio``: real hardware through the kernel's VFIO migration uAPI (v2).

Drives any vfio-pci variant driver (mlx5_vfio_pci, hisi_acc_vfio_pci, ...):
``VFIO_DEVICE_FEATURE`` for MIGRATION (ENOTTY: not migratable),
MIG_DEVICE_STATE (with the data_fd it hands out) and MIG_DATA_SIZE;
``VFIO_MIG_GET_PRECOPY_INFO`` on the data fd; ``VFIO_DEVICE_RESET`` to recover.

The kernel rules it keeps: one data fd per saving group (RUNNING->PRE_COPY's fd
carries on into STOP_COPY); ENOMSG, EAGAIN and 0-byte reads in PRE_COPY all mean
"no data for now"; writes when resuming may be short; after a failed SET the
state is read back, and a device in ERROR is reset.

All system calls go through :class:`Ops` so the same code runs against the
kernel (:class:`LinuxOps`) or a model of it in tests.  Constants are the x86-64
/ arm64 values; the tests check them against the installed ``<linux/vfio.h>``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
from collections.abc import Mapping
from typing import Any, Protocol

from migd.errors import ConfigError, DeviceError, IncompatibleDevice, NoDataNow

from .base import REGISTRY, Device, PrecopyInfo
from .states import (
    DATA_FD_ARCS,
    PRECOPY_STATES,
    SAVING_STATES,
    VALID_CAPS,
    DeviceState,
    MigCap,
)


def _io(nr: int) -> int:
    """_IO(VFIO_TYPE, VFIO_BASE + nr): no direction, no size."""
    return (ord(";") << 8) | (100 + nr)


VFIO_GET_API_VERSION = _io(0)
VFIO_SET_IOMMU = _io(2)
VFIO_GROUP_SET_CONTAINER = _io(4)
VFIO_GROUP_GET_DEVICE_FD = _io(6)
VFIO_DEVICE_RESET = _io(11)
VFIO_DEVICE_FEATURE = _io(17)
VFIO_DEVICE_BIND_IOMMUFD = _io(18)
VFIO_MIG_GET_PRECOPY_INFO = _io(21)
VFIO_TYPE1v2_IOMMU = 3

FEATURE_MASK = 0xFFFF
FEATURE_GET = 1 << 16
FEATURE_SET = 1 << 17
FEATURE_PROBE = 1 << 18
FEATURE_MIGRATION = 1
FEATURE_MIG_DEVICE_STATE = 2
FEATURE_MIG_DATA_SIZE = 9

FEATURE_HDR = struct.Struct("<II")  # struct vfio_device_feature {argsz, flags, data[]}
MIGRATION = struct.Struct("<Q")  # struct vfio_device_feature_migration
MIG_STATE = struct.Struct("<Ii")  # struct vfio_device_feature_mig_state
MIG_DATA_SIZE = struct.Struct("<Q")  # struct vfio_device_feature_mig_data_size
PRECOPY_INFO = struct.Struct("<IIQQ")  # struct vfio_precopy_info
BIND_IOMMUFD = struct.Struct("<IIiI")  # struct vfio_device_bind_iommufd


class Ops(Protocol):
    """The system calls the backend makes."""

    def open(self, path: str, flags: int) -> int: ...
    def close(self, fd: int) -> None: ...
    def ioctl(self, fd: int, request: int, arg: bytearray | int) -> int: ...
    def readinto(self, fd: int, buf: memoryview) -> int: ...
    def write(self, fd: int, data: memoryview) -> int: ...


class LinuxOps:
    def open(self, path: str, flags: int) -> int:
        return os.open(path, flags)

    def close(self, fd: int) -> None:
        os.close(fd)

    def ioctl(self, fd: int, request: int, arg: bytearray | int) -> int:
        if isinstance(arg, int):
            return int(fcntl.ioctl(fd, request, arg))
        return int(fcntl.ioctl(fd, request, arg, True))

    def readinto(self, fd: int, buf: memoryview) -> int:
        return os.readv(fd, [buf])

    def write(self, fd: int, data: memoryview) -> int:
        return os.write(fd, data)


def _err(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


class VfioDevice(Device):
    kind = "vfio"
    blocking_io = True

    def __init__(self, name: str, options: Mapping[str, str], ops: Ops | None = None) -> None:
        known = {"path", "group", "address", "fd", "iommufd"}
        unknown = set(options) - known
        if unknown:
            raise ConfigError(f"device {name}: unknown vfio option(s) {', '.join(sorted(unknown))};"
                              f" known: {', '.join(sorted(known))}")
        self._ops: Ops = ops or LinuxOps()
        self._fds: list[int] = []
        self._data_fd = -1
        self.fd = self._open(name, options)
        try:
            raw = MIGRATION.unpack(self._feature(FEATURE_GET | FEATURE_MIGRATION, MIGRATION.size))[0]
        except OSError as exc:
            self._close_fds()
            if exc.errno == errno.ENOTTY:
                raise ConfigError(f"device {name}: not migratable (its driver has no "
                                  "migration support: ENOTTY)") from None
            raise ConfigError(f"device {name}: MIGRATION feature: {_err(exc)}") from None
        caps = MigCap(raw & 7)
        if caps not in VALID_CAPS:
            self._close_fds()
            raise ConfigError(f"device {name}: driver reports invalid migration flags {raw:#x}")
        super().__init__(name, caps)
        self._state = self._get_state()
        try:
            self._size = self.stop_copy_size()
        except DeviceError:
            self._size = 0

    # --- opening ------------------------------------------------------------------------

    def _open(self, name: str, options: Mapping[str, str]) -> int:
        ops = self._ops
        try:
            if "fd" in options:  # handed over, e.g. by the VMM over SCM_RIGHTS
                fd = int(options["fd"])
                self._fds.append(fd)
                return fd
            if "path" in options:  # iommufd character device: /dev/vfio/devices/vfioN
                fd = ops.open(options["path"], os.O_RDWR | os.O_CLOEXEC)
                self._fds.append(fd)
                iommufd = ops.open(options.get("iommufd", "/dev/iommu"), os.O_RDWR | os.O_CLOEXEC)
                self._fds.append(iommufd)
                ops.ioctl(fd, VFIO_DEVICE_BIND_IOMMUFD,
                          bytearray(BIND_IOMMUFD.pack(BIND_IOMMUFD.size, 0, iommufd, 0)))
                return fd
            if "group" in options and "address" in options:  # legacy group + container
                container = ops.open("/dev/vfio/vfio", os.O_RDWR | os.O_CLOEXEC)
                self._fds.append(container)
                group = ops.open(options["group"], os.O_RDWR | os.O_CLOEXEC)
                self._fds.append(group)
                ops.ioctl(group, VFIO_GROUP_SET_CONTAINER, bytearray(struct.pack("<i", container)))
                ops.ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)
                fd = ops.ioctl(group, VFIO_GROUP_GET_DEVICE_FD,
                               bytearray(options["address"].encode() + b"\0"))
                self._fds.append(fd)
                return fd
        except (OSError, ValueError) as exc:
            self._close_fds()
            what = _err(exc) if isinstance(exc, OSError) else str(exc)
            raise ConfigError(f"device {name}: cannot open: {what}") from None
        raise ConfigError(f"device {name}: give path=/dev/vfio/devices/vfioN, "
                          "group=/dev/vfio/N with address=DDDD:BB:SS.F, or fd=N")

    def _close_fds(self) -> None:
        for fd in reversed(self._fds):
            with contextlib.suppress(OSError):
                self._ops.close(fd)
        self._fds.clear()

    # --- the feature ioctl ----------------------------------------------------------------

    def _feature(self, flags: int, size: int, payload: bytes = b"") -> bytearray:
        buf = bytearray(FEATURE_HDR.pack(FEATURE_HDR.size + size, flags))
        buf += payload.ljust(size, b"\0")
        self._ops.ioctl(self.fd, VFIO_DEVICE_FEATURE, buf)
        return buf[FEATURE_HDR.size :]

    def _get_state(self) -> DeviceState:
        try:
            data = self._feature(FEATURE_GET | FEATURE_MIG_DEVICE_STATE, MIG_STATE.size)
            return DeviceState(MIG_STATE.unpack(data)[0])
        except (OSError, ValueError):
            return DeviceState.ERROR

    # --- FSM ----------------------------------------------------------------------------------

    def _arc(self, cur: DeviceState, nxt: DeviceState) -> None:
        try:
            out = self._feature(FEATURE_SET | FEATURE_MIG_DEVICE_STATE, MIG_STATE.size,
                                MIG_STATE.pack(int(nxt), -1))
        except OSError as exc:
            raise DeviceError(f"{self.name}: SET {nxt.name} from {cur.name}: {_err(exc)}") from None
        data_fd = MIG_STATE.unpack(out)[1]
        if (cur, nxt) in DATA_FD_ARCS:
            if data_fd < 0:
                raise DeviceError(f"{self.name}: {cur.name}->{nxt.name} returned no data_fd")
            self._close_data_fd()
            self._data_fd = data_fd
        elif nxt in (DeviceState.STOP, DeviceState.RUNNING, DeviceState.RUNNING_P2P):
            self._close_data_fd()  # leaving the saving/resuming group ends its stream

    def _state_after_failure(self, cur: DeviceState, nxt: DeviceState) -> DeviceState:
        return self._get_state()

    def _reset(self) -> None:
        self._close_data_fd()
        try:
            self._ops.ioctl(self.fd, VFIO_DEVICE_RESET, 0)
        except OSError as exc:
            raise DeviceError(f"{self.name}: VFIO_DEVICE_RESET: {_err(exc)}") from None

    def _close_data_fd(self) -> None:
        if self._data_fd >= 0:
            with contextlib.suppress(OSError):
                self._ops.close(self._data_fd)
            self._data_fd = -1

    # --- data ---------------------------------------------------------------------------------

    def read_into(self, buf: memoryview) -> int:
        self._require(*SAVING_STATES, op="read")
        try:
            return self._ops.readinto(self._data_fd, buf)
        except OSError as exc:
            if exc.errno in (errno.ENOMSG, errno.EAGAIN) and self._state != DeviceState.STOP_COPY:
                raise NoDataNow(f"{self.name}: no data for now ({_err(exc)})") from None
            raise DeviceError(f"{self.name}: read: {_err(exc)}") from None

    def write(self, data: memoryview) -> int:
        self._require(DeviceState.RESUMING, op="write")
        try:
            return self._ops.write(self._data_fd, data)  # may be short: the caller loops
        except OSError as exc:
            if exc.errno == errno.EFAULT:
                raise IncompatibleDevice(f"{self.name}: the driver rejects the source's "
                                         "state as incompatible (EFAULT)") from None
            raise DeviceError(f"{self.name}: write: {_err(exc)}") from None

    def precopy_info(self) -> PrecopyInfo:
        self._require(*PRECOPY_STATES, op="precopy-info")
        buf = bytearray(PRECOPY_INFO.pack(PRECOPY_INFO.size, 0, 0, 0))
        try:
            self._ops.ioctl(self._data_fd, VFIO_MIG_GET_PRECOPY_INFO, buf)
        except OSError as exc:
            raise DeviceError(f"{self.name}: VFIO_MIG_GET_PRECOPY_INFO: {_err(exc)}") from None
        _, _, initial, dirty = PRECOPY_INFO.unpack(buf)  # output flags are ignored
        return PrecopyInfo(initial, dirty)

    def stop_copy_size(self) -> int:
        try:
            data = self._feature(FEATURE_GET | FEATURE_MIG_DATA_SIZE, MIG_DATA_SIZE.size)
        except OSError as exc:
            raise DeviceError(f"{self.name}: MIG_DATA_SIZE: {_err(exc)}") from None
        return int(MIG_DATA_SIZE.unpack(data)[0])

    # --- identity -----------------------------------------------------------------------------

    def state_size(self) -> int:
        return self._size

    def compat(self) -> dict[str, Any]:
        return {"model": "vfio", "caps": int(self.caps)}

    def check_compat(self, source: Mapping[str, Any]) -> None:
        # The variant driver judges the stream itself (hisi: EFAULT on the first
        # 40 bytes; mlx5: on load).  Here only the kind must match.
        if source.get("model") != "vfio":
            raise IncompatibleDevice(f"source {source.get('model')!r} is not a VFIO device")

    def digest(self) -> str:
        raise DeviceError(f"{self.name}: a real VF's internal state cannot be read back for a "
                          "digest; the stream digest and the driver's own checks verify it")

    def close(self) -> None:
        self._close_data_fd()
        self._close_fds()


REGISTRY.register("vfio", VfioDevice)
