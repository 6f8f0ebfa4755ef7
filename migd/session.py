"""What both migration drivers share: the job record, the host, the VM group.

The drivers themselves are :mod:`migd.source` and :mod:`migd.destination`; the
dialogue they follow is the table in :mod:`migd.protocol.migration`.  The rule
they keep is two-phase commit: the destination votes only after every byte
arrived, verified and loaded; the source decides COMMIT only after the vote and
journals it before it sends ``go``; before the decision the source rolls back
on any failure and the destination resets; after it, neither acts on its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from backends.base import Device
from backends.states import MigCap

from . import journald
from .admission import Admission, Gate, Ticket
from .codec import DEFAULT_COMPRESSION, CompressMode, parse_compress
from .convergence import Convergence
from .crypto import DEFAULT_CIPHER, ENCRYPTING
from .endpoint import wait_event
from .errors import (
    Busy,
    Cancelled,
    ConfigError,
    DeviceBusy,
    JournalFailed,
    MigdError,
    UnknownDevice,
    WrongState,
)
from .faults import Faults
from .identity import Presenter, Trust
from .journal import Journal
from .pipeline import Counters, Workers
from .pipeline.sharing import SharedLink
from .protocol.frames import DEFAULT_CHUNK
from .protocol.migration import (
    FINAL_STATUSES,
    Event,
    GroupDecision,
    Migration,
    Phase,
    Policy,
    Role,
    Status,
)
from .reservations import Reservations

log = logging.getLogger("migd.session")

MAX_CHANNELS = 16


@dataclasses.dataclass
class MigrateOptions:
    """What one outgoing migration is asked to do (QEMU's knobs where they exist)."""

    peer: str
    device: str
    dest_device: str = ""
    compress: CompressMode = dataclasses.field(
        default_factory=lambda: parse_compress(DEFAULT_COMPRESSION))
    ciphers: tuple[str, ...] = (DEFAULT_CIPHER,)
    chunk_size: int = DEFAULT_CHUNK
    precopy: bool = True
    downtime_limit_ms: int = 300
    max_iterations: int = 30
    resume: bool = True  # start the destination VF after loading
    timeout: float = 30.0
    inflight: int = 8
    channels: int = 2
    max_bandwidth: int = 0  # wire bytes/s, 0 = unlimited (QEMU's max-bandwidth)
    vm: str = ""  # the VM this VF belongs to, for placement on the destination
    #: Wait in ``pre-switchover`` for migrate-continue before stopping the VF (QEMU's
    #: pause-before-switchover capability).
    pause_before_switchover: bool = False
    #: A broken stream is resumed this many times in all, each within resume_timeout.
    max_resumes: int = 5
    resume_timeout: float = 60.0


@dataclasses.dataclass
class Inbound:
    """Something for a driver from outside its link, with what it brings (a
    resumed link's new connection, say)."""

    what: Event
    payload: Any = None


@dataclasses.dataclass
class Job:
    """One migration as ``query-migrate`` reports it."""

    role: str
    device: str
    peer: str = ""
    id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:12])
    #: The migration's id on the wire (the source's); ``id`` may differ on a host
    #: that is both ends of one migration (a VF moved to another VF of the host).
    mid: str = ""
    machine: Migration = dataclasses.field(init=False)
    counters: Counters = dataclasses.field(default_factory=Counters)
    total: int = 0
    started: float = dataclasses.field(default_factory=time.monotonic)
    setup_time_ms: int = 0
    total_time_ms: int = 0
    downtime_ms: int | None = None
    expected_downtime_ms: int | None = None
    dirty_sync_count: int = 0
    error: MigdError | None = None
    cipher: str = ""
    compress: str = ""
    channels: int = 1
    transport: str = ""
    chunk_size: int = 0  # as negotiated: the destination may cap what was asked
    rate: float = 0.0
    cpu_start: float = 0.0
    cpu_seconds: float = 0.0
    #: Why the outcome is not known here (status ``unresolved``).
    unresolved: str = ""
    #: Whether the job was taken up from the journal after a daemon restart.
    recovered: bool = False
    #: The outcome this side holds to, once it has one: "commit" (source: COMMIT journaled
    #: for it or its VM; destination: go, the source's or the operator's COMMIT accepted)
    #: or "abort" (a rollback or reset under way or done, an operator's abort).  Answers
    #: to the peer come from it, so that two answers never contradict each other.
    decision: str = ""
    #: The reason was logged at ERROR since the migration became unresolved.
    reported: bool = False
    #: Its driver stopped on an internal error: reported unresolved, held for an operator.
    stuck: bool = False
    #: The peer's identity key: only it may resume or resolve this migration.
    peer_key: bytes = b""
    #: The daemon stops without settling it (the journal has it).
    abandoned: bool = False
    #: The operator cancelled it (a cancel from anywhere else ends the driver at once).
    cancel_asked: bool = False
    #: Its leave to run on this host (``migd.admission``); None: not counted (recovered).
    ticket: Ticket | None = None

    task: asyncio.Task[None] | None = None
    done: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    #: Events from outside the driver's own link: the operator (continue, resolve),
    #: a resumed link, the peer's resolution.
    inbox: asyncio.Queue[Inbound | Event] = dataclasses.field(default_factory=asyncio.Queue)
    #: Wakes the driver's waits when the inbox gets something.
    wake: Callable[[], None] = lambda: None

    def __post_init__(self) -> None:
        self.mid = self.mid or self.id
        self.machine = Migration(Role(self.role))

    @property
    def status(self) -> Status:
        m = self.machine
        if self.stuck:
            return Status.UNRESOLVED
        if self.queued:
            return Status.QUEUED
        st = m.status()
        if st.value in FINAL_STATUSES and not self.done.is_set() and m.history:
            # Final only once the device is free again: "failed" means it can be
            # migrated again at once.
            return Status.CANCELLING if m.cancelled else m.status(m.history[-1][0])
        return st

    @property
    def phase(self) -> str:
        return self.machine.phase.value

    @property
    def queued(self) -> bool:
        """Waiting for a slot (``max_migrations``, the buffer budget) before it starts."""
        return (self.ticket is not None and not self.ticket.admitted.is_set()
                and self.machine.phase is Phase.SETUP and not self.machine.history)

    @property
    def decided(self) -> bool:
        """Source: COMMIT is its decision: its VF must never run again on its own."""
        return self.decision == "commit"

    @property
    def committed(self) -> bool:
        """Destination: it holds to COMMIT (heard, journaled or being journaled)."""
        return self.decision == "commit"

    @property
    def finished(self) -> bool:
        return self.status.value in FINAL_STATUSES

    def deliver(self, item: Inbound | Event) -> None:
        self.inbox.put_nowait(item)
        self.wake()

    def query(self) -> dict[str, Any]:
        now = time.monotonic()
        elapsed = self.total_time_ms if self.finished else int((now - self.started) * 1000)
        c = self.counters
        out: dict[str, Any] = {
            "id": self.id,
            "role": self.role,
            "device": self.device,
            "peer": self.peer,
            "status": self.status.value,
            "phase": self.phase,
            "total-time": elapsed,
            "setup-time": self.setup_time_ms,
            "transferred": c.transferred,
            "wire-bytes": c.wire_bytes,
            "total": self.total,
            "remaining": max(0, self.total - c.transferred) if not self.finished else 0,
            "precopy-bytes": c.precopy_bytes,
            "downtime-bytes": c.downtime_bytes,
            "dirty-sync-count": self.dirty_sync_count,
            "mbps": round(self.rate * 8 / 1e6, 1),
            "cipher": self.cipher,
            "transport": self.transport,
            "chunk-size": self.chunk_size,
            "compress": self.compress,
            "channels": self.channels,
            "chunks": c.chunks,
            "zero-chunks": c.zero_chunks,
            "compressed-chunks": c.compressed_chunks,
            "sparse-chunks": c.sparse_chunks,
            "auto-compress-windows": [c.auto_compressed_windows, c.auto_windows],
            "acked": c.acked,
            "resumes": self.machine.resumes,
            "resent-bytes": c.resent_bytes,
            "cpu-seconds": round(self.cpu_seconds, 3),
        }
        if self.mid != self.id:
            out["migration"] = self.mid
        if self.recovered:
            out["recovered"] = True
        if self.downtime_ms is not None:
            out["downtime"] = self.downtime_ms
        if self.expected_downtime_ms is not None and self.status == Status.ACTIVE:
            out["expected-downtime"] = self.expected_downtime_ms
        if self.status is Status.UNRESOLVED:
            out["unresolved-reason"] = self.unresolved or "?"
        if self.queued and self.ticket is not None:
            out["queue-position"] = self.ticket.position
        if self.error is not None:
            out["error-desc"] = self.error.message
            out["error-class"] = self.error.name
            before = [p for p, _ in self.machine.history if p is not Phase.ROLLING_BACK]
            if self.machine.phase in (Phase.ROLLED_BACK, Phase.RESET) and before:
                out["failed-phase"] = before[-1].value
        return out

    def finish(self, error: MigdError | None = None) -> None:
        if error is not None and self.error is None:
            self.error = error
        self.total_time_ms = int((time.monotonic() - self.started) * 1000)
        self.cpu_seconds = time.process_time() - self.cpu_start

    # --- what an operator may ask of a running migration --------------------------------

    def cancel(self) -> bool:
        """Cancel if the table still allows it (never after the commit decision, or a
        destination's vote).  False: nothing to cancel any more."""
        if self.task is None or self.task.done() or self.machine.finished:
            return False
        if self.decided or not self.machine.may_cancel():
            raise WrongState(f"migration {self.id} is {self.phase}: past the point where it can "
                             "be cancelled (the switchover is decided or voted; see "
                             "'migd resolve' if it is stuck)")
        self.cancel_asked = True
        self.task.cancel()
        return True

    def abandon(self) -> None:
        """Daemon shutdown: stop driving it now; the journal has what the next start needs."""
        self.abandoned = True
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def resume_switchover(self) -> None:
        """migrate-continue: leave ``pre-switchover``."""
        if self.machine.phase is not Phase.PAUSED:
            raise WrongState(f"migration {self.id} is {self.status.value}/{self.phase}, not "
                             "paused in pre-switchover")
        self.deliver(Event.CONTINUE)

    def check_settle(self, decision: str) -> None:
        """Whether the operator may settle it so (WrongState naming why not)."""
        if self.machine.phase not in (Phase.RESOLVING, Phase.UNRESOLVED):
            raise WrongState(f"migration {self.id} is {self.status.value}/{self.phase}: only an "
                             "unresolved (or resolving) migration is settled by hand")
        if self.role == Role.DESTINATION.value and self.committed and decision == "abort":
            raise WrongState(f"migration {self.id} committed here: this VF holds the only copy "
                             "of the state (the source's is stopped for good); resetting it "
                             "would lose the guest's device")

    def settle(self, decision: str) -> None:
        """The operator's decision for a migration whose outcome is not known here.  It
        holds from now on: what the peer is told agrees with it."""
        self.check_settle(decision)
        self.decision = decision
        self.deliver(Event.RESOLVED_COMMIT if decision == "commit" else Event.RESOLVED_ABORT)


