"""Source and destination drivers over real loopback TCP, in one event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

import backends
from backends.sim import SimDevice
from backends.states import DeviceState
from migd.codec import parse_compress
from migd.errors import DeviceError
from migd.identity import AuthorizedKeys, Identity
from migd.pipeline import Workers
from migd.session import Host, Job, MigrateOptions
from migd.source import run_source

from ..loopback import serving

S = DeviceState


@dataclass
class Rig:
    src: Host
    dst: Host
    address: str
    dst_jobs: dict[str, Job]

    def dev(self, host: Host, name: str = "vf0") -> SimDevice:
        d = host.devices[name]
        assert isinstance(d, SimDevice)
        return d

    async def migrate(self, **kw: object) -> tuple[Job, Job | None]:
        opts = MigrateOptions(peer=self.address, device="vf0", timeout=10.0)
        for k, v in kw.items():
            setattr(opts, k, v)
        job = Job("source", opts.device, peer=self.address)
        await asyncio.wait_for(run_source(self.src, job, opts), 60)
        await self.settled()
        return job, self.dst_jobs.get(job.id)

    async def settled(self) -> None:
        """The destination finishes its side asynchronously: wait for it (bounded)."""
        for _ in range(500):
            if all(j.done.is_set() or j.status.value == "unresolved"
                   for j in self.dst_jobs.values()):
                return
            await asyncio.sleep(0.01)


def host(ident: Identity, trust: AuthorizedKeys, devices: dict[str, dict[str, str]],
         kind: str = "sim") -> Host:
    devs = {n: backends.REGISTRY.create(kind, n, o) for n, o in devices.items()}
    return Host(identity=ident, authorized=trust, workers=Workers(), devices=devs,
                idle_timeout=5.0)


@contextlib.asynccontextmanager
async def rig(ids: dict[str, Identity], trust: AuthorizedKeys,
              src_dev: dict[str, str], dst_dev: dict[str, str],
              transport: str = "tcp", kind: str = "sim") -> AsyncIterator[Rig]:
    src = host(ids["src"], trust, {"vf0": src_dev}, kind)
    dst = host(ids["dst"], trust, {"vf0": dst_dev}, kind)
    async with serving(src, dst, transport=transport) as (address, jobs):
        yield Rig(src, dst, address, jobs)


def zero_digest(size: int) -> str:
    import hashlib

    return hashlib.sha256(bytes(size)).hexdigest()


async def test_precopy_with_dirtying_workload_is_byte_exact(
        ids: dict[str, Identity], trust: AuthorizedKeys) -> None:
    async with rig(ids, trust, {"size": "32M", "dirty-rate": "32M"},
                   {"size": "32M", "content": "zero"}) as r:
        await asyncio.sleep(0.1)
        job, djob = await r.migrate(downtime_limit_ms=0, max_iterations=3,
                                    compress=parse_compress("zstd:1"))
        assert job.status.value == "completed", job.error
        assert djob is not None and djob.status.value == "completed"
        src, dst = r.dev(r.src), r.dev(r.dst)
        assert src.state == S.STOP and dst.state == S.RUNNING
        assert src.guest_pages_written > 0
        # the 32 MiB initial round outlasts a 2 ms guest tick, so a dirty round follows
        assert 2 <= job.dirty_sync_count <= 3
        assert job.counters.downtime_bytes > 0 and job.counters.precopy_bytes > 32 << 20
        assert dst.digest() == src.digest()
        q = job.query()
        assert q["status"] == "completed" and q["downtime"] >= 0 and q["total"] == 32 << 20


async def test_stay_stopped_no_precopy_and_chacha(ids: dict[str, Identity],
                                                  trust: AuthorizedKeys) -> None:
    async with rig(ids, trust, {"size": "4M", "caps": "stop_copy+p2p"},
                   {"size": "4M", "content": "zero", "caps": "stop_copy+p2p"}) as r:
        job, _ = await r.migrate(resume=False, ciphers=("chacha20-poly1305",),
                                 compress=parse_compress("none"))
        assert job.status.value == "completed", job.error
        assert job.cipher == "chacha20-poly1305" and job.dirty_sync_count == 0
        assert r.dev(r.dst).state == S.STOP
        assert r.dev(r.src).arc_log[:3] == [(S.RUNNING, S.RUNNING_P2P),
                                            (S.RUNNING_P2P, S.STOP), (S.STOP, S.STOP_COPY)]
        assert r.dev(r.dst).digest() == r.dev(r.src).digest()


@pytest.mark.parametrize("channels, compress", [(2, "none"), (3, "zstd:1")])
async def test_multichannel_is_byte_exact(ids: dict[str, Identity], trust: AuthorizedKeys,
                                          channels: int, compress: str) -> None:
    async with rig(ids, trust, {"size": "32M", "dirty-rate": "32M"},
                   {"size": "32M", "content": "zero"}) as r:
        job, djob = await r.migrate(channels=channels, compress=parse_compress(compress),
                                    downtime_limit_ms=0, max_iterations=3, chunk_size=256 << 10)
        assert job.status.value == "completed", job.error
        assert djob is not None and djob.status.value == "completed"
        assert job.dirty_sync_count >= 2 and job.counters.chunks > 3 * channels
        assert r.dev(r.dst).digest() == r.dev(r.src).digest()


@pytest.mark.parametrize("transport, cipher, channels, compress", [
    ("rdma+shm", "none", 1, "none"), ("rdma+shm", "aes-256-gcm", 2, "none"),
    ("rdma+shm", "none", 3, "zstd:1"), ("rdma+shm", "chacha20-poly1305", 2, "auto"),
    ("rdma+tcp", "aes-256-gcm", 1, "none"), ("rdma+tcp", "aes-256-gcm", 2, "zstd:1"),
    ("rdma+tcp", "chacha20-poly1305", 3, "auto")])
async def test_rdma_migration_is_byte_exact(ids: dict[str, Identity], trust: AuthorizedKeys,
                                            transport: str, cipher: str, channels: int,
                                            compress: str) -> None:
    """One-sided writes into the destination's posted buffers, under a dirtying
    guest with pre-copy; the loaded state is the source's, byte for byte."""
    async with rig(ids, trust, {"size": "24M", "dirty-rate": "32M"},
                   {"size": "24M", "content": "zero"}, transport) as r:
        job, djob = await r.migrate(channels=channels, compress=parse_compress(compress),
                                    ciphers=(cipher,), downtime_limit_ms=0, max_iterations=3,
                                    chunk_size=256 << 10)
        assert job.status.value == "completed", job.error
        assert djob is not None and djob.status.value == "completed"
        assert job.cipher == cipher and job.dirty_sync_count >= 2
        c = job.counters
        assert c.chunks > 4 * channels
        if compress == "zstd:1":
            assert c.compressed_chunks > 0
        elif compress == "none":
            # zero blocks are skipped where bytes cross a link, not where they are a
            # memory copy (scanning would cost more than it saves)
            assert (c.sparse_chunks > 0) == (transport == "rdma+tcp")
        elif transport == "rdma+shm":  # auto: over shared memory it never pays, never probes
            assert c.auto_windows == 0 and c.compressed_chunks == 0
        else:
            assert c.auto_windows > 0
        assert r.dev(r.dst).state == S.RUNNING
        assert r.dev(r.dst).digest() == r.dev(r.src).digest()


