"""The migration dialogue as a state machine per role, written as tables (h11 style).

Sans-I/O like :mod:`connection`: no sockets, no clock, no asyncio.  A driver
(:mod:`migd.source`, :mod:`migd.destination`) feeds :class:`Event` values with the
time, and carries out the :class:`Act` values the table returns, in order: device
arcs, sends, journal writes, waits.  Every (role, phase, event) the table does
not list raises :class:`~migd.errors.IllegalTransition` naming all three, so no
message or outcome can be handled in a phase that was not designed for it.

The switchover is a two-phase commit (``shared/reference/commit-protocol.md``):
the destination votes ``loaded`` only after every byte arrived, verified, and the
device accepted it; the source decides COMMIT only after the vote, writes the
decision to its journal, then sends ``go``.  The tables encode who may do what
on their own:

* before the vote, the source may roll back and the destination may reset;
* after the vote, the destination never resets without hearing ABORT: a broken
  link or silence sends it to RESOLVING (ask the source), never to RESET;
* after the decision, the source never resumes its VF on its own: a broken link
  sends it to RESOLVING (deliver the decision), and a cancel is refused.

Optional steps (pre-copy, switchover-ack, the VM barrier, the pause before
switchover) are phases that a migration without them skips, the way the kernel's
FSM path skips states a device does not support.

This module also owns the three checks the dialogue rests on: the announce limit
(:class:`Allowance`), the end-record check (:func:`check_end`) and the group
commit decision (:class:`GroupDecision`).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable

from ..errors import IllegalTransition, IncompleteStream, IntegrityError, OverAnnounced
from .messages import End


class Role(enum.Enum):
    SOURCE = "source"
    DESTINATION = "destination"


class Status(enum.Enum):
    """QEMU's ``query-migrate`` statuses, plus ``queued`` (waiting for a slot on
    this host) and ``unresolved``: a VF is stopped and this side could not learn
    whether the other side runs it."""

    NONE = "none"
    #: Waiting for its turn on this host (``max_migrations``); not in QEMU's list.
    QUEUED = "queued"
    SETUP = "setup"
    ACTIVE = "active"
    PRE_SWITCHOVER = "pre-switchover"
    DEVICE = "device"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    UNRESOLVED = "unresolved"


FINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})


class Phase(enum.Enum):
    SETUP = "setup"
    # source
    PRECOPY = "pre-copy"
    SWITCHOVER_ACK = "switchover-ack"  # waiting until the destination loaded the initial bytes
    VM_BARRIER = "vm-barrier"  # waiting until every device of the VM reached P2P
    PAUSED = "pre-switchover"  # waiting for the operator's migrate-continue
    STOP_COPY = "stop-copy"  # the VF is stopped; its last state moves
    VOTING = "voting"  # the end record is sent; waiting for the destination's vote
    DECIDING = "deciding"  # voted; waiting until every device of the VM voted
    DECIDED = "decided"  # COMMIT is journaled; go sent; waiting for the confirmation
    RECONNECTING = "reconnecting"  # the link broke before the vote: resuming the stream
    # destination
    LOADING = "loading"
    VERIFYING = "verifying"  # the end record arrived: last chunks, digest, device check
    VOTED = "voted"  # loaded and verified, the vote journaled and sent: holding it
    COMMITTING = "committing"  # COMMIT heard and journaled: starting the VF
    DETACHED = "detached"  # the link broke before the vote: waiting for the source to resume
    # both
    RESOLVING = "resolving"  # after the vote/decision the link broke: asking the peer
    UNRESOLVED = "unresolved"  # could not learn the outcome: the VF stays stopped
    DONE = "done"  # source: its VF stays stopped for good; destination: its VF runs
    LOADED = "loaded"  # destination: committed, the VF loaded and left stopped
    ROLLING_BACK = "rolling-back"  # source: bringing its VF back to RUNNING
    ROLLED_BACK = "rolled-back"  # source: its VF runs again, state intact
    RESET = "reset"  # destination: its VF was reset, nothing of the state kept


class Event(enum.Enum):
    START = "start"  # source: begin; destination: a migrate request arrived
    ACCEPTED = "accepted"  # source: accepted, every channel joined
    CONVERGED = "converged"  # source: what is left fits the downtime limit
    INITIAL_LOADED = "initial-loaded"  # source: the destination loaded the initial bytes
    P2P = "p2p"  # source: every device of the VM is in its P2P state
    CONTINUE = "continue"  # source: the operator's migrate-continue
    END_SENT = "end-sent"  # source: the VF's stream drained and the end record went out
    VOTED = "voted"  # source: the destination's vote arrived
    DECIDED = "decided"  # source: COMMIT is journaled (for every device of the VM)
    CONFIRMED = "confirmed"  # source: the destination says it committed
    END = "end"  # destination: the end record arrived
    VERIFIED = "verified"  # destination: complete, verified, the device accepted it
    GO = "go"  # destination: the source's COMMIT
    STARTED = "started"  # destination: the VF runs
    KEPT_STOPPED = "kept-stopped"  # destination: committed, left loaded and stopped
    PEER_ABORT = "peer-abort"  # destination: the source aborted
    LINK_DOWN = "link-down"  # a channel broke, or the peer fell silent
    RECONNECTED = "reconnected"  # source: the stream resumed; the destination still loads
    RECONNECTED_VOTED = "reconnected-voted"  # source: resumed; the destination had voted
    RESUMED = "resumed"  # destination: the source resumed the stream on a new connection
    RESUME_TIMEOUT = "resume-timeout"  # the broken stream was not resumed in time
    RESOLVED_COMMIT = "resolved-commit"  # the peer or the operator: COMMIT
    RESOLVED_ABORT = "resolved-abort"  # the peer or the operator: ABORT
    RESOLVE_TIMEOUT = "resolve-timeout"  # nobody could tell in time
    FAIL = "fail"  # a local failure, or the peer's error before the decision
    CANCEL = "cancel"  # the operator
    ROLLED = "rolled"  # source: its VF runs again with its state
    STUCK = "stuck"  # nothing is safe to do alone (a VF will not resume, a decision's write
    #                  failed): an operator decides


class Act(enum.Enum):
    """What a driver carries out; the last act of a transition produces the next event."""

    # source
    CONNECT = "connect"  # claim, connect, authenticate, migrate/accept, join channels
    ITERATE = "iterate"  # pre-copy rounds until converged
    AWAIT_INITIAL = "await-initial"
    REACH_P2P = "reach-p2p"
    AWAIT_CONTINUE = "await-continue"
    STOP_VF = "stop-vf"  # -> STOP_COPY (the P2P state first)
    SEND_REST = "send-rest"  # the rest of the stream, then the end record
    AWAIT_VOTE = "await-vote"
    DECIDE = "decide"  # journal COMMIT once every device of the VM voted
    SEND_GO = "send-go"
    STOP_FOR_GOOD = "stop-for-good"  # STOP_COPY -> STOP; it never runs again here
    AWAIT_CONFIRM = "await-confirm"
    RECONNECT = "reconnect"  # new connection(s), resume at the acknowledged position
    ROLLBACK = "rollback"  # the VF back to RUNNING, state intact; tell the peer
    # destination
    ACCEPT = "accept"  # check, claim, journal, RESUMING, send accept
    AWAIT_END = "await-end"
    VERIFY = "verify"  # last chunks, end record, digest, RESUMING -> STOP
    JOURNAL_VOTE = "journal-vote"
    SEND_VOTE = "send-vote"
    AWAIT_DECISION = "await-decision"
    JOURNAL_COMMIT = "journal-commit"
    START_VF = "start-vf"  # STOP -> RUNNING, unless asked to stay stopped
    SEND_COMMITTED = "send-committed"
    AWAIT_RESUME = "await-resume"
    SEND_RESUMED = "send-resumed"
    RESET_VF = "reset-vf"  # wipe whatever was loaded
    # both
    RESOLVE = "resolve"  # reconnect to the peer and settle the outcome
    JOURNAL_DONE = "journal-done"
    FINISH = "finish"  # report the outcome; free the device


S, D = Role.SOURCE, Role.DESTINATION
P, E, A = Phase, Event, Act


@dataclasses.dataclass(frozen=True)
class Step:
    """A transition: the next phase and what to do, in order."""

    next: Phase
    acts: tuple[Act, ...]


#: What a driver does on entering each phase (for every event that leads there).
ENTRY: dict[tuple[Role, Phase], tuple[Act, ...]] = {
    (S, P.SETUP): (A.CONNECT,),
    (S, P.PRECOPY): (A.ITERATE,),
    (S, P.SWITCHOVER_ACK): (A.AWAIT_INITIAL,),
    (S, P.VM_BARRIER): (A.REACH_P2P,),
    (S, P.PAUSED): (A.AWAIT_CONTINUE,),
    (S, P.STOP_COPY): (A.STOP_VF, A.SEND_REST),
    (S, P.VOTING): (A.AWAIT_VOTE,),
    (S, P.DECIDING): (A.DECIDE,),
    (S, P.DECIDED): (A.SEND_GO, A.STOP_FOR_GOOD, A.AWAIT_CONFIRM),
    (S, P.RECONNECTING): (A.RECONNECT,),
    (S, P.RESOLVING): (A.RESOLVE,),
    (S, P.UNRESOLVED): (A.RESOLVE,),  # keeps asking, slower, until someone knows
    # (STOP_FOR_GOOD again: a DECIDED whose go failed went on through RESOLVING.)
    (S, P.DONE): (A.STOP_FOR_GOOD, A.JOURNAL_DONE, A.FINISH),
    (S, P.ROLLING_BACK): (A.ROLLBACK,),
    (S, P.ROLLED_BACK): (A.FINISH,),
    (D, P.LOADING): (A.AWAIT_END,),
    # The vote is journaled while still VERIFYING: if that write fails, nothing voted.
    (D, P.VERIFYING): (A.VERIFY, A.JOURNAL_VOTE),
    (D, P.VOTED): (A.SEND_VOTE, A.AWAIT_DECISION),
    (D, P.COMMITTING): (A.JOURNAL_COMMIT, A.START_VF),
    (D, P.DETACHED): (A.AWAIT_RESUME,),
    (D, P.RESOLVING): (A.RESOLVE,),
    (D, P.UNRESOLVED): (A.RESOLVE,),
    (D, P.DONE): (A.SEND_COMMITTED, A.JOURNAL_DONE, A.FINISH),
    (D, P.LOADED): (A.SEND_COMMITTED, A.JOURNAL_DONE, A.FINISH),
    (D, P.RESET): (A.RESET_VF, A.FINISH),
}

#: Each role's way forward; a phase a migration does not use is skipped.
_SOURCE_ROUTE = [
    (P.SETUP, E.ACCEPTED, P.PRECOPY),
    (P.PRECOPY, E.CONVERGED, P.SWITCHOVER_ACK),
    (P.SWITCHOVER_ACK, E.INITIAL_LOADED, P.VM_BARRIER),
    (P.VM_BARRIER, E.P2P, P.PAUSED),
    (P.PAUSED, E.CONTINUE, P.STOP_COPY),
    (P.STOP_COPY, E.END_SENT, P.VOTING),
    (P.VOTING, E.VOTED, P.DECIDING),
    (P.DECIDING, E.DECIDED, P.DECIDED),
    (P.DECIDED, E.CONFIRMED, P.DONE),
]
_DEST_ROUTE = [
    (P.SETUP, E.START, P.LOADING),
    (P.LOADING, E.END, P.VERIFYING),
    (P.VERIFYING, E.VERIFIED, P.VOTED),
    (P.VOTED, E.GO, P.COMMITTING),
    (P.COMMITTING, E.STARTED, P.DONE),
    (P.COMMITTING, E.KEPT_STOPPED, P.LOADED),
]
#: The event with which a skipped phase passes on at once.
SKIP_EVENT: dict[Phase, Event] = {
    P.PRECOPY: E.CONVERGED, P.SWITCHOVER_ACK: E.INITIAL_LOADED, P.VM_BARRIER: E.P2P,
    P.PAUSED: E.CONTINUE,
}

#: Source phases before its decision, in which it may still roll back on its own.
SOURCE_UNDECIDED = (P.SETUP, P.PRECOPY, P.SWITCHOVER_ACK, P.VM_BARRIER, P.PAUSED, P.STOP_COPY,
                    P.VOTING, P.DECIDING, P.RECONNECTING)
#: Source phases in which a broken link is resumed (the destination has not voted).
SOURCE_RESUMABLE = (P.PRECOPY, P.SWITCHOVER_ACK, P.VM_BARRIER, P.PAUSED, P.STOP_COPY,
                    P.VOTING, P.DECIDING)
#: Where the stream picks up after a resume, by the phase in which the link broke.
RESUME_AT: dict[Phase, Phase] = {
    P.PRECOPY: P.PRECOPY, P.SWITCHOVER_ACK: P.PRECOPY, P.VM_BARRIER: P.VM_BARRIER,
    P.PAUSED: P.PAUSED, P.STOP_COPY: P.STOP_COPY, P.VOTING: P.STOP_COPY,
    P.DECIDING: P.STOP_COPY,
}
#: Destination phases before its vote, in which it may reset on its own.
DEST_UNVOTED = (P.SETUP, P.LOADING, P.VERIFYING, P.DETACHED)
#: Phases in which the source's VF is stopped (status ``device``).
STOPPED = (P.STOP_COPY, P.VOTING, P.DECIDING, P.DECIDED, P.RESOLVING, P.ROLLING_BACK)
TERMINAL = frozenset({P.DONE, P.LOADED, P.ROLLED_BACK, P.RESET})


#: Adds one row to the table being built: (role, phase, event) -> (next, acts).
Go = Callable[..., None]


def _route_rows(go: Go) -> None:
    """The happy paths, each phase's entry acts included."""
    for role, route in ((S, _SOURCE_ROUTE), (D, _DEST_ROUTE)):
        for phase, event, nxt in route:
            go(role, phase, event, nxt)
    go(D, P.SETUP, E.START, P.LOADING, (A.ACCEPT, A.AWAIT_END))


