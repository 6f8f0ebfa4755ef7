#!/usr/bin/env python3
"""Many migrations at once against two real daemons: does memory stay bounded?

Starts N mlx5 VFs migrating together (their buffers come from the daemons' banks,
unlike sim VFs, which lend their memory), samples both daemons' anonymous memory
(RssAnon, which includes the emulated devices' own memory and firmware buffers) and
the stream buffers each daemon holds (``query-stats``) every 20 ms, and reports the
peaks, the wall time and whether every migration completed.  Each ``--limits`` value
is one run with that ``max_migrations`` and ``buffer_budget`` on both daemons,
interleaved ``--repeat`` times, so the comparison is in one run of this noisy machine.

    .venv/bin/python bench/crowd.py --migrations 16 --limits 8/512M,64/64G
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from migd.harness import DaemonProc, local_pair


def rss_anon_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run(n: int, size: str, limit: int, budget: str) -> dict[str, float | int | bool]:
    devs = [f"vf{i}:mlx5:size={size},vhca-id={i + 1}" for i in range(n)]
    dst_devs = [f"vf{i}:mlx5:size={size},vhca-id={i + 1},content=zero" for i in range(n)]
    extra = ["-o", f"max_migrations={limit}", "-o", f"max_queued={max(n, 1)}",
             "-o", f"buffer_budget={budget}"]
    with local_pair(devs, dst_devs, src_extra=extra, dst_extra=extra) as p:
        peak = {"src": 0.0, "dst": 0.0}
        bank = {"src": 0, "dst": 0}  # the stream buffers the daemon holds, peak
        idle = {"src": rss_anon_mib(p.src.proc.pid), "dst": rss_anon_mib(p.dst.proc.pid)}
        done = threading.Event()

        def sample(d: DaemonProc, key: str) -> None:
            with d.client() as c:
                while not done.is_set():
                    peak[key] = max(peak[key], rss_anon_mib(d.proc.pid))
                    st = c.call("query-stats")
                    bank[key] = max(bank[key], st["bank_out_bytes"] + st["bank_free_bytes"])
                    time.sleep(0.02)

        threads = [threading.Thread(target=sample, args=(d, k), daemon=True)
                   for d, k in ((p.src, "src"), (p.dst, "dst"))]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        ids = [p.src.call("migrate", device=f"vf{i}", peer=p.dst.address,
                          **{"dest-device": f"vf{i}"})["id"] for i in range(n)]
        final: list[str] = []
        while time.monotonic() - t0 < 600:
            jobs = {j["id"]: j["status"] for j in p.src.call("query-migrate")}
            final = [jobs.get(i, "?") for i in ids]
            if all(s in ("completed", "failed", "cancelled", "unresolved") for s in final):
                break
            time.sleep(0.05)
        seconds = time.monotonic() - t0
        done.set()
        for t in threads:
            t.join()
        return {"limit": limit, "budget": budget, "seconds": round(seconds, 2),
                "src_bank_mib": bank["src"] >> 20, "dst_bank_mib": bank["dst"] >> 20,
                "completed": sum(s == "completed" for s in final),
                "src_idle_mib": round(idle["src"]), "src_peak_mib": round(peak["src"]),
                "dst_idle_mib": round(idle["dst"]), "dst_peak_mib": round(peak["dst"])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--migrations", type=int, default=16)
    ap.add_argument("--size", default="64M", help="state of each VF")
    ap.add_argument("--limits", default="8/512M,64/64G",
                    help="MAX_MIGRATIONS/BUFFER_BUDGET pairs to compare")
    ap.add_argument("--repeat", type=int, default=1)
    a = ap.parse_args()
    print(f"{a.migrations} mlx5 VFs of {a.size} at once\n")
    print("| max_migrations / buffer_budget | completed | seconds | stream buffers MiB, "
          "source / destination | source anon MiB idle → peak "
          "| destination anon MiB idle → peak |")
    print("|---|---|---|---|---|---|")
    for _ in range(a.repeat):
        for pair in a.limits.split(","):
            limit, _, budget = pair.partition("/")
            r = run(a.migrations, a.size, int(limit), budget or "512M")
            print(f"| {r['limit']} / {r['budget']} | {r['completed']}/{a.migrations} "
                  f"| {r['seconds']} | {r['src_bank_mib']} / {r['dst_bank_mib']} "
                  f"| {r['src_idle_mib']} → {r['src_peak_mib']} "
                  f"| {r['dst_idle_mib']} → {r['dst_peak_mib']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
