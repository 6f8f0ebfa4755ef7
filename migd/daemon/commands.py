"""The control commands: each a small method over its checked request
(``migd.schema.COMMANDS``), reading and changing the daemon's host."""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import transports
from backends.base import Device
from backends.states import DeviceState

from ..codec import parse_compress
from ..config import Config
from ..crypto import ciphers_for
from ..destination import resume_loaded
from ..errors import ConfigError, MigdError, WrongState
from ..metrics import Metrics
from ..pipeline import sender_buffers
from ..protocol.migration import Phase, Role
from ..session import (
    Host,
    Job,
    MigrateOptions,
    Switchover,
    VmJob,
    check_options,
    check_vm,
)
from ..source import run_source

log = logging.getLogger("migd.daemon")


def status_of(job: Job | VmJob) -> str:
    return job.status() if isinstance(job, VmJob) else job.status.value


class Commands:
    """What the control socket can ask (a part of :class:`migd.daemon.Daemon`)."""

    cfg: Config
    host: Host
    jobs: dict[str, Job]
    vm_jobs: dict[str, VmJob]
    _vm_watchers: set[asyncio.Task[None]]
    _stopping: asyncio.Event
    handshakes: dict[str, int]
    metrics: Metrics

    _accepting: bool

    if TYPE_CHECKING:  # the lifecycle's (migd.daemon.lifecycle)
        def deaf(self) -> list[str]: ...

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
        default, allowed = ciphers_for(transport.leaves_host)
        cipher = args["cipher"] or default
        if cipher not in allowed:
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
        t = os.times()
        adm, bank = self.host.admission, self.host.workers.bank
        return {"cpu_seconds": t.user + t.system, "pid": os.getpid(),
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
