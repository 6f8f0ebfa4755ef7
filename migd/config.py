"""``/etc/migd/migd.toml``: the daemon's configuration, checked whole at start.

Every key is declared here once, with its type, default and meaning; the example
file ``systemd/migd.toml`` documents each.  Unknown keys, wrong types and
impossible values are refused with the key and the file named.  Command-line
flags override the file.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Callable
from typing import Any

import transports

from . import schema
from .codec import DEFAULT_COMPRESSION
from .crypto import CIPHERS
from .errors import ConfigError
from .protocol.frames import DEFAULT_CHUNK, MAX_CHUNK_LIMIT
from .schema import PCI_ADDRESS

DEFAULT_PATH = "/etc/migd/migd.toml"


@dataclasses.dataclass
class Defaults:
    """What a migration uses when its request does not say."""

    channels: int = 2
    compress: str = DEFAULT_COMPRESSION
    #: Empty: the transport's own default (AES-256-GCM; ``none`` over rdma+shm).
    cipher: str = ""
    max_bandwidth: int = 0
    downtime_limit: int = 300
    chunk_size: int = DEFAULT_CHUNK
    #: A broken stream is resumed up to this many times (0: a broken link fails it).
    max_resumes: int = 5


@dataclasses.dataclass
class DeviceConfig:
    name: str
    backend: str
    options: dict[str, str]
    #: The VF's PCI address on this host (DDDD:BB:SS.F), as libvirt names it.
    address: str = ""
    #: Whether incoming migrations may be placed on it (libvirt hook, prepare-incoming).
    pool: bool = False


@dataclasses.dataclass
class Config:
    #: Where migrations come in: ``host:port`` (the default transport), or an
    #: address naming its transport (``rdma+shm:///run/migd/rdma.sock``).
    listen: tuple[str, ...] = ("127.0.0.1:7707",)
    control: str = "/run/migd/migd.sock"
    control_group: str = ""
    #: This host's Ed25519 key, or "x509": the certificates in ``x509_dir``.
    identity: str = "/etc/migd/identity.key"
    authorized_keys: str = "/etc/migd/authorized_keys"
    #: With ``identity = "x509"``: QEMU's layout (ca-cert.pem, server-cert.pem,
    #: server-key.pem, client-cert.pem, client-key.pem, optional ca-crl.pem).
    x509_dir: str = "/etc/pki/qemu"
    #: With x509: names (glob patterns) a source's certificate must carry, besides
    #: coming from the CA; empty: any the CA issued for client authentication.
    x509_allowed_names: tuple[str, ...] = ()
    transport: str = "tcp"
    #: What incoming migrations may use; empty: all.  A listener also drops what
    #: its transport never allows (``none`` on a link that leaves the host).
    ciphers: tuple[str, ...] = ()
    idle_timeout: float = 30.0
    stop_timeout: float = 60.0
    #: The journal of votes and decisions (the unit's StateDirectory).
    state_dir: str = os.environ.get("STATE_DIRECTORY", "/var/lib/migd").split(":")[0]
    #: How long a broken stream may take to resume (both sides), and how long either
    #: side asks for the outcome of a switchover before reporting it unresolved.
    resume_timeout: float = 60.0
    resolve_timeout: float = 60.0
    log_level: str = "info"
    metrics: str = ""
    #: A peer must prove its identity and say what it wants within this many seconds
    #: of connecting, however its bytes trickle in.
    handshake_timeout: float = 10.0
    #: Connections not yet authenticated, in all and from one address; when full,
    #: the oldest is dropped for the newcomer (``migd.admission.Gate``).
    max_unauthenticated: int = 64
    max_unauthenticated_per_host: int = 8
    #: VFs migrating at once, out and (as many) in; outgoing requests beyond it
    #: wait in a queue of up to ``max_queued``, incoming ones are refused as busy.
    max_migrations: int = 8
    max_queued: int = 64
    #: Stream buffers all migrations together may reserve (each its worst case).
    buffer_budget: int = 512 << 20
    #: Seconds a pool VF reserved for an incoming VM (libvirt's migrate begin) stays
    #: reserved when no migration comes for it.
    reservation_ttl: float = 600.0
    #: Which VFIO hostdevs of a domain the libvirt hook hands to migd, besides those
    #: at an address of a device above: glob patterns of PCI addresses (the VFs of
    #: other hosts, where their layout differs).  Anything else (a GPU, a boot ROM
    #: device) is left to libvirt.
    hook_addresses: tuple[str, ...] = ()
    #: Wire bytes per second all outgoing migrations together may send (0: no cap),
    #: shared fairly: each gets at least an even share when it can use it, and what
    #: one leaves unused goes to the others.  Each migration's own max-bandwidth
    #: applies within it.
    max_bandwidth_total: int = 0
    #: The largest chunk this daemon takes as a destination (a source asking for
    #: more is negotiated down to it).  Each incoming stream's pre-faulted receive
    #: buffers are this size, so it weighs against ``buffer_budget``.
    max_chunk_size: int = DEFAULT_CHUNK
    defaults: Defaults = dataclasses.field(default_factory=Defaults)
    devices: list[DeviceConfig] = dataclasses.field(default_factory=list)


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError("a string")
    return v


def _positive_float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < 1e9:
        raise TypeError("a positive number of seconds")
    return float(v)


def _ciphers(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not v or not all(isinstance(c, str) for c in v):
        raise TypeError("a non-empty list of cipher names")
    for c in v:
        if c not in CIPHERS:
            raise TypeError(f"ciphers from {', '.join(CIPHERS)} (not {c!r})")
    return tuple(v)


def _listen(v: Any) -> tuple[str, ...]:
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not items or not all(isinstance(a, str) and a
                                                           for a in items):
        raise TypeError("an address or a non-empty list of addresses")
    for a in items:
        transports.REGISTRY.split(a)
    return tuple(items)


def _transport(v: Any) -> str:
    return transports.REGISTRY.check([_str(v)])[0]


def _strings(what: str) -> Callable[[Any], tuple[str, ...]]:
    def check(v: Any) -> tuple[str, ...]:
        if not isinstance(v, list) or not all(isinstance(p, str) and p for p in v):
            raise TypeError(what)
        return tuple(v)
    return check


_names = _strings("a list of names or glob patterns, e.g. [\"*.hv.example.com\"]")
_pci_patterns = _strings("a list of glob patterns of PCI addresses, e.g. [\"0000:3b:*\"]")


def _patterns(v: Any) -> tuple[str, ...]:
    return tuple(p.lower() for p in _pci_patterns(v))


def _log_level(v: Any) -> str:
    if v not in ("debug", "info", "warning", "error"):
        raise TypeError("one of debug, info, warning, error")
    return str(v)


TOP: dict[str, Callable[[Any], Any]] = {
    "listen": _listen, "control": _str, "control_group": _str, "identity": _str,
    "authorized_keys": _str, "transport": _transport, "ciphers": _ciphers,
    "x509_dir": _str, "x509_allowed_names": _names,
    "idle_timeout": _positive_float, "stop_timeout": _positive_float, "log_level": _log_level,
    "metrics": _str, "state_dir": _str, "resume_timeout": _positive_float,
    "resolve_timeout": _positive_float,
    "handshake_timeout": schema.seconds(0.1, 3600),
    "max_unauthenticated": schema.whole(1, 65536),
    "max_unauthenticated_per_host": schema.whole(1, 65536),
    "max_migrations": schema.whole(1, 1024), "max_queued": schema.whole(0, 65536),
    "buffer_budget": schema.size(16 << 20, 1 << 40),
    "reservation_ttl": schema.seconds(1, 7 * 86400),
    "hook_addresses": _patterns,
    "max_chunk_size": schema.size(4096, MAX_CHUNK_LIMIT),
    "max_bandwidth_total": schema.size(0, 1 << 50),
}
#: A migration's knobs: the same checks as a request's (``migd.schema.MIGRATE``).
DEFAULTS: dict[str, Callable[[Any], Any]] = {
    key: schema.MIGRATE[key.replace("_", "-")].check
    for key in ("channels", "compress", "cipher", "max_bandwidth", "downtime_limit",
                "chunk_size", "max_resumes")
}


def parse_device(text: str) -> DeviceConfig:
    """``NAME:KIND[:key=value,...]``, e.g. ``vf0:sim:size=64M,dirty-rate=4M``."""
    parts = text.split(":", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ConfigError(f"device {text!r}: expected NAME:KIND[:key=value,...]")
    opts: dict[str, str] = {}
    if len(parts) == 3 and parts[2]:
        for item in parts[2].split(","):
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise ConfigError(f"device {parts[0]}: option {item!r} is not key=value")
            opts[key.strip()] = value.strip()
    return DeviceConfig(parts[0], parts[1], opts)


def override(cfg: Config, item: str) -> None:
    """``KEY=VALUE`` from the command line (``migd serve -o``), checked as the same
    key in the file would be; VALUE is TOML (a bare word is taken as a string)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or key not in TOP:
        raise ConfigError(f"-o {item!r}: expected KEY=VALUE with KEY one of "
                          f"{', '.join(sorted(TOP))}")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    parsed = parse({key: value}, f"-o {key}")
    setattr(cfg, key, getattr(parsed, key))