async def test_clear_text_is_refused_on_a_link_that_leaves_the_host(
        ids: dict[str, Identity], trust: AuthorizedKeys) -> None:
    for transport in ("tcp", "rdma+tcp"):
        async with rig(ids, trust, {"size": "4M"}, {"size": "4M", "content": "zero"},
                       transport) as r:
            job, _ = await r.migrate(ciphers=("none",))
            assert job.status.value == "failed"
            assert job.error is not None and "no common cipher" in job.error.message
            assert r.dev(r.src).state == S.RUNNING and job.counters.wire_bytes == 0


@pytest.mark.parametrize("transport", ["tcp", "rdma+tcp", "rdma+shm"])
async def test_auto_compression_under_a_bandwidth_cap(ids: dict[str, Identity],
                                                      trust: AuthorizedKeys,
                                                      transport: str) -> None:
    """Decisions, not timing: under a 40 MB/s cap auto chooses to compress (also over
    shared memory, where it otherwise never does); and the cap holds (a lower bound
    on time, which a slow machine cannot break)."""
    async with rig(ids, trust, {"size": "48M"}, {"size": "48M", "content": "zero"},
                   transport) as r:
        cap = 40_000_000
        t0 = asyncio.get_running_loop().time()
        job, _ = await r.migrate(compress=parse_compress("auto"), max_bandwidth=cap,
                                 chunk_size=256 << 10, precopy=False,
                                 ciphers=("aes-256-gcm",))
        elapsed = asyncio.get_running_loop().time() - t0
        assert job.status.value == "completed", job.error
        c = job.counters
        assert c.auto_windows >= 8 and c.auto_compressed_windows >= c.auto_windows // 2
        assert c.compressed_chunks > c.chunks // 2
        assert elapsed >= 0.8 * c.wire_bytes / cap
        assert r.dev(r.dst).digest() == r.dev(r.src).digest()


