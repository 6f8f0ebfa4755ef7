"""``migd bench --vfs N [--vms M]``: whole VMs, and a whole host's evacuation.

A VM's VFs migrate as one (pre-copy in parallel, one atomic switchover), so what
a tenant sees is the VM's downtime: from its first VF stopping to its last one
running again at the destination, reported as the longest device downtime (they
stop together).  QEMU moves device state after RAM, one device after another,
inside its own downtime; nothing here is comparable without whole VMs.

With ``--vms M`` M such VMs migrate at once, as when a host is drained for
maintenance: the aggregate rate, the worst VM downtime, and how fairly the
migrations shared the link and the CPU (Jain's index of per-VM throughput: 1.0
when all moved at the same rate, 1/M when one took everything).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from typing import Any

from transports import REGISTRY as TRANSPORTS

from .bench import PeakMemory, _device_specs, bench_pair, finish, resources_line
from .harness import DaemonProc
from .report import migrate_args
from .units import human_bytes


def jain(rates: list[float]) -> float:
    """Jain's fairness index of ``rates``: (Σx)² / (n·Σx²), 1.0 = perfectly even."""
    if not rates or not any(rates):
        return 0.0
    return sum(rates) ** 2 / (len(rates) * sum(r * r for r in rates))


def _names(vms: int, vfs: int) -> list[list[str]]:
    return [[f"vm{m}vf{n}" for n in range(vfs)] for m in range(vms)]


def _migrate_vm(src: DaemonProc, dst: DaemonProc, req: dict[str, Any], vm: str,
                devices: list[str], transport: str, out: dict[str, Any]) -> None:
    try:
        with src.client(timeout=3600) as c:
            out["final"] = c.migrate_follow(
                dict(req, devices=devices, vm=vm, peer=dst.address_of(transport),
                     interval=0.05))
    except Exception as exc:  # reported with the VM, not lost in a thread
        out["final"] = {"status": "failed", "error-desc": str(exc)}
    out["ended"] = time.monotonic()


def measure(src: DaemonProc, dst: DaemonProc, req: dict[str, Any], vms: list[list[str]],
            transport: str) -> dict[str, Any]:
    """Migrate every VM of ``vms`` at once; each VM's figures, and the host's."""
    memory = PeakMemory({d.name: d.proc.pid for d in (src, dst)})
    cpu0 = {d.name: d.call("query-stats")["cpu_seconds"] for d in (src, dst)}
    results: list[dict[str, Any]] = [{} for _ in vms]
    start = time.monotonic()
    threads = [threading.Thread(target=_migrate_vm, args=(src, dst, req, f"vm{m}", devs,
                                                         transport, results[m]))
               for m, devs in enumerate(vms)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(r["ended"] for r in results) - start
    cpu = {d.name: d.call("query-stats")["cpu_seconds"] - cpu0[d.name] for d in (src, dst)}
    peak = memory.stop()
    out_vms = []
    for m, (devs, r) in enumerate(zip(vms, results, strict=True)):
        final = r["final"]
        digests_ok = all(
            src.call("device-digest", device=d)["sha256"]
            == dst.call("device-digest", device=d)["sha256"] for d in devs)
        seconds = (r["ended"] - start) if final.get("total-time") is None \
            else final["total-time"] / 1000
        moved = int(final.get("transferred", 0))
        out_vms.append({
            "vm": f"vm{m}", "status": final.get("status"), "error": final.get("error-desc"),
            "verified": final.get("status") == "completed" and digests_ok,
            "bytes": moved, "wire_bytes": int(final.get("wire-bytes", 0)),
            "seconds": round(seconds, 3),
            "gbps": round(moved / seconds / 1e9, 3) if seconds else 0.0,
            "downtime_ms": final.get("downtime"),
            "devices": [{"device": d.get("device"), "downtime_ms": d.get("downtime"),
                         "bytes": d.get("transferred"), "precopy_bytes": d.get("precopy-bytes"),
                         "downtime_bytes": d.get("downtime-bytes")}
                        for d in final.get("devices", [])],
        })
    total = sum(v["bytes"] for v in out_vms)
    downtimes = [v["downtime_ms"] for v in out_vms if v["downtime_ms"] is not None]
    return {
        "vms": out_vms,
        "verified": all(v["verified"] for v in out_vms),
        "bytes": total, "wire_bytes": sum(v["wire_bytes"] for v in out_vms),
        "seconds": round(wall, 3),
        "gbps": round(total / wall / 1e9, 3) if wall else 0.0,
        "worst_downtime_ms": max(downtimes) if downtimes else None,
        "jain": round(jain([v["gbps"] for v in out_vms]), 3),
        "cpu_seconds": {"source": round(cpu[src.name], 3),
                        "destination": round(cpu[dst.name], 3)},
        "mem_peak_bytes": {"source": peak[src.name], "destination": peak[dst.name]},
    }


def run_vms(args: argparse.Namespace) -> int:
    TRANSPORTS.check([args.transport])
    vms = _names(args.vms, args.vfs)
    specs = [_device_specs(args, name, i)
             for i, name in enumerate(name for devs in vms for name in devs)]
    req = migrate_args(args, "", "")
    req.pop("device", None)
    req.pop("peer", None)
    # Each of them migrates at once: the daemons' admission must not queue a VM's VFs.
    n = args.vms * args.vfs
    extra = [f"max_migrations={max(8, n)}", f"buffer_budget={max(512, 64 * n)}M"]
    with bench_pair(args, [s for s, _, _ in specs], [d for _, d, _ in specs],
                    [args.transport], "migd-bench-vms-",
                    extra=[x for o in extra for x in ("-o", o)]) as pair:
        result = measure(pair.src, pair.dst, req, vms, args.transport)
    result.update(backend=args.backend, transport=args.transport, vfs=args.vfs,
                  state_size_per_vf=specs[0][2])
    return finish(result, args.json, _print)


def _print(r: dict[str, Any]) -> None:
    print(f"{len(r['vms'])} VM(s) x {r['vfs']} {r['backend']} VF(s) of "
          f"{human_bytes(r['state_size_per_vf'])} over {r['transport']}: "
          f"{r['gbps']:.3f} GB/s aggregate, {r['seconds']:.2f} s, verified: "
          f"{'yes' if r['verified'] else 'NO'}")
    for v in r["vms"]:
        devs = ", ".join(f"{d['device']} {d['downtime_ms']} ms" for d in v["devices"])
        print(f"  {v['vm']}: {v['status']}, downtime {v['downtime_ms']} ms ({devs}); "
              f"{v['gbps']:.3f} GB/s" + (f"; {v['error']}" if v["error"] else ""))
    if len(r["vms"]) > 1:
        rates = [v["gbps"] for v in r["vms"]]
        print(f"  worst VM downtime {r['worst_downtime_ms']} ms; per-VM GB/s median "
              f"{statistics.median(rates):.3f}, Jain's fairness index {r['jain']:.3f}")
    print(resources_line(r))
