"""Two real migd daemons (subprocesses) on loopback, driven like an operator would."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zstandard

from backends.sim import RECORD
from migd.codec import Encoding
from migd.harness import DaemonProc, Pair, local_pair
from migd.identity import AuthorizedKeys, Identity
from migd.protocol.connection import Established, Offer
from migd.protocol.frames import HEADER, HEADER_SIZE, FrameType
from migd.protocol.messages import Accept, Announce, End, Join, Joined, Migrate

from .peers import Proxy, ScriptedSource, host_port

SIZE = 8 << 20
SRC = f"vf0:sim:size={SIZE}"
DST = f"vf0:sim:size={SIZE},content=zero"
ZERO = hashlib.sha256(bytes(SIZE)).hexdigest()


def migd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "migd", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture
def pair() -> Iterator[Pair]:
    with local_pair([SRC], [DST]) as p:
        yield p


def device(d: DaemonProc) -> dict[str, Any]:
    dev: dict[str, Any] = d.call("query-devices")[0]
    dev["sha256"] = d.call("device-digest", device="vf0")["sha256"]
    return dev


def wait_finished(d: DaemonProc, timeout: float = 15) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        jobs: list[dict[str, Any]] = d.call("query-migrate")
        if jobs and all(j["status"] in ("completed", "failed", "cancelled") for j in jobs):
            return jobs
        if time.monotonic() > deadline:
            raise TimeoutError(f"{d.name} migrations still running: {jobs}")
        time.sleep(0.05)


def assert_rolled_back(p: Pair, src_before: str) -> None:
    """The rule: source running and unchanged, destination never resumed."""
    s, d = device(p.src), device(p.dst)
    assert s["state"] == "RUNNING" and s["sha256"] == src_before
    assert d["state"] == "RUNNING" and d["sha256"] == ZERO and not d["busy"]
    assert d["loads_committed"] == 0


def migrate(p: Pair, peer: str | None = None, options: dict[str, Any] | None = None,
            **extra: Any) -> dict[str, Any]:
    with p.src.client() as c:
        return c.migrate_follow({"device": "vf0", "peer": peer or p.dst.address,
                                 **(options or {}), **extra})


# --- the happy path through the CLI ------------------------------------------------------


def test_cli_migrate_with_precopy_under_workload_is_byte_exact() -> None:
    # 64 MiB: the initial round outlasts the guest's 2 ms dirtying tick, so there
    # is always dirty state left to chase.
    big = 64 << 20
    with local_pair([f"vf0:sim:size={big},dirty-rate=64M"], [f"vf0:sim:size={big},content=zero"]) as p:
        time.sleep(0.2)
        r = migd("migrate", "vf0", "--to", p.dst.address, "--control", p.src.control,
                 "--downtime-limit", "0", "--max-iterations", "4", "--json")
        assert r.returncode == 0, r.stderr
        final = json.loads(r.stdout)
        assert final["status"] == "completed" and final["dirty-sync-count"] >= 2
        assert final["downtime"] >= 0 and final["transferred"] > big
        s, d = device(p.src), device(p.dst)
        assert s["state"] == "STOP" and d["state"] == "RUNNING"
        assert s["sha256"] == d["sha256"] != hashlib.sha256(bytes(big)).hexdigest()
        (incoming,) = wait_finished(p.dst)
        assert incoming["status"] == "completed" and incoming["id"] == final["id"]


def test_mlx5_vf_of_256mib_with_precopy_under_workload() -> None:
    size = 256 << 20
    with local_pair([f"vf0:mlx5:size={size},dirty-rate=32M,vhca-id=3"],
                    [f"vf0:mlx5:size={size},content=zero,vhca-id=7"]) as p:
        time.sleep(0.2)
        final = migrate(p, options={"max-iterations": 3, "downtime-limit": 0})
        assert final["status"] == "completed", final.get("error-desc")
        assert final["dirty-sync-count"] >= 2 and final["transferred"] > size
        assert final["downtime"] >= 0
        s, d = device(p.src), device(p.dst)
        assert s["kind"] == "mlx5" and s["vhca_id"] == 3 and d["vhca_id"] == 7
        assert s["state"] == "STOP" and d["state"] == "RUNNING"
        assert s["sha256"] == d["sha256"]


def test_hisi_vf_through_daemons_and_an_incompatible_target() -> None:
    with local_pair(["vf0:hisi:seed=1", "vf1:hisi"], ["vf0:hisi:seed=2", "vf1:hisi:dev-id=0x99"]) as p:
        final = migrate(p)
        assert final["status"] == "completed", final.get("error-desc")
        assert final["transferred"] == 176 and final["downtime"] >= 0
        s, d = device(p.src), device(p.dst)
        assert s["sha256"] == d["sha256"] and d["state"] == "RUNNING"
        assert d["doorbells_rung"] == 4
        # The target checks the 40 match bytes during pre-copy: the source never stops.
        with p.src.client() as c:
            bad = c.migrate_follow({"device": "vf1", "peer": p.dst.address})
        assert bad["status"] == "failed" and "EFAULT" in bad["error-desc"]
        assert bad["downtime-bytes"] == 0
        assert bad["failed-phase"] in ("pre-copy", "switchover-ack")
        vf1 = next(x for x in p.src.call("query-devices") if x["name"] == "vf1")
        assert vf1["state"] == "RUNNING"


def test_cli_list_and_status_tables(pair: Pair) -> None:
    assert migrate(pair)["status"] == "completed"
    r = migd("list", "--control", pair.src.control)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["DEVICE", "KIND", "STATE", "SIZE", "BUSY"]
    assert lines[1].split()[:3] == ["vf0", "sim", "STOP"]
    assert any("source" in line and "completed" in line for line in lines)
    r = migd("status", "--control", pair.dst.control)
    assert r.returncode == 0 and "destination" in r.stdout and "completed" in r.stdout
    listed = json.loads(migd("list", "--control", pair.src.control, "--json").stdout)
    assert listed["devices"][0]["name"] == "vf0" and len(listed["migrations"]) == 1


@pytest.mark.parametrize("transport", ["tcp", "rdma+shm", "rdma+tcp"])
def test_whole_vm_of_three_vfs_through_daemons(transport: str) -> None:
    """Three devices at once, two channels each: six connections into one daemon."""
    vfs = [f"vf{i}:sim:size={SIZE},seed={i},dirty-rate=8M" for i in range(3)]
    with local_pair(vfs, [f"vf{i}:sim:size={SIZE},content=zero" for i in range(3)]) as p:
        r = migd("migrate", "vf0", "vf1", "vf2", "--to", p.dst.address_of(transport), "--vm",
                 "guest", "--control", p.src.control, "--json")
        assert r.returncode == 0, r.stderr
        final = json.loads(r.stdout)
        assert final["status"] == "completed" and final["vm"] == "guest"
        assert final["transport"] == transport
        assert [d["device"] for d in final["devices"]] == ["vf0", "vf1", "vf2"]
        assert final["transferred"] == sum(d["transferred"] for d in final["devices"])
        for i in range(3):
            name = f"vf{i}"
            src = p.src.call("device-digest", device=name)
            dst = p.dst.call("device-digest", device=name)
            assert src["sha256"] == dst["sha256"] and dst["state"] == "RUNNING"


def test_whole_vm_failure_in_one_device_rolls_back_all_three() -> None:
    vfs = [f"vf{i}:sim:size={SIZE},seed={i}" for i in range(3)]
    dst = [f"vf0:sim:size={SIZE},content=zero", f"vf1:sim:size={SIZE},content=zero",
           f"vf2:sim:size={2 * SIZE},content=zero"]  # vf2's target cannot take it
    with local_pair(vfs, dst) as p:
        before = {f"vf{i}": p.src.call("device-digest", device=f"vf{i}")["sha256"]
                  for i in range(3)}
        r = migd("migrate", "vf0", "vf1", "vf2", "--to", p.dst.address, "--control",
                 p.src.control, "--json")
        assert r.returncode == 1
        final = json.loads(r.stdout)
        assert final["status"] == "failed" and "incompatible-device" in final["error-desc"]
        assert all(d["status"] == "failed" for d in final["devices"])
        wait_finished(p.dst)
        for name, digest in before.items():
            s = p.src.call("device-digest", device=name)
            assert s["state"] == "RUNNING" and s["sha256"] == digest
        for d in p.dst.call("query-devices"):
            assert d["state"] == "RUNNING" and d["loads_committed"] == 0


def test_whole_vm_refused_without_p2p() -> None:
    with local_pair([f"vf0:sim:size={SIZE}", f"vf1:sim:size={SIZE},caps=stop_copy+pre_copy"],
                    [DST]) as p:
        r = migd("migrate", "vf0", "vf1", "--to", p.dst.address, "--control", p.src.control)
        assert r.returncode == 2 and "vf1 has no P2P state" in r.stderr


def test_cli_multichannel(pair: Pair) -> None:
    r = migd("migrate", "vf0", "--to", pair.dst.address, "--control", pair.src.control,
             "--channels", "3", "--chunk-size", "256K", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["chunks"] >= SIZE // (256 << 10)  # every channel carried many
    assert device(pair.src)["sha256"] == device(pair.dst)["sha256"]
    r = migd("migrate", "vf0", "--to", pair.dst.address, "--control", pair.src.control,
             "--channels", "99")
    assert r.returncode == 2 and "'channels' must be a whole number from 1 to 16" in r.stderr


def test_cli_progress_and_summary(pair: Pair) -> None:
    r = migd("migrate", "vf0", "--to", pair.dst.address, "--control", pair.src.control,
             "--compress", "none", "--cipher", "chacha20-poly1305", "--stay-stopped")
    assert r.returncode == 0, r.stderr
    assert ("completed" in r.stderr and "GB/s" in r.stderr) or "MB/s" in r.stderr
    assert "migration" in r.stdout and "downtime" in r.stdout and "chacha20" in r.stdout
    assert device(pair.dst)["state"] == "STOP"


def test_cli_errors_are_clear(pair: Pair, tmp_path: Any) -> None:
    r = migd("migrate", "vf7", "--to", pair.dst.address, "--control", pair.src.control)
    assert r.returncode == 2 and "no device named 'vf7'" in r.stderr
    r = migd("migrate", "vf0", "--to", pair.dst.address, "--control", pair.src.control,
             "--compress", "lz4")
    assert r.returncode == 2 and "compress: 'lz4' unknown" in r.stderr
    r = migd("migrate", "vf0", "--to", "x", "--control", str(tmp_path / "none.sock"))
    assert r.returncode == 2 and "is 'migd serve' running?" in r.stderr
    r = migd("cancel", "--control", pair.src.control)
    assert r.returncode == 0 and "nothing was running" in r.stdout
    key = tmp_path / "k"
    assert migd("keygen", "-o", str(key)).returncode == 0
    r = migd("keygen", "-o", str(key))
    assert r.returncode == 2 and "not overwriting" in r.stderr


def test_serve_rejects_bad_configuration(tmp_path: Any) -> None:
    key = tmp_path / "id.key"
    Identity.generate().save(str(key))
    auth = tmp_path / "auth"
    auth.write_text("")
    base = ["serve", "--identity", str(key), "--authorized-keys", str(auth),
            "--control", str(tmp_path / "c.sock"), "--listen", "127.0.0.1:0"]
    for extra, msg in [(["--device", "vf0"], "expected NAME:KIND"),
                       (["--device", "vf0:gpu"], "unknown backend 'gpu'"),
                       (["--device", "vf0:sim:size=12"], "multiple of 4096"),
                       (["--listen", "127.0.0.1:99999"], "out of range"),
                       # Flags pass the same checks as the file's keys.
                       (["--idle-timeout", "nan"], "--idle-timeout: must be a positive number"),
                       (["--idle-timeout", "-1"], "--idle-timeout: must be a positive number"),
                       (["-o", "max_migrations=0"], "'max_migrations' must be"),
                       (["-o", "handshake_timeout"], "KEY=VALUE"),
                       (["-o", "no_such_key=1"], "no_such_key")]:
        r = migd(*base, *extra)
        assert r.returncode == 2 and msg in r.stderr, (extra, r.stderr)
    os.chmod(key, 0o644)
    r = migd(*base)
    assert r.returncode == 2 and "chmod 600" in r.stderr


def test_bench_matrix(tmp_path: Any) -> None:
    out = tmp_path / "m.json"
    r = migd("bench", "--matrix", "--state-size", "8M", "--matrix-channels", "1,2",
             "--matrix-compress", "none,auto", "--matrix-ciphers", "aes-256-gcm,none",
             "--matrix-transports", "tcp,rdma+shm", "--repeat", "2",
             "--matrix-out", str(out), timeout=300)
    assert r.returncode == 0, r.stderr
    tcp = [line for line in r.stdout.splitlines() if line.startswith("| tcp |")]
    assert len(tcp) == 4  # 2 channel counts x 2 compress modes; never clear text on tcp
    assert {line.split("|")[4].strip() for line in tcp} == {"aes-256-gcm"}
    shm = [line for line in r.stdout.splitlines() if line.startswith("| rdma+shm |")]
    assert len(shm) == 8  # ... x 2 ciphers: the host-local link may go without encryption
    runs = json.loads(out.read_text())["runs"]
    assert len(runs) == 24 and {run["channels"] for run in runs} == {1, 2}
    assert all(run["gbps"] > 0 and set(run["cpu_s_per_gb"]) == {"source", "destination"}
               for run in runs)
    assert "24/24" in r.stderr  # the progress bar reached the end
    chart = out.with_suffix(".png")
    if importlib.util.find_spec("matplotlib") is not None:  # the plot extra
        assert f"chart: {chart}" in r.stdout and chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "install the plot extra" in r.stdout and not chart.exists()
    bad = migd("bench", "--matrix", "--matrix-transports", "carrier-pigeon", timeout=60)
    assert bad.returncode == 2 and "transport 'carrier-pigeon' unknown" in bad.stderr


@pytest.mark.parametrize("backend", ["mlx5", "hisi"])
def test_bench_other_backends(backend: str) -> None:
    args = ["--state-size", "16M"] if backend == "mlx5" else []
    r = migd("bench", "--backend", backend, *args, "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["verified"] is True and res["backend"] == backend
    assert isinstance(res["downtime_ms"], int)
    r = migd("bench", "--backend", "vfio", timeout=60)
    assert r.returncode == 2 and "needs real hardware" in r.stderr


def test_bench_reports_what_operators_need() -> None:
    r = migd("bench", "--state-size", "16M", "--compress", "zstd:1", "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    for key in ("bytes", "wire_bytes", "seconds", "gbps", "downtime_ms", "verified",
                "cpu_seconds", "mem_peak_bytes"):
        assert key in res
    assert res["verified"] is True and res["bytes"] >= 16 << 20
    assert res["wire_bytes"] < res["bytes"]  # the mix compresses
    assert set(res["cpu_seconds"]) == set(res["mem_peak_bytes"]) == {"source", "destination"}
    assert res["gbps"] == pytest.approx(res["bytes"] / res["seconds"] / 1e9, rel=0.01)


# --- refusals ---------------------------------------------------------------------------


def test_unknown_peer_moves_no_bytes(tmp_path: Any) -> None:
    with local_pair([SRC], [DST]) as p:
        before = device(p.src)["sha256"]
        # A third daemon that does not know the source.
        stranger = Identity.generate().public
        from migd.harness import start_daemon, write_identity

        write_identity(p.workdir, "other")
        other = start_daemon(p.workdir, "other", [DST], [stranger])
        try:
            final = migrate(p, other.address)
            assert final["status"] == "failed" and "unknown-peer" in final["error-desc"]
            assert device(p.src)["state"] == "RUNNING"
            assert device(p.src)["sha256"] == before
            assert device(other)["sha256"] == ZERO
            assert other.call("query-migrate") == []  # refused before any session existed
        finally:
            other.stop()


def test_incompatible_destination_fails_before_stop() -> None:
    with local_pair([SRC], [f"vf0:sim:size={2 * SIZE},content=zero"]) as p:
        before = device(p.src)["sha256"]
        final = migrate(p)
        assert final["status"] == "failed" and "incompatible-device" in final["error-desc"]
        assert final["downtime-bytes"] == 0
        s = device(p.src)
        assert s["state"] == "RUNNING" and s["sha256"] == before


# --- a man in the middle between two real daemons ----------------------------------------


def flip(i: int, f: bytes) -> list[bytes]:
    if i != 3:
        return [f]
    b = bytearray(f)
    b[HEADER_SIZE + 100] ^= 0x04
    return [bytes(b)]


def truncate(i: int, f: bytes) -> list[bytes] | None:
    return None if i == 5 else [f]


_held: dict[str, bytes] = {}


def replay(i: int, f: bytes) -> list[bytes]:
    return [f, f] if i == 2 else [f]


def reorder(i: int, f: bytes) -> list[bytes]:
    if i == 2:
        _held["f"] = f
        return []
    return [f, _held.pop("f")] if i == 3 else [f]


def oversize(i: int, f: bytes) -> list[bytes]:
    if i != 1:
        return [f]
    return [HEADER.pack(b"MG", FrameType.DATA, 0, 1 << 30, *HEADER.unpack(f[:HEADER_SIZE])[4:])]


@pytest.mark.parametrize("mutate, error", [
    (flip, "integrity-error"), (truncate, "closed the connection"), (replay, "integrity-error"),
    (reorder, "integrity-error"), (oversize, "frame-too-large"),
], ids=["flipped-bit", "truncated", "replayed", "reordered", "oversize"])
def test_tampered_stream_rolls_back_both_sides(pair: Pair, mutate: Any, error: str) -> None:
    before = device(pair.src)["sha256"]
    proxy = Proxy(pair.dst.address, mutate)
    try:
        # A cut link is resumed (tests/e2e/test_resume.py); here resuming is off.
        final = migrate(pair, proxy.address, {"chunk-size": 256 << 10, "max-resumes": 0},
                        compress="none")
    finally:
        proxy.close()
    assert proxy.fired
    assert final["status"] == "failed"
    # The destination's reason, or that it closed the connection (and where to look):
    # never a bare "Connection reset by peer".
    assert error in final["error-desc"], final
    assert "reset by peer" not in final["error-desc"], final
    (incoming,) = wait_finished(pair.dst)
    assert incoming["status"] == "failed"
    assert_rolled_back(pair, before)


def test_version_mismatch_between_real_daemons(pair: Pair) -> None:
    before = device(pair.src)["sha256"]
    proxy = Proxy(pair.dst.address, lambda i, f: [f], hello=lambda h: dict(h, versions=[99]))
    try:
        final = migrate(pair, proxy.address)
    finally:
        proxy.close()
    assert proxy.fired
    assert final["status"] == "failed" and "version-mismatch" in final["error-desc"]
    assert "speaks protocol [99]" in final["error-desc"]
    assert_rolled_back(pair, before)


def test_key_swapped_in_flight_is_refused_by_both() -> None:
    """A man in the middle swaps the source's key for another key the destination
    trusts: the destination's signature no longer covers what the source sent."""
    other = Identity.generate()
    with local_pair([SRC], [DST], dst_also_trusts=[other.public]) as p:
        before = device(p.src)["sha256"]
        proxy = Proxy(p.dst.address, lambda i, f: [f], hello=lambda h: dict(h, id=other.public))
        try:
            final = migrate(p, proxy.address)
        finally:
            proxy.close()
        assert proxy.fired
        assert final["status"] == "failed" and final["error-class"] == "bad-signature"
        assert_rolled_back(p, before)
        assert all(j["status"] == "failed" for j in p.dst.call("query-migrate"))


