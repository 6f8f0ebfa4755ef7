"""Migration sessions: the source and destination drivers, and the job record.

The rule both drivers keep: until the destination has verified the whole
stream and committed, the source device goes back to RUNNING on any failure and
the destination device is reset; the destination never runs partial or
unverified state.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

import transports
from backends.base import Device
from backends.states import DeviceState, MigCap
from transports.base import Channel

from .codec import DEFAULT_COMPRESSION, CompressMode, Encoder, parse_compress
from .crypto import DEFAULT_CIPHER, ENCRYPTING
from .endpoint import Bus, Endpoint
from .errors import (
    Cancelled,
    ConfigError,
    DeviceBusy,
    IncompatibleDevice,
    MigdError,
    ProtocolError,
    UnknownDevice,
)
from .identity import AuthorizedKeys, Identity
from .protocol.connection import Connection, Offer, Role
from .protocol.frames import DEFAULT_CHUNK
from .protocol.session import SessionEvent, SessionState, Status
from .stream import Counters, StreamReceiver, StreamSender, Workers

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


@dataclasses.dataclass
class Job:
    """One migration as ``query-migrate`` reports it."""

    role: str
    device: str
    peer: str = ""
    id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:12])
    state: SessionState = dataclasses.field(init=False)
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
    phase: str = "setup"
    rate: float = 0.0
    cpu_start: float = 0.0
    cpu_seconds: float = 0.0
    task: asyncio.Task[None] | None = None
    done: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.state = SessionState(self.role)

    @property
    def status(self) -> Status:
        return self.state.status

    def query(self) -> dict[str, Any]:
        now = time.monotonic()
        elapsed = self.total_time_ms if self.state.finished else int((now - self.started) * 1000)
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
            "remaining": max(0, self.total - c.transferred) if not self.state.finished else 0,
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
            "cpu-seconds": round(self.cpu_seconds, 3),
        }
        if self.downtime_ms is not None:
            out["downtime"] = self.downtime_ms
        if self.expected_downtime_ms is not None and self.status == Status.ACTIVE:
            out["expected-downtime"] = self.expected_downtime_ms
        if self.error is not None:
            out["error-desc"] = self.error.message
            out["error-class"] = self.error.name
        return out

    def finish(self, event: SessionEvent, error: MigdError | None = None) -> None:
        if error is not None and self.error is None:
            self.error = error
        self.state.fire(event)
        self.total_time_ms = int((time.monotonic() - self.started) * 1000)
        self.cpu_seconds = time.process_time() - self.cpu_start


@dataclasses.dataclass
class Host:
    """What a session needs from its daemon."""

    identity: Identity
    authorized: AuthorizedKeys
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
    reservations: dict[tuple[str, str], str] = dataclasses.field(default_factory=dict)

    def placed(self, vm: object, address: object) -> str | None:
        """The device reserved for an incoming VF: by VM and address, or by address
        alone when only one reservation has it (sources on different hosts may
        reuse the same PCI addresses)."""
        if not isinstance(address, str) or not address:
            return None
        address = address.lower()
        if isinstance(vm, str) and vm:
            return self.reservations.get((vm, address))
        matches = [d for (_, a), d in self.reservations.items() if a == address]
        return matches[0] if len(matches) == 1 else None
    #: Local device -> its PCI address, sent along so the destination can place it.
    addresses: dict[str, str] = dataclasses.field(default_factory=dict)

    def finished(self, job: Job) -> None:
        job.done.set()
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
            raise DeviceBusy(f"device {name!r} is already migrating")
        self.busy.add(name)
        return dev


def _as_error(exc: BaseException) -> MigdError:
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
    stops, so no device DMAs into a stopped peer; the destination resumes none
    until all are loaded and verified (a two-phase commit, ``loaded`` then
    ``go``).  The first failure aborts every barrier and fails the siblings, so
    all roll back."""

    PHASES = ("converged", "p2p", "loaded")

    def __init__(self, devices: int) -> None:
        self._barriers = {p: asyncio.Barrier(devices) for p in self.PHASES}
        self.error: MigdError | None = None
        self.jobs: list[Job] = []

    async def reach(self, phase: str) -> None:
        try:
            await self._barriers[phase].wait()
        except asyncio.BrokenBarrierError:
            raise self.error or MigdError("another device of the VM failed") from None

    async def fail(self, job: Job, err: MigdError) -> None:
        if self.error is None:
            self.error = MigdError(f"device {job.device} failed: {err.message}")
            for b in self._barriers.values():
                await b.abort()
            for sibling in self.jobs:
                if sibling is not job and sibling.task is not None and not sibling.task.done():
                    sibling.task.cancel()


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
        for final in ("failed", "cancelled"):
            if final in states and all(j.state.finished for j in self.jobs):
                return final
        if all(s == "completed" for s in states):
            return "completed"
        order = ["none", "setup", "active", "device", "cancelling"]
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
                    "downtime-bytes", "chunks"):
            out[key] = sum(d[key] for d in devs)
        downtimes = [d["downtime"] for d in devs if "downtime" in d]
        if len(downtimes) == len(devs):
            out["downtime"] = max(downtimes)  # they stop together: the longest is the VM's
        errors = [f"{d['device']}: {d['error-desc']}" for d in devs if "error-desc" in d]
        if errors:
            out["error-desc"] = "; ".join(errors)
        return out

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


