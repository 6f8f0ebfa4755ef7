"""``mlx5``: a VF whose state moves only by PF admin commands, like ConnectX VFs.

Two components, as on a real host:

* :class:`Mlx5Firmware` is the PF's firmware: its own thread serving an admin
  command queue (SUSPEND/RESUME/QUERY/SAVE/LOAD_VHCA), owning each VF's internal
  state (by ``vhca_id``), and "DMAing" state only into host buffers registered
  with it (mkeys), under the PF's identity.  Commands or DMA requested with a
  VF's identity - what a guest could reach - are refused.
* :class:`Mlx5Device` is the host driver (mlx5_vfio_pci): it maps FSM arcs to
  admin commands and frames the saved images for the data stream the way the
  driver does: 16-byte little-endian records ``{u64 size; u32 flags; u32 tag}``,
  STOP_COPY_SIZE first, then FW_DATA chunks of at most 8 MiB, at most two saved
  ahead of the reader.  Pre-copy dirty state is fetched only when pre-copy info
  is asked for after the reader drained the stream; an empty PRE_COPY read is
  ENOMSG ("no data for now").

The firmware image inside FW_DATA is the firmware's own business (segments of
``{u64 offset; u32 length; u32 reserved}`` + bytes here); the driver never
parses it, the loading firmware validates it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import errno
import queue
import struct
import threading
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from migd.errors import ConfigError, DeviceError, IncompatibleDevice, NoDataNow

from .base import REGISTRY, Device, PrecopyInfo
from .memory import PAGE, DeviceMemory, check_options
from .states import PRECOPY_STATES, SAVING_STATES, DeviceState, MigCap

# mlx5_ifc.h opcodes and op_mods
SUSPEND_VHCA = 0x115
RESUME_VHCA = 0x116
QUERY_VHCA_MIGRATION_STATE = 0x117
SAVE_VHCA_STATE = 0x118
LOAD_VHCA_STATE = 0x119
SUSPEND_INITIATOR, SUSPEND_RESPONDER = 0, 1
RESUME_RESPONDER, RESUME_INITIATOR = 0, 1

# driver stream framing
REC = struct.Struct("<QII")
REC_OPTIONAL = 1
TAG_FW_DATA = 0
TAG_STOP_COPY_SIZE = 1
CHUNK = 8 << 20
READ_AHEAD = 2
#: The largest record a loader takes: LOAD_VHCA_STATE's size field is 32 bits (a
#: device not in chunk mode sends its whole image as one record).
MAX_LOAD_SIZE = (1 << 32) - 1

SEG = struct.Struct("<QII")
PF = -1  # requester id of the PF itself; VFs are their vhca_id


class AdminError(DeviceError):
    """The firmware refused a command (syndrome = errno here)."""

    def __init__(self, err: int, text: str) -> None:
        super().__init__(f"{errno.errorcode.get(err, err)}: {text}")
        self.errno = err


@dataclasses.dataclass
class _Vf:
    mem: DeviceMemory
    initiator_suspended: bool = False
    responder_suspended: bool = False
    tracking: bool = False
    #: A QUERY asked for cleanup: the next full SAVE without tracking ends the
    #: tracking session instead of saving (the driver's "pre_copy cleanup").
    cleanup: bool = False
    #: The image being saved: segments still to emit, as (offset, length) runs.
    pending: collections.deque[tuple[int, int]] = dataclasses.field(
        default_factory=collections.deque)
    pending_bytes: int = 0


class Mlx5Firmware:
    """One PF's firmware: serves admin commands from its queue on its own thread."""

    _pfs: ClassVar[dict[str, Mlx5Firmware]] = {}
    _pfs_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, name: str) -> None:
        self.name = name
        self._vfs: dict[int, _Vf] = {}
        self._mkeys: dict[int, tuple[int, memoryview]] = {}
        self._next_mkey = 0x100
        self._q: queue.Queue[tuple[int, int, dict[str, Any], concurrent.futures.Future[Any]] | None]
        self._q = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name=f"fw-{name}", daemon=True)
        self._thread.start()
        self.commands: list[tuple[int, int, int]] = []  # (requester, opcode, op_mod) for tests

    @classmethod
    def get(cls, name: str) -> Mlx5Firmware:
        with cls._pfs_lock:
            fw = cls._pfs.get(name)
            if fw is None:
                fw = cls._pfs[name] = cls(name)
            return fw

    def create_vf(self, vhca_id: int, mem: DeviceMemory) -> None:
        if vhca_id in self._vfs:
            raise ConfigError(f"PF {self.name} already has a VF with vhca_id {vhca_id}")
        self._vfs[vhca_id] = _Vf(mem)

    def destroy_vf(self, vhca_id: int) -> None:
        self._vfs.pop(vhca_id, None)
        if not self._vfs:
            with self._pfs_lock:
                if self._pfs.get(self.name) is self:
                    del self._pfs[self.name]
            self._q.put(None)

    # --- the host side of the PF: buffers and the admin queue ---------------------------

    def register_mkey(self, requester: int, buf: bytearray) -> int:
        """Register a host buffer for firmware DMA, owned by ``requester``."""
        self._next_mkey += 1
        self._mkeys[self._next_mkey] = (requester, memoryview(buf))
        return self._next_mkey

    def unregister_mkey(self, mkey: int) -> None:
        entry = self._mkeys.pop(mkey, None)
        if entry is not None:
            entry[1].release()

    def submit(self, requester: int, opcode: int, **args: Any) -> concurrent.futures.Future[Any]:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._q.put((requester, opcode, args, fut))
        return fut

    def call(self, requester: int, opcode: int, **args: Any) -> Any:
        return self.submit(requester, opcode, **args).result(timeout=30)

    # --- DMA, as the firmware does it -----------------------------------------------------

    def dma(self, requester: int, mkey: int) -> memoryview:
        """The buffer behind ``mkey``, if ``requester`` may use it: only its owner can."""
        entry = self._mkeys.get(mkey)
        if entry is None:
            raise AdminError(errno.EINVAL, f"mkey {mkey:#x} is not registered")
        owner, buf = entry
        if owner != requester:
            raise AdminError(errno.EPERM, f"mkey {mkey:#x} belongs to another function")
        return buf

    # --- the firmware thread ----------------------------------------------------------------

    def _serve(self) -> None:
        while (item := self._q.get()) is not None:
            requester, opcode, args, fut = item
            try:
                fut.set_result(self._execute(requester, opcode, args))
            except BaseException as exc:
                fut.set_exception(exc)

    def _execute(self, requester: int, opcode: int, args: dict[str, Any]) -> Any:
        self.commands.append((requester, opcode, int(args.get("op_mod", 0))))
        if requester != PF:
            raise AdminError(errno.EPERM, f"admin command {opcode:#x} from VF {requester}: "
                                          "only the PF may issue migration commands")
        vf = self._vfs.get(int(args["vhca_id"]))
        if vf is None:
            raise AdminError(errno.ENODEV, f"no VF with vhca_id {args['vhca_id']}")
        handler: Callable[[_Vf, dict[str, Any]], Any] = {
            SUSPEND_VHCA: self._suspend, RESUME_VHCA: self._resume,
            QUERY_VHCA_MIGRATION_STATE: self._query, SAVE_VHCA_STATE: self._save,
            LOAD_VHCA_STATE: self._load,
        }.get(opcode, self._unknown)
        return handler(vf, args)

    @staticmethod
    def _unknown(vf: _Vf, args: dict[str, Any]) -> Any:
        raise AdminError(errno.EOPNOTSUPP, "unknown admin command")

    @staticmethod
    def _suspend(vf: _Vf, args: dict[str, Any]) -> None:
        if args["op_mod"] == SUSPEND_INITIATOR:
            vf.initiator_suspended = True
            vf.mem.set_running(False)  # it no longer initiates DMA: its state holds still
        else:
            if not vf.initiator_suspended:
                raise AdminError(errno.EINVAL, "suspend responder before initiator")
            vf.responder_suspended = True

    @staticmethod
    def _resume(vf: _Vf, args: dict[str, Any]) -> None:
        if args["op_mod"] == RESUME_RESPONDER:
            vf.responder_suspended = False
        else:
            if vf.responder_suspended:
                raise AdminError(errno.EINVAL, "resume responder before initiator")
            vf.initiator_suspended = False
            vf.mem.set_running(True)

    @staticmethod
    def _query(vf: _Vf, args: dict[str, Any]) -> dict[str, int]:
        incremental = vf.mem.dirty_count * (PAGE + SEG.size) if vf.tracking else 0
        full = vf.mem.size + -(-vf.mem.size // CHUNK) * SEG.size
        if args.get("cleanup"):
            vf.cleanup = True
        # What is left to hand out: the image being saved, plus what changed while
        # tracking; with no session, what a full save would give.
        remaining = (vf.pending_bytes + incremental if vf.tracking
                     else vf.pending_bytes or full)
        return {"required_umem_size": min(CHUNK, max(full, incremental) or SEG.size),
                "remaining_total_size": remaining,
                "incremental_size": incremental}

    def _save(self, vf: _Vf, args: dict[str, Any]) -> dict[str, int]:
        """SAVE_VHCA_STATE in chunk mode: one call fills one host buffer.

        A save that is not incremental starts a new full image, whatever an
        earlier session left unread: each migration session starts afresh."""
        buf = self.dma(PF, int(args["mkey"]))
        size = min(int(args["size"]), len(buf))
        if args.get("incremental"):
            # The final delta must collect what changed since the last collection,
            # whatever of an earlier delta is still pending.
            if vf.tracking and (args.get("final") or not vf.pending):
                for off, length in vf.mem.take_dirty(CHUNK - SEG.size):
                    vf.pending.append((off, length))
                    vf.pending_bytes += SEG.size + length
            elif not vf.tracking and not vf.pending:
                return {"actual_size": 0, "remaining": 0}
        else:
            vf.pending.clear()
            vf.pending_bytes = 0
            if vf.cleanup and not args.get("set_track"):
                # The end of a pre-copy session: tracking stops, nothing is kept.
                vf.cleanup = vf.tracking = False
                vf.mem.stop_tracking()
                return {"actual_size": 0, "remaining": 0}
            if args.get("set_track"):
                vf.mem.start_tracking()
                vf.tracking = True
            elif not vf.responder_suspended:
                raise AdminError(errno.EINVAL, "full save of a running VF needs tracking")
            else:
                vf.tracking = False  # a full image of a stopped VF needs no delta
                vf.mem.stop_tracking()
            step = CHUNK - SEG.size
            for off in range(0, vf.mem.size, step):
                vf.pending.append((off, min(step, vf.mem.size - off)))
                vf.pending_bytes += SEG.size + min(step, vf.mem.size - off)
        vf.cleanup = False
        pos = 0
        mv = vf.mem.mv
        while vf.pending and pos + SEG.size < size:
            off, length = vf.pending[0]
            k = min(length, size - pos - SEG.size)
            SEG.pack_into(buf, pos, off, k, 0)
            buf[pos + SEG.size : pos + SEG.size + k] = mv[off : off + k]
            pos += SEG.size + k
            vf.pending_bytes -= SEG.size + k
            if k == length:
                vf.pending.popleft()
            else:
                vf.pending[0] = (off + k, length - k)
                vf.pending_bytes += SEG.size
        if args.get("final"):
            vf.tracking = False
            vf.mem.stop_tracking()
        return {"actual_size": pos, "remaining": vf.pending_bytes}

    def _load(self, vf: _Vf, args: dict[str, Any]) -> None:
        buf = self.dma(PF, int(args["mkey"]))
        size = int(args["size"])
        pos = 0
        mv = vf.mem.mv
        while pos < size:
            if pos + SEG.size > size:
                raise AdminError(errno.EINVAL, "truncated segment in firmware image")
            off, length, _ = SEG.unpack_from(buf, pos)
            pos += SEG.size
            if pos + length > size or off + length > vf.mem.size:
                raise AdminError(errno.EINVAL, f"segment [{off}, +{length}) outside VF state")
            mv[off : off + length] = buf[pos : pos + length]
            pos += length

    def reset_vf(self, vhca_id: int, wipe: bool) -> None:
        vf = self._vfs[vhca_id]
        vf.initiator_suspended = vf.responder_suspended = vf.tracking = vf.cleanup = False
        vf.pending.clear()
        vf.pending_bytes = 0
        vf.mem.stop_tracking()
        if wipe:
            vf.mem.wipe()
        vf.mem.set_running(True)

    def restore_vf(self, vhca_id: int, initiator: bool, responder: bool) -> None:
        vf = self._vfs[vhca_id]
        vf.initiator_suspended, vf.responder_suspended = initiator, responder
        vf.mem.set_running(not initiator)

    def debug_digest(self, vhca_id: int) -> str:
        """Emulation-only: SHA-256 of a VF's state, for end-to-end verification."""
        return self._vfs[vhca_id].mem.digest()


class GuestVf:
    """What the guest holds: the VF itself.  Its requests carry the VF's identity."""

    def __init__(self, fw: Mlx5Firmware, vhca_id: int) -> None:
        self._fw = fw
        self.vhca_id = vhca_id

    def admin(self, opcode: int, **args: Any) -> Any:
        return self._fw.call(self.vhca_id, opcode, vhca_id=self.vhca_id, **args)

    def dma_read(self, mkey: int) -> bytes:
        return bytes(self._fw.dma(self.vhca_id, mkey))

    def dma_write(self, mkey: int, data: bytes) -> None:
        self._fw.dma(self.vhca_id, mkey)[: len(data)] = data


class Mlx5Device(Device):
    kind = "mlx5"
    blocking_io = True  # SAVE/LOAD wait for the firmware

    def __init__(self, name: str, options: Mapping[str, str]) -> None:
        check_options(name, "mlx5", options, {"pf", "vhca-id", "model"})
        super().__init__(name, MigCap.STOP_COPY | MigCap.P2P | MigCap.PRE_COPY)
        try:
            self.vhca_id = int(options.get("vhca-id", "1"), 0)
        except ValueError:
            raise ConfigError(f"device {name}: vhca-id must be a number") from None
        self.model = options.get("model", "mlx5-cx7-vf")
        self.fw = Mlx5Firmware.get(options.get("pf", "pf0"))
        self.mem = DeviceMemory(name, options, default_size="256M")
        self.fw.create_vf(self.vhca_id, self.mem)
        # Host buffers the PF DMAs into: two for saving (read-ahead), one for loading.
        self._bufs = [bytearray(CHUNK) for _ in range(READ_AHEAD)]
        self._mkeys = [self.fw.register_mkey(PF, b) for b in self._bufs]
        # The loading buffer, sized (like the driver's) from the source's
        # STOP_COPY_SIZE record and the record at hand.
        self._load_buf = bytearray(0)
        self._load_mkey = self.fw.register_mkey(PF, self._load_buf)
        self._prep_size = 0
        self._stream: collections.deque[memoryview | bytes] = collections.deque()
        self._buf_order: collections.deque[int] = collections.deque()
        self._save_args: dict[str, bool] = {}
        self._stream_bytes = 0
        self._in_initial = False
        self._image_remaining = 0
        self._incremental = False
        self._free_bufs: collections.deque[int] = collections.deque(range(READ_AHEAD))
        self._rx = bytearray()
        self._rx_need = REC.size
        self._rx_hdr: tuple[int, int, int] | None = None
        self._loading = False
        self.loads_committed = 0
        if options.get("dir"):
            self._keep_state_in(options["dir"])

    def _saved_extra(self) -> dict[str, Any]:
        return {"loading": self._loading, "loads_committed": self.loads_committed}

    def _restore(self, state: DeviceState, extra: dict[str, Any]) -> None:
        # The firmware's suspend state follows the VF's (a real PF keeps it across a
        # daemon restart); images being saved or loaded do not survive the daemon.
        S = DeviceState
        self._loading = bool(extra.get("loading"))
        self.loads_committed = int(extra.get("loads_committed", 0))
        self.fw.restore_vf(self.vhca_id,
                           initiator=state not in (S.RUNNING, S.PRE_COPY),
                           responder=state in (S.STOP, S.STOP_COPY, S.RESUMING))

    def guest(self) -> GuestVf:
        return GuestVf(self.fw, self.vhca_id)

    def _cmd(self, opcode: int, **args: Any) -> Any:
        return self.fw.call(PF, opcode, vhca_id=self.vhca_id, **args)

    # --- FSM arcs ------------------------------------------------------------------

    def _arc(self, cur: DeviceState, nxt: DeviceState) -> None:
        S = DeviceState
        arc = (cur, nxt)
        if arc in ((S.RUNNING, S.RUNNING_P2P), (S.PRE_COPY, S.PRE_COPY_P2P)):
            self._cmd(SUSPEND_VHCA, op_mod=SUSPEND_INITIATOR)
        elif arc == (S.RUNNING_P2P, S.STOP):
            self._cmd(SUSPEND_VHCA, op_mod=SUSPEND_RESPONDER)
        elif arc == (S.STOP, S.RUNNING_P2P):
            self._cmd(RESUME_VHCA, op_mod=RESUME_RESPONDER)
        elif arc in ((S.RUNNING_P2P, S.RUNNING), (S.PRE_COPY_P2P, S.PRE_COPY)):
            self._cmd(RESUME_VHCA, op_mod=RESUME_INITIATOR)
            if nxt == S.RUNNING:
                self._loading = False
        elif arc in ((S.RUNNING, S.PRE_COPY), (S.RUNNING_P2P, S.PRE_COPY_P2P)):
            self._open_stream()
            self._start_image(set_track=True)
        elif arc == (S.STOP, S.STOP_COPY):
            self._open_stream()
            self._start_image(set_track=False)
        elif arc == (S.PRE_COPY_P2P, S.STOP_COPY):
            self._cmd(SUSPEND_VHCA, op_mod=SUSPEND_RESPONDER)
            self._start_image(incremental=True, final=True)
        elif arc in ((S.PRE_COPY, S.RUNNING), (S.PRE_COPY_P2P, S.RUNNING_P2P)):
            # The driver's pre-copy cleanup: the firmware ends the tracking session,
            # and the next session starts from a full image.
            self._cmd(QUERY_VHCA_MIGRATION_STATE, incremental=True, cleanup=True)
            self._close_stream()
            self._cmd(SAVE_VHCA_STATE, mkey=self._mkeys[0], size=CHUNK, incremental=False,
                      set_track=False)
        elif arc == (S.STOP_COPY, S.STOP):
            self._close_stream()
        elif arc == (S.STOP, S.RESUMING):
            self._rx.clear()
            self._rx_hdr = None
            self._rx_need = REC.size
            self._prep_size = 0
            self._loading = True
        elif arc == (S.RESUMING, S.STOP):
            if self._rx or self._rx_hdr is not None:
                raise DeviceError(f"{self.name}: loaded stream ends inside a record")
            self.loads_committed += 1

    def _reset(self) -> None:
        self._close_stream()
        self.fw.reset_vf(self.vhca_id, wipe=self._loading)
        self._loading = False
        self._rx.clear()
        self._rx_hdr = None

    # --- saving: images into host buffers, framed into the stream ---------------------------

    def _open_stream(self) -> None:
        self._close_stream()
        q = self._cmd(QUERY_VHCA_MIGRATION_STATE)
        # What the driver pre-allocates for stop-copy (in chunk mode: one chunk, or the
        # whole image when smaller), in pages; the target sizes its buffer from it.
        size = -(-max(q["required_umem_size"], min(CHUNK, q["remaining_total_size"])) // PAGE)
        size *= PAGE
        self._stream.append(REC.pack(8, REC_OPTIONAL, TAG_STOP_COPY_SIZE) + struct.pack("<Q", size))
        self._stream_bytes = REC.size + 8

    def _close_stream(self) -> None:
        self._stream.clear()
        self._buf_order.clear()
        self._stream_bytes = self._image_remaining = 0
        self._in_initial = False
        self._free_bufs = collections.deque(range(READ_AHEAD))

    def _start_image(self, set_track: bool = False, incremental: bool = False,
                     final: bool = False) -> None:
        self._save_args = {"set_track": set_track, "incremental": incremental, "final": final}
        self._image_remaining = 1  # unknown until the first chunk says
        self._in_initial = not incremental and self._state != DeviceState.STOP
        self._save_ahead()

    def _queued(self) -> int:
        """Stream bytes not yet read, counting the framing of chunks not yet saved."""
        return (self._stream_bytes + self._image_remaining
                + REC.size * -(-self._image_remaining // (CHUNK - SEG.size)))

    def _initial_bytes(self) -> int:
        if self._in_initial and self._queued() == 0:
            self._in_initial = False
        return self._queued() if self._in_initial else 0

    def _save_ahead(self) -> None:
        """Chunk mode: keep up to two saved chunks queued ahead of the reader."""
        while self._image_remaining and self._free_bufs:
            i = self._free_bufs.popleft()
            r = self._cmd(SAVE_VHCA_STATE, mkey=self._mkeys[i], size=CHUNK, **self._save_args)
            self._image_remaining = r["remaining"]
            # The image's further chunks continue it (a full SAVE would start over).
            self._save_args["set_track"] = False
            self._save_args["incremental"] = True
            if r["actual_size"]:
                self._stream.append(REC.pack(r["actual_size"], 0, TAG_FW_DATA))
                self._stream.append(memoryview(self._bufs[i])[: r["actual_size"]])
                self._stream.append(b"")  # marks the end of buffer i's record
                self._stream_bytes += REC.size + r["actual_size"]
                self._buf_order.append(i)
            else:
                self._free_bufs.append(i)

    def read_into(self, buf: memoryview) -> int:
        with self._lock:
            self._require(*SAVING_STATES, op="read")
            n = 0
            while n < len(buf):
                if not self._stream:
                    self._save_ahead()
                    if not self._stream:
                        break
                    continue
                head = self._stream[0]
                if not len(head):  # a buffer's record is fully read: give it back
                    self._stream.popleft()
                    self._free_bufs.append(self._buf_order.popleft())
                    continue
                k = min(len(buf) - n, len(head))
                buf[n : n + k] = head[:k]
                n += k
                if k == len(head):
                    self._stream.popleft()
                else:
                    self._stream[0] = head[k:]
            self._stream_bytes -= n
            if n == 0 and self._state != DeviceState.STOP_COPY:
                raise NoDataNow(f"{self.name}: ENOMSG, no pre-copy data for now")
            return n

    def precopy_info(self) -> PrecopyInfo:
        with self._lock:
            self._require(*PRECOPY_STATES, op="precopy-info")
            # A suspended VF cannot be saved: in PRE_COPY_P2P the driver answers from
            # what it holds, without asking the firmware.
            if self._queued() == 0 and self._state == DeviceState.PRE_COPY:
                # The reader drained everything: only now fetch what changed.
                self._in_initial = False
                if self._cmd(QUERY_VHCA_MIGRATION_STATE)["incremental_size"]:
                    self._start_image(incremental=True)
            initial = self._initial_bytes()
            return PrecopyInfo(initial, self._queued() - initial)

    def stop_copy_size(self) -> int:
        """MIG_DATA_SIZE: the firmware's remaining total, in every state."""
        return int(self._cmd(QUERY_VHCA_MIGRATION_STATE)["remaining_total_size"])

    # --- resuming: records in, LOAD per complete FW_DATA record ------------------------------

    def write(self, data: memoryview) -> int:
        with self._lock:
            self._require(DeviceState.RESUMING, op="write")
            pos = 0
            while pos < len(data):
                k = min(self._rx_need - len(self._rx), len(data) - pos)
                self._rx += data[pos : pos + k]
                pos += k
                if len(self._rx) < self._rx_need:
                    break
                if self._rx_hdr is None:
                    size, flags, tag = REC.unpack(self._rx)
                    self._rx.clear()
                    if size > MAX_LOAD_SIZE:
                        raise DeviceError(f"{self.name}: ENOMEM, record of {size} bytes")
                    if tag not in (TAG_FW_DATA, TAG_STOP_COPY_SIZE) and not flags & REC_OPTIONAL:
                        raise DeviceError(f"{self.name}: EOPNOTSUPP, unknown mandatory record "
                                          f"tag {tag}")
                    self._rx_hdr = (size, flags, tag)
                    self._rx_need = size
                    if size == 0:
                        self._take_record()
                else:
                    self._take_record()
            return len(data)

    def _take_record(self) -> None:
        assert self._rx_hdr is not None
        size, _, tag = self._rx_hdr
        if tag == TAG_FW_DATA:
            if len(self._load_buf) < size:
                self._load_buffer(max(size, self._prep_size))
            self._load_buf[:size] = self._rx
            try:
                self._cmd(LOAD_VHCA_STATE, mkey=self._load_mkey, size=size)
            except AdminError as exc:
                raise DeviceError(f"{self.name}: LOAD_VHCA_STATE failed: {exc.message}") from None
        elif tag == TAG_STOP_COPY_SIZE:
            if size != 8:
                raise DeviceError(f"{self.name}: EINVAL, STOP_COPY_SIZE record of {size} bytes")
            self._prep_size = min(struct.unpack("<Q", self._rx)[0], MAX_LOAD_SIZE)
        # unknown optional tags are skipped
        self._rx.clear()
        self._rx_hdr = None
        self._rx_need = REC.size

    def _load_buffer(self, size: int) -> None:
        """A host buffer the firmware loads from, of ``size`` bytes (it replaces the old)."""
        self.fw.unregister_mkey(self._load_mkey)
        self._load_buf = bytearray(size)
        self._load_mkey = self.fw.register_mkey(PF, self._load_buf)

    # --- identity --------------------------------------------------------------------------

    def state_size(self) -> int:
        return self.mem.size

    def compat(self) -> dict[str, Any]:
        return {"model": self.model, "state_size": self.mem.size}

    def check_compat(self, source: Mapping[str, Any]) -> None:
        if source.get("model") != self.model or source.get("state_size") != self.mem.size:
            raise IncompatibleDevice(
                f"source {source.get('model')!r} with {source.get('state_size')} bytes cannot "
                f"load into {self.model!r} with {self.mem.size}"
            )

    def digest(self) -> str:
        return self.fw.debug_digest(self.vhca_id)

    def dump(self, path: str) -> None:
        self.mem.dump(path)

    def close(self) -> None:
        self.fw.destroy_vf(self.vhca_id)
        self.mem.close()

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(model=self.model, pf=self.fw.name, vhca_id=self.vhca_id,
                 loads_committed=self.loads_committed, loading=self._loading)
        return d


REGISTRY.register("mlx5", Mlx5Device)
