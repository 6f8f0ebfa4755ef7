"""The kernel's VFIO migration state machine (uAPI v2), as data.

Values and flags are the ones in ``include/uapi/linux/vfio.h``.  The next-step
table is the kernel's ``vfio_mig_get_next_state()`` table, shipped as
``vfio_fsm.json``; :func:`next_step` and :func:`path` reproduce its algorithm,
including the skipping of states a device lacks, so every backend walks exactly
the arcs a real variant driver would see.
"""

from __future__ import annotations

import enum
import json
from functools import cache
from importlib import resources

from migd.errors import IllegalTransition


class DeviceState(enum.IntEnum):
    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7


class MigCap(enum.IntFlag):
    """``VFIO_MIGRATION_*`` flags reported by the MIGRATION feature."""

    STOP_COPY = 1
    P2P = 2
    PRE_COPY = 4


#: The four capability sets the kernel accepts.
VALID_CAPS: tuple[MigCap, ...] = (
    MigCap.STOP_COPY,
    MigCap.STOP_COPY | MigCap.P2P,
    MigCap.STOP_COPY | MigCap.PRE_COPY,
    MigCap.STOP_COPY | MigCap.P2P | MigCap.PRE_COPY,
)

#: States that produce a saving data_fd.
SAVING_STATES = frozenset({DeviceState.PRE_COPY, DeviceState.PRE_COPY_P2P, DeviceState.STOP_COPY})

#: States in which pre-copy info may be asked for.
PRECOPY_STATES = frozenset({DeviceState.PRE_COPY, DeviceState.PRE_COPY_P2P})

#: Arcs on which the kernel hands out a new data_fd.
DATA_FD_ARCS = frozenset(
    {
        (DeviceState.RUNNING, DeviceState.PRE_COPY),
        (DeviceState.RUNNING_P2P, DeviceState.PRE_COPY_P2P),
        (DeviceState.STOP, DeviceState.STOP_COPY),
        (DeviceState.STOP, DeviceState.RESUMING),
    }
)

#: States in which the guest's workload may change device state.
RUNNING_STATES = frozenset({DeviceState.RUNNING, DeviceState.PRE_COPY})


@cache
def table() -> dict[DeviceState, dict[DeviceState, DeviceState]]:
    raw = json.loads(resources.files("backends").joinpath("vfio_fsm.json").read_text())
    return {
        DeviceState[cur]: {DeviceState[tgt]: DeviceState[nxt] for tgt, nxt in row.items()}
        for cur, row in raw.items()
    }


def supported(state: DeviceState, caps: MigCap) -> bool:
    """Whether a device with ``caps`` has ``state`` (kernel: vfio_mig_state_supported)."""
    if state in (DeviceState.RUNNING_P2P,):
        return bool(caps & MigCap.P2P)
    if state == DeviceState.PRE_COPY:
        return bool(caps & MigCap.PRE_COPY)
    if state == DeviceState.PRE_COPY_P2P:
        return bool(caps & MigCap.PRE_COPY) and bool(caps & MigCap.P2P)
    return True


def check_caps(caps: MigCap) -> None:
    if caps not in VALID_CAPS:
        raise IllegalTransition("device", "-", f"caps={int(caps)}", "invalid capability set")


def next_step(cur: DeviceState, target: DeviceState, caps: MigCap) -> DeviceState:
    """One arc towards ``target``, skipping states the device does not support."""
    if target == DeviceState.ERROR or not supported(target, caps):
        raise IllegalTransition("device", cur.name, f"set {target.name}", "target not valid")
    if cur == DeviceState.STOP_COPY and target in (
        DeviceState.PRE_COPY,
        DeviceState.PRE_COPY_P2P,
    ):
        # The table says ERROR; unpatched kernels spin forever in the skip loop.
        raise IllegalTransition("device", cur.name, f"set {target.name}", "pre-copy after stop-copy")
    nxt = table()[cur][target]
    while not supported(nxt, caps):
        nxt = table()[nxt][target]
    if nxt == DeviceState.ERROR:
        raise IllegalTransition("device", cur.name, f"set {target.name}", "no arc")
    return nxt


def path(cur: DeviceState, target: DeviceState, caps: MigCap) -> list[DeviceState]:
    """Every state the device passes through from ``cur`` to ``target`` (exclusive of cur)."""
    check_caps(caps)
    steps: list[DeviceState] = []
    while cur != target:
        cur = next_step(cur, target, caps)
        steps.append(cur)
        if len(steps) > len(DeviceState):
            raise IllegalTransition("device", steps[0].name, f"set {target.name}", "loop")
    return steps
