"""The ``migd`` command line."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import transports

from . import __version__, journald
from .codec import COMPRESSIONS, DEFAULT_COMPRESSION
from .config import DEFAULT_PATH
from .crypto import CIPHERS
from .errors import ConfigError, MigdError
from .report import migrate_args, migrations_table, progress_line, summary, table
from .units import human_bytes

DEFAULT_CONTROL = os.path.join(os.environ.get("RUNTIME_DIRECTORY", "/run/migd"), "migd.sock")


def _add_migrate_knobs(p: argparse.ArgumentParser, explicit: bool = False) -> None:
    """The knobs of a migration.  ``migd migrate`` sends only those given, so that the
    daemon's ``[defaults]`` apply to the rest; a benchmark states every one."""
    def d(value: Any) -> Any:
        return value if explicit else None

    p.add_argument("--compress", default=d(DEFAULT_COMPRESSION),
                   help=f"{' | '.join(COMPRESSIONS)}, zstd and auto take :LEVEL "
                        f"(default: the daemon's, {DEFAULT_COMPRESSION} unless configured)")
    p.add_argument("--max-bandwidth", default=d("0"), metavar="BYTES_PER_SEC",
                   help="cap on wire bytes per second, like QEMU's max-bandwidth (0: none)")
    p.add_argument("--cipher", choices=sorted(CIPHERS),
                   help="default: the transport's (aes-256-gcm; none, still authenticated, "
                        "over rdma+shm)")
    p.add_argument("--chunk-size", default=d("1M"), help="chunk size (default 1M)")
    p.add_argument("--no-precopy", action="store_true", help="stop the device at once")
    p.add_argument("--downtime-limit", type=_int("--downtime-limit"), default=d(300),
                   metavar="MS", help="switch over once the rest fits this many ms (default 300)")
    p.add_argument("--max-iterations", type=_int("--max-iterations"), default=d(30))
    p.add_argument("--channels", type=_int("--channels"), default=d(2), metavar="N",
                   help="parallel connections, like QEMU's multifd-channels (default 2)")


def _int(flag: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}: {text!r} is not a whole number") from None
    return parse


def _seconds_flag(flag: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}: {text!r} is not a number") from None
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"{flag}: must be a positive number of seconds")
        return value
    return parse


def _add_serve(sub: Any) -> None:
    """``migd serve``: what a daemon runs with (each flag overrides the file)."""
    s = sub.add_parser("serve", help="run the daemon")
    s.add_argument("--config", help=f"TOML configuration (default {DEFAULT_PATH} if it exists); "
                                    "the flags below override it")
    s.add_argument("--listen", action="append", metavar="ADDRESS",
                   help="where migrations come in, repeatable: HOST:PORT (default "
                        "127.0.0.1:7707), rdma://HOST:PORT, rdma+shm:///PATH")
    s.add_argument("--control", help=f"control socket path (default {DEFAULT_CONTROL})")
    s.add_argument("--identity", help="identity key (default /etc/migd/identity.key)")
    s.add_argument("--authorized-keys", help="default /etc/migd/authorized_keys")
    s.add_argument("--device", action="append", default=[], metavar="NAME:KIND[:k=v,...]",
                   help="a device this host offers, e.g. vf0:sim:size=64M,dirty-rate=4M "
                        "(replaces the file's devices)")
    s.add_argument("--transport", help="transport of addresses that name none (default tcp)")
    s.add_argument("--idle-timeout", type=_seconds_flag("--idle-timeout"))
    s.add_argument("--resume-timeout", type=_seconds_flag("--resume-timeout"), metavar="SECONDS",
                   help="how long an incoming migration whose link broke waits for its source "
                        "to resume it (default 60)")
    s.add_argument("--resolve-timeout", type=_seconds_flag("--resolve-timeout"),
                   metavar="SECONDS",
                   help="how long to ask a peer how a switchover ended before reporting it "
                        "unresolved (default 60)")
    s.add_argument("--state-dir", help="the journal of votes and decisions (default "
                                       "$STATE_DIRECTORY or /var/lib/migd)")
    s.add_argument("--address-file", help="write the bound listen address here once ready")
    s.add_argument("--log-level")
    s.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                   help="any top-level key of the configuration file, as written there "
                        "(e.g. -o max_migrations=4 -o handshake_timeout=5), repeatable")