@pytest.mark.parametrize("mutate, error", [(flip, "integrity-error"), (truncate, "")],
                         ids=["flipped-bit", "dead-channel"])
def test_tampering_with_a_secondary_channel(pair: Pair, mutate: Any, error: str) -> None:
    before = device(pair.src)["sha256"]
    proxy = Proxy(pair.dst.address, mutate, target=1)
    try:
        final = migrate(pair, proxy.address, {"chunk-size": 256 << 10, "max-resumes": 0},
                        compress="none", channels=2)
    finally:
        proxy.close()
    assert proxy.fired
    assert final["status"] == "failed" and error in final["error-desc"]
    (incoming,) = wait_finished(pair.dst)
    assert incoming["status"] == "failed"
    assert_rolled_back(pair, before)


# --- a scripted source with valid keys that misbehaves -----------------------------------


def scripted(p: Pair, offer: Offer | None = None, ident: Identity | None = None) -> ScriptedSource:
    me = ident or Identity.load(os.path.join(p.workdir, "src.key"))
    trust = AuthorizedKeys({p.keys["dst"].public: "dst"})
    return ScriptedSource(p.dst.address, me, trust, offer)


#: A well-formed start of a sim device stream, so only the migd layer can object.
VALID_CHUNK = (RECORD.pack(b"SIMR", 0, 0, SIZE) + RECORD.pack(b"SIMR", 1, 0, 4096 - 48)
               + bytes(4096 - 48))


