"""Every control request, checked against one schema before anything acts on it.

The control socket's commands, and the ``migd`` flags that become them, take only
the arguments declared here, each with its type, range and (where a migration's
knob has one) the daemon's ``[defaults]`` value.  A request that does not fit is
a :class:`~migd.errors.ConfigError` naming the command and the argument: no
request can raise anything else (``1e400``, ``NaN``, a list where an id goes).
The configuration file's keys are checked by the same checks (``migd.config``),
so a value means the same wherever it is written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .codec import parse_compress
from .crypto import CIPHERS
from .errors import ConfigError
from .units import human_bytes, parse_size

if TYPE_CHECKING:
    from .config import Config

PCI_ADDRESS = re.compile(r"[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]")

MAX_TEXT = 256
MAX_DEVICES = 16


@dataclasses.dataclass(frozen=True)
class Field:
    """One argument: ``check`` turns a JSON value into the value used, or raises
    ConfigError (or ValueError/TypeError) saying what it must be."""

    check: Callable[[Any], Any]
    #: The value when the request leaves it out; a callable takes the daemon's
    #: configuration (its ``[defaults]``); ``REQUIRED``: it may not be left out.
    default: Any = None


REQUIRED = object()


def text(limit: int = MAX_TEXT) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if not isinstance(v, str) or len(v) > limit:
            raise ConfigError(f"must be a string of at most {limit} characters")
        return v
    return check


def whole(lo: int, hi: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ConfigError(f"must be a whole number from {lo} to {hi}")
        return v
    return check


def seconds(lo: float, hi: float) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) \
                or not lo <= v <= hi:
            raise ConfigError(f"must be a number of seconds from {lo:g} to {hi:g}")
        return float(v)
    return check


def flag(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ConfigError("must be true or false")
    return v


def size(lo: int, hi: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int | str) or (
                isinstance(v, str) and len(v) > 32):
            raise ConfigError("must be a size: bytes, or a string like \"1M\"")
        n = parse_size(v)
        if not lo <= n <= hi:
            raise ConfigError(f"must be a size from {human_bytes(lo)} to {human_bytes(hi)}")
        return n
    return check


def names(limit: int = MAX_DEVICES) -> Callable[[Any], list[str]]:
    def check(v: Any) -> list[str]:
        if (not isinstance(v, list) or not v or len(v) > limit
                or not all(isinstance(n, str) and 0 < len(n) <= 64 for n in v)):
            raise ConfigError(f"must be a list of 1 to {limit} names")
        return list(v)
    return check


def compress(v: Any) -> str:
    if not isinstance(v, str) or len(v) > 32:
        raise ConfigError("must be none, zstd[:LEVEL] or auto[:LEVEL]")
    parse_compress(v)
    return v


def cipher(v: Any) -> str:
    if not isinstance(v, str) or (v != "" and v not in CIPHERS):
        raise ConfigError(f"must be one of {', '.join(CIPHERS)}")
    return str(v)


def pci(v: Any) -> str:
    if not isinstance(v, str) or not PCI_ADDRESS.fullmatch(v):
        raise ConfigError("must be a PCI address DDDD:BB:SS.F")
    return v.lower()


def pcis(v: Any) -> list[str]:
    if not isinstance(v, list) or len(v) > 64:
        raise ConfigError("must be a list of PCI addresses")
    return [pci(a) for a in v]


def decision(v: Any) -> str:
    if v not in ("commit", "abort"):
        raise ConfigError("must be 'commit' (--confirm) or 'abort' (--resume-source)")
    return str(v)


def _defaults(attr: str) -> Callable[[Config], Any]:
    return lambda cfg: getattr(cfg.defaults, attr)


#: The knobs of one migration, as QEMU names them where it has them.
MIGRATE: dict[str, Field] = {
    "device": Field(text(64)),
    "devices": Field(names()),
    "peer": Field(text(), REQUIRED),
    "dest-device": Field(text(64)),
    "dest-devices": Field(names()),
    "compress": Field(compress, _defaults("compress")),
    "cipher": Field(cipher, _defaults("cipher")),
    "chunk-size": Field(size(4096, 16 << 20), _defaults("chunk_size")),
    "precopy": Field(flag, True),
    "downtime-limit": Field(whole(0, 3_600_000), _defaults("downtime_limit")),
    "max-iterations": Field(whole(1, 1000), 30),
    "resume": Field(flag, True),
    "timeout": Field(seconds(0.1, 3600), 30.0),
    "channels": Field(whole(1, 16), _defaults("channels")),
    "max-bandwidth": Field(size(0, 1 << 50), _defaults("max_bandwidth")),
    "vm": Field(text(), ""),
    "pause-before-switchover": Field(flag, False),
    "max-resumes": Field(whole(0, 100), _defaults("max_resumes")),
    "resume-timeout": Field(seconds(0.1, 86400), lambda cfg: cfg.resume_timeout),
    "follow": Field(flag, False),
    "interval": Field(seconds(0.02, 60), 0.25),
}

_ID = {"id": Field(text(64))}
_NEED_ID = {"id": Field(text(64), REQUIRED)}
_DEVICE = {"device": Field(text(64), REQUIRED)}

COMMANDS: dict[str, dict[str, Field]] = {
    "migrate": MIGRATE,
    "migrate-continue": _NEED_ID,
    "resolve": {**_NEED_ID, "decision": Field(decision, REQUIRED)},
    "query-migrate": _ID,
    "cancel": _ID,
    "list": {},
    "query-devices": {},
    "device-digest": _DEVICE,
    "device-dump": {**_DEVICE, "path": Field(text(4096), REQUIRED)},
    "device-resume": _DEVICE,
    "device-reset": _DEVICE,
    "query-stats": {},
    # One VF (``source-address``), or a whole VM's, all or none (``source-addresses``).
    "prepare-incoming": {"source-address": Field(pci), "source-addresses": Field(pcis),
                         "kind": Field(text(32)), "vm": Field(text(), "")},
    "query-reservations": {},
    "release-vm": {"vm": Field(text(), REQUIRED), "addresses": Field(pcis, [])},
    "subscribe": {"interval": Field(seconds(0.02, 60), 0.1)},
    "quit": {},
}


def parse(command: str, args: Mapping[str, Any], cfg: Config) -> dict[str, Any]:
    """``args`` checked against ``command``'s schema, with every default filled in."""
    fields = COMMANDS.get(command)
    if fields is None:
        raise ConfigError(f"unknown command {command!r}; commands: {', '.join(COMMANDS)}")
    unknown = sorted(set(args) - set(fields))
    if unknown:
        raise ConfigError(f"{command}: unknown argument(s) {', '.join(map(repr, unknown))}; "
                          f"known: {', '.join(fields) or 'none'}")
    out: dict[str, Any] = {}
    for name, field in fields.items():
        if name in args and args[name] is not None:
            try:
                out[name] = field.check(args[name])
            except ConfigError as exc:
                raise ConfigError(f"{command}: '{name}' {exc.message}") from None
            except (ValueError, TypeError, OverflowError) as exc:
                raise ConfigError(f"{command}: '{name}' {exc}") from None
        elif field.default is REQUIRED:
            raise ConfigError(f"{command}: '{name}' is required")
        else:
            out[name] = field.default(cfg) if callable(field.default) else field.default
    return out


