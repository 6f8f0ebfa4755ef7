"""The emulated PF firmware of a ConnectX-style NIC (what ``backends.mlx5`` drives).

:class:`Mlx5Firmware` is the PF's firmware: its own thread serving an admin
command queue (SUSPEND/RESUME/QUERY/SAVE/LOAD_VHCA), owning each VF's internal
state (by ``vhca_id``), and "DMAing" state only into host buffers registered
with it (mkeys), under the PF's identity.  Commands or DMA requested with a VF's
identity - what a guest could reach (:class:`GuestVf`) - are refused.  Each
migration session starts afresh: a SAVE that is not incremental starts a new
full image, and a QUERY asking for cleanup ends the tracking session.

The image inside FW_DATA records is the firmware's own business (segments of
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
from collections.abc import Callable
from typing import Any, ClassVar

from migd.errors import ConfigError, DeviceError

from ..memory import PAGE, DeviceMemory

# mlx5_ifc.h opcodes and op_mods
SUSPEND_VHCA = 0x115
RESUME_VHCA = 0x116
QUERY_VHCA_MIGRATION_STATE = 0x117
SAVE_VHCA_STATE = 0x118
LOAD_VHCA_STATE = 0x119
SUSPEND_INITIATOR, SUSPEND_RESPONDER = 0, 1
RESUME_RESPONDER, RESUME_INITIATOR = 0, 1
#: The firmware saves in chunks of at most this (migration_in_chunks).
CHUNK = 8 << 20
SEG = struct.Struct("<QII")
PF = -1  # requester id of the PF itself; VFs are their vhca_id


class AdminError(DeviceError):
    """The firmware refused a command (syndrome = errno here)."""

    code = 16
    name = "admin-error"

    @classmethod
    def rebuild(cls, message: str) -> DeviceError:
        return DeviceError(message)  # the errno is this host's business

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
