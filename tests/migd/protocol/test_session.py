from __future__ import annotations

import pytest

from migd.errors import IllegalTransition
from migd.protocol.session import TABLE, TERMINAL, SessionEvent, SessionState, Status


def test_happy_path_uses_qemu_status_names() -> None:
    s = SessionState("source")
    seen = [s.status.value]
    for ev in (SessionEvent.START, SessionEvent.ACCEPTED, SessionEvent.SWITCHOVER,
               SessionEvent.COMMITTED):
        seen.append(s.fire(ev).value)
    assert seen == ["none", "setup", "active", "device", "completed"]
    assert s.finished


@pytest.mark.parametrize("status", [Status.NONE, Status.SETUP, Status.ACTIVE, Status.DEVICE])
def test_fail_and_cancel_from_every_live_state(status: Status) -> None:
    assert TABLE[(status, SessionEvent.FAIL)] is Status.FAILED
    assert TABLE[(status, SessionEvent.CANCEL)] is Status.CANCELLING


def test_terminal_states_accept_nothing() -> None:
    for (state, _), _ in TABLE.items():
        assert state not in TERMINAL
    s = SessionState("destination")
    s.fire(SessionEvent.FAIL)
    with pytest.raises(IllegalTransition, match="destination: illegal transition from failed"):
        s.fire(SessionEvent.COMMITTED)


def test_cancel_losing_the_race_to_commit_is_completed() -> None:
    s = SessionState("source")
    s.fire(SessionEvent.START)
    s.fire(SessionEvent.CANCEL)
    assert s.fire(SessionEvent.COMMITTED) is Status.COMPLETED
