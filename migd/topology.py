"""Two hosts on one machine: two network namespaces joined by a veth pair.

Tests and benchmarks otherwise talk over loopback, where a byte costs a memory
copy and no link ever limits anything.  Here each daemon lives in a namespace of
its own with its own address, the bytes between them cross a (virtual) network
device, and ``tc`` can shape that device like a real NIC (``tbf``: a rate, with
the kernel's queue in front of it; netem is not in every kernel).  Control
sockets are filesystem paths, so the harness reaches both daemons from where it
runs.  Root only; every namespace made here is removed again, also on failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import re
import shutil
import subprocess
from collections.abc import Iterator

from .errors import ConfigError

_RATE = re.compile(r"^(\d+(?:\.\d+)?)\s*(k|m|g)?(bit|bps)?$", re.IGNORECASE)
_UNITS = {None: 1, "k": 1e3, "m": 1e6, "g": 1e9}
#: Each link gets its own /30 from here (private addresses, inside namespaces only).
_SUBNET = "10.213"
_serial = itertools.count()


def parse_rate(text: str) -> int | None:
    """A link rate in bits per second: ``10gbit``, ``2.5G``, ``500mbit``; None for
    ``unlimited`` (the veth pair unshaped).  G/M/K mean Gbit/s, Mbit/s, kbit/s."""
    t = text.strip().lower()
    if t in ("unlimited", "none", "uncapped"):
        return None
    m = _RATE.match(t)
    if m is None or m.group(3) == "bps":
        raise ConfigError(f"link rate {text!r}: expected e.g. 1gbit, 10G, 500mbit or unlimited")
    bits = int(float(m.group(1)) * _UNITS[m.group(2)])
    if bits < 1_000_000:
        raise ConfigError(f"link rate {text!r}: below 1 Mbit/s")
    return bits


def describe_rate(bits: int | None) -> str:
    if bits is None:
        return "unlimited"
    return f"{bits / 1e9:g} Gbit/s" if bits >= 1e9 else f"{bits / 1e6:g} Mbit/s"


def check_can_make_links() -> None:
    """A clear error instead of a half-made topology."""
    if os.geteuid() != 0:
        raise ConfigError("a two-namespace link needs root (it creates network namespaces)")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise ConfigError(f"a two-namespace link needs {tool!r} (apt install iproute2)")


@dataclasses.dataclass
class Side:
    """One host of the link: its namespace, interface and address."""

    netns: str
    dev: str
    address: str

    def wrap(self, cmd: list[str]) -> list[str]:
        """``cmd`` run in this host's namespace (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.netns, *cmd]

    def counters(self) -> dict[str, int]:
        """Bytes and packets its interface sent and received (from the namespace)."""
        out = {}
        for name in ("tx_bytes", "rx_bytes", "tx_packets", "rx_packets"):
            r = _ip(["netns", "exec", self.netns, "cat",
                     f"/sys/class/net/{self.dev}/statistics/{name}"])
            out[name] = int(r.strip())
        return out

    def set_up(self, up: bool) -> None:
        """Bring its interface down (the cable pulled: nothing passes, no reset sent)
        or up again."""
        _ip(["-n", self.netns, "link", "set", self.dev, "up" if up else "down"])


@dataclasses.dataclass
class Link:
    """Two namespaces, ``a`` and ``b``, joined by a veth pair shaped to ``rate``."""

    a: Side
    b: Side
    rate: int | None

    def shape(self, rate: int | None) -> None:
        """(Re)shape both directions to ``rate`` bits/s with a tbf qdisc (None: unshaped)."""
        for side in (self.a, self.b):
            subprocess.run(["tc", "-n", side.netns, "qdisc", "del", "dev", side.dev, "root"],
                           capture_output=True, check=False)
            if rate is not None:
                # A burst of 1 ms of the rate, at least 256 KiB: veth hands tbf 64 KiB
                # GSO packets, and a burst smaller than a packet drops it.
                burst = max(256 << 10, rate // 8 // 1000)
                # A queue of up to 10 ms in front of it, like a NIC's transmit queue
                # (1000 packets are 1.2 ms at 10 Gbit/s, 12 ms at 1 Gbit/s).
                _tc(["-n", side.netns, "qdisc", "add", "dev", side.dev, "root", "tbf",
                     "rate", str(rate), "burst", str(burst), "latency", "10ms"])
        self.rate = rate


@contextlib.contextmanager
def two_hosts(rate: int | None = None) -> Iterator[Link]:
    """A fresh link between two new namespaces, removed on exit."""
    check_can_make_links()
    n = next(_serial)
    tag = f"migd{os.getpid() % 100000}x{n}"
    third = (os.getpid() + n) % 250 + 1
    a = Side(f"{tag}a", "veth0", f"{_SUBNET}.{third}.1")
    b = Side(f"{tag}b", "veth0", f"{_SUBNET}.{third}.2")
    made: list[str] = []
    try:
        for side in (a, b):
            _ip(["netns", "add", side.netns])
            made.append(side.netns)
        _ip(["link", "add", f"{tag}p", "netns", a.netns, "type", "veth", "peer", "name",
             f"{tag}q", "netns", b.netns])
        for side, name in ((a, f"{tag}p"), (b, f"{tag}q")):
            _ip(["-n", side.netns, "link", "set", name, "name", side.dev])
            _ip(["-n", side.netns, "addr", "add", f"{side.address}/30", "dev", side.dev])
            _ip(["-n", side.netns, "link", "set", side.dev, "up"])
            _ip(["-n", side.netns, "link", "set", "lo", "up"])
        link = Link(a, b, None)
        link.shape(rate)
        yield link
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def _ip(args: list[str]) -> str:
    return _run(["ip", *args])


def _tc(args: list[str]) -> str:
    return _run(["tc", *args])


def _run(cmd: list[str]) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise ConfigError(f"{' '.join(cmd)}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout
