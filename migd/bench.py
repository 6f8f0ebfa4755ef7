"""``migd bench`` and ``migd demo``: real daemons, real sockets, one migration, measured.

The bench reports each daemon's CPU seconds and its peak *anonymous* memory
(the daemon's own heap and buffers; the simulated device's memory is a file
mapping and is not the daemon's).  ``verified`` compares SHA-256 digests of the
source device's final state and the destination device's loaded state, taken
after the migration, outside the timed window.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from transports import REGISTRY as TRANSPORTS

from .codec import parse_compress
from .crypto import ciphers_for
from .errors import ConfigError
from .harness import DaemonProc, Pair, local_pair
from .report import migrate_args, progress_line, summary
from .topology import Link, describe_rate, parse_rate, two_hosts
from .units import human_bytes, parse_size

BENCH_BACKENDS = ("sim", "mlx5", "hisi")


def _device_specs(args: argparse.Namespace, name: str = "vf0", index: int = 0
                  ) -> tuple[str, str, int]:
    """Source and destination device specs for one VF of the chosen kind (``index``:
    which VF of the PF it is, where the kind numbers them)."""
    kind = args.backend
    if kind not in BENCH_BACKENDS:
        raise ConfigError(f"bench: backend {kind!r} needs real hardware; "
                          f"bench runs {', '.join(BENCH_BACKENDS)}")
    if kind == "hisi":  # 176 bytes of registers: size options do not apply
        if args.state_file or args.state_size:
            raise ConfigError("bench: a hisi VF's state is its 176-byte register page; "
                              "drop --state-size/--state-file")
        return f"{name}:hisi", f"{name}:hisi:seed=2", 176
    extra = f",dirty-rate={parse_size(args.dirty_rate, '--dirty-rate')}"
    ident = f",vhca-id={index + 1}" if kind == "mlx5" else ""
    if args.state_file:
        try:
            size = os.path.getsize(args.state_file)
        except OSError as exc:
            raise ConfigError(f"--state-file {args.state_file}: {exc.strerror}") from None
        src = f"{name}:{kind}:state-file={os.path.abspath(args.state_file)}{extra}{ident}"
    else:
        size = parse_size(args.state_size or "256M", "--state-size")
        src = f"{name}:{kind}:size={size}{extra}{ident}"
    return src, f"{name}:{kind}:size={size},content=zero{ident}", size


class PeakMemory:
    """Peak anonymous resident memory of processes, sampled from outside every 20 ms
    (``/proc/PID/statm``: resident less shared, so device memory - a file mapping -
    is not counted): the daemons' own memory while the benchmark runs."""

    _PAGE = os.sysconf("SC_PAGE_SIZE")

    def __init__(self, pids: dict[str, int], period: float = 0.02) -> None:
        self.peak = dict.fromkeys(pids, 0)
        self._fds = {name: os.open(f"/proc/{pid}/statm", os.O_RDONLY | os.O_CLOEXEC)
                     for name, pid in pids.items()}
        self._stop = threading.Event()
        self._period = period
        self._sample()
        self._thread = threading.Thread(target=self._run, name="bench-mem", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        for name, fd in self._fds.items():
            with contextlib.suppress(OSError):  # the process ended
                fields = os.pread(fd, 256, 0).split()
                anon = (int(fields[1]) - int(fields[2])) * self._PAGE
                self.peak[name] = max(self.peak[name], anon)

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            self._sample()

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        self._sample()
        for fd in self._fds.values():
            os.close(fd)
        return self.peak


def migrate_and_measure(src: DaemonProc, dst: DaemonProc, req: dict[str, Any],
                        show: bool, transport: str = "tcp") -> dict[str, Any]:
    """One migration src -> dst, with each daemon's CPU and peak memory around it."""
    memory = PeakMemory({d.name: d.proc.pid for d in (src, dst)})
    before = {d.name: d.call("query-stats")["cpu_seconds"] for d in (src, dst)}
    tty = sys.stderr.isatty()

    def progress(d: dict[str, Any]) -> None:
        if show:
            line = progress_line(d)
            print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr,
                  flush=True)

    with src.client(timeout=3600) as c:
        final = c.migrate_follow(dict(req, peer=dst.address_of(transport), interval=0.05),
                                 progress)
    if show and tty:
        print(file=sys.stderr)
    stats = {d.name: d.call("query-stats") for d in (src, dst)}
    peak = memory.stop()
    digests = {d.name: d.call("device-digest", device="vf0")["sha256"] for d in (src, dst)}
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
        "verified": final.get("status") == "completed" and digests[src.name] == digests[dst.name],
        "cpu_seconds": {"source": round(stats[src.name]["cpu_seconds"] - before[src.name], 3),
                        "destination": round(stats[dst.name]["cpu_seconds"] - before[dst.name],
                                             3)},
        "mem_peak_bytes": {"source": peak[src.name], "destination": peak[dst.name]},
        "cipher": final.get("cipher"),
        "compress": final.get("compress"),
        "migration": final,
    }


