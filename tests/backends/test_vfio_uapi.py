"""migd's VFIO constants and struct layouts against the kernel's own header.

Values newer than the installed ``<linux/vfio.h>`` (Debian 12 ships 6.1, before
PRE_COPY) are checked against the kernel reference instead."""

from __future__ import annotations

import shutil
import struct
import subprocess

from backends import vfio
from backends.states import DeviceState, MigCap

PROGRAM = r"""
#include <stdio.h>
#include <stddef.h>
#include <linux/vfio.h>
#define P(x) printf("%s %lu\n", #x, (unsigned long)(x))
int main(void) {
    P(VFIO_GET_API_VERSION); P(VFIO_SET_IOMMU); P(VFIO_GROUP_SET_CONTAINER);
    P(VFIO_GROUP_GET_DEVICE_FD); P(VFIO_DEVICE_RESET); P(VFIO_DEVICE_FEATURE);
    P(VFIO_TYPE1v2_IOMMU);
    P(VFIO_DEVICE_FEATURE_MASK); P(VFIO_DEVICE_FEATURE_GET); P(VFIO_DEVICE_FEATURE_SET);
    P(VFIO_DEVICE_FEATURE_PROBE); P(VFIO_DEVICE_FEATURE_MIGRATION);
    P(VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE);
    P(VFIO_MIGRATION_STOP_COPY); P(VFIO_MIGRATION_P2P);
    P(VFIO_DEVICE_STATE_ERROR); P(VFIO_DEVICE_STATE_STOP); P(VFIO_DEVICE_STATE_RUNNING);
    P(VFIO_DEVICE_STATE_STOP_COPY); P(VFIO_DEVICE_STATE_RESUMING);
    P(VFIO_DEVICE_STATE_RUNNING_P2P);
    P(sizeof(struct vfio_device_feature)); P(sizeof(struct vfio_device_feature_migration));
    P(sizeof(struct vfio_device_feature_mig_state));
    P(offsetof(struct vfio_device_feature_mig_state, data_fd));
#ifdef VFIO_MIGRATION_PRE_COPY
    P(VFIO_MIGRATION_PRE_COPY); P(VFIO_DEVICE_STATE_PRE_COPY); P(VFIO_DEVICE_STATE_PRE_COPY_P2P);
#endif
#ifdef VFIO_MIG_GET_PRECOPY_INFO
    P(VFIO_MIG_GET_PRECOPY_INFO); P(sizeof(struct vfio_precopy_info));
#endif
#ifdef VFIO_DEVICE_FEATURE_MIG_DATA_SIZE
    P(VFIO_DEVICE_FEATURE_MIG_DATA_SIZE); P(sizeof(struct vfio_device_feature_mig_data_size));
#endif
#ifdef VFIO_DEVICE_BIND_IOMMUFD
    P(VFIO_DEVICE_BIND_IOMMUFD); P(sizeof(struct vfio_device_bind_iommufd));
    P(offsetof(struct vfio_device_bind_iommufd, out_devid));
#endif
#ifdef VFIO_DEVICE_BIND_FLAG_TOKEN
    P(VFIO_DEVICE_BIND_FLAG_TOKEN);
    P(offsetof(struct vfio_device_bind_iommufd, token_uuid_ptr));
#endif
    return 0;
}
"""

