"""The destination side: the listener's dispatch, and a thin driver over the table.

Every connection authenticates first; its first message says what it is for: a
new migration (``migrate``), a further channel of one (``join``), a broken
migration's new link (``resume``), or a question about how one ended
(``resolve``).  The driver loads the stream, votes once every byte arrived and
the device accepted it, and then holds the loaded VF until it hears the
source's decision: never a reset without hearing ABORT once it voted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from backends.base import Device
from backends.states import DeviceState
from transports.base import Channel

from . import journal
from .admission import Gate, LogThrottle
from .driver import Driver
from .endpoint import Bus, Endpoint, is_link_failure, wait_event
from .errors import (
    Busy,
    HandshakeTimeout,
    IncompatibleDevice,
    MigdError,
    ProtocolError,
    RemoteError,
    WrongState,
)
from .pipeline import StreamReceiver, receiver_buffers
from .protocol.connection import Connection, Offer
from .protocol.messages import (
    Accept,
    Committed,
    End,
    Go,
    Join,
    Joined,
    Loaded,
    Migrate,
    Ping,
    Resolve,
    Resume,
    Resumed,
)
from .protocol.migration import Act, Event, Migration, Phase, Role
from .resolve import answer, ask
from .session import MAX_CHANNELS, Host, Inbound, Job, as_error

log = logging.getLogger("migd.destination")


async def serve_connection(host: Host, channel: Channel,
                           ciphers: tuple[str, ...] | None = None) -> None:
    """Authenticate a new connection, then hand it to what its first message asks
    for.  ``ciphers``: what this listener accepts (default: the host's list).

    Until the peer proves its identity it is a stranger: it holds a place in the
    host's gate (the oldest stranger makes room for a newcomer) and has
    ``handshake_timeout`` seconds in all to authenticate and say what it wants."""
    channel.stall_timeout = host.idle_timeout
    conn = Connection(Role.DESTINATION, host.identity, host.authorized,
                      Offer(ciphers=ciphers or host.ciphers, max_chunk=host.max_chunk),
                      payloads_inline=channel.placement is None)
    ep = Endpoint(channel, conn)
    _enter(host.gate, ep, _address_of(channel.peer))
    limit = host.handshake_timeout
    deadline = asyncio.get_running_loop().call_later(
        limit, ep.fail, HandshakeTimeout(f"no handshake and request within {limit:g}s"))
    try:
        # A HELLO naming an authorized key moves it to the second pool: strangers
        # can no longer crowd it out while it proves the key.
        await ep.bus.wait_until(lambda: bool(conn.claimed) or ep.established is not None,
                                host.idle_timeout, "the handshake")
        host.gate.leave(ep)
        _enter(host.claims, ep, conn.claimed)
        await ep.handshake(host.idle_timeout)
        host.claims.leave(ep)
        first = await ep.next_control(host.idle_timeout)
        if not isinstance(first, Migrate | Join | Resume | Resolve):
            raise ProtocolError(f"expected 'migrate', 'join', 'resume' or 'resolve', peer sent "
                                f"{first.T!r}")
    except BaseException as exc:
        err = as_error(exc)
        result = ("timeout" if isinstance(err, HandshakeTimeout) else
                  "dropped" if isinstance(err, Busy) and ep.established is None else "refused")
        host.on_handshake(result)
        _refused(channel.peer, err)
        await ep.abort(err)
        if not isinstance(exc, Exception):
            raise
        return
    finally:
        deadline.cancel()
        host.gate.leave(ep)
        host.claims.leave(ep)
    host.on_handshake("ok")
    if isinstance(first, Join):
        await _join(host, ep, first)
    elif isinstance(first, Resume):
        await _resume(host, ep, first)
    elif isinstance(first, Resolve):
        await answer(host, ep, first)
    else:
        job = Job("destination", first.device, peer=f"{_peer_name(ep)}@{channel.peer}",
                  mid=first.id, id=first.id)
        job.task = asyncio.current_task()
        await DestinationDriver(host, job, first, ep).run()


def _enter(gate: Gate[Endpoint], ep: Endpoint, key: str) -> None:
    for old in gate.enter(ep, key):
        if old.established is None:
            old.fail(Busy("too many connections waiting to authenticate: the oldest is "
                          "dropped"))


_REFUSALS = LogThrottle()


def _refused(peer: str, err: MigdError) -> None:
    say, skipped = _REFUSALS.allow(time.monotonic())
    if skipped:
        log.warning("%d more refused connections not logged", skipped)
    if say:
        log.warning("connection from %s refused: %s", peer, err.message)


def _address_of(peer: str) -> str:
    """The peer's host, for the per-host limit (``ip:port`` -> ``ip``)."""
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() else peer


def _peer_name(ep: Endpoint) -> str:
    return ep.established.peer_name if ep.established is not None else "?"


async def _refuse(ep: Endpoint, err: MigdError, what: str) -> None:
    log.warning("%s from %s refused: %s", what, ep.channel.peer, err.message)
    await ep.abort(err)


async def _join(host: Host, ep: Endpoint, msg: Join) -> None:
    drv: DestinationDriver | None = host.tokens.get(msg.token)
    k = msg.channel
    assert ep.established is not None
    try:
        if drv is None or drv.receiver is None:
            raise ProtocolError("join: no migration with that token")
        if ep.established.peer_key != drv.peer_key:
            raise ProtocolError("join: channel authenticated as another peer than its migration")
        if not 0 < k < drv.receiver.nchannels or k in drv.joined:
            raise ProtocolError(f"join: bad or duplicate channel number {k!r}")
        if k != ep.conn.channel:
            raise ProtocolError(f"join: channel {k} was opened as channel {ep.conn.channel}")
    except MigdError as err:
        await _refuse(ep, err, "channel")
        if drv is not None:
            drv.bus.fail(err)  # the real token, misused: fail closed
        return
    receiver = drv.receiver
    drv.joined.add(k)
    ep.bus = drv.bus  # from now on its failures are the migration's
    receiver.attach(k, ep)
    ep.handlers[Ping] = _ignore
    await ep.send_control(Joined(channel=k))


def _ignore(msg: object) -> None:
    pass


async def _resume(host: Host, ep: Endpoint, msg: Resume) -> None:
    """A source whose link broke continues its migration on this new connection."""
    assert ep.established is not None
    job = host.find(Role.DESTINATION, msg.id)
    drv = host.incoming.get(msg.id)
    try:
        if drv is None or job is None:
            # Why it ended here is what the source's operator needs (its own side
            # only saw the connection go).
            ended = "unknown here" if job is None else job.status.value + (
                f": {job.error.message}" if job.error is not None else "")
            raise ProtocolError(f"resume: migration {msg.id} cannot be resumed ({ended})")
        if ep.established.peer_key != drv.peer_key:
            raise ProtocolError("resume: authenticated as another peer than the migration's")
        if msg.token != drv.token:
            raise ProtocolError("resume: stale or wrong token")
        if not job.machine.may(Event.RESUMED):
            raise WrongState(f"resume: migration {msg.id} is {job.phase}, not resumable")
        if not 1 <= msg.channels <= MAX_CHANNELS:
            raise ProtocolError(f"resume: channels must be 1..{MAX_CHANNELS}")
    except MigdError as err:
        await _refuse(ep, err, "resume")
        return
    # (The token stays good until the resume completes: a resume that fails midway may
    # be tried again with it.  A completed one issues a new token.)
    job.deliver(Inbound(Event.RESUMED, (ep, msg)))


class DestinationDriver(Driver):
    role = Role.DESTINATION

    def __init__(self, host: Host, job: Job, req: Migrate | None, ep: Endpoint | None,
                 phase: Phase = Phase.SETUP) -> None:
        # The source counts its resumes; here each outage only has its time limit.
        resumable = req is not None and req.resumable
        super().__init__(host, job, Migration(Role.DESTINATION,
                                              host.policy(1000 if resumable else 0),
                                              phase=phase))
        self.req = req
        self.ep = ep
        job.wake = self._wake
        self.bus = ep.bus if ep is not None else Bus()
        self.peer_key = ep.established.peer_key if ep is not None and ep.established else b""
        job.peer_key = self.peer_key
        self.reply_to = list(req.reply_to) if req is not None else []
        self.resume_vf = req.resume if req is not None else True
        self.dev: Device | None = None
        self.device_name = ""
        self.receiver: StreamReceiver | None = None
        self.token = b""
        self.joined: set[int] = set()
        self.end: End | None = None
        self._pending: Inbound | None = None

    def _wake(self) -> None:
        self.bus.wake.set()

    # --- the loop (migd.driver), and what is the destination's own in it -----------------

    def _first_acts(self) -> tuple[Act, ...]:
        if self.m.phase is Phase.SETUP:
            return self.m.handle(Event.START, self._loop.time())
        return super()._first_acts()

    def _parked(self) -> bool:
        return self.m.finished or self.m.phase is Phase.LOADED  # device-resume goes on

    def _failed(self, err: MigdError) -> Event:
        self.error = err
        if isinstance(err, RemoteError) and self.m.may(Event.PEER_ABORT) \
                and not self.job.committed:
            self.job.decision = "abort"
            return Event.PEER_ABORT  # the source says it aborted: that is its decision
        if is_link_failure(err) and self.m.may(Event.LINK_DOWN):
            return Event.LINK_DOWN
        return Event.FAIL

    async def _wait(self, kind: type[Any] | None, timeout: float, what: str,
                    *inbound: Event) -> Any:
        """The next control message of ``kind`` on the link, or one of ``inbound``
        from the inbox (returned as it is); a link failure or silence raises."""
        while True:
            for item in self._drain(*inbound):
                return item
            if self.ep is not None and kind is not None:
                msg = self.ep.pending_control()
                if msg is not None:
                    if not isinstance(msg, kind):
                        raise ProtocolError(f"'{msg.T}' is not allowed while {self.m.phase.value}")
                    return msg
                await self.bus.wait_until(lambda: not self.job.inbox.empty()
                                          or self.ep is None or self.ep.has_control(),
                                          timeout, what)
            else:
                self.bus.wake.clear()
                await wait_event(self.bus.wake, timeout)
                if self.job.inbox.empty():
                    return None

    def _drain(self, *wanted: Event) -> list[Inbound]:
        keep: list[Inbound | Event] = []
        found: list[Inbound] = []
        while not self.job.inbox.empty():
            item = self.job.inbox.get_nowait()
            what = item.what if isinstance(item, Inbound) else item
            if not found and what in wanted:
                found.append(item if isinstance(item, Inbound) else Inbound(what))
            elif what is Event.RESUMED and isinstance(item, Inbound):
                _refuse_later(item, "the migration is past resuming")
            else:
                keep.append(item)
        for item in keep:
            self.job.inbox.put_nowait(item)
        return found

    def _event_of(self, item: Any) -> Event:
        """An inbox item as the event it stands for (a resumed link is kept for the act)."""
        if isinstance(item, Inbound):
            if item.what is Event.RESUMED:
                self._pending = item
            return item.what
        raise AssertionError(item)

    # --- acts ------------------------------------------------------------------------------

    async def _arc(self, target: DeviceState) -> None:
        assert self.dev is not None
        await self._loop.run_in_executor(self.host.workers.io, self.dev.set_state, target)

    async def accept(self) -> None:
        host, job, req, ep = self.host, self.job, self.req, self.ep
        assert req is not None and ep is not None and ep.established is not None
        est = ep.established
        job.cpu_start = time.process_time()
        job.cipher = est.cipher
        job.transport = ep.channel.transport
        job.chunk_size = ep.conn.max_chunk
        job.channels = req.channels
        host.register(job)
        name = host.placed(req.vm, req.source_address, req.device)
        job.device = name
        if not 1 <= req.channels <= MAX_CHANNELS:
            raise ProtocolError(f"migrate: channels must be 1..{MAX_CHANNELS}")
        if not 1 <= req.ack_every <= 1024:
            raise ProtocolError("migrate: ack_every must be 1..1024")
        if host.find(Role.DESTINATION, req.id) is not job:
            raise ProtocolError(f"migrate: migration {req.id} is already known here")
        job.ticket = host.admission.incoming(receiver_buffers(ep.conn.max_chunk, req.channels))
        self.dev = dev = host.claim(name)
        self.device_name = name
        if req.kind != dev.kind:
            raise IncompatibleDevice(f"source device kind {req.kind!r} cannot load into "
                                     f"{dev.kind!r} device {name!r}")
        dev.check_compat(req.compat)
        job.total = dev.state_size()
        # Before the VF takes in anything: a restarted daemon must know to reset it.
        self._journal(journal.LOADING)
        await self._arc(DeviceState.RESUMING)
        limit = host.stream_limit_factor * dev.state_size() + (64 << 20)
        self.receiver = StreamReceiver(self.bus, dev, host.workers, job.counters,
                                       ep.conn.max_chunk, limit, channels=req.channels)
        self.receiver.ack_every = req.ack_every
        self._attach_control(ep)
        self._new_token()
        host.incoming[job.mid] = self
        await ep.send_control(Accept(limit=limit, token=self.token))
        job.setup_time_ms = int((time.monotonic() - job.started) * 1000)

    def _attach_control(self, ep: Endpoint) -> None:
        receiver = self.receiver
        assert receiver is not None
        receiver.attach(0, ep)
        ep.handlers[Ping] = _ignore

    def _new_token(self) -> None:
        self.host.tokens.pop(self.token, None)
        self.token = os.urandom(32)
        self.host.tokens[self.token] = self

    async def await_end(self) -> Event:
        item = await self._wait(End, self.host.idle_timeout, "the end record",
                                Event.RESUMED, Event.RESOLVED_ABORT)
        if isinstance(item, End):
            self.end = item
            return Event.END
        return self._event_of(item)

    async def verify(self) -> Event:
        assert self.receiver is not None and self.end is not None
        # The last chunks may be lost with a link that is half open: a resume then
        # arrives on a new connection, and is taken rather than waited out.
        if not await self.receiver.finish(self.end, self.host.idle_timeout,
                                          stop=lambda: not self.job.inbox.empty()):
            item = self._take(Event.RESUMED, Event.RESOLVED_ABORT)
            if item is not None:
                return self._event_of(item)
            raise ProtocolError("interrupted while verifying")
        self.host.faults.hit("destination", "after-end")
        # RESUMING -> STOP is where the device itself validates what it loaded.
        await self._arc(DeviceState.STOP)
        self.host.faults.hit("destination", "after-stop")
        return Event.VERIFIED

    async def journal_vote(self) -> None:
        self._journal(journal.VOTED)

    async def send_vote(self) -> None:
        assert self.ep is not None
        await self.ep.send_control(Loaded())
        self.host.faults.hit("destination", "after-loaded")

    async def await_decision(self) -> Event:
        item = await self._wait(Go, self.host.idle_timeout, "the source's decision",
                                Event.RESUMED, Event.RESOLVED_COMMIT, Event.RESOLVED_ABORT)
        if isinstance(item, Go):
            self.job.decision = "commit"
            self.host.faults.hit("destination", "after-go")
            return Event.GO
        return self._event_of(item)

    async def journal_commit(self) -> None:
        # It holds from now, whether or not the write makes it: the source stops for good.
        self.job.decision = "commit"
        self._journal(journal.COMMIT)
        self.host.faults.hit("destination", "after-decision")

    async def start_vf(self) -> Event:
        if not self.resume_vf:
            return Event.KEPT_STOPPED
        await self._arc(DeviceState.RUNNING)
        self.host.faults.hit("destination", "after-commit")
        return Event.STARTED

    async def send_committed(self) -> None:
        if self.ep is not None and self.bus.error is None:
            try:
                await self.ep.send_control(Committed(running=self.resume_vf))
            except MigdError as err:  # the source asks again if it has to
                log.info("incoming migration %s: could not confirm: %s", self.job.id,
                         err.message)

    async def journal_done(self) -> None:
        if self.record is not None:
            self.record.started = self.resume_vf
        self._journal(journal.COMPLETED, quiet=True)
        job, dev = self.job, self.dev
        job.rate = job.counters.transferred / max(1e-9, time.monotonic() - job.started)
        log.info("incoming migration %s into %s committed (%d bytes, %d channel(s), device %s)",
                 job.id, self.device_name, job.counters.transferred, job.channels,
                 dev.state.name if dev else "-")

    async def await_resume(self) -> Event:
        """The link broke before the vote: keep what is loaded, wait for the source."""
        await self._detach()
        log.warning("incoming migration %s: %s; waiting %.0fs for the source to resume",
                    self.job.id, self.error.message if self.error else "link lost",
                    self.m.policy.resume_timeout)
        while True:
            remaining = (self.m.deadline or 0) - self._loop.time()
            if remaining <= 0:
                return Event.RESUME_TIMEOUT
            item = await self._wait(None, remaining, "a resume", Event.RESUMED,
                                    Event.RESOLVED_ABORT)
            if item is not None:
                return self._event_of(item)

    async def _detach(self) -> None:
        if self.receiver is not None:
            await self.receiver.detach()
        if self.ep is not None:
            self.ep.channel.close()
        self.ep = None

    async def send_resumed(self) -> None:
        pending, self._pending = self._pending, None
        assert pending is not None and self.receiver is not None
        ep, msg = pending.payload
        await self._detach()
        rx = self.receiver
        # The source continues from what it last heard acknowledged; past what was
        # loaded here, that is a lie (or a bug): fail closed.
        if msg.index > rx.next_index or msg.offset > rx.written \
                or (msg.index == rx.next_index) != (msg.offset == rx.written):
            err = ProtocolError(f"resume at chunk {msg.index} / offset {msg.offset}: this "
                                f"destination acknowledged only up to chunk {rx.next_index} / "
                                f"offset {rx.written}")
            await ep.abort(err)
            raise err
        self.ep = ep
        self.bus = Bus()
        ep.bus = self.bus
        self.joined = set()
        rx.rebind(self.bus, msg.channels)
        self._attach_control(ep)
        self._new_token()
        self.job.channels = msg.channels
        await ep.send_control(Resumed(index=rx.next_index, offset=rx.written,
                                      announced=rx.announced, token=self.token,
                                      voted=self.m.voted))
        log.info("incoming migration %s resumed at chunk %d (offset %d), %d channel(s)",
                 self.job.id, rx.next_index, rx.written, msg.channels)

    async def resolve(self) -> Event:
        """Voted, and the link broke: ask the source how it decided (or, once committed,
        wait for the operator to retry a VF that would not start)."""
        job = self.job
        await self._detach()
        committed = self.job.committed
        if committed and self.m.phase is Phase.UNRESOLVED:
            job.unresolved = (f"committed, but the VF did not start: "
                              f"{self.error.message if self.error else '?'}")

        async def ask_source() -> Event | None:
            if committed:
                return None  # only the operator: the decision is known, the VF would not start
            try:
                outcome = await ask(self.host, self.reply_to, self.peer_key,
                                    Resolve(id=job.mid, decision=""), self.host.idle_timeout)
            except MigdError as err:
                job.unresolved = f"cannot reach the source: {err.message}"
                return None
            if outcome.decision in ("commit", "abort"):
                log.info("incoming migration %s: the source says %s", job.id, outcome.decision)
                return (Event.RESOLVED_COMMIT if outcome.decision == "commit"
                        else Event.RESOLVED_ABORT)
            if outcome.decision == "unknown":
                job.unresolved = "the source does not know this migration"
            return None

        return await self._settle(ask_source, Event.RESOLVED_COMMIT, Event.RESOLVED_ABORT,
                                  Event.RESUMED)

    def _inbound(self, item: Inbound) -> Event:
        return self._event_of(item)

    def _report_unresolved(self) -> None:
        job = self.job
        if job.committed:
            job.unresolved = (f"committed, but the VF did not start: "
                              f"{self.error.message if self.error else '?'}")
            hint = "'migd resolve %s --confirm' (or device-resume) tries again"
        else:
            hint = ("'migd resolve %s --confirm' starts it, '--resume-source' resets it (once "
                    "the source VF is known to run, or stay stopped)")
        log.error("incoming migration %s UNRESOLVED: %s; the VF %s stays stopped with the "
                  "loaded state. " + hint, job.id, job.unresolved, self.device_name, job.id)

    async def _pause(self, seconds: float) -> None:
        self.bus.wake.clear()
        await wait_event(self.bus.wake, seconds)

    async def reset_vf(self) -> None:
        """Before the vote, or on ABORT: wipe whatever was loaded."""
        job, dev = self.job, self.dev
        err = self.error or MigdError("aborted")
        job.decision = "abort"
        reset = True
        if self.receiver is not None:
            await self.receiver.stop()  # no chunk may land after the wipe
        if dev is not None:
            try:
                await self._loop.run_in_executor(self.host.workers.io, dev.reset)
            except Exception as exc:
                # It does not run the guest either way; the journal keeps saying what it
                # held, so the next start tries the reset again.
                reset = False
                log.error("incoming migration %s: reset of %s failed: %s", job.id, dev.name, exc)
        if self.record is not None and reset:
            self.record.reason = err.message
            self._journal(journal.RESET, quiet=True)
        if self.ep is not None:
            await self.ep.abort(err)
        self.error = self.job.error = err
        log.warning("incoming migration %s failed: %s", job.id, err.message)

    async def finish(self) -> None:
        self.host.incoming.pop(self.job.mid, None)
        self.host.tokens.pop(self.token, None)
        if self.receiver is not None:
            await self.receiver.close()
        if self.ep is not None:
            self.ep.channel.close()
        if self.dev is not None:
            self.host.busy.discard(self.device_name)
        self.job.finish(self.error if self.m.phase is Phase.RESET else None)
        self.host.finished(self.job)

    # --- the journal --------------------------------------------------------------------------

    def _new_record(self, phase: str) -> journal.Record:
        return journal.Record(role="destination", id=self.job.mid, phase=phase,
                              device=self.device_name, peer=self.reply_to,
                              peer_key=self.peer_key.hex(), resume=self.resume_vf)

    ACTS: ClassVar[dict[Act, Callable[[DestinationDriver], Awaitable[Event | None]]]] = {
        Act.ACCEPT: accept, Act.AWAIT_END: await_end, Act.VERIFY: verify,
        Act.JOURNAL_VOTE: journal_vote, Act.SEND_VOTE: send_vote,
        Act.AWAIT_DECISION: await_decision, Act.JOURNAL_COMMIT: journal_commit,
        Act.START_VF: start_vf, Act.SEND_COMMITTED: send_committed,
        Act.JOURNAL_DONE: journal_done, Act.AWAIT_RESUME: await_resume,
        Act.SEND_RESUMED: send_resumed, Act.RESOLVE: resolve, Act.RESET_VF: reset_vf,
        Act.FINISH: finish,
    }


def _refuse_later(item: Inbound, why: str) -> None:
    ep = item.payload[0] if isinstance(item.payload, tuple) else None
    if isinstance(ep, Endpoint):
        asyncio.get_running_loop().create_task(ep.abort(WrongState(f"resume: {why}")))


def recovered_destination(host: Host, rec: journal.Record, dev: Device) -> tuple[Job, DestinationDriver]:
    """An incoming migration that voted (or committed) before the daemon stopped."""
    job = Job("destination", rec.device, peer="", id=rec.id)
    job.recovered = True
    phase = Phase.COMMITTING if rec.phase == journal.COMMIT else Phase.RESOLVING
    drv = DestinationDriver(host, job, None, None, phase=phase)
    drv.m.policy.max_resumes = 0
    drv.m.deadline = asyncio.get_running_loop().time() + host.resolve_timeout
    drv.dev, drv.device_name, drv.record = dev, rec.device, rec
    drv.peer_key = bytes.fromhex(rec.peer_key)
    drv.reply_to = list(rec.peer)
    drv.resume_vf = rec.resume
    job.decision = "commit" if rec.phase == journal.COMMIT else ""
    host.incoming[job.mid] = drv
    return job, drv


async def resume_loaded(host: Host, job: Job, dev: Device) -> None:
    """device-resume: start a VF that an incoming migration committed and left stopped."""
    if dev.state != DeviceState.STOP:
        raise WrongState(f"device {dev.name} is {dev.state.name}, not the stopped VF migration "
                         f"{job.id} left loaded")
    loop = asyncio.get_running_loop()
    host.busy.add(dev.name)
    try:
        await loop.run_in_executor(host.workers.io, dev.set_state, DeviceState.RUNNING)
        job.machine.handle(Event.STARTED, loop.time())
        rec = host.journal.get("destination", job.mid) if host.journal is not None else None
        if rec is not None and host.journal is not None:
            rec.started = True
            host.journal.write(rec)
    finally:
        host.busy.discard(dev.name)
    log.info("device %s resumed (the state of incoming migration %s)", dev.name, job.id)