def start_session(p: Pair, s: ScriptedSource, size: int = SIZE, channels: int = 1) -> None:
    s.pump(lambda: any(isinstance(e, Established) for e in s.events) or bool(s.failure()))
    assert not s.failure()
    s.send(Migrate(id=f"evil-{os.urandom(4).hex()}", device="vf0", kind="sim",
                   compat={"model": "sim-vf", "state_size": size, "format": 1, "caps": 7},
                   state_size=size, precopy=False, resume=True, channels=channels))
    s.pump(lambda: s.control(Accept) is not None or bool(s.failure()))
    assert s.control(Accept) is not None


def finish_refused(p: Pair, s: ScriptedSource, error: str) -> None:
    s.pump(lambda: bool(s.failure()))
    failure = s.failure()
    assert failure is not None and failure.error.remote.name == error
    s.close()
    (incoming,) = wait_finished(p.dst)
    assert incoming["status"] == "failed" and incoming["error-class"] == error
    d = device(p.dst)
    assert d["state"] == "RUNNING" and d["sha256"] == ZERO and d["loads_committed"] == 0


def joiner(p: Pair, ident: Identity, channel: int, token: bytes) -> ScriptedSource:
    trust = AuthorizedKeys({p.keys["dst"].public: "dst"})
    j = ScriptedSource(p.dst.address, ident, trust, channel=channel)
    j.pump(lambda: any(isinstance(e, Established) for e in j.events) or bool(j.failure()))
    j.send(Join(token=token, channel=channel))
    j.pump(lambda: bool(j.failure()) or j.control(Joined) is not None)
    return j


