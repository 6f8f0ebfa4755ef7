"""QEMU's own migration of the same state, for ``bench/compare.py --qemu``.

A guest whose RAM *is* the image: a paused QEMU (``-S``, TCG, no devices) whose memory
backend maps a private copy of the image file, migrated over loopback TCP to a second
QEMU started with ``-incoming``, driven through QMP.  Modes: ``plain`` (one TCP
stream, no encryption), ``multifd`` (2 channels), ``multifd-tls`` (2 channels, TLS
with certificates made here).  Reported like a migd run: GB/s of state (the RAM
size over QEMU's ``total-time``), both processes' CPU seconds and peak memory; QEMU
skips zero pages as migd does.  ``verified``: the destination's RAM file equals
the image afterwards (the destination maps its own file too).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

MODES = ("plain", "multifd", "multifd-tls")


class Qmp:
    """A minimal QMP client over a Unix socket."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.file = self.sock.makefile("rwb")
        self._read()  # the greeting
        self.call("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while True:
            msg: dict[str, Any] = json.loads(self.file.readline())
            if "event" not in msg:
                return msg

    def call(self, cmd: str, **args: Any) -> Any:
        self.file.write(json.dumps({"execute": cmd, "arguments": args}).encode() + b"\n")
        self.file.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"QMP {cmd}: {reply['error']}")
        return reply.get("return")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _certs(directory: str) -> None:
    """A CA and one certificate for 127.0.0.1 (server and client), in QEMU's layout."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(1)
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    pem_cert = cert.public_bytes(serialization.Encoding.PEM)
    pem_key = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    files = {"ca-cert.pem": ca.public_bytes(serialization.Encoding.PEM),
             "server-cert.pem": pem_cert, "server-key.pem": pem_key,
             "client-cert.pem": pem_cert, "client-key.pem": pem_key}
    for name, data in files.items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def _qemu(workdir: str, name: str, ram: str, size: int, extra: list[str]
          ) -> Iterator[tuple[subprocess.Popen[bytes], Qmp]]:
    qmp_path = os.path.join(workdir, f"{name}.qmp")
    cmd = ["qemu-system-x86_64", "-nodefaults", "-display", "none", "-S", "-machine",
           "pc,memory-backend=ram", "-accel", "tcg", "-m", f"{size >> 20}M",
           "-object", f"memory-backend-file,id=ram,size={size},mem-path={ram},share=on,prealloc=on",
           "-qmp", f"unix:{qmp_path},server=on,wait=off", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    qmp = None
    try:
        qmp = Qmp(qmp_path)
        yield proc, qmp
    finally:
        if qmp is not None:
            with contextlib.suppress(Exception):
                qmp.call("quit")
            qmp.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def available() -> bool:
    return shutil.which("qemu-system-x86_64") is not None


def migrate(image: str, mode: str) -> dict[str, object]:
    """One QEMU migration of a paused guest whose RAM holds ``image``."""
    if mode not in MODES:
        raise ValueError(f"QEMU mode {mode!r}: one of {', '.join(MODES)}")
    size = os.path.getsize(image)
    with tempfile.TemporaryDirectory(prefix="migd-qemu-", dir="/dev/shm") as wd:
        src_ram, dst_ram = os.path.join(wd, "src.ram"), os.path.join(wd, "dst.ram")
        shutil.copyfile(image, src_ram)
        with open(dst_ram, "wb") as f:
            f.truncate(size)
        if mode == "multifd-tls":
            _certs(wd)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]

        def creds(endpoint: str) -> list[str]:
            return ["-object", f"tls-creds-x509,id=tls0,dir={wd},endpoint={endpoint},"
                    "verify-peer=on"] if mode == "multifd-tls" else []

        with _qemu(wd, "dst", dst_ram, size, [*creds("server"), "-incoming", "defer"]) \
                as (dproc, dqmp), \
                _qemu(wd, "src", src_ram, size, creds("client")) as (sproc, sqmp):
            # QEMU caps a migration at 128 MiB/s unless told otherwise (libvirt lifts it).
            sqmp.call("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
            for qmp in (sqmp, dqmp):
                if mode != "plain":
                    qmp.call("migrate-set-capabilities", capabilities=[
                        {"capability": "multifd", "state": True}])
                    qmp.call("migrate-set-parameters", **{"multifd-channels": 2})
                if mode == "multifd-tls":
                    qmp.call("migrate-set-parameters", **{"tls-creds": "tls0",
                                                         "tls-hostname": "127.0.0.1"})
            dqmp.call("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
            cpu0 = {n: _cpu_seconds(p.pid) for n, p in (("source", sproc),
                                                         ("destination", dproc))}
            sqmp.call("migrate", uri=f"tcp:127.0.0.1:{port}")
            while True:
                info = sqmp.call("query-migrate")
                if info.get("status") in ("completed", "failed", "cancelled"):
                    break
                time.sleep(0.01)
            while dqmp.call("query-status").get("status") == "inmigrate":
                time.sleep(0.01)
            cpu = {n: round(_cpu_seconds(p.pid) - cpu0[n], 3)
                   for n, p in (("source", sproc), ("destination", dproc))}
            peak = {"source": _peak(sproc.pid), "destination": _peak(dproc.pid)}
        ok = info.get("status") == "completed"
        verified = ok and _same(image, dst_ram)
        seconds = info.get("total-time", 0) / 1000
        ram = info.get("ram", {})
        return {"gbps": round(size / seconds / 1e9, 3) if seconds else 0.0, "bytes": size,
                "wire_bytes": int(ram.get("transferred", 0)), "seconds": seconds,
                "verified": verified, "status": info.get("status"),
                "cpu_seconds": cpu, "mem_peak_bytes": peak}


def _same(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 22), fb.read(1 << 22)
            if x != y:
                return False
            if not x:
                return True


if __name__ == "__main__":
    import sys
    print(json.dumps(migrate(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "plain")))
