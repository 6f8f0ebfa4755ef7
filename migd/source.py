"""The source side of a migration: a thin driver over the migration table.

:func:`run_source` feeds the :class:`~migd.protocol.migration.Migration` machine
events and carries out the acts it returns; each act is a method here, and the
last act of a transition produces the next event.  Whatever an act raises
becomes an event too: a cancel, a broken link (resumable before the vote), or
a failure.  What may happen in which phase, and what follows, is the table's
business, not this module's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import ClassVar

import transports
from backends.base import Device
from backends.states import DeviceState, MigCap
from transports.sockets import parse_address

from . import journal
from .codec import Encoder
from .convergence import Convergence
from .driver import Driver
from .endpoint import Bus, Endpoint, is_link_failure, wait_event
from .errors import (
    Cancelled,
    JournalFailed,
    MigdError,
    ProtocolError,
    RemoteError,
)
from .pipeline import StreamSender
from .protocol.connection import Connection, Offer
from .protocol.messages import (
    Accept,
    Committed,
    Go,
    InitialLoaded,
    InitialSent,
    Join,
    Joined,
    Loaded,
    Migrate,
    Ping,
    Resolve,
    Resume,
    Resumed,
)
from .protocol.migration import SOURCE_UNDECIDED, Act, Event, Migration, Phase, Role
from .resolve import ask, backoff, notify_abort
from .session import Host, Inbound, Job, MigrateOptions, Switchover

log = logging.getLogger("migd.source")

#: A waiting source says it is alive this often (the destination counts silence).
PING_EVERY = 5.0


async def open_channel(host: Host, peer: str, index: int, bus: Bus, timeout: float,
                       ciphers: tuple[str, ...], chunk: int) -> Endpoint:
    """Connect and authenticate one channel to ``peer`` (a migd listener)."""
    name, address = transports.REGISTRY.split(peer, host.transport)
    channel = await transports.REGISTRY.create(name).connect(address, timeout)
    channel.stall_timeout = timeout
    conn = Connection(Role.SOURCE, host.identity, host.authorized,
                      Offer(ciphers=ciphers, max_chunk=chunk), channel=index,
                      payloads_inline=channel.placement is None,
                      peer_host=dialled_host(address))
    ep = Endpoint(channel, conn, bus)
    try:
        await ep.handshake(timeout)
    except BaseException:
        channel.close()
        raise
    return ep


def dialled_host(address: str) -> str:
    """The host name a source dialled (what the destination's certificate must
    name); none for a transport within this host (a Unix socket path)."""
    return "" if address.startswith("/") else parse_address(address)[0]


def reachable(listen: list[str], local: str, host_local: bool = False) -> list[str]:
    """This daemon's listen addresses as the peer can dial them: a wildcard host
    (0.0.0.0, ::) becomes the address this end of the migration's link has, and a
    host-local one (rdma+shm) only for a peer on this host."""
    out = []
    for url in listen:
        name, address = transports.REGISTRY.split(url)
        if name == "rdma+shm" and not host_local:
            continue
        host, sep, port = address.rpartition(":")
        if sep and host.strip("[]") in ("0.0.0.0", "::", ""):
            if not local:
                continue
            address = f"[{local}]:{port}" if ":" in local else f"{local}:{port}"
        out.append(transports.REGISTRY.url(name, address))
    return out


async def run_source(host: Host, job: Job, opts: MigrateOptions,
                     vm: Switchover | None = None) -> None:
    """Migrate ``opts.device`` to ``opts.peer``; with ``vm``, together with the VM's
    other devices.  Never leaves the device stopped on a failure before the
    decision; never resumes it after."""
    await SourceDriver(host, job, opts, vm).run()


class SourceDriver(Driver):
    role = Role.SOURCE

    def __init__(self, host: Host, job: Job, opts: MigrateOptions,
                 group: Switchover | None = None, phase: Phase = Phase.SETUP) -> None:
        skip = set()
        if group is None:
            skip.add(Phase.VM_BARRIER)
        if not opts.pause_before_switchover:
            skip.add(Phase.PAUSED)
        super().__init__(host, job, Migration(Role.SOURCE, host.policy(
            opts.max_resumes, opts.resume_timeout), frozenset(skip), phase))
        self.opts = opts
        self.group = group
        job.wake = self._wake
        self.dev: Device | None = None
        self.claimed = False
        self.sender: StreamSender | None = None
        self.eps: list[Endpoint] = []
        self.bus = Bus()
        self.peer_key = b""
        self.limit = 0
        self.token = b""
        self.initial_offset: int | None = None  # where the initial bytes ended, once sent
        self.initial_loaded = False
        #: Pre-copy bytes sent so far, across a resume (the VM's rate counts them all).
        self.precopy_sent = 0
        self.end_sent = False
        self.t_stop: float | None = None
        self.dest_running = False
        self._notice: asyncio.Future[None] | None = None

    def _wake(self) -> None:
        self.bus.wake.set()

    def _watch(self, bus: Bus) -> Bus:
        """A broken channel breaks the link: close its others at once, so that a send
        blocked on one of them fails now rather than after its stall timeout."""
        def down(err: MigdError) -> None:
            if is_link_failure(err):
                for e in self.eps:
                    if e.bus is bus:
                        e.channel.close()
        bus.on_fail = down
        return bus

    @property
    def control(self) -> Endpoint:
        return self.eps[0]

    # --- the loop (migd.driver), and what is the source's own in it -----------------------

    def _step(self, event: Event) -> tuple[Act, ...]:
        if self.job.decided and event in (Event.FAIL, Event.CANCEL) \
                and self.m.phase is Phase.DECIDING:
            event = Event.DECIDED  # the VM's decision was taken: this device follows it
        came_from = self.m.phase
        acts = self.m.handle(event, self._loop.time())
        if self.m.phase is Phase.RECONNECTING and came_from is not Phase.RECONNECTING:
            log.warning("migration %s: %s; resuming (%d of %d)", self.job.id,
                        self.error.message if self.error else "link lost", self.m.resumes,
                        self.m.policy.max_resumes)
        return acts

    def _cancelled(self, err: MigdError) -> Event:
        if self.group is not None and self.group.error is not None:
            self.error = self.group.error  # a sibling failed, not an operator's cancel
            return Event.FAIL
        return super()._cancelled(err)

    def _failed(self, err: MigdError) -> Event:
        said = self.control.bus.error if self.eps else None
        if is_link_failure(err) and (isinstance(said, RemoteError) or (
                said is not None and is_link_failure(said))):
            # The peer said why before its link went, or the link's first failure
            # names the peer (not a send that found the connection closed after it).
            err = said
        if (is_link_failure(err) and not isinstance(err, RemoteError)
                and self.m.phase in SOURCE_UNDECIDED and not self.m.repairs_link(self._loop.time())):
            # It ends the migration and the peer said nothing: say why it is not
            # resumed, and where the other half of the story is.
            why = ("before the destination accepted it" if self.m.phase is Phase.SETUP else
                   "resumes are off for it" if self.opts.max_resumes == 0 else
                   f"after {self.m.resumes} resumes" if self.m.may(Event.LINK_DOWN) else
                   f"not resumable in phase {self.m.phase.value}")
            err = type(err)(f"{err.message} ({why}; the destination's log says what it saw "
                            f"of migration {self.job.mid})")
        self.error = err
        if is_link_failure(err) and self.m.may(Event.LINK_DOWN):
            return Event.LINK_DOWN
        return Event.FAIL

    # --- acts -----------------------------------------------------------------------------

    async def _arc(self, target: DeviceState) -> None:
        assert self.dev is not None
        await self._loop.run_in_executor(self.host.workers.io, self.dev.set_state, target)

    async def connect(self) -> Event:
        host, job, opts = self.host, self.job, self.opts
        job.cpu_start = time.process_time()
        job.compress = str(opts.compress)
        job.channels = opts.channels
        self.dev = dev = host.claim(opts.device)
        self.claimed = True
        if job.ticket is not None and not job.ticket.admitted.is_set():
            await job.ticket.wait()  # queued: the device is held for it meanwhile
            job.started = time.monotonic()
            log.info("migration %s: its turn came", job.id)
        job.total = dev.state_size()
        precopy = opts.precopy and bool(dev.caps & MigCap.PRE_COPY)
        if not precopy:
            self.m.skip = self.m.skip | {Phase.PRECOPY, Phase.SWITCHOVER_ACK}
        ep = await self._channel(0, self._watch(self.bus))
        self.eps = [ep]
        assert ep.established is not None
        self.peer_key = job.peer_key = ep.established.peer_key
        job.cipher = ep.established.cipher
        job.transport = ep.channel.transport
        job.chunk_size = ep.conn.max_chunk
        if job.chunk_size < opts.chunk_size:
            log.info("migration %s: chunk size %d negotiated down to the destination's %d",
                     job.id, opts.chunk_size, job.chunk_size)
        log.info("migration %s: %s authenticated as %s, cipher %s, %d channel(s)", job.id,
                 opts.peer, ep.established.peer_name, job.cipher, opts.channels)
        await ep.send_control(Migrate(
            id=job.mid, device=opts.dest_device or opts.device, kind=dev.kind,
            compat=dev.compat(), state_size=dev.state_size(), precopy=precopy,
            resume=opts.resume, channels=opts.channels,
            source_address=host.addresses.get(opts.device, ""), vm=opts.vm,
            reply_to=reachable(host.listen, ep.channel.local,
                               host_local=ep.channel.transport == "rdma+shm"),
            resumable=opts.max_resumes > 0,
            ack_every=StreamSender.ack_every(dev, opts.max_resumes > 0, auto=StreamSender.judges(
                opts.compress, opts.max_bandwidth, local=ep.writes_peer_memory))))
        accept = await ep.expect(Accept, opts.timeout)
        self.limit, self.token = accept.limit, accept.token
        self.eps += await self._join(self.token, self.bus)
        job.setup_time_ms = int((time.monotonic() - job.started) * 1000)
        # Before the VF first leaves RUNNING: a restarted daemon must know it is ours.
        self._journal(journal.ACTIVE)
        self.sender = StreamSender(self.eps, dev, Encoder(opts.compress), host.workers,
                                   job.counters, opts.inflight, opts.max_bandwidth, opts.timeout,
                                   keep=opts.max_resumes > 0, shared=host.shared_link())
        self._handlers()
        return Event.ACCEPTED

    async def _channel(self, index: int, bus: Bus) -> Endpoint:
        opts = self.opts
        ep = await open_channel(self.host, opts.peer, index, bus, opts.timeout, opts.ciphers,
                                opts.chunk_size)
        assert ep.established is not None
        if self.peer_key and ep.established.peer_key != self.peer_key:
            ep.channel.close()
            raise ProtocolError(f"{opts.peer} now authenticates as another peer than the one "
                                "this migration started with")
        return ep

    async def _join(self, token: bytes, bus: Bus) -> list[Endpoint]:
        eps = []
        try:
            for k in range(1, self.opts.channels):
                extra = await self._channel(k, bus)
                eps.append(extra)
                await extra.send_control(Join(token=token, channel=k))
                await extra.expect(Joined, self.opts.timeout)
        except BaseException:
            for e in eps:
                e.channel.close()
            raise
        return eps

    def _handlers(self) -> None:
        def loaded(msg: InitialLoaded) -> None:
            self.initial_loaded = True

        self.control.handlers[InitialLoaded] = loaded
        self.control.handlers[Ping] = lambda msg: None

    async def iterate(self) -> Event:
        """Pre-copy: iterate while what is pending would not fit the downtime limit at
        the measured rate (or until the iterations or the announce room run out).  For
        a VM the estimate is the VM's (:mod:`migd.convergence`): a device keeps sending
        what its guest dirties until all of them fit together."""
        dev, sender, job, opts = self.dev, self.sender, self.job, self.opts
        assert dev is not None and sender is not None
        if dev.state == DeviceState.RUNNING:
            await self._arc(DeviceState.PRE_COPY)
        if self.initial_offset is not None and not self.initial_loaded:
            await sender.control.send_control(InitialSent(offset=self.initial_offset))
        group = self.group
        if group is None:
            vm, member = Convergence(1, opts.downtime_limit_ms), 0
        else:
            vm, member = group.convergence(opts.downtime_limit_ms), group.member(self.job)
        vm.start(time.monotonic())
        pinged = time.monotonic()
        while True:
            info = dev.precopy_info()
            pending = info.initial_bytes + info.dirty_bytes
            initial_done = info.initial_bytes == 0
            if initial_done and self.initial_offset is None:
                self.initial_offset = sender.offset
                await sender.control.send_control(InitialSent(offset=sender.offset))
            final = initial_done and (
                pending == 0 or job.dirty_sync_count >= opts.max_iterations
                or self.limit - sender.announced - dev.stop_copy_size() - pending < 0)
            vm.report(member, pending=pending, sent=self.precopy_sent,
                      initial_done=initial_done, final=final)
            if group is not None and not final:  # (final ones would only wake each other)
                group.reporting()
            now = time.monotonic()
            job.rate = vm.rate(now)
            job.expected_downtime_ms = vm.expected_ms(now)
            if vm.converged(now):
                return Event.CONVERGED
            if final:
                # Nothing this device may send: its siblings' next figures decide.
                assert group is not None
                await group.reported()
                self.control.bus.check()
                if time.monotonic() - pinged >= PING_EVERY:
                    pinged = time.monotonic()
                    await self._ping()
                continue
            self.precopy_sent += await sender.send(pending)
            job.dirty_sync_count += 1

    async def await_initial(self) -> Event:
        """switchover-ack: stop the source only once the destination loaded the initial bytes."""
        await self.control.bus.wait_until(lambda: self.initial_loaded, self.opts.timeout,
                                          "'initial-loaded'")
        return Event.INITIAL_LOADED

    async def reach_p2p(self) -> Event:
        assert self.group is not None and self.dev is not None
        member = self.group.member(self.job)
        # A device that does not pre-copy has nothing to iterate: its siblings' estimate
        # must not wait for figures from it.  (One that did has converged already.)
        rest = 0
        if self.dev.state == DeviceState.RUNNING:  # no pre-copy: all of it moves stopped
            with contextlib.suppress(MigdError):
                rest = self.dev.stop_copy_size()
        self.group.convergence(self.opts.downtime_limit_ms).done(member, rest)
        self.group.reporting()
        await self.group.reach("converged", member, self._ping)
        p2p = (DeviceState.PRE_COPY_P2P if self.dev.state in (DeviceState.PRE_COPY,
                                                              DeviceState.PRE_COPY_P2P)
               else DeviceState.RUNNING_P2P)
        await self._arc(p2p)
        await self.group.reach("p2p", member, self._ping)  # none stops before all stopped DMA
        return Event.P2P

    async def _ping(self) -> None:
        self.control.bus.check()
        await self.control.send_control(Ping())

    async def await_continue(self) -> Event:
        """pre-switchover: the VF runs (or is in P2P) until the operator says go on."""
        log.info("migration %s: paused before switchover; 'migd migrate-continue %s' goes on",
                 self.job.id, self.job.id)
        while True:
            if self._take(Event.CONTINUE):
                return Event.CONTINUE
            bus = self.control.bus
            bus.check()
            bus.wake.clear()
            await wait_event(bus.wake, PING_EVERY)
            if not bus.wake.is_set():
                await self._ping()

    async def stop_vf(self) -> None:
        assert self.sender is not None and self.dev is not None
        if self.t_stop is None:
            # While the VF still runs: the destination accepts what stop-copy will send.
            room = self.limit - self.sender.announced
            await self.sender.reserve(min(self.dev.stop_copy_size(), max(0, room)))
            self.t_stop = time.monotonic()
        await self._arc(DeviceState.STOP_COPY)
        self.sender.downtime_phase = True
        self.host.faults.hit("source", "after-stop")

    async def send_rest(self) -> Event:
        assert self.sender is not None
        await self.sender.send(None)
        await self.control.send_control(self.sender.end_record())
        self.end_sent = True
        self.host.faults.hit("source", "after-end")
        return Event.END_SENT

    async def await_vote(self) -> Event:
        await self.control.expect(Loaded, self.opts.timeout)
        self.host.faults.hit("source", "after-loaded")
        return Event.VOTED

    async def decide(self) -> Event:
        """The one decision: COMMIT, journaled before anyone acts on it.  It holds from
        the moment the write starts (a write that reports failure may still be on
        disk): a failed write leaves the VF stopped and the outcome to an operator."""
        group = self.group
        try:
            if group is None:
                self.job.decision = "commit"
                self._journal(journal.COMMIT)
            elif group.vote(group.member(self.job)):
                # The last vote of the VM: one record decides for every device, atomically.
                group.committing()
                try:
                    self._journal_group(journal.COMMIT)
                except OSError as exc:
                    raise JournalFailed(f"journal: {exc.strerror}") from None
                group.commit()
            else:
                await group.decided(self._ping)
        except JournalFailed as err:
            if group is not None:
                group.stuck(err)
            self.error = err
            self.job.unresolved = (f"the COMMIT decision could not be written ({err.message}); "
                                   "it may be on disk: neither go nor abort was sent")
            return Event.STUCK
        self.host.faults.hit("source", "after-decision")
        log.info("migration %s: decided COMMIT", self.job.id)
        return Event.DECIDED

    async def send_go(self) -> None:
        await self.control.send_control(Go())
        self.host.faults.hit("source", "after-go")

    async def stop_for_good(self) -> None:
        assert self.dev is not None
        try:
            await self._arc(DeviceState.STOP)
        except MigdError as err:  # the decision stands; the VF is stopped either way
            log.error("migration %s: committed, but STOP_COPY -> STOP failed: %s",
                      self.job.id, err.message)

    async def await_confirm(self) -> Event:
        done = await self.control.expect(Committed, self.opts.timeout)
        self.dest_running = done.running
        self.host.faults.hit("source", "after-commit")
        return Event.CONFIRMED

    async def journal_done(self) -> None:
        job = self.job
        if self.t_stop is not None:
            job.downtime_ms = int((time.monotonic() - self.t_stop) * 1000)
        job.rate = job.counters.transferred / max(1e-9, time.monotonic() - job.started)
        self._journal(journal.COMPLETED, quiet=True)
        log.info("migration %s completed: %d bytes, downtime %s ms, destination %s", job.id,
                 job.counters.transferred, job.downtime_ms,
                 "running" if self.dest_running else "stopped")

    async def reconnect(self) -> Event:
        """A new link to the same destination, continuing from its loaded position."""
        assert self.sender is not None
        await self.sender.suspend()
        attempt = self.m.history.count((Phase.RECONNECTING, Event.LINK_DOWN))
        await asyncio.sleep(backoff(attempt))
        first = self.sender.position
        bus = Bus()
        ep = await self._channel(0, bus)
        eps = [ep]
        try:
            await ep.send_control(Resume(id=self.job.mid, token=self.token, index=first[0],
                                         offset=first[1], channels=self.opts.channels))
            resumed = await ep.expect(Resumed, self.opts.timeout)
            eps += await self._join(resumed.token, bus)
        except BaseException:
            for e in eps:
                e.channel.close()
            raise
        if resumed.voted and (not self.end_sent or resumed.index != self.sender.index):
            raise ProtocolError("resumed: the destination says it voted on a stream this "
                                "source has not finished")
        self.bus, self.eps, self.token = self._watch(bus), eps, resumed.token
        self.sender.rebind(eps, resumed.index, resumed.offset, resumed.announced)
        self._handlers()
        await self.sender.resend()
        log.info("migration %s: resumed at chunk %d (offset %d) on %d channel(s)%s", self.job.id,
                 resumed.index, resumed.offset, len(eps),
                 ", the destination had voted" if resumed.voted else "")
        return Event.RECONNECTED_VOTED if resumed.voted else Event.RECONNECTED

    def _report_unresolved(self) -> None:
        log.error("migration %s UNRESOLVED: %s; the source VF stays stopped. 'migd resolve "
                  "%s --confirm' once the destination VF runs, or '--resume-source' once it "
                  "is reset", self.job.id, self.job.unresolved, self.job.id)

    async def resolve(self) -> Event:
        """After COMMIT: make sure the destination heard it (it commits on hearing)."""
        job = self.job
        for e in self.eps:
            e.channel.close()

        async def ask_destination() -> Event | None:
            if not job.decided:
                return None  # stuck without a decision: only an operator settles it
            try:
                outcome = await ask(self.host, [self.opts.peer], self.peer_key,
                                    Resolve(id=job.mid, decision="commit"), self.opts.timeout)
            except MigdError as err:
                job.unresolved = f"cannot reach the destination: {err.message}"
                return None
            if outcome.decision == "commit":
                log.info("migration %s: the destination confirms COMMIT", job.id)
                return Event.RESOLVED_COMMIT
            if outcome.decision != "pending":
                job.unresolved = (f"the destination answers {outcome.decision!r} to this "
                                  "source's COMMIT")
                if self.m.phase is Phase.RESOLVING:
                    return Event.RESOLVE_TIMEOUT
            return None

        return await self._settle(ask_destination, Event.RESOLVED_COMMIT, Event.RESOLVED_ABORT)

    def _inbound(self, item: Inbound) -> Event:
        log.warning("migration %s settled by the operator: %s", self.job.id, item.what.value)
        return item.what

    async def _pause(self, seconds: float) -> None:
        self.bus.wake.clear()
        await wait_event(self.bus.wake, seconds)

    async def rollback(self) -> Event:
        """Before the decision: the VF runs again with its state intact, then the peer is
        told.  A VF that will not run again is never reset here while the destination
        may hold the only complete copy (the end record went out): then nobody is told
        ABORT, and the migration is unresolved for an operator."""
        job, dev = self.job, self.dev
        err = self.error or MigdError("interrupted")
        if self.group is not None:
            self.group.fail(job, err)
        if self.sender is not None:
            await self.sender.stop()
        if dev is not None and self.claimed:
            try:
                await self._loop.run_in_executor(self.host.workers.io, dev.set_state,
                                                 DeviceState.RUNNING)
            except MigdError as exc:
                if self.end_sent or job.decided:
                    return self._stuck_rollback(exc)
                log.error("migration %s: %s would not resume (%s); resetting it", job.id,
                          dev.name, exc.message)  # the destination has no complete copy
                with contextlib.suppress(Exception):
                    await self._loop.run_in_executor(self.host.workers.io, dev.reset)
        job.decision = "abort"
        cancelled = isinstance(err, Cancelled)
        if self.eps:
            if not cancelled:
                err = await self.control.peer_reason(err)
            bus_error = self.control.bus.error
            link_down = (self.m.resumes > 0 or is_link_failure(err)
                         or (bus_error is not None and is_link_failure(bus_error)))
            await self.control.abort(err)
            for e in self.eps[1:]:
                e.channel.close()
            if link_down and self.token:
                # The destination may not have heard: tell it over a new connection.
                self._notice = asyncio.ensure_future(notify_abort(
                    self.host, [self.opts.peer], self.peer_key, self.job.mid))
        if self.record is not None:
            self.record.reason = err.message
            self._journal(journal.ABORTED, quiet=True)
        self.error = self.job.error = err
        log.warning("migration %s %s: %s (source device %s)", job.id,
                    "cancelled" if cancelled else "failed", err.message,
                    dev.state.name if dev else "-")
        return Event.ROLLED

    def _stuck_rollback(self, exc: MigdError) -> Event:
        for e in self.eps:
            e.channel.close()
        self.job.decision = ""
        self.job.unresolved = (f"the source VF did not come back to RUNNING ({exc.message}); "
                               "the destination may hold the only complete copy, so it was "
                               "not told to abort")
        return Event.STUCK

    async def finish(self) -> None:
        if self.sender is not None:
            await self.sender.close()
        for e in self.eps:
            e.channel.close()
        if self.claimed:
            self.host.busy.discard(self.opts.device)
        # Reported finished only once the device is free again: "failed" means it
        # can be migrated again at once.
        self.job.finish(self.error if self.m.phase is Phase.ROLLED_BACK else None)
        self.host.finished(self.job)

    # --- the journal -------------------------------------------------------------------------

    def _new_record(self, phase: str) -> journal.Record:
        return journal.Record(role="source", id=self.job.mid, phase=phase,
                              device=self.opts.device, peer=[self.opts.peer],
                              peer_key=self.peer_key.hex(),
                              group=self.group.id if self.group is not None else "")

    def _journal_group(self, phase: str) -> None:
        j = self.host.journal
        assert self.group is not None
        if j is None:
            return
        j.write(journal.Record(role="group", id=self.group.id, phase=phase,
                               members=[m.mid for m in self.group.jobs]))

    ACTS: ClassVar[dict[Act, Callable[[SourceDriver], Awaitable[Event | None]]]] = {
        Act.CONNECT: connect, Act.ITERATE: iterate, Act.AWAIT_INITIAL: await_initial,
        Act.REACH_P2P: reach_p2p, Act.AWAIT_CONTINUE: await_continue, Act.STOP_VF: stop_vf,
        Act.SEND_REST: send_rest, Act.AWAIT_VOTE: await_vote, Act.DECIDE: decide,
        Act.SEND_GO: send_go, Act.STOP_FOR_GOOD: stop_for_good,
        Act.AWAIT_CONFIRM: await_confirm, Act.RECONNECT: reconnect, Act.RESOLVE: resolve,
        Act.ROLLBACK: rollback, Act.JOURNAL_DONE: journal_done, Act.FINISH: finish,
    }


def recovered_source(host: Host, rec: journal.Record, dev: Device,
                     phase: Phase = Phase.RESOLVING) -> tuple[Job, SourceDriver]:
    """A source migration decided COMMIT before the daemon stopped: its VF stays
    stopped; the destination must hear the decision.  (``UNRESOLVED``: undecided, but
    its VF would not resume: an operator settles it.)"""
    job = Job("source", rec.device, peer=rec.peer[0] if rec.peer else "", id=rec.id)
    job.recovered = True
    job.decision = "commit" if phase is Phase.RESOLVING else ""
    opts = MigrateOptions(peer=job.peer, device=rec.device)
    drv = SourceDriver(host, job, opts, phase=phase)
    drv.m.deadline = asyncio.get_running_loop().time() + host.resolve_timeout
    drv.dev, drv.claimed, drv.record = dev, True, rec
    drv.peer_key = job.peer_key = bytes.fromhex(rec.peer_key)
    return job, drv
