"""sd_notify against a real datagram socket standing in for systemd."""

from __future__ import annotations

import os
import pathlib
import socket

from migd.notify import Notifier


def test_path_and_abstract_sockets(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "notify")
    places: list[tuple[str | bytes, str]] = [
        (path, path), (b"\0migd-test-%d" % os.getpid(), f"@migd-test-{os.getpid()}")]
    for addr, env in places:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(addr)
        sock.settimeout(5)
        n = Notifier({"NOTIFY_SOCKET": env, "WATCHDOG_USEC": "3000000"})
        assert n.enabled and n.watchdog_interval == 1.5
        n.ready("idle")
        assert sock.recv(4096) == b"READY=1\nSTATUS=idle"
        n.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
        n.reloading()
        msg = sock.recv(4096).decode()
        assert msg.startswith("RELOADING=1\nMONOTONIC_USEC=") and int(msg.split("=")[-1]) > 0
        n.stopping()
        assert sock.recv(4096) == b"STOPPING=1"
        n.close()
        sock.close()


def test_without_systemd_nothing_happens() -> None:
    n = Notifier({})
    assert not n.enabled and n.watchdog_interval is None
    n.ready("x")  # no socket, no error
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000",
                     "WATCHDOG_PID": "1"}).watchdog_interval is None  # another process's
