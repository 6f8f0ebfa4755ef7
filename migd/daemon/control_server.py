"""The control server: JSON lines on a Unix socket, each peer checked with
SO_PEERCRED, each request checked by the schema and dispatched to a command."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from .. import schema
from ..config import Config
from ..errors import ConfigError, MigdError
from ..session import (
    Host,
    Job,
    VmJob,
)
from .commands import status_of

log = logging.getLogger("migd.daemon")

MAX_REQUEST = 64 << 10


class ControlServer:
    """The socket side of the daemon (a part of :class:`migd.daemon.Daemon`)."""

    cfg: Config
    host: Host
    jobs: dict[str, Job]
    vm_jobs: dict[str, VmJob]
    _control_gid: int | None
    _commands: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]]
    _stopping: asyncio.Event

    if TYPE_CHECKING:  # the commands' (migd.daemon.commands)
        def _all_jobs(self) -> list[Job | VmJob]: ...
        def _job(self, jid: object) -> Job | VmJob: ...
        async def _start(self, args: dict[str, Any]) -> Job | VmJob: ...

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
        while not job.done.is_set() and status_of(job) != "unresolved":
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
