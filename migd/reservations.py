"""Pool VFs reserved for VMs that are migrating in (libvirt's ``migrate begin``).

A reservation says "pool VF D will take source VF A of VM V".  Three rules that
libvirt's hook protocol makes necessary:

* A VM is reserved whole or not at all: libvirt calls no ``release`` after a
  ``migrate begin`` that failed, so a half-made reservation would leak.
* One that no migration has claimed within ``ttl`` seconds is dropped: a hook
  that timed out (libvirt gave up) leaves nobody to release what the daemon made
  afterwards.  One that a migration claimed stays until the VM leaves the host
  (``release end``): the VF is the VM's now.
* They survive a daemon restart (a JSON file in the state directory, replaced
  atomically), so a restarted daemon does not hand a reserved VF out again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterable

from .errors import Busy, ConfigError

log = logging.getLogger("migd.reservations")

FILE = "reservations.json"


@dataclasses.dataclass
class Reservation:
    vm: str
    source: str  # the source VF's PCI address
    device: str  # the local pool VF
    made: float  # wall-clock time it was made
    claimed: bool = False  # a migration came for it


class Reservations:
    def __init__(self, directory: str | None, ttl: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.ttl = ttl
        self._clock = clock
        self._path = os.path.join(directory, FILE) if directory else None
        self._by_key: dict[tuple[str, str], Reservation] = {}
        self._load()

    # --- queries ---------------------------------------------------------------------

    def get(self, vm: str, source: str) -> str | None:
        r = self._by_key.get((vm, source))
        return r.device if r is not None else None

    def devices(self) -> set[str]:
        self.expire()
        return {r.device for r in self._by_key.values()}

    def holder(self, device: str) -> Reservation | None:
        return next((r for r in self._by_key.values() if r.device == device), None)

    def for_source(self, source: str) -> list[Reservation]:
        return [r for r in self._by_key.values() if r.source == source]

    def listing(self) -> list[dict[str, object]]:
        self.expire()
        now = self._clock()
        return [{"vm": r.vm, "source-address": r.source, "device": r.device,
                 "claimed": r.claimed,
                 "expires-in": None if r.claimed else round(max(0.0, r.made + self.ttl - now), 1)}
                for r in self._by_key.values()]

    # --- changes -----------------------------------------------------------------------

    def reserve_vm(self, vm: str, sources: list[str],
                   free: Iterable[str]) -> dict[str, str]:
        """Reserve a VF of ``free`` for each of ``sources``, all or none.  Sources the
        VM holds already keep theirs (libvirt may call the hook again)."""
        taken = self.devices()  # (expired ones dropped first)
        placed = {s: d for s in sources if (d := self.get(vm, s)) is not None}
        wanted = [s for s in sources if s not in placed]
        available = [d for d in free if d not in taken]
        if len(available) < len(wanted):
            raise Busy(f"VM {vm or '-'} needs {len(wanted)} free pool VF(s), for "
                       f"{', '.join(wanted)}; {len(available)} free here")
        now = self._clock()
        for source, device in zip(wanted, available, strict=False):
            self._by_key[(vm, source)] = Reservation(vm, source, device, now)
            placed[source] = device
        if wanted:
            self._save()
            log.info("reserved %s for VM %s", ", ".join(f"{placed[s]} (VF {s})"
                                                         for s in wanted), vm or "-")
        return placed

    def claim(self, vm: str, source: str) -> None:
        r = self._by_key.get((vm, source))
        if r is not None and not r.claimed:
            r.claimed = True
            self._save()

    def release_vm(self, vm: str) -> list[str]:
        dropped = [k for k in self._by_key if k[0] == vm]
        for k in dropped:
            del self._by_key[k]
        if dropped:
            self._save()
        return [k[1] for k in dropped]

    def expire(self) -> None:
        now = self._clock()
        old = [k for k, r in self._by_key.items()
               if not r.claimed and now - r.made > self.ttl]
        for k in old:
            r = self._by_key.pop(k)
            log.warning("reservation of %s for VF %s of VM %s expired: no migration came "
                        "within reservation_ttl (%gs)", r.device, r.source, r.vm or "-", self.ttl)
        if old:
            self._save()

    # --- the file ----------------------------------------------------------------------

    def _load(self) -> None:
        if self._path is None:
            return
        try:
            with open(self._path, "rb") as f:
                raw = json.loads(f.read().decode())
            items = [Reservation(str(e["vm"]), str(e["source"]), str(e["device"]),
                                 float(e["made"]), bool(e["claimed"])) for e in raw]
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{self._path} is damaged ({exc}); move it away to start "
                              "with no reservations") from None
        self._by_key = {(r.vm, r.source): r for r in items}
        if items:
            log.info("%d reservation(s) kept from before the restart", len(items))

    def _save(self) -> None:
        if self._path is None:
            return
        tmp = self._path + ".tmp"
        data = json.dumps([dataclasses.asdict(r) for r in self._by_key.values()]).encode()
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            log.error("cannot keep reservations in %s: %s (a restart would forget them)",
                      self._path, exc.strerror)