# --- source -------------------------------------------------------------------------


async def _open_channel(host: Host, opts: MigrateOptions, bus: Bus, index: int) -> Endpoint:
    name, address = transports.REGISTRY.split(opts.peer, host.transport)
    channel = await transports.REGISTRY.create(name).connect(address, opts.timeout)
    channel.stall_timeout = opts.timeout
    conn = Connection(Role.SOURCE, host.identity, host.authorized,
                      Offer(ciphers=opts.ciphers, max_chunk=opts.chunk_size), channel=index,
                      payloads_inline=channel.placement is None)
    ep = Endpoint(channel, conn, bus)
    await ep.handshake(opts.timeout)
    return ep


async def run_source(host: Host, job: Job, opts: MigrateOptions,
                     vm: Switchover | None = None) -> None:
    """Migrate ``opts.device`` to ``opts.peer``; never leaves the device stopped on failure.
    With ``vm``, it switches over together with the VM's other devices."""
    job.cpu_start = time.process_time()
    job.state.fire(SessionEvent.START)
    job.compress = str(opts.compress)
    job.channels = opts.channels
    dev: Device | None = None
    eps: list[Endpoint] = []
    sender: StreamSender | None = None
    committed = False
    outcome: tuple[SessionEvent, MigdError | None] = (SessionEvent.FAIL, MigdError("interrupted"))
    try:
        dev = host.claim(opts.device)
        job.total = dev.state_size()
        bus = Bus()
        ep = await _open_channel(host, opts, bus, 0)
        eps.append(ep)
        assert ep.established is not None
        job.cipher = ep.established.cipher
        job.transport = ep.channel.transport
        job.chunk_size = ep.conn.max_chunk
        if job.chunk_size < opts.chunk_size:
            log.info("migration %s: chunk size %d negotiated down to the destination's %d",
                     job.id, opts.chunk_size, job.chunk_size)
        log.info("migration %s: %s authenticated as %s, cipher %s, %d channel(s)", job.id,
                 opts.peer, ep.established.peer_name, job.cipher, opts.channels)
        precopy = opts.precopy and bool(dev.caps & MigCap.PRE_COPY)
        await ep.send_control({
            "t": "migrate", "id": job.id, "device": opts.dest_device or opts.device,
            "kind": dev.kind, "compat": dev.compat(), "state_size": dev.state_size(),
            "precopy": precopy, "resume": opts.resume, "channels": opts.channels,
            "source_address": host.addresses.get(opts.device, ""), "vm": opts.vm,
            "two_phase": vm is not None,
        })
        accept = await ep.expect("accept", opts.timeout)
        limit, token = accept.get("limit"), accept.get("token")
        if not isinstance(limit, int) or not isinstance(token, bytes):
            raise ProtocolError("accept: missing stream limit or join token")
        for k in range(1, opts.channels):
            extra = await _open_channel(host, opts, bus, k)
            eps.append(extra)
            await extra.send_control({"t": "join", "token": token, "channel": k})
            await extra.expect("joined", opts.timeout)
        job.setup_time_ms = int((time.monotonic() - job.started) * 1000)
        job.state.fire(SessionEvent.ACCEPTED)
        ep.handlers["ack"] = lambda m: setattr(job.counters, "acked", int(m.get("offset", 0)))
        loaded: list[dict[str, Any]] = []
        ep.handlers["initial-loaded"] = loaded.append
        sender = StreamSender(eps, dev, Encoder(opts.compress), host.workers, job.counters,
                              opts.inflight, opts.max_bandwidth, opts.timeout)
        if precopy:
            await _precopy(dev, sender, job, opts, limit)
            # switchover-ack: stop the source only once the destination loaded the initial bytes
            job.phase = "switchover-ack"
            await bus.wait_until(lambda: bool(loaded), opts.timeout, "'initial-loaded'")
        if vm is not None:
            job.phase = "vm-barrier"
            await vm.reach("converged")
            p2p = DeviceState.PRE_COPY_P2P if precopy else DeviceState.RUNNING_P2P
            await asyncio.get_running_loop().run_in_executor(host.workers.io, dev.set_state, p2p)
            await vm.reach("p2p")  # no device stops before all stopped initiating DMA
        job.state.fire(SessionEvent.SWITCHOVER)
        job.phase = "stop-copy"
        t_stop = time.monotonic()
        await asyncio.get_running_loop().run_in_executor(
            host.workers.io, dev.set_state, DeviceState.STOP_COPY)
        sender.downtime_phase = True
        await sender.send(None)
        await ep.send_control(sender.end_record())
        job.phase = "commit"
        if vm is not None:
            await ep.expect("loaded", opts.timeout)
            await vm.reach("loaded")  # every device verified and loaded: now resume them
            await ep.send_control({"t": "go"})
        done = await ep.expect("committed", opts.timeout)
        committed = True
        job.downtime_ms = int((time.monotonic() - t_stop) * 1000)
        job.rate = job.counters.transferred / max(1e-9, time.monotonic() - job.started)
        dev.set_state(DeviceState.STOP)
        job.phase = "done"
        log.info("migration %s completed: %d bytes, downtime %d ms, destination %s", job.id,
                 job.counters.transferred, job.downtime_ms,
                 "running" if done.get("running") else "stopped")
        outcome = (SessionEvent.COMMITTED, None)
    except BaseException as exc:
        err = _as_error(exc)
        if vm is not None and not committed:
            if isinstance(err, Cancelled) and vm.error is not None:
                err = vm.error  # a sibling's failure, not an operator's cancel
            await vm.fail(job, err)
        if committed:
            # The guest runs on the destination now; only the local STOP failed.
            log.error("migration %s: committed, but stopping the source failed: %s", job.id, err)
            outcome = (SessionEvent.COMMITTED, err)
        else:
            if dev is not None and opts.device in host.busy:
                with contextlib.suppress(Exception):
                    dev.recover()
            cancelled = isinstance(err, Cancelled)
            if eps:
                if not cancelled:
                    err = await eps[0].peer_reason(err)
                await _abort_all(eps, err)
            log.warning("migration %s %s: %s (source device %s)", job.id,
                        "cancelled" if cancelled else "failed", err.message,
                        dev.state.name if dev else "-")
            if cancelled and job.status not in (Status.CANCELLING,):
                job.state.fire(SessionEvent.CANCEL)
            outcome = (SessionEvent.ROLLED_BACK if cancelled else SessionEvent.FAIL, err)
        if not isinstance(exc, Exception | asyncio.CancelledError):
            raise
    finally:
        if sender is not None:
            await sender.close()
        for e in eps:
            e.channel.close()
        if dev is not None:
            host.busy.discard(opts.device)
        # Reported finished only once the device is free again: "failed" means it
        # can be migrated again at once.
        job.finish(*outcome)
        host.finished(job)


