"""The interface every device kind implements, and the backend registry.

A backend is the host-side driver of one VF's migration state.  Its surface is
the kernel uAPI's, not a convenience API: ``set_state`` walks the arcs of the
VFIO FSM, saving reads distinguish "no data for now" (:class:`NoDataNow`) from
end of stream (a 0 return in STOP_COPY), and resuming writes may be short.
That keeps the session code identical for simulated and real devices.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from migd.errors import ConfigError, DeviceError, IllegalTransition

from .states import DATA_FD_ARCS, DeviceState, MigCap, path


def gather(views: list[memoryview], into: memoryview) -> int:
    """Copy ``views`` one after another into ``into``; the bytes copied."""
    n = 0
    for v in views:
        into[n : n + len(v)] = v
        n += len(v)
    return n


class Lease:
    """Saving data lent by a device (:meth:`Device.lend`): ``views`` of memory the
    device keeps, valid until :meth:`release`.  A device that reuses that memory for
    the data after (mlx5's host buffers) takes it back only once every lease on it
    is released; one whose memory stays (sim's) has nothing to take back."""

    __slots__ = ("_release", "views")

    def __init__(self, views: list[memoryview], release: Callable[[], None] | None = None
                 ) -> None:
        self.views = views
        self._release = release

    @property
    def held(self) -> bool:
        """Whether releasing gives the device anything back."""
        return self._release is not None

    def release(self) -> None:
        """Give the views back (idempotent).  Safe from any thread, never blocks on
        the device's I/O."""
        release, self._release = self._release, None
        if release is not None:
            release()


@dataclasses.dataclass(frozen=True)
class PrecopyInfo:
    initial_bytes: int
    dirty_bytes: int


class Device(abc.ABC):
    """One migratable VF as the host driver sees it.

    Subclasses implement the per-arc hooks (``_arc``) and the data path; the
    walking of arcs, the rules for when a data stream exists, and recovery after
    a failed arc live here, once.
    """

    kind: ClassVar[str] = "?"
    #: Whether read_into/write may block (a real data_fd) or are plain memory
    #: copies (simulated device memory); the pipeline runs the latter inline.
    blocking_io: ClassVar[bool] = True
    #: Whether the device lends its own memory for the data path (:meth:`read_views`,
    #: :meth:`sink`), so the pipeline seals from it and opens into it without a copy.
    #: A real data_fd can only be read and written.
    lends_memory: ClassVar[bool] = False
    #: Whether saving data can be lent (:meth:`lend`) instead of copied out.
    lends_saved: ClassVar[bool] = False

    def __init__(self, name: str, caps: MigCap) -> None:
        self.name = name
        self.caps = caps
        self._state = DeviceState.RUNNING
        self._lock = threading.RLock()
        #: Every arc walked, for tests and logs: (from, to).
        self.arc_log: list[tuple[DeviceState, DeviceState]] = []
        #: Test hook: called before each arc; raising simulates a driver failure midway.
        self.fail_hook: Callable[[DeviceState, DeviceState], None] | None = None
        #: Where an emulated device keeps its FSM state so that a restarted daemon
        #: finds it as it was (hardware outlives the process that drives it).
        self._state_file: str | None = None
        #: Whether this device was found again in the state a previous daemon left.
        self.restored = False

    # --- state machine -------------------------------------------------------

    @property
    def state(self) -> DeviceState:
        return self._state

    def set_state(self, target: DeviceState) -> bool:
        """Walk to ``target`` one arc at a time; True if a new data stream opened.

        A failure midway leaves the device on the path (like the kernel); the
        caller reads :attr:`state` and calls :meth:`reset` when it is ERROR.
        """
        with self._lock:
            opened = False
            for nxt in path(self._state, target, self.caps):
                cur = self._state
                if self.fail_hook is not None:
                    try:
                        self.fail_hook(cur, nxt)
                    except Exception as exc:
                        self._state = self._state_after_failure(cur, nxt)
                        raise DeviceError(
                            f"{self.name}: arc {cur.name}->{nxt.name} failed: {exc}"
                        ) from exc
                try:
                    self._arc(cur, nxt)
                except DeviceError:
                    self._state = self._state_after_failure(cur, nxt)
                    raise
                self._state = nxt
                self._save_state()
                self.arc_log.append((cur, nxt))
                opened = opened or (cur, nxt) in DATA_FD_ARCS
            return opened

    def reset(self) -> None:
        """VFIO_DEVICE_RESET: back to RUNNING, discarding any migration data."""
        with self._lock:
            self._reset()
            self._state = DeviceState.RUNNING
            self._save_state()

    # --- surviving the daemon (emulated devices with a ``dir``) -------------------------

    def _keep_state_in(self, directory: str) -> None:
        """Keep the FSM state in ``directory`` and take up what is there already."""
        self._state_file = os.path.join(directory, f"{self.name}.state")
        try:
            with open(self._state_file, encoding="utf-8") as f:
                saved = json.load(f)
            state = DeviceState[saved["state"]]
            extra = saved.get("extra", {})
            if not isinstance(extra, dict):
                raise TypeError("extra")
        except FileNotFoundError:
            self._save_state()
            return
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise ConfigError(f"device {self.name}: {self._state_file} is damaged; move it away "
                              "to start the VF afresh (RUNNING)") from None
        self._state = state
        self._restore(state, extra)
        self.restored = True

    def _save_state(self) -> None:
        if self._state_file is None:
            return
        tmp = self._state_file + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"state": self._state.name, "extra": self._saved_extra()}, f)
        os.replace(tmp, self._state_file)

    def _saved_extra(self) -> dict[str, Any]:
        """What else a restarted daemon needs to know of the device (e.g. 'loading')."""
        return {}

    def _restore(self, state: DeviceState, extra: dict[str, Any]) -> None:  # noqa: B027
        """Put the device model back into ``state`` after a daemon restart."""

    def recover(self) -> None:
        """Put a device that failed a migration back to RUNNING, whatever it went through."""
        with self._lock:
            if self._state == DeviceState.ERROR:
                self.reset()
                return
            try:
                self.set_state(DeviceState.RUNNING)
            except (DeviceError, IllegalTransition):
                self.reset()

    def _require(self, *states: DeviceState, op: str) -> None:
        if self._state not in states:
            raise IllegalTransition("device " + self.name, self._state.name, op)

    # --- hooks ---------------------------------------------------------------

    @abc.abstractmethod
    def _arc(self, cur: DeviceState, nxt: DeviceState) -> None:
        """Perform one FSM arc on the hardware; raise DeviceError on failure."""

    @abc.abstractmethod
    def _reset(self) -> None: ...

    def _state_after_failure(self, cur: DeviceState, nxt: DeviceState) -> DeviceState:
        """Where a failed arc left the device.  The kernel drivers (mlx5, hisi) move
        their state only once an arc succeeded, so an emulated one stays where it
        was; a real one is asked (GET), as the kernel documentation says."""
        return cur

    # --- data path -----------------------------------------------------------

    @abc.abstractmethod
    def read_into(self, buf: memoryview) -> int:
        """Read saving data into ``buf``.

        Returns the bytes read; 0 means end of stream in STOP_COPY.  In PRE_COPY
        states "nothing queued right now" is either :class:`NoDataNow` (mlx5's
        ENOMSG, EAGAIN) or a 0 return (hisi): callers treat both as temporary.
        """

    def read_views(self, limit: int) -> list[memoryview] | None:
        """The next saving data (up to ``limit`` bytes, the same stream as
        :meth:`read_into`) as views of memory the device keeps; None unless
        :attr:`lends_memory`.

        Copying device memory into a buffer costs as much as encrypting it.  The
        views stay valid while the device exists; while the device runs its guest
        may still change those bytes, and dirty tracking sends such pages again, as
        it would after a copy.
        """
        return None

    def lend(self, limit: int) -> Lease:
        """The next saving data (up to ``limit`` bytes, the same stream as
        :meth:`read_into`) lent rather than copied (only if :attr:`lends_saved`).

        An empty lease is what a 0-byte read is.  A device whose memory is all lent
        out raises :class:`~migd.errors.LentOut`: the caller releases leases (or
        waits for them to be released) and asks again; that is never the end."""
        views = self.read_views(limit)
        if views is None:
            raise DeviceError(f"{self.name}: a {self.kind} device does not lend saved data")
        return Lease(views)

    @abc.abstractmethod
    def write(self, data: memoryview) -> int:
        """Feed resuming data; returns how much was consumed (may be short)."""

    def sink(self, limit: int) -> memoryview:
        """Where the next 1..``limit`` resuming bytes go, for the caller to fill in
        place and then commit with :meth:`sunk` (only if :attr:`lends_memory`).

        The caller may fill it with bytes not yet authenticated: the device is in
        RESUMING, and a migration that fails resets it before it could run them.
        """
        raise DeviceError(f"{self.name}: a {self.kind} device does not lend its memory")

    def sunk(self, n: int) -> None:
        """The first ``n`` bytes of what :meth:`sink` lent are filled: take them."""
        raise DeviceError(f"{self.name}: a {self.kind} device does not lend its memory")

    @abc.abstractmethod
    def precopy_info(self) -> PrecopyInfo:
        """VFIO_MIG_GET_PRECOPY_INFO; only valid in PRE_COPY states."""

    @abc.abstractmethod
    def stop_copy_size(self) -> int:
        """MIG_DATA_SIZE: estimated bytes STOP_COPY will produce."""

    @abc.abstractmethod
    def state_size(self) -> int:
        """Size of the device's state in bytes (what operators call 'total')."""

    @abc.abstractmethod
    def compat(self) -> dict[str, Any]:
        """Data a destination needs to decide whether it can load our state."""

    @abc.abstractmethod
    def check_compat(self, source: Mapping[str, Any]) -> None:
        """Raise IncompatibleDevice if we cannot load a stream from ``source``."""

    @abc.abstractmethod
    def digest(self) -> str:
        """Hex SHA-256 of the device's current state, for end-to-end verification."""

    def close(self) -> None:  # noqa: B027  (optional hook: most devices hold nothing)
        """Release host resources (mappings, threads)."""

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "state": self._state.name,
            "caps": [c.name for c in MigCap if c & self.caps],
            "state_size": self.state_size(),
        }


Factory = Callable[[str, Mapping[str, str]], Device]


class BackendRegistry:
    """Named device kinds: a new kind is one module calling :meth:`register`."""

    default = "sim"

    def __init__(self) -> None:
        self._factories: dict[str, Factory] = {}

    def register(self, kind: str, factory: Factory) -> None:
        self._factories[kind] = factory

    def names(self) -> list[str]:
        return sorted(self._factories)

    def create(self, kind: str, name: str, options: Mapping[str, str]) -> Device:
        try:
            factory = self._factories[kind]
        except KeyError:
            raise ConfigError(
                f"unknown backend {kind!r} for device {name!r}; supported: {', '.join(self.names())}"
            ) from None
        return factory(name, options)


REGISTRY = BackendRegistry()
