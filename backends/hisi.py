"""``hisi``: a HiSilicon-style accelerator VF whose state is a page of registers.

The VF's BAR2 (emulated apart, in :mod:`backends.emulated.hisi_hardware`): its
first half is what the guest sees (queue doorbells); the second half is the
migration register page, hidden from the guest: a mailbox, interrupt-status
registers, and ``struct acc_vf_data`` (176 bytes, little-endian), whose first 40
bytes are the match data a target checks before loading anything.  This module
is the driver (hisi_acc_vfio_pci).

Driver behaviour reproduced (hisi_acc_vfio_pci.c): stopping is a "pause QM"
mailbox command followed by polling four interrupt-status registers (each read,
then up to 100 more reads 100 us apart; any still set is EBUSY, and the device
stays RUNNING, its queues paused: the driver undoes nothing).  There is no
"resume QM" command: STOP->RUNNING rings every queue's doorbell, and only when
the driver's QM state is READY, which a save or a load sets.  PRE_COPY offers
only the 40 match bytes (dirty bytes are always 0) and a read with nothing left
returns 0 bytes; STOP_COPY offers the full 176 (only 40 if the queue manager is
not ready).  The target checks the match data as soon as 40 bytes arrive (EFAULT
on mismatch), so an incompatible target fails during pre-copy, before the source
stops; it accepts the V2 layout with major version 1 and the V1 layout (whose
event-queue DMA addresses it derives again from the context words).
RESUMING->STOP with exactly the 40 match bytes succeeds and loads nothing.
"""

from __future__ import annotations

import hashlib
import os
import random
import struct
import time
from collections.abc import Mapping
from typing import Any

from migd.errors import ConfigError, DeviceBusy, DeviceError, IncompatibleDevice

from .base import REGISTRY, Device, PrecopyInfo
from .emulated.hisi_hardware import (
    DOORBELL_STRIDE,
    INT_STATUS,
    MB_PAUSE_QM,
    MIG_BASE,
    VF_DATA,
    Bar2,
    GuestBar2,
    QueueManager,
)
from .states import DeviceState, MigCap

MAGIC_V2 = 0xAACCFEEDDECADEDE
MAGIC_V1 = 0xCDCDCDCDFEEDAACC
MAJOR, MINOR = 1, 0
QM_NOT_READY, QM_READY = 0, 1

#: struct acc_vf_data: 40 bytes of match data, registers, four DMA addresses.
MATCH = struct.Struct("<QIIIIIHH8x")
REGS = struct.Struct("<6I7I7I5I4x")
DMA = struct.Struct("<4Q")
MATCH_SIZE = MATCH.size
STATE_SIZE = MATCH.size + REGS.size + DMA.size
assert (MATCH_SIZE, STATE_SIZE, MATCH.size + REGS.size) == (40, 176, 144)


POLL_TRIES, POLL_INTERVAL = 100, 100e-6
#: struct acc_vf_data: where the event-queue contexts' address words are (DMA
#: addresses of a V1 image are derived from them: high word 2, low word 1).
EQC_DW, AEQC_DW = MATCH_SIZE + 6 * 4, MATCH_SIZE + 13 * 4