async def _abort_all(eps: list[Endpoint], err: MigdError) -> None:
    """The reason goes on the control channel; the others just close."""
    await eps[0].abort(err)
    for e in eps[1:]:
        e.channel.close()


async def _precopy(dev: Device, sender: StreamSender, job: Job, opts: MigrateOptions,
                   limit: int) -> None:
    """Iterate while what is pending would not fit the downtime limit at the measured rate."""
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(sender.workers.io, dev.set_state, DeviceState.PRE_COPY)
    job.phase = "pre-copy"
    marked = False
    sent_total = 0
    t0 = time.monotonic()
    while True:
        info = dev.precopy_info()
        pending = info.initial_bytes + info.dirty_bytes
        elapsed = time.monotonic() - t0
        rate = sent_total / elapsed if elapsed > 0 and sent_total else 0.0
        job.rate = rate
        if rate:
            job.expected_downtime_ms = int(pending / rate * 1000)
        if info.initial_bytes == 0:
            if not marked:
                marked = True
                await sender.control.send_control({"t": "initial-sent", "offset": sender.offset})
            fits = rate > 0 and pending / rate * 1000 <= opts.downtime_limit_ms
            room = limit - sender.announced - dev.stop_copy_size() - pending
            if fits or pending == 0 or job.dirty_sync_count >= opts.max_iterations or room < 0:
                break
        sent_total += await sender.send(pending)
        job.dirty_sync_count += 1


