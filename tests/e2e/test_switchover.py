"""Switchover on the VMM's word, and outcomes an operator settles, through the CLI.

QEMU's flow: the source VM pauses before switchover (``pre-switchover``), the
management layer does its part, then says go on; the destination VM stays paused
until ``cont``.  migd lines up with it: ``--pause-before-switchover`` and
``migrate-continue`` on the source, ``--stay-stopped`` and ``device-resume`` on
the destination.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any

import pytest

from migd.control import ControlError
from migd.faults import EXIT
from migd.harness import DaemonProc, Pair, local_pair

from .test_daemons import device, migd

SIZE = 16 << 20
ZERO = hashlib.sha256(bytes(SIZE)).hexdigest()
SRC = f"vf0:sim:size={SIZE}"
DST = f"vf0:sim:size={SIZE},content=zero"


def start_migrate(p: Pair, *flags: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "migd", "migrate", "vf0", "--to",
                             p.dst.address, "--control", p.src.control, "--json", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)


def wait_status(d: DaemonProc, status: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        jobs = d.call("query-migrate")
        if jobs and jobs[-1]["status"] == status:
            return dict(jobs[-1])
        assert time.monotonic() < deadline, f"{d.name} never reached {status}: {jobs}"
        time.sleep(0.02)


class Events:
    """The daemon's event stream, collected in the background."""

    def __init__(self, d: DaemonProc) -> None:
        self.seen: list[dict[str, Any]] = []
        self._client = d.client()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            for data in self._client.events():
                self.seen.append(data)
        except Exception:
            pass

    def statuses(self) -> list[str]:
        return [e.get("status", "") for e in self.seen]

    def close(self) -> None:
        self._client.close()


def test_pause_before_switchover_then_migrate_continue() -> None:
    with local_pair([SRC + ",dirty-rate=4M"], [DST]) as p:
        events = Events(p.src)
        proc = start_migrate(p, "--pause-before-switchover")
        try:
            paused = wait_status(p.src, "pre-switchover")
            assert paused["phase"] == "pre-switchover"
            # Paused: the VF still runs (pre-copy), nothing is loaded yet at the destination.
            assert device(p.src)["state"] == "PRE_COPY"
            assert device(p.dst)["state"] == "RESUMING"
            time.sleep(0.3)
            assert p.src.call("query-migrate")[0]["status"] == "pre-switchover"
            r = migd("migrate-continue", paused["id"], "--control", p.src.control)
            assert r.returncode == 0 and "continues" in r.stdout
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        final = json.loads(out)
        assert proc.returncode == 0 and final["status"] == "completed", err
        s, d = device(p.src), device(p.dst)
        assert s["sha256"] == d["sha256"] and d["state"] == "RUNNING" and s["state"] == "STOP"
        assert "pre-switchover" in events.statuses()
        events.close()
        r = migd("migrate-continue", paused["id"], "--control", p.src.control)
        assert r.returncode == 2 and "not paused in pre-switchover" in r.stderr


def test_cancel_while_paused_before_switchover() -> None:
    with local_pair([SRC], [DST]) as p:
        before = device(p.src)["sha256"]
        proc = start_migrate(p, "--pause-before-switchover")
        try:
            paused = wait_status(p.src, "pre-switchover")
            r = migd("cancel", paused["id"], "--control", p.src.control)
            assert r.returncode == 0 and paused["id"] in r.stdout
            out, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 1 and json.loads(out)["status"] == "cancelled"
        s = device(p.src)
        assert s["state"] == "RUNNING" and s["sha256"] == before
        incoming = wait_status(p.dst, "failed")
        assert incoming["phase"] == "reset"
        d = device(p.dst)
        assert d["state"] == "RUNNING" and d["sha256"] == ZERO and d["loads_committed"] == 0