class HisiDevice(Device):
    kind = "hisi"
    blocking_io = False

    def __init__(self, name: str, options: Mapping[str, str]) -> None:
        known = {"dev-id", "qp-num", "qp-base", "que-iso-cfg", "qm-ready", "stuck", "magic",
                 "major", "dir", "seed", "traffic"}
        unknown = set(options) - known
        if unknown:
            raise ConfigError(f"device {name}: unknown hisi option(s) {', '.join(sorted(unknown))};"
                              f" known: {', '.join(sorted(known))}")
        super().__init__(name, MigCap.STOP_COPY | MigCap.PRE_COPY)
        try:
            self.dev_id = int(options.get("dev-id", "0xa255"), 0)
            self.qp_num = int(options.get("qp-num", "4"), 0)
            qp_base = int(options.get("qp-base", "0"), 0)
            que_iso_cfg = int(options.get("que-iso-cfg", "1"), 0)
            magic = int(options.get("magic", hex(MAGIC_V2)), 0)
            major = int(options.get("major", str(MAJOR)), 0)
            seed = int(options.get("seed", "7"), 0)
        except ValueError as exc:
            raise ConfigError(f"device {name}: {exc}") from None
        if not 1 <= self.qp_num <= (MIG_BASE // DOORBELL_STRIDE):
            raise ConfigError(f"device {name}: qp-num must be 1..{MIG_BASE // DOORBELL_STRIDE}")
        self.qm_ready = options.get("qm-ready", "yes") == "yes"
        self._magic, self._major = magic, major
        self.bar = Bar2(options.get("dir") or ("/dev/shm" if os.path.isdir("/dev/shm") else None))
        self._qm = QueueManager(self.bar, name, self.dev_id, options.get("stuck", "no") == "yes",
                                options.get("traffic", "no") == "yes")
        rng = random.Random(seed)
        MATCH.pack_into(self.bar.mv, MIG_BASE + VF_DATA, magic, self.qp_num, self.dev_id,
                        que_iso_cfg, qp_base, QM_READY if self.qm_ready else QM_NOT_READY,
                        major, MINOR)
        REGS.pack_into(self.bar.mv, MIG_BASE + VF_DATA + MATCH_SIZE,
                       *(rng.getrandbits(32) for _ in range(25)))
        DMA.pack_into(self.bar.mv, MIG_BASE + VF_DATA + MATCH_SIZE + REGS.size,
                      *((0xFF00 << 32 | rng.getrandbits(30) << 12) for _ in range(4)))
        self._out = b""
        self._out_pos = 0
        self._rx = bytearray()
        self._loading = False
        self.loads_committed = 0
        self.doorbells_rung = 0
        #: The driver's own idea of the QM (hisi_acc_vdev->vf_qm_state): not ready
        #: until a save or a load says otherwise.
        self.driver_qm_ready = False
        self._qm.start()

    def guest(self) -> GuestBar2:
        return GuestBar2(self.bar)

    def _vf_data(self) -> bytes:
        return bytes(self.bar.mv[MIG_BASE + VF_DATA : MIG_BASE + VF_DATA + STATE_SIZE])

    # --- FSM arcs ------------------------------------------------------------------

    def _arc(self, cur: DeviceState, nxt: DeviceState) -> None:
        S = DeviceState
        if (cur, nxt) == (S.RUNNING, S.STOP) or (cur, nxt) == (S.PRE_COPY, S.STOP_COPY):
            self._pause()
        if (cur, nxt) == (S.RUNNING, S.PRE_COPY):
            self._out, self._out_pos = self._vf_data()[:MATCH_SIZE], 0
        elif (cur, nxt) == (S.PRE_COPY, S.STOP_COPY):
            self._out = self._save() if self.qm_ready else self._out[:MATCH_SIZE]
            self.driver_qm_ready = self.qm_ready
        elif (cur, nxt) == (S.STOP, S.STOP_COPY):
            data = self._save()
            self._out, self._out_pos = (data if self.qm_ready else data[:MATCH_SIZE]), 0
            self.driver_qm_ready = self.qm_ready
        elif cur in (S.PRE_COPY, S.STOP_COPY) and nxt in (S.RUNNING, S.STOP):
            self._out, self._out_pos = b"", 0
        elif (cur, nxt) == (S.STOP, S.RESUMING):
            self._rx.clear()
            self._loading = True
        elif (cur, nxt) == (S.RESUMING, S.STOP):
            self._load()
        if nxt == S.RUNNING and cur in (S.STOP, S.PRE_COPY):
            if cur == S.STOP:
                self._start()
            self._loading = False

    def _save(self) -> bytes:
        """The state as this host's driver saves it: its magic and version in the match
        data (``magic``/``major`` make an older or newer kernel's), the rest as is."""
        data = bytearray(self._vf_data())
        fields = list(MATCH.unpack_from(data))
        fields[0], fields[6], fields[7] = self._magic, self._major, MINOR
        MATCH.pack_into(data, 0, *fields)
        return bytes(data)

    def _load(self) -> None:
        """RESUMING->STOP (vf_qm_load_data): exactly the match data loads nothing."""
        n = len(self._rx)
        if n == MATCH_SIZE:
            self.loads_committed += 1
            return
        if n < STATE_SIZE:
            raise DeviceError(f"{self.name}: EINVAL, loaded {n} of {STATE_SIZE} bytes")
        data = bytearray(self._rx)
        if MATCH.unpack_from(data)[0] == MAGIC_V1:
            # The V1 layout's DMA addresses are derived again from the context words.
            eqc = struct.unpack_from("<7I", data, EQC_DW)
            aeqc = struct.unpack_from("<7I", data, AEQC_DW)
            struct.pack_into("<QQ", data, MATCH_SIZE + REGS.size,
                             eqc[2] << 32 | eqc[1], aeqc[2] << 32 | aeqc[1])
        if 0 in DMA.unpack_from(data, MATCH_SIZE + REGS.size):
            # "resume dma addr is NULL": nothing is loaded, the QM is not ready.
            self.driver_qm_ready = False
            self.loads_committed += 1
            return
        base = MIG_BASE + VF_DATA
        self.bar.mv[base : base + STATE_SIZE] = data
        self.driver_qm_ready = True
        self.loads_committed += 1

    def _pause(self) -> None:
        """vf_qm_func_stop + hisi_acc_check_int_state: any register still set is EBUSY,
        and the device stays RUNNING with its queues paused (nothing undoes the pause)."""
        self._qm.mailbox(MB_PAUSE_QM)
        for register in INT_STATUS:
            if not self._qm.poll(register):
                continue
            for _ in range(POLL_TRIES):
                time.sleep(POLL_INTERVAL)
                if not self._qm.poll(register):
                    break
            else:
                raise DeviceBusy(f"{self.name}: EBUSY, queue manager did not quiesce after "
                                 f"pause ({register} still set after {POLL_TRIES + 1} reads)")

    def _start(self) -> None:
        """hisi_acc_vf_start_device: nothing unless the driver holds the QM ready; then
        every queue's doorbell is rung, which sets the queues going again."""
        if not self.driver_qm_ready:
            return
        for q in range(self.qp_num):
            self.bar.set_u32(q * DOORBELL_STRIDE, 1)  # ring the doorbell
            self.doorbells_rung += 1
        self._qm.start()

    def _reset(self) -> None:
        self._out, self._out_pos = b"", 0
        self._rx.clear()
        if self._loading:
            base = MIG_BASE + VF_DATA + MATCH_SIZE
            self.bar.mv[base : base + STATE_SIZE - MATCH_SIZE] = bytes(STATE_SIZE - MATCH_SIZE)
            self._loading = False
        for off in INT_STATUS.values():
            self.bar.set_u32(MIG_BASE + off, 0)
        self.driver_qm_ready = False
        self._qm.start()  # a function reset: the guest's driver sets its queues up again

    # --- data ------------------------------------------------------------------------

    def read_into(self, buf: memoryview) -> int:
        with self._lock:
            self._require(DeviceState.PRE_COPY, DeviceState.STOP_COPY, op="read")
            k = min(len(buf), len(self._out) - self._out_pos)
            buf[:k] = self._out[self._out_pos : self._out_pos + k]
            self._out_pos += k
            return k  # 0 in PRE_COPY means "nothing for now": the hisi quirk

    def precopy_info(self) -> PrecopyInfo:
        with self._lock:
            self._require(DeviceState.PRE_COPY, op="precopy-info")
            return PrecopyInfo(max(0, MATCH_SIZE - self._out_pos), 0)

    def stop_copy_size(self) -> int:
        return STATE_SIZE

    def write(self, data: memoryview) -> int:
        with self._lock:
            self._require(DeviceState.RESUMING, op="write")
            if len(self._rx) + len(data) > STATE_SIZE:
                raise DeviceError(f"{self.name}: more than {STATE_SIZE} bytes of state")
            had = len(self._rx)
            self._rx += data
            if had < MATCH_SIZE <= len(self._rx):
                self._match(bytes(self._rx[:MATCH_SIZE]))
            return len(data)

    def _match(self, data: bytes) -> None:
        magic, qp_num, dev_id, que_iso_cfg, _, _, major, _ = MATCH.unpack(data)
        mine = MATCH.unpack(self._vf_data()[:MATCH_SIZE])
        problems = []
        if magic not in (MAGIC_V1, MAGIC_V2):
            problems.append(f"magic {magic:#x}")
        elif magic == MAGIC_V2 and major != MAJOR:  # V1 has no version fields
            problems.append(f"major version {major}")
        if dev_id != mine[2]:
            problems.append(f"dev_id {dev_id:#x} (this VF {mine[2]:#x})")
        if qp_num != mine[1]:
            problems.append(f"qp_num {qp_num} (this VF {mine[1]})")
        if que_iso_cfg != mine[3]:
            problems.append(f"que_iso_cfg {que_iso_cfg} (this VF {mine[3]})")
        if problems:
            raise IncompatibleDevice(f"{self.name}: EFAULT, match data differs: "
                                     + ", ".join(problems))

    # --- identity --------------------------------------------------------------------

    def state_size(self) -> int:
        return STATE_SIZE

    def compat(self) -> dict[str, Any]:
        return {"model": "hisi-acc-vf", "dev_id": self.dev_id, "qp_num": self.qp_num}

    def check_compat(self, source: Mapping[str, Any]) -> None:
        # The authoritative check is the driver's, on the first 40 bytes of the stream.
        if source.get("model") != "hisi-acc-vf":
            raise IncompatibleDevice(f"source model {source.get('model')!r} is not a hisi VF")

    def digest(self) -> str:
        return hashlib.sha256(self._vf_data()).hexdigest()

    def close(self) -> None:
        self._qm.stop()
        self.bar.close()

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(model="hisi-acc-vf", dev_id=self.dev_id, loads_committed=self.loads_committed,
                 loading=self._loading, doorbells_rung=self.doorbells_rung,
                 queues="paused" if self._qm.paused else "running")
        return d


REGISTRY.register("hisi", HisiDevice)