# --- destination ----------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class Incoming:
    """An incoming migration that further channels may join."""

    job: Job
    peer_key: bytes
    receiver: StreamReceiver
    bus: Bus
    joined: set[int] = dataclasses.field(default_factory=set)


class _Buffers:
    """Where a connection's DATA payloads go; set once the connection has a role."""

    def __init__(self) -> None:
        self.take: Callable[[int], bytearray | memoryview | None] | None = None

    def __call__(self, size: int) -> bytearray | memoryview | None:
        if self.take is None:
            raise ProtocolError("data before the session accepted it")
        return self.take(size)


async def serve_connection(host: Host, channel: Channel, jobs: dict[str, Job],
                           incoming: dict[bytes, Incoming],
                           ciphers: tuple[str, ...] | None = None) -> None:
    """Authenticate a new connection; it starts a migration or joins one as a channel.
    ``ciphers``: what this listener accepts (default: the host's list)."""
    buffers = _Buffers()
    channel.stall_timeout = host.idle_timeout
    conn = Connection(Role.DESTINATION, host.identity, host.authorized,
                      Offer(ciphers=ciphers or host.ciphers, max_chunk=host.max_chunk),
                      data_buffers=buffers, payloads_inline=channel.placement is None)
    ep = Endpoint(channel, conn)
    try:
        await ep.handshake(host.idle_timeout)
        first = await ep.next_control(host.idle_timeout)
    except BaseException as exc:
        err = _as_error(exc)
        log.warning("connection from %s refused: %s", channel.peer, err.message)
        await ep.abort(err)
        if not isinstance(exc, Exception):
            raise
        return
    if first.get("t") == "join":
        await _join(host, ep, buffers, first, incoming)
    else:
        await _run_incoming(host, ep, buffers, first, jobs, incoming)


async def _join(host: Host, ep: Endpoint, buffers: _Buffers, msg: dict[str, Any],
                incoming: dict[bytes, Incoming]) -> None:
    token, k = msg.get("token"), msg.get("channel")
    session = incoming.get(token) if isinstance(token, bytes) else None
    assert ep.established is not None
    try:
        if session is None:
            raise ProtocolError("join: no migration with that token")
        if ep.established.peer_key != session.peer_key:
            raise ProtocolError("join: channel authenticated as another peer than its migration")
        if not isinstance(k, int) or not 0 < k < session.receiver.nchannels or k in session.joined:
            raise ProtocolError(f"join: bad or duplicate channel number {k!r}")
        if k != ep.conn.channel:
            raise ProtocolError(f"join: channel {k} was opened as channel {ep.conn.channel}")
    except MigdError as err:
        log.warning("channel from %s refused: %s", ep.channel.peer, err.message)
        await ep.abort(err)
        if session is not None:
            session.bus.fail(err)
        return
    session.joined.add(k)
    ep.bus = session.bus  # from now on its failures are the migration's
    buffers.take = lambda n: session.receiver.take_buffer(k, n)
    session.receiver.attach(k, ep)
    await ep.send_control({"t": "joined", "channel": k})
    await session.job.done.wait()
    ep.channel.close()


