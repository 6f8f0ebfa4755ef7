"""One error tree for the whole daemon.

Every failure migd can report derives from :class:`MigdError`.  Errors that
cross the wire carry a stable numeric ``code`` (a class attribute) and a short
public ``message``; the peer rebuilds the matching class from the code alone, so
internals (paths, tracebacks, key material) never leave the host.

Each class registers its code when it is defined (``__init_subclass__``), and a
class without a code of its own, or with another's, is refused at import.
:class:`RemoteError` wraps a failure the peer reported to us, and
:class:`ControlError` one the daemon reported to a control client; neither is
ever sent to a peer.
"""

from __future__ import annotations

from typing import ClassVar

#: Every error class by its wire code (filled as the classes are defined).
ERRORS_BY_CODE: dict[int, type[MigdError]] = {}


class MigdError(Exception):
    """Root of every error migd raises on purpose."""

    code: ClassVar[int] = 1
    name: ClassVar[str] = "internal"

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.name)
        self.message = message or self.name

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "code" not in cls.__dict__:
            raise TypeError(f"error class {cls.__name__} needs a wire code of its own")
        taken = ERRORS_BY_CODE.get(cls.code)
        if taken is not None:
            raise TypeError(f"error class {cls.__name__}: code {cls.code} is "
                            f"{taken.__name__}'s already")
        ERRORS_BY_CODE[cls.code] = cls

    @classmethod
    def rebuild(cls, message: str) -> MigdError:
        """The error a peer's code and message stand for, on this side."""
        return cls(message)


ERRORS_BY_CODE[MigdError.code] = MigdError


# --- configuration and usage -------------------------------------------------


class ConfigError(MigdError):
    """Bad configuration, CLI argument or control request."""

    code = 2
    name = "bad-config"


class WrongState(MigdError):
    """A command or message that the migration's (or device's) phase does not allow."""

    code = 3
    name = "wrong-state"


class JournalFailed(MigdError):
    """A vote or a decision could not be made durable (it may be on disk anyway)."""

    code = 4
    name = "journal-failed"


class Busy(MigdError):
    """This host is at a limit it enforces (``max_migrations``, its queue, the
    buffer budget, unauthenticated connections): nothing was started; try later."""

    code = 5
    name = "busy"


# --- device / backend --------------------------------------------------------


class DeviceError(MigdError):
    """The device refused an operation or reported a failure."""

    code = 10
    name = "device-error"


class IllegalTransition(DeviceError):
    """A state machine was asked for an arc its table does not allow."""

    code = 11
    name = "illegal-transition"

    def __init__(self, role: str, state: str, event: str, detail: str = "") -> None:
        text = f"{role}: illegal transition from {state} on {event}"
        if detail:
            text += f" ({detail})"
        super().__init__(text)
        self.role = role
        self.state = state
        self.event = event

    @classmethod
    def rebuild(cls, message: str) -> MigdError:
        err = cls.__new__(cls)
        MigdError.__init__(err, message)
        err.role = err.state = err.event = ""
        return err


class NoDataNow(DeviceError):
    """PRE_COPY read with nothing queued: a temporary end, never end of stream."""

    code = 12
    name = "no-data-now"


class LentOut(DeviceError):
    """Every buffer the device saves into is lent and not yet released: release a
    lease and read again.  Never end of stream, and not "no data" either."""

    code = 17
    name = "lent-out"


class IncompatibleDevice(DeviceError):
    """The destination device cannot load state produced by the source device."""

    code = 13
    name = "incompatible-device"


class DeviceBusy(DeviceError):
    """The device would not do it now (a queue manager that does not pause)."""

    code = 14
    name = "device-busy"


class UnknownDevice(DeviceError):
    """No device of that name on this host."""

    code = 15
    name = "unknown-device"


# --- protocol ------------------------------------------------------------------


class ProtocolError(MigdError):
    """The peer sent something the protocol does not allow."""

    code = 20
    name = "protocol-error"


class VersionMismatch(ProtocolError):
    code = 21
    name = "version-mismatch"


class FrameTooLarge(ProtocolError):
    code = 22
    name = "frame-too-large"


class IntegrityError(ProtocolError):
    """Authentication tag, digest, ordering or replay check failed."""

    code = 23
    name = "integrity-error"


class DecompressionError(ProtocolError):
    """A chunk did not decompress to exactly its declared size (corrupt or a bomb)."""

    code = 24
    name = "decompression-error"


class OverAnnounced(ProtocolError):
    """The peer sent more state than it announced."""

    code = 25
    name = "over-announced"


class IncompleteStream(ProtocolError):
    """The stream ended without a valid end-of-stream record."""

    code = 26
    name = "incomplete-stream"


class RemoteAccessError(ProtocolError):
    """A one-sided write outside a registered region, with a wrong key, or past
    the credits the receiver posted (RDMA-like transport)."""

    code = 28
    name = "remote-access"


class NegotiationError(ProtocolError):
    """No common cipher or compression, or an unsupported option."""

    code = 27
    name = "negotiation-failed"


# --- authentication --------------------------------------------------------------


class AuthError(MigdError):
    """The peer could not prove an authorized identity."""

    code = 30
    name = "auth-failed"


class UnknownPeer(AuthError):
    code = 31
    name = "unknown-peer"


class BadSignature(AuthError):
    code = 32
    name = "bad-signature"


# --- session -------------------------------------------------------------------


class TransportError(MigdError):
    """The connection failed underneath the protocol."""

    code = 40
    name = "transport-error"


class LinkLost(TransportError):
    """The connection broke (reset, closed, cut mid-frame): a resumable failure
    before the vote, a reason to ask the peer after it."""

    code = 43
    name = "link-lost"


class Cancelled(MigdError):
    code = 41
    name = "cancelled"


class MigrationTimeout(MigdError):
    code = 42
    name = "timeout"


class HandshakeTimeout(MigrationTimeout):
    """A peer did not prove its identity and say what it wants in time, however
    its bytes trickled in (``handshake_timeout``)."""

    code = 44
    name = "handshake-timeout"


class RemoteError(MigdError):
    """The peer reported a failure; ``remote`` is the peer's error class."""

    code = 50
    name = "remote-error"

    def __init__(self, remote: MigdError) -> None:
        super().__init__(f"peer reported {remote.name}: {remote.message}")
        self.remote = remote

    @classmethod
    def rebuild(cls, message: str) -> MigdError:
        return MigdError(message)  # never sent: a peer relays what it saw as its own


class ControlError(MigdError):
    """The daemon refused a control request (its class and description)."""

    code = 60
    name = "control-error"

    def __init__(self, cls: str, desc: str) -> None:
        super().__init__(f"{cls}: {desc}")
        self.error_class = cls
        self.desc = desc

    @classmethod
    def rebuild(cls, message: str) -> MigdError:
        return MigdError(message)  # a control client's, never a peer's


def from_wire(code: int, message: str) -> RemoteError:
    """Rebuild a peer's error from its wire code; unknown codes map to the root."""
    cls = ERRORS_BY_CODE.get(code, MigdError)
    return RemoteError(cls.rebuild(message[:500]))


def to_wire(err: BaseException) -> tuple[int, str]:
    """What the peer may see of ``err``: a code and a public message."""
    if isinstance(err, MigdError) and not isinstance(err, RemoteError):
        return err.code, err.message[:500]
    return MigdError.code, "internal error"
