"""Named fault points: a daemon that dies at an exact moment of the switchover.

``MIGD_FAULT=source:after-decision`` (comma-separated for several) makes the
daemon ``os._exit`` when it gets there, as a SIGKILL or an OOM kill would end
it: no cleanup, no last words to the peer.  The end-to-end tests kill each side
at each point and restart it, to show that the journal and the resolution
leave no VF forked, lost or silently stopped.  Unknown names stop the daemon at
start (a typo must not make a fault test pass by never firing).

The points, per side:

* ``after-stop``: source: its VF reached STOP_COPY; destination: the device
  accepted the loaded stream (RESUMING -> STOP), not yet voted.
* ``after-end``: the end record was sent / arrived and checked.
* ``after-loaded``: the destination's vote was journaled and sent / arrived.
* ``after-decision``: source: COMMIT journaled, ``go`` not sent; destination:
  COMMIT journaled, the VF not yet started.
* ``after-go``: ``go`` was sent / arrived (the destination has not journaled it).
* ``after-commit``: destination: the VF runs, ``committed`` not sent; source:
  ``committed`` arrived, not yet journaled.
"""

from __future__ import annotations

import logging
import os
import sys

from .errors import ConfigError

POINTS = ("after-stop", "after-end", "after-loaded", "after-decision", "after-go",
          "after-commit")
ROLES = ("source", "destination")
#: The exit status of a daemon killed by a fault point.
EXIT = 86

log = logging.getLogger("migd.faults")


class Faults:
    def __init__(self, spec: str = "") -> None:
        self.armed: set[tuple[str, str]] = set()
        for item in filter(None, (p.strip() for p in spec.split(","))):
            role, _, point = item.partition(":")
            if role not in ROLES or point not in POINTS:
                raise ConfigError(f"MIGD_FAULT {item!r}: expected ROLE:POINT with ROLE one of "
                                  f"{', '.join(ROLES)} and POINT one of {', '.join(POINTS)}")
            self.armed.add((role, point))

    @classmethod
    def from_environment(cls) -> Faults:
        return cls(os.environ.get("MIGD_FAULT", ""))

    def hit(self, role: str, point: str) -> None:
        if (role, point) in self.armed:
            log.critical("fault point %s:%s: exiting now", role, point)
            for h in logging.getLogger().handlers:
                h.flush()
            sys.stderr.flush()
            os._exit(EXIT)