def _source_rows(go: Go) -> None:
    """The source's rules: before its decision it may roll back on its own; after it,
    never.  (And for either side: whatever goes wrong while asking, it keeps asking.)"""
    # -- source: before the decision it may roll back on its own ---------------------------
    for phase in SOURCE_UNDECIDED:
        go(S, phase, E.FAIL, P.ROLLING_BACK)
        go(S, phase, E.CANCEL, P.ROLLING_BACK)
    go(S, P.SETUP, E.LINK_DOWN, P.ROLLING_BACK)  # nothing to resume before accept
    go(S, P.ROLLING_BACK, E.ROLLED, P.ROLLED_BACK)
    # Its VF will not run again, and the destination may hold the only copy: no ABORT.
    go(S, P.ROLLING_BACK, E.STUCK, P.UNRESOLVED)
    # The decision's write failed: it may be on disk, so neither go nor abort.
    go(S, P.DECIDING, E.STUCK, P.UNRESOLVED)
    for phase in SOURCE_RESUMABLE:
        go(S, phase, E.LINK_DOWN, P.RECONNECTING)
    go(S, P.RECONNECTING, E.LINK_DOWN, P.RECONNECTING)  # that attempt failed too: again
    # RECONNECTED goes back to where the link broke (RESUME_AT), with that phase's acts.
    go(S, P.RECONNECTING, E.RECONNECTED, P.RECONNECTING, ())
    go(S, P.RECONNECTING, E.RECONNECTED_VOTED, P.DECIDING)
    go(S, P.RECONNECTING, E.RESUME_TIMEOUT, P.ROLLING_BACK)
    # -- source: after the decision it keeps its VF stopped, whatever happens ----------------
    for phase in (P.DECIDED, P.RESOLVING, P.UNRESOLVED):
        go(S, phase, E.CANCEL, phase, ())  # refused: too late to cancel
        go(S, phase, E.RESOLVED_COMMIT, P.DONE)
        # Only the operator, having reset the destination VF, says ABORT after a COMMIT.
        go(S, phase, E.RESOLVED_ABORT, P.ROLLING_BACK)
    go(S, P.DECIDED, E.LINK_DOWN, P.RESOLVING)
    go(S, P.DECIDED, E.FAIL, P.RESOLVING)
    go(S, P.RESOLVING, E.RESOLVE_TIMEOUT, P.UNRESOLVED)
    go(S, P.UNRESOLVED, E.RESOLVE_TIMEOUT, P.UNRESOLVED, ())
    for role in (S, D):
        for phase in (P.RESOLVING, P.UNRESOLVED):
            # Whatever goes wrong while asking, it keeps asking: never a silent end.
            go(role, phase, E.FAIL, phase)
            go(role, phase, E.LINK_DOWN, phase)