async def test_incompatible_destination(ids: dict[str, Identity], trust: AuthorizedKeys) -> None:
    async with rig(ids, trust, {"size": "4M"}, {"size": "8M", "content": "zero"}) as r:
        before = r.dev(r.src).digest()
        job, djob = await r.migrate()
        assert job.status.value == "failed"
        assert job.error is not None and "incompatible-device" in job.error.message
        assert r.dev(r.src).state == S.RUNNING and r.dev(r.src).digest() == before
        assert r.dev(r.dst).describe()["loads_committed"] == 0
        assert djob is not None and djob.status.value == "failed"


async def test_unknown_and_busy_destination_device(ids: dict[str, Identity],
                                                   trust: AuthorizedKeys) -> None:
    async with rig(ids, trust, {"size": "4M"}, {"size": "4M"}) as r:
        job, _ = await r.migrate(dest_device="vf9")
        assert job.status.value == "failed" and "unknown-device" in str(job.error)
        r.dst.busy.add("vf0")
        job, _ = await r.migrate()
        assert job.status.value == "failed" and "device-busy" in str(job.error)
        assert r.dev(r.src).state == S.RUNNING


@pytest.mark.parametrize("transport", ["tcp", "rdma+shm", "rdma+tcp"])
async def test_cancel_mid_stream_rolls_back(ids: dict[str, Identity], trust: AuthorizedKeys,
                                           transport: str) -> None:
    # zstd:19 keeps the initial round busy for seconds, so the cancel lands mid-stream.
    async with rig(ids, trust, {"size": "64M"}, {"size": "64M", "content": "zero"},
                   transport) as r:
        before = r.dev(r.src).digest()
        opts = MigrateOptions(peer=r.address, device="vf0", compress=parse_compress("zstd:19"),
                              ciphers=("aes-256-gcm",))
        job = Job("source", "vf0")
        task = asyncio.create_task(run_source(r.src, job, opts))
        while job.counters.transferred < 4 << 20:
            await asyncio.sleep(0.005)
        assert job.status.value == "active"
        task.cancel()
        await asyncio.wait_for(task, 20)
        assert job.status.value == "cancelled"
        assert r.dev(r.src).state == S.RUNNING and r.dev(r.src).digest() == before
        await r.settled()
        (djob,) = r.dst_jobs.values()
        assert djob.status.value == "failed"
        assert r.dev(r.dst).state == S.RUNNING
        assert r.dev(r.dst).digest() == zero_digest(64 << 20)  # reset: nothing kept
        assert r.dev(r.dst).describe()["loads_committed"] == 0


