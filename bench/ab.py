#!/usr/bin/env python3
"""Two versions of migd side by side: each configuration run with one, then the
other, round after round, so the machine's drift hits both alike.

Each version is checked out as a git worktree of this repository and runs its own
daemons (``PYTHONPATH`` points at it; the interpreter and packages are this
checkout's ``.venv``).  Prints a Markdown table of medians, ranges and CPU.

    .venv/bin/python bench/ab.py --before a4782c1 --after HEAD --rounds 3
    .venv/bin/python bench/ab.py --before HEAD~1 --configs none/aes-256-gcm/2/tcp
    .venv/bin/python bench/ab.py --before a4782c1 --everything   # every README figure

``--everything`` runs the README's performance section: its main table, the whole
matrix, ``auto`` under a 250 MB/s cap, a 4 GiB state (memory flat in state size),
hisi and mlx5.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import compare  # noqa: E402  (the same way of running one configuration)

PYTHON = ROOT / ".venv" / "bin" / "python"
CONFIGS = ["none/none/2/rdma+shm", "none/aes-256-gcm/2/rdma+shm", "auto/aes-256-gcm/2/tcp",
           "none/aes-256-gcm/2/tcp", "none/aes-256-gcm/2/rdma+tcp", "auto/none/2/rdma+shm",
           "hisi", "mlx5"]
#: Named configurations that are not COMPRESS/CIPHER/CHANNELS/TRANSPORT on the image.
NAMED = {"hisi": ["--backend", "hisi"],
         "mlx5": ["--backend", "mlx5", "--state-size", "256M", "--dirty-rate", "32M"],
         "auto-capped": ["--state-file", "{image}", "--compress", "auto", "--channels", "2",
                         "--max-bandwidth", "250000000"],
         "4G": ["--state-size", "4G", "--compress", "none"],
         # Whole VMs (the README's table): one VM of 4 mlx5 VFs, then a host evacuation.
         "vm4": ["--backend", "mlx5", "--vfs", "4", "--state-size", "400M", "--dirty-rate", "32M"],
         "vm4-100": ["--backend", "mlx5", "--vfs", "4", "--state-size", "400M", "--dirty-rate",
                     "32M", "--downtime-limit", "100"],
         "2vm4-100": ["--backend", "mlx5", "--vms", "2", "--vfs", "4", "--state-size", "400M",
                      "--dirty-rate", "32M", "--downtime-limit", "100"],
         "4vm2": ["--vms", "4", "--vfs", "2", "--state-size", "256M", "--dirty-rate", "8M"]}


def matrix() -> list[str]:
    """The README's matrix: ``none`` only where the transport allows it."""
    out = []
    for transport in ("tcp", "rdma+tcp", "rdma+shm"):
        for channels in (1, 2):
            for compress in ("none", "zstd:1", "auto"):
                for cipher in ("aes-256-gcm", "none") if transport == "rdma+shm" else (
                        "aes-256-gcm",):
                    out.append(f"{compress}/{cipher}/{channels}/{transport}")
    return out


@contextlib.contextmanager
def worktrees(revs: dict[str, str]) -> Iterator[dict[str, str]]:
    base = tempfile.mkdtemp(prefix="migd-ab-")
    trees: dict[str, str] = {}
    try:
        for name, rev in revs.items():
            path = os.path.join(base, name)
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", path,
                            rev], check=True)
            trees[name] = path
        yield trees
    finally:
        for path in trees.values():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", path],
                           check=False)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], check=False)
        os.rmdir(base)


def bench(tree: str, config: str, state_file: str) -> dict[str, object]:
    if config in NAMED:
        args = [x.format(image=state_file) for x in NAMED[config]]
        out = subprocess.run([str(PYTHON), "-m", "migd", "bench", *args, "--json"],
                             cwd=tree, env=dict(os.environ, PYTHONPATH=tree), check=True,
                             capture_output=True, text=True, timeout=1800)
        result: dict[str, object] = json.loads(out.stdout)
    else:
        result = compare.run(["--state-file", state_file], config, tree)
    if not result.get("verified"):
        sys.exit(f"{config} in {tree}: not verified: {result}")
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="a git revision")
    ap.add_argument("--after", default="HEAD", help="a git revision (default HEAD)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--configs", nargs="+", default=CONFIGS,
                    help="COMPRESS/CIPHER/CHANNELS/TRANSPORT, or " + ", ".join(NAMED))
    ap.add_argument("--everything", action="store_true",
                    help="every figure of the README's performance section")
    ap.add_argument("--json-out", help="write every run here")
    ap.add_argument("--state-file", default="/dev/shm/state.img",
                    help="the image (python3 ../shared/tools/mkstate.py 1024 42 FILE)")
    a = ap.parse_args()
    if a.everything:
        a.configs = list(dict.fromkeys(CONFIGS + matrix() + ["auto-capped", "4G"]))
    runs: dict[tuple[str, str], list[dict[str, object]]] = {}
    with worktrees({"before": a.before, "after": a.after}) as trees:
        for r in range(a.rounds):
            for config in a.configs:
                for name, tree in trees.items():
                    res = bench(tree, config, a.state_file)
                    runs.setdefault((config, name), []).append(res)
                    print(f"round {r + 1} {config} {name}: {res['gbps']} GB/s", file=sys.stderr,
                          flush=True)
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump([{"config": c, "version": v, "runs": rs} for (c, v), rs in runs.items()],
                      f, indent=1)
    print(f"\n{a.before} -> {a.after}, {a.rounds} interleaved rounds\n")
    print("| configuration | GB/s median before -> after | range before | range after "
          "| CPU s src+dst before -> after | peak MiB src/dst after | downtime ms before -> after "
          "| wire/state after |")
    print("|---|---|---|---|---|---|---|---|")
    for config in a.configs:
        b, f = runs[(config, "before")], runs[(config, "after")]

        def gbps(rs: list[dict[str, object]]) -> list[float]:
            return [float(x["gbps"]) for x in rs]  # type: ignore[arg-type]

        def peak(rs: list[dict[str, object]]) -> str:
            mem = [x.get("mem_peak_bytes") or {} for x in rs]
            return "/".join(str(max(int(m.get(side, 0)) for m in mem) >> 20)  # type: ignore[union-attr]
                            for side in ("source", "destination"))

        def downtime(rs: list[dict[str, object]]) -> float:
            # A VM bench reports its worst VM's downtime.
            return statistics.median(float(x.get("downtime_ms", x.get("worst_downtime_ms", 0)))  # type: ignore[arg-type]
                                     for x in rs)

        def wire(rs: list[dict[str, object]]) -> float:
            return statistics.median(float(x["wire_bytes"]) / max(1.0, float(x["bytes"]))  # type: ignore[arg-type]
                                     for x in rs)

        def cpu(rs: list[dict[str, object]]) -> float:
            return statistics.median(sum(x["cpu_seconds"].values())  # type: ignore[attr-defined]
                                     for x in rs)

        print(f"| {config} | {statistics.median(gbps(b)):.2f} -> "
              f"{statistics.median(gbps(f)):.2f} | {min(gbps(b)):.2f} to {max(gbps(b)):.2f} "
              f"| {min(gbps(f)):.2f} to {max(gbps(f)):.2f} | {cpu(b):.2f} -> {cpu(f):.2f} "
              f"| {peak(f)} | {downtime(b):g} -> {downtime(f):g} | {wire(f):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