@contextlib.contextmanager
def bench_pair(args: argparse.Namespace, src: Sequence[str], dst: Sequence[str],
               transports: Sequence[str], prefix: str, extra: Sequence[str] = ()
               ) -> Iterator[Pair]:
    """Two daemons for a benchmark: on loopback, or with ``--link`` on two hosts
    (namespaces) behind a link of that rate."""
    link_rate = getattr(args, "link", None)
    with contextlib.ExitStack() as stack:
        link: Link | None = None
        if link_rate is not None:
            rate = parse_rate(link_rate)
            local = [t for t in transports if not TRANSPORTS.create(t).leaves_host]
            if local:
                raise ConfigError(f"--link: {', '.join(local)} stays on one host and never "
                                  "crosses a link; use tcp or rdma+tcp")
            link = stack.enter_context(two_hosts(rate))
        wd = stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix))
        yield stack.enter_context(local_pair(src, dst, workdir=wd, link=link,
                                             src_extra=extra, dst_extra=extra))


def run_bench(args: argparse.Namespace) -> int:
    if args.matrix:
        return run_matrix(args)
    if args.vfs < 1 or args.vms < 1:
        raise ConfigError("bench: --vfs and --vms must be at least 1")
    if args.vfs > 1 or args.vms > 1:
        from .bench_vms import run_vms
        return run_vms(args)
    src, dst, size = _device_specs(args)
    req = migrate_args(args, "vf0", "")
    TRANSPORTS.check([args.transport])
    with bench_pair(args, [src], [dst], [args.transport], "migd-bench-") as pair:
        result = migrate_and_measure(pair.src, pair.dst, req, show=not args.json,
                                     transport=args.transport)
    result.update(backend=args.backend, transport=args.transport, state_size=size,
                  channels=args.channels, chunk_size=req["chunk-size"],
                  link=None if args.link is None else describe_rate(parse_rate(args.link)))
    return finish(result, args.json, _print_result)


def finish(result: dict[str, Any], as_json: bool, show: Callable[[dict[str, Any]], None]
           ) -> int:
    """Print a bench's result (JSON, or ``show`` for people); the exit status says
    whether the destination's state was verified."""
    if as_json:
        print(json.dumps(result))
    else:
        show(result)
    return 0 if result["verified"] else 1


def _print_result(r: dict[str, Any]) -> None:
    print(summary(r["migration"]))
    print(f"  throughput {r['gbps']:.3f} GB/s of state over {r['seconds']:.3f} s; "
          f"verified: {'yes' if r['verified'] else 'NO'}")
    print(resources_line(r))


def resources_line(r: dict[str, Any]) -> str:
    """Each daemon's CPU seconds and peak memory, as every benchmark prints them."""
    cpu, mem = r["cpu_seconds"], r["mem_peak_bytes"]
    return (f"  cpu: source {cpu['source']:.2f} s, destination {cpu['destination']:.2f} s; "
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
              "(Ed25519-authenticated, AES-256-GCM, compression: auto)", file=sys.stderr)
        req = {"device": "vf0", "compress": "auto", "cipher": "aes-256-gcm"}
        r = migrate_and_measure(pair.src, pair.dst, req, show=True)
        devices = {d.name: d.call("query-devices")[0] for d in (pair.src, pair.dst)}
    _print_result(r)
    print(f"  source VF now {devices['src']['state']}, destination VF now "
          f"{devices['dst']['state']}")
    return 0 if r["verified"] else 1


# --- the benchmark matrix ---------------------------------------------------------------