def test_channel_joins_are_checked() -> None:
    other = Identity.generate()
    with local_pair([SRC], [DST], dst_also_trusts=[other.public]) as p:
        me = Identity.load(os.path.join(p.workdir, "src.key"))

        def session(channels: int) -> tuple[ScriptedSource, bytes]:
            s = scripted(p)
            start_session(p, s, channels=channels)
            accept = s.control(Accept)
            assert accept is not None
            token = accept.token
            assert isinstance(token, bytes)
            return s, token

        def refused(j: ScriptedSource, why: str) -> None:
            failure = j.failure()
            assert failure is not None and why in failure.error.message
            j.close()

        # A token nobody issued is turned away without touching any migration.
        s, token = session(3)
        refused(joiner(p, me, 1, b"\x00" * 32), "no migration with that token")
        ok = joiner(p, me, 1, token)
        assert ok.control(Joined) == Joined(channel=1)
        # The real token, misused, fails the migration it names (fail closed).
        refused(joiner(p, me, 1, token), "duplicate")
        s.pump(lambda: bool(s.failure()))
        assert s.failure() is not None
        for c in (ok, s):
            c.close()
        for ident, channel, why in [(me, 5, "bad or duplicate channel number"),
                                    (other, 1, "another peer")]:
            s, token = session(2)
            refused(joiner(p, ident, channel, token), why)
            s.pump(lambda: bool(s.failure()))  # noqa: B023
            assert s.failure() is not None
            s.close()
        assert all(j["status"] == "failed" for j in wait_finished(p.dst))
        assert device(p.dst)["sha256"] == ZERO


