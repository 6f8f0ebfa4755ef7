"""Stream sockets for the transports: connecting, binding and accepting, with
errors that name the address, for TCP and Unix sockets alike."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import Callable

from migd.errors import ConfigError, LinkLost, TransportError

from .base import Channel, ChannelHandler, Listener

log = logging.getLogger("migd.transports")


def parse_address(address: str, default_port: int = 7707) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep:
        host, port = address, str(default_port)
    host = host.strip("[]") or "127.0.0.1"
    try:
        p = int(port)
    except ValueError:
        raise ConfigError(f"address {address!r}: port {port!r} is not a number") from None
    if not 0 <= p <= 65535:
        raise ConfigError(f"address {address!r}: port {p} out of range")
    return host, p


def lost(peer: str, doing: str, exc: OSError) -> TransportError:
    """The error for a connection that failed under us.  A reset or a broken pipe
    means the other end closed it: say so, so an operator looks at the peer's log
    (what it saw, if anything) rather than at this host's network."""
    if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ECONNABORTED):
        return LinkLost(f"peer {peer} closed the connection ({doing}: {exc.strerror})")
    return TransportError(f"{doing} {peer} failed: {exc.strerror}")


async def connect(address: str, timeout: float, label: str, unix: bool = False
                  ) -> socket.socket:
    """A connected non-blocking socket to ``HOST:PORT`` (or a Unix socket path)."""
    loop = asyncio.get_running_loop()
    target: str | tuple[str, int]
    if unix:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target = address
    else:
        host, port = parse_address(address)
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise TransportError(f"cannot resolve {host}: {exc}") from None
        family, stype, proto, _, target = infos[0]  # type: ignore[assignment]
        sock = socket.socket(family, stype, proto)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, target), timeout)
    except (OSError, TimeoutError) as exc:
        sock.close()
        reason = "timed out" if isinstance(exc, TimeoutError) else exc.strerror
        raise TransportError(f"cannot connect to {label}: {reason}") from None
    return sock


def bind(address: str, label: str, unix: bool = False) -> tuple[socket.socket, str]:
    """A listening non-blocking socket and the address it is bound to.  A Unix
    socket is mode 0600, replacing a stale socket (never another kind of file)."""
    try:
        if unix:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(address).st_mode):
                    os.unlink(address)  # left by a previous run
            try:
                os.makedirs(os.path.dirname(address), exist_ok=True)
                sock.bind(address)
                os.chmod(address, 0o600)
            except OSError:
                sock.close()
                raise
            bound = address
        else:
            host, port = parse_address(address)
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                                 socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                sock.close()
                raise
            h, p = sock.getsockname()[:2]
            bound = f"{h}:{p}"
    except OSError as exc:
        raise ConfigError(f"cannot listen on {label}: {exc.strerror}") from None
    sock.listen(64)
    sock.setblocking(False)
    return sock, bound


def same_file(path: str, inode: int) -> bool:
    try:
        return os.stat(path).st_ino == inode
    except OSError:
        return False


class SocketListener(Listener):
    def __init__(self, sock: socket.socket, bound: str, path: str,
                 make: Callable[[socket.socket, str], Channel], handler: ChannelHandler) -> None:
        self._sock = sock
        self._path = path
        self.address = bound
        self._make = make
        self._handler = handler
        self._tasks: set[asyncio.Task[None]] = set()
        self._inode = os.stat(path).st_ino if path else 0
        self._task = asyncio.create_task(self._accept())

    #: Out of a resource the kernel will have again soon: wait this long, go on.
    SHORTAGE = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
    SHORTAGE_PAUSE = 0.1

    @property
    def alive(self) -> bool:
        """Still accepting, and (a Unix socket) its path still leads to it: a socket
        file removed under a running daemon leaves it deaf to new peers."""
        return not self._task.done() and (not self._path or same_file(self._path, self._inode))

    async def _accept(self) -> None:
        """Accept until closed, whatever accept() says: a burst of connections that
        runs the daemon out of file descriptors must not end the loop, or the
        hypervisor silently leaves the migration pool."""
        loop = asyncio.get_running_loop()
        short_since: float | None = None
        while True:
            try:
                conn, addr = await loop.sock_accept(self._sock)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                if exc.errno in (errno.EBADF, errno.EINVAL) and self._sock.fileno() < 0:
                    return  # closed under us
                now = loop.time()
                if short_since is None:
                    short_since = now
                    log.error("listener %s: accept failed: %s; pausing and going on (said "
                              "once per burst)", self.address, exc.strerror or exc)
                await asyncio.sleep(self.SHORTAGE_PAUSE if exc.errno in self.SHORTAGE else 0.01)
                continue
            except Exception:
                log.exception("listener %s: accept failed; going on", self.address)
                await asyncio.sleep(0.01)
                continue
            if short_since is not None:
                log.warning("listener %s: accepting again after %.1fs", self.address,
                            loop.time() - short_since)
                short_since = None
            try:
                peer = self._path or f"{addr[0]}:{addr[1]}"
                t = asyncio.create_task(self._handler(self._make(conn, peer)))
            except Exception:
                log.exception("listener %s: could not take a connection; going on",
                              self.address)
                conn.close()
                continue
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        self._task.cancel()
        self._sock.close()
        if self._path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
