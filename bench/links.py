#!/usr/bin/env python3
"""``auto`` against ``none`` and ``zstd:1`` on links of several rates, interleaved.

Each link is two network namespaces joined by a veth pair shaped with ``tbf``
(``migd bench --link RATE``; root only), and ``unlimited`` is plain loopback, both
daemons in one namespace.  Every round runs each (rate, image, mode) once, in
order, so the machine's drift hits all alike; the table gives medians and
``auto`` as a share of the better of ``none`` and ``zstd:1`` in the same rounds.

    .venv/bin/python bench/links.py --rounds 3    # from a worktree: that tree's migd
    .venv/bin/python bench/links.py --rates 2gbit unlimited --images standard --rounds 1

Images: ``standard`` is ``mkstate.py 1024 42`` (a third zero pages, a fifth
random); ``random`` is 1 GiB of random bytes (nothing to compress).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import compare  # noqa: E402

#: This interpreter, on the migd of the checkout this script is in (so that a snapshot
#: of the tree, e.g. a git worktree, can run while the working tree changes).
PYTHON = sys.executable
MODES = ("none", "zstd:1", "auto")


def random_image(size_mib: int = 1024) -> str:
    path = f"/dev/shm/migd-random-{size_mib}.img"
    if not os.path.exists(path):
        with open(path + ".tmp", "wb") as f:
            for _ in range(size_mib):
                f.write(os.urandom(1 << 20))
        os.replace(path + ".tmp", path)
    return path


def run(rate: str, image: str, mode: str, channels: int) -> dict[str, object]:
    cmd = [str(PYTHON), "-m", "migd", "bench", "--state-file", image, "--compress", mode,
           "--channels", str(channels), "--json"]
    if rate != "unlimited":
        cmd += ["--link", rate]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=1800,
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    result: dict[str, object] = json.loads(out.stdout)
    if not result.get("verified"):
        sys.exit(f"{rate} {image} {mode}: not verified: {result.get('error')}")
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", nargs="+",
                    default=["1gbit", "2gbit", "5gbit", "10gbit", "unlimited"])
    ap.add_argument("--images", nargs="+", default=["standard", "random"],
                    choices=["standard", "random"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--channels", type=int, default=2)
    ap.add_argument("--json-out", default=str(ROOT / "bench" / "results" / "links.json"))
    a = ap.parse_args()
    if os.geteuid() != 0 and any(r != "unlimited" for r in a.rates):
        sys.exit("shaped links need root (network namespaces); try --rates unlimited")
    images = {"standard": compare.image(1024, 42), "random": random_image()}
    runs: dict[tuple[str, str, str], list[dict[str, object]]] = {}
    for r in range(a.rounds):
        for rate in a.rates:
            for name in a.images:
                for mode in MODES:
                    res = run(rate, images[name], mode, a.channels)
                    res.pop("migration", None)
                    runs.setdefault((rate, name, mode), []).append(res)
                    print(f"round {r + 1} {rate} {name} {mode}: {res['gbps']} GB/s",
                          file=sys.stderr, flush=True)
    os.makedirs(os.path.dirname(a.json_out), exist_ok=True)
    with open(a.json_out, "w") as f:
        json.dump([{"rate": k[0], "image": k[1], "compress": k[2], "runs": v}
                   for k, v in runs.items()], f, indent=1)
    print(f"\n{a.rounds} interleaved rounds, {a.channels} channels, AES-256-GCM, "
          "GB/s of state (median)\n")
    print("| link | image | none | zstd:1 | auto | auto / better | auto's worst round / "
          "that round's better | wire/state auto |")
    print("|---|---|---|---|---|---|---|---|")
    for rate in a.rates:
        for name in a.images:
            g = {m: [float(x["gbps"]) for x in runs[(rate, name, m)]] for m in MODES}  # type: ignore[arg-type]
            med = {m: statistics.median(v) for m, v in g.items()}
            best = max(med["none"], med["zstd:1"])
            worst = min(au / max(no, zs) for au, no, zs in zip(g["auto"], g["none"],
                                                                 g["zstd:1"], strict=True))
            wire = statistics.median(float(x["wire_bytes"]) / float(x["bytes"])  # type: ignore[arg-type]
                                     for x in runs[(rate, name, "auto")])
            print(f"| {rate} | {name} | {med['none']:.2f} | {med['zstd:1']:.2f} | "
                  f"{med['auto']:.2f} | {med['auto'] / best:.2f} | {worst:.2f} | {wire:.2f} |")
    print(f"\nraw runs: {a.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