async def _run_incoming(host: Host, ep: Endpoint, buffers: _Buffers, req: dict[str, Any],
                        jobs: dict[str, Job], incoming: dict[bytes, Incoming]) -> None:
    """Load one incoming migration: verify, commit, or reset the device."""
    receiver: StreamReceiver | None = None
    job: Job | None = None
    dev: Device | None = None
    claimed = ""
    loaded = False
    outcome: tuple[SessionEvent, MigdError | None] = (SessionEvent.FAIL, MigdError("interrupted"))
    token = os.urandom(32)
    assert ep.established is not None
    est = ep.established
    try:
        if req.get("t") != "migrate":
            raise ProtocolError(f"expected 'migrate' or 'join', peer sent {req.get('t')!r}")
        name = req.get("device")
        placed = host.placed(req.get("vm"), req.get("source_address"))
        if placed is not None:
            name = placed  # the VF prepare-incoming reserved for it
        if not isinstance(name, str):
            raise ProtocolError("migrate: device name missing")
        nchan = req.get("channels", 1)
        if not isinstance(nchan, int) or not 1 <= nchan <= MAX_CHANNELS:
            raise ProtocolError(f"migrate: channels must be 1..{MAX_CHANNELS}")
        job = Job("destination", name, peer=f"{est.peer_name}@{ep.channel.peer}")
        if isinstance(req.get("id"), str):
            job.id = str(req["id"])[:64]
        job.cpu_start = time.process_time()
        job.cipher = est.cipher
        job.transport = ep.channel.transport
        job.chunk_size = ep.conn.max_chunk
        job.channels = nchan
        job.state.fire(SessionEvent.START)
        jobs[job.id] = job
        dev = host.claim(name)
        claimed = name
        compat = req.get("compat")
        if req.get("kind") != dev.kind or not isinstance(compat, dict):
            raise IncompatibleDevice(f"source device kind {req.get('kind')!r} cannot load into "
                                     f"{dev.kind!r} device {name!r}")
        dev.check_compat(compat)
        job.total = dev.state_size()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(host.workers.io, dev.set_state, DeviceState.RESUMING)
        limit = host.stream_limit_factor * dev.state_size() + (64 << 20)
        receiver = StreamReceiver(ep.bus, dev, host.workers, job.counters, ep.conn.max_chunk,
                                  limit, channels=nchan)
        receiver.attach(0, ep)
        buffers.take = lambda n: receiver.take_buffer(0, n) if receiver is not None else None
        ep.handlers["announce"] = receiver.announce
        ep.handlers["initial-sent"] = receiver.initial_sent
        incoming[token] = Incoming(job, est.peer_key, receiver, ep.bus)
        await ep.send_control({"t": "accept", "limit": limit, "token": token})
        job.setup_time_ms = int((time.monotonic() - job.started) * 1000)
        job.state.fire(SessionEvent.ACCEPTED)
        job.phase = "loading"
        end = await ep.expect("end", host.idle_timeout)
        job.state.fire(SessionEvent.SWITCHOVER)
        job.phase = "verify"
        await receiver.finish(end, host.idle_timeout)
        resume = bool(req.get("resume", True))
        if req.get("two_phase"):
            # One device of a VM: load and verify, then resume only when the source
            # says every device of the VM got this far.
            await loop.run_in_executor(host.workers.io, dev.set_state, DeviceState.STOP)
            job.phase = "loaded"
            await ep.send_control({"t": "loaded"})
            await ep.expect("go", host.idle_timeout)
        # RESUMING -> STOP is where the device itself validates what it loaded.
        await loop.run_in_executor(host.workers.io, dev.set_state,
                                   DeviceState.RUNNING if resume else DeviceState.STOP)
        loaded = True
        await ep.send_control({"t": "committed", "running": resume})
        job.phase = "done"
        job.rate = job.counters.transferred / max(1e-9, time.monotonic() - job.started)
        log.info("incoming migration %s into %s committed (%d bytes, %d channel(s), device %s)",
                 job.id, name, job.counters.transferred, nchan, dev.state.name)
        outcome = (SessionEvent.COMMITTED, None)
    except BaseException as exc:
        err = _as_error(exc)
        if loaded:
            # Verified and loaded: the guest's state lives here now.  Wiping it
            # because the confirmation could not be delivered would lose it.
            log.error("incoming migration %s loaded, but the source was not told: %s",
                      job.id if job else "-", err.message)
        elif dev is not None and claimed:
            with contextlib.suppress(Exception):
                dev.reset()
        await ep.abort(err)
        log.warning("incoming migration %s failed: %s", job.id if job else "-", err.message)
        outcome = (SessionEvent.COMMITTED if loaded else SessionEvent.FAIL, err)
        if not isinstance(exc, Exception):
            raise
    finally:
        incoming.pop(token, None)
        if receiver is not None:
            await receiver.close()
        ep.channel.close()
        if claimed:
            host.busy.discard(claimed)
        if job is not None:
            if not job.state.finished:  # once the device is free again
                job.finish(*outcome)
            host.finished(job)


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