def test_decompression_bomb(pair: Pair) -> None:
    s = scripted(pair)
    start_session(pair, s)
    s.send(Announce(more=1 << 20))
    bomb = zstandard.ZstdCompressor().compress(bytes(64 << 20))
    s.send_data(0, 0, Encoding.ZSTD, bomb, 1 << 20)
    finish_refused(pair, s, "decompression-error")


def test_more_data_than_announced(pair: Pair) -> None:
    s = scripted(pair)
    start_session(pair, s)
    s.send(Announce(more=4096))
    s.send_data(0, 0, Encoding.RAW, VALID_CHUNK, 4096)
    s.send_data(1, 4096, Encoding.RAW, bytes(4096), 4096)
    finish_refused(pair, s, "over-announced")


def test_announcing_past_the_destination_limit(pair: Pair) -> None:
    s = scripted(pair)
    start_session(pair, s)
    s.send(Announce(more=1 << 40))
    finish_refused(pair, s, "over-announced")


def test_end_record_that_lies(pair: Pair) -> None:
    s = scripted(pair)
    start_session(pair, s)
    s.send(Announce(more=4096))
    s.send_data(0, 0, Encoding.RAW, VALID_CHUNK, 4096)
    s.send(End(length=4096, chunks=1, digest=b"\x00" * 32))
    finish_refused(pair, s, "integrity-error")