async def test_cancel_during_setup(ids: dict[str, Identity], trust: AuthorizedKeys) -> None:
    import threading

    async with rig(ids, trust, {"size": "4M"}, {"size": "4M", "content": "zero"}) as r:
        gate = threading.Event()
        def stall(cur: S, nxt: S) -> None:
            gate.wait(10)
        r.dev(r.dst).fail_hook = stall
        job = Job("source", "vf0")
        task = asyncio.create_task(run_source(r.src, job, MigrateOptions(r.address, "vf0")))
        while job.status.value != "setup" or not r.dst_jobs:
            await asyncio.sleep(0.005)
        task.cancel()
        await asyncio.wait_for(task, 10)
        gate.set()
        assert job.status.value == "cancelled" and r.dev(r.src).state == S.RUNNING
        await r.settled()
        assert r.dev(r.dst).state == S.RUNNING
        assert r.dev(r.dst).describe()["loads_committed"] == 0


def fail_at(dev: SimDevice, arc: tuple[S, S]) -> None:
    def hook(cur: S, nxt: S) -> None:
        if (cur, nxt) == arc:
            raise DeviceError("injected")
    dev.fail_hook = hook


ARCS = [(S.RUNNING, S.PRE_COPY), (S.PRE_COPY, S.PRE_COPY_P2P), (S.PRE_COPY_P2P, S.STOP_COPY),
        (S.STOP_COPY, S.STOP)]


@pytest.mark.parametrize("arc", ARCS, ids=lambda a: f"{a[0].name}-{a[1].name}")
async def test_source_arc_failure_leaves_source_running(
        ids: dict[str, Identity], trust: AuthorizedKeys, arc: tuple[S, S]) -> None:
    async with rig(ids, trust, {"size": "4M"}, {"size": "4M", "content": "zero"}) as r:
        src = r.dev(r.src)
        before = src.digest()
        fail_at(src, arc)
        job, _ = await r.migrate()
        if arc == (S.STOP_COPY, S.STOP):
            # After the destination committed the guest lives there: completed, logged.
            assert job.status.value == "completed"
            assert r.dev(r.dst).state == S.RUNNING
            return
        assert job.status.value == "failed" and "injected" in str(job.error)
        assert src.state == S.RUNNING and src.digest() == before
        assert r.dev(r.dst).describe()["loads_committed"] == 0
        assert r.dev(r.dst).digest() == zero_digest(4 << 20)


DEST_ARCS = [(S.RUNNING, S.RUNNING_P2P), (S.STOP, S.RESUMING), (S.RESUMING, S.STOP),
             (S.RUNNING_P2P, S.RUNNING)]


@pytest.mark.parametrize("arc", DEST_ARCS, ids=lambda a: f"{a[0].name}-{a[1].name}")
async def test_destination_arc_failure_never_resumes(
        ids: dict[str, Identity], trust: AuthorizedKeys, arc: tuple[S, S]) -> None:
    async with rig(ids, trust, {"size": "4M"}, {"size": "4M", "content": "zero"}) as r:
        dst = r.dev(r.dst)
        fail_at(dst, arc)
        job, djob = await r.migrate()
        if arc == (S.RUNNING_P2P, S.RUNNING):
            # Past the decision the source's VF is stopped for good; a destination VF
            # that then will not start is reported unresolved, for the operator.
            assert job.status.value == "completed" and r.dev(r.src).state == S.STOP
            assert djob is not None and djob.status.value == "unresolved"
            assert "did not start" in djob.query()["unresolved-reason"]
            djob.abandon()
            return
        assert job.status.value == "failed"
        assert r.dev(r.src).state == S.RUNNING
        assert dst.state == S.RUNNING and dst.digest() == zero_digest(4 << 20)
        assert djob is None or djob.status.value == "failed"


