"""Settling a migration's outcome over a new connection.

After a vote or a decision, a broken link does not end a migration: the side
that must learn (the destination: the decision) or make heard (the source: its
COMMIT) reconnects, authenticates as the same peer and sends ``resolve`` with
the migration's id; the other side answers ``outcome`` from its live migration
or, after a restart, from its journal.  Only the migration's own peer may ask.
"""

from __future__ import annotations

import asyncio
import logging
import random

from . import journal
from .endpoint import Bus, Endpoint
from .errors import MigdError, ProtocolError, TransportError
from .protocol.messages import OUTCOMES, Outcome, Resolve
from .protocol.migration import Event, Phase, Role
from .session import Host, Inbound, Job

log = logging.getLogger("migd.resolve")

#: How long an answering destination waits for a COMMIT it was just told to take
#: effect, before answering "pending".
SETTLE_WAIT = 5.0


def backoff(attempt: int, slow: bool = False) -> float:
    """Seconds before retry ``attempt`` (0: none): doubling from 0.1 s to 2 s, or 5 s
    to 30 s once the outcome is reported unresolved; with jitter."""
    if attempt <= 0:
        return 0.0
    base, cap = (5.0, 30.0) if slow else (0.1, 2.0)
    return float(min(cap, base * 2 ** (attempt - 1)) * random.uniform(0.8, 1.2))


async def ask(host: Host, addresses: list[str], peer_key: bytes, request: Resolve,
              timeout: float) -> Outcome:
    """Send ``request`` to the first of ``addresses`` that answers as ``peer_key``."""
    from .source import open_channel  # the connecting half lives with the source

    if not addresses:
        raise TransportError("the peer left no address to reach it at")
    last: MigdError = TransportError("no address answered")
    for address in addresses:
        ep: Endpoint | None = None
        try:
            ep = await open_channel(host, address, 0, Bus(), timeout, host.ciphers,
                                    host.max_chunk)
            assert ep.established is not None
            if peer_key and ep.established.peer_key != peer_key:
                raise ProtocolError(f"{address} authenticates as another peer than the "
                                    "migration's")
            await ep.send_control(request)
            outcome = await ep.expect(Outcome, timeout)
            if outcome.id != request.id:
                raise ProtocolError(f"outcome for {outcome.id!r}, asked for {request.id!r}")
            if outcome.decision not in OUTCOMES:
                raise ProtocolError(f"outcome {outcome.decision!r}")
            return outcome
        except MigdError as err:
            last = err
        except Exception as exc:  # out of descriptors, say: it is asked again later
            last = TransportError(f"{address}: {exc.__class__.__name__}: {exc}")
        finally:
            if ep is not None:
                ep.channel.close()
    raise last


async def answer(host: Host, ep: Endpoint, req: Resolve) -> None:
    """The peer of migration ``req.id`` asks how it ended (and may say how it decided)."""
    assert ep.established is not None
    try:
        decision = await _outcome(host, ep.established.peer_key, req)
        await ep.send_control(Outcome(id=req.id, decision=decision))
        log.info("resolve %s from %s: %s", req.id, ep.channel.peer, decision)
    except MigdError as err:
        log.warning("resolve %s from %s refused: %s", req.id, ep.channel.peer, err.message)
        await ep.abort(err)
        return
    await asyncio.sleep(0)
    ep.channel.close()


#: What a resolve request says.  "": a destination asks its source.  "ask": a source
#: asks its destination and changes nothing there.  "commit" / "abort": a source tells
#: its destination how it decided.
REQUESTS = ("", "ask", "commit", "abort")


async def _outcome(host: Host, asker: bytes, req: Resolve) -> str:
    if req.decision not in REQUESTS:
        raise ProtocolError(f"resolve: unknown decision {req.decision!r}")
    role = Role.SOURCE if req.decision == "" else Role.DESTINATION
    job = host.find(role, req.id)
    key = _peer_key(host, role, req.id, job)
    if key is None:
        return "unknown"
    if key != asker:
        raise ProtocolError(f"resolve: migration {req.id} is not this peer's")
    if role is Role.SOURCE:
        return _source_outcome(host, req.id, job)
    return await _destination_outcome(host, req, job)


