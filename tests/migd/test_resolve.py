"""What each side answers when asked how a switchover ended: never two answers that
contradict each other, whatever races an operator's command."""

from __future__ import annotations

import asyncio

import pytest

from migd.errors import WrongState
from migd.pipeline import Workers
from migd.protocol.messages import Resolve
from migd.protocol.migration import Event, Migration, Phase, Role
from migd.resolve import _outcome
from migd.session import Host, Inbound, Job, VmJob

PEER = b"p" * 32


class _Driver:
    peer_key = PEER


def host_with(job: Job, ids: object) -> Host:
    from migd.identity import AuthorizedKeys, Identity

    h = Host(identity=Identity.generate(), authorized=AuthorizedKeys({}), workers=Workers(),
             devices={})
    h.register(job)
    if job.role == "destination":
        h.incoming[job.mid] = _Driver()
    return h


def job(role: Role, phase: Phase, mid: str = "m1") -> Job:
    j = Job(role.value, "vf0", id=mid)
    j.machine = Migration(role, phase=phase)
    j.peer_key = PEER
    return j


def inbox(j: Job) -> list[Event]:
    out = []
    while not j.inbox.empty():
        item = j.inbox.get_nowait()
        out.append(item.what if isinstance(item, Inbound) else item)
    return out


async def test_an_operators_confirm_wins_over_a_late_abort(ids: object) -> None:
    d = job(Role.DESTINATION, Phase.UNRESOLVED)
    h = host_with(d, ids)
    d.settle("commit")
    assert await _outcome(h, PEER, Resolve(id="m1", decision="abort")) == "commit"
    assert inbox(d) == [Event.RESOLVED_COMMIT]  # the abort was not even delivered
    with pytest.raises(WrongState, match="holds the only copy"):
        d.settle("abort")


async def test_an_abort_is_answered_only_once_the_vf_is_reset(ids: object) -> None:
    d = job(Role.DESTINATION, Phase.RESOLVING)
    h = host_with(d, ids)

    async def driver() -> None:
        await asyncio.sleep(0.1)
        assert inbox(d) == [Event.RESOLVED_ABORT]
        d.machine.handle(Event.RESOLVED_ABORT, 0.0)  # -> RESET

    t = asyncio.create_task(driver())
    assert await _outcome(h, PEER, Resolve(id="m1", decision="abort")) == "abort"
    await t
    # It holds to it: a COMMIT arriving later changes nothing.
    assert await _outcome(h, PEER, Resolve(id="m1", decision="commit")) == "abort"


async def test_asking_changes_nothing(ids: object) -> None:
    d = job(Role.DESTINATION, Phase.VOTED)
    h = host_with(d, ids)
    assert await _outcome(h, PEER, Resolve(id="m1", decision="ask")) == "pending"
    assert inbox(d) == [] and d.decision == ""
    with pytest.raises(Exception, match="not this peer's"):
        await _outcome(h, b"x" * 32, Resolve(id="m1", decision="commit"))


async def test_a_source_answers_what_it_holds_to(ids: object) -> None:
    s = job(Role.SOURCE, Phase.RESOLVING)
    s.decision = "commit"
    h = host_with(s, ids)
    assert await _outcome(h, PEER, Resolve(id="m1", decision="")) == "commit"
    s.settle("abort")  # the operator resumes the source (having reset the destination)
    s.machine.handle(Event.RESOLVED_ABORT, 0.0)  # -> ROLLING_BACK: not resumed yet
    assert await _outcome(h, PEER, Resolve(id="m1", decision="")) == "pending"
    s.machine.handle(Event.ROLLED, 0.0)
    assert await _outcome(h, PEER, Resolve(id="m1", decision="")) == "abort"
    assert await _outcome(h, PEER, Resolve(id="nobody", decision="")) == "unknown"


async def test_a_vm_is_settled_whole_or_not_at_all(ids: object) -> None:
    a, b = job(Role.SOURCE, Phase.UNRESOLVED, "a"), job(Role.SOURCE, Phase.DONE, "b")
    vm = VmJob("guest", "peer", [a, b])
    with pytest.raises(WrongState):
        vm.settle("abort")
    assert a.decision == "" and inbox(a) == []
