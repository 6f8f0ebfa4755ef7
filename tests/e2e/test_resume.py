"""Links cut in the middle of a migration: resumed from the destination's position.

A proxy between the daemons cuts one channel, or every connection at once, at a
random data frame during pre-copy or stop-copy.  The source reconnects through
it (the new connections pass untouched), authenticates again and resumes from
the last chunk the destination acknowledged as loaded: the migration completes
byte-exact, or, once the resumes run out, fails with the source VF running.
"""

from __future__ import annotations

import hashlib
import os
import random
from typing import Any

import pytest

from migd.harness import Pair, local_pair
from migd.identity import AuthorizedKeys, Identity
from migd.protocol.connection import Established
from migd.protocol.messages import Accept, Migrate, Resume, Resumed

from .peers import Proxy, ScriptedSource
from .test_daemons import DST, SIZE, SRC, ZERO, device, migrate, wait_finished

BIG = 32 << 20


def cut_at(frame: int) -> Any:
    def mutate(i: int, f: bytes) -> list[bytes] | None:
        return None if i == frame else [f]
    return mutate


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("cut", ["one-channel", "all"])
@pytest.mark.parametrize("phase", ["pre-copy", "stop-copy"])
def test_a_cut_link_is_resumed_byte_exact(phase: str, cut: str, seed: int) -> None:
    rng = random.Random(f"{phase}/{cut}/{seed}")
    frame = rng.randrange(1, 40)  # 256 KiB chunks, 64 per channel: mid-stream
    channel = rng.randrange(2) if cut == "one-channel" else 0
    precopy = phase == "pre-copy"
    src = f"vf0:sim:size={BIG}" + (",dirty-rate=16M" if precopy else "")
    with local_pair([src], [f"vf0:sim:size={BIG},content=zero"]) as p:
        proxy = Proxy(p.dst.address, cut_at(frame), target=channel, cut_all=cut == "all")
        try:
            final = migrate(p, proxy.address, {"chunk-size": 256 << 10, "precopy": precopy,
                                               "max-iterations": 2, "downtime-limit": 0},
                            compress="none", channels=2)
        finally:
            proxy.close()
        assert proxy.fired and proxy.connections > 2, "the cut never happened"
        assert final["status"] == "completed", (final.get("error-desc"), p.dst.log()[-3000:])
        assert final["resumes"] >= 1 and final["resent-bytes"] >= 0
        (incoming,) = wait_finished(p.dst)
        assert incoming["status"] == "completed" and incoming["resumes"] >= 1
        s, d = device(p.src), device(p.dst)
        assert s["sha256"] == d["sha256"] and d["state"] == "RUNNING" and s["state"] == "STOP"


def test_when_the_resumes_run_out_the_source_runs_on() -> None:
    # (The source tells the destination through the proxy, which the test closes at
    # once: the destination may only learn by waiting out its resume timeout.)
    with local_pair([f"vf0:sim:size={BIG}"], [f"vf0:sim:size={BIG},content=zero"],
                    dst_extra=["--resume-timeout", "3"]) as p:
        before = device(p.src)["sha256"]
        proxy = Proxy(p.dst.address, cut_at(3), target=set(range(100)))  # every connection
        try:
            final = migrate(p, proxy.address, {"chunk-size": 256 << 10, "max-resumes": 2,
                                               "precopy": False}, compress="none", channels=1)
        finally:
            proxy.close()
        assert final["status"] == "failed" and final["resumes"] == 2, final
        (incoming,) = wait_finished(p.dst, timeout=30)
        assert incoming["status"] == "failed"
        s, d = device(p.src), device(p.dst)
        assert s["state"] == "RUNNING" and s["sha256"] == before
        assert d["sha256"] == hashlib.sha256(bytes(BIG)).hexdigest()
        assert d["loads_committed"] == 0


# --- who may resume, and from where --------------------------------------------------------


def source_as(p: Pair, ident: Identity) -> ScriptedSource:
    s = ScriptedSource(p.dst.address, ident, AuthorizedKeys({p.keys["dst"].public: "dst"}))
    s.pump(lambda: any(isinstance(e, Established) for e in s.events) or bool(s.failure()))
    assert not s.failure()
    return s


def resume(p: Pair, ident: Identity, msg: Resume) -> ScriptedSource:
    r = source_as(p, ident)
    r.send(msg)
    r.pump(lambda: bool(r.failure()) or r.control(Resumed) is not None)
    return r


def refused(r: ScriptedSource, why: str) -> None:
    failure = r.failure()
    assert failure is not None and why in failure.error.message, r.events
    r.close()


def test_a_resume_is_refused_unless_it_is_the_same_peer_with_the_live_token() -> None:
    other = Identity.generate()
    with local_pair([SRC], [DST], dst_also_trusts=[other.public],
                    dst_extra=["--resume-timeout", "30"]) as p:
        me = Identity.load(os.path.join(p.workdir, "src.key"))
        s = source_as(p, me)
        mid = "resume-" + os.urandom(4).hex()
        s.send(Migrate(id=mid, device="vf0", kind="sim",
                       compat={"model": "sim-vf", "state_size": SIZE, "format": 1, "caps": 7},
                       state_size=SIZE, precopy=False, channels=1))
        s.pump(lambda: s.control(Accept) is not None)
        accept = s.control(Accept)
        assert accept is not None
        s.close()  # the link breaks: the destination waits for a resume

        def state() -> str:
            (job,) = p.dst.call("query-migrate")
            return f"{job['status']}/{job['phase']}"

        good = Resume(id=mid, token=accept.token, index=0, offset=0, channels=1)
        refused(resume(p, other, good), "another peer")
        refused(resume(p, me, Resume(id=mid, token=os.urandom(32), channels=1)),
                "stale or wrong token")
        refused(resume(p, me, Resume(id="nobody", token=accept.token, channels=1)),
                "cannot be resumed")
        assert state() == "active/detached"  # none of that touched the migration
        r = resume(p, me, good)
        resumed = r.control(Resumed)
        assert resumed is not None and resumed.index == 0 and not resumed.voted
        assert resumed.token != accept.token
        r.close()
        # The spent token resumes nothing; the new one, from a position never loaded,
        # fails the migration (fail closed) and the VF is reset.
        refused(resume(p, me, good), "stale or wrong token")
        bad = resume(p, me, Resume(id=mid, token=resumed.token, index=3, offset=3 << 20,
                                   channels=1))
        refused(bad, "acknowledged only up to chunk 0")
        (job,) = wait_finished(p.dst)
        assert job["status"] == "failed"
        refused(resume(p, me, Resume(id=mid, token=resumed.token, channels=1)),
                "cannot be resumed (failed: ")
        d = device(p.dst)
        assert d["state"] == "RUNNING" and d["sha256"] == ZERO and not d["busy"]
