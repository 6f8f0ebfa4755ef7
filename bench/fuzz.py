#!/usr/bin/env python3
"""Long fuzz runs of every outsider-reachable decoder, with atheris (libFuzzer).

    .venv/bin/pip install -e '.[fuzz]'
    .venv/bin/python bench/fuzz.py --runs 1000000            # every target
    .venv/bin/python bench/fuzz.py --runs 200000 rdma_wire   # one

The targets are ``tests/fuzz/targets.py`` (the test suite runs a Hypothesis slice
of the same).  Each runs in its own process (libFuzzer runs once per process),
with coverage feedback from migd's own modules, starting from a corpus seeded
with the suite's structured inputs.  What was run is recorded: the corpus that
grew (``fuzz-corpus/TARGET/``, the inputs that reached new code), any crashing
input (``fuzz-corpus/crashes/``), and one line per target run in
``fuzz-corpus/runs.jsonl`` (target, inputs run, seconds, corpus size, outcome).
A crash is any exception the target does not document: the exit status is 1.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _one(name: str, libfuzzer_args: list[str]) -> None:
    """In the child: instrument migd, then hand ``name`` to libFuzzer."""
    import atheris

    with atheris.instrument_imports(include=["migd", "transports", "backends"]):
        from tests.fuzz import targets

    def test_one_input(data: bytes) -> None:
        targets.run(name, data)

    atheris.Setup([sys.argv[0], *libfuzzer_args], test_one_input)
    atheris.Fuzz()


def _seed(name: str, corpus: str, count: int) -> None:
    """Structured inputs from the suite's strategies, so the run starts past the
    first checks rather than rediscovering the frame header."""
    from hypothesis.errors import NonInteractiveExampleWarning

    from tests.fuzz.test_targets import STRUCTURED

    os.makedirs(corpus, exist_ok=True)
    if len(os.listdir(corpus)) >= count:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonInteractiveExampleWarning)
        for _ in range(count):
            data = STRUCTURED[name].example()
            path = os.path.join(corpus, "seed-" + hashlib.sha1(data).hexdigest())
            with open(path, "wb") as f:
                f.write(data)


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--one":
        _one(sys.argv[2], sys.argv[3:])
        return 0
    from tests.fuzz.targets import TARGETS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("targets", nargs="*", help=f"default: all ({', '.join(TARGETS)})")
    ap.add_argument("--runs", type=int, default=1_000_000, help="inputs per target")
    ap.add_argument("--corpus", default=os.path.join(ROOT, "fuzz-corpus"))
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--seeds", type=int, default=200, help="structured seed inputs per target")
    args = ap.parse_args()
    names = args.targets or list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        ap.error(f"unknown target(s) {', '.join(unknown)}; targets: {', '.join(TARGETS)}")
    crashes = os.path.join(args.corpus, "crashes")
    os.makedirs(crashes, exist_ok=True)
    failed = 0
    for name in names:
        corpus = os.path.join(args.corpus, name)
        _seed(name, corpus, args.seeds)
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, __file__, "--one", name, f"-runs={args.runs}",
             f"-max_len={args.max_len}", f"-artifact_prefix={crashes}/{name}-",
             "-print_final_stats=1", corpus],
            capture_output=True, text=True)
        seconds = time.monotonic() - t0
        out = proc.stdout + proc.stderr
        done = re.search(r"Done (\d+) runs", out)
        runs = int(done.group(1)) if done else 0
        outcome = "ok" if proc.returncode == 0 else "CRASH"
        failed += proc.returncode != 0
        record = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                  "target": name, "runs": runs, "seconds": round(seconds, 1),
                  "corpus": len(os.listdir(corpus)), "outcome": outcome}
        with open(os.path.join(args.corpus, "runs.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"{name:22} {runs:>9} inputs {seconds:8.1f}s  corpus {record['corpus']:>5}  "
              f"{outcome}", flush=True)
        if proc.returncode != 0:
            print(out[-3000:], file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