def test_stay_stopped_then_device_resume_on_the_destination() -> None:
    with local_pair([SRC], [DST]) as p:
        before = device(p.src)["sha256"]
        r = migd("migrate", "vf0", "--to", p.dst.address, "--control", p.src.control,
                 "--stay-stopped", "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["status"] == "completed", r.stderr
        (incoming,) = p.dst.call("query-migrate")
        assert (incoming["status"], incoming["phase"]) == ("completed", "loaded")
        d = device(p.dst)
        assert d["state"] == "STOP" and d["sha256"] == before
        # The source VF stopped for good: there is nothing of an incoming state to resume.
        r = migd("device-resume", "vf0", "--control", p.src.control)
        assert r.returncode == 2 and "holds no committed, stopped incoming state" in r.stderr
        r = migd("device-resume", "vf0", "--control", p.dst.control)
        assert r.returncode == 0 and "RUNNING" in r.stdout, r.stderr
        d = device(p.dst)
        assert d["state"] == "RUNNING" and d["sha256"] == before
        assert p.dst.call("query-migrate")[0]["phase"] == "done"
        r = migd("device-resume", "vf0", "--control", p.dst.control)
        assert r.returncode == 2 and "nothing to resume" in r.stderr


def test_device_reset_discards_a_loaded_stopped_vf() -> None:
    with local_pair([SRC], [DST]) as p:
        r = migd("migrate", "vf0", "--to", p.dst.address, "--control", p.src.control,
                 "--stay-stopped")
        assert r.returncode == 0, r.stderr
        r = migd("device-reset", "vf0", "--control", p.dst.control)
        assert r.returncode == 0 and "RUNNING" in r.stdout
        d = device(p.dst)
        assert d["state"] == "RUNNING" and d["sha256"] == ZERO
        r = migd("device-resume", "vf0", "--control", p.dst.control)
        assert r.returncode == 2 and "is RUNNING, not the stopped VF" in r.stderr


QUICK = ["--resolve-timeout", "2", "--resume-timeout", "5", "--idle-timeout", "3"]


def scrape(d: DaemonProc, metric: str) -> str:
    address = d.call("query-stats")["metrics_address"]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        text: str = resp.read().decode()
    return next(line for line in text.splitlines() if line.startswith(metric + " "))


def test_a_source_that_cannot_deliver_its_commit_is_unresolved_until_an_operator_decides(
        tmp_path: Any) -> None:
    """The destination dies with COMMIT in flight and stays down: the source keeps its
    VF stopped and says so (status, event, log, metric); the operator resumes it
    (having made sure the destination VF does not run), and a destination that comes
    back later resets."""
    conf = tmp_path / "src.toml"
    conf.write_text('metrics = "127.0.0.1:0"\n')
    with local_pair([SRC], [DST], src_extra=[*QUICK, "--config", str(conf)], dst_extra=QUICK,
                    dst_env={"MIGD_FAULT": "destination:after-go"}) as p:
        before = device(p.src)["sha256"]
        events = Events(p.src)
        r = migd("migrate", "vf0", "--to", p.dst.address, "--control", p.src.control,
                 "--no-precopy", "--channels", "1", "--json", timeout=60)
        assert p.dst.proc.wait(10) == EXIT
        final = json.loads(r.stdout)
        assert r.returncode == 3 and final["status"] == "unresolved", final
        assert "cannot reach the destination" in final["unresolved-reason"]
        assert device(p.src)["state"] == "STOP"
        r = migd("status", final["id"], "--control", p.src.control)
        assert "UNRESOLVED" in r.stdout and "migd resolve" in r.stdout
        assert "unresolved" in events.statuses()
        events.close()
        assert "UNRESOLVED" in p.src.log()
        assert scrape(p.src, "migd_unresolved_migrations") == "migd_unresolved_migrations 1.0"
        # Cancel is no way out once decided.
        r = migd("cancel", final["id"], "--control", p.src.control)
        assert r.returncode == 2 and "past the point" in r.stderr
        r = migd("resolve", final["id"], "--resume-source", "--control", p.src.control)
        assert r.returncode == 0 and "abort" in r.stdout
        wait_status(p.src, "failed")
        s = device(p.src)
        assert s["state"] == "RUNNING" and s["sha256"] == before and not s["busy"]
        assert scrape(p.src, "migd_unresolved_migrations") == "migd_unresolved_migrations 0.0"
        p.dst.restart()  # it voted before it died: it asks, hears ABORT, resets
        incoming = wait_status(p.dst, "failed", timeout=30)
        assert incoming["recovered"]
        d = device(p.dst)
        assert d["state"] == "RUNNING" and d["sha256"] == ZERO


def test_a_destination_that_voted_and_lost_its_source_is_confirmed_by_the_operator(
        tmp_path: Any) -> None:
    """The source host dies (for good, the operator judges) after the vote: the
    destination holds the loaded VF, reports unresolved, and the operator's confirm
    starts it."""
    with local_pair([f"{SRC},dir={tmp_path}/src-vf"], [f"{DST},dir={tmp_path}/dst-vf"],
                    src_extra=QUICK, dst_extra=QUICK,
                    src_env={"MIGD_FAULT": "source:after-loaded"}) as p:
        before = device(p.src)["sha256"]
        p.src.call("migrate", device="vf0", peer=p.dst.address, precopy=False, channels=1)
        assert p.src.proc.wait(10) == EXIT
        incoming = wait_status(p.dst, "unresolved", timeout=30)
        assert "source" in incoming["unresolved-reason"]
        d = device(p.dst)
        assert d["state"] == "STOP" and d["busy"] and d["sha256"] == before
        r = migd("device-reset", "vf0", "--control", p.dst.control)
        assert r.returncode == 2 and "migd resolve" in r.stderr
        r = migd("resolve", incoming["id"], "--confirm", "--control", p.dst.control)
        assert r.returncode == 0 and "commit" in r.stdout
        wait_status(p.dst, "completed")
        d = device(p.dst)
        assert d["state"] == "RUNNING" and d["sha256"] == before and not d["busy"]
        # The source host comes back after all, with no decision in its journal: it
        # asks before it resumes anything, and leaves its VF stopped.
        p.src.restart()
        s = wait_status(p.src, "completed")
        assert s["recovered"]
        assert device(p.src)["state"] == "STOP" and device(p.dst)["state"] == "RUNNING"


def test_the_new_commands_refuse_bad_requests_clearly() -> None:
    with local_pair([SRC], [DST]) as p:
        with p.src.client() as c:
            cases: list[tuple[str, dict[str, Any], str]] = [
                ("migrate-continue", {}, "'id' is required"),
                ("migrate-continue", {"id": 5}, "'id' must be a string of at most 64"),
                ("migrate-continue", {"id": "nope"}, "no migration with id 'nope'"),
                ("resolve", {"id": "nope", "decision": "commit"}, "no migration with id"),
                ("device-resume", {"device": ["vf0"]}, "'device' must be a string"),
                ("device-reset", {"device": "vf9"}, "no device named 'vf9'"),
                ("migrate", {"device": "vf0", "peer": p.dst.address,
                             "pause-before-switchover": "yes"}, "must be true or false"),
                ("migrate", {"device": "vf0", "peer": p.dst.address, "max-resumes": -1},
                 "'max-resumes' must be a whole number from 0 to 100"),
                ("migrate", {"device": "vf0", "peer": p.dst.address, "resume-timeout": 0},
                 "'resume-timeout' must be a number of seconds from 0.1"),
            ]
            for cmd, args, why in cases:
                with pytest.raises(ControlError, match=why):
                    c.call(cmd, **args)
            done = c.migrate_follow({"device": "vf0", "peer": p.dst.address})
            assert done["status"] == "completed"
            for cmd, args, why in [
                ("migrate-continue", {"id": done["id"]}, "not paused in pre-switchover"),
                ("resolve", {"id": done["id"], "decision": "commit"},
                 "only an unresolved .* migration is settled by hand"),
                ("resolve", {"id": done["id"], "decision": "maybe"},
                 "'decision' must be 'commit'"),
            ]:
                with pytest.raises(ControlError, match=why):
                    c.call(cmd, **args)
        assert "Traceback" not in p.src.log()
