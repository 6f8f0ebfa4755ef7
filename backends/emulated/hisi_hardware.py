"""The emulated hardware of a HiSilicon-style accelerator VF (what ``backends.hisi``
drives): its BAR2 as a mapped file, the guest's half of it, and a queue manager
with a mailbox, interrupt-status registers and queues that change registers
while they run.

The guest sees half of BAR2 (the driver reports half its size): an access that
starts in its half is clipped at the end of it, one that starts in the
migration half is refused, and so is a mapping that reaches it.  The migration
half holds the mailbox, four interrupt-status registers and ``struct
acc_vf_data``.
"""

from __future__ import annotations

import mmap
import os
import random
import tempfile

from ..memory import Ticker

BAR2_SIZE = 64 << 10
MIG_BASE = BAR2_SIZE // 2  # the migration half
MAILBOX, MB_STATUS, VF_DATA = 0x0, 0x4, 0x100
#: The registers a pause must find clear, in the driver's order (QM_ABNORMAL_INT_STATUS,
#: QM_IFC_INT_STATUS, QM_IFC_INT_SET_V, the accelerator core's INT_STATUS).
INT_STATUS = {"abnormal-int-status": 0x8, "ifc-int-status": 0xC, "ifc-int-set": 0x10,
              "core-int-status": 0x14}
DOORBELL_STRIDE = 0x100
MB_PAUSE_QM = 0xE  # QM_MB_CMD_PAUSE_QM; the driver has no command to resume
MB_STATUS_BAD_CMD = 0x200
POLL_TRIES, POLL_INTERVAL = 100, 100e-6
#: Where struct acc_vf_data starts in the migration half, and its match data's size.
MATCH_SIZE = 40


class Bar2:
    """The VF's BAR2 as the host driver maps it: both halves."""

    def __init__(self, directory: str | None) -> None:
        fd, path = tempfile.mkstemp(prefix="migd-hisi-bar2-", dir=directory)
        os.unlink(path)
        os.ftruncate(fd, BAR2_SIZE)
        self.map = mmap.mmap(fd, BAR2_SIZE, flags=mmap.MAP_SHARED)
        os.close(fd)
        self.mv = memoryview(self.map)

    def u32(self, off: int) -> int:
        return int.from_bytes(self.mv[off : off + 4], "little")

    def set_u32(self, off: int, value: int) -> None:
        self.mv[off : off + 4] = value.to_bytes(4, "little")

    def close(self) -> None:
        self.mv.release()
        self.map.close()


class GuestBar2:
    """The guest's view of BAR2: told it is half its size.  As the driver does it, an
    access that starts in the guest's half is clipped at its end; one that starts in
    the migration half is refused (EINVAL), and so is a mapping that reaches it."""

    def __init__(self, bar: Bar2) -> None:
        self._bar = bar
        self.size = MIG_BASE

    def _clip(self, off: int, n: int) -> int:
        if off < 0 or n < 0 or off >= self.size:
            raise PermissionError(f"BAR2 access at {off:#x} is beyond the guest's "
                                  f"{self.size:#x}-byte BAR (EINVAL)")
        return min(n, self.size - off)

    def read(self, off: int, n: int) -> bytes:
        n = self._clip(off, n)
        return bytes(self._bar.mv[off : off + n])

    def write(self, off: int, data: bytes) -> int:
        n = self._clip(off, len(data))
        self._bar.mv[off : off + n] = data[:n]
        return n

    def mmap(self, off: int, n: int) -> memoryview:
        if off < 0 or n < 0 or off + n > self.size:
            raise PermissionError(f"BAR2 mapping [{off:#x}, +{n}) is beyond the guest's "
                                  f"{self.size:#x}-byte BAR (EINVAL)")
        return self._bar.mv[off : off + n]


class QueueManager:
    """The hardware side: queues that change registers while running; a mailbox."""

    def __init__(self, bar: Bar2, name: str, seed: int, stuck: bool, traffic: bool) -> None:
        self._bar = bar
        self._stuck = stuck
        self._traffic = traffic
        self._rng = random.Random(seed)
        self._ticker = Ticker(f"qm-{name}", 0.002, self._tick)
        self.paused = False
        self.polls = 0

    def start(self) -> None:
        self.paused = False
        if self._traffic:
            self._ticker.start()

    def stop(self) -> None:
        self._ticker.stop()

    def _tick(self) -> None:
        """Queue traffic: event-queue context words advance while the VF runs."""
        bar = self._bar
        base = MIG_BASE + VF_DATA + MATCH_SIZE + 6 * 4  # qm_eqc_dw[0]
        for i in range(2):
            off = base + 4 * i
            bar.set_u32(off, (bar.u32(off) + self._rng.randrange(1, 9)) & 0xFFFFFFFF)

    def mailbox(self, cmd: int) -> None:
        bar = self._bar
        if cmd != MB_PAUSE_QM:
            bar.set_u32(MIG_BASE + MB_STATUS, MB_STATUS_BAD_CMD)
            return
        self.stop()
        self.paused = True
        # Outstanding interrupts drain over a few polls, unless the hardware is wedged
        # (then the accelerator core's status never clears).
        for i, off in enumerate(INT_STATUS.values()):
            bar.set_u32(MIG_BASE + off, 0xFFFFFFFF if self._stuck and i == 3 else 2)
        bar.set_u32(MIG_BASE + MB_STATUS, 0)

    def poll(self, register: str) -> int:
        bar = self._bar
        self.polls += 1
        off = MIG_BASE + INT_STATUS[register]
        status = bar.u32(off)
        if status and status != 0xFFFFFFFF:
            bar.set_u32(off, status - 1)
        return status
