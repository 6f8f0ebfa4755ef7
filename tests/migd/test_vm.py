"""Whole-VM migrations: every device in P2P before any stops; all commit or none."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

import backends
from backends.base import PrecopyInfo
from backends.sim import SimDevice
from backends.states import DeviceState
from migd.codec import parse_compress
from migd.errors import ConfigError, DeviceError, WrongState
from migd.identity import AuthorizedKeys, Identity
from migd.pipeline import Workers
from migd.session import (
    Host,
    Job,
    MigrateOptions,
    Switchover,
    VmJob,
    check_vm,
)
from migd.source import run_source

from ..loopback import serving

S = DeviceState
NAMES = ["vf0", "vf1", "vf2"]
ZERO = hashlib.sha256(bytes(4 << 20)).hexdigest()


@contextlib.asynccontextmanager
async def vm_rig(ids: dict[str, Identity], trust: AuthorizedKeys,
                 caps: str | dict[str, str] = "stop_copy+p2p+pre_copy",
                 dirty: dict[str, str] | None = None
                 ) -> AsyncIterator[tuple[Host, Host, str]]:
    """Three VFs a side; ``caps`` and the guests' ``dirty`` rates per VF if a dict."""
    def cap(n: str) -> str:
        return caps if isinstance(caps, str) else caps[n]
    src = Host(ids["src"], trust, Workers(), {
        n: backends.REGISTRY.create("sim", n, {"size": "4M", "seed": str(i), "caps": cap(n),
                                               "dirty-rate": (dirty or {}).get(n, "0")})
        for i, n in enumerate(NAMES)}, idle_timeout=5)
    dst = Host(ids["dst"], trust, Workers(), {
        n: backends.REGISTRY.create("sim", n, {"size": "4M", "content": "zero", "caps": cap(n)})
        for n in NAMES}, idle_timeout=5)
    async with serving(src, dst) as (address, _):
        yield src, dst, address


def start_vm(src: Host, address: str, pause: bool = False, **opts: Any) -> VmJob:
    check_vm(src, NAMES)
    sw = Switchover(len(NAMES))
    jobs = [Job("source", n) for n in NAMES]
    sw.jobs = jobs
    for j in jobs:
        j.task = asyncio.create_task(run_source(src, j, MigrateOptions(
            address, j.device, timeout=10, pause_before_switchover=pause, **opts), sw))
    return VmJob("guest", address, jobs)


async def migrate_vm(src: Host, address: str) -> VmJob:
    vm = start_vm(src, address)
    await asyncio.wait_for(vm.watch(), 60)
    await asyncio.sleep(0.2)  # let the destination finish its side
    return vm


def sim(h: Host, n: str) -> SimDevice:
    d = h.devices[n]
    assert isinstance(d, SimDevice)
    return d


async def test_three_vfs_switch_over_together(ids: dict[str, Identity],
                                              trust: AuthorizedKeys) -> None:
    async with vm_rig(ids, trust) as (src, dst, address):
        order: list[tuple[str, S]] = []
        for n in NAMES:
            sim(src, n).fail_hook = lambda cur, nxt, n=n: order.append((n, nxt))
        vm = await migrate_vm(src, address)
        q = vm.query()
        assert q["status"] == "completed", q
        assert len(q["devices"]) == 3 and q["transferred"] >= 3 * (4 << 20)
        for n in NAMES:
            assert sim(dst, n).digest() == sim(src, n).digest() != ZERO
            assert sim(src, n).state == S.STOP and sim(dst, n).state == S.RUNNING
        p2p = [i for i, (_, s) in enumerate(order) if s == S.PRE_COPY_P2P]
        stops = [i for i, (_, s) in enumerate(order) if s == S.STOP_COPY]
        assert len(p2p) == 3 and len(stops) == 3 and max(p2p) < min(stops)


async def test_a_vm_pauses_before_switchover_with_every_device_in_p2p(
        ids: dict[str, Identity], trust: AuthorizedKeys) -> None:
    async with vm_rig(ids, trust) as (src, dst, address):
        vm = start_vm(src, address, pause=True)
        for _ in range(1000):
            if vm.status() == "pre-switchover" and all(j.phase == "pre-switchover"
                                                       for j in vm.jobs):
                break
            await asyncio.sleep(0.01)
        assert vm.status() == "pre-switchover"
        await asyncio.sleep(0.1)  # it stays there
        # Paused: no device stopped, every one is in its P2P state (no DMA initiated).
        assert {sim(src, n).state for n in NAMES} == {S.PRE_COPY_P2P}
        assert vm.status() == "pre-switchover"
        vm.resume_switchover()
        await asyncio.wait_for(vm.watch(), 60)
        assert vm.query()["status"] == "completed"
        for n in NAMES:
            assert sim(dst, n).digest() == sim(src, n).digest()
        with pytest.raises(WrongState, match="not paused in pre-switchover"):
            vm.resume_switchover()


