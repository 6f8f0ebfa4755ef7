"""``migd serve``: the per-hypervisor daemon.

It accepts incoming migrations into its devices on the transport listener and
runs outgoing ones asked for on the control socket, a Unix socket speaking
QMP-like JSON lines::

    -> {"execute": "migrate", "arguments": {...}, "id": 1}
    <- {"return": {...}, "id": 1}        or {"error": {"class": ..., "desc": ...}, "id": 1}
    <- {"event": "MIGRATION", "data": {...query-migrate fields...}}   (when following)
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import grp
import json
import logging
import os
import resource
import signal
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import backends
import transports
from backends.base import Device
from backends.states import DeviceState
from transports.sockets import same_file

from . import schema
from .admission import Admission, Gate
from .codec import parse_compress
from .config import Config, DeviceConfig
from .crypto import ENCRYPTING
from .destination import resume_loaded, serve_connection
from .errors import ConfigError, MigdError, WrongState
from .faults import Faults
from .identity import AuthorizedKeys, Identity, Presenter, Trust
from .journal import Journal
from .metrics import Metrics
from .notify import Notifier, listen_fds
from .pki import X509Identity, X509Trust
from .protocol.migration import Phase, Role
from .recovery import recover
from .reservations import Reservations
from .session import (
    MAX_CHANNELS,
    Host,
    Job,
    MigrateOptions,
    Switchover,
    VmJob,
    check_options,
    check_vm,
)
from .source import run_source
from .stream import DEFAULT_INFLIGHT, Workers, rx_sizes, sender_buffers, tx_sizes

log = logging.getLogger("migd.daemon")

MAX_REQUEST = 64 << 10


def parse_device(text: str) -> DeviceConfig:
    """``NAME:KIND[:key=value,...]``, e.g. ``vf0:sim:size=64M,dirty-rate=4M``."""
    parts = text.split(":", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ConfigError(f"device {text!r}: expected NAME:KIND[:key=value,...]")
    opts: dict[str, str] = {}
    if len(parts) == 3 and parts[2]:
        for item in parts[2].split(","):
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise ConfigError(f"device {parts[0]}: option {item!r} is not key=value")
            opts[key.strip()] = value.strip()
    return DeviceConfig(parts[0], parts[1], opts)


def _status_of(job: Job | VmJob) -> str:
    return job.status() if isinstance(job, VmJob) else job.status.value


class MemorySampler:
    """Peak anonymous RSS of this process: the daemon's own memory, not device memory
    (which is a file mapping and counts as RssFile/RssShmem)."""

    def __init__(self, period: float = 0.05) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._period = period
        self._thread = threading.Thread(target=self._run, name="migd-mem", daemon=True)
        self._thread.start()

    _PAGE = os.sysconf("SC_PAGE_SIZE")
    #: Held open: a sample must not need a descriptor when a flood took them all.
    _STATM = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)

    @classmethod
    def current(cls) -> int:
        # statm: resident - shared(file + shmem) = anonymous resident memory.
        fields = os.pread(cls._STATM, 256, 0).split()
        return (int(fields[1]) - int(fields[2])) * cls._PAGE

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            try:
                self.peak = max(self.peak, self.current())
            except OSError:  # (never expected; a sampler must not end the daemon's log)
                continue

    def reset(self) -> None:
        self.peak = self.current()

    def stop(self) -> None:
        self._stop.set()


def load_identity(cfg: Config) -> tuple[Presenter, Trust]:
    """This host's identity and whom it trusts: Ed25519 keys, or X.509 certificates."""
    if cfg.identity == "x509":
        return (X509Identity.load(cfg.x509_dir),
                X509Trust.load(cfg.x509_dir, cfg.x509_allowed_names))
    return Identity.load(cfg.identity), AuthorizedKeys.load(cfg.authorized_keys)


def file_limit_needed(cfg: Config) -> int:
    """Descriptors the configured caps may hold at once: the strangers, every
    channel of each migration both ways, control clients, devices and the rest."""
    return (cfg.max_unauthenticated + 2 * cfg.max_migrations * (MAX_CHANNELS + 1)
            + 4 * len(cfg.devices) + 128)