def _destination_rows(go: Go) -> None:
    """The destination's rules: before its vote it may reset on its own; once voted, it
    holds the loaded state until it hears the decision."""
    # -- destination: before its vote it may reset on its own --------------------------------
    for phase in DEST_UNVOTED:
        go(D, phase, E.FAIL, P.RESET)
        go(D, phase, E.CANCEL, P.RESET)
        go(D, phase, E.PEER_ABORT, P.RESET)
        go(D, phase, E.RESOLVED_ABORT, P.RESET)
    go(D, P.SETUP, E.LINK_DOWN, P.RESET)
    for phase in (P.LOADING, P.VERIFYING):
        go(D, phase, E.LINK_DOWN, P.DETACHED)
        # The source resumed before this side noticed its old link die.
        go(D, phase, E.RESUMED, P.LOADING, (A.SEND_RESUMED, A.AWAIT_END))
    go(D, P.DETACHED, E.RESUMED, P.LOADING, (A.SEND_RESUMED, A.AWAIT_END))
    go(D, P.DETACHED, E.RESUME_TIMEOUT, P.RESET)
    go(D, P.DETACHED, E.LINK_DOWN, P.DETACHED, ())
    # -- destination: once voted, it holds the loaded state until it hears the decision ------
    for phase in (P.VOTED, P.RESOLVING, P.UNRESOLVED):
        go(D, phase, E.RESOLVED_COMMIT, P.COMMITTING)
        go(D, phase, E.RESOLVED_ABORT, P.RESET)
        go(D, phase, E.PEER_ABORT, P.RESET)
        go(D, phase, E.CANCEL, phase, ())  # refused: only the decision may end it
        # The source lost the vote with its link and resumed: it may now decide.
        go(D, phase, E.RESUMED, P.VOTED, (A.SEND_RESUMED, A.AWAIT_DECISION))
    go(D, P.VOTED, E.LINK_DOWN, P.RESOLVING)
    go(D, P.VOTED, E.FAIL, P.RESOLVING)  # never a reset without hearing ABORT
    go(D, P.RESOLVING, E.RESOLVE_TIMEOUT, P.UNRESOLVED)
    go(D, P.UNRESOLVED, E.RESOLVE_TIMEOUT, P.UNRESOLVED, ())
    # Committed, but the VF would not start: reported; the operator's resolve --confirm
    # (or device-resume) tries again.
    go(D, P.COMMITTING, E.FAIL, P.UNRESOLVED)
    go(D, P.COMMITTING, E.LINK_DOWN, P.COMMITTING, ())
    # Committed and left stopped (stay-stopped), or stuck above: the operator's
    # device-resume starts it.
    go(D, P.LOADED, E.STARTED, P.DONE, (A.JOURNAL_DONE,))


