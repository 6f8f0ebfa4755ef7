"""A daemon killed at each named moment of the switchover, then restarted.

Each case: two real daemons whose VFs keep their memory and state under a
directory (so a killed daemon's VF still holds what it held), a migration, the
victim exits at its fault point (``MIGD_FAULT``, an ``os._exit``: nothing is
cleaned up, the peer is told nothing), the victim is started again on the same
journal, and both settle.  Never both VFs running; the one that runs holds the
source's state; with both daemons up every case is decided (nothing unresolved).
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

import pytest

from migd.faults import EXIT, POINTS
from migd.harness import DaemonProc, local_pair

SIZE = 1 << 20
ZERO = hashlib.sha256(bytes(SIZE)).hexdigest()
SETTLED = ("completed", "failed", "cancelled", "unresolved")
#: Where each case must end: the source's decision was journaled (commit), or not.
#: The destination's vote may die with it in the socket: either is right then.
OUTCOME = {
    ("source", "after-stop"): {"abort"}, ("source", "after-end"): {"abort"},
    ("source", "after-loaded"): {"abort"}, ("source", "after-decision"): {"commit"},
    ("source", "after-go"): {"commit"}, ("source", "after-commit"): {"commit"},
    ("destination", "after-end"): {"abort"}, ("destination", "after-stop"): {"abort"},
    ("destination", "after-loaded"): {"commit", "abort"},
    ("destination", "after-decision"): {"commit"}, ("destination", "after-go"): {"commit"},
    ("destination", "after-commit"): {"commit"},
}


def vf(d: DaemonProc) -> dict[str, Any]:
    dev: dict[str, Any] = d.call("query-devices")[0]
    dev["sha256"] = d.call("device-digest", device="vf0")["sha256"]
    return dev


def settled(d: DaemonProc, mid: str, timeout: float = 30) -> dict[str, Any]:
    """The migration ``mid`` once it settled (completed, failed or unresolved)."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = [j for j in d.call("query-migrate") if mid in (j["id"], j.get("migration"))]
        if jobs and jobs[0]["status"] in SETTLED and jobs[0]["phase"] != "resolving":
            return dict(jobs[0])
        if time.monotonic() > deadline:
            raise TimeoutError(f"{d.name}: migration {mid} did not settle: {jobs}\n{d.log()[-3000:]}")
        time.sleep(0.05)


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("victim", ["source", "destination"])
def test_killed_and_restarted_at_every_fault_point(tmp_path: Any, victim: str, point: str) -> None:
    wd = str(tmp_path)
    fault = {"MIGD_FAULT": f"{victim}:{point}"}
    quick = ["--resolve-timeout", "20", "--resume-timeout", "20", "--idle-timeout", "5"]
    with local_pair([f"vf0:sim:size={SIZE},dir={wd}/src-vf"],
                    [f"vf0:sim:size={SIZE},content=zero,dir={wd}/dst-vf"],
                    src_extra=quick, dst_extra=quick, workdir=wd,
                    src_env=fault if victim == "source" else None,
                    dst_env=fault if victim == "destination" else None) as p:
        before = vf(p.src)["sha256"]
        mid = p.src.call("migrate", device="vf0", peer=p.dst.address, precopy=False,
                         channels=1, timeout=3)["id"]
        dead = p.src if victim == "source" else p.dst
        assert dead.proc.wait(30) == EXIT, dead.log()[-2000:]
        dead.restart()
        s, d = settled(p.src, mid), settled(p.dst, mid)
        src, dst = vf(p.src), vf(p.dst)
        # Never forked: at most one of the two VFs runs ...
        assert not (src["state"] == "RUNNING" and dst["state"] == "RUNNING"
                    and dst["sha256"] != ZERO), (src, dst)
        # ... never lost: the one that runs holds the source's state ...
        running = [v for v in (src, dst) if v["state"] == "RUNNING" and v["sha256"] == before]
        assert len(running) == 1, (s, d, src, dst)
        # ... and with both daemons up, every case is decided.
        assert "unresolved" not in (s["status"], d["status"]), (s, d)
        assert ("commit" if running[0] is dst else "abort") in OUTCOME[(victim, point)], (s, d)
        if running[0] is dst:  # committed: the source VF stays stopped for good
            assert s["status"] == "completed" and d["status"] == "completed"
            assert src["state"] == "STOP" and not dst["busy"]
        else:  # aborted: the destination VF holds nothing
            assert s["status"] == "failed" and d["status"] == "failed"
            assert dst["sha256"] == ZERO and dst["state"] == "RUNNING"
        assert not src["busy"] and not dst["busy"]
        assert os.listdir(f"{wd}/{dead.name}.state")  # the journal the restart read


@pytest.mark.parametrize("victim, point", [("source", "after-decision"),
                                           ("destination", "after-go")])
def test_a_whole_vm_has_one_decision_across_a_crash(tmp_path: Any, victim: str,
                                                    point: str) -> None:
    """Two VFs of one VM; the decision for both is one journal record, so a crash
    between it and the go to each device ends with both on the destination."""
    wd = str(tmp_path)
    fault = {"MIGD_FAULT": f"{victim}:{point}"}
    quick = ["--resolve-timeout", "20", "--resume-timeout", "20", "--idle-timeout", "5"]
    names = ["vf0", "vf1"]
    with local_pair([f"{n}:sim:size={SIZE},seed={i},dir={wd}/src-vf" for i, n in enumerate(names)],
                    [f"{n}:sim:size={SIZE},content=zero,dir={wd}/dst-vf" for n in names],
                    src_extra=quick, dst_extra=quick, workdir=wd,
                    src_env=fault if victim == "source" else None,
                    dst_env=fault if victim == "destination" else None) as p:
        before = {n: p.src.call("device-digest", device=n)["sha256"] for n in names}
        vm = p.src.call("migrate", devices=names, peer=p.dst.address, precopy=False,
                        channels=1, timeout=3, vm="guest")["id"]
        dead = p.src if victim == "source" else p.dst
        assert dead.proc.wait(30) == EXIT, dead.log()[-2000:]
        dead.restart()
        for d in (p.src, p.dst):
            deadline = time.monotonic() + 30
            while not all(j["status"] in SETTLED and j["phase"] != "resolving"
                          for j in d.call("query-migrate")):
                assert time.monotonic() < deadline, d.call("query-migrate")
                time.sleep(0.05)
        for n in names:
            src = p.src.call("device-digest", device=n)
            dst = p.dst.call("device-digest", device=n)
            assert src["state"] == "STOP" and dst["state"] == "RUNNING", (vm, src, dst)
            assert dst["sha256"] == before[n]
        assert all(j["status"] == "completed" for j in p.dst.call("query-migrate"))


def test_a_damaged_journal_stops_the_start_naming_the_file(tmp_path: Any) -> None:
    from migd.errors import ConfigError
    from migd.harness import start_daemon, write_identity

    wd = str(tmp_path)
    me = write_identity(wd, "d")
    state = tmp_path / "d.state"
    state.mkdir()
    (state / "source-abc.json").write_text('{"format": 1, "record": {"role": "sou"}}\n')
    with pytest.raises(ConfigError) as info:
        start_daemon(wd, "d", [f"vf0:sim:size={SIZE}"], [me.public], wait=30)
    assert f"journal {state}/source-abc.json is damaged" in info.value.message
    assert "will not start half recovered" in info.value.message
