"""Logging to the systemd journal natively, with fields an operator can select on.

Under systemd (``$JOURNAL_STREAM`` names our stderr) every record goes to the
journal's socket as one datagram of the native protocol, carrying besides the
message: ``PRIORITY``, ``SYSLOG_IDENTIFIER=migd``, the code location, and for
anything logged while a migration runs ``MIGD_MIGRATION_ID``, ``MIGD_DEVICE`` and
``MIGD_PEER``, so ``journalctl MIGD_MIGRATION_ID=ID`` finds one migration.  Its
start and its end carry a stable ``MESSAGE_ID`` (``journalctl MESSAGE_ID=...``).
Elsewhere migd logs plain lines to stderr, as before.

The migration a record belongs to comes from a context variable that the
migration's task sets: tasks it starts inherit it, so no log call has to say.
"""

from __future__ import annotations

import contextvars
import logging
import os
import socket
import struct
from typing import Any

SOCKET = "/run/systemd/journal/socket"
#: The migration the running task works for (a ``migd.session.Job``).
CURRENT: contextvars.ContextVar[Any] = contextvars.ContextVar("migd_job", default=None)

#: Stable ids of the events an operator looks for (``journalctl MESSAGE_ID=...``).
MESSAGE_IDS = {
    "started": "4b0f4a3e8d2c4c1f9a7e6d5c3b2a1908",
    "completed": "9d3c2b1a0f8e4d7c6b5a493827160504",
    "failed": "e1d2c3b4a5968778695a4b3c2d1e0f10",
    "cancelled": "5a6b7c8d9e0f41526374859607182930",
    "unresolved": "c0ffee0ddba11a5e4b5e55ed0f1c3a7e",
}
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


def event(name: str, job: Any = None) -> dict[str, Any]:
    """``extra=`` for a log call that is one of the named events (of ``job``, when
    it may be logged from outside the migration's own task)."""
    fields = {"MESSAGE_ID": MESSAGE_IDS[name]}
    if job is not None:
        fields["MIGD_MIGRATION_ID"] = str(job.id)
        fields.update({k: str(v) for k, v in (("MIGD_DEVICE", job.device),
                                               ("MIGD_PEER", job.peer)) if v})
    return {"journal": fields}


def under_journal(environ: dict[str, str] | None = None, fd: int = 2) -> bool:
    """Whether ``fd`` is the stream systemd connected to the journal."""
    env = os.environ if environ is None else environ
    dev, _, ino = env.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(fd)
        return bool(dev) and (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


def _field(name: str, value: str) -> bytes:
    data = value.encode("utf-8", "replace")
    if b"\n" not in data:
        return name.encode() + b"=" + data + b"\n"
    return name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"


class JournalHandler(logging.Handler):
    def __init__(self, path: str | None = None) -> None:
        super().__init__()
        self.path = path or os.environ.get("MIGD_JOURNAL_SOCKET", SOCKET)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def fields(self, record: logging.LogRecord) -> dict[str, str]:
        out = {"MESSAGE": self.format(record),
               "PRIORITY": str(_PRIORITY.get(record.levelno, 6)),
               "SYSLOG_IDENTIFIER": "migd", "MIGD_LOGGER": record.name,
               "CODE_FILE": record.pathname, "CODE_LINE": str(record.lineno),
               "CODE_FUNC": record.funcName}
        job = CURRENT.get()
        if job is not None:
            out["MIGD_MIGRATION_ID"] = str(job.id)
            if job.device:
                out["MIGD_DEVICE"] = str(job.device)
            if job.peer:
                out["MIGD_PEER"] = str(job.peer)
        out.update(getattr(record, "journal", {}))
        return out

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = b"".join(_field(k, v) for k, v in self.fields(record).items())
            self._sock.sendto(data, self.path)
        except OSError:
            # The journal is gone or the datagram too big: the line must not be lost.
            logging.StreamHandler().emit(record)
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self._sock.close()
        super().close()


def setup(level: str) -> None:
    """The daemon's logging: the journal natively under systemd, else plain lines."""
    if under_journal():
        handler: logging.Handler = JournalHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logging.basicConfig(level=level.upper(), handlers=[handler])
    else:
        logging.basicConfig(level=level.upper(),
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