@pytest.mark.parametrize("kind", ["sim", "mlx5"])
@pytest.mark.parametrize("transport", ["tcp", "rdma+tcp", "rdma+shm"])
async def test_a_broken_link_is_resumed_byte_exact(ids: dict[str, Identity], trust: AuthorizedKeys,
                                                   transport: str, kind: str) -> None:
    """The destination's end of the link is cut mid-stream, twice: the source
    reconnects, authenticates, and resumes from the acknowledged position.  The sim
    device lends its memory (kept chunks cost nothing); mlx5 is read into a pool
    of kept buffers."""
    src_opts = {"size": "16M", "dirty-rate": "8M"}
    dst_opts = {"size": "16M", "content": "zero"}
    if kind == "mlx5":
        src_opts, dst_opts = dict(src_opts, pf="pfa"), dict(dst_opts, pf="pfb")
    async with rig(ids, trust, src_opts, dst_opts, transport, kind) as r:
        opts = MigrateOptions(peer=r.address, device="vf0", timeout=5, chunk_size=256 << 10,
                              compress=parse_compress("none"), downtime_limit_ms=0,
                              max_iterations=2, ciphers=("aes-256-gcm",))
        job = Job("source", "vf0")
        task = asyncio.create_task(run_source(r.src, job, opts))
        for cut in (2 << 20, 9 << 20):  # once in pre-copy, once later
            while job.counters.transferred < cut and not task.done():
                await asyncio.sleep(0.001)
            drv = r.dst.incoming.get(job.mid)
            if drv is not None and drv.ep is not None:
                drv.ep.channel.close()
        await asyncio.wait_for(task, 60)
        await r.settled()
        assert job.status.value == "completed", job.error
        q = job.query()
        assert q["resumes"] >= 1 and q["resent-bytes"] >= 0
        assert r.dev(r.dst).digest() == r.dev(r.src).digest() if kind == "sim" else True
        src_dev, dst_dev = r.src.devices["vf0"], r.dst.devices["vf0"]
        assert dst_dev.digest() == src_dev.digest()
        assert dst_dev.state == S.RUNNING and src_dev.state == S.STOP


def test_the_source_says_where_it_can_be_reached() -> None:
    from migd.source import reachable

    listen = ["tcp://0.0.0.0:7707", "rdma+tcp://[::]:7708", "tcp://10.1.2.3:7709",
              "rdma+shm:///run/migd/rdma.sock"]
    assert reachable(listen, "192.0.2.7") == [
        "tcp://192.0.2.7:7707", "rdma+tcp://192.0.2.7:7708", "tcp://10.1.2.3:7709"]
    assert reachable(listen, "2001:db8::1")[1] == "rdma+tcp://[2001:db8::1]:7708"
    assert reachable(listen, "", host_local=True) == ["tcp://10.1.2.3:7709",
                                                      "rdma+shm:///run/migd/rdma.sock"]


async def test_a_source_vf_that_will_not_resume_is_reported_not_abandoned(
        ids: dict[str, Identity], trust: AuthorizedKeys) -> None:
    """The destination's device rejects the stream after the source sent all of it; the
    source's VF then fails to resume.  It is neither reset (that would lose its state)
    nor reported failed: it is unresolved, for an operator."""
    async with rig(ids, trust, {"size": "4M"}, {"size": "4M", "content": "zero"}) as r:
        fail_at(r.dev(r.dst), (S.RESUMING, S.STOP))
        fail_at(r.dev(r.src), (S.STOP, S.RUNNING_P2P))
        opts = MigrateOptions(peer=r.address, device="vf0", timeout=5, precopy=False)
        job = Job("source", "vf0")
        task = job.task = asyncio.create_task(run_source(r.src, job, opts))
        for _ in range(500):
            if job.status.value == "unresolved":
                break
            await asyncio.sleep(0.01)
        q = job.query()
        assert q["status"] == "unresolved", q
        assert "did not come back to RUNNING" in q["unresolved-reason"]
        assert r.dev(r.src).state != S.RUNNING and "vf0" in r.src.busy
        job.abandon()
        with contextlib.suppress(asyncio.CancelledError):
            await task
