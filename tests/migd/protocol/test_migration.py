"""The migration FSM tables: every (role, phase, event), and the rules they encode."""

from __future__ import annotations

import itertools

import pytest

from migd.errors import IllegalTransition, IncompleteStream, IntegrityError, OverAnnounced
from migd.protocol.messages import End
from migd.protocol.migration import (
    DEST_UNVOTED,
    ENTRY,
    SOURCE_UNDECIDED,
    TABLE,
    TERMINAL,
    Act,
    Allowance,
    Event,
    GroupDecision,
    Migration,
    Phase,
    Policy,
    Role,
    Status,
    check_complete,
    check_end,
)

S, D = Role.SOURCE, Role.DESTINATION
ALL = list(itertools.product(Role, Phase, Event))


@pytest.mark.parametrize("role, phase, event", ALL,
                         ids=[f"{r.value}-{p.value}-{e.value}" for r, p, e in ALL])
def test_every_phase_and_event(role: Role, phase: Phase, event: Event) -> None:
    m = Migration(role, Policy(max_resumes=3), phase=phase)
    step = TABLE.get((role, phase, event))
    if step is None:
        with pytest.raises(IllegalTransition) as info:
            m.handle(event, 0.0)
        err = info.value
        assert (err.role, err.state, err.event) == (role.value, phase.value, event.value)
        assert f"{role.value}: illegal transition from {phase.value} on {event.value}" in str(err)
        assert m.phase is phase  # nothing moved
        return
    if event is Event.RECONNECTED:  # back to where the link broke: none did here
        with pytest.raises(IllegalTransition, match="no link broke"):
            m.handle(event, 0.0)
        return
    acts = m.handle(event, 0.0)
    assert m.phase is step.next
    assert acts == step.acts


def test_reconnected_returns_to_where_the_link_broke() -> None:
    for broke, back in [(Phase.PRECOPY, Phase.PRECOPY), (Phase.SWITCHOVER_ACK, Phase.PRECOPY),
                        (Phase.PAUSED, Phase.PAUSED), (Phase.STOP_COPY, Phase.STOP_COPY),
                        (Phase.VOTING, Phase.STOP_COPY)]:
        m = Migration(S, phase=broke)
        assert m.handle(Event.LINK_DOWN, 1.0) == (Act.RECONNECT,)
        assert m.phase is Phase.RECONNECTING and m.resumes == 1
        assert m.handle(Event.RECONNECTED, 2.0) == ENTRY[(S, back)]
        assert m.phase is back and m.deadline is None


def test_the_happy_paths_and_their_statuses() -> None:
    src = Migration(S, skip=frozenset({Phase.VM_BARRIER, Phase.PAUSED}))
    seen = [(src.phase, src.status())]
    for ev in (Event.ACCEPTED, Event.CONVERGED, Event.INITIAL_LOADED, Event.END_SENT,
               Event.VOTED, Event.DECIDED, Event.CONFIRMED):
        src.handle(ev, 0.0)
        seen.append((src.phase, src.status()))
    assert seen == [(Phase.SETUP, Status.SETUP), (Phase.PRECOPY, Status.ACTIVE),
                    (Phase.SWITCHOVER_ACK, Status.ACTIVE),
                    # (VM_BARRIER and PAUSED skipped: one VF, no pause)
                    (Phase.STOP_COPY, Status.DEVICE), (Phase.VOTING, Status.DEVICE),
                    (Phase.DECIDING, Status.DEVICE), (Phase.DECIDED, Status.DEVICE),
                    (Phase.DONE, Status.COMPLETED)]
    dst = Migration(D)
    for ev, phase in [(Event.START, Phase.LOADING), (Event.END, Phase.VERIFYING),
                      (Event.VERIFIED, Phase.VOTED), (Event.GO, Phase.COMMITTING),
                      (Event.STARTED, Phase.DONE)]:
        dst.handle(ev, 0.0)
        assert dst.phase is phase
    assert dst.status() is Status.COMPLETED


