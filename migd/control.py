"""Client side of the control socket (used by the CLI, the bench and tests)."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Callable, Iterator
from typing import Any

from .errors import ConfigError, ControlError

__all__ = ["SETTLED", "ControlClient", "ControlError"]

#: Where following a migration stops: it ended, or it waits for an operator.
SETTLED = ("completed", "failed", "cancelled", "unresolved")


class ControlClient:
    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.path, self.timeout = path, timeout
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
        except TimeoutError:
            self._sock.close()
            raise self._silent() from None
        except OSError as exc:
            self._sock.close()
            raise ConfigError(
                f"cannot reach migd at {path}: {exc.strerror} (is 'migd serve' running?)"
            ) from None
        self._file = self._sock.makefile("rwb")
        self._next_id = 0

    def close(self) -> None:
        # Shut down first: another thread may be blocked reading events from it.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):  # a refused write may still sit in the buffer
            self._file.close()
        self._sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, cmd: str, args: dict[str, Any]) -> int:
        self._next_id += 1
        line = json.dumps({"execute": cmd, "arguments": args, "id": self._next_id})
        try:
            self._file.write(line.encode() + b"\n")
            self._file.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon hung up; it may have said why: the next read tells
        except TimeoutError:
            raise self._silent() from None
        return self._next_id

    def _silent(self) -> ControlError:
        return ControlError("timeout", f"migd at {self.path} did not answer within "
                                       f"{self.timeout:g}s (is it hung? its log may say)")

    def _read(self) -> dict[str, Any]:
        try:
            line = self._file.readline()
        except TimeoutError:
            raise self._silent() from None
        if not line:
            raise ConfigError("migd closed the control connection")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def call(self, cmd: str, **args: Any) -> Any:
        self._send(cmd, args)
        msg = self._read()
        if "error" in msg:
            raise ControlError(msg["error"].get("class", "?"), msg["error"].get("desc", ""))
        return msg.get("return")

    def events(self) -> Iterator[dict[str, Any]]:
        """Subscribe to the event stream; yields each event's data."""
        self._send("subscribe", {})
        first = self._read()
        if "error" in first:
            raise ControlError(first["error"].get("class", "?"), first["error"].get("desc", ""))
        while True:
            yield self._read().get("data", {})

    def migrate_follow(self, args: dict[str, Any],
                       on_event: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Start a migration and stream its progress; returns the final query-migrate data."""
        final: dict[str, Any] = {}
        for data in self._follow(dict(args, follow=True)):
            final = data
            if on_event is not None:
                on_event(data)
        return final

    def _follow(self, args: dict[str, Any]) -> Iterator[dict[str, Any]]:
        self._send("migrate", args)
        first = self._read()
        if "error" in first:
            raise ControlError(first["error"].get("class", "?"), first["error"].get("desc", ""))
        while True:
            msg = self._read()
            data = msg.get("data", {})
            yield data
            if data.get("status") in SETTLED and all(
                    d.get("status") in SETTLED for d in data.get("devices", [])):
                return