def load(path: str) -> Config:
    try:
        with open(path, "rb") as f:
            data = f.read((1 << 20) + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    return loads(data, path)


def loads(data: bytes, path: str = "<config>") -> Config:
    """The configuration in ``data`` (a file's bytes), or ConfigError naming ``path``."""
    if len(data) > 1 << 20:
        raise ConfigError(f"{path}: larger than 1 MiB: not a configuration file")
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}): TOML files are UTF-8") \
            from None
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse(raw, path)


def parse(raw: dict[str, Any], path: str = "<config>") -> Config:
    cfg = Config()

    def take(table: dict[str, Any], schema: dict[str, Callable[[Any], Any]], prefix: str,
             target: object) -> None:
        for key, value in table.items():
            check = schema.get(key)
            if check is None:
                known = ", ".join(sorted(schema))
                raise ConfigError(f"{path}: unknown key '{prefix}{key}' (known: {known})")
            try:
                setattr(target, key, check(value))
            except (TypeError, ConfigError) as exc:
                why = exc.message if isinstance(exc, ConfigError) else f"must be {exc}"
                raise ConfigError(f"{path}: '{prefix}{key}' {why}") from None

    top = {k: v for k, v in raw.items() if k not in ("defaults", "devices")}
    take(top, TOP, "", cfg)
    defaults = raw.get("defaults", {})
    if not isinstance(defaults, dict):
        raise ConfigError(f"{path}: 'defaults' must be a table")
    take(defaults, DEFAULTS, "defaults.", cfg.defaults)
    devices = raw.get("devices", {})
    if not isinstance(devices, dict):
        raise ConfigError(f"{path}: 'devices' must be a table of devices")
    for name, dev in devices.items():
        where = f"devices.{name}"
        if not isinstance(dev, dict):
            raise ConfigError(f"{path}: '{where}' must be a table")
        unknown = set(dev) - {"backend", "options", "address", "pool"}
        if unknown:
            raise ConfigError(f"{path}: unknown key '{where}.{sorted(unknown)[0]}' "
                              "(known: backend, options, address, pool)")
        address = dev.get("address", "")
        if not isinstance(address, str) or (address and not PCI_ADDRESS.fullmatch(address)):
            raise ConfigError(f"{path}: '{where}.address' must be a PCI address DDDD:BB:SS.F")
        pool = dev.get("pool", False)
        if not isinstance(pool, bool):
            raise ConfigError(f"{path}: '{where}.pool' must be true or false")
        backend = dev.get("backend")
        if not isinstance(backend, str):
            raise ConfigError(f"{path}: '{where}.backend' must be a string")
        options = dev.get("options", {})
        if not isinstance(options, dict):
            raise ConfigError(f"{path}: '{where}.options' must be a table")
        bad = [k for k, v in options.items()
               if isinstance(v, bool) or not isinstance(v, str | int)]
        if bad:
            raise ConfigError(f"{path}: '{where}.options.{bad[0]}' must be a string or a number")
        cfg.devices.append(DeviceConfig(name, backend, {k: str(v) for k, v in options.items()},
                                        address.lower(), pool))
    return cfg