def _peer_key(host: Host, role: Role, mid: str, job: Job | None) -> bytes | None:
    if role is Role.DESTINATION:
        drv = host.incoming.get(mid)
        if drv is not None:
            return bytes(drv.peer_key)
    rec = host.journal.get(role.value, mid) if host.journal is not None else None
    if rec is not None:
        return bytes.fromhex(rec.peer_key)
    if job is not None and job.peer_key:
        return job.peer_key
    return None


def _source_outcome(host: Host, mid: str, job: Job | None) -> str:
    """What this source holds to: its decision, as long as it is one."""
    if job is not None:
        if job.decision == "abort" and job.machine.phase is Phase.ROLLED_BACK:
            return "abort"  # its VF runs again
        if job.decision == "commit" and not job.stuck:
            return "commit"
        if not job.recovered or job.machine.phase in (Phase.ROLLING_BACK, Phase.UNRESOLVED):
            return "pending"  # still deciding, or stuck: an operator decides
    rec = host.journal.get("source", mid) if host.journal is not None else None
    if rec is None:
        return "unknown"
    group = host.journal.get("group", rec.group) if host.journal and rec.group else None
    if rec.phase in (journal.COMMIT, journal.COMPLETED) or (
            group is not None and group.phase == journal.COMMIT):
        return "commit"
    return "abort" if rec.phase == journal.ABORTED else "pending"


async def _destination_outcome(host: Host, req: Resolve, job: Job | None) -> str:
    """The destination's answer: the decision it holds to, once it has one (a told
    decision is taken only if it has none yet, so that answers never contradict)."""
    if job is not None:
        m = job.machine
        if job.decision or req.decision == "ask" or m.phase is Phase.RESET:
            return await _settled(job) if job.decision else _state_of(job)
        event = Event.RESOLVED_COMMIT if req.decision == "commit" else Event.RESOLVED_ABORT
        if not m.may(event):
            return _state_of(job)
        job.decision = req.decision  # from now on this is its answer, whatever else comes
        job.deliver(Inbound(event))
        return await _settled(job)
    rec = host.journal.get("destination", req.id) if host.journal is not None else None
    if rec is None:
        return "unknown"
    if rec.phase in (journal.COMMIT, journal.COMPLETED):
        return "commit"
    if rec.phase == journal.RESET:
        return "abort"
    return "pending"


def _state_of(job: Job) -> str:
    if job.machine.phase in (Phase.COMMITTING, Phase.DONE, Phase.LOADED):
        return "commit"
    return "abort" if job.machine.phase is Phase.RESET else "pending"


async def _settled(job: Job) -> str:
    """``job``'s decision once it took effect: an abort only when the VF is reset (so
    the source resumes only then), a commit at once (the source stays stopped)."""
    if job.decision == "commit":
        return "commit"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_WAIT
    while job.machine.phase is not Phase.RESET and loop.time() < deadline:
        await asyncio.sleep(0.02)
    return "abort" if job.machine.phase is Phase.RESET else "pending"


async def notify_abort(host: Host, addresses: list[str], peer_key: bytes, mid: str,
                       attempts: int = 5) -> None:
    """Tell a destination that its source aborted (it resets, or already has): best
    effort, for a link that broke; a destination that voted would ask anyway."""
    for attempt in range(attempts):
        await asyncio.sleep(backoff(attempt))
        try:
            out = await ask(host, addresses, peer_key, Resolve(id=mid, decision="abort"),
                            host.idle_timeout)
            log.info("destination of %s told ABORT (%s)", mid, out.decision)
            return
        except MigdError as err:
            log.info("destination of %s not reached: %s", mid, err.message)
