"""The migration session state machine, as a table (h11 style).

Status names are QEMU's ``query-migrate`` statuses, so operators and libvirt
read migd's state the way they read QEMU's.
"""

from __future__ import annotations

import enum

from ..errors import IllegalTransition


class Status(enum.Enum):
    NONE = "none"
    SETUP = "setup"
    ACTIVE = "active"
    DEVICE = "device"  # switchover: the source device is stopped, its last state moving
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


class SessionEvent(enum.Enum):
    START = "start"
    ACCEPTED = "accepted"  # the destination VF is RESUMING and the peer is authenticated
    SWITCHOVER = "switchover"  # the source device stops
    COMMITTED = "committed"  # the destination verified, loaded and (optionally) resumed
    FAIL = "fail"
    CANCEL = "cancel"
    ROLLED_BACK = "rolled-back"


S, E = Status, SessionEvent

TABLE: dict[tuple[Status, SessionEvent], Status] = {
    (S.NONE, E.START): S.SETUP,
    (S.SETUP, E.ACCEPTED): S.ACTIVE,
    (S.ACTIVE, E.SWITCHOVER): S.DEVICE,
    (S.DEVICE, E.COMMITTED): S.COMPLETED,
    (S.CANCELLING, E.ROLLED_BACK): S.CANCELLED,
    (S.CANCELLING, E.FAIL): S.CANCELLED,
    # The destination committed before the cancel could take effect: the guest
    # now runs there, so the migration completed.
    (S.CANCELLING, E.COMMITTED): S.COMPLETED,
}
for _s in (S.NONE, S.SETUP, S.ACTIVE, S.DEVICE):
    TABLE[(_s, E.FAIL)] = S.FAILED
    TABLE[(_s, E.CANCEL)] = S.CANCELLING

TERMINAL = frozenset({S.COMPLETED, S.FAILED, S.CANCELLED})


class SessionState:
    def __init__(self, role: str) -> None:
        self.role = role
        self.status = Status.NONE

    def fire(self, event: SessionEvent) -> Status:
        try:
            self.status = TABLE[(self.status, event)]
        except KeyError:
            raise IllegalTransition(self.role, self.status.value, event.value) from None
        return self.status

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL
