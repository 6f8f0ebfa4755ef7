"""The VFIO FSM against the kernel's own next-step table, for every triple."""

from __future__ import annotations

import itertools
import json
import pathlib

import pytest

from backends.states import (
    VALID_CAPS,
    DeviceState,
    MigCap,
    next_step,
    path,
    supported,
)
from migd.errors import IllegalTransition

S = DeviceState
REFERENCE = pathlib.Path(__file__).parents[3] / "shared" / "reference" / "vfio_fsm.json"
SHIPPED = pathlib.Path(__file__).parents[2] / "backends" / "vfio_fsm.json"

# Kernel: state_flags_table[] -- the flags a state needs to be supported.
NEEDS = {
    S.RUNNING: 0, S.STOP: 0, S.STOP_COPY: 0, S.RESUMING: 0,
    S.RUNNING_P2P: MigCap.P2P, S.PRE_COPY: MigCap.PRE_COPY,
    S.PRE_COPY_P2P: MigCap.PRE_COPY | MigCap.P2P,
}


def kernel_table() -> dict[str, dict[str, str]]:
    src = REFERENCE if REFERENCE.exists() else SHIPPED
    table: dict[str, dict[str, str]] = json.loads(src.read_text())
    return table


def kernel_walk(cur: DeviceState, target: DeviceState, caps: MigCap) -> list[DeviceState] | None:
    """Independent re-statement of vfio_mig_get_next_state(), looped to the target.
    None means the kernel answers EINVAL (or would spin)."""
    t = kernel_table()
    if target == S.ERROR or NEEDS[target] & ~caps:
        return None
    steps: list[DeviceState] = []
    while cur != target:
        nxt = DeviceState[t[cur.name][target.name]]
        guard = 0
        while nxt != S.ERROR and NEEDS[nxt] & ~caps:
            nxt = DeviceState[t[nxt.name][target.name]]
            guard += 1
            assert guard < 10
        if nxt == S.ERROR:
            return None
        steps.append(nxt)
        cur = nxt
        assert len(steps) < 10
    return steps


#: SHA-256 of the kernel table (canonical JSON) as shared/reference ships it.
KERNEL_TABLE_SHA256 = "c3cbb193d9d59813d376a4d82bec637b12fe8974cd0f12b63634b3ab6afb3aa4"


def canonical_sha256(path: pathlib.Path) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(json.loads(path.read_text()), sort_keys=True).encode()).hexdigest()


def test_shipped_table_is_the_kernels() -> None:
    assert canonical_sha256(SHIPPED) == KERNEL_TABLE_SHA256
    if REFERENCE.exists():  # and the reference has not moved on without us
        assert canonical_sha256(REFERENCE) == KERNEL_TABLE_SHA256


def test_uapi_values() -> None:
    assert [(s.name, int(s)) for s in S] == [
        ("ERROR", 0), ("STOP", 1), ("RUNNING", 2), ("STOP_COPY", 3), ("RESUMING", 4),
        ("RUNNING_P2P", 5), ("PRE_COPY", 6), ("PRE_COPY_P2P", 7)]
    assert (int(MigCap.STOP_COPY), int(MigCap.P2P), int(MigCap.PRE_COPY)) == (1, 2, 4)


@pytest.mark.parametrize("caps", VALID_CAPS, ids=lambda c: str(int(c)))
def test_every_triple_matches_the_kernel(caps: MigCap) -> None:
    states = [s for s in S if s != S.ERROR and supported(s, caps)]
    checked = 0
    for cur, target in itertools.product(states, list(S)):
        want = kernel_walk(cur, target, caps)
        if cur == S.STOP_COPY and target in (S.PRE_COPY, S.PRE_COPY_P2P):
            want = None  # never requested: unpatched kernels soft-lock here
        if want is None:
            with pytest.raises(IllegalTransition):
                path(cur, target, caps)
        else:
            assert path(cur, target, caps) == want, (cur, target, caps)
        checked += 1
    assert checked == len(states) * len(S)


def test_documented_paths() -> None:
    full = MigCap.STOP_COPY | MigCap.P2P | MigCap.PRE_COPY
    assert path(S.RUNNING, S.STOP_COPY, full) == [S.RUNNING_P2P, S.STOP, S.STOP_COPY]
    assert path(S.PRE_COPY, S.STOP_COPY, full) == [S.PRE_COPY_P2P, S.STOP_COPY]
    assert path(S.RESUMING, S.RUNNING, full) == [S.STOP, S.RUNNING_P2P, S.RUNNING]
    no_p2p = MigCap.STOP_COPY | MigCap.PRE_COPY
    assert path(S.RUNNING, S.STOP, no_p2p) == [S.STOP]
    assert path(S.PRE_COPY, S.STOP_COPY, no_p2p) == [S.STOP_COPY]


def test_saving_states_never_interior_from_outside_the_group() -> None:
    """No walk from outside the saving group passes through it (PRE_COPY ->
    PRE_COPY_P2P -> STOP_COPY, inside the group, is the one legitimate case)."""
    saving = (S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY)
    for caps in VALID_CAPS:
        for cur, target in itertools.product(S, S):
            if cur == S.ERROR or not supported(cur, caps) or cur in saving:
                continue
            try:
                steps = path(cur, target, caps)
            except IllegalTransition:
                continue
            for s in steps[:-1]:
                assert s not in saving, (cur, target, steps)


def test_errors_name_state_and_event() -> None:
    with pytest.raises(IllegalTransition) as ei:
        next_step(S.STOP_COPY, S.PRE_COPY, MigCap.STOP_COPY | MigCap.PRE_COPY)
    assert ei.value.state == "STOP_COPY" and "PRE_COPY" in ei.value.event
    with pytest.raises(IllegalTransition):
        path(S.RUNNING, S.ERROR, VALID_CAPS[-1])
    with pytest.raises(IllegalTransition, match="invalid capability set"):
        path(S.RUNNING, S.STOP, MigCap.P2P)
    with pytest.raises(IllegalTransition):  # PRE_COPY without the capability
        path(S.RUNNING, S.PRE_COPY, MigCap.STOP_COPY)