def test_stream_the_device_rejects(pair: Pair) -> None:
    """Well-formed migd frames whose content is not a valid device stream."""
    s = scripted(pair)
    start_session(pair, s)
    s.send(Announce(more=4096))
    s.send_data(0, 0, Encoding.RAW, os.urandom(4096), 4096)
    finish_refused(pair, s, "device-error")


def test_forged_chunk_that_garbles_the_device_stream(pair: Pair) -> None:
    """A chunk is opened straight into the device, so a flipped ciphertext bit in a
    record header makes the device object before the tag is checked: the error
    still names the forgery, and nothing is committed."""
    s = scripted(pair)
    start_session(pair, s)
    s.send(Announce(more=4096))

    def flip_magic(frame: bytearray) -> None:
        frame[HEADER_SIZE] ^= 0x01  # b"SIMR" decrypts as b"RIMR"

    s.send_data(0, 0, Encoding.RAW, VALID_CHUNK, 4096, forge=flip_magic)
    finish_refused(pair, s, "integrity-error")


def test_version_mismatch(pair: Pair) -> None:
    s = scripted(pair, Offer(versions=(7,)))
    s.pump(lambda: bool(s.failure()))
    failure = s.failure()
    assert failure is not None and failure.error.remote.name == "version-mismatch"
    assert "this host speaks [2]" in failure.error.message
    s.close()
    assert pair.dst.call("query-migrate") == []
    assert device(pair.dst)["sha256"] == ZERO


