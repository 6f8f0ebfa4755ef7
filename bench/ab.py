#!/usr/bin/env python3
"""Two versions of migd side by side: each configuration run with one, then the
other, round after round, so the machine's drift hits both alike.

Each version is checked out as a git worktree of this repository and runs its own
daemons (``PYTHONPATH`` points at it; the interpreter and packages are this
checkout's ``.venv``).  Prints a Markdown table of medians, ranges and CPU.

    .venv/bin/python bench/ab.py --before a4782c1 --after HEAD --rounds 3
    .venv/bin/python bench/ab.py --before HEAD~1 --configs none/aes-256-gcm/2/tcp
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
BACKENDS = {"hisi": ["--backend", "hisi"],
            "mlx5": ["--backend", "mlx5", "--state-size", "256M", "--dirty-rate", "32M"]}


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
    if config in BACKENDS:
        out = subprocess.run([str(PYTHON), "-m", "migd", "bench", *BACKENDS[config], "--json"],
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
                    help="COMPRESS/CIPHER/CHANNELS/TRANSPORT, or hisi, mlx5")
    ap.add_argument("--state-file", default="/dev/shm/state.img",
                    help="the image (python3 ../shared/tools/mkstate.py 1024 42 FILE)")
    a = ap.parse_args()
    runs: dict[tuple[str, str], list[dict[str, object]]] = {}
    with worktrees({"before": a.before, "after": a.after}) as trees:
        for r in range(a.rounds):
            for config in a.configs:
                for name, tree in trees.items():
                    res = bench(tree, config, a.state_file)
                    runs.setdefault((config, name), []).append(res)
                    print(f"round {r + 1} {config} {name}: {res['gbps']} GB/s", file=sys.stderr,
                          flush=True)
    print(f"\n{a.before} -> {a.after}, {a.rounds} interleaved rounds\n")
    print("| configuration | GB/s median before -> after | range before | range after "
          "| CPU s src+dst before -> after |")
    print("|---|---|---|---|---|")
    for config in a.configs:
        b, f = runs[(config, "before")], runs[(config, "after")]

        def gbps(rs: list[dict[str, object]]) -> list[float]:
            return [float(x["gbps"]) for x in rs]  # type: ignore[arg-type]

        def cpu(rs: list[dict[str, object]]) -> float:
            return statistics.median(sum(x["cpu_seconds"].values())  # type: ignore[attr-defined]
                                     for x in rs)

        print(f"| {config} | {statistics.median(gbps(b)):.2f} -> "
              f"{statistics.median(gbps(f)):.2f} | {min(gbps(b)):.2f} to {max(gbps(b)):.2f} "
              f"| {min(gbps(f)):.2f} to {max(gbps(f)):.2f} | {cpu(b):.2f} -> {cpu(f):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
