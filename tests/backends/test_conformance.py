"""One conformance suite every backend passes: FSM arcs, pre-copy semantics, a
byte-exact migration, and a failure at each source arc leaving the source running.

``vfio-*`` runs the real VFIO backend against the kernel model in front of an
emulated device with that driver's quirks."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import pytest

import backends
from backends.base import Device
from backends.states import DeviceState, MigCap, path, supported
from backends.vfio import VfioDevice
from migd.errors import DeviceError, IllegalTransition, NoDataNow
from migd.identity import AuthorizedKeys, Identity
from migd.pipeline import Workers
from migd.session import Host, Job, MigrateOptions
from migd.source import run_source

from ..loopback import serving
from .kernel_model import KernelModel
from .streams import drain

S = DeviceState


@dataclass
class Made:
    device: Device
    digest: Callable[[], str]
    model: KernelModel | None = None


def _emulated(kind: str, options: dict[str, str]) -> Device:
    return backends.REGISTRY.create(kind, f"{kind}-{uuid.uuid4().hex[:6]}", options)


def _options(kind: str, role: str) -> dict[str, str]:
    if kind == "sim":
        return {"size": "4M", "content": "zero" if role == "dst" else "mixed"}
    if kind == "mlx5":  # > 8 MiB: several firmware chunks
        return {"size": "20M", "pf": f"pf-{uuid.uuid4().hex[:6]}",
                "content": "zero" if role == "dst" else "mixed"}
    return {"seed": "1" if role == "src" else "2"}


def make(kind: str, role: str) -> Made:
    if kind.startswith("vfio-"):
        inner_kind = kind.removeprefix("vfio-")
        inner = _emulated(inner_kind, _options(inner_kind, role))
        model = KernelModel(inner, quirks=inner_kind)
        vdev = VfioDevice(f"vfio-{role}", {"path": "/dev/vfio/devices/vfio0"}, ops=model)
        return Made(vdev, inner.digest, model)
    dev = _emulated(kind, _options(kind, role))
    return Made(dev, dev.digest)


KINDS = ["sim", "mlx5", "hisi", "vfio-mlx5", "vfio-hisi"]


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@contextlib.contextmanager
def devices(kind: str, *roles: str) -> Iterator[list[Made]]:
    made = [make(kind, r) for r in roles]
    try:
        yield made
    finally:
        for m in made:
            m.device.close()
            if m.model is not None and m.model.dev is not None:
                m.model.dev.close()


def load(dev: Device, data: bytes) -> None:
    mv = memoryview(data)
    while mv:
        mv = mv[dev.write(mv):]


def full_stream(src: Device) -> bytes:
    src.set_state(S.STOP_COPY)
    data = drain(src)
    src.set_state(S.RUNNING)
    return data


def single_arcs(caps: MigCap) -> set[tuple[S, S]]:
    """Every arc on the kernel's path between two states the capabilities allow.
    Only the pairs the kernel refuses (IllegalTransition: pre-copy after stop-copy,
    out of RESUMING to a saving state, ...) are passed over; anything else is a
    regression of ``path`` and fails."""
    states = [s for s in S if s != S.ERROR and supported(s, caps)]
    arcs: set[tuple[S, S]] = set()
    for a, b in itertools.product(states, states):
        try:
            steps = path(a, b, caps)
        except IllegalTransition:
            continue
        prev: S = a
        for step in steps:
            arcs.add((prev, step))
            prev = step
    return arcs


def test_the_arcs_tested_are_all_the_kernel_allows() -> None:
    # The kernel's single arcs (vfio_mig_get_next_state), by capability set: the
    # set the arc test walks cannot shrink unnoticed.
    full = MigCap.STOP_COPY | MigCap.P2P | MigCap.PRE_COPY
    assert len(single_arcs(MigCap.STOP_COPY)) == 6  # STOP<->RUNNING, STOP_COPY, RESUMING
    assert (S.RUNNING, S.STOP) in single_arcs(MigCap.STOP_COPY)
    assert (S.PRE_COPY_P2P, S.STOP_COPY) in single_arcs(full)
    assert (S.RUNNING, S.STOP) not in single_arcs(full)  # through RUNNING_P2P


def test_every_arc_the_capabilities_allow(kind: str) -> None:
    with devices(kind, "src", "twin") as (m, twin):
        dev = m.device
        stream = full_stream(twin.device)
        arcs = single_arcs(dev.caps)
        assert (S.RUNNING, S.STOP) in arcs or (S.RUNNING, S.RUNNING_P2P) in arcs
        for cur, nxt in sorted(arcs):
            dev.set_state(cur)
            if cur == S.RESUMING:
                load(dev, stream)
            dev.set_state(nxt)
            assert dev.state == nxt, (cur, nxt)
            dev.recover()
            assert dev.state == S.RUNNING


def test_precopy_semantics(kind: str) -> None:
    with devices(kind, "src") as (m,):
        dev = m.device
        if not dev.caps & MigCap.PRE_COPY:
            pytest.fail(f"{kind} should support pre-copy")
        assert dev.set_state(S.PRE_COPY) is True
        info = dev.precopy_info()
        assert info.initial_bytes > 0
        first = drain(dev)
        assert len(first) >= info.initial_bytes
        assert dev.precopy_info().initial_bytes == 0
        # nothing queued now: a temporary end (NoDataNow or a 0-byte read), not the end
        with contextlib.suppress(NoDataNow):
            assert dev.read_into(memoryview(bytearray(4096))) == 0
        assert dev.state == S.PRE_COPY
        dev.set_state(S.STOP_COPY)
        drain(dev)
        assert dev.read_into(memoryview(bytearray(4096))) == 0  # now the end, permanently
        dev.set_state(S.STOP)
        with pytest.raises(DeviceError):
            dev.precopy_info()
        dev.recover()


def lent_stream(dev: Device, limit: int) -> bytes:
    """The saving stream as :meth:`Device.lend` lends it, ``limit`` bytes at most a call,
    each lease given back once its bytes are taken."""
    out = bytearray()
    while True:
        try:
            lease = dev.lend(limit)
        except NoDataNow:
            break
        if not lease.views:
            break
        assert 0 < sum(len(v) for v in lease.views) <= limit
        for v in lease.views:
            out += v
        lease.release()
    return bytes(out)


def sink_load(dev: Device, data: bytes, limit: int) -> None:
    """Load ``data`` the way the pipeline opens chunks into a device: into what it lends."""
    pos = 0
    while pos < len(data):
        view = dev.sink(min(limit, len(data) - pos))
        assert 0 < len(view) <= limit
        view[:] = data[pos : pos + len(view)]
        dev.sunk(len(view))
        pos += len(view)


def test_lent_memory_carries_the_same_stream(kind: str) -> None:
    with devices(kind, "src", "twin", "dst") as (src, twin, dst):
        expected = full_stream(twin.device)
        src.device.set_state(S.STOP_COPY)
        dst.device.set_state(S.RESUMING)
        if src.device.lends_saved:
            assert lent_stream(src.device, 300_001) == expected  # not record-aligned
        else:  # a data_fd can only be read
            with pytest.raises(DeviceError, match="does not lend saved data"):
                src.device.lend(4096)
        if not dst.device.lends_memory:  # ... and written (mlx5: records for the firmware)
            with pytest.raises(DeviceError, match="does not lend its memory"):
                dst.device.sink(4096)
            return
        sink_load(dst.device, expected, 5_003)
        with pytest.raises(DeviceError, match="committed"):
            dst.device.sunk(1)  # nothing is lent now
        dst.device.set_state(S.RUNNING)
        assert dst.digest() == twin.digest()
        with pytest.raises(IllegalTransition):  # only a RESUMING device takes data
            dst.device.sink(1)


@contextlib.asynccontextmanager
async def rig(src: Device, dst: Device) -> AsyncIterator[tuple[Host, str, dict[str, Job]]]:
    a, b = Identity.generate(), Identity.generate()
    trust = AuthorizedKeys({a.public: "src", b.public: "dst"})
    hsrc = Host(a, trust, Workers(), {"vf0": src}, idle_timeout=5)
    hdst = Host(b, trust, Workers(), {"vf0": dst}, idle_timeout=5)
    async with serving(hsrc, hdst, close_devices=False) as (address, jobs):
        yield hsrc, address, jobs


async def migrate(host: Host, address: str, jobs: dict[str, Job]) -> Job:
    job = Job("source", "vf0")
    await asyncio.wait_for(run_source(host, job, MigrateOptions(address, "vf0", timeout=10)), 60)
    for _ in range(300):
        if all(j.done.is_set() for j in jobs.values()):
            break
        await asyncio.sleep(0.01)
    return job


async def test_round_trip_through_a_real_migration(kind: str) -> None:
    with devices(kind, "src", "dst") as (src, dst):
        assert src.digest() != dst.digest()
        async with rig(src.device, dst.device) as (host, address, jobs):
            job = await migrate(host, address, jobs)
        assert job.status.value == "completed", job.error
        assert src.device.state == S.STOP and dst.device.state == S.RUNNING
        assert dst.digest() == src.digest()


def source_arcs(caps: MigCap) -> list[tuple[S, S]]:
    steps = [S.RUNNING, *path(S.RUNNING, S.PRE_COPY, caps), *path(S.PRE_COPY, S.STOP_COPY, caps)]
    return list(itertools.pairwise(steps))


@pytest.mark.parametrize("which", range(3))
async def test_failure_at_each_source_arc_leaves_it_running(kind: str, which: int) -> None:
    with devices(kind, "src", "dst") as (src, dst):
        arcs = source_arcs(src.device.caps)
        if which >= len(arcs):
            assert len(arcs) == 2 and not src.device.caps & MigCap.P2P  # hisi: no P2P arc
            return
        arc = arcs[which]
        if src.model is not None:
            src.model.fail_arc = arc  # the kernel's SET fails midway
        else:
            def hook(cur: S, nxt: S) -> None:
                if (cur, nxt) == arc:
                    raise DeviceError("injected")
            src.device.fail_hook = hook
        before = src.digest()
        async with rig(src.device, dst.device) as (host, address, jobs):
            job = await migrate(host, address, jobs)
            assert job.status.value == "failed", arc
            assert src.device.state == S.RUNNING and src.digest() == before
            assert dst.device.state == S.RUNNING
            # Then tried again, through the same sessions: the whole state, byte-exact.
            src.device.fail_hook = None
            again = await migrate(host, address, jobs)
        assert again.status.value == "completed", again.error
        assert dst.digest() == src.digest()


# --- a migration stopped at any point, then tried again ------------------------------------
#
# Nothing in the stream digest can catch a device that hands out a short image on the
# second try (the stream is whatever the device says it is), so this is what guards it.


def _part(dev: Device) -> None:
    """Read some of what is there (not all)."""
    with contextlib.suppress(NoDataNow):
        dev.read_into(memoryview(bytearray(64 << 10)))


def _precopy(dev: Device, drained: bool) -> None:
    dev.set_state(S.PRE_COPY)
    if drained:
        drain(dev)
        dev.precopy_info()
    else:
        _part(dev)


def _stop_copy(dev: Device, precopy: bool, drained: bool) -> None:
    if precopy:
        _precopy(dev, drained=True)
    dev.set_state(S.STOP_COPY)
    if drained:
        drain(dev)
    else:
        _part(dev)


def _precopy_p2p(dev: Device) -> None:
    _precopy(dev, drained=False)
    dev.set_state(S.PRE_COPY_P2P)


INTERRUPTIONS: dict[str, Callable[[Device], object]] = {
    "pre-copy, part read": lambda d: _precopy(d, drained=False),
    "pre-copy, drained": lambda d: _precopy(d, drained=True),
    "pre-copy-p2p": _precopy_p2p,
    "stop-copy after pre-copy, part read": lambda d: _stop_copy(d, True, False),
    "stop-copy after pre-copy, drained": lambda d: _stop_copy(d, True, True),
    "stop-copy, part read": lambda d: _stop_copy(d, False, False),
    "stop-copy, drained": lambda d: _stop_copy(d, False, True),
    "stop": lambda d: d.set_state(S.STOP),
}


def saved(dev: Device, precopy: bool) -> bytes:
    """The whole saving stream of one migration, with or without pre-copy."""
    out = b""
    if precopy:
        dev.set_state(S.PRE_COPY)
        out += drain(dev)
        dev.precopy_info()
        out += drain(dev)
    dev.set_state(S.STOP_COPY)
    out += drain(dev)
    return out


@pytest.mark.parametrize("where", list(INTERRUPTIONS))
@pytest.mark.parametrize("precopy", [True, False], ids=["then-pre-copy", "then-stop-copy"])
def test_a_migration_stopped_anywhere_then_tried_again_is_byte_exact(
        kind: str, where: str, precopy: bool) -> None:
    with devices(kind, "src", "dst") as (src, dst):
        if where == "pre-copy-p2p" and not src.device.caps & MigCap.P2P:
            assert kind.endswith("hisi")  # the one kind without P2P
            return
        INTERRUPTIONS[where](src.device)
        src.device.recover()
        assert src.device.state == S.RUNNING
        stream = saved(src.device, precopy)
        # The destination, too, takes a first attempt that stops halfway.
        dst.device.set_state(S.RESUMING)
        load(dst.device, stream[: len(stream) // 2])
        dst.device.recover()
        dst.device.set_state(S.RESUMING)
        load(dst.device, stream)
        dst.device.set_state(S.RUNNING)
        assert dst.digest() == src.digest(), f"{len(stream)} stream bytes"
