"""Two real daemons as separate processes, on loopback or on two hosts of a
:mod:`~migd.topology` link: for demo, bench and tests.

Each daemon gets its own identity, the other's public key as its only
authorized peer, its own control socket, and listeners on every transport (a
kernel-chosen port for tcp and rdma+tcp, a socket in the work directory for
rdma+shm).  Processes are always reaped, also on failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

from .control import ControlClient
from .errors import ConfigError
from .identity import Identity, public_line
from .topology import Link, Side


@dataclasses.dataclass
class DaemonProc:
    name: str
    proc: subprocess.Popen[bytes]
    control: str
    address: str
    log_path: str
    #: Every listen address (tcp, rdma+tcp, rdma+shm), as the address file lists them.
    addresses: list[str] = dataclasses.field(default_factory=list)
    #: How it was started, for :meth:`restart`.
    cmd: list[str] = dataclasses.field(default_factory=list)
    #: Its file descriptor limit (soft and hard), if set lower than ours.
    nofile: int | None = None

    def address_of(self, transport: str) -> str:
        """Where this daemon listens on ``transport`` (a registry name or alias)."""
        import transports
        name = transports.REGISTRY.canonical(transport)
        for a in self.addresses:
            if transports.REGISTRY.split(a)[0] == name:
                return a
        raise ConfigError(f"daemon {self.name} does not listen on {transport}")

    def client(self, timeout: float = 60.0) -> ControlClient:
        return ControlClient(self.control, timeout)

    def call(self, cmd: str, **args: Any) -> Any:
        with self.client() as c:
            return c.call(cmd, **args)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def restart(self, env: dict[str, str] | None = None, wait: float = 120.0) -> None:
        """Start it again as it was (same identity, devices, journal, and the same
        addresses where they can be bound again), after it stopped or was killed."""
        if self.proc.poll() is None:
            raise ConfigError(f"daemon {self.name} is still running")
        cmd = list(self.cmd)
        # The same ports: the peer's journal names these addresses.
        for i, arg in enumerate(cmd):
            if arg == "--listen":
                cmd[i + 1] = next((a for a in self.addresses
                                   if a.split("://")[0] == _scheme(cmd[i + 1])), cmd[i + 1])
        with contextlib.suppress(FileNotFoundError):
            os.unlink(cmd[cmd.index("--address-file") + 1])
        self.proc = _spawn(cmd, self.log_path, env, append=True, nofile=self.nofile)
        _wait_ready(self, wait)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def write_identity(directory: str, name: str) -> Identity:
    ident = Identity.generate()
    ident.save(os.path.join(directory, f"{name}.key"), comment=name)
    return ident


def start_daemon(workdir: str, name: str, devices: Sequence[str],
                 authorized: Sequence[bytes], extra: Sequence[str] = (),
                 identity: str | None = None, wait: float = 120.0,
                 env: dict[str, str] | None = None, nofile: int | None = None,
                 control_fd: int | None = None, host: Side | None = None) -> DaemonProc:
    """Start ``migd serve`` with a port chosen by the kernel; wait until it answers.
    ``nofile``: its file descriptor limit, soft and hard (the daemon cannot raise it).
    ``control_fd``: a listening control socket handed over as systemd's socket
    activation does (fd 3, ``LISTEN_PID``/``LISTEN_FDS``/``LISTEN_FDNAMES=control``).
    ``host``: run it in that namespace of a two-host link, listening on its address."""
    auth = os.path.join(workdir, f"{name}.authorized")
    with open(auth, "w") as f:
        for i, pub in enumerate(authorized):
            f.write(public_line(pub, f"peer{i}") + "\n")
    control = os.path.join(workdir, f"{name}.sock")
    port_file = os.path.join(workdir, f"{name}.addr")
    log_path = os.path.join(workdir, f"{name}.log")
    shm = os.path.join(workdir, f"{name}.rdma")
    if len(shm) > 100:  # a Unix socket path must fit sun_path (108 bytes)
        shm = os.path.join(tempfile.gettempdir(), f"migd-{os.getpid()}-{time.monotonic_ns()}-{name}")
    ip = "127.0.0.1" if host is None else host.address
    cmd = [sys.executable, "-m", "migd", "serve", "--listen", f"{ip}:0",
           "--listen", f"rdma://{ip}:0", "--listen", f"rdma+shm://{shm}",
           "--control", control, "--identity", identity or os.path.join(workdir, f"{name}.key"),
           "--authorized-keys", auth, "--address-file", port_file,
           "--state-dir", os.path.join(workdir, f"{name}.state"), *extra]
    for dev in devices:
        cmd += ["--device", dev]
    if host is not None:
        cmd = host.wrap(cmd)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(port_file)
    d = DaemonProc(name, _spawn(cmd, log_path, env, nofile=nofile, control_fd=control_fd),
                   control, "", log_path, cmd=cmd, nofile=nofile)
    _wait_ready(d, wait)
    return d


def _scheme(address: str) -> str:
    import transports
    return transports.REGISTRY.canonical(address.split("://")[0] if "://" in address else "tcp")


def _spawn(cmd: list[str], log_path: str, env: dict[str, str] | None,
           append: bool = False, nofile: int | None = None,
           control_fd: int | None = None) -> subprocess.Popen[bytes]:
    def limit() -> None:
        if nofile is not None:
            import resource
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        if control_fd is not None:
            os.dup2(control_fd, 3)

    pass_fds: tuple[int, ...] = ()
    if control_fd is not None:  # what systemd does for a socket unit: fd 3, and its pid
        cmd = ["sh", "-c", 'export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=control; '
               'exec "$@"', "sh", *cmd]
        pass_fds = (3,)
    with open(log_path, "ab" if append else "wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, preexec_fn=limit, pass_fds=pass_fds,
                                env=None if env is None else {**os.environ, **env})


def _wait_ready(d: DaemonProc, wait: float) -> None:
    port_file = d.cmd[d.cmd.index("--address-file") + 1]
    deadline = time.monotonic() + wait
    while not os.path.exists(port_file):
        if d.proc.poll() is not None or time.monotonic() > deadline:
            if d.proc.poll() is None:
                d.proc.kill()
            d.proc.wait()
            with open(d.log_path, errors="replace") as f:
                raise ConfigError(f"daemon {d.name} did not start:\n{f.read()[-2000:]}")
        time.sleep(0.02)
    with open(port_file) as f:
        d.addresses = f.read().split()
    d.address = d.addresses[0]


@dataclasses.dataclass
class Pair:
    src: DaemonProc
    dst: DaemonProc
    workdir: str
    keys: dict[str, Identity]


@contextlib.contextmanager
def local_pair(src_devices: Sequence[str], dst_devices: Sequence[str],
               src_extra: Sequence[str] = (), dst_extra: Sequence[str] = (),
               workdir: str | None = None,
               dst_also_trusts: Sequence[bytes] = (), src_also_trusts: Sequence[bytes] = (),
               src_identity: str | None = None, src_env: dict[str, str] | None = None,
               dst_env: dict[str, str] | None = None, dst_nofile: int | None = None,
               link: Link | None = None) -> Iterator[Pair]:
    """A source and a destination daemon, each trusting the other; with ``link``,
    the source on its host ``a`` and the destination on ``b``."""
    own = workdir is None
    wd = workdir or tempfile.mkdtemp(prefix="migd-pair-")
    procs: list[DaemonProc] = []
    try:
        a = write_identity(wd, "src")
        b = write_identity(wd, "dst")
        dst = start_daemon(wd, "dst", dst_devices, [a.public, *dst_also_trusts], dst_extra,
                           env=dst_env, nofile=dst_nofile,
                           host=None if link is None else link.b)
        procs.append(dst)
        src = start_daemon(wd, "src", src_devices, [b.public, *src_also_trusts], src_extra,
                           identity=src_identity, env=src_env,
                           host=None if link is None else link.a)
        procs.append(src)
        yield Pair(src, dst, wd, {"src": a, "dst": b})
    finally:
        for p in procs:
            p.stop()
        if own:
            shutil.rmtree(wd, ignore_errors=True)