def _add_migrate(sub: Any) -> None:
    """``migd migrate``: one VF, or a VM's VFs together."""
    m = sub.add_parser("migrate", help="migrate a device, or all VFs of a VM together, to a peer")
    m.add_argument("device", nargs="+",
                   help="device(s); several switch over together, as one VM (all need P2P)")
    m.add_argument("--to", required=True, metavar="HOST:PORT", help="the destination daemon")
    m.add_argument("--dest-device", help="device name on the destination (default: same, or "
                                         "the VF the destination prepared for this one)")
    m.add_argument("--vm", default="", help="the VM this VF belongs to (destination placement)")
    m.add_argument("--stay-stopped", action="store_true",
                   help="load the destination VF but leave it stopped, for 'migd "
                        "device-resume' on the destination once the guest resumes there")
    m.add_argument("--pause-before-switchover", action="store_true",
                   help="pre-copy, then wait in status pre-switchover (VF still running) "
                        "until 'migd migrate-continue ID' (QEMU's capability of that name)")
    m.add_argument("--max-resumes", type=_int("--max-resumes"), metavar="N",
                   help="resume a broken stream up to N times (default 5; 0: fail at once)")
    m.add_argument("--resume-timeout", type=_seconds_flag("--resume-timeout"),
                   metavar="SECONDS",
                   help="time to repair each broken stream (default: the daemon's, 60)")
    m.add_argument("--detach", action="store_true",
                   help="print the migration id and return; follow with 'migd status ID'")
    m.add_argument("--control", default=DEFAULT_CONTROL)
    m.add_argument("--json", action="store_true", help="print the final result as JSON")
    _add_migrate_knobs(m)


def _add_operations(sub: Any) -> None:
    """The commands an operator runs against a daemon's migrations and devices."""
    mc = sub.add_parser("migrate-continue",
                        help="let a migration paused in pre-switchover stop its VF and finish")
    mc.add_argument("id")
    mc.add_argument("--control", default=DEFAULT_CONTROL)

    r = sub.add_parser("resolve", help="settle a migration whose outcome this host could not "
                                       "learn (status unresolved)")
    r.add_argument("id")
    how = r.add_mutually_exclusive_group(required=True)
    how.add_argument("--confirm", action="store_true",
                     help="the destination VF runs the guest: on the destination this starts "
                          "it, on the source its VF stays stopped for good")
    how.add_argument("--resume-source", action="store_true",
                     help="the source VF runs the guest: on the source this resumes it (safe "
                          "only once the destination VF is reset), on the destination this "
                          "resets the loaded VF")
    r.add_argument("--control", default=DEFAULT_CONTROL)

    for name, text in (("device-resume", "start a VF an incoming migration left loaded and "
                                         "stopped (--stay-stopped)"),
                       ("device-reset", "reset a VF that is not migrating (discards a loaded, "
                                        "stopped state)")):
        dv = sub.add_parser(name, help=text)
        dv.add_argument("device")
        dv.add_argument("--control", default=DEFAULT_CONTROL)

    k = sub.add_parser("keygen", help="write a new Ed25519 identity key (and KEY.pub)")
    k.add_argument("-o", "--output", required=True)
    k.add_argument("-C", "--comment", default=os.uname().nodename)

    st = sub.add_parser("status", help="query-migrate")
    st.add_argument("id", nargs="?")
    st.add_argument("--control", default=DEFAULT_CONTROL)
    st.add_argument("--json", action="store_true")

    ls = sub.add_parser("list", help="devices and migrations of the local daemon")
    ls.add_argument("--control", default=DEFAULT_CONTROL)
    ls.add_argument("--json", action="store_true")

    c = sub.add_parser("cancel", help="cancel a migration (succeeds with none running)")
    c.add_argument("id", nargs="?")
    c.add_argument("--control", default=DEFAULT_CONTROL)


