"""The durable record of every migration's switchover: what was voted, what was decided.

Two-phase commit only rules out a forked or lost VF if a vote, a decision and a
resume survive a crash of the side that made them.  Each migration (each VM on
the source, for the one decision of all its devices) is one small file in
``state_dir`` (the unit's ``StateDirectory``, ``/var/lib/migd``): a log of its
versions, one checksummed JSON line each, the last one current.  The file is
created atomically (a temporary file, fsynced, renamed into place, the directory
fsynced); each later version is appended and fdatasynced, one flush, since three
of them fall inside the switchover's downtime.  A durable write returns only once it is
on disk, and nothing acts on a version before that: a last line that a crash cut
short (no newline) was never acted on and is cut off.  A file with no complete
line can only be one created without flushes (see :meth:`Journal.write`) that a
host crash left empty, and is removed.  Any other line that does not parse or
whose checksum does not match is damage from outside and stops the daemon at
start, naming the file (it must not start half recovered).  Records of
migrations that ended are kept for ``RETENTION`` so a peer that was down can
still ask how they ended, then pruned.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from .errors import ConfigError

log = logging.getLogger("migd.journal")

FORMAT = 1
#: How long the record of a migration that ended is kept (seconds).
RETENTION = 7 * 24 * 3600

# Record phases.  Source: active -> commit -> completed, or aborted.
# Destination: loading -> voted -> commit -> completed (resumed / loaded), or reset.
ACTIVE, COMMIT, COMPLETED, ABORTED = "active", "commit", "completed", "aborted"
LOADING, VOTED, RESET = "loading", "voted", "reset"
PHASES = {"source": (ACTIVE, COMMIT, COMPLETED, ABORTED),
          "destination": (LOADING, VOTED, COMMIT, COMPLETED, RESET),
          "group": (ACTIVE, COMMIT, ABORTED)}
OPEN = {"source": (ACTIVE, COMMIT), "destination": (LOADING, VOTED, COMMIT),
        # A VM's record holds its decision; it is kept while any of its devices' is open.
        "group": ()}


@dataclasses.dataclass
class Record:
    """One migration on one side (or, ``role == "group"``, one VM's decision)."""

    role: str
    id: str
    phase: str
    device: str = ""
    #: Source: the destination's address; destination: where the source listens.
    peer: list[str] = dataclasses.field(default_factory=list)
    #: The peer's identity key (hex): only it may resume or resolve this migration.
    peer_key: str = ""
    #: Source: the VM decision record this device's migration belongs to ("" if alone).
    group: str = ""
    #: Group: its members' migration ids.
    members: list[str] = dataclasses.field(default_factory=list)
    #: Destination: start the VF once committed (else leave it loaded and stopped).
    resume: bool = True
    #: Destination, after a stay-stopped commit: the VF has since been resumed.
    started: bool = False
    reason: str = ""
    updated: float = dataclasses.field(default_factory=time.time)

    @property
    def key(self) -> str:
        return f"{self.role}-{self.id}"

    @property
    def open(self) -> bool:
        return self.phase in OPEN[self.role]


def _body(rec: Record) -> dict[str, Any]:
    return dataclasses.asdict(rec)


def _checksum(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _safe_name(key: str) -> bool:
    return bool(key) and all(c.isalnum() or c in "-_" for c in key)


class Journal:
    """The records in one directory; every write is durable when it returns."""

    def __init__(self, directory: str) -> None:
        self.dir = directory
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            self._dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise ConfigError(f"state_dir {directory}: {exc.strerror}") from None
        self.records: dict[str, Record] = {}
        #: Records whose file was created without flushes: the first durable version
        #: also makes the file itself and its name durable.
        self._shaky: set[str] = set()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._dirfd)

    def _path(self, key: str) -> str:
        return os.path.join(self.dir, key + ".json")

    def load(self) -> list[Record]:
        """Every record, checked; a damaged one is a ConfigError naming its file."""
        self.records.clear()
        for name in sorted(os.listdir(self.dir)):
            path = os.path.join(self.dir, name)
            if name.endswith(".json.tmp"):
                os.unlink(path)  # never renamed into place: it was never written
                continue
            if not name.endswith(".json"):
                continue
            rec = self._read(path)
            if rec is None:
                # Created without flushes and cut short by a crash of the host: only
                # records whose loss changes nothing are written that way.
                log.warning("journal %s: removing a record a host crash left unwritten", path)
                os.unlink(path)
                continue
            if rec.key + ".json" != name:
                raise ConfigError(f"journal {path}: record {rec.key!r} in the wrong file")
            self.records[rec.key] = rec
        return list(self.records.values())

    @staticmethod
    def _read(path: str) -> Record | None:
        def bad(why: str) -> ConfigError:
            return ConfigError(f"journal {path} is damaged ({why}); migd will not start "
                               "half recovered: restore it, or move it away after checking "
                               "the device it names by hand")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise ConfigError(f"journal {path}: {exc.strerror}") from None
        lines = data.split(b"\n")
        complete = lines[:-1]  # a version is written only with its newline
        if not complete:
            return None
        rec = None
        for line in complete:
            rec = Journal._version(line, bad)
        if lines[-1]:
            # A version a crash cut short was never acted on: cut it off, so that the
            # next one is not appended to it.
            log.warning("journal %s: dropping a last version that a crash cut short", path)
            with open(path, "r+b") as torn:
                torn.truncate(len(data) - len(lines[-1]))
                os.fsync(torn.fileno())
        return rec

    @staticmethod
    def _version(line: bytes, bad: Callable[[str], ConfigError]) -> Record:
        try:
            raw = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            raise bad("not valid JSON: truncated or overwritten") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise bad("unknown format")
        body, checksum = raw.get("record"), raw.get("sha256")
        if not isinstance(body, dict) or checksum != _checksum(body):
            raise bad("checksum mismatch")
        names = {f.name for f in dataclasses.fields(Record)}
        if set(body) != names:
            raise bad("unexpected fields")
        try:
            rec = Record(**body)
        except TypeError:
            raise bad("unexpected fields") from None
        if rec.role not in PHASES or rec.phase not in PHASES[rec.role] or not _safe_name(rec.key):
            raise bad(f"role {rec.role!r} / phase {rec.phase!r}")
        return rec

    def write(self, rec: Record, durable: bool = True) -> None:
        """Write ``rec``'s new version: a new record's file is created atomically (file
        and directory fsynced), a known one's version appended (and fdatasynced).

        ``durable=False`` skips the flushes: the version survives a crash of the
        daemon (the page cache has it) but maybe not of the host.  That is enough
        where the host's crash takes the VF's state with it anyway, so a lost
        version changes nothing: that a migration started (source) or began loading
        (destination), that it ended or rolled back.  Votes and decisions are
        durable: the other host's VF may depend on them."""
        if not _safe_name(rec.key):
            raise ConfigError(f"journal: bad record key {rec.key!r}")
        rec.updated = time.time()
        body = _body(rec)
        line = json.dumps({"format": FORMAT, "record": body, "sha256": _checksum(body)},
                          sort_keys=True).encode() + b"\n"
        path = self._path(rec.key)
        if rec.key in self.records and os.path.exists(path):
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            try:
                size = os.fstat(fd).st_size
                try:
                    _write_all(fd, line)
                except OSError:
                    os.ftruncate(fd, size)  # no half version for the next to follow
                    raise
                if durable and rec.key in self._shaky:
                    os.fsync(fd)
                    os.fsync(self._dirfd)
                    self._shaky.discard(rec.key)
                elif durable:
                    os.fdatasync(fd)
            finally:
                os.close(fd)
        else:
            tmp = path + ".tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, line)
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            if durable:
                os.fsync(self._dirfd)
                self._shaky.discard(rec.key)
            else:
                self._shaky.add(rec.key)
        self.records[rec.key] = rec

    def get(self, role: str, mid: str) -> Record | None:
        return self.records.get(f"{role}-{mid}")

    def prune(self, now: float | None = None, retention: float = RETENTION) -> list[str]:
        """Forget migrations that ended more than ``retention`` seconds ago."""
        now = time.time() if now is None else now
        gone = []
        for key, rec in list(self.records.items()):
            if not rec.open and now - rec.updated > retention:
                if rec.role == "group" and any(
                        r.group == rec.id and r.open for r in self.records.values()):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._path(key))
                del self.records[key]
                gone.append(key)
        if gone:
            os.fsync(self._dirfd)
        return gone