def test_optional_phases_are_skipped_unless_used() -> None:
    plain = Migration(S, skip=frozenset({Phase.PRECOPY, Phase.SWITCHOVER_ACK,
                                         Phase.VM_BARRIER, Phase.PAUSED}))
    assert plain.handle(Event.ACCEPTED, 0.0) == (Act.STOP_VF, Act.SEND_REST)
    assert plain.phase is Phase.STOP_COPY
    paused = Migration(S, skip=frozenset({Phase.PRECOPY, Phase.SWITCHOVER_ACK,
                                          Phase.VM_BARRIER}))
    assert paused.handle(Event.ACCEPTED, 0.0) == (Act.AWAIT_CONTINUE,)
    assert paused.status() is Status.PRE_SWITCHOVER and paused.may_cancel()
    assert paused.handle(Event.CONTINUE, 0.0) == (Act.STOP_VF, Act.SEND_REST)


def test_before_its_decision_the_source_may_roll_back_after_it_never() -> None:
    for phase in SOURCE_UNDECIDED:
        for event in (Event.FAIL, Event.CANCEL):
            assert TABLE[(S, phase, event)].next is Phase.ROLLING_BACK
    # Rolled back only once the VF runs again; a VF that will not is nobody's to reset.
    assert TABLE[(S, Phase.ROLLING_BACK, Event.ROLLED)].next is Phase.ROLLED_BACK
    assert TABLE[(S, Phase.ROLLING_BACK, Event.STUCK)].next is Phase.UNRESOLVED
    # A decision whose write failed may be on disk: neither go nor a rollback.
    assert TABLE[(S, Phase.DECIDING, Event.STUCK)].next is Phase.UNRESOLVED
    reach_rollback = {(p, e) for (r, p, e), step in TABLE.items()
                      if r is S and step.next is Phase.ROLLING_BACK}
    for phase in (Phase.DECIDED, Phase.RESOLVING, Phase.UNRESOLVED):
        # Only an operator's ABORT (having reset the destination) rolls it back.
        assert {e for p, e in reach_rollback if p is phase} == {Event.RESOLVED_ABORT}
        m = Migration(S, phase=phase)
        assert not m.may_cancel()
        assert m.handle(Event.CANCEL, 0.0) == () and m.phase is phase
    assert TABLE[(S, Phase.DECIDED, Event.LINK_DOWN)].next is Phase.RESOLVING
    assert TABLE[(S, Phase.DECIDED, Event.FAIL)].next is Phase.RESOLVING


def test_once_voted_the_destination_resets_only_on_abort() -> None:
    for phase in DEST_UNVOTED:
        assert TABLE[(D, phase, Event.FAIL)].next is Phase.RESET
    voted = (Phase.VOTED, Phase.RESOLVING, Phase.UNRESOLVED)
    for (role, phase, event), step in TABLE.items():
        if role is D and phase in voted and step.next is Phase.RESET:
            assert event in (Event.PEER_ABORT, Event.RESOLVED_ABORT), (phase, event)
    assert TABLE[(D, Phase.VOTED, Event.LINK_DOWN)].next is Phase.RESOLVING
    assert TABLE[(D, Phase.VOTED, Event.FAIL)].next is Phase.RESOLVING
    m = Migration(D, phase=Phase.VOTED)
    assert m.voted and not m.may_cancel() and m.status() is Status.DEVICE


def test_terminal_phases_take_nothing_but_a_deliberate_start() -> None:
    for (role, phase, event) in TABLE:
        if phase in TERMINAL:
            assert (role, phase, event) == (D, Phase.LOADED, Event.STARTED)


