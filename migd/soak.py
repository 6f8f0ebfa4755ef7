"""``migd soak``: many migrations through a link that damages them, and a count of
how each one ended.

Two real daemons on loopback; every migration goes through a proxy that, once
per trial, damages one connection of it at a random offset: it flips a bit,
drops, duplicates or swaps a few bytes, or cuts the connection, in either
direction, on any channel (resumed connections pass clean).  The trials vary
the transport (tcp, rdma+tcp), channels (1, 2), compression (zstd, none) and
whether resumes are allowed.  A completed migration moves the VF; the next
trial sends it back the other way.

Each trial ends in exactly one of:

* ``completed-verified``: the destination runs a byte-exact copy, the source is
  stopped for good;
* ``failed-source-intact``: the source VF runs with its state unchanged and the
  destination never loaded it (its load count did not move);
* ``unresolved``: held for an operator (stopped VFs, both sides reporting it);
* ``corrupted``: a destination that runs anything but the source's state, or a
  source that does not run after a failure — never acceptable;
* ``hung``: no final status within the trial's time limit;
* ``crashed``: a daemon process died.

The devices are the mlx5-style backend (it counts committed loads, so a load
the destination should never have committed shows).  A reproducible run:
``migd soak --trials 500 --seed 1``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import random
import re
import socket
import threading
import time
from typing import Any

from .control import ControlError
from .harness import DaemonProc, Pair, local_pair
from .units import parse_size

FINAL = ("completed", "failed", "cancelled", "unresolved")  # statuses of a job that ended
KINDS = ("flip", "drop", "duplicate", "swap", "cut")
OUTCOMES = ("completed-verified", "failed-source-intact", "unresolved", "corrupted", "hung",
            "crashed")


@dataclasses.dataclass
class Damage:
    kind: str
    connection: int  # in the order the source opened them in this trial
    to_destination: bool
    offset: int
    length: int  # bytes dropped, duplicated or swapped
    bit: int = 0


class DamagingProxy:
    """Forwards TCP connections to ``upstream``; applies the armed damage once."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self._lsock.getsockname()[1]
        self._lock = threading.Lock()
        self.plan: Damage | None = None
        self.fired = False
        self.accepted = 0
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, plan: Damage | None) -> None:
        with self._lock:
            self.plan, self.fired, self.accepted = plan, False, 0

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self._lsock.accept()
            except OSError:
                return
            try:
                far = socket.create_connection(self.upstream, timeout=5)
                far.settimeout(None)
            except OSError:
                near.close()
                continue
            with self._lock:
                index = self.accepted
                self.accepted += 1
                self._socks += [near, far]
            for a, b, down in ((near, far, True), (far, near, False)):
                threading.Thread(target=self._pump, args=(index, a, b, down),
                                 daemon=True).start()

    def _pump(self, index: int, a: socket.socket, b: socket.socket, to_dst: bool) -> None:
        pos = 0
        try:
            while data := a.recv(1 << 16):
                plan = self.plan
                if (plan is not None and not self.fired and plan.connection == index
                        and plan.to_destination == to_dst and pos <= plan.offset < pos + len(data)):
                    self.fired = True
                    out = _damage(plan, data, plan.offset - pos)
                    if out is None:  # cut
                        for s in (a, b):
                            with contextlib.suppress(OSError):
                                s.shutdown(socket.SHUT_RDWR)
                        return
                    b.sendall(out)
                else:
                    b.sendall(data)
                pos += len(data)
            b.shutdown(socket.SHUT_WR)
        except OSError:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close_all(self) -> None:
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self._lsock.close()
        self.close_all()