@dataclasses.dataclass
class Request:
    """One line from the control socket, checked: what to run, or why not."""

    #: The request's own id, echoed in the reply (None if it had none or a bad one).
    id: int | str | None = None
    command: str = ""
    args: dict[str, Any] = dataclasses.field(default_factory=dict)
    error: ConfigError | None = None


def request(line: bytes, cfg: Config) -> Request:
    """A control line (``{"execute": ..., "arguments": {...}, "id": ...}``) checked
    against the schema.  Never raises: a bad request comes back with ``error``."""
    out = Request()
    try:
        try:
            req = json.loads(line)
        except (ValueError, RecursionError):
            raise ConfigError("request is not valid JSON") from None
        if not isinstance(req, dict):
            raise ConfigError("request must be a JSON object")
        rid = req.get("id")
        if not (rid is None or (isinstance(rid, int | str) and not isinstance(rid, bool)
                                and len(str(rid)) <= 64)):
            raise ConfigError("'id' of a request must be a number or a short string")
        out.id = rid
        cmd = req.get("execute")
        raw = req.get("arguments", {})
        if not isinstance(raw, dict):
            raise ConfigError("'arguments' must be an object")
        if not isinstance(cmd, str):
            raise ConfigError(f"'execute' must name a command: {', '.join(COMMANDS)}")
        out.args = parse(cmd, raw, cfg)
        out.command = cmd
    except ConfigError as exc:
        out.error = exc
    return out
