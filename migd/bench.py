"""``migd bench`` and ``migd demo``: real daemons, real sockets, one migration, measured.

The bench reports each daemon's CPU seconds and its peak *anonymous* memory
(the daemon's own heap and buffers; the simulated device's memory is a file
mapping and is not the daemon's).  ``verified`` compares SHA-256 digests of the
source device's final state and the destination device's loaded state, taken
after the migration, outside the timed window.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any

from .cli import migrate_args, progress_line, summary
from .errors import ConfigError
from .harness import Pair, local_pair
from .units import human_bytes, parse_size

BENCH_BACKENDS = ("sim", "mlx5", "hisi")


def _device_specs(args: argparse.Namespace) -> tuple[str, str, int]:
    """Source and destination device specs for one VF of the chosen kind."""
    kind = args.backend
    if kind not in BENCH_BACKENDS:
        raise ConfigError(f"bench: backend {kind!r} needs real hardware; "
                          f"bench runs {', '.join(BENCH_BACKENDS)}")
    if kind == "hisi":  # 176 bytes of registers: size options do not apply
        if args.state_file or args.state_size:
            raise ConfigError("bench: a hisi VF's state is its 176-byte register page; "
                              "drop --state-size/--state-file")
        return "vf0:hisi", "vf0:hisi:seed=2", 176
    extra = f",dirty-rate={parse_size(args.dirty_rate, '--dirty-rate')}"
    if args.state_file:
        try:
            size = os.path.getsize(args.state_file)
        except OSError as exc:
            raise ConfigError(f"--state-file {args.state_file}: {exc.strerror}") from None
        src = f"vf0:{kind}:state-file={os.path.abspath(args.state_file)}{extra}"
    else:
        size = parse_size(args.state_size or "256M", "--state-size")
        src = f"vf0:{kind}:size={size}{extra}"
    return src, f"vf0:{kind}:size={size},content=zero", size


def migrate_and_measure(pair: Pair, req: dict[str, Any], show: bool) -> dict[str, Any]:
    for d in (pair.src, pair.dst):
        d.call("query-stats", **{"reset-peak": True})
    before = {d.name: d.call("query-stats")["cpu_seconds"] for d in (pair.src, pair.dst)}
    tty = sys.stderr.isatty()

    def progress(d: dict[str, Any]) -> None:
        if show:
            line = progress_line(d)
            print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr,
                  flush=True)

    with pair.src.client(timeout=3600) as c:
        final = c.migrate_follow(dict(req, peer=pair.dst.address), progress)
    if show and tty:
        print(file=sys.stderr)
    stats = {d.name: d.call("query-stats") for d in (pair.src, pair.dst)}
    digests = {d.name: d.call("device-digest", device="vf0")["sha256"] for d in (pair.src, pair.dst)}
    seconds = final.get("total-time", 0) / 1000
    moved = int(final.get("transferred", 0))
    return {
        "status": final.get("status"),
        "error": final.get("error-desc"),
        "bytes": moved,
        "wire_bytes": int(final.get("wire-bytes", 0)),
        "seconds": seconds,
        "gbps": round(moved / seconds / 1e9, 3) if seconds else 0.0,
        "downtime_ms": final.get("downtime"),
        "setup_ms": final.get("setup-time"),
        "precopy_iterations": final.get("dirty-sync-count"),
        "verified": final.get("status") == "completed" and digests["src"] == digests["dst"],
        "cpu_seconds": {"source": round(stats["src"]["cpu_seconds"] - before["src"], 3),
                        "destination": round(stats["dst"]["cpu_seconds"] - before["dst"], 3)},
        "mem_peak_bytes": {"source": stats["src"]["mem_peak_bytes"],
                           "destination": stats["dst"]["mem_peak_bytes"]},
        "cipher": final.get("cipher"),
        "compress": final.get("compress"),
        "migration": final,
    }


def run_bench(args: argparse.Namespace) -> int:
    src, dst, size = _device_specs(args)
    req = migrate_args(args, "vf0", "")
    with tempfile.TemporaryDirectory(prefix="migd-bench-") as wd, \
            local_pair([src], [dst], workdir=wd) as pair:
        result = migrate_and_measure(pair, req, show=not args.json)
    result.update(backend=args.backend, state_size=size, channels=args.channels,
                  chunk_size=req["chunk-size"])
    if args.json:
        print(json.dumps(result))
    else:
        _print_result(result)
    return 0 if result["verified"] else 1


def _print_result(r: dict[str, Any]) -> None:
    print(summary(r["migration"]))
    print(f"  throughput {r['gbps']:.3f} GB/s of state over {r['seconds']:.3f} s; "
          f"verified: {'yes' if r['verified'] else 'NO'}")
    cpu, mem = r["cpu_seconds"], r["mem_peak_bytes"]
    print(f"  cpu: source {cpu['source']:.2f} s, destination {cpu['destination']:.2f} s; "
          f"peak daemon memory: source {human_bytes(mem['source'])}, "
          f"destination {human_bytes(mem['destination'])}")


def run_demo(args: argparse.Namespace) -> int:
    size = parse_size(args.state_size, "--state-size")
    rate = parse_size(args.dirty_rate, "--dirty-rate")
    print(f"Starting two migd daemons on loopback; source VF 'vf0' holds {human_bytes(size)} of "
          f"simulated device state, its guest dirtying {human_bytes(rate)}/s.", file=sys.stderr)
    with local_pair([f"vf0:sim:size={size},dirty-rate={rate}"],
                    [f"vf0:sim:size={size},content=zero"]) as pair:
        print(f"source {pair.src.address}  ->  destination {pair.dst.address} "
              "(Ed25519-authenticated, zstd:1 + AES-256-GCM)", file=sys.stderr)
        req = {"device": "vf0", "compress": "zstd:1", "cipher": "aes-256-gcm"}
        r = migrate_and_measure(pair, req, show=True)
        devices = {d.name: d.call("query-devices")[0] for d in (pair.src, pair.dst)}
    _print_result(r)
    print(f"  source VF now {devices['src']['state']}, destination VF now "
          f"{devices['dst']['state']}")
    return 0 if r["verified"] else 1
