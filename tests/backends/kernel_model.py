"""A model of the kernel's VFIO migration uAPI, in front of an emulated device.

It answers the system calls :class:`backends.vfio.VfioDevice` makes, the way
``drivers/vfio/vfio_main.c`` plus a variant driver would:

* a SET walks the whole path to the target before returning (one arc at a time
  on the device behind it) and returns a data fd only on the four data arcs;
  ERROR or an unsupported target is EINVAL; a SET can be made to fail midway
  (EIO), leaving the device wherever the walk stopped;
* reads: ``mlx5`` quirks turn "nothing queued" into ENOMSG, ``hisi`` quirks
  return 0 bytes; both only in PRE_COPY states;
* writes are short (at most ``max_write`` bytes a call); an incompatible stream
  is EFAULT, any other load failure EINVAL;
* PRECOPY_INFO works only in PRE_COPY states (EINVAL otherwise) and echoes the
  input flags back; MIGRATION on a device without migration support is ENOTTY;
* opening (device_cdev.c, group.c, vfio_pci_core.c): BIND_IOMMUFD takes any argsz
  from 16 bytes up (a 24-byte one may carry a VF token), GROUP_GET_DEVICE_FD takes
  "ADDRESS vf_token=UUID"; a VF whose PF set a token needs it (EACCES); a device
  another process holds cannot be bound (EINVAL) nor its group opened (EBUSY).
"""

from __future__ import annotations

import ctypes
import errno
import uuid

from backends import vfio
from backends.base import Device
from backends.states import DATA_FD_ARCS, PRECOPY_STATES, DeviceState, path
from migd.errors import DeviceBusy, DeviceError, IllegalTransition, IncompatibleDevice, NoDataNow

DEVICE_FD = 10
IOMMU_FD = 11
CONTAINER_FD = 12
GROUP_FD = 13
GROUP = "/dev/vfio/7"
ADDRESS = "0000:3b:00.2"