def _damage(plan: Damage, data: bytes, at: int) -> bytes | None:
    buf = bytearray(data)
    n = max(1, min(plan.length, len(buf) - at))
    if plan.kind == "flip":
        buf[at] ^= 1 << plan.bit
    elif plan.kind == "drop":
        del buf[at:at + n]
    elif plan.kind == "duplicate":
        buf[at:at] = buf[at:at + n]
    elif plan.kind == "swap":
        m = min(n, (len(buf) - at) // 2)
        if m == 0:  # nothing after it to swap with: flip instead
            buf[at] ^= 0xFF
        else:
            buf[at:at + 2 * m] = buf[at + m:at + 2 * m] + buf[at:at + m]
    else:
        return None
    return bytes(buf)


@dataclasses.dataclass
class Trial:
    number: int
    transport: str
    channels: int
    compress: str
    max_resumes: int
    damage: Damage
    fired: bool = False
    outcome: str = ""
    status: str = ""
    error: str = ""
    resumes: int = 0
    wire_bytes: int = 0
    seconds: float = 0.0


@dataclasses.dataclass
class Summary:
    trials: list[Trial]

    def counts(self) -> dict[str, int]:
        c = collections.Counter(t.outcome for t in self.trials)
        return {o: c.get(o, 0) for o in OUTCOMES}

    @property
    def ok(self) -> bool:
        c = self.counts()
        return c["corrupted"] == c["hung"] == c["crashed"] == 0

    def report(self) -> str:
        c = self.counts()
        fired = [t for t in self.trials if t.fired]
        lines = [f"{len(self.trials)} trials, damage applied in {len(fired)} "
                 f"(the rest: the offset lay past that connection's bytes)"]
        lines += [f"  {o:22} {c[o]:5}" for o in OUTCOMES]
        by_kind = collections.Counter((t.damage.kind, t.outcome) for t in fired)
        lines.append("  damaged trials by kind: " + ", ".join(
            f"{k}: {by_kind[(k, 'completed-verified')]} completed / "
            f"{by_kind[(k, 'failed-source-intact')]} failed" for k in KINDS))
        resumed = sum(1 for t in fired if t.resumes and t.outcome == "completed-verified")
        lines.append(f"  completed after resuming: {resumed}")
        reasons = collections.Counter(_reason(t.error) for t in self.trials if t.error)
        lines.append("  source-side reasons: " + "; ".join(
            f"{r} ({n})" for r, n in reasons.most_common(8)))
        return "\n".join(lines)


def _reason(error: str) -> str:
    """The error without its variable parts (ids, numbers), for a histogram."""
    return re.sub(r"[0-9a-f]{12}|\d+", "N", error)[:90]


def _query_device(d: DaemonProc) -> dict[str, Any]:
    dev: dict[str, Any] = d.call("query-devices")[0]
    dev["sha256"] = d.call("device-digest", device="vf0")["sha256"]
    return dev


def run_soak(trials: int, seed: int = 1, size: str = "2M", trial_timeout: float = 60.0,
             progress: bool = False) -> Summary:
    rnd = random.Random(seed)
    quick = ["--idle-timeout", "3", "--resume-timeout", "5", "--resolve-timeout", "5",
             "-o", "handshake_timeout=5"]
    devices = [f"vf0:mlx5:size={size}"]
    out: list[Trial] = []
    with local_pair(devices, [f"vf0:mlx5:size={size},content=zero"], src_extra=quick,
                    dst_extra=quick) as pair:
        sides = [pair.src, pair.dst]
        proxies = {(side.name, t): DamagingProxy(_host_port(side.address_of(t)))
                   for side in sides for t in ("tcp", "rdma+tcp")}
        holder = 0  # which side runs the VF
        learned: dict[tuple[str, int, str], int] = {}
        try:
            for number in range(trials):
                trial = _plan(rnd, number, learned, parse_size(size))
                src, dst = sides[holder], sides[1 - holder]
                proxy = proxies[(dst.name, trial.transport)]
                _run_trial(pair, src, dst, proxy, trial, trial_timeout)
                out.append(trial)
                if trial.outcome == "completed-verified":
                    holder = 1 - holder
                    if trial.wire_bytes and not trial.fired:
                        learned[(trial.transport, trial.channels, trial.compress)] = (
                            trial.wire_bytes // trial.channels)
                elif trial.outcome in ("hung", "crashed", "unresolved", "corrupted"):
                    _recover(pair, sides, holder)
                if progress:
                    print(f"{number + 1:4} {trial.outcome:20} {trial.damage.kind:9} "
                          f"{'fired' if trial.fired else 'unfired':7} {trial.transport:8} "
                          f"ch={trial.channels} {trial.compress:4} r={trial.max_resumes} "
                          f"@{trial.damage.connection}{'>' if trial.damage.to_destination else '<'}"
                          f"{trial.damage.offset} {trial.seconds:5.1f}s {trial.error[:200]}",
                          flush=True)
        finally:
            for p in proxies.values():
                p.close()
    return Summary(out)


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.split("://")[-1].rpartition(":")
    return host, int(port)


def _plan(rnd: random.Random, number: int, learned: dict[tuple[str, int, str], int],
          size: int) -> Trial:
    channels = rnd.choice((1, 2))
    transport, compress = rnd.choice(("tcp", "rdma+tcp")), rnd.choice(("zstd", "none"))
    to_dst = rnd.random() < 0.8
    # Early offsets hit the handshake and control; the rest anywhere in what that
    # connection carries (as measured by earlier trials of the same kind).
    span = learned.get((transport, channels, compress), size // channels) if to_dst else 4096
    offset = rnd.randrange(512) if rnd.random() < 0.25 else rnd.randrange(max(span, 1024))
    dmg = Damage(kind=rnd.choice(KINDS), connection=rnd.randrange(channels),
                 to_destination=to_dst, offset=offset, length=rnd.randint(1, 64),
                 bit=rnd.randrange(8))
    return Trial(number, transport, channels, compress, rnd.choice((0, 5)), dmg)


def _run_trial(pair: Pair, src: DaemonProc, dst: DaemonProc, proxy: DamagingProxy,
               trial: Trial, limit: float) -> None:
    before_src = _query_device(src)
    before_dst = _query_device(dst)
    peer = f"{'rdma://' if trial.transport == 'rdma+tcp' else ''}127.0.0.1:{proxy.port}"
    proxy.arm(trial.damage)
    t0 = time.monotonic()
    final: dict[str, Any] = {}
    try:
        with src.client(timeout=limit) as c:
            jid = c.call("migrate", device="vf0", peer=peer, channels=trial.channels,
                         compress=trial.compress, **{"max-resumes": trial.max_resumes})["id"]
            while time.monotonic() - t0 < limit:
                final = c.call("query-migrate", id=jid)
                if final["status"] in FINAL:
                    break
                time.sleep(0.05)
    except (ControlError, OSError) as exc:
        final = {"status": "error", "error-desc": str(exc)}
    trial.seconds = time.monotonic() - t0
    trial.fired = proxy.fired
    proxy.arm(None)
    proxy.close_all()
    trial.status = final.get("status", "?")
    trial.error = final.get("error-desc", "")
    trial.resumes = final.get("resumes", 0)
    trial.wire_bytes = final.get("wire-bytes", 0)
    if src.proc.poll() is not None or dst.proc.poll() is not None:
        trial.outcome = "crashed"
        return
    if trial.status not in FINAL:
        trial.outcome = "hung"
        return
    if trial.status == "unresolved":
        trial.outcome = "unresolved"
        return
    # The destination's view settles a moment after the source's.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        # Settled when nothing there is still in flight (a connection refused at the
        # handshake leaves no job at all).
        if all(j["status"] in FINAL for j in dst.call("query-migrate")):
            break
        time.sleep(0.05)
    s, d = _query_device(src), _query_device(dst)
    loads = d.get("loads_committed", 0) - before_dst.get("loads_committed", 0)
    if trial.status == "completed":
        good = (d["state"] == "RUNNING" and d["sha256"] == before_src["sha256"]
                and s["state"] != "RUNNING" and loads == 1)
        trial.outcome = "completed-verified" if good else "corrupted"
    else:
        source_intact = s["state"] == "RUNNING" and s["sha256"] == before_src["sha256"]
        # The destination VF was never touched, or it was reset (its memory wiped):
        # it never runs the state it was sent without the source's commit.
        untouched = (d["state"] == before_dst["state"] and d["sha256"] == before_dst["sha256"]
                     and loads == 0)
        reset = d["sha256"] == _wiped(dst)
        trial.outcome = ("failed-source-intact" if source_intact and (untouched or reset)
                         else "corrupted")


def _wiped(d: DaemonProc) -> str:
    return hashlib.sha256(bytes(d.call("query-devices")[0]["state_size"])).hexdigest()


def _recover(pair: Pair, sides: list[DaemonProc], holder: int) -> None:
    """After a trial that left something held: restart what died, settle what waits."""
    for side in sides:
        if side.proc.poll() is not None:
            side.restart()
    for side in sides:
        for job in side.call("query-migrate"):
            if job["status"] == "unresolved":
                with contextlib.suppress(ControlError):
                    side.call("resolve", id=job["id"], decision="abort")


def main(trials: int, seed: int, size: str, as_json: bool) -> int:
    summary = run_soak(trials, seed, size, progress=not as_json)
    if as_json:
        print(json.dumps({"counts": summary.counts(),
                          "trials": [dataclasses.asdict(t) for t in summary.trials]}))
    else:
        print(summary.report())
    return 0 if summary.ok else 1
