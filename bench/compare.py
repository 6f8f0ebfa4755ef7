#!/usr/bin/env python3
"""Side-by-side benchmark runs on one image, interleaved so machine noise hits
every configuration alike.  Prints a Markdown table (median, min, max of GB/s;
CPU seconds and peak daemon memory per side) and writes the raw runs as JSON.

    .venv/bin/python bench/compare.py --repeat 5
    .venv/bin/python bench/compare.py --state-size 4G --repeat 1 --configs none/aes-256-gcm
    .venv/bin/python bench/compare.py --configs none/none/2/rdma+shm none/aes-256-gcm/2/tcp
    .venv/bin/python bench/compare.py --baseline --repeat 5   # and the raw socket copy
    .venv/bin/python bench/compare.py --baseline --qemu --repeat 3   # and QEMU's migrations

A configuration is ``COMPRESS/CIPHER[/CHANNELS[/TRANSPORT]]`` (defaults 1, tcp).

The default image is ``mkstate.py 1024 42`` from ../shared/tools (generated
into /dev/shm once), so figures compare across runs and tools.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qemu_baseline

from migd.bench import bar_chart

ROOT = pathlib.Path(__file__).resolve().parents[1]
MKSTATE = ROOT.parent / "shared" / "tools" / "mkstate.py"
DEFAULT_CONFIGS = ["none/aes-256-gcm", "zstd:1/aes-256-gcm", "none/chacha20-poly1305"]


def image(size_mib: int, seed: int) -> str:
    path = f"/dev/shm/migd-state-{size_mib}-{seed}.img"
    if not os.path.exists(path):
        if not MKSTATE.exists():
            sys.exit(f"{MKSTATE} not found: pass --state-file or --state-size")
        subprocess.run([sys.executable, str(MKSTATE), str(size_mib), str(seed), path + ".tmp"],
                       check=True, stdout=subprocess.DEVNULL)
        os.replace(path + ".tmp", path)
    return path


def run(source: list[str], config: str, tree: str | None = None) -> dict[str, object]:
    """One ``migd bench`` of ``config``; with ``tree``, of the migd checked out there
    (its daemons too), with this checkout's interpreter and packages."""
    compress, cipher, *rest = config.split("/")
    channels, transport = (rest + ["1", "tcp"][len(rest):])[:2]
    cmd = [str(ROOT / ".venv" / "bin" / "python"), "-m", "migd", "bench", *source,
           "--compress", compress, "--cipher", cipher, "--channels", channels,
           "--transport", transport, "--json"]
    env = None if tree is None else dict(os.environ, PYTHONPATH=tree)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=1800,
                         cwd=tree, env=env)
    result: dict[str, object] = json.loads(out.stdout)
    result.pop("migration", None)
    return result