def test_wrong_key(pair: Pair) -> None:
    forged = Identity.generate()
    forged.public = pair.keys["src"].public  # claims the source, cannot sign as it
    s = scripted(pair, ident=forged)
    s.pump(lambda: bool(s.failure()))
    failure = s.failure()
    assert failure is not None and failure.error.remote.name == "bad-signature"
    s.close()
    assert pair.dst.call("query-migrate") == []


def test_control_socket_bad_input(pair: Pair) -> None:
    import socket

    sock = socket.socket(socket.AF_UNIX)
    sock.connect(pair.src.control)
    f = sock.makefile("rwb")
    for line, want in [(b"not json\n", "not valid JSON"), (b"[1]\n", "JSON object"),
                       (b'{"execute": "reboot"}\n', "unknown command 'reboot'"),
                       (b'{"execute": "migrate", "arguments": {"device": "vf0"}}\n',
                        "migrate: 'peer' is required"),
                       (b'{"execute": "migrate", "arguments": {"device": "vf0", "peer": "x",'
                        b' "colour": 1}}\n', "unknown argument(s) 'colour'"),
                       (b'{"execute": "query-migrate", "arguments": {"id": "nope"}}\n',
                        "no migration with id")]:
        f.write(line)
        f.flush()
        reply = json.loads(f.readline())
        assert want in reply["error"]["desc"], (line, reply)
    f.write(b"x" * (70 << 10) + b"\n")
    f.flush()
    assert "too long" in json.loads(f.readline())["error"]["desc"]
    sock.close()
    assert device(pair.src)["state"] == "RUNNING"  # the daemon is fine


M = b'"device": "vf0", "peer": "127.0.0.1:1"'


