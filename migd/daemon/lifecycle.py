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
import logging
import os
import resource
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import backends
import transports
from backends.base import Device
from transports.sockets import same_file

from ..admission import Admission, Gate
from ..config import Config
from ..crypto import ENCRYPTING, ciphers_for
from ..destination import serve_connection
from ..errors import ConfigError, MigdError
from ..faults import Faults
from ..identity import AuthorizedKeys, Identity, Presenter, Trust
from ..journal import Journal
from ..metrics import Metrics
from ..notify import Notifier, listen_fds
from ..pipeline import DEFAULT_INFLIGHT, Workers, rx_sizes, tx_sizes
from ..pki import X509Identity, X509Trust
from ..protocol.migration import Phase
from ..recovery import recover
from ..reservations import Reservations
from ..session import (
    MAX_CHANNELS,
    Host,
    Job,
    VmJob,
)
from .commands import Commands
from .control_server import MAX_REQUEST, ControlServer

log = logging.getLogger("migd.daemon")


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


def build_host(cfg: Config) -> Host:
    """What the daemon serves with, made from its configuration: identity, devices,
    journal, limits, reservations.  A part that fails leaves no device open."""
    identity, authorized = load_identity(cfg)
    devices: dict[str, Device] = {}
    try:
        for spec in cfg.devices:
            if spec.name in devices:
                raise ConfigError(f"device {spec.name!r} defined twice")
            devices[spec.name] = backends.REGISTRY.create(spec.backend, spec.name, spec.options)
        return Host(identity=identity, authorized=authorized,
                    workers=Workers(bank_limit=cfg.buffer_budget),
                    devices=devices, transport=cfg.transport,
                    ciphers=cfg.ciphers or ENCRYPTING, idle_timeout=cfg.idle_timeout,
                    addresses={d.name: d.address for d in cfg.devices if d.address},
                    journal=Journal(cfg.state_dir), resume_timeout=cfg.resume_timeout,
                    resolve_timeout=cfg.resolve_timeout, faults=Faults.from_environment(),
                    handshake_timeout=cfg.handshake_timeout, max_chunk=cfg.max_chunk_size,
                    max_bandwidth_total=cfg.max_bandwidth_total,
                    gate=Gate(cfg.max_unauthenticated, cfg.max_unauthenticated_per_host),
                    claims=Gate(cfg.max_unauthenticated, cfg.max_unauthenticated),
                    admission=Admission(cfg.max_migrations, cfg.max_queued, cfg.buffer_budget),
                    reservations=Reservations(cfg.state_dir, cfg.reservation_ttl))
    except BaseException:
        for d in devices.values():
            d.close()
        raise


class Daemon(ControlServer, Commands):
    """One hypervisor's migd: its devices, listeners, control socket and lifecycle."""

    def __init__(self, cfg: Config, reread: Callable[[], Config] | None = None) -> None:
        self.cfg = cfg
        self._reread = reread
        self.host = build_host(cfg)
        self.jobs: dict[str, Job] = self.host.jobs
        self.vm_jobs: dict[str, VmJob] = {}
        self._recovered: list[asyncio.Task[None]] = []
        self._vm_watchers: set[asyncio.Task[None]] = set()
        # One migration each way can start without allocating: fresh pages are
        # expensive here, so the daemon pays for them once, at start.
        bank = self.host.workers.bank
        bank.prewarm(tx_sizes(self.host.max_chunk, DEFAULT_INFLIGHT))
        bank.prewarm(rx_sizes(self.host.max_chunk, DEFAULT_INFLIGHT))
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
        allowed = ciphers_for(transport.leaves_host)[1]
        ciphers = tuple(c for c in self.cfg.ciphers or allowed if c in allowed)
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
            self.host.max_bandwidth_total = new.max_bandwidth_total
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
        self.metrics.close()
        self.notify.close()
        self.host.workers.shutdown()
        for d in self.host.devices.values():
            d.close()
        if self.host.journal is not None:
            self.host.journal.close()

    # --- control socket -------------------------------------------------------------


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