def _build() -> dict[tuple[Role, Phase, Event], Step]:
    table: dict[tuple[Role, Phase, Event], Step] = {}

    def go(role: Role, phase: Phase, event: Event, nxt: Phase,
           acts: tuple[Act, ...] | None = None) -> None:
        table[(role, phase, event)] = Step(nxt, ENTRY.get((role, nxt), ()) if acts is None
                                           else acts)

    for rows in (_route_rows, _source_rows, _destination_rows):
        rows(go)
    return table


TABLE = _build()


@dataclasses.dataclass
class Policy:
    """What a migration may do when its link breaks."""

    #: Resumes of a broken stream, in all (0: a broken link fails the migration).
    max_resumes: int = 5
    #: Seconds to repair one outage (reconnect, or on the destination: wait for it).
    resume_timeout: float = 60.0
    #: Seconds to learn the outcome after the vote before reporting ``unresolved``.
    resolve_timeout: float = 60.0


class Migration:
    """One migration, from one side: the phase, and the table's answer to each event.

    ``skip`` names the optional phases this migration does not use.  Time comes in
    with each event (seconds, any monotonic clock) and sets the deadlines the
    driver keeps: ``deadline`` for the wait the current phase stands for.
    """

    def __init__(self, role: Role, policy: Policy | None = None, skip: frozenset[Phase] = frozenset(),
                 phase: Phase = Phase.SETUP) -> None:
        self.role = role
        self.policy = policy or Policy()
        self.skip = skip
        self.phase = phase
        self.resumes = 0
        #: Where a resumed stream picks up (the phase in which the link broke).
        self.resume_at: Phase | None = None
        #: When the current outage began, and until when it may be repaired or resolved.
        self.outage_since: float | None = None
        self.deadline: float | None = None
        self.stopped = phase in STOPPED  # the source VF left RUNNING for switchover
        self.cancelled = False
        self.history: list[tuple[Phase, Event]] = []

    @property
    def finished(self) -> bool:
        return self.phase in TERMINAL

    @property
    def decided(self) -> bool:
        """The source's COMMIT is journaled (it may also be stuck unresolved without one:
        ``Job.decided`` says which)."""
        return self.role is S and self.phase in (P.DECIDED, P.RESOLVING, P.DONE)

    @property
    def voted(self) -> bool:
        """The destination voted: it may not reset without hearing ABORT."""
        return self.role is D and self.phase in (P.VOTED, P.RESOLVING, P.UNRESOLVED,
                                                 P.COMMITTING, P.DONE, P.LOADED)

    def may(self, event: Event) -> bool:
        return (self.role, self.phase, event) in TABLE

    def may_cancel(self) -> bool:
        step = TABLE.get((self.role, self.phase, E.CANCEL))
        return step is not None and step.next != self.phase

    def status(self, phase: Phase | None = None) -> Status:
        ph = self.phase if phase is None else phase
        if ph is P.ROLLING_BACK:
            if self.cancelled:
                return Status.CANCELLING
            before = [p for p, _ in self.history if p is not P.ROLLING_BACK]
            return self.status(before[-1]) if before else Status.SETUP
        if ph in (P.ROLLED_BACK, P.RESET):
            return Status.CANCELLED if self.cancelled else Status.FAILED
        if ph in (P.DONE, P.LOADED):
            return Status.COMPLETED
        if ph is P.UNRESOLVED:
            return Status.UNRESOLVED
        if ph is P.SETUP:
            return Status.SETUP
        if ph is P.PAUSED:
            return Status.PRE_SWITCHOVER
        if self.role is S:
            return Status.DEVICE if self.stopped else Status.ACTIVE
        return Status.DEVICE if self.voted or ph is P.VERIFYING else Status.ACTIVE

    def handle(self, event: Event, now: float) -> tuple[Act, ...]:
        """Move on ``event``; returns what to do.  Raises IllegalTransition."""
        if event is E.LINK_DOWN and self._resume_spent(now):
            event = E.RESUME_TIMEOUT if self.phase in (P.RECONNECTING, P.DETACHED) else E.FAIL
        step = TABLE.get((self.role, self.phase, event))
        if step is None:
            raise IllegalTransition(self.role.value, self.phase.value, event.value)
        self.history.append((self.phase, event))
        came_from = self.phase
        acts = step.acts
        nxt = step.next
        if event is E.CANCEL and nxt != came_from:
            self.cancelled = True
        if event is E.RECONNECTED:
            if self.resume_at is None:
                self.history.pop()
                raise IllegalTransition(self.role.value, self.phase.value, event.value,
                                        "no link broke")
            nxt, acts = self.resume_at, ENTRY[(self.role, self.resume_at)]
        if nxt in (P.RECONNECTING, P.DETACHED) and came_from not in (P.RECONNECTING, P.DETACHED):
            self.resumes += 1
            self.outage_since = now
            self.deadline = now + self.policy.resume_timeout
            self.resume_at = RESUME_AT.get(came_from, came_from)
        elif nxt is P.RESOLVING and came_from is not P.RESOLVING:
            self.deadline = now + self.policy.resolve_timeout
        elif nxt not in (P.RECONNECTING, P.DETACHED, P.RESOLVING, P.UNRESOLVED):
            self.outage_since = self.deadline = None
        self.phase = nxt
        if nxt in STOPPED:
            self.stopped = True
        return self._skip(acts, now)

    def repairs_link(self, now: float) -> bool:
        """Whether a link breaking now is repaired (resumed, waited for or resolved)
        rather than ending the migration."""
        step = TABLE.get((self.role, self.phase, E.LINK_DOWN))
        return step is not None and step.next in (P.RECONNECTING, P.DETACHED, P.RESOLVING,
                                                  P.UNRESOLVED) and not self._resume_spent(now)

    def _resume_spent(self, now: float) -> bool:
        """A broken link that may not be resumed: no budget left, or out of time."""
        if self.phase in (P.RECONNECTING, P.DETACHED):
            return self.deadline is not None and now >= self.deadline
        step = TABLE.get((self.role, self.phase, E.LINK_DOWN))
        if step is None or step.next not in (P.RECONNECTING, P.DETACHED):
            return False
        return self.resumes >= self.policy.max_resumes

    def _skip(self, acts: tuple[Act, ...], now: float) -> tuple[Act, ...]:
        while self.phase in self.skip and self.phase in SKIP_EVENT:
            step = TABLE[(self.role, self.phase, SKIP_EVENT[self.phase])]
            self.history.append((self.phase, SKIP_EVENT[self.phase]))
            self.phase = step.next
            acts = step.acts
            if self.phase in STOPPED:
                self.stopped = True
        return acts