def test_resumes_are_counted_and_bounded_in_number_and_time() -> None:
    m = Migration(S, Policy(max_resumes=2, resume_timeout=10.0), phase=Phase.STOP_COPY)
    m.handle(Event.LINK_DOWN, 100.0)
    assert m.deadline == 110.0
    m.handle(Event.LINK_DOWN, 105.0)  # that attempt failed: try again, same outage
    assert m.phase is Phase.RECONNECTING and m.resumes == 1
    m.handle(Event.RECONNECTED, 106.0)
    m.handle(Event.LINK_DOWN, 200.0)
    assert m.resumes == 2 and m.phase is Phase.RECONNECTING
    assert m.handle(Event.LINK_DOWN, 210.5) == (Act.ROLLBACK,)  # out of time
    assert m.status() is Status.DEVICE  # rolling back: as it was (the VF was stopped)
    assert m.handle(Event.ROLLED, 211.0) == (Act.FINISH,)
    assert m.status() is Status.FAILED and m.finished
    spent = Migration(S, Policy(max_resumes=0), phase=Phase.PRECOPY)
    assert spent.handle(Event.LINK_DOWN, 0.0) == (Act.ROLLBACK,)
    d = Migration(D, Policy(max_resumes=1, resume_timeout=5.0), phase=Phase.LOADING)
    assert d.handle(Event.LINK_DOWN, 0.0) == (Act.AWAIT_RESUME,)
    assert d.handle(Event.RESUME_TIMEOUT, 5.0) == (Act.RESET_VF, Act.FINISH)


def test_a_cancel_is_reported_as_cancelled() -> None:
    m = Migration(S, phase=Phase.PRECOPY)
    m.handle(Event.CANCEL, 0.0)
    assert m.status() is Status.CANCELLING and m.cancelled
    m.handle(Event.ROLLED, 0.0)
    assert m.status() is Status.CANCELLED


def test_asking_for_an_outcome_never_ends_on_an_error() -> None:
    for role in (S, D):
        for phase in (Phase.RESOLVING, Phase.UNRESOLVED):
            for event in (Event.FAIL, Event.LINK_DOWN):
                m = Migration(role, phase=phase)
                assert m.handle(event, 0.0) == (Act.RESOLVE,) and m.phase is phase


def test_a_vote_whose_write_failed_was_no_vote() -> None:
    m = Migration(D, phase=Phase.VERIFYING)
    assert ENTRY[(D, Phase.VERIFYING)] == (Act.VERIFY, Act.JOURNAL_VOTE)
    assert m.handle(Event.FAIL, 0.0) == (Act.RESET_VF, Act.FINISH)


def test_the_group_decides_once_for_every_device() -> None:
    g = GroupDecision(3)
    assert not g.vote(0) and not g.vote(0) and not g.vote(2)
    with pytest.raises(IllegalTransition, match="2 of 3 voted"):
        g.commit()
    assert g.vote(1)  # the last vote: now journal, then commit
    g.commit()
    assert g.decision == "commit" and not g.fail()  # too late for an abort
    h = GroupDecision(2)
    h.vote(0)
    assert h.fail() and h.decision == "abort" and not h.vote(1)


def test_the_announce_limit() -> None:
    a = Allowance(100)
    assert a.announce(60) == 60
    a.admit(0, 0, 60)
    with pytest.raises(OverAnnounced, match="chunk 1 goes past the 60 bytes"):
        a.admit(1, 50, 20)
    with pytest.raises(OverAnnounced, match="announced 160 bytes, more than the 100"):
        a.announce(100)


def test_the_end_record() -> None:
    end = End(length=100, chunks=2, digest=b"d" * 32)
    check_end(end, 100, 2)
    with pytest.raises(IncompleteStream):
        check_end(end, 99, 2)  # claims more than was announced
    with pytest.raises(IncompleteStream):
        check_end(end, 100, 3)  # fewer chunks than arrived
    check_complete(end, 100, 2, b"d" * 32)
    with pytest.raises(IncompleteStream):
        check_complete(end, 90, 2, b"d" * 32)
    with pytest.raises(IntegrityError, match="digest mismatch"):
        check_complete(end, 100, 2, b"x" * 32)