def _axis(text: str, what: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise ConfigError(f"--matrix-{what}: give a comma-separated list")
    return values


def run_matrix(args: argparse.Namespace) -> int:
    """A grid of migrations between one pair of daemons, ping-ponging the VF."""
    import itertools

    transports = TRANSPORTS.check(_axis(args.matrix_transports, "transports"))
    grid = list(itertools.product(
        transports, [int(c) for c in _axis(args.matrix_channels, "channels")],
        _axis(args.matrix_compress, "compress"), _axis(args.matrix_ciphers, "ciphers"),
        [parse_size(c, "--matrix-chunk-sizes") for c in _axis(args.matrix_chunk_sizes,
                                                                 "chunk-sizes")]))
    # Clear text only where the transport accepts it (rdma+shm): other points are skipped.
    grid = [g for g in grid
            if g[3] in ciphers_for(TRANSPORTS.create(g[0]).leaves_host)[1]]
    if not grid:
        raise ConfigError("--matrix: no transport accepts any of the given ciphers")
    for compress in {g[2] for g in grid}:
        parse_compress(compress)
    if args.backend != "sim":
        raise ConfigError("--matrix runs the sim backend")
    if args.state_file:
        spec = f"vf0:sim:state-file={os.path.abspath(args.state_file)},state-copy=yes"
        size = os.path.getsize(args.state_file)
    else:
        size = parse_size(args.state_size or "256M", "--state-size")
        spec = f"vf0:sim:size={size}"
    rows: list[dict[str, Any]] = []
    total = len(grid) * args.repeat
    with bench_pair(args, [spec], [f"vf0:sim:size={size},content=zero"], transports,
                    "migd-matrix-") as pair:
        ends = [pair.src, pair.dst]
        for n, (point, rep) in enumerate(itertools.product(grid, range(args.repeat))):
            transport, channels, compress, cipher, chunk = point
            _progress_bar(n, total, f"{transport} ch={channels} {compress} {cipher} "
                                    f"chunk={human_bytes(chunk)}")
            req = {"device": "vf0", "compress": compress, "cipher": cipher, "channels": channels,
                   "chunk-size": chunk, "max-bandwidth": parse_size(args.max_bandwidth,
                                                                    "--max-bandwidth")}
            r = migrate_and_measure(ends[0], ends[1], req, show=False, transport=transport)
            if r["status"] != "completed" or not r["verified"]:
                raise ConfigError(f"matrix point {point} failed: {r['error']}")
            ends.reverse()  # the VF now lives on the other daemon: send it back next time
            gb = r["bytes"] / 1e9
            rows.append({"transport": transport, "channels": channels, "compress": compress,
                         "cipher": cipher, "chunk_size": chunk, "repeat": rep, "gbps": r["gbps"],
                         "cpu_s_per_gb": {k: round(v / gb, 3) for k, v in r["cpu_seconds"].items()},
                         "wire_ratio": round(r["wire_bytes"] / r["bytes"], 3),
                         "downtime_ms": r["downtime_ms"], "mem_peak_bytes": r["mem_peak_bytes"]})
        _progress_bar(total, total, "done")
    print(file=sys.stderr)
    _matrix_table(rows, size)
    os.makedirs(os.path.dirname(os.path.abspath(args.matrix_out)) or ".", exist_ok=True)
    with open(args.matrix_out, "w") as f:
        json.dump({"state_size": size, "runs": rows}, f, indent=1)
    print(f"\nraw runs: {args.matrix_out}")
    chart = os.path.splitext(args.matrix_out)[0] + ".png"
    if _matrix_chart(rows, chart):
        print(f"chart: {chart}")
    else:
        print("chart: install the plot extra (pip install 'migd[plot]') for a PNG")
    return 0


def _progress_bar(done: int, total: int, label: str) -> None:
    width = 30
    filled = width * done // max(1, total)
    end = "\n" if not sys.stderr.isatty() else ""
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label:<50}", end=end,
          file=sys.stderr, flush=True)


def _group(rows: list[dict[str, Any]]) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        key = (r["transport"], r["channels"], r["compress"], r["cipher"], r["chunk_size"])
        groups.setdefault(key, []).append(r)
    return groups


def _matrix_table(rows: list[dict[str, Any]], size: int) -> None:
    import statistics

    print(f"state {human_bytes(size)}, both daemons on this machine, median of repeats\n")
    print("| transport | channels | compress | cipher | chunk | GB/s | CPU s/GB src | "
          "CPU s/GB dst | wire/state | downtime ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (t, ch, comp, ciph, chunk), rs in _group(rows).items():
        med = statistics.median
        print(f"| {t} | {ch} | {comp} | {ciph} | {human_bytes(chunk)} | "
              f"{med(r['gbps'] for r in rs):.2f} | "
              f"{med(r['cpu_s_per_gb']['source'] for r in rs):.2f} | "
              f"{med(r['cpu_s_per_gb']['destination'] for r in rs):.2f} | "
              f"{med(r['wire_ratio'] for r in rs):.2f} | "
              f"{med(r['downtime_ms'] or 0 for r in rs):.0f} |")


def _matrix_chart(rows: list[dict[str, Any]], path: str) -> bool:
    import statistics

    groups = _group(rows)
    labels = [f"{t}/{ch}ch/{comp}/{ciph.split('-')[0]}/{human_bytes(chunk)}"
              for (t, ch, comp, ciph, chunk) in groups]
    gbps = [[r["gbps"] for r in rs] for rs in groups.values()]
    cpu = [statistics.median(sum(r["cpu_s_per_gb"].values()) for r in rs)
           for rs in groups.values()]
    return bar_chart(path, "migd bench --matrix", labels, gbps, cpu)


def bar_chart(path: str, title: str, labels: list[str], gbps: list[list[float]],
              cpu_per_gb: list[float], gray: frozenset[str] = frozenset()) -> bool:
    """GB/s of state above (median of each label's runs, bars from min to max), CPU
    seconds per GB of both ends below; ``gray`` labels are baselines.  False without
    matplotlib (the plot extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    import statistics

    med = [statistics.median(g) for g in gbps]
    spread = [[m - min(g) for m, g in zip(med, gbps, strict=True)],
              [max(g) - m for m, g in zip(med, gbps, strict=True)]]
    colors = ["tab:gray" if label in gray else "tab:blue" for label in labels]
    fig, (a, b) = plt.subplots(2, 1, figsize=(max(8, len(labels) * 1.1), 7), sharex=True)
    a.bar(labels, med, yerr=spread, color=colors, capsize=3)
    a.set_ylabel("GB/s of state")
    a.set_title(title, fontsize=9)
    b.bar(labels, cpu_per_gb, color=colors)
    b.set_ylabel("CPU s per GB (both ends)")
    b.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
