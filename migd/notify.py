"""systemd's notify protocol (sd_notify), spoken directly: a datagram per message
to ``$NOTIFY_SOCKET`` (a leading ``@`` is the abstract namespace)."""

from __future__ import annotations

import contextlib
import os
import socket
import time


class Notifier:
    """Does nothing when not started by systemd (no ``$NOTIFY_SOCKET``)."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self._addr: str | bytes | None = None
        if path.startswith("@"):
            self._addr = b"\0" + path[1:].encode()
        elif path.startswith("/"):
            self._addr = path
        self._sock: socket.socket | None = None
        if self._addr is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog_interval: float | None = None
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 2e6  # ping at half the limit

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, **fields: str | int) -> None:
        if self._sock is None or self._addr is None:
            return
        msg = "\n".join(f"{k.upper()}={v}" for k, v in fields.items())
        with contextlib.suppress(OSError):  # systemd gone: nothing useful to do about it
            self._sock.sendto(msg.encode(), self._addr)

    def ready(self, status: str) -> None:
        self.send(ready=1, status=status)

    def status(self, status: str) -> None:
        self.send(status=status)

    def watchdog(self) -> None:
        self.send(watchdog=1)

    def reloading(self) -> None:
        self.send(reloading=1, monotonic_usec=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self) -> None:
        self.send(stopping=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


SD_LISTEN_FDS_START = 3


def listen_fds(environ: dict[str, str] | None = None) -> dict[str, socket.socket]:
    """Sockets systemd passed (socket activation: ``$LISTEN_FDS`` from fd 3, named by
    ``$LISTEN_FDNAMES``), by name; empty unless they are meant for this process.
    The variables are removed so that nothing this process starts inherits them."""
    env = os.environ if environ is None else environ
    pid, count = env.get("LISTEN_PID", ""), env.get("LISTEN_FDS", "")
    names = env.get("LISTEN_FDNAMES", "").split(":")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    if pid != str(os.getpid()) or not count.isdigit():
        return {}
    found: dict[str, socket.socket] = {}
    for i in range(int(count)):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        name = names[i] if i < len(names) and names[i] else "unknown"
        found[name] = socket.socket(fileno=fd)
    return found