@pytest.mark.parametrize("request_, why", [
    (b'{"execute": "migrate", "arguments": {' + M + b', "max-iterations": 1e400}}',
     "'max-iterations' must be a whole number"),
    (b'{"execute": "migrate", "arguments": {' + M + b', "cipher": ["aes-256-gcm"]}}',
     "'cipher' must be one of"),
    (b'{"execute": "migrate", "arguments": {' + M + b', "timeout": -1}}',
     "'timeout' must be a number of seconds"),
    (b'{"execute": "migrate", "arguments": {' + M + b', "timeout": NaN}}',
     "'timeout' must be a number of seconds"),
    (b'{"execute": "migrate", "arguments": {' + M + b', "follow": true, "interval": "x"}}',
     "'interval' must be a number of seconds"),
    (b'{"execute": "migrate", "arguments": {' + M + b', "chunk-size": "9999999999999999999T"}}',
     "'chunk-size'"),
    (b'{"execute": "query-migrate", "arguments": {"id": ["a"]}}', "'id' must be a string"),
    (b'{"execute": "cancel", "arguments": {"id": {"x": 1}}}', "'id' must be a string"),
    (b'{"execute": "release-vm", "arguments": {"vm": "g", "addresses": 5}}',
     "'addresses' must be a list of PCI addresses"),
    (b'{"execute": "subscribe", "arguments": {"interval": "x"}}',
     "'interval' must be a number of seconds"),
    (b'{"execute": "device-dump", "arguments": {"device": "vf0"}}', "'path' is required"),
    (b'{"execute": 5}', "'execute' must name a command"),
    (b'{"execute": "list", "id": [1]}', "'id' of a request must be"),
    (b'[' * 20000 + b']' * 20000, "not valid JSON"),
])
def test_malformed_control_requests_get_a_clear_error(pair: Pair, request_: bytes,
                                                      why: str) -> None:
    with pair.src.client() as c:
        c._file.write(request_ + b"\n")
        c._file.flush()
        reply = c._read()
    assert why in reply["error"]["desc"], reply
    assert pair.src.call("query-migrate") == []  # nothing started
    assert "Traceback" not in pair.src.log()


def test_a_migration_without_flags_takes_the_daemons_defaults(tmp_path: Any) -> None:
    conf = tmp_path / "src.toml"
    conf.write_text('[defaults]\ncompress = "none"\nchannels = 1\n')
    with local_pair([SRC], [DST], src_extra=["--config", str(conf)]) as p:
        r = migd("migrate", "vf0", "--to", p.dst.address, "--control", p.src.control, "--json")
        final = json.loads(r.stdout)
        assert final["status"] == "completed" and final["compress"] == "none"
        assert final["channels"] == 1


def test_hello_garbage_from_the_network(pair: Pair) -> None:
    import socket

    for junk in (b"GET / HTTP/1.1\r\n\r\n" * 3,
                 HEADER.pack(b"MG", FrameType.HELLO, 0, 5, 0, 0, 0, 0) + b"\x81\xa1a\x01\x02",
                 msgpack.packb({"x": 1})):
        with socket.create_connection(host_port(pair.dst.address), timeout=5) as sock:
            sock.sendall(junk)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(5)
            try:
                while sock.recv(4096):
                    pass
            except OSError:
                pass
    assert device(pair.dst)["sha256"] == ZERO
    final = migrate(pair)  # and it still serves real peers
    assert final["status"] == "completed"


def test_a_destination_takes_chunks_no_larger_than_its_max_chunk_size() -> None:
    """``max_chunk_size`` bounds what a destination accepts: a source asking for 1 MiB
    chunks is negotiated down to it, and the migration is byte-exact."""
    with local_pair([SRC], [DST], dst_extra=["-o", "max_chunk_size=256K"]) as p:
        with p.src.client() as c:
            final = c.migrate_follow({"device": "vf0", "peer": p.dst.address,
                                      "chunk-size": 1 << 20, "interval": 0.05}, lambda _: None)
        assert final["status"] == "completed", final.get("error-desc")
        assert final["chunk-size"] == 256 << 10
        assert device(p.src)["sha256"] == device(p.dst)["sha256"]


@pytest.mark.parametrize("args, why", [
    (["--vfs", "0"], "--vfs and --vms must be at least 1"),
    (["--vms", "-2"], "--vfs and --vms must be at least 1"),
    (["--link", "fast"], "link rate 'fast'"),
    (["--link", "10gbit", "--transport", "rdma+shm"], "rdma+shm stays on one host"),
])
def test_bench_refuses_what_it_cannot_run_with_a_reason(args: list[str], why: str) -> None:
    r = migd("bench", "--state-size", "4M", *args)
    assert r.returncode != 0 and why in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