def check_file_limit(cfg: Config) -> None:
    """Raise the soft descriptor limit towards what the caps need (as far as the
    hard limit allows); say so if it stays below.  Running short is survivable
    (listeners pause and go on), but the unit's LimitNOFILE should cover it."""
    need = file_limit_needed(cfg)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        if soft < need:
            log.warning("the file descriptor limit (%d) is below what max_unauthenticated and "
                        "max_migrations need (%d): raise LimitNOFILE", soft, need)


class Daemon:
    def __init__(self, cfg: Config, reread: Callable[[], Config] | None = None) -> None:
        self.cfg = cfg
        self._reread = reread
        identity, authorized = load_identity(cfg)
        faults = Faults.from_environment()
        devices: dict[str, Device] = {}
        try:
            for spec in cfg.devices:
                if spec.name in devices:
                    raise ConfigError(f"device {spec.name!r} defined twice")
                devices[spec.name] = backends.REGISTRY.create(spec.backend, spec.name,
                                                              spec.options)
        except BaseException:
            for d in devices.values():
                d.close()
            raise
        try:
            state = Journal(cfg.state_dir)
        except BaseException:
            for d in devices.values():
                d.close()
            raise
        self.host = Host(identity=identity, authorized=authorized,
                         workers=Workers(bank_limit=cfg.buffer_budget),
                         devices=devices, transport=cfg.transport,
                         ciphers=cfg.ciphers or ENCRYPTING, idle_timeout=cfg.idle_timeout,
                         addresses={d.name: d.address for d in cfg.devices if d.address},
                         journal=state, resume_timeout=cfg.resume_timeout,
                         resolve_timeout=cfg.resolve_timeout, faults=faults,
                         handshake_timeout=cfg.handshake_timeout,
                         gate=Gate(cfg.max_unauthenticated, cfg.max_unauthenticated_per_host),
                         claims=Gate(cfg.max_unauthenticated, cfg.max_unauthenticated),
                         admission=Admission(cfg.max_migrations, cfg.max_queued,
                                             cfg.buffer_budget),
                         reservations=Reservations(cfg.state_dir, cfg.reservation_ttl))
        self.jobs: dict[str, Job] = self.host.jobs
        self.vm_jobs: dict[str, VmJob] = {}
        self._recovered: list[asyncio.Task[None]] = []
        self._vm_watchers: set[asyncio.Task[None]] = set()
        # One migration each way can start without allocating: fresh pages are
        # expensive here, so the daemon pays for them once, at start.
        bank = self.host.workers.bank
        bank.prewarm(tx_sizes(self.host.max_chunk, DEFAULT_INFLIGHT))
        bank.prewarm(rx_sizes(self.host.max_chunk, DEFAULT_INFLIGHT))
        self.memory = MemorySampler()
        self.metrics = Metrics(lambda: sum(not j.finished for j in self.jobs.values()),
                               lambda: sum(j.status.value == "unresolved"
                                           for j in self.jobs.values()))
        self.host.on_finish = self.metrics.finished
        #: How incoming handshakes ended (query-stats; the metric has them too).
        self.handshakes = dict.fromkeys(("ok", "refused", "timeout", "dropped"), 0)
        self.host.on_handshake = self._handshake
        self.notify = Notifier()
        self._stopping = asyncio.Event()
        self._watchdog: asyncio.Task[None] | None = None
        self._accepting = True
        #: (transport, listener) per listen address.
        self._listeners: list[tuple[str, transports.Listener]] = []
        self._control: asyncio.AbstractServer | None = None
        self._control_path = cfg.control
        self._control_inode = 0
        self._control_activated = False
        self._commands: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
            "migrate": self._cmd_migrate,
            "migrate-continue": self._cmd_continue,
            "resolve": self._cmd_resolve,
            "device-resume": self._cmd_device_resume,
            "device-reset": self._cmd_device_reset,
            "query-migrate": self._cmd_query,
            "list": self._cmd_list,
            "query-devices": self._cmd_devices,
            "device-digest": self._cmd_digest,
            "device-dump": self._cmd_dump,
            "query-stats": self._cmd_stats,
            "prepare-incoming": self._cmd_prepare_incoming,
            "release-vm": self._cmd_release_vm,
            "query-reservations": self._cmd_reservations,
            "cancel": self._cmd_cancel,
            "quit": self._cmd_quit,
        }

    # --- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        # The journal first, before any work is accepted: VFs that a previous daemon
        # left stopped or half loaded are settled (or held for resolution) now.
        runs = recover(self.host)
        check_file_limit(self.cfg)
        for address in self.cfg.listen:
            await self._listen(address)
        self.host.listen = self.addresses
        path = self.cfg.control
        self._control_gid = self._group_id(self.cfg.control_group)
        inherited = listen_fds().get("control")
        if inherited is not None:
            # Socket activation: systemd made the socket with its owner, group and
            # mode (migd.socket); members of its group may use it.
            self._control = await asyncio.start_unix_server(self._client, sock=inherited,
                                                            limit=MAX_REQUEST)
            path = inherited.getsockname() or path
            self._control_activated = True
            st = os.stat(path)
            if self._control_gid is None and st.st_gid != 0:
                self._control_gid = st.st_gid
        else:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            self._control = await asyncio.start_unix_server(self._client, path=path,
                                                            limit=MAX_REQUEST)
            os.chmod(path, 0o660)
            if self._control_gid is not None:
                try:
                    os.chown(path, -1, self._control_gid)
                except PermissionError:
                    self._control.close()
                    raise ConfigError(
                        f"control_group {self.cfg.control_group!r}: cannot give {path} to it "
                        "(chown: no permission, as under the shipped unit); use migd.socket "
                        "with SocketGroup= instead, which makes the socket for migd") from None
            st = os.stat(path)
        self._control_path = path
        self._control_inode = st.st_ino
        if self.cfg.metrics:
            log.info("metrics on http://%s/metrics", self.metrics.serve(self.cfg.metrics))
        log.info("migd listening on %s, control %s, devices: %s", ", ".join(self.addresses),
                 path, ", ".join(self.host.devices) or "none")
        for run in runs:
            self._recovered.append(asyncio.create_task(run))

    async def _listen(self, address: str) -> None:
        name, where = transports.REGISTRY.split(address, self.cfg.transport)
        transport = transports.REGISTRY.create(name)
        # What this listener accepts: the configured list, less what the transport
        # never allows (clear text where the link leaves the host).
        ciphers = tuple(c for c in self.cfg.ciphers or transport.accepted_ciphers
                        if c in transport.accepted_ciphers)
        if not ciphers:
            raise ConfigError(f"listen {address}: none of the configured ciphers "
                              f"({', '.join(self.cfg.ciphers)}) is allowed on {name}")

        async def incoming(channel: transports.Channel) -> None:
            if not self._accepting:
                channel.close()
                return
            await serve_connection(self.host, channel, ciphers)

        try:
            listener = await transport.listen(where, incoming)
        except BaseException:
            self._close_listeners()
            raise
        self._listeners.append((name, listener))

    def _close_listeners(self) -> None:
        for _, listener in self._listeners:
            listener.close()
        self._listeners.clear()

    @property
    def addresses(self) -> list[str]:
        """Every listen address, each naming its transport (a bare one would mean
        different things to daemons with different defaults)."""
        return [transports.REGISTRY.url(name, listener.address)
                for name, listener in self._listeners]

    @property
    def address(self) -> str:
        return self.addresses[0] if self._listeners else ""

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self.notify.ready(self._status())
        self._watchdog = loop.create_task(self._ping(self.notify.watchdog_interval))
        await self._stopping.wait()
        self.notify.stopping()
        await self.shutdown()

    def _status(self) -> str:
        active = [j for j in self.jobs.values() if not j.finished]
        if not active:
            return f"idle; {len(self.host.devices)} device(s), listening on {self.address}"
        return "; ".join(f"{j.role} {j.device} {j.status.value} "
                         f"{j.counters.transferred >> 20}/{j.total >> 20} MiB" for j in active)

    async def _ping(self, watchdog: float | None) -> None:
        """STATUS= every second, and WATCHDOG=1 from the event loop itself (a wedged
        loop stops the pings) when systemd asked for it, as long as every listener
        and the control socket accept: a deaf daemon is restarted, not kept."""
        reported = False
        while True:
            deaf = self.deaf()
            if deaf and not reported:
                log.critical("not accepting on %s: stopping the watchdog pings so that "
                             "systemd restarts this daemon", ", ".join(deaf))
            reported = bool(deaf)
            if watchdog and not deaf:
                self.notify.watchdog()
            self.notify.status(f"NOT ACCEPTING on {', '.join(deaf)}" if deaf
                               else self._status())
            await asyncio.sleep(min(watchdog or 1.0, 1.0))

    def deaf(self) -> list[str]:
        """What should accept and does not (a listener ended, a socket file gone)."""
        out = [transports.REGISTRY.url(name, listener.address)
               for name, listener in self._listeners if not listener.alive]
        if self._control is not None and (not self._control.is_serving() or not same_file(
                self._control_path, self._control_inode)):
            out.append(f"control socket {self._control_path}")
        return out

    def reload(self) -> None:
        """SIGHUP: re-read authorized keys, migration defaults and the log level.
        Devices, addresses and the identity need a restart; a change is logged."""
        self.notify.reloading()
        try:
            new = self.cfg if self._reread is None else self._reread()
            self.host.authorized = load_identity(new)[1]
            self.cfg.defaults = new.defaults
            self.cfg.authorized_keys = new.authorized_keys
            logging.getLogger().setLevel(new.log_level.upper())
            if [(d.name, d.backend, d.options) for d in new.devices] != [
                    (d.name, d.backend, d.options) for d in self.cfg.devices] or (
                    new.listen, new.identity, new.control) != (
                    self.cfg.listen, self.cfg.identity, self.cfg.control):
                log.warning("reload: device, address or identity changes need a restart")
            log.info("configuration reloaded: %d authorized peer(s)", len(self.host.authorized))
        except MigdError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc.message)
        self.notify.ready(self._status())

    async def shutdown(self) -> None:
        """Stop accepting; let running migrations finish or roll back within the stop timeout."""
        self._accepting = False
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._close_listeners()
        # (A migration waiting for its outcome does not finish by waiting: the journal
        # has it.)
        running = [j for j in self.jobs.values() if not j.finished and not j.done.is_set()
                   and j.machine.phase not in (Phase.RESOLVING, Phase.UNRESOLVED)]
        if running:
            log.info("waiting for %d running migration(s)", len(running))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(j.done.wait() for j in running)),
                                       self.cfg.stop_timeout)
            # What may still roll back does; what is decided or voted is in the journal,
            # and the next start settles it.
            undecided = [j for j in running if j.machine.may_cancel() and not j.decided]
            for j in undecided:
                with contextlib.suppress(MigdError):
                    j.cancel()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(j.done.wait() for j in undecided)), 30)
            for j in running:
                if j.task is not None and not j.task.done():
                    log.warning("migration %s left %s/%s for the next start to settle", j.id,
                                j.status.value, j.phase)
                    j.abandon()
        for j in self.jobs.values():
            if j.task is not None and not j.task.done():
                j.abandon()
        for t in self._recovered:
            t.cancel()
        if self._control is not None:
            self._control.close()
            if not self._control_activated:  # systemd's socket outlives this daemon
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._control_path)
        self.memory.stop()
        self.metrics.close()
        self.notify.close()
        self.host.workers.shutdown()
        for d in self.host.devices.values():
            d.close()
        if self.host.journal is not None:
            self.host.journal.close()

    # --- control socket -------------------------------------------------------------

    @staticmethod
    def _group_id(name: str) -> int | None:
        if not name:
            return None
        try:
            return grp.getgrnam(name).gr_gid
        except KeyError:
            raise ConfigError(f"control_group {name!r}: no such group") from None

    def _peer_allowed(self, sock: socket.socket) -> tuple[bool, str]:
        """SO_PEERCRED: root, this daemon's own user, or a member of control_group."""
        pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                             struct.calcsize("3i")))
        if uid in (0, os.getuid()):
            return True, ""
        if self._control_gid is not None:
            groups = {gid}
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("Groups:"):
                            groups.update(int(g) for g in line.split()[1:])
            except OSError:
                pass
            if self._control_gid in groups:
                return True, ""
        who = f"uid {uid}"
        allowed = f"root or group {self.cfg.control_group!r}" if self.cfg.control_group else "root"
        return False, f"{who} may not control migd (only {allowed})"

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        allowed, why = self._peer_allowed(writer.get_extra_info("socket"))
        if not allowed:
            log.warning("control connection refused: %s", why)
            # Refuse in answer to its first request, so the client reads why rather
            # than meeting a closed socket when it writes.
            with contextlib.suppress(ConnectionError, TimeoutError, ValueError,
                                     asyncio.LimitOverrunError):
                await asyncio.wait_for(reader.readline(), 5)
                await self._reply(writer, None, error=ConfigError(why))
            writer.close()
            return
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await self._reply(writer, None, error=ConfigError("request line too long"))
                    return
                if not line:
                    return
                await self._handle(line, writer)
        except (ConnectionError, BrokenPipeError):
            return
        finally:
            writer.close()

    async def _reply(self, writer: asyncio.StreamWriter, rid: Any, result: Any = None,
                     error: MigdError | None = None) -> None:
        msg: dict[str, Any] = (
            {"error": {"class": error.name, "desc": error.message}} if error else
            {"return": result if result is not None else {}}
        )
        if rid is not None:
            msg["id"] = rid
        writer.write(json.dumps(msg).encode() + b"\n")
        await writer.drain()

    async def _handle(self, line: bytes, writer: asyncio.StreamWriter) -> None:
        req = schema.request(line, self.cfg)
        rid, cmd, args = req.id, req.command, req.args
        try:
            if req.error is not None:
                raise req.error
            if cmd == "subscribe":  # the event stream: this connection is for events now
                await self._reply(writer, rid, {})
                await self._events(writer, args["interval"])
                return
            if cmd == "migrate" and args["follow"]:
                job = await self._start(args)
                await self._reply(writer, rid, {"id": job.id})
                await self._follow(job, writer, args["interval"])
                return
            await self._reply(writer, rid, await self._commands[cmd](args))
        except MigdError as exc:
            await self._reply(writer, rid, error=exc)

    async def _follow(self, job: Job | VmJob, writer: asyncio.StreamWriter,
                      interval: float) -> None:
        # Until it ends, or waits for an operator (unresolved: 'migd resolve').
        while not job.done.is_set() and _status_of(job) != "unresolved":
            writer.write(json.dumps({"event": "MIGRATION", "data": job.query()}).encode() + b"\n")
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(job.done.wait(), max(0.02, interval))
        writer.write(json.dumps({"event": "MIGRATION", "data": job.query()}).encode() + b"\n")
        await writer.drain()

    async def _events(self, writer: asyncio.StreamWriter, interval: float) -> None:
        """The event stream: a MIGRATION event whenever a migration appears or its
        status or phase changes, until the client goes away."""
        seen: dict[str, tuple[str, str]] = {}
        while not writer.is_closing():
            for job in self._all_jobs():
                q = job.query()
                key = (q["status"], q["phase"])
                if seen.get(q["id"]) != key:
                    seen[q["id"]] = key
                    writer.write(json.dumps({"event": "MIGRATION", "data": q}).encode() + b"\n")
            await writer.drain()
            await asyncio.sleep(max(0.02, interval))

    # --- commands ----------------------------------------------------------------------

    async def _start(self, args: dict[str, Any]) -> Job | VmJob:
        """One device, or with ``devices`` all VFs of a VM switching over together.
        ``args`` are checked (``migd.schema``), every default filled in.  It runs
        at once or waits its turn (``max_migrations``, the buffer budget)."""
        if not self._accepting:
            raise ConfigError("daemon is shutting down")
        devices = args["devices"]
        if devices is None:
            if args["device"] is None:
                raise ConfigError("migrate: give 'device' (one VF) or 'devices' (a VM's VFs)")
            opts = self._options(args)
            (job,) = self._launch([opts], None)
            return job
        if args["device"] is not None or args["dest-device"] is not None:
            raise ConfigError("migrate: give 'device' or 'devices', not both")
        if len(set(devices)) != len(devices):
            raise ConfigError("migrate: 'devices' must be distinct device names")
        dests = args["dest-devices"] or devices
        if len(dests) != len(devices):
            raise ConfigError("migrate: 'dest-devices' must name one device per device")
        for name in devices:
            if name not in self.host.devices:
                raise ConfigError(f"no device named {name!r} on this host")
        check_vm(self.host, devices)
        switchover = Switchover(len(devices)) if len(devices) > 1 else None
        jobs = self._launch([self._options(dict(args, device=d, **{"dest-device": dd}))
                             for d, dd in zip(devices, dests, strict=True)], switchover)
        vm = VmJob(args["vm"], args["peer"], jobs)
        if switchover is not None:
            switchover.jobs = jobs
            vm.id = switchover.id  # the VM's decision record has this id
        self.vm_jobs[vm.id] = vm
        self._vm_watchers.add(asyncio.create_task(vm.watch()))
        return vm

    def _options(self, args: dict[str, Any]) -> MigrateOptions:
        device, peer = args["device"], args["peer"]
        name, _ = transports.REGISTRY.split(peer, self.cfg.transport)
        transport = transports.REGISTRY.create(name)
        cipher = args["cipher"] or transport.default_cipher
        if cipher not in transport.accepted_ciphers:
            raise ConfigError(f"cipher {cipher!r} is not allowed on {name} (clear text only "
                              "on a host-local transport, rdma+shm)")
        opts = MigrateOptions(
            peer=peer, device=device, dest_device=args["dest-device"] or device,
            compress=parse_compress(args["compress"]), ciphers=(cipher,),
            chunk_size=args["chunk-size"], precopy=args["precopy"],
            downtime_limit_ms=args["downtime-limit"], max_iterations=args["max-iterations"],
            resume=args["resume"], timeout=args["timeout"], channels=args["channels"],
            max_bandwidth=args["max-bandwidth"], vm=args["vm"],
            pause_before_switchover=args["pause-before-switchover"],
            max_resumes=args["max-resumes"], resume_timeout=args["resume-timeout"])
        check_options(opts, self.host)
        return opts

    def _launch(self, devices: list[MigrateOptions], switchover: Switchover | None
                ) -> list[Job]:
        """Jobs for checked options, admitted together (or queued, or Busy)."""
        need = max(sender_buffers(o.chunk_size, o.inflight, keep=o.max_resumes > 0)
                   for o in devices)
        ticket = self.host.admission.outgoing(len(devices), need)
        if not ticket.admitted.is_set():
            log.info("migration of %s queued (position %d): %d running, max_migrations %d",
                     ", ".join(o.device for o in devices), ticket.position,
                     self.host.admission.running[True], self.host.admission.max_migrations)
        jobs = []
        for opts in devices:
            job = Job("source", opts.device, peer=opts.peer, ticket=ticket)
            self.host.register(job)
            job.task = asyncio.create_task(run_source(self.host, job, opts, switchover))
            jobs.append(job)
        return jobs

    async def _cmd_migrate(self, args: dict[str, Any]) -> Any:
        job = await self._start(args)
        return {"id": job.id}

    async def _cmd_query(self, args: dict[str, Any]) -> Any:
        jid = args.get("id")
        if jid is None:
            return [j.query() for j in self.jobs.values()]
        job: Job | VmJob | None = self.jobs.get(jid) or self.vm_jobs.get(jid)
        if job is None:
            raise ConfigError(f"no migration with id {jid!r}")
        return job.query()

    async def _cmd_list(self, args: dict[str, Any]) -> Any:
        return {"devices": await self._cmd_devices(args),
                "migrations": [j.query() for j in self._all_jobs()]}

    def _all_jobs(self) -> list[Job | VmJob]:
        return [*self.jobs.values(), *self.vm_jobs.values()]

    async def _cmd_devices(self, args: dict[str, Any]) -> Any:
        return [dict(d.describe(), busy=n in self.host.busy) for n, d in self.host.devices.items()]

    def _device(self, args: dict[str, Any]) -> Device:
        name = args.get("device")
        dev = self.host.devices.get(name) if isinstance(name, str) else None
        if dev is None:
            raise ConfigError(f"no device named {name!r}")
        return dev

    async def _cmd_digest(self, args: dict[str, Any]) -> Any:
        dev = self._device(args)
        digest = await asyncio.get_running_loop().run_in_executor(None, dev.digest)
        return {"device": dev.name, "sha256": digest, "state": dev.state.name}

    async def _cmd_dump(self, args: dict[str, Any]) -> Any:
        dev = self._device(args)
        path = args.get("path")
        dump = getattr(dev, "dump", None)
        if not isinstance(path, str) or dump is None:
            raise ConfigError("device-dump needs 'path' and a backend that can dump")
        await asyncio.get_running_loop().run_in_executor(None, dump, path)
        return {"device": dev.name, "path": path}

    def _handshake(self, result: str) -> None:
        self.handshakes[result] += 1
        self.metrics.handshake(result)

    async def _cmd_stats(self, args: dict[str, Any]) -> Any:
        if args.get("reset-peak"):
            self.memory.reset()
        t = os.times()
        adm, bank = self.host.admission, self.host.workers.bank
        return {"cpu_seconds": t.user + t.system, "mem_peak_bytes": self.memory.peak,
                "mem_now_bytes": MemorySampler.current(), "pid": os.getpid(),
                "metrics_address": self.metrics.address,
                "uptime": time.monotonic(), "handshakes": dict(self.handshakes),
                "unauthenticated": len(self.host.gate) + len(self.host.claims),
                "migrating_out": adm.running[True], "migrating_in": adm.running[False],
                "queued": adm.queued, "buffers_reserved": adm.reserved,
                "buffer_budget": adm.budget, "bank_out_bytes": bank.out,
                "bank_free_bytes": bank.free, "deaf": self.deaf()}

    async def _cmd_prepare_incoming(self, args: dict[str, Any]) -> Any:
        """Reserve free pool VFs (of ``kind``) for an incoming VM: for the source VF at
        ``source-address``, or for every one of ``source-addresses``, all or none.
        With ``source-addresses``, addresses migd does not handle (no device here at
        that address, none of ``hook_addresses``) are left out and listed as
        ``ignored``: they are not VFs of migd's (a GPU, a boot ROM device)."""
        kind, vm = args.get("kind"), args.get("vm", "")
        many = args.get("source-addresses") is not None
        if many == (args.get("source-address") is not None):
            raise ConfigError("prepare-incoming: give 'source-address' (one VF) or "
                              "'source-addresses' (a VM's), not both")
        sources = [s.lower() for s in (args["source-addresses"] if many
                                       else [args["source-address"]])]
        ignored = [s for s in sources if many and not self._handles(s)]
        wanted = [s for s in sources if s not in ignored]
        free = [spec.name for spec in self.cfg.devices
                if spec.pool and spec.name not in self.host.busy
                and (kind is None or self.host.devices[spec.name].kind == kind)]
        placed = self.host.reservations.reserve_vm(vm, wanted, free)
        if not many:
            return self._reservation(placed[sources[0]])
        return {"placed": {s: self._reservation(d) for s, d in placed.items()},
                "ignored": ignored}

    def _handles(self, address: str) -> bool:
        """Whether a domain's hostdev at ``address`` is a VF migd moves."""
        return (any(spec.address == address for spec in self.cfg.devices)
                or any(fnmatch.fnmatchcase(address, p) for p in self.cfg.hook_addresses))

    def _reservation(self, name: str) -> dict[str, str]:
        spec = next(s for s in self.cfg.devices if s.name == name)
        return {"device": name, "address": spec.address, "kind": self.host.devices[name].kind}

    async def _cmd_reservations(self, args: dict[str, Any]) -> Any:
        return self.host.reservations.listing()

    async def _cmd_release_vm(self, args: dict[str, Any]) -> Any:
        """After a VM left (libvirt: release end migrated): drop its reservations and
        reset its migrated-away source VFs so they can host another VM."""
        vm = args.get("vm")
        if not isinstance(vm, str) or not vm:
            raise ConfigError("release-vm: 'vm' is required")
        dropped = self.host.reservations.release_vm(vm)
        reset = []
        for address in args.get("addresses", []):
            spec = next((s for s in self.cfg.devices if s.address == str(address).lower()), None)
            dev = self.host.devices.get(spec.name) if spec else None
            if dev is not None and spec is not None and spec.name not in self.host.busy \
                    and dev.state == DeviceState.STOP:
                dev.reset()
                reset.append(spec.name)
        return {"released": dropped, "reset": reset}

    async def _cmd_cancel(self, args: dict[str, Any]) -> Any:
        """Like QEMU's migrate_cancel: succeeds even with nothing running; refused for a
        migration past its decision (its VF must not be rolled back any more)."""
        jid = args.get("id")
        if jid is not None:
            target = self._job(jid)
            return {"cancelled": [target.id] if target.cancel() else []}
        cancelled = []
        for job in self.jobs.values():
            with contextlib.suppress(WrongState):
                if job.cancel():
                    cancelled.append(job.id)
        return {"cancelled": cancelled}

    def _job(self, jid: object) -> Job | VmJob:
        if not isinstance(jid, str):
            raise ConfigError("'id' must be a migration id (a string)")
        job: Job | VmJob | None = self.jobs.get(jid) or self.vm_jobs.get(jid)
        if job is None:
            raise ConfigError(f"no migration with id {jid!r}")
        return job

    async def _cmd_continue(self, args: dict[str, Any]) -> Any:
        """migrate-continue: a migration paused in pre-switchover stops its VF now."""
        job = self._job(args.get("id"))
        job.resume_switchover()
        return {"id": job.id}

    async def _cmd_resolve(self, args: dict[str, Any]) -> Any:
        """The operator settles a migration whose outcome this host cannot learn:
        ``commit`` (the destination VF runs the guest) or ``abort`` (the source's)."""
        job = self._job(args.get("id"))
        decision = args.get("decision")
        if decision not in ("commit", "abort"):
            raise ConfigError("resolve: 'decision' must be 'commit' (--confirm) or 'abort' "
                              "(--resume-source)")
        job.settle(decision)
        log.warning("migration %s settled by the operator: %s", job.id, decision)
        return {"id": job.id, "decision": decision}

    def _loaded_job(self, name: str) -> Job | None:
        """The incoming migration that left ``name`` loaded and stopped, if any."""
        for job in reversed(list(self.jobs.values())):
            if job.role == Role.DESTINATION.value and job.device == name:
                return job
        return None

    async def _cmd_device_resume(self, args: dict[str, Any]) -> Any:
        """Start a VF an incoming migration committed and left stopped (--stay-stopped)."""
        dev = self._device(args)
        job = self._loaded_job(dev.name)
        if job is not None and job.machine.phase is Phase.UNRESOLVED and job.committed:
            job.settle("commit")  # committed, but it would not start: try again
            return {"device": dev.name, "migration": job.id, "state": dev.state.name}
        if job is None or job.machine.phase is not Phase.LOADED or dev.name in self.host.busy:
            raise WrongState(f"device {dev.name} holds no committed, stopped incoming state "
                             f"(state {dev.state.name}"
                             + (f", migration {job.id} {job.status.value}/{job.phase})" if job
                                else ")") + ": nothing to resume")
        await resume_loaded(self.host, job, dev)
        return {"device": dev.name, "migration": job.id, "state": dev.state.name}

    async def _cmd_device_reset(self, args: dict[str, Any]) -> Any:
        """Reset a VF that is not migrating: discard a loaded, stopped state, or make a
        VF whose guest migrated away ready for another."""
        dev = self._device(args)
        if dev.name in self.host.busy:
            raise WrongState(f"device {dev.name} is busy: a migration holds it (cancel it, or "
                             "settle it with 'migd resolve')")
        job = self._loaded_job(dev.name)
        await asyncio.get_running_loop().run_in_executor(self.host.workers.io, dev.reset)
        if job is not None and job.machine.phase is Phase.LOADED:
            job.error = MigdError("the loaded state was discarded by device-reset")
            log.warning("device %s: the state migration %s left loaded was discarded", dev.name,
                        job.id)
        return {"device": dev.name, "state": dev.state.name}

    async def _cmd_quit(self, args: dict[str, Any]) -> Any:
        self._stopping.set()
        return {}


async def serve(cfg: Config, ready: Callable[[Daemon], None] | None = None,
                reread: Callable[[], Config] | None = None) -> None:
    daemon = Daemon(cfg, reread)
    try:
        await daemon.start()
    except BaseException:
        await daemon.shutdown()
        raise
    if ready is not None:
        ready(daemon)
    await daemon.serve_forever()
