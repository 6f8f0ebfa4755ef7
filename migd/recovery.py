"""Crash recovery: what a starting daemon does with the migrations its journal names.

It runs before the daemon accepts any work.  The rules are the commit protocol's
(``shared/reference/commit-protocol.md``):

======================  ==============================================================
source, no decision     abort: its VF back to RUNNING (its state is intact); the
                        destination is told ABORT when it can be reached
source, COMMIT          its VF stays stopped; the destination must hear ``go``
                        (resolution; ``unresolved`` if it cannot be reached in time)
destination, loading    reset its VF
destination, voted      ask the source: COMMIT -> journal, start; ABORT -> reset
destination, COMMIT     start its VF (unless it was to stay stopped)
======================  ==============================================================

A record naming a device this daemon does not have, or a journal file that is
damaged, stops the start: recovering half would be worse than not starting.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from backends.base import Device
from backends.states import DeviceState

from . import journal
from .destination import recovered_destination
from .errors import ConfigError, MigdError
from .protocol.messages import Resolve
from .protocol.migration import Migration, Phase, Role
from .resolve import ask, notify_abort
from .session import Host, Job
from .source import recovered_source

log = logging.getLogger("migd.recovery")


def recover(host: Host) -> list[Coroutine[Any, Any, None]]:
    """Settle every record; returns the drivers to run (as soon as the loop runs)."""
    j = host.journal
    assert j is not None
    records = j.load()
    groups = {r.id: r for r in records if r.role == "group"}
    runs: list[Coroutine[Any, Any, None]] = []
    for rec in sorted(records, key=lambda r: r.updated):
        if rec.role == "group":
            continue
        dev = host.devices.get(rec.device)
        if rec.open and dev is None:
            raise ConfigError(f"journal {j.dir}/{rec.key}.json: {rec.role} migration {rec.id} "
                              f"holds device {rec.device!r}, which this daemon does not have; "
                              "configure it again (or settle the migration by hand and move "
                              "the file away)")
        if rec.role == "source":
            _recover_source(host, rec, dev, groups, runs)
        else:
            _recover_destination(host, rec, dev, runs)
    j.prune()
    return runs


def _recover_source(host: Host, rec: journal.Record, dev: Device | None,
                    groups: dict[str, journal.Record],
                    runs: list[Coroutine[Any, Any, None]]) -> None:
    """A source record: decided COMMIT (held stopped, the destination told), open and
    undecided (rolled back, the peer told), or history."""
    group = groups.get(rec.group) if rec.group else None
    decided = rec.phase == journal.COMMIT or (
        rec.open and group is not None and group.phase == journal.COMMIT)
    if rec.open and decided:
        assert dev is not None
        job, drv = recovered_source(host, rec, dev)
        host.busy.add(rec.device)
        _hold_stopped(rec, dev)
        log.warning("recovery: migration %s decided COMMIT before the restart: %s "
                    "stays stopped; telling the destination", rec.id, rec.device)
        _start(host, job, drv.run(), runs)
    elif rec.open:
        assert dev is not None
        host.busy.add(rec.device)
        job = _history(host, rec, Phase.ROLLING_BACK, None)  # "pending" to the peer
        job.done.clear()
        runs.append(_settle_undecided(host, rec, dev, job))
    else:
        _history(host, rec, Phase.DONE if rec.phase == journal.COMPLETED
                 else Phase.ROLLED_BACK, MigdError(rec.reason) if rec.reason else None)


def _recover_destination(host: Host, rec: journal.Record, dev: Device | None,
                         runs: list[Coroutine[Any, Any, None]]) -> None:
    """A destination record: not voted (reset), voted or committing (held, the source
    asked), loaded and left stopped (device-resume starts it), or history."""
    j = host.journal
    assert j is not None
    if rec.phase == journal.LOADING:
        assert dev is not None
        try:
            dev.reset()
        except MigdError as err:
            # Not running the guest either way; the next start tries again.
            log.error("recovery: reset of %s failed: %s", rec.device, err.message)
            _history(host, rec, Phase.RESET, err)
            return
        rec.reason = "migd restarted before the stream was complete: the VF was reset"
        rec.phase = journal.RESET
        j.write(rec, durable=False)
        log.warning("recovery: incoming migration %s had not voted: %s reset", rec.id,
                    rec.device)
        _history(host, rec, Phase.RESET, MigdError(rec.reason))
    elif rec.open:
        assert dev is not None
        job, ddrv = recovered_destination(host, rec, dev)
        host.busy.add(rec.device)
        log.warning("recovery: incoming migration %s %s before the restart: %s holds the "
                    "loaded state", rec.id, rec.phase, rec.device)
        _start(host, job, ddrv.run(), runs)
    elif rec.phase == journal.COMPLETED and not rec.resume and not rec.started \
            and dev is not None and dev.state == DeviceState.STOP:
        _history(host, rec, Phase.LOADED, None)  # device-resume starts it
    else:
        _history(host, rec, Phase.DONE if rec.phase == journal.COMPLETED
                 else Phase.RESET, MigdError(rec.reason) if rec.reason else None)


def _start(host: Host, job: Job, run: Coroutine[Any, Any, None],
           runs: list[Coroutine[Any, Any, None]]) -> None:
    host.register(job)

    async def driver() -> None:
        job.task = asyncio.current_task()
        await run

    runs.append(driver())


def _hold_stopped(rec: journal.Record, dev: Any) -> None:
    """A decided source VF never runs again here: out of STOP_COPY, into STOP."""
    try:
        if dev.state in (DeviceState.STOP_COPY, DeviceState.PRE_COPY_P2P,
                         DeviceState.RUNNING_P2P):
            dev.set_state(DeviceState.STOP)
        elif dev.state == DeviceState.RUNNING:
            log.error("recovery: %s runs although migration %s decided COMMIT (it kept no "
                      "state across the restart?)", rec.device, rec.id)
    except MigdError as err:
        log.error("recovery: could not stop %s: %s", rec.device, err.message)


async def _settle_undecided(host: Host, rec: journal.Record, dev: Any, job: Job) -> None:
    """No decision was journaled: abort, and resume the VF with its state, then tell the
    destination.  Unless the destination says it runs the guest already (its operator
    confirmed it while this host was down): then the VF stays stopped.  And if the VF
    will not resume, nobody is told ABORT (the destination may hold the only copy): the
    migration is unresolved, for an operator."""
    assert host.journal is not None
    answer = "unreachable"
    try:  # a question only: it changes nothing at the destination
        out = await ask(host, rec.peer, bytes.fromhex(rec.peer_key),
                        Resolve(id=rec.id, decision="ask"), min(host.idle_timeout, 3.0))
        answer = out.decision
    except MigdError as err:
        log.info("recovery: destination of %s not reached (%s): aborting", rec.id, err.message)
    if answer == "commit":
        rec.phase = journal.COMPLETED
        rec.reason = ("the destination runs the guest (its operator confirmed it while this "
                      "host was down): the source VF stays stopped")
        job.machine = Migration(Role.SOURCE, phase=Phase.DONE)
        job.decision = "commit"
        _hold_stopped(rec, dev)
        log.warning("recovery: migration %s: %s", rec.id, rec.reason)
        host.journal.write(rec, durable=False)
        host.busy.discard(rec.device)
        job.done.set()
        return
    try:
        dev.set_state(DeviceState.RUNNING)
    except MigdError as err:
        log.error("recovery: %s would not resume (%s): the destination may hold the only "
                  "copy; it is not told to abort", rec.device, err.message)
        stuck, drv = recovered_source(host, rec, dev, phase=Phase.UNRESOLVED)
        stuck.unresolved = (f"after a restart the source VF did not come back to RUNNING "
                            f"({err.message}); the destination was not told to abort")
        del host.jobs[job.id]
        host.register(stuck)
        job.done.set()
        await _run(stuck, drv)
        return
    job.decision = "abort"
    job.machine = Migration(Role.SOURCE, phase=Phase.ROLLED_BACK)
    job.error = MigdError("migd restarted before the switchover was decided: the source VF "
                          "runs again with its state")
    rec.phase = journal.ABORTED
    rec.reason = "migd restarted before the decision: the source VF was resumed"
    host.journal.write(rec, durable=False)
    host.busy.discard(rec.device)
    job.done.set()
    log.warning("recovery: migration %s was not decided: %s runs again (%s)", rec.id,
                rec.device, dev.state.name)
    await notify_abort(host, rec.peer, bytes.fromhex(rec.peer_key), rec.id)


async def _run(job: Job, drv: Any) -> None:
    job.task = asyncio.current_task()
    await drv.run()


def _history(host: Host, rec: journal.Record, phase: Phase, error: MigdError | None) -> Job:
    job = Job(rec.role, rec.device, peer=", ".join(rec.peer), id=rec.id)
    job.machine = Migration(Role(rec.role), phase=phase)
    job.recovered = True
    job.error = error
    job.peer_key = bytes.fromhex(rec.peer_key) if rec.peer_key else b""
    if phase in (Phase.DONE, Phase.LOADED):
        job.decision = "commit"
    elif phase in (Phase.ROLLED_BACK, Phase.RESET):
        job.decision = "abort"
    job.done.set()
    host.register(job)
    return job
