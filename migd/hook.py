"""The libvirt QEMU hook (install as ``/etc/libvirt/hooks/qemu.d/migd``).

libvirt runs it synchronously as ``HOOK GUEST OPERATION SUBOP EXTRA`` with the
domain XML on stdin, so it hands everything to the local daemon over the
control socket, returns quickly, and never calls back into libvirt.

* ``migrate begin`` (destination): for each VFIO VF in the domain - ``<hostdev
  type='pci'>`` with or without ``<driver name='vfio'/>``, and ``<interface
  type='hostdev'>`` - ask the daemon to prepare an incoming migration, which
  reserves a free pool VF; print the domain XML with the local addresses if any
  changed (nothing if none did).  Any failure exits 1 with one line on stderr,
  and libvirt cancels the migration.
* ``release end`` (the VM left this host; EXTRA ``migrated`` on a source):
  release the VM's reservations and reset its migrated-away VFs.
* Everything else: exit 0 at once.
"""

from __future__ import annotations

import os
import sys
import xml.etree.ElementTree as ET
from typing import TextIO

from .control import ControlClient
from .errors import MigdError

CONTROL = os.environ.get("MIGD_CONTROL", "/run/migd/migd.sock")


class HookError(Exception):
    pass


def _address(el: ET.Element) -> str:
    try:
        parts = [int(el.get(k, ""), 0) for k in ("domain", "bus", "slot", "function")]
    except ValueError:
        raise HookError("a VF <address> lacks domain, bus, slot or function") from None
    return "{:04x}:{:02x}:{:02x}.{:x}".format(*parts)


def _set_address(el: ET.Element, address: str) -> None:
    dom, bus, rest = address.split(":")
    slot, fn = rest.split(".")
    el.set("domain", f"0x{dom}")
    el.set("bus", f"0x{bus}")
    el.set("slot", f"0x{slot}")
    el.set("function", f"0x{fn}")


def vfio_vf_addresses(root: ET.Element) -> list[ET.Element]:
    """The <address> elements of the domain's VFIO VFs, in document order."""
    found: list[ET.Element] = []
    devices = root.find("devices")
    if devices is None:
        return found
    for dev in devices:
        if dev.tag == "hostdev":
            if dev.get("mode", "subsystem") != "subsystem" or dev.get("type") != "pci":
                continue
        elif dev.tag == "interface":
            if dev.get("type") != "hostdev":
                continue
        else:
            continue
        driver = dev.find("driver")
        if driver is not None and driver.get("name", "vfio") != "vfio":
            continue  # a legacy or other assignment: not ours
        addr = dev.find("source/address")
        if addr is None:
            raise HookError(f"a <{dev.tag}> VF has no <source><address>")
        if dev.tag == "interface" and addr.get("type", "pci") != "pci":
            continue
        found.append(addr)
    return found


def migrate_begin(guest: str, xml: str, control: str) -> str:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise HookError(f"domain XML is not well formed: {exc}") from None
    if root.tag != "domain":
        raise HookError(f"expected a <domain>, got <{root.tag}>")
    vfs = vfio_vf_addresses(root)
    if not vfs:
        return ""
    changed = False
    with ControlClient(control, timeout=20) as c:
        for addr in vfs:
            source = _address(addr)
            placed = c.call("prepare-incoming", **{"source-address": source, "vm": guest})
            local = placed.get("address") or ""
            if not local:
                raise HookError(f"pool VF {placed.get('device')} has no PCI address configured")
            if local != source:
                _set_address(addr, local)
                changed = True
    return ET.tostring(root, encoding="unicode") if changed else ""


def release(guest: str, xml: str, control: str) -> None:
    try:
        addresses = [_address(a) for a in vfio_vf_addresses(ET.fromstring(xml))]
    except (ET.ParseError, HookError):
        addresses = []
    with ControlClient(control, timeout=20) as c:
        c.call("release-vm", vm=guest, addresses=addresses)


def main(argv: list[str] | None = None, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout,
         stderr: TextIO = sys.stderr) -> int:
    args = (argv if argv is not None else sys.argv)[1:]
    if len(args) < 3:
        print("migd hook: usage: HOOK GUEST OPERATION SUBOP [EXTRA]", file=stderr)
        return 2
    guest, op, subop = args[0], args[1], args[2]
    try:
        if (op, subop) == ("migrate", "begin"):
            out = migrate_begin(guest, stdin.read(), CONTROL)
            if out:
                stdout.write(out)
        elif (op, subop) == ("release", "end"):
            # libvirt ignores the result here: a failure is only worth a line.
            try:
                release(guest, stdin.read(), CONTROL)
            except MigdError as exc:
                print(f"migd hook: release of {guest}: {exc.message}", file=stderr)
        return 0
    except (HookError, MigdError) as exc:
        msg = exc.message if isinstance(exc, MigdError) else str(exc)
        print(f"migd hook: {guest}: {msg}", file=stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