@dataclasses.dataclass
class Host:
    """What a session needs from its daemon."""

    identity: Presenter
    authorized: Trust
    workers: Workers
    devices: dict[str, Device]
    #: The transport of peer addresses that name none (``host:port``).
    transport: str = "tcp"
    busy: set[str] = dataclasses.field(default_factory=set)
    ciphers: tuple[str, ...] = ENCRYPTING
    max_chunk: int = DEFAULT_CHUNK
    idle_timeout: float = 30.0
    #: Announced bytes a destination accepts, as a multiple of the device state size.
    stream_limit_factor: int = 8
    #: Told about every migration that ends (metrics).
    on_finish: Callable[[Job], None] | None = None
    #: Incoming placements made by prepare-incoming: (VM, source VF address) -> device.
    reservations: Reservations = dataclasses.field(
        default_factory=lambda: Reservations(None, 600.0))
    #: Local device -> its PCI address, sent along so the destination can place it.
    addresses: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Every migration of this host, both roles, by job id (the control socket's ids).
    jobs: dict[str, Job] = dataclasses.field(default_factory=dict)
    #: Incoming migrations' drivers, by their current join/resume token and by id
    #: (``migd.destination.DestinationDriver``; typed loosely to keep the layers apart).
    tokens: dict[bytes, Any] = dataclasses.field(default_factory=dict)
    incoming: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: Where votes and decisions are made durable (None: in-process tests only).
    journal: Journal | None = None
    #: Where this daemon listens: a destination asks here for an outcome.
    listen: list[str] = dataclasses.field(default_factory=list)
    #: A destination's side of a broken link: how long it waits for a resume, and
    #: how long either side asks for an outcome before reporting ``unresolved``.
    resume_timeout: float = 60.0
    resolve_timeout: float = 60.0
    faults: Faults = dataclasses.field(default_factory=Faults)
    #: Until a new connection has authenticated and said what it wants.
    handshake_timeout: float = 10.0
    #: Connections not yet authenticated (``migd.admission``): strangers, and those
    #: whose HELLO named an authorized key (by that name).
    gate: Gate[Any] = dataclasses.field(default_factory=lambda: Gate(64, 8))
    claims: Gate[Any] = dataclasses.field(default_factory=lambda: Gate(64, 64))
    #: Migrations and their buffers, both ways.
    admission: Admission = dataclasses.field(
        default_factory=lambda: Admission(8, 64, 512 << 20))
    #: Told how each incoming handshake ended: ok, refused, timeout, dropped (metrics).
    on_handshake: Callable[[str], None] = lambda result: None
    #: ``max_bandwidth_total``: wire bytes per second all outgoing migrations share
    #: (0: no host-wide cap).
    max_bandwidth_total: int = 0
    _shared: SharedLink | None = None

    def shared_link(self) -> SharedLink | None:
        """The host's cap that outgoing migrations share, at the configured rate (made
        on first use, in the event loop; a reload changes its rate)."""
        if not self.max_bandwidth_total:
            return None
        if self._shared is None:
            self._shared = SharedLink(self.max_bandwidth_total)
        self._shared.rate = self.max_bandwidth_total
        return self._shared

    def placed(self, vm: object, address: object, device: str) -> str:
        """The device an incoming VF loads into: the one reserved for it (by VM and
        address, or by address alone when only one reservation has it: sources on
        different hosts may reuse the same PCI addresses), else the one the source
        names.  Never a VF reserved for another VM."""
        rs = self.reservations
        address = address.lower() if isinstance(address, str) else ""
        vm = vm if isinstance(vm, str) else ""
        if address:
            if vm and (name := rs.get(vm, address)) is not None:
                rs.claim(vm, address)
                return name
            matches = rs.for_source(address)
            if not vm and len(matches) == 1:
                rs.claim(matches[0].vm, address)
                return matches[0].device
            if vm and matches:
                raise Busy(f"VF {address} is reserved here for VM "
                           f"{', '.join(sorted({m.vm or '-' for m in matches}))}, and this "
                           f"migration says VM {vm}")
        held = rs.holder(device)
        if held is not None:
            raise Busy(f"device {device} is reserved here for VF {held.source} of VM "
                       f"{held.vm or '-'}")
        return device

    def find(self, role: Role, mid: str) -> Job | None:
        """The live (or remembered) migration ``mid`` of ``role`` on this host."""
        return next((j for j in self.jobs.values() if j.role == role.value and j.mid == mid),
                    None)

    def register(self, job: Job) -> None:
        while job.id in self.jobs:  # both ends of one migration on this host
            job.id += ".in" if job.role == Role.DESTINATION.value else ".out"
        self.jobs[job.id] = job

    def finished(self, job: Job) -> None:
        if job.ticket is not None:
            ticket, job.ticket = job.ticket, None
            ticket.leave()  # its slot and buffers go to the next in the queue
        job.done.set()
        status = job.status.value
        if status in journald.MESSAGE_IDS:
            log.log(logging.INFO if status == "completed" else logging.WARNING,
                    "migration %s %s%s", job.id, status,
                    f": {job.error.message}" if job.error and status != "completed" else "",
                    extra=journald.event(status, job))
        if self.on_finish is not None:
            try:
                self.on_finish(job)
            except Exception:
                log.exception("migration observer failed")

    def claim(self, name: str) -> Device:
        dev = self.devices.get(name)
        if dev is None:
            raise UnknownDevice(f"no device named {name!r} on this host")
        if name in self.busy:
            raise DeviceBusy(f"device {name!r} is busy (migrating, or held by a migration "
                             "whose outcome is not settled)")
        self.busy.add(name)
        return dev

    def policy(self, max_resumes: int, resume_timeout: float | None = None) -> Policy:
        return Policy(max_resumes=max_resumes,
                      resume_timeout=self.resume_timeout if resume_timeout is None
                      else resume_timeout,
                      resolve_timeout=self.resolve_timeout)


def as_error(exc: BaseException) -> MigdError:
    if isinstance(exc, MigdError):
        return exc
    if isinstance(exc, asyncio.CancelledError):
        return Cancelled("migration cancelled")
    log.exception("unexpected failure", exc_info=exc)
    return MigdError(f"internal error: {exc.__class__.__name__}")


# --- whole-VM switchover --------------------------------------------------------------


class Switchover:
    """The devices of one VM switch over together.

    Every device reaches its P2P state (RUNNING_P2P / PRE_COPY_P2P) before any
    stops, so no device DMAs into a stopped peer.  One decision covers them all
    (:class:`~migd.protocol.migration.GroupDecision`): COMMIT once every device's
    destination voted, journaled once for the VM; the first failure before that
    aborts every device."""

    PHASES = ("converged", "p2p")
    #: Longest a device that cannot iterate waits before it looks at its own again.
    REPORT_WAIT = 0.05

    def __init__(self, devices: int) -> None:
        self.id = "vm-" + uuid.uuid4().hex[:9]
        self.size = devices
        self.decision = GroupDecision(devices)
        self.error: MigdError | None = None
        self.jobs: list[Job] = []
        self._reached: dict[str, set[int]] = {p: set() for p in self.PHASES}
        self._changed = asyncio.Event()
        self._convergence: Convergence | None = None
        self._reports = asyncio.Event()

    def convergence(self, limit_ms: int) -> Convergence:
        """The VM's pre-copy estimate, shared by its devices (see :mod:`migd.convergence`)."""
        if self._convergence is None:
            self._convergence = Convergence(self.size, limit_ms)
        return self._convergence

    async def reported(self) -> None:
        """Wait a little for a sibling's next pre-copy figures (a device that cannot
        iterate further waits so, rather than spinning)."""
        self._check()
        self._reports.clear()
        await wait_event(self._reports, self.REPORT_WAIT)
        self._check()

    def reporting(self) -> None:
        self._reports.set()

    def member(self, job: Job) -> int:
        return self.jobs.index(job)

    def _wake(self) -> None:
        self._changed.set()

    async def reach(self, phase: str, member: int, idle: Callable[[], Any] | None = None) -> None:
        """Wait until every device got to ``phase`` (idempotent for a member).
        ``idle`` runs every few seconds while waiting (keepalives)."""
        self._reached[phase].add(member)
        self._wake()
        while len(self._reached[phase]) < self.size:
            self._check()
            self._changed.clear()
            await wait_event(self._changed, 5.0)
            if idle is not None and not self._changed.is_set():
                await idle()
        self._check()

    def _check(self) -> None:
        if self.decision.decision == "abort":
            raise self.error or MigdError("another device of the VM failed")

    def fail(self, job: Job, err: MigdError) -> None:
        """A device failed before the decision: the VM's decision is ABORT."""
        if self.decision.fail() and self.error is None:
            self.error = MigdError(f"device {job.device} failed: {err.message}")
            self._wake()
            for sibling in self.jobs:
                if sibling is not job and sibling.machine.may_cancel():
                    sibling.cancel()

    def vote(self, member: int) -> bool:
        """``member``'s destination voted; True: it was the last vote (journal COMMIT
        for the VM, then :meth:`commit`)."""
        return self.decision.vote(member)

    def committing(self) -> None:
        """The VM's COMMIT is about to be journaled: from now on no device may roll
        back on its own (the write may reach the disk even if it reports a failure)."""
        for j in self.jobs:
            j.decision = "commit"

    def commit(self) -> None:
        """COMMIT is journaled for the VM: every device may send go."""
        self.decision.commit()
        self._wake()

    def stuck(self, err: MigdError) -> None:
        """The VM's decision could not be written: every device waits for an operator."""
        self.decision.decision = "stuck"
        self.error = err
        self._wake()

    async def decided(self, idle: Callable[[], Any] | None = None) -> None:
        """Wait for the VM's decision (keepalives from ``idle`` meanwhile)."""
        while self.decision.decision is None:
            self._changed.clear()
            await wait_event(self._changed, 5.0)
            if idle is not None and not self._changed.is_set():
                await idle()
        if self.decision.decision == "stuck":
            raise JournalFailed(self.error.message if self.error else "the VM's decision "
                                "could not be written")
        self._check()


@dataclasses.dataclass
class VmJob:
    """All VFs of one VM migrating as one job: totals and per-device figures."""

    vm: str
    peer: str
    jobs: list[Job]
    id: str = dataclasses.field(default_factory=lambda: "vm-" + uuid.uuid4().hex[:9])
    started: float = dataclasses.field(default_factory=time.monotonic)
    done: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def status(self) -> str:
        states = [j.status.value for j in self.jobs]
        if "unresolved" in states:
            return "unresolved"
        for final in ("failed", "cancelled"):
            if final in states and all(j.finished for j in self.jobs):
                return final
        if all(s == "completed" for s in states):
            return "completed"
        order = ["none", "queued", "setup", "active", "pre-switchover", "device", "cancelling"]
        live = [s for s in states if s in order]
        return min(live, key=order.index) if live else states[0]

    def query(self) -> dict[str, Any]:
        devs = [j.query() for j in self.jobs]
        out: dict[str, Any] = {
            "id": self.id, "role": "source", "vm": self.vm, "peer": self.peer,
            "status": self.status(), "device": ",".join(j.device for j in self.jobs),
            "phase": ",".join(sorted({d["phase"] for d in devs})),
            "total-time": max(d["total-time"] for d in devs),
            "setup-time": max(d["setup-time"] for d in devs),
            "dirty-sync-count": max(d["dirty-sync-count"] for d in devs),
            "cipher": devs[0]["cipher"], "transport": devs[0]["transport"],
            "compress": devs[0]["compress"],
            "channels": devs[0]["channels"], "devices": devs,
        }
        for key in ("transferred", "wire-bytes", "total", "remaining", "precopy-bytes",
                    "downtime-bytes", "chunks", "resumes", "resent-bytes"):
            out[key] = sum(d[key] for d in devs)
        downtimes = [d["downtime"] for d in devs if "downtime" in d]
        if len(downtimes) == len(devs):
            out["downtime"] = max(downtimes)  # they stop together: the longest is the VM's
        errors = [f"{d['device']}: {d['error-desc']}" for d in devs if "error-desc" in d]
        if errors:
            out["error-desc"] = "; ".join(errors)
        return out

    @property
    def finished(self) -> bool:
        return all(j.finished for j in self.jobs)

    def cancel(self) -> bool:
        return any([j.cancel() for j in self.jobs])

    def settle(self, decision: str) -> None:
        """The operator settles every device of the VM, or none."""
        for j in self.jobs:
            j.check_settle(decision)
        if decision == "abort" and any(j.machine.phase is Phase.DONE for j in self.jobs):
            raise WrongState(f"VM migration {self.id}: a device's destination already runs; "
                             "its siblings must not resume here")
        for j in self.jobs:
            j.settle(decision)

    def resume_switchover(self) -> None:
        if not any(j.machine.phase is Phase.PAUSED for j in self.jobs):
            raise WrongState(f"VM migration {self.id} is {self.status()}, not paused in "
                             "pre-switchover")
        for j in self.jobs:
            if j.machine.phase is Phase.PAUSED:
                j.resume_switchover()
            else:
                j.deliver(Event.CONTINUE)  # still on its way there: it goes on at once

    async def watch(self) -> None:
        await asyncio.gather(*(j.done.wait() for j in self.jobs))
        self.done.set()


def check_vm(host: Host, devices: list[str]) -> None:
    """QEMU's rule: a multi-device VM needs P2P on every device."""
    if len(devices) > 1:
        for name in devices:
            dev = host.devices.get(name)
            if dev is not None and not dev.caps & MigCap.P2P:
                raise ConfigError(f"device {name} has no P2P state: a VM with several devices "
                                  "cannot switch over atomically without it")


def check_options(opts: MigrateOptions, host: Host) -> None:
    if opts.device not in host.devices:
        raise UnknownDevice(f"no device named {opts.device!r} on this host; "
                            f"devices: {', '.join(sorted(host.devices)) or 'none'}")
    if not 4096 <= opts.chunk_size <= 16 << 20:
        raise ConfigError("chunk-size must be between 4 KiB and 16 MiB")
    if opts.downtime_limit_ms < 0:
        raise ConfigError("downtime-limit must not be negative")
    if not 1 <= opts.channels <= MAX_CHANNELS:
        raise ConfigError(f"channels must be between 1 and {MAX_CHANNELS}")