def _add_tools(sub: Any) -> None:
    """Benchmarks and tools: bench, soak, demo."""
    b = sub.add_parser("bench", help="migrate between two real local daemons and measure")
    b.add_argument("--backend", default="sim", help="sim | mlx5 | hisi (default sim)")
    src = b.add_mutually_exclusive_group()
    src.add_argument("--state-size", default=None, help="simulated state size (default 256M)")
    src.add_argument("--state-file", help="device state image (e.g. from mkstate.py)")
    b.add_argument("--dirty-rate", default="0", help="guest dirtying rate, bytes/s")
    b.add_argument("--matrix", action="store_true",
                   help="run a grid (the --matrix-* lists) and print a table, JSON and a chart")
    b.add_argument("--repeat", type=int, default=1, help="runs per matrix point")
    b.add_argument("--transport", default="tcp",
                   help="tcp | rdma+tcp (rdma) | rdma+shm (default tcp)")
    b.add_argument("--matrix-transports", default="tcp,rdma+tcp,rdma+shm")
    b.add_argument("--matrix-channels", default="1,2")
    b.add_argument("--matrix-compress", default="none,zstd:1,auto")
    b.add_argument("--matrix-ciphers", default="aes-256-gcm,none",
                   help="a cipher a transport does not accept by default (none off the "
                        "host) is skipped for it")
    b.add_argument("--matrix-chunk-sizes", default="1M")
    b.add_argument("--matrix-out", default="bench/results/matrix.json")
    b.add_argument("--vfs", type=_int("--vfs"), default=1,
                   help="VFs per VM: one VM of N devices migrated as one (its downtime, "
                        "each device's, totals)")
    b.add_argument("--vms", type=_int("--vms"), default=1,
                   help="VMs migrated at once, each of --vfs VFs: a host evacuation "
                        "(aggregate GB/s, worst VM downtime, fairness)")
    b.add_argument("--link", metavar="RATE",
                   help="the two daemons on two hosts: network namespaces joined by a veth "
                        "link shaped to RATE (e.g. 1gbit, 10G, unlimited); root only")
    b.add_argument("--json", action="store_true")
    _add_migrate_knobs(b, explicit=True)

    k = sub.add_parser("soak", help="migrations through a link that damages each one, "
                                    "and a count of how they ended")
    k.add_argument("--trials", type=_int("--trials"), default=500)
    k.add_argument("--seed", type=_int("--seed"), default=1)
    k.add_argument("--state-size", default="2M")
    k.add_argument("--json", action="store_true", help="every trial as JSON")
    d = sub.add_parser("demo", help="two local daemons, one simulated VF migrated between them")
    d.add_argument("--state-size", default="256M")
    d.add_argument("--dirty-rate", default="8M")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="migd", description="SR-IOV VF live-migration stream daemon")
    ap.add_argument("--version", action="version", version=f"migd {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for add in (_add_serve, _add_migrate, _add_operations, _add_tools):
        add(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "serve":
            return _serve(args)
        if args.cmd == "migrate":
            return _migrate(args)
        if args.cmd == "keygen":
            return _keygen(args)
        if args.cmd == "status":
            return _status(args)
        if args.cmd == "cancel":
            return _cancel(args)
        if args.cmd == "list":
            return _list(args)
        if args.cmd == "migrate-continue":
            return _simple(args, "migrate-continue", {"id": args.id},
                           lambda r: f"migration {r['id']} continues to switchover")
        if args.cmd == "resolve":
            decision = "commit" if args.confirm else "abort"
            return _simple(args, "resolve", {"id": args.id, "decision": decision},
                           lambda r: f"migration {r['id']} settled: {r['decision']}")
        if args.cmd in ("device-resume", "device-reset"):
            return _simple(args, args.cmd, {"device": args.device},
                           lambda r: f"device {r['device']}: {r['state']}")
        if args.cmd == "bench":
            from .bench import run_bench

            return run_bench(args)
        if args.cmd == "soak":
            from .soak import main as soak

            return soak(args.trials, args.seed, args.state_size, args.json)
        if args.cmd == "demo":
            from .bench import run_demo

            return run_demo(args)
    except MigdError as exc:
        print(f"migd {args.cmd}: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2


def _serve(args: argparse.Namespace) -> int:
    import uvloop

    from .config import Config, override, parse_device
    from .config import load as load_config
    from .config import parse as parse_config
    from .daemon import serve

    path = args.config or (DEFAULT_PATH if os.path.exists(DEFAULT_PATH) else None)

    def configuration() -> Config:
        """The file, then the flags over it: at start and again on every reload."""
        cfg = load_config(path) if path else Config(control=DEFAULT_CONTROL)
        for key in ("control", "identity", "authorized_keys", "transport",
                    "idle_timeout", "log_level", "state_dir", "resume_timeout",
                    "resolve_timeout"):
            if getattr(args, key) is not None:  # checked as the file's key is
                flag = "--" + key.replace("_", "-")
                setattr(cfg, key, getattr(parse_config({key: getattr(args, key)}, flag), key))
        for item in args.option:
            override(cfg, item)
        if args.listen:
            cfg.listen = tuple(args.listen)
        cfg.transport = transports.REGISTRY.check([cfg.transport])[0]
        if args.device:
            cfg.devices = [parse_device(d) for d in args.device]
        return cfg

    cfg = configuration()
    journald.setup(cfg.log_level)

    def ready(daemon: Any) -> None:
        if args.address_file:
            tmp = args.address_file + ".tmp"
            with open(tmp, "w") as f:
                f.write("".join(a + "\n" for a in daemon.addresses))
            os.replace(tmp, args.address_file)

    # Codec threads hand the GIL back and forth with the event loop per chunk; with
    # CPython's 5 ms default they queue for it.  Measured on the 1 GiB image
    # (migd bench, AES-256-GCM, none): 1.9-2.5 GB/s at 5 ms, 2.9-3.2 GB/s at 1 ms.
    sys.setswitchinterval(0.001)
    uvloop.run(serve(cfg, ready, configuration))
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from .control import ControlClient

    if len(args.device) == 1:
        req = migrate_args(args, args.device[0], args.to)
        req["dest-device"] = args.dest_device or args.device[0]
    else:
        if args.dest_device:
            raise ConfigError("--dest-device names one device; a VM's VFs keep their names "
                              "or are placed by the destination")
        req = migrate_args(args, "", args.to)
        del req["device"]
        req["devices"] = args.device
    req["resume"] = not args.stay_stopped
    req["vm"] = args.vm
    tty = sys.stderr.isatty()

    def show(d: dict[str, Any]) -> None:
        if not args.json:
            line = progress_line(d)
            print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr,
                  flush=True)

    if args.detach:
        with ControlClient(args.control) as c:
            started = c.call("migrate", **req)
        print(json.dumps(started) if args.json else started["id"])
        return 0
    paused = False

    def show_and_hint(d: dict[str, Any]) -> None:
        nonlocal paused
        show(d)
        if d.get("status") == "pre-switchover" and not paused and not args.json:
            paused = True
            print(f"{chr(10) if tty else ''}paused before switchover: 'migd migrate-continue "
                  f"{d.get('id')}' stops the VF and finishes", file=sys.stderr, flush=True)

    with ControlClient(args.control, timeout=3600) as c:
        final = c.migrate_follow(req, show_and_hint)
    if tty and not args.json:
        print(file=sys.stderr)
    print(json.dumps(final) if args.json else summary(final))
    return {"completed": 0, "unresolved": 3}.get(str(final.get("status")), 1)


def _keygen(args: argparse.Namespace) -> int:
    from .identity import Identity, fingerprint

    ident = Identity.generate()
    try:
        ident.save(args.output, args.comment)
    except FileExistsError:
        raise ConfigError(f"{args.output} exists; not overwriting an identity") from None
    except OSError as exc:
        raise ConfigError(f"{args.output}: {exc.strerror}") from None
    print(f"wrote {args.output} and {args.output}.pub ({fingerprint(ident.public)})")
    return 0


def _status(args: argparse.Namespace) -> int:
    from .control import ControlClient

    with ControlClient(args.control) as c:
        res = c.call("query-migrate", **({"id": args.id} if args.id else {}))
    if args.json:
        print(json.dumps(res))
    elif args.id:
        print(summary(res))
    else:
        print(migrations_table(res) if res else "no migrations")
    return 0


def _list(args: argparse.Namespace) -> int:
    from .control import ControlClient

    with ControlClient(args.control) as c:
        devices, jobs = c.call("query-devices"), c.call("query-migrate")
    if args.json:
        print(json.dumps({"devices": devices, "migrations": jobs}))
        return 0
    print(table(["device", "kind", "state", "size", "busy"], [
        [d["name"], d["kind"], d["state"], human_bytes(d["state_size"]),
         "yes" if d["busy"] else "no"] for d in devices]))
    print()
    print(migrations_table(jobs) if jobs else "no migrations")
    return 0


def _simple(args: argparse.Namespace, cmd: str, call: dict[str, Any],
            text: Any) -> int:
    from .control import ControlClient

    with ControlClient(args.control) as c:
        res = c.call(cmd, **call)
    print(text(res))
    return 0


def _cancel(args: argparse.Namespace) -> int:
    from .control import ControlClient

    with ControlClient(args.control) as c:
        res = c.call("cancel", **({"id": args.id} if args.id else {}))
    print(f"cancelled: {', '.join(res['cancelled']) or 'nothing was running'}")
    return 0
