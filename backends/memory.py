"""Device-internal state memory for the emulated devices, outside the daemon's heap.

The memory is a mapped file: a ``/dev/shm`` file unlinked at once, or a private
copy-on-write mapping of a state image (the user's file is never written), so a
4 GiB device costs the daemon no heap.  A guest thread writes it at a
configured rate while the device runs, with page-granular dirty tracking, so
pre-copy has real dirty data to chase.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import random
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Mapping

from migd.errors import ConfigError
from migd.units import parse_size

PAGE = 4096
# <linux/mman.h>, Linux >= 5.14; older kernels answer EINVAL and we fault lazily.
_MADV_POPULATE_READ = 22
_MADV_POPULATE_WRITE = 23

#: The options every memory-backed device understands.
MEMORY_OPTIONS = frozenset({"size", "state-file", "dirty-rate", "seed", "content", "prefault",
                            "dir", "state-copy"})


def check_options(name: str, kind: str, options: Mapping[str, str], own: set[str]) -> None:
    known = MEMORY_OPTIONS | own
    unknown = set(options) - known
    if unknown:
        raise ConfigError(
            f"device {name}: unknown {kind} option(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join(sorted(known))}"
        )


def fill_mixed(mv: memoryview, seed: int) -> None:
    """Fill device memory with the benchmark page mix: runs of 1..64 pages,
    ~35% zero, 25% structured records, 20% text log lines, 20% random."""
    rng = random.Random(seed)
    pages = len(mv) // PAGE
    rec = struct.Struct("<IHHQIIQII24x")
    done = 0
    seq = rng.getrandbits(20)
    while done < pages:
        kind = rng.choices(("zero", "struct", "text", "random"), (35, 25, 20, 20))[0]
        n = min(rng.randint(1, 64), pages - done)
        off = done * PAGE
        if kind == "random":
            mv[off : off + n * PAGE] = rng.randbytes(n * PAGE)
        elif kind == "struct":
            page = bytearray(PAGE)
            hi = (0x7F00 | rng.getrandbits(8)) << 32
            for i in range(PAGE // rec.size):
                seq += 1
                rec.pack_into(page, i * rec.size, seq & 0xFFFFFFFF, rng.randrange(16),
                              rng.choice((1, 3, 0x11, 0x81)), hi | rng.getrandbits(20) << 12,
                              rng.choice((512, 4096, 65536)), 0, rng.getrandbits(40), i, 1)
            for p in range(n):
                struct.pack_into("<I", page, 0, (seq + p) & 0xFFFFFFFF)
                mv[off + p * PAGE : off + (p + 1) * PAGE] = page
        elif kind == "text":
            lines = []
            size = 0
            while size < PAGE:
                line = (f"ts={rng.random() * 1e9:.6f} lvl=INFO dev=vf{rng.randrange(8)} "
                        f"q={rng.randrange(64)} op=WRITE lba=0x{rng.getrandbits(32):x} "
                        f"lat_us={rng.randrange(900)} status=OK\n")
                lines.append(line)
                size += len(line)
            page = bytearray("".join(lines).encode()[:PAGE])
            for p in range(n):
                rot = (p * 61) % PAGE
                mv[off + p * PAGE : off + (p + 1) * PAGE] = page[rot:] + page[:rot]
        done += n


class Ticker:
    """Something an emulated device does on its own every ``period`` seconds while
    it runs (a guest's writes, queue traffic).  ``stop`` quiesces: when it
    returns, ``tick`` is not running and will not run again until ``start``."""

    def __init__(self, name: str, period: float, tick: Callable[[], None]) -> None:
        self._name = name
        self._period = period
        self._tick = tick
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            self._tick()


class _Workload:
    """The guest: dirties pages at ``rate`` bytes/s while the device runs."""

    TICK = 0.002

    def __init__(self, dev: DeviceMemory, rate: int, seed: int) -> None:
        self._dev = dev
        self._rate = rate
        self._rng = random.Random(seed ^ 0x5EED)
        self._per_tick = max(1, int(rate * self.TICK) // PAGE)
        self._stamp = bytearray(64)
        self._ticker = Ticker(f"guest-{dev.name}", self.TICK, self._tick)
        self.pages_written = 0

    def start(self) -> None:
        if self._rate > 0:
            self._ticker.start()

    def stop(self) -> None:
        """Quiesce: when this returns the guest writes nothing more."""
        self._ticker.stop()

    def _tick(self) -> None:
        for _ in range(self._per_tick):
            page = self._rng.randrange(self._dev.pages)
            self.pages_written += 1
            struct.pack_into("<QQ", self._stamp, 0, self.pages_written, time.monotonic_ns())
            off = page * PAGE + self._rng.randrange(PAGE // 64) * 64
            self._dev.guest_write(off, self._stamp)


class DeviceMemory:
    """``dir``: the memory is ``DIR/NAME.mem`` and outlives the daemon, as a VF's
    memory outlives the process that drives it: a restarted daemon maps the same
    file and finds the state as it was (a stopped source VF still holds its state).
    The file is locked while mapped, so two daemons cannot drive one VF."""

    def __init__(self, name: str, options: Mapping[str, str], default_size: str = "64M") -> None:
        self.name = name
        self._seed = int(options.get("seed", "42"))
        self._lock_fd = -1
        #: Whether the memory was there already (a daemon restart): nothing is filled.
        self.found = False
        state_file = options.get("state-file")
        if options.get("state-copy", "no") not in ("yes", "no"):
            raise ConfigError(f"device {name}: state-copy must be yes or no")
        keep = options.get("dir")
        copy_from = state_file if options.get("state-copy") == "yes" or keep else None
        if copy_from:
            # Device memory of its own, filled from the image: it can also receive
            # migrations without its writes becoming the daemon's private pages.
            try:
                options = dict(options, size=str(os.path.getsize(copy_from)), content="zero")
            except OSError as exc:
                raise ConfigError(f"device {name}: state-file {copy_from}: {exc.strerror}") from None
            state_file = None
        if state_file:
            self._map, size = self._map_image(name, state_file)
        else:
            self._map, size = self._map_own(name, options, default_size, keep)
        if options.get("prefault", "yes") not in ("yes", "no"):
            raise ConfigError(f"device {name}: prefault must be yes or no")
        if options.get("prefault", "yes") == "yes":
            # Device memory exists before a migration touches it: fault it in now,
            # so first-touch page faults are not billed to the migration.
            with contextlib.suppress(OSError):
                self._map.madvise(_MADV_POPULATE_READ if state_file else _MADV_POPULATE_WRITE)
        self.mv = memoryview(self._map)
        self.size = size
        self.pages = size // PAGE
        content = options.get("content", "mixed")
        if content not in ("zero", "mixed"):
            raise ConfigError(f"device {name}: content must be mixed or zero")
        if self.found:
            pass  # the state a previous daemon left: keep it
        elif copy_from:
            with open(copy_from, "rb") as f:
                f.readinto(self.mv)
        elif not state_file and content == "mixed":
            fill_mixed(self.mv, self._seed)
        self._dirty = bytearray(self.pages)
        self.dirty_count = 0
        self._track = False
        #: Taken by the guest for each write and by whoever snapshots dirty pages.
        self.lock = threading.Lock()
        self._running = True
        self._workload = _Workload(self, parse_size(options.get("dirty-rate", "0"), "dirty-rate"),
                                   self._seed)
        self._workload.start()

    @staticmethod
    def _map_image(name: str, path: str) -> tuple[mmap.mmap, int]:
        """An image mapped copy-on-write: the device's memory, never written back."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise ConfigError(f"device {name}: state-file {path}: {exc.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size == 0 or size % PAGE:
                raise ConfigError(f"device {name}: state-file size {size} is not a multiple of "
                                  f"{PAGE}")
            return mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE,
                             prot=mmap.PROT_READ | mmap.PROT_WRITE), size
        finally:
            os.close(fd)

    def _map_own(self, name: str, options: Mapping[str, str], default_size: str,
                 keep: str | None) -> tuple[mmap.mmap, int]:
        """Memory of its own: anonymous, or kept in ``keep`` for a restarted daemon."""
        size = parse_size(options.get("size", default_size), f"device {name}: size")
        if size == 0 or size % PAGE:
            raise ConfigError(f"device {name}: size must be a positive multiple of {PAGE}")
        fd = self._open_kept(name, keep, size) if keep else self._open_anonymous(name)
        try:
            if not self.found:
                os.ftruncate(fd, size)
            return mmap.mmap(fd, size, flags=mmap.MAP_SHARED), size
        finally:
            if not keep:
                os.close(fd)

    @staticmethod
    def _open_anonymous(name: str) -> int:
        where = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, tmp = tempfile.mkstemp(prefix=f"migd-{name}-", dir=where)
        os.unlink(tmp)
        return fd

    def _open_kept(self, name: str, directory: str, size: int) -> int:
        path = os.path.join(directory, f"{name}.mem")
        try:
            os.makedirs(directory, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigError(f"device {name}: {path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ConfigError(f"device {name}: {path} is in use by another process "
                              "(another migd drives this VF)") from None
        have = os.fstat(fd).st_size
        if have not in (0, size):
            os.close(fd)
            raise ConfigError(f"device {name}: {path} holds {have} bytes of device memory, "
                              f"the device is configured with {size}")
        self.found = have == size
        self._lock_fd = fd
        return fd

    # --- the guest ---------------------------------------------------------------

    def guest_write(self, off: int, data: bytes | bytearray) -> None:
        """A write by the guest: data first, then the dirty bit."""
        with self.lock:
            if not self._running:
                return
            self.mv[off : off + len(data)] = data
            if self._track:
                p = off // PAGE
                if not self._dirty[p]:
                    self._dirty[p] = 1
                    self.dirty_count += 1

    @property
    def guest_pages_written(self) -> int:
        return self._workload.pages_written

    def set_running(self, running: bool) -> None:
        """Whether the device (and so its guest) may change state.  Stopping
        quiesces: when it returns the guest writes nothing more."""
        if running == self._running:
            return
        if running:
            self._running = True
            self._workload.start()
        else:
            self._workload.stop()
            with self.lock:
                self._running = False

    # --- dirty tracking ------------------------------------------------------------

    def start_tracking(self) -> None:
        with self.lock:
            self._dirty[:] = bytes(self.pages)
            self.dirty_count = 0
            self._track = True

    def stop_tracking(self) -> None:
        with self.lock:
            self._track = False

    def take_dirty(self, max_run: int) -> list[tuple[int, int]]:
        """Every dirty page as coalesced (offset, length) runs of at most
        ``max_run`` bytes; their bits are cleared."""
        runs: list[tuple[int, int]] = []
        with self.lock:
            if not self.dirty_count:
                return runs
            dirty = self._dirty
            p = dirty.find(1)
            while p != -1:
                end = dirty.find(0, p)
                if end == -1:
                    end = self.pages
                end = min(end, p + max_run // PAGE)
                runs.append((p * PAGE, (end - p) * PAGE))
                dirty[p:end] = bytes(end - p)
                p = dirty.find(1, end)
            self.dirty_count = 0
        return runs

    # --- whole-memory operations ----------------------------------------------------------

    def wipe(self) -> None:
        with self.lock:
            zeros = bytes(8 << 20)
            for off in range(0, self.size, len(zeros)):
                n = min(len(zeros), self.size - off)
                self.mv[off : off + n] = zeros[:n]

    def digest(self) -> str:
        with self.lock:
            h = hashlib.sha256()
            for off in range(0, self.size, 8 << 20):
                h.update(self.mv[off : off + (8 << 20)])
            return h.hexdigest()

    def dump(self, path: str) -> None:
        with self.lock, open(path, "wb") as f:
            f.write(self.mv)

    def close(self) -> None:
        self._workload.stop()
        self.mv.release()
        # A view lent to the data path may still be referenced somewhere (a frame kept
        # by a traceback, say): then the mapping goes with the last view, not under it.
        with contextlib.suppress(BufferError):
            self._map.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
