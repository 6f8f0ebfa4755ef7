"""What a person reads of migrations (the CLI's progress line, summary and tables,
the benchmark's too), and the request a command line makes."""

from __future__ import annotations

import argparse
from typing import Any

from .units import human_bytes, human_rate


def migrate_args(args: argparse.Namespace, device: str, peer: str) -> dict[str, Any]:
    """The request for what the flags say, and only that: what they leave out is the
    daemon's ``[defaults]``.  Checked here against the daemon's own schema, so that a
    bad value is refused before anything starts."""
    from . import schema
    from .config import Config

    out: dict[str, Any] = {"device": device, "peer": peer}
    for attr, key in (("compress", "compress"), ("cipher", "cipher"),
                      ("chunk_size", "chunk-size"), ("downtime_limit", "downtime-limit"),
                      ("max_iterations", "max-iterations"), ("channels", "channels"),
                      ("max_bandwidth", "max-bandwidth"), ("max_resumes", "max-resumes"),
                      ("resume_timeout", "resume-timeout")):
        value = getattr(args, attr, None)
        if value is not None:
            out[key] = value
    if args.no_precopy:
        out["precopy"] = False
    if getattr(args, "pause_before_switchover", False):
        out["pause-before-switchover"] = True
    checked = schema.parse("migrate", {k: v for k, v in out.items() if k != "device" or v},
                           Config())
    for key in ("chunk-size", "max-bandwidth"):  # sizes go as bytes
        if key in out:
            out[key] = checked[key]
    return out


def progress_line(d: dict[str, Any]) -> str:
    total = int(d.get("total", 0))
    moved = int(d.get("transferred", 0))
    elapsed = max(1e-3, d.get("total-time", 0) / 1000)
    rate = moved / elapsed
    pending = max(0, total - moved)
    eta = f"{pending / rate:.1f}s" if rate > 0 and pending else "-"
    return (f"{d.get('status', '?'):>10} {d.get('phase', ''):<14} "
            f"{human_bytes(moved):>10} / {human_bytes(total) if total else '?':<10} "
            f"{human_rate(rate):>10}  iter {d.get('dirty-sync-count', 0):<3} eta {eta}")


def summary(d: dict[str, Any]) -> str:
    lines = [
        f"migration {d.get('id')} {d.get('status')}: device {d.get('device')} -> {d.get('peer')}",
        f"  moved {human_bytes(d.get('transferred', 0))} of state "
        f"({human_bytes(d.get('wire-bytes', 0))} on the wire, {d.get('transport') or '-'}, "
        f"{d.get('cipher') or '-'}, compress {d.get('compress') or '-'})",
        f"  total {d.get('total-time', 0)} ms, setup {d.get('setup-time', 0)} ms, "
        f"downtime {d.get('downtime', '-')} ms, pre-copy iterations {d.get('dirty-sync-count', 0)}",
    ]
    if d.get("resumes"):
        lines.append(f"  resumed {d['resumes']} time(s), {human_bytes(d.get('resent-bytes', 0))} "
                     "sent again")
    if "unresolved-reason" in d:
        lines.append(f"  UNRESOLVED: {d['unresolved-reason']} (the VF stays stopped; settle it "
                     f"with 'migd resolve {d.get('id')} --confirm | --resume-source')")
    if "error-desc" in d:
        lines.append(f"  error: {d['error-desc']}")
    return "\n".join(lines)


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def migrations_table(jobs: list[dict[str, Any]]) -> str:
    return table(["id", "role", "device", "peer", "status", "moved", "downtime", "error"], [
        [j["id"], j["role"], j["device"], j["peer"], j["status"],
         f"{human_bytes(j.get('transferred', 0))}/{human_bytes(j.get('total', 0))}",
         f"{j['downtime']} ms" if "downtime" in j else "-", j.get("error-desc", "")[:40]]
        for j in jobs])