def socat_copy(path: str) -> dict[str, object]:
    """The raw socket copy migd is measured against: the image from a file through TCP
    on loopback into /dev/null with socat and 1 MiB buffers, no crypto, no device.  CPU
    and peak memory of both processes from wait4."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rx = subprocess.Popen(["socat", "-u", "-b", str(1 << 20),
                           f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr", "OPEN:/dev/null"])
    deadline = time.monotonic() + 10
    while f":{port:04X} " not in pathlib.Path("/proc/net/tcp").read_text():  # listening yet?
        if time.monotonic() > deadline:
            rx.kill()
            sys.exit("socat did not start listening")
        time.sleep(0.01)
    t0 = time.monotonic()
    tx = subprocess.Popen(["socat", "-u", "-b", str(1 << 20), f"OPEN:{path}",
                           f"TCP:127.0.0.1:{port}"])
    usage = {}
    for name, proc in (("source", tx), ("destination", rx)):
        _, status, ru = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            sys.exit(f"socat ({name}) failed: exit {proc.returncode}")
        usage[name] = ru
    seconds = time.monotonic() - t0
    size = os.path.getsize(path)
    return {"gbps": round(size / seconds / 1e9, 3), "bytes": size, "wire_bytes": size,
            "seconds": seconds, "verified": True,
            "cpu_seconds": {k: round(ru.ru_utime + ru.ru_stime, 3) for k, ru in usage.items()},
            "mem_peak_bytes": {k: ru.ru_maxrss * 1024 for k, ru in usage.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                    metavar="COMPRESS/CIPHER[/CHANNELS[/TRANSPORT]]")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--state-file")
    group.add_argument("--state-size")
    ap.add_argument("--json-out", default=str(ROOT / "bench" / "results" / "compare.json"))
    ap.add_argument("--chart", metavar="PNG",
                    help="the chart's path (default: next to --json-out); needs matplotlib "
                         "(pip install 'migd[plot]')")
    ap.add_argument("--baseline", action="store_true",
                    help="also run the raw socket copy (socat, 1 MiB buffers, file -> TCP -> "
                         "/dev/null) in every round, and print each figure as a ratio to it")
    ap.add_argument("--qemu", nargs="*", metavar="MODE", choices=qemu_baseline.MODES,
                    help="also migrate a paused QEMU guest whose RAM holds the image, in "
                         "each MODE (default: all of " + ", ".join(qemu_baseline.MODES) + ")")
    args = ap.parse_args()
    if args.state_size:
        source, what = ["--state-size", args.state_size], f"sim mix, {args.state_size}"
    else:
        path = args.state_file or image(1024, 42)
        source, what = ["--state-file", path], os.path.basename(path)
    if args.baseline and args.state_size:
        sys.exit("--baseline copies a file: give --state-file (or the default image)")
    qemu = [] if args.qemu is None else (args.qemu or list(qemu_baseline.MODES))
    if qemu and not qemu_baseline.available():
        sys.exit("--qemu: qemu-system-x86_64 is not installed (apt install qemu-system-x86)")
    if qemu and args.state_size:
        sys.exit("--qemu maps a file as the guest's RAM: give --state-file (or the default)")
    configs = (["socat"] if args.baseline else []) + [f"qemu:{m}" for m in qemu] + list(
        args.configs)
    runs: dict[str, list[dict[str, object]]] = {c: [] for c in configs}
    for i in range(args.repeat):
        for config in configs:
            if config == "socat":
                r = socat_copy(path)
            elif config.startswith("qemu:"):
                r = qemu_baseline.migrate(path, config.partition(":")[2])
            else:
                r = run(source, config)
            if not r.get("verified"):
                sys.exit(f"{config}: migration not verified: {r}")
            runs[config].append(r)
            print(f"run {i + 1}/{args.repeat} {config}: {r['gbps']} GB/s", file=sys.stderr)
    print(f"\n{what}, {args.repeat} interleaved run(s) each, both ends on this machine\n")
    plain = "qemu:plain" in runs
    print("| compress/cipher[/channels] | GB/s median | min | max | wire/state | CPU s src+dst | "
          "CPU s/GB of state | peak MiB src/dst |" + (" GB/s, CPU/GB vs socat |" if
                                                       args.baseline else "")
          + (" GB/s vs QEMU plain |" if plain else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|" if args.baseline else "")
          + ("---|" if plain else ""))
    base: tuple[float, float] | None = None
    qemu_plain = (statistics.median(float(str(r["gbps"])) for r in runs["qemu:plain"])
                  if plain else None)
    for config, rs in runs.items():
        g = [float(str(r["gbps"])) for r in rs]
        cpu = statistics.median(sum(r["cpu_seconds"].values()) for r in rs)  # type: ignore[attr-defined]
        per_gb = statistics.median(sum(r["cpu_seconds"].values())  # type: ignore[attr-defined]
                                   / (float(str(r["bytes"])) / 1e9) for r in rs)
        ratio = float(str(rs[0]["wire_bytes"])) / float(str(rs[0]["bytes"]))
        src_mem, dst_mem = (max(r["mem_peak_bytes"][side] for r in rs)  # type: ignore[index]
                            for side in ("source", "destination"))
        if config == "socat":
            base = (statistics.median(g), per_gb)
        versus = (f" {statistics.median(g) / base[0]:.2f}x, {per_gb / base[1]:.2f}x |"
                  if base is not None else "")
        versus_qemu = (f" {statistics.median(g) / qemu_plain:.2f}x |"
                       if qemu_plain is not None else "")
        print(f"| {config} | {statistics.median(g):.2f} | {min(g):.2f} | {max(g):.2f} | "
              f"{ratio:.2f} | {cpu:.2f} | {per_gb:.2f} | "
              f"{src_mem / 2**20:.0f}/{dst_mem / 2**20:.0f} |{versus}{versus_qemu}")
    os.makedirs(os.path.dirname(args.json_out), exist_ok=True)
    with open(args.json_out, "w") as f:
        json.dump(runs, f, indent=1)
    path = args.chart or os.path.splitext(args.json_out)[0] + ".png"
    if chart(runs, f"{what}, {args.repeat} interleaved run(s) each", path):
        print(f"\nchart: {path}")
    else:
        print("\nchart: install the plot extra (pip install 'migd[plot]') for a PNG")
    return 0


def chart(runs: dict[str, list[dict[str, object]]], title: str, path: str) -> bool:
    """migd's configurations (blue) next to the baselines (gray)."""
    labels = list(runs)
    gbps = [[float(str(r["gbps"])) for r in runs[c]] for c in labels]
    cpu = [statistics.median(sum(r["cpu_seconds"].values())  # type: ignore[attr-defined]
                             / (float(str(r["bytes"])) / 1e9) for r in runs[c]) for c in labels]
    baselines = frozenset(c for c in labels if c == "socat" or c.startswith("qemu:"))
    return bar_chart(path, f"migd (blue) and its baselines (gray): {title}", labels, gbps, cpu,
                     baselines)


if __name__ == "__main__":
    raise SystemExit(main())
