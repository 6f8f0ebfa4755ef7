"""What both migration drivers are: a loop over the migration table.

A driver feeds its :class:`~migd.protocol.migration.Migration` events and carries
out the acts the table answers with, one method per act (``ACTS``); the last act
of a transition produces the next event.  Whatever an act raises becomes an
event too: the operator's cancel (if the table still allows one), a broken link,
the peer's abort, or a failure.  A cancel from anywhere else (the daemon
stopping) ends the driver at once: the journal has what the next start needs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from . import journal, journald
from .errors import IllegalTransition, JournalFailed, MigdError
from .protocol.migration import ENTRY, Act, Event, Migration, Phase, Role
from .resolve import backoff
from .session import Host, Inbound, Job, as_error

log = logging.getLogger("migd.driver")

#: What must survive a crash of the whole host: what the other side's VF depends on.
DURABLE = (journal.VOTED, journal.COMMIT)


class Driver:
    role: ClassVar[Role]
    #: The method that carries out each act.
    ACTS: ClassVar[dict[Act, Callable[[Any], Awaitable[Event | None]]]]

    def __init__(self, host: Host, job: Job, machine: Migration) -> None:
        self.host = host
        self.job = job
        self.m = job.machine = machine
        self.error: MigdError | None = None
        self.record: journal.Record | None = None
        #: The acts still to do after a cancel the table refused.
        self._rest: tuple[Act, ...] = ()
        self._loop = asyncio.get_running_loop()

    async def run(self) -> None:
        journald.CURRENT.set(self.job)  # what this task logs is this migration's
        log.info("migration %s started: %s%s%s", self.job.id, self.job.role,
                 f", device {self.job.device}" if self.job.device else "",
                 f", peer {self.job.peer}" if self.job.peer else "",
                 extra=journald.event("started"))
        acts = self._first_acts()
        if self.m.phase is Phase.UNRESOLVED:  # taken up so after a restart
            self.job.reported = True
            self._report_unresolved()
        while True:
            event = await self._carry_out(acts)
            if event is None:
                if self._parked():
                    return
                acts = self._rest  # a cancel the table refused: carry on where it was
                continue
            try:
                acts = self._step(event)
            except IllegalTransition as exc:
                # A bug, not a peer: never end silently with a VF held.  Report it and
                # leave the rest to an operator (the journal has the facts).
                log.critical("migration %s: %s; holding it for an operator", self.job.id, exc)
                self.job.unresolved = f"internal error: {exc.message}"
                self.job.stuck = True
                return
            if self.m.phase is Phase.UNRESOLVED and not self.job.reported:
                self.job.reported = True
                self._report_unresolved()
            elif self.m.phase is not Phase.UNRESOLVED:
                self.job.reported = False

    def _report_unresolved(self) -> None:
        log.error("migration %s UNRESOLVED: %s", self.job.id, self.job.unresolved or "?")

    def _first_acts(self) -> tuple[Act, ...]:
        return ENTRY[(self.role, self.m.phase)]

    def _parked(self) -> bool:
        """Nothing more to drive (the migration ended, or waits for an operator)."""
        return self.m.finished

    def _step(self, event: Event) -> tuple[Act, ...]:
        return self.m.handle(event, self._loop.time())

    async def _carry_out(self, acts: tuple[Act, ...]) -> Event | None:
        """Carry out ``acts``; the event the last produces, or the one a failure
        stands for.  None: the acts from the interrupted one on are still to do
        (``self._rest``), after a cancel the table refused."""
        event: Event | None = None
        for i, act in enumerate(acts):
            try:
                result = await self.ACTS[act](self)
            except BaseException as exc:
                self._rest = acts[i:]
                return self._classify(exc)
            if result is not None:
                event = result
        return event

    def _classify(self, exc: BaseException) -> Event | None:
        err = as_error(exc)
        if isinstance(exc, asyncio.CancelledError):
            asked, self.job.cancel_asked = self.job.cancel_asked, False
            cancellable = self.m.may_cancel() and not self.job.decided
            if self.job.abandoned or not (asked or cancellable):
                raise exc  # the daemon stops: the journal has what the next start needs
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            if not cancellable:
                # The operator's cancel lost the race to the decision: carry on.
                log.warning("migration %s: cancel refused in phase %s", self.job.id,
                            self.m.phase.value)
                return None
            return self._cancelled(err)
        if not isinstance(exc, Exception):
            raise exc
        return self._failed(err)

    def _cancelled(self, err: MigdError) -> Event:
        self.error = err
        return Event.CANCEL

    def _failed(self, err: MigdError) -> Event:
        """The event a failure stands for (a broken link, the peer's abort, ...)."""
        self.error = err
        return Event.FAIL

    # --- what comes from outside the link: the operator, a resumed link, a peer -----------

    def _take(self, *wanted: Event) -> Inbound | None:
        """The first of ``wanted`` from the inbox (the others wait their turn)."""
        keep: list[Inbound | Event] = []
        found: Inbound | None = None
        while not self.job.inbox.empty():
            item = self.job.inbox.get_nowait()
            what = item.what if isinstance(item, Inbound) else item
            if found is None and what in wanted:
                found = item if isinstance(item, Inbound) else Inbound(what)
            else:
                keep.append(item)
        for item in keep:
            self.job.inbox.put_nowait(item)
        return found

    def _wake(self) -> None:
        """Something arrived in the inbox: wake whatever the driver waits on."""

    async def _settle(self, ask: Callable[[], Awaitable[Event | None]], *wanted: Event) -> Event:
        """After the vote or decision: keep asking the peer (``ask``: the outcome's
        event, or None to ask again), backing off, until it answers, an operator or
        the inbox settles it (``wanted``), or, still RESOLVING, the resolve timeout
        passes."""
        attempt = 0
        while True:
            item = self._take(*wanted)
            if item is not None:
                return self._inbound(item)
            event = await ask()
            if event is not None:
                return event
            if self.m.phase is Phase.RESOLVING and self.m.deadline is not None \
                    and self._loop.time() >= self.m.deadline:
                return Event.RESOLVE_TIMEOUT
            attempt += 1
            await self._pause(backoff(attempt, slow=self.m.phase is Phase.UNRESOLVED))

    def _inbound(self, item: Inbound) -> Event:
        return item.what

    async def _pause(self, seconds: float) -> None:
        raise NotImplementedError

    # --- the journal -------------------------------------------------------------------

    def _new_record(self, phase: str) -> journal.Record:
        raise NotImplementedError

    def _journal(self, phase: str, quiet: bool = False) -> None:
        """Write this migration's ``phase``: durably for a vote or a decision
        (:data:`DURABLE`), else for daemon crashes only (see Journal.write);
        ``quiet``: log a failure instead of raising (records that only report)."""
        j = self.host.journal
        if j is None:
            return
        if self.record is None:
            self.record = self._new_record(phase)
        self.record.phase = phase
        try:
            j.write(self.record, durable=phase in DURABLE)
        except OSError as exc:
            if not quiet:
                raise JournalFailed(f"journal {j.dir}: {exc.strerror}") from None
            log.error("journal %s: %s", j.dir, exc.strerror)