OURS = {
    "VFIO_GET_API_VERSION": vfio.VFIO_GET_API_VERSION, "VFIO_SET_IOMMU": vfio.VFIO_SET_IOMMU,
    "VFIO_GROUP_SET_CONTAINER": vfio.VFIO_GROUP_SET_CONTAINER,
    "VFIO_GROUP_GET_DEVICE_FD": vfio.VFIO_GROUP_GET_DEVICE_FD,
    "VFIO_DEVICE_RESET": vfio.VFIO_DEVICE_RESET, "VFIO_DEVICE_FEATURE": vfio.VFIO_DEVICE_FEATURE,
    "VFIO_TYPE1v2_IOMMU": vfio.VFIO_TYPE1v2_IOMMU,
    "VFIO_DEVICE_FEATURE_MASK": vfio.FEATURE_MASK, "VFIO_DEVICE_FEATURE_GET": vfio.FEATURE_GET,
    "VFIO_DEVICE_FEATURE_SET": vfio.FEATURE_SET, "VFIO_DEVICE_FEATURE_PROBE": vfio.FEATURE_PROBE,
    "VFIO_DEVICE_FEATURE_MIGRATION": vfio.FEATURE_MIGRATION,
    "VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE": vfio.FEATURE_MIG_DEVICE_STATE,
    "VFIO_MIGRATION_STOP_COPY": MigCap.STOP_COPY, "VFIO_MIGRATION_P2P": MigCap.P2P,
    **{f"VFIO_DEVICE_STATE_{s.name}": int(s) for s in DeviceState},
    "sizeof(struct vfio_device_feature)": vfio.FEATURE_HDR.size,
    "sizeof(struct vfio_device_feature_migration)": vfio.MIGRATION.size,
    "sizeof(struct vfio_device_feature_mig_state)": vfio.MIG_STATE.size,
    "offsetof(struct vfio_device_feature_mig_state, data_fd)": 4,
    "VFIO_MIGRATION_PRE_COPY": MigCap.PRE_COPY,
    "VFIO_MIG_GET_PRECOPY_INFO": vfio.VFIO_MIG_GET_PRECOPY_INFO,
    "sizeof(struct vfio_precopy_info)": vfio.PRECOPY_INFO.size,
    "VFIO_DEVICE_FEATURE_MIG_DATA_SIZE": vfio.FEATURE_MIG_DATA_SIZE,
    "sizeof(struct vfio_device_feature_mig_data_size)": vfio.MIG_DATA_SIZE.size,
    "VFIO_DEVICE_BIND_IOMMUFD": vfio.VFIO_DEVICE_BIND_IOMMUFD,
    # The struct grows at its end (6.17 added token_uuid_ptr); the kernel takes any
    # argsz from the first version's 16 bytes up, so migd's may differ in size.
    "offsetof(struct vfio_device_bind_iommufd, out_devid)": vfio.BIND_IOMMUFD_MIN - 4,
    "VFIO_DEVICE_BIND_FLAG_TOKEN": vfio.BIND_FLAG_TOKEN,
    "offsetof(struct vfio_device_bind_iommufd, token_uuid_ptr)": vfio.BIND_IOMMUFD_MIN,
}
#: Structs that grow at their end under the minimum-size rule: the header's size is
#: one of the sizes migd knows.
GROWING = {"sizeof(struct vfio_device_bind_iommufd)": (vfio.BIND_IOMMUFD_MIN,
                                                       vfio.BIND_IOMMUFD.size)}

#: From the kernel reference (shared/reference/vfio-migration.md), for values a
#: header older than 6.2 does not have; the bind token from upstream's 6.17 header.
REFERENCE = {
    "VFIO_DEVICE_FEATURE": 0x3B75, "VFIO_DEVICE_RESET": 0x3B6F,
    "VFIO_MIG_GET_PRECOPY_INFO": 0x3B79, "sizeof(struct vfio_precopy_info)": 24,
    "VFIO_DEVICE_FEATURE_MIG_DATA_SIZE": 9, "sizeof(struct vfio_device_feature_mig_data_size)": 8,
    "VFIO_MIGRATION_PRE_COPY": 4, "VFIO_DEVICE_STATE_PRE_COPY": 6,
    "VFIO_DEVICE_STATE_PRE_COPY_P2P": 7, "VFIO_DEVICE_FEATURE_GET": 1 << 16,
    "VFIO_DEVICE_FEATURE_SET": 1 << 17, "VFIO_DEVICE_FEATURE_PROBE": 1 << 18,
    "VFIO_DEVICE_BIND_FLAG_TOKEN": 1,  # 6.17: bind with a VF token
    "offsetof(struct vfio_device_bind_iommufd, token_uuid_ptr)": 16,
}


def header_values(tmp_path: object) -> dict[str, int]:
    import pathlib

    gcc = shutil.which("gcc") or shutil.which("cc")
    header = pathlib.Path("/usr/include/linux/vfio.h")
    assert gcc and header.exists(), (
        "this test compiles against <linux/vfio.h>: install gcc and linux-libc-dev "
        "(scripts/setup does, as root)")
    src = pathlib.Path(str(tmp_path)) / "uapi.c"
    exe = pathlib.Path(str(tmp_path)) / "uapi"
    src.write_text(PROGRAM)
    subprocess.run([gcc, "-o", str(exe), str(src)], check=True, timeout=60)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {line.rsplit(" ", 1)[0]: int(line.rsplit(" ", 1)[1]) for line in out.splitlines()}


def test_constants_match_the_installed_header(tmp_path: object) -> None:
    header = header_values(tmp_path)
    assert len(header) >= 25  # the 6.1 baseline at least
    for name, value in header.items():
        if name in GROWING:
            assert value in GROWING[name], f"{name}: {value}, migd knows {GROWING[name]}"
            continue
        assert OURS[name] == value, f"{name}: migd has {OURS[name]:#x}, the header {value:#x}"


def test_newer_values_match_the_reference(tmp_path: object) -> None:
    header = header_values(tmp_path)
    for name, value in REFERENCE.items():
        assert OURS[name] == value, name
        if name in header:  # a newer header agrees with the reference too
            assert header[name] == value, name
    assert struct.calcsize("<IIQQ") == 24