class KernelModel:
    def __init__(self, device: Device | None, quirks: str, max_write: int = 100_000) -> None:
        self.dev = device
        self.quirks = quirks
        self.max_write = max_write
        self.data_fd = -1
        self._next_fd = 100
        #: (current, next) arc at which the next SET fails with EIO, once.
        self.fail_arc: tuple[DeviceState, DeviceState] | None = None
        self.calls: list[str] = []
        #: What PRECOPY_INFO writes into the output flags (None: echo the input).
        self.flags_out: int | None = None
        self.open_fds: set[int] = set()
        #: The VF token its PF's owner set (the VF then opens only with it).
        self.vf_token: uuid.UUID | None = None
        #: Another process (QEMU) has the device open already.
        self.held = False
        self.bound_with: tuple[int, uuid.UUID | None] | None = None

    def _oserror(self, code: int) -> OSError:
        return OSError(code, errno.errorcode[code])

    # --- Ops -------------------------------------------------------------------------

    def open(self, path_: str, flags: int) -> int:
        self.calls.append(f"open {path_}")
        fd = {"/dev/vfio/devices/vfio0": DEVICE_FD, "/dev/iommu": IOMMU_FD,
              "/dev/vfio/vfio": CONTAINER_FD, GROUP: GROUP_FD}.get(path_)
        if fd is None:
            raise self._oserror(errno.ENOENT)
        if fd == GROUP_FD and self.held:
            raise self._oserror(errno.EBUSY)  # one opener per group
        self.open_fds.add(fd)
        return fd

    def close(self, fd: int) -> None:
        self.open_fds.discard(fd)
        if fd == self.data_fd:
            self.data_fd = -1

    def ioctl(self, fd: int, request: int, arg: bytearray | int) -> int:
        if request == vfio.VFIO_DEVICE_BIND_IOMMUFD and fd == DEVICE_FD:
            assert isinstance(arg, bytearray)
            return self._bind(arg)
        if request in (vfio.VFIO_GROUP_SET_CONTAINER, vfio.VFIO_SET_IOMMU):
            return 0
        if request == vfio.VFIO_GROUP_GET_DEVICE_FD and fd == GROUP_FD:
            assert isinstance(arg, bytearray)
            name, _, option = bytes(arg).rstrip(b"\0").decode().partition(" ")
            if name != ADDRESS:
                raise self._oserror(errno.ENODEV)
            token = None
            if option:
                if not option.startswith("vf_token="):
                    raise self._oserror(errno.EINVAL)
                token = uuid.UUID(option.removeprefix("vf_token="))
            self._check_token(token)
            self.open_fds.add(DEVICE_FD)
            return DEVICE_FD
        if request == vfio.VFIO_DEVICE_RESET and fd == DEVICE_FD:
            self.calls.append("reset")
            assert self.dev is not None
            self.dev.reset()
            self.data_fd = -1
            return 0
        if request == vfio.VFIO_MIG_GET_PRECOPY_INFO:
            assert isinstance(arg, bytearray)
            return self._precopy_info(fd, arg)
        if request == vfio.VFIO_DEVICE_FEATURE and fd == DEVICE_FD:
            assert isinstance(arg, bytearray)
            return self._feature(arg)
        raise self._oserror(errno.ENOTTY)

    def _bind(self, buf: bytearray) -> int:
        argsz = int.from_bytes(buf[:4], "little")
        if argsz < vfio.BIND_IOMMUFD_MIN or argsz != len(buf):
            raise self._oserror(errno.EINVAL)
        flags, iommufd = int.from_bytes(buf[4:8], "little"), int.from_bytes(buf[8:12], "little")
        if any(buf[vfio.BIND_IOMMUFD.size :]) or flags & ~vfio.BIND_FLAG_TOKEN:
            raise self._oserror(errno.EINVAL)
        if self.held:
            raise self._oserror(errno.EINVAL)  # open_count != 0 and not the group path
        token = None
        if flags & vfio.BIND_FLAG_TOKEN:
            if argsz < vfio.BIND_IOMMUFD.size:
                raise self._oserror(errno.EINVAL)
            ptr = int.from_bytes(buf[16:24], "little")
            token = uuid.UUID(bytes=ctypes.string_at(ptr, 16))  # copy_from_user
        self._check_token(token)
        self.bound_with = (iommufd, token)
        return 0

    def _check_token(self, token: uuid.UUID | None) -> None:
        if self.vf_token is None:
            if token is not None:
                raise self._oserror(errno.EINVAL)  # "PF not bound to vfio-pci"
        elif token != self.vf_token:
            raise self._oserror(errno.EACCES)  # "VF token required" / "Incorrect VF token"

    def _feature(self, buf: bytearray) -> int:
        argsz, flags = vfio.FEATURE_HDR.unpack_from(buf)
        if argsz != len(buf):
            raise self._oserror(errno.EINVAL)
        feature = flags & vfio.FEATURE_MASK
        data = memoryview(buf)[vfio.FEATURE_HDR.size :]
        if self.dev is None:
            raise self._oserror(errno.ENOTTY)
        dev = self.dev
        if feature == vfio.FEATURE_MIGRATION and flags & vfio.FEATURE_GET:
            vfio.MIGRATION.pack_into(data, 0, int(dev.caps))
        elif feature == vfio.FEATURE_MIG_DATA_SIZE and flags & vfio.FEATURE_GET:
            vfio.MIG_DATA_SIZE.pack_into(data, 0, dev.stop_copy_size())
        elif feature == vfio.FEATURE_MIG_DEVICE_STATE and flags & vfio.FEATURE_GET:
            vfio.MIG_STATE.pack_into(data, 0, int(dev.state), -1)
        elif feature == vfio.FEATURE_MIG_DEVICE_STATE and flags & vfio.FEATURE_SET:
            target = DeviceState(vfio.MIG_STATE.unpack_from(data)[0])
            self.calls.append(f"set {target.name}")
            new_fd = self._set(dev, target)
            vfio.MIG_STATE.pack_into(data, 0, int(dev.state), new_fd)
        else:
            raise self._oserror(errno.ENOTTY)
        return 0

    def _set(self, dev: Device, target: DeviceState) -> int:
        try:
            steps = path(dev.state, target, dev.caps)
        except IllegalTransition:
            raise self._oserror(errno.EINVAL) from None
        new_fd = -1
        for nxt in steps:
            cur = dev.state
            if self.fail_arc == (cur, nxt):
                self.fail_arc = None
                raise self._oserror(errno.EIO)  # the device stays at ``cur``
            try:
                dev.set_state(nxt)
            except DeviceBusy:
                raise self._oserror(errno.EBUSY) from None  # hisi: the QM would not pause
            except DeviceError:
                raise self._oserror(errno.EIO) from None
            if (cur, nxt) in DATA_FD_ARCS:
                self._next_fd += 1
                new_fd = self.data_fd = self._next_fd
                self.open_fds.add(new_fd)
        return new_fd

    def _precopy_info(self, fd: int, buf: bytearray) -> int:
        assert self.dev is not None
        argsz, flags, _, _ = vfio.PRECOPY_INFO.unpack(buf)
        if fd != self.data_fd or argsz < vfio.PRECOPY_INFO.size:
            raise self._oserror(errno.EINVAL)
        if self.dev.state not in PRECOPY_STATES:
            raise self._oserror(errno.EINVAL)
        info = self.dev.precopy_info()
        out = flags if self.flags_out is None else self.flags_out
        vfio.PRECOPY_INFO.pack_into(buf, 0, argsz, out, info.initial_bytes, info.dirty_bytes)
        return 0

    def readinto(self, fd: int, buf: memoryview) -> int:
        assert self.dev is not None
        if fd != self.data_fd:
            raise self._oserror(errno.EBADF)
        try:
            return self.dev.read_into(buf)
        except NoDataNow:
            if self.quirks == "mlx5":
                raise self._oserror(errno.ENOMSG) from None
            return 0
        except DeviceError:
            raise self._oserror(errno.ENODEV) from None

    def write(self, fd: int, data: memoryview) -> int:
        assert self.dev is not None
        if fd != self.data_fd:
            raise self._oserror(errno.EBADF)
        part = data[: self.max_write]
        try:
            return self.dev.write(part)
        except IncompatibleDevice:
            raise self._oserror(errno.EFAULT) from None
        except DeviceError:
            raise self._oserror(errno.EINVAL) from None
