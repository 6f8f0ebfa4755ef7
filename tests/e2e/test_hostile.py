"""Strangers and crowds against real daemons: descriptor exhaustion, trickling
handshakes, floods of unauthenticated connections, more migrations than a host
admits, and a listener that goes away under a running daemon."""

from __future__ import annotations

import contextlib
import os
import pathlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from migd.control import ControlError
from migd.harness import DaemonProc, local_pair
from migd.protocol.frames import HEADER, FrameType

from .peers import host_port
from .test_daemons import DST, SRC, device, migrate
from .test_service import recv_until


def wait_for(what: str, cond: Any, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def fds(d: DaemonProc) -> int:
    return len(os.listdir(f"/proc/{d.proc.pid}/fd"))


@contextlib.contextmanager
def idle_connections(address: str, n: int, source: str = "127.0.0.1"
                     ) -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((source, 0))
            s.settimeout(5)
            try:
                s.connect(host_port(address))
            except OSError:
                s.close()
                break
            socks.append(s)
        yield socks
    finally:
        for s in socks:
            s.close()


def test_a_listener_survives_running_out_of_file_descriptors() -> None:
    # Descriptors capped low (soft and hard: the daemon cannot raise them), and no
    # gate to close strangers early: accept() itself must run into EMFILE.
    lax = ["-o", "max_unauthenticated=5000", "-o", "max_unauthenticated_per_host=5000",
           "-o", "handshake_timeout=600", "--idle-timeout", "600"]
    with local_pair([SRC], [DST], dst_extra=lax, dst_nofile=96) as p:
        before = device(p.src)["sha256"]
        with idle_connections(p.dst.address, 120) as socks:  # > 96 fds, < fds + queue
            assert len(socks) > 96  # (the rest wait in the listen queue)
            wait_for("accept to fail", lambda: "accept failed" in p.dst.log())
            assert p.dst.proc.poll() is None
        # Every stranger is gone: the same daemon accepts again, and migrates.
        final = migrate(p)
        assert final["status"] == "completed", final
        assert device(p.dst)["sha256"] == before
        log = p.dst.log()
        assert "Traceback" not in log and "raise LimitNOFILE" in log
        assert "accepting again" in log
        assert log.count("accept failed") <= 3  # once per burst, not once per try


def test_a_trickling_client_is_dropped_at_the_handshake_timeout() -> None:
    with local_pair([SRC], [DST], dst_extra=["-o", "handshake_timeout=1.5",
                                             "--idle-timeout", "60"]) as p:
        hello = HEADER.pack(b"MG", FrameType.HELLO, 0, 4000, 0, 0, 0, 0) + bytes(64)
        with socket.create_connection(host_port(p.dst.address), timeout=10) as s:
            start = time.monotonic()
            closed_after = None
            for b in hello:  # one byte every 0.2 s: never silent for long
                try:
                    s.sendall(bytes([b]))
                    s.settimeout(0.2)
                    with contextlib.suppress(TimeoutError):
                        if s.recv(4096) == b"":
                            closed_after = time.monotonic() - start
                            break
                except OSError:  # reset
                    closed_after = time.monotonic() - start
                    break
        assert closed_after is not None and 1.3 < closed_after < 5, closed_after
        stats = p.dst.call("query-stats")
        assert stats["handshakes"]["timeout"] == 1 and stats["unauthenticated"] == 0
        assert "no handshake and request within 1.5s" in p.dst.log()
        assert migrate(p)["status"] == "completed"


def test_a_flood_of_strangers_does_not_keep_an_authorized_peer_out() -> None:
    names = [f"vf{i}" for i in range(6)]
    with local_pair([f"{n}:sim:size=1M" for n in names],
                    [f"{n}:sim:size=1M,content=zero" for n in names]) as p:
        before = {n: p.src.call("device-digest", device=n)["sha256"] for n in names}
        stop = threading.Event()
        opened = [0]
        peak = [0]

        def flood(source: str) -> None:
            held: list[socket.socket] = []
            while not stop.is_set():
                s = socket.socket()
                try:
                    s.bind((source, 0))
                    s.settimeout(2)
                    s.connect(host_port(p.dst.address))
                    s.send(b"MG")  # the start of a frame, never the rest
                    opened[0] += 1
                    held.append(s)
                except OSError:
                    s.close()
                if len(held) > 40:
                    held.pop(0).close()
            for s in held:
                s.close()

        t0 = time.monotonic()
        threads = [threading.Thread(target=flood, args=(f"127.0.0.{i}",)) for i in range(2, 12)]
        for t in threads:
            t.start()
        try:
            wait_for("the flood to fill the gate",
                     lambda: p.dst.call("query-stats")["handshakes"]["dropped"] > 100)
            results = []
            for n in names:
                peak[0] = max(peak[0], fds(p.dst))
                results.append(migrate(p, device=n))
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert all(r["status"] == "completed" for r in results), [
            (r["status"], r.get("error-desc")) for r in results]
        assert {n: p.dst.call("device-digest", device=n)["sha256"] for n in names} == before
        stats = p.dst.call("query-stats")
        assert opened[0] >= stats["handshakes"]["dropped"] > 100
        assert stats["handshakes"]["ok"] >= 6
        assert peak[0] < 64 + 64 + 100  # strangers are closed, not piled up
        assert "Traceback" not in p.dst.log()
        # each refusal is counted; the log names ten per ten seconds, not hundreds
        assert p.dst.log().count("refused: ") <= 10 * (1 + (time.monotonic() - t0) // 10)


def status_of(d: DaemonProc, jid: str) -> dict[str, Any]:
    q: dict[str, Any] = d.call("query-migrate", id=jid)
    return q


def test_migrations_beyond_max_migrations_wait_their_turn_or_are_refused() -> None:
    devs = [f"vf{i}:sim:size=1M" for i in range(4)]
    dsts = [f"vf{i}:sim:size=1M,content=zero" for i in range(4)]
    with local_pair(devs, dsts, src_extra=["-o", "max_migrations=1", "-o", "max_queued=2"]
                    ) as p:
        with p.src.client() as c:
            first = c.call("migrate", device="vf0", peer=p.dst.address,
                           **{"pause-before-switchover": True})["id"]
            wait_for("the first to pause",
                     lambda: status_of(p.src, first)["status"] == "pre-switchover")
            second = c.call("migrate", device="vf1", peer=p.dst.address)["id"]
            third = c.call("migrate", device="vf2", peer=p.dst.address)["id"]
            q2, q3 = status_of(p.src, second), status_of(p.src, third)
            assert (q2["status"], q2["queue-position"]) == ("queued", 1)
            assert (q3["status"], q3["queue-position"]) == ("queued", 2)
            try:
                c.call("migrate", device="vf3", peer=p.dst.address)
                raise AssertionError("a fourth was taken beyond max_queued")
            except ControlError as exc:
                assert "busy" in str(exc) and "max_queued 2" in str(exc)
            assert c.call("cancel", id=third)
            wait_for("the queued one to be cancelled",
                     lambda: status_of(p.src, third)["status"] == "cancelled")
            c.call("migrate-continue", id=first)
        done = wait_for("the rest to finish", lambda: (
            s if (s := status_of(p.src, second))["status"] == "completed" else None))
        assert status_of(p.src, first)["status"] == "completed" and done["total-time"] >= 0
        states = {d["name"]: d["state"] for d in p.src.call("query-devices")}
        assert states == {"vf0": "STOP", "vf1": "STOP", "vf2": "RUNNING", "vf3": "RUNNING"}
        stats = p.src.call("query-stats")
        assert stats["migrating_out"] == 0 and stats["buffers_reserved"] == 0


def test_a_destination_at_its_limit_refuses_and_the_source_keeps_its_vf() -> None:
    devs = [f"vf{i}:sim:size=1M" for i in range(2)]
    dsts = [f"vf{i}:sim:size=1M,content=zero" for i in range(2)]
    with local_pair(devs, dsts, dst_extra=["-o", "max_migrations=1"]) as p:
        with p.src.client() as c:
            first = c.call("migrate", device="vf0", peer=p.dst.address,
                           **{"pause-before-switchover": True})["id"]
            wait_for("the first to pause",
                     lambda: status_of(p.src, first)["status"] == "pre-switchover")
            refused = c.migrate_follow({"device": "vf1", "peer": p.dst.address})
            assert refused["status"] == "failed"
            assert "busy" in refused["error-desc"] and "max_migrations 1" in refused["error-desc"]
            c.call("migrate-continue", id=first)
        wait_for("the first to complete",
                 lambda: status_of(p.src, first)["status"] == "completed")
        states = {d["name"]: d["state"] for d in p.src.call("query-devices")}
        assert states == {"vf0": "STOP", "vf1": "RUNNING"}
        # and once the slot is free the same request goes through
        again = migrate(p, device="vf1")
        assert again["status"] == "completed"


def test_a_listener_whose_socket_file_is_removed_stops_the_watchdog(
        tmp_path: pathlib.Path) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    try:
        with local_pair([SRC], [DST], dst_env={"NOTIFY_SOCKET": str(tmp_path / "notify"),
                                               "WATCHDOG_USEC": "400000"}) as p:
            recv_until(notify, "WATCHDOG=1")
            shm = p.dst.address_of("rdma+shm").split("://", 1)[1]
            os.unlink(shm)
            said = recv_until(notify, "NOT ACCEPTING")
            assert any(shm in m for m in said)
            # no more pings: systemd's watchdog restarts the daemon
            later: list[str] = []
            until = time.monotonic() + 1.5
            while (left := until - time.monotonic()) > 0:
                notify.settimeout(left)
                with contextlib.suppress(TimeoutError):
                    later.append(notify.recv(4096).decode())
            assert later and not any("WATCHDOG=1" in m for m in later)
            assert "stopping the watchdog pings" in p.dst.log()
            assert p.dst.call("query-stats")["deaf"] == [f"rdma+shm://{shm}"]
    finally:
        notify.close()

