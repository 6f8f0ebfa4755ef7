"""Transport names as the operator gives them on the command line."""

from __future__ import annotations

import transports

from .errors import ConfigError


def check_transports(names: list[str]) -> list[str]:
    known = transports.REGISTRY.names()
    for n in names:
        if n not in known:
            raise ConfigError(f"transport {n!r} unknown; supported: {', '.join(known)}")
    return names