@pytest.mark.parametrize("side", ["source", "destination"])
async def test_a_failure_in_one_device_rolls_back_all(ids: dict[str, Identity],
                                                      trust: AuthorizedKeys, side: str) -> None:
    async with vm_rig(ids, trust) as (src, dst, address):
        before = {n: sim(src, n).digest() for n in NAMES}
        host, arc = ((src, (S.PRE_COPY_P2P, S.STOP_COPY)) if side == "source"
                     else (dst, (S.RESUMING, S.STOP)))

        def hook(cur: S, nxt: S) -> None:
            if (cur, nxt) == arc:
                raise DeviceError("injected")
        sim(host, "vf1").fail_hook = hook
        vm = await migrate_vm(src, address)
        q = vm.query()
        assert q["status"] == "failed" and "injected" in q["error-desc"]
        assert all(d["status"] == "failed" for d in q["devices"])
        for n in NAMES:
            assert sim(src, n).state == S.RUNNING and sim(src, n).digest() == before[n]
            assert sim(dst, n).state == S.RUNNING and sim(dst, n).digest() == ZERO
            assert sim(dst, n).describe()["loading"] is False


async def test_a_vm_needs_p2p_on_every_device(ids: dict[str, Identity],
                                              trust: AuthorizedKeys) -> None:
    async with vm_rig(ids, trust, caps="stop_copy+pre_copy") as (src, _, _):
        with pytest.raises(ConfigError, match="no P2P state"):
            check_vm(src, NAMES)
        check_vm(src, ["vf0"])  # a single device is fine without


async def test_devices_that_fit_alone_keep_iterating_until_the_vm_fits(
        ids: dict[str, Identity], trust: AuthorizedKeys) -> None:
    """vf0's guest dirties faster than its share of a capped link can carry: the VM
    never fits.  Its quiet siblings fit on their own, but do not sit idle while their
    guests write: they send what changes until they run out of iterations too."""
    async with vm_rig(ids, trust, dirty={"vf0": "40M", "vf1": "1M", "vf2": "1M"}) as (
            src, dst, address):
        vm = start_vm(src, address, downtime_limit_ms=50, max_iterations=5,
                      max_bandwidth=8 << 20, compress=parse_compress("none"))
        jobs = vm.jobs
        asked = {n: 0 for n in NAMES}
        for n in NAMES:
            dev = sim(src, n)

            def counting(dev: SimDevice = dev, n: str = n) -> PrecopyInfo:
                asked[n] += 1
                return SimDevice.precopy_info(dev)
            dev.precopy_info = counting  # type: ignore[method-assign]
        t0 = time.monotonic()
        await asyncio.wait_for(vm.watch(), 60)
        q = vm.query()
        assert q["status"] == "completed", q
        # Each quiet sibling alone: ~100 KB dirty per round at ~8 MB/s, a few ms.
        assert all(j.dirty_sync_count == 5 for j in jobs), [j.dirty_sync_count for j in jobs]
        # Siblings that can do no more wait for news, rather than wake each other.
        polls = (time.monotonic() - t0) / Switchover.REPORT_WAIT
        assert max(asked.values()) < 2 * polls + 20, (asked, polls)
        await asyncio.sleep(0.2)
        for n in NAMES:
            assert dst.devices[n].state == S.RUNNING


async def test_a_vm_with_a_device_that_does_not_pre_copy(ids: dict[str, Identity],
                                                         trust: AuthorizedKeys) -> None:
    """vf1 has no pre-copy: its siblings' estimate counts its whole state, and does
    not wait for figures from it."""
    caps = {"vf0": "stop_copy+p2p+pre_copy", "vf1": "stop_copy+p2p",
            "vf2": "stop_copy+p2p+pre_copy"}
    async with vm_rig(ids, trust, caps) as (src, dst, address):
        vm = await migrate_vm(src, address)
        q = vm.query()
        assert q["status"] == "completed", q
        for n in NAMES:
            assert sim(dst, n).digest() == sim(src, n).digest() != ZERO
        assert vm.jobs[1].dirty_sync_count == 0 and vm.jobs[0].dirty_sync_count >= 1
