"""Two hosts on one machine: each daemon in a network namespace of its own, joined by
a veth pair that ``tc`` shapes (``migd.topology``).  What matters across hosts:
several channels through a real (virtual) NIC, a cable pulled mid-migration and put
back (resumed), a whole VM, and a host-wide cap shared fairly by the migrations
running at once.  Needs root and iproute2 (``scripts/setup`` installs it)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from migd.bench_vms import jain, measure
from migd.harness import Pair, local_pair
from migd.topology import Link, two_hosts

from .test_daemons import device, wait_finished

if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None:
    pytest.fail("the two-host tests need root and iproute2 (run scripts/setup as root)",
                pytrace=False)

MiB = 1 << 20


@pytest.fixture
def link() -> Iterator[Link]:
    with two_hosts(1_000_000_000) as ln:  # 1 Gbit/s each way
        yield ln


def migrate(p: Pair, **args: Any) -> dict[str, Any]:
    with p.src.client(timeout=120) as c:
        return c.migrate_follow({"device": "vf0", "peer": p.dst.address, "interval": 0.05,
                                 **args})


def test_several_channels_cross_the_link_and_arrive_byte_exact(link: Link) -> None:
    size = 48 * MiB
    with local_pair([f"vf0:sim:size={size}"], [f"vf0:sim:size={size},content=zero"],
                    link=link) as p:
        assert p.dst.address.startswith(f"tcp://{link.b.address}:")  # its own host and address
        before = link.a.counters()["tx_bytes"]
        final = migrate(p, channels=3, compress="none")
        assert final["status"] == "completed", final.get("error-desc")
        sent = link.a.counters()["tx_bytes"] - before
        assert sent >= final["wire-bytes"]  # every byte went through the NIC
        # 1 Gbit/s: the shaped link, not loopback, set the pace.
        assert final["wire-bytes"] / (final["total-time"] / 1000) < 140e6
        s, d = device(p.src), device(p.dst)
        assert s["sha256"] == d["sha256"] and d["state"] == "RUNNING"


def test_a_cable_pulled_mid_migration_and_put_back_is_resumed(link: Link) -> None:
    """Nothing resets the connections: the source notices the silence (2 s), and
    reconnects until the link is back; the destination kept what it loaded."""
    size = 96 * MiB
    fast = ["-o", "idle_timeout=2"]
    with local_pair([f"vf0:sim:size={size}"], [f"vf0:sim:size={size},content=zero"],
                    src_extra=fast, dst_extra=fast, link=link) as p:
        result: dict[str, Any] = {}
        mover = threading.Thread(target=lambda: result.update(
            migrate(p, compress="none", channels=2, timeout=2, precopy=False)))
        mover.start()
        deadline = time.monotonic() + 30
        while not any(j.get("transferred", 0) >= size // 4 for j in p.src.call("query-migrate")):
            assert time.monotonic() < deadline and mover.is_alive(), result
            time.sleep(0.01)
        link.a.set_up(False)  # the cable out
        time.sleep(3.5)
        link.a.set_up(True)
        mover.join(120)
        assert not mover.is_alive()
        assert result["status"] == "completed", result.get("error-desc")
        assert result["resumes"] >= 1
        (incoming,) = wait_finished(p.dst)
        assert incoming["status"] == "completed"
        s, d = device(p.src), device(p.dst)
        assert s["sha256"] == d["sha256"] and s["state"] == "STOP" and d["state"] == "RUNNING"


def test_a_whole_vm_crosses_the_link_and_switches_over_together(link: Link) -> None:
    size = 24 * MiB
    names = ["vm0vf0", "vm0vf1", "vm0vf2"]
    with local_pair([f"{n}:sim:size={size},dirty-rate=4M" for n in names],
                    [f"{n}:sim:size={size},content=zero" for n in names], link=link) as p:
        r = measure(p.src, p.dst, {"compress": "auto"}, [names], "tcp")
        (vm,) = r["vms"]
        assert vm["status"] == "completed" and r["verified"], vm["error"]
        assert len(vm["devices"]) == 3 and vm["downtime_ms"] is not None
        assert vm["downtime_ms"] == max(d["downtime_ms"] for d in vm["devices"])
        for d, state in ((p.src, "STOP"), (p.dst, "RUNNING")):
            assert [x["state"] for x in d.call("query-devices")] == [state] * 3


def test_a_host_wide_cap_is_shared_fairly_and_a_lone_migration_gets_all_of_it(
        link: Link) -> None:
    """max_bandwidth_total = 40 MB/s on a 1 Gbit/s link: two migrations at once get
    about 20 MB/s each; one alone gets about 40."""
    size = 16 * MiB
    cap = 40_000_000
    names = [["a0"], ["b0"]]
    capped = ["-o", f"max_bandwidth_total={cap}"]
    with local_pair([f"{v[0]}:sim:size={size}" for v in names],
                    [f"{v[0]}:sim:size={size},content=zero" for v in names],
                    src_extra=capped, dst_extra=capped, link=link) as p:
        both = measure(p.src, p.dst, {"compress": "none", "channels": 1}, names, "tcp")
        assert both["verified"], [v["error"] for v in both["vms"]]
        rates = [v["wire_bytes"] / v["seconds"] for v in both["vms"]]  # what the cap counts
        assert jain(rates) > 0.95, rates
        assert both["wire_bytes"] / both["seconds"] < cap * 1.15  # it holds for the host
        assert sum(rates) > cap * 0.7
        # One alone, this time back the other way (its VF lives there now).
        p.src, p.dst = p.dst, p.src
        alone = measure(p.src, p.dst, {"compress": "none", "channels": 1}, [["a0"]], "tcp")
        (vm,) = alone["vms"]
        assert vm["verified"]
        assert cap * 0.7 < vm["wire_bytes"] / vm["seconds"] < cap * 1.15, vm
