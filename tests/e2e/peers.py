"""Hostile peers for end-to-end tests: a man in the middle and a scripted source."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import msgpack

import transports
from migd.errors import MigdError
from migd.identity import AuthorizedKeys, Identity
from migd.protocol.connection import Connection, Control, Event, Offer, PeerFailed
from migd.protocol.frames import HEADER, HEADER_SIZE, FrameType
from migd.protocol.messages import Message
from migd.protocol.migration import Role
from transports.sockets import parse_address

Mutation = Callable[[int, bytes], list[bytes] | None]
M = TypeVar("M", bound=Message)


def host_port(address: str) -> tuple[str, int]:
    """Where a daemon's (tcp) address points, for a raw socket."""
    return parse_address(transports.REGISTRY.split(address)[1])


class Proxy:
    """Forwards connections to ``upstream``.  On the ``target``-th connection (a
    migration's channel, in the order the source opens them) the source->destination
    direction is parsed into frames: every DATA frame passes through
    ``mutate(data_index, frame)``, which returns the frames to send instead, or
    None to cut that connection there; ``hello`` may rewrite its HELLO."""

    def __init__(self, upstream: str, mutate: Mutation,
                 hello: Callable[[dict[str, object]], dict[str, object]] | None = None,
                 target: int | set[int] = 0, cut_all: bool = False) -> None:
        self._upstream = upstream
        self._mutate = mutate
        self._hello = hello
        self._targets = {target} if isinstance(target, int) else target
        #: A cut takes down every connection open at that moment (a link, not a channel).
        self._cut_all = cut_all
        #: Connections accepted so far (a resumed migration opens new ones).
        self.connections = 0
        #: Whether the mutation or the HELLO rewrite changed anything: a tampering
        #: test whose tampering never happened proves nothing.
        self.fired = False
        self._lsock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._lsock.getsockname()[1]}"
        self._socks: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        number = 0
        while True:
            try:
                client, _ = self._lsock.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(host_port(self._upstream), timeout=30)
            except OSError:
                client.close()
                continue
            self._socks += [client, server]
            threading.Thread(target=self._pump_raw, args=(server, client), daemon=True).start()
            tamper = number in self._targets
            self.connections = number + 1
            threading.Thread(target=self._pump_frames, args=(client, server, tamper),
                             daemon=True).start()
            number += 1

    @staticmethod
    def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = sock.recv(n - len(buf))
            except OSError:
                return None
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)

    def _pump_frames(self, src: socket.socket, dst: socket.socket, tamper: bool) -> None:
        index = 0
        try:
            while True:
                hdr = self._recv_exact(src, HEADER_SIZE)
                if hdr is None:
                    break
                payload = self._recv_exact(src, HEADER.unpack(hdr)[3])
                if payload is None:
                    break
                frame = hdr + payload
                if not tamper:
                    dst.sendall(frame)
                    continue
                if hdr[2] == FrameType.HELLO and self._hello is not None:
                    body = msgpack.packb(self._hello(msgpack.unpackb(payload)))
                    frame = HEADER.pack(b"MG", FrameType.HELLO, 0, len(body), 0, 0, 0, 0) + body
                    self.fired = True
                if hdr[2] == FrameType.DATA:
                    out = self._mutate(index, frame)
                    index += 1
                    self.fired = self.fired or out != [frame]
                    if out is None:  # cut this connection, both ways, mid-stream
                        for s in (list(self._socks) if self._cut_all else (src, dst)):
                            with contextlib.suppress(OSError):
                                s.shutdown(socket.SHUT_RDWR)
                        return
                    for f in out:
                        dst.sendall(f)
                else:
                    dst.sendall(frame)
        except OSError:
            pass
        # Let the destination's answer (its error frame) still reach the source.
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def _pump_raw(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self._lsock.close()


class ScriptedSource:
    """A peer that speaks migd's protocol but does what the test says."""

    def __init__(self, address: str, ident: Identity, trust: AuthorizedKeys,
                 offer: Offer | None = None, channel: int = 0) -> None:
        self.sock = socket.create_connection(host_port(address), timeout=10)
        self.conn = Connection(Role.SOURCE, ident, trust, offer, channel=channel)
        self.events: list[Event] = []
        self.flush()

    def flush(self) -> None:
        for f in self.conn.pop_ready():
            self.sock.sendall(f)

    def pump(self, until: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            if time.monotonic() > deadline:
                raise TimeoutError("peer did not answer")
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(1 << 16)
            except OSError:
                return
            if not data:
                return
            with contextlib.suppress(MigdError):  # a refusal still yields its events
                self.conn.receive_data(data)
            self.events += self.conn.events()
            self.flush()

    def failure(self) -> PeerFailed | None:
        return next((e for e in self.events if isinstance(e, PeerFailed)), None)

    def control(self, kind: type[M]) -> M | None:
        return next((e.msg for e in self.events
                     if isinstance(e, Control) and isinstance(e.msg, kind)), None)

    def send(self, msg: Message) -> None:
        self.conn.send_control(msg)
        self.flush()

    def send_data(self, index: int, offset: int, encoding: int, payload: bytes,
                  plain_len: int, forge: Callable[[bytearray], None] | None = None) -> None:
        """Seal and send one DATA frame; ``forge`` may change the sealed frame first."""
        seq = self.conn.reserve_seq()
        buf = bytearray(HEADER_SIZE + len(payload) + 16)
        view = memoryview(buf)
        self.conn.seal_data_into(seq, index, offset, encoding, payload, plain_len,
                                 view[:HEADER_SIZE], view[HEADER_SIZE:])
        if forge is not None:
            forge(buf)
        self.conn.submit(seq, buf)
        self.flush()

    def close(self) -> None:
        self.sock.close()