# --- the checks the dialogue rests on --------------------------------------------------------


class Allowance:
    """The destination's announce limit: the source announces what it will send and
    may send nothing past it; nobody may announce past ``limit`` in all (a bound
    on what one migration can make this host receive)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.announced = 0

    def announce(self, n: int) -> int:
        if self.announced + n > self.limit:
            raise OverAnnounced(f"source announced {self.announced + n} bytes, more than the "
                                f"{self.limit} this destination accepts for the device")
        self.announced += n
        return self.announced

    def admit(self, index: int, offset: int, length: int) -> None:
        if offset + length > self.announced:
            raise OverAnnounced(f"chunk {index} goes past the {self.announced} bytes the source "
                                "announced")


def check_end(end: End, announced: int, arrived_chunks: int) -> None:
    """What the end record may claim when it arrives."""
    if end.length > announced or end.chunks < arrived_chunks:
        raise IncompleteStream(
            f"end record says {end.length} bytes in {end.chunks} chunks; {announced} bytes were "
            f"announced and {arrived_chunks} chunks arrived")


def check_complete(end: End, loaded_bytes: int, loaded_chunks: int, digest: bytes) -> None:
    """Once every chunk the end record names is loaded: all of it, and only it."""
    if loaded_bytes != end.length or loaded_chunks != end.chunks:
        raise IncompleteStream(f"source sent {end.length} bytes in {end.chunks} chunks, "
                               f"{loaded_bytes} bytes in {loaded_chunks} chunks were loaded")
    if digest != end.digest:
        raise IntegrityError("stream digest mismatch: what arrived is not what was sent")


class GroupDecision:
    """One COMMIT decision for every device of a VM (one device: a group of one).

    Taken once, when every member voted and none failed: :meth:`vote` says when the
    last vote is in; the caller journals COMMIT and only then calls :meth:`commit`,
    after which no member may act on its own.  A failure of any member before that
    makes it ABORT for all."""

    def __init__(self, members: int) -> None:
        self.members = members
        self._votes: set[int] = set()
        self.decision: str | None = None  # "commit" / "abort" / "stuck" (its write failed)

    @property
    def complete(self) -> bool:
        return len(self._votes) == self.members

    def vote(self, member: int) -> bool:
        """Record ``member``'s vote; True when it is the last one (journal, then commit)."""
        if self.decision is not None or member in self._votes:
            return False
        self._votes.add(member)
        return self.complete

    def commit(self) -> None:
        if self.decision is not None or not self.complete:
            raise IllegalTransition("group", str(self.decision), "commit",
                                    f"{len(self._votes)} of {self.members} voted")
        self.decision = "commit"

    def fail(self) -> bool:
        """A member failed before the decision: ABORT for all.  False if too late."""
        if self.decision in ("commit", "stuck") or self.complete:
            return False
        self.decision = "abort"
        return True
