"""The daemon as systemd runs it: a config file, the notify protocol, SIGHUP, SIGTERM."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import time

from migd.harness import local_pair, start_daemon, write_identity
from migd.identity import public_line


def recv_until(sock: socket.socket, want: str, timeout: float = 15) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while not any(want in m for m in got):
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            raise AssertionError(f"no {want!r} from the daemon; got {got}") from None
    return got


def test_notify_reload_and_stop_from_a_config_file(tmp_path: pathlib.Path) -> None:
    with local_pair(["vf0:sim:size=4M"], []) as p:
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(tmp_path / "notify"))
        conf = tmp_path / "migd.toml"
        # the harness gives --authorized-keys: a flag, which must survive reloads too
        auth = pathlib.Path(p.workdir) / "cfg.authorized"
        conf.write_text('''
authorized_keys = "/nonexistent/overridden-by-the-flag"
log_level = "debug"
[defaults]
compress = "none"
channels = 1
[devices.vf0]
backend = "sim"
options = { size = "4M", content = "zero" }
''')
        d = start_daemon(p.workdir, "cfg", [], [p.keys["src"].public],
                         extra=["--config", str(conf)],
                         identity=os.path.join(p.workdir, "dst.key"),  # one the source trusts
                         env={"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "400000"})
        try:
            ready = recv_until(notify, "READY=1")
            assert any("STATUS=idle; 1 device(s)" in m for m in ready)
            assert any("WATCHDOG=1" in m for m in recv_until(notify, "WATCHDOG=1"))
            # the config file's device and [defaults] are what this daemon uses
            assert [x["name"] for x in d.call("query-devices")] == ["vf0"]
            with p.src.client() as c:
                final = c.migrate_follow({"device": "vf0", "peer": d.address})
            assert final["status"] == "completed"
            assert any("STATUS=" in m for m in recv_until(notify, "STATUS="))
            # The destination's record settles a moment after the source's report.
            deadline = time.monotonic() + 10
            while (incoming := d.call("query-migrate")[0])["status"] != "completed" \
                    and time.monotonic() < deadline:
                time.sleep(0.02)
            assert incoming["status"] == "completed"
            # and back, with nothing said but device and peer: the file's [defaults] apply
            with d.client() as c:
                back = c.migrate_follow({"device": "vf0", "peer": p.src.address})
            assert back["status"] == "completed" and back["compress"] == "none"
            assert back["channels"] == 1
            assert back["wire-bytes"] > back["transferred"] * 0.5  # nothing was compressed
            # SIGHUP re-reads authorized keys: drop the source, and it is refused
            auth.write_text(public_line(os.urandom(32), "someone else") + "\n")
            d.proc.send_signal(signal.SIGHUP)
            reload = recv_until(notify, "READY=1")
            assert any(m.startswith("RELOADING=1\nMONOTONIC_USEC=") for m in reload)
            with p.src.client() as c:
                final = c.migrate_follow({"device": "vf0", "peer": d.address})
            assert final["status"] == "failed" and "unknown-peer" in final["error-desc"]
            # SIGTERM: STOPPING=1, then a clean exit
            d.proc.send_signal(signal.SIGTERM)
            assert any("STOPPING=1" in m for m in recv_until(notify, "STOPPING=1"))
            assert d.proc.wait(30) == 0
        finally:
            d.stop()
            notify.close()


def test_bad_config_file_stops_the_daemon_at_start(tmp_path: pathlib.Path) -> None:
    import subprocess
    import sys

    conf = tmp_path / "migd.toml"
    conf.write_text("[defaults]\nchannels = 99\n")
    r = subprocess.run([sys.executable, "-m", "migd", "serve", "--config", str(conf)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert str(conf) in r.stderr and "'defaults.channels' must be a whole number" in r.stderr


def as_nobody(control: str) -> str:
    """Ask ``control`` for query-migrate from a child running as nobody: the
    interpreter is already loaded, so only the privileges change."""
    import json

    from migd.control import ControlClient

    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        try:
            os.close(rd)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                with ControlClient(control, timeout=10) as c:
                    out = "ok " + json.dumps(c.call("query-migrate"))
            except Exception as exc:
                out = f"error {exc}"
            os.write(wr, out.encode())
        finally:
            os._exit(0)
    os.close(wr)
    with os.fdopen(rd) as f:
        answer = f.read()
    os.waitpid(pid, 0)
    return answer


def test_control_socket_is_for_root_and_its_group(tmp_path: pathlib.Path) -> None:
    assert os.getuid() == 0, "these checks need root to act as another user"
    with local_pair(["vf0:sim:size=4M"], []) as p:
        os.chmod(p.workdir, 0o755)  # let nobody reach the socket file itself
        assert "Permission denied" in as_nobody(p.src.control)  # mode 0660, root's
        os.chmod(p.src.control, 0o666)  # misconfigured: SO_PEERCRED still refuses
        assert "uid 65534 may not control migd (only root)" in as_nobody(p.src.control)
        # with control_group, its members are welcome
        conf = tmp_path / "migd.toml"
        conf.write_text('control_group = "nogroup"\n')
        d = start_daemon(p.workdir, "grp", ["vf0:sim:size=4M"], [],
                         extra=["--config", str(conf)], identity=os.path.join(p.workdir, "src.key"))
        try:
            assert os.stat(d.control).st_gid == 65534 and os.stat(d.control).st_mode & 0o777 == 0o660
            assert as_nobody(d.control) == "ok []"
        finally:
            d.stop()


def test_prometheus_endpoint(tmp_path: pathlib.Path) -> None:
    import urllib.request

    conf = tmp_path / "migd.toml"
    conf.write_text('metrics = "127.0.0.1:0"\n')
    with local_pair(["vf0:sim:size=4M", "vf1:sim:size=4M"], [],
                    dst_also_trusts=[]) as p:
        d = start_daemon(p.workdir, "mon", ["vf0:sim:size=4M,content=zero"], [p.keys["src"].public],
                         extra=["--config", str(conf)], identity=os.path.join(p.workdir, "dst.key"))
        try:
            with p.src.client() as c:
                assert c.migrate_follow({"device": "vf0", "peer": d.address})["status"] == \
                    "completed"
                assert c.migrate_follow({"device": "vf1", "peer": d.address,
                                         "dest-device": "nope"})["status"] == "failed"
            address = d.call("query-stats")["metrics_address"]
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
                text = resp.read().decode()
            assert 'migd_migrations_total{result="completed",role="destination"} 1.0' in text
            assert 'migd_migrations_total{result="failed",role="destination"} 1.0' in text
            assert 'migd_state_bytes_total{direction="received"}' in text
            assert "migd_setup_seconds_count 1.0" in text  # downtime is the source's to measure
            assert "migd_active_migrations 0.0" in text
            assert "migd_unresolved_migrations 0.0" in text
        finally:
            d.stop()


def test_event_stream_and_list(tmp_path: pathlib.Path) -> None:
    import threading

    with local_pair(["vf0:sim:size=16M"], ["vf0:sim:size=16M,content=zero"]) as p:
        seen: list[tuple[str, str, str]] = []

        def listen() -> None:
            with p.dst.client(timeout=30) as c:
                for ev in c.events():
                    seen.append((ev["role"], ev["status"], ev["phase"]))
                    if ev["status"] in ("completed", "failed"):
                        return

        t = threading.Thread(target=listen, daemon=True)
        t.start()
        time.sleep(0.3)
        with p.src.client() as c:  # zstd:19 keeps it going long enough to watch it move
            assert c.migrate_follow({"device": "vf0", "peer": p.dst.address,
                                     "compress": "zstd:19"})["status"] == "completed"
        t.join(20)
        assert seen and seen[-1][:2] == ("destination", "completed")
        assert len({s for _, s, _ in seen}) >= 2  # it saw the migration move
        listed = p.dst.call("list")
        assert listed["devices"][0]["name"] == "vf0" and len(listed["migrations"]) == 1


def test_sigterm_rolls_back_what_cannot_finish(tmp_path: pathlib.Path) -> None:
    conf = tmp_path / "migd.toml"
    conf.write_text("stop_timeout = 0.5\n")
    with local_pair(["vf0:sim:size=128M"], ["vf0:sim:size=128M,content=zero"],
                    src_extra=["--config", str(conf)]) as p:
        p.src.call("migrate", device="vf0", peer=p.dst.address, compress="zstd:19", channels=1)
        deadline = time.monotonic() + 10
        while p.src.call("query-migrate")[0]["status"] in ("none", "setup"):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        p.src.proc.send_signal(signal.SIGTERM)
        assert p.src.proc.wait(20) == 0  # within the stop timeout, then rolled back
        log = p.src.log()
        assert "cancelled" in log and "source device RUNNING" in log
        deadline = time.monotonic() + 15
        while p.dst.call("query-migrate")[0]["status"] not in ("failed",):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        d = p.dst.call("query-devices")[0]
        assert d["state"] == "RUNNING" and d["loads_committed"] == 0


def test_the_control_socket_from_socket_activation(tmp_path: pathlib.Path) -> None:
    """As under migd.socket: systemd made the socket (root:nogroup, 0660); the daemon
    takes it from LISTEN_FDS, needs no chown, lets the socket's group in, and leaves
    the socket to systemd when it stops."""
    import shutil
    import socket as socket_
    import tempfile

    assert os.getuid() == 0, "these checks need root to act as another user"
    wd = tempfile.mkdtemp(prefix="migd-act-")  # reachable by nobody (pytest's is not)
    os.chmod(wd, 0o755)
    path = os.path.join(wd, "act.sock")  # where start_daemon tells it the socket is
    listener = socket_.socket(socket_.AF_UNIX, socket_.SOCK_STREAM)
    listener.bind(path)
    os.chown(path, 0, 65534)
    os.chmod(path, 0o660)
    listener.listen(16)
    write_identity(wd, "act")
    try:
        d = start_daemon(wd, "act", ["vf0:sim:size=4M"], [],
                         control_fd=listener.fileno())
    finally:
        listener.close()  # the daemon holds its own copy
    try:
        assert d.call("query-devices")[0]["name"] == "vf0"
        assert as_nobody(path) == "ok []"  # nogroup is the socket's group: welcome
        st = os.stat(path)
        assert (st.st_gid, st.st_mode & 0o777) == (65534, 0o660)  # as systemd made it
    finally:
        d.stop()
    assert os.path.exists(path)  # systemd's to remove (RemoveOnStop=)
    assert "Traceback" not in d.log()
    shutil.rmtree(wd)


def test_control_group_without_the_capability_says_use_the_socket_unit(
        tmp_path: pathlib.Path) -> None:
    """The shipped unit gives migd no capabilities, so it cannot chown its socket."""
    import subprocess
    import sys

    write_identity(str(tmp_path), "cap")
    (tmp_path / "auth").write_text("")
    conf = tmp_path / "migd.toml"
    conf.write_text('control_group = "nogroup"\n')
    r = subprocess.run(["setpriv", "--bounding-set=-all", "--inh-caps=-all", sys.executable,
                        "-m", "migd", "serve", "--config", str(conf), "--listen", "127.0.0.1:0",
                        "--control", str(tmp_path / "c.sock"), "--identity",
                        str(tmp_path / "cap.key"), "--authorized-keys", str(tmp_path / "auth"),
                        "--state-dir", str(tmp_path / "state")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "control_group 'nogroup': cannot give" in r.stderr and "SocketGroup=" in r.stderr
    assert "Traceback" not in r.stderr
