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
import ctypes
import errno
import fcntl
import os
import struct
import uuid
from collections.abc import Mapping
from typing import Any, Protocol

from migd.errors import ConfigError, DeviceBusy, DeviceError, IncompatibleDevice, NoDataNow

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
#: struct vfio_device_bind_iommufd {argsz, flags, iommufd, out_devid, token_uuid_ptr}:
#: 6.17 added the token; the kernel takes any argsz from the first 16 bytes up.
BIND_IOMMUFD = struct.Struct("<IIiIQ")
BIND_IOMMUFD_MIN = 16
BIND_FLAG_TOKEN = 1


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


def _bind(ops: Ops, fd: int, iommufd: int, token: uuid.UUID | None) -> None:
    """VFIO_DEVICE_BIND_IOMMUFD: the first version's 16 bytes without a token (any
    kernel with iommufd takes them), 24 with one (6.17 and later), whose pointer
    stays good for the call."""
    if token is None:
        arg = BIND_IOMMUFD.pack(BIND_IOMMUFD_MIN, 0, iommufd, 0, 0)[:BIND_IOMMUFD_MIN]
        ops.ioctl(fd, VFIO_DEVICE_BIND_IOMMUFD, bytearray(arg))
        return
    raw = ctypes.create_string_buffer(token.bytes, 16)
    ops.ioctl(fd, VFIO_DEVICE_BIND_IOMMUFD, bytearray(BIND_IOMMUFD.pack(
        BIND_IOMMUFD.size, BIND_FLAG_TOKEN, iommufd, 0, ctypes.addressof(raw))))


def holders(node: str, proc: str = "/proc") -> list[str]:
    """The processes that hold ``node`` open, as "PID (NAME)", with a QEMU guest's
    name when its command line says it (``-name guest=NAME``)."""
    found: list[str] = []
    if not node:
        return found
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit() and int(p) != os.getpid()]
    except OSError:
        return found
    for pid in pids:
        fd_dir = os.path.join(proc, pid, "fd")
        try:
            held = any(os.readlink(os.path.join(fd_dir, f)) == node for f in os.listdir(fd_dir))
        except OSError:
            continue
        if not held:
            continue
        try:
            with open(os.path.join(proc, pid, "cmdline"), "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            argv = []
        label = os.path.basename(argv[0]) if argv and argv[0] else "?"
        for i, arg in enumerate(argv[:-1]):
            if arg == "-name":
                guest = argv[i + 1].split(",")[0].removeprefix("guest=")
                label += f", guest {guest}"
        found.append(f"{pid} ({label})")
    return found


def _open_error(exc: OSError, node: str, token: uuid.UUID | None, ops: object) -> str:
    """Why a VF would not open, and what to do about it."""
    code = exc.errno
    what = _err(exc)
    if code == errno.EACCES and token is None:
        return (f"{what}: its PF is bound to vfio-pci, which guards its VFs with a VF "
                "token: give vf-token=UUID (the one the PF's owner set)")
    if code == errno.EACCES:
        return f"{what}: the PF's owner set another VF token than vf-token={token}"
    if code == errno.EINVAL and token is not None:
        return (f"{what}: the kernel refused the VF token (its PF is not bound to vfio-pci, "
                "or the kernel is older than 6.17, which binds iommufd with a token)")
    if code in (errno.EBUSY, errno.EINVAL):
        who = holders(node) if isinstance(ops, LinuxOps) else []
        held = f"held by {', '.join(who)}" if who else "it is in use by another process"
        return (f"{what}: {held}. A VF that QEMU holds opens only once: use fd=N, the "
                "device fd the VMM holds, handed to migd as a descriptor it inherits")
    return what


class VfioDevice(Device):
    kind = "vfio"
    blocking_io = True

    def __init__(self, name: str, options: Mapping[str, str], ops: Ops | None = None) -> None:
        known = {"path", "group", "address", "fd", "iommufd", "vf-token"}
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
        token: uuid.UUID | None = None
        if "vf-token" in options:
            try:
                token = uuid.UUID(options["vf-token"])
            except ValueError:
                raise ConfigError(f"device {name}: vf-token {options['vf-token']!r} is not "
                                  "a UUID") from None
        node = options.get("path") or options.get("group") or ""
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
                _bind(ops, fd, iommufd, token)
                return fd
            if "group" in options and "address" in options:  # legacy group + container
                container = ops.open("/dev/vfio/vfio", os.O_RDWR | os.O_CLOEXEC)
                self._fds.append(container)
                group = ops.open(options["group"], os.O_RDWR | os.O_CLOEXEC)
                self._fds.append(group)
                ops.ioctl(group, VFIO_GROUP_SET_CONTAINER, bytearray(struct.pack("<i", container)))
                ops.ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)
                # A VF whose PF is bound to vfio-pci opens only with the PF's VF token.
                device = options["address"] + (f" vf_token={token}" if token else "")
                fd = ops.ioctl(group, VFIO_GROUP_GET_DEVICE_FD,
                               bytearray(device.encode() + b"\0"))
                self._fds.append(fd)
                return fd
        except (OSError, ValueError) as exc:
            self._close_fds()
            if isinstance(exc, OSError):
                raise ConfigError(f"device {name}: cannot open {node or 'it'}: "
                                  f"{_open_error(exc, node, token, ops)}") from None
            raise ConfigError(f"device {name}: cannot open: {exc}") from None
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
            # EBUSY: the device would not stop now (hisi: its queues did not pause);
            # it still runs, and a later attempt may succeed.
            cls = DeviceBusy if exc.errno == errno.EBUSY else DeviceError
            raise cls(f"{self.name}: SET {nxt.name} from {cur.name}: {_err(exc)} "
                      f"({os.strerror(exc.errno or 0).lower()})") from None
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
