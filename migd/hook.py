"""The libvirt QEMU hook (install as ``/etc/libvirt/hooks/qemu.d/migd``).

libvirt runs it synchronously as ``HOOK GUEST OPERATION SUBOP EXTRA`` with the
domain XML on stdin and an empty environment, so it finds the daemon's control
socket in ``/etc/migd/migd.toml`` (the ``control`` key), hands everything to the
daemon, answers within ``TIMEOUT`` seconds whatever the daemon does, and never
calls back into libvirt.

* ``migrate begin`` (destination): the domain's VFIO hostdevs (``<hostdev
  type='pci'>`` with or without ``<driver name='vfio'/>``, ``<interface
  type='hostdev'>``) less those its ``<metadata>`` opts out (``<migd:skip
  address='...'/>``, or ``<migd:skip/>`` for the whole VM, in namespace
  ``urn:migd:libvirt:1``) go to the daemon in one request, which reserves a pool
  VF for each it handles (a VF at a configured address, or one of
  ``hook_addresses``), all or none; the others (a GPU, a boot ROM device) are left
  alone.  The domain XML is printed with the local addresses if any changed
  (nothing if none did), its namespace prefixes kept.  An ``<interface
  type='network'>`` on an SR-IOV pool is refused: libvirt picks that VF itself.
  Any failure exits 1 with one line on stderr, and libvirt cancels the migration.
* ``release end`` (the VM left this host; EXTRA ``migrated`` on a source):
  release the VM's reservations and reset its migrated-away VFs.  A VM without
  VFIO VFs never reaches the daemon.
* Everything else: exit 0 at once.
"""

from __future__ import annotations

import io
import os
import sys
import xml.etree.ElementTree as ET
from typing import TextIO

from . import config
from .control import ControlClient
from .errors import MigdError

CONFIG = "/etc/migd/migd.toml"
#: Seconds the hook waits for the daemon: libvirt waits for the hook, holding the
#: domain (a VM start or stop) meanwhile.
TIMEOUT = float(os.environ.get("MIGD_HOOK_TIMEOUT", "10"))  # the variable: for tests
NS = "urn:migd:libvirt:1"


class HookError(Exception):
    pass


def control_path(environ: dict[str, str] | None = None) -> str:
    """The daemon's control socket: ``$MIGD_CONTROL``, else the ``control`` key of
    ``$MIGD_CONFIG`` (default /etc/migd/migd.toml, if there is one), else the default."""
    env = os.environ if environ is None else environ
    if env.get("MIGD_CONTROL"):
        return env["MIGD_CONTROL"]
    path = env.get("MIGD_CONFIG") or CONFIG
    if not os.path.exists(path):
        return config.Config.control
    try:
        return config.load(path).control
    except MigdError as exc:
        raise HookError(exc.message) from None


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


def _skips(root: ET.Element) -> tuple[bool, set[str]]:
    """What the domain's metadata opts out: everything, and/or these addresses."""
    whole, addresses = False, set()
    for el in root.iterfind(f"metadata/{{{NS}}}migd/{{{NS}}}skip"):
        if el.get("address"):
            addresses.add(el.get("address", "").lower())
        elif el.get("network"):
            addresses.add("network:" + el.get("network", ""))
        else:
            whole = True
    return whole, addresses


def vfio_vf_addresses(root: ET.Element) -> list[ET.Element]:
    """The <address> elements of the domain's VFIO VFs, in document order, less what
    its metadata opts out."""
    found: list[ET.Element] = []
    devices = root.find("devices")
    whole, skip = _skips(root)
    if devices is None or whole:
        return found
    for dev in devices:
        if dev.tag == "hostdev":
            if dev.get("mode", "subsystem") != "subsystem" or dev.get("type") != "pci":
                continue
        elif dev.tag == "interface" and dev.get("type") == "network":
            net = dev.find("source")
            name = net.get("network", "?") if net is not None else "?"
            actual = dev.find("actual")
            driver = dev.find("driver")
            sriov = (actual is not None and actual.get("type") == "hostdev") or (
                driver is not None and driver.get("name") == "vfio")
            if sriov and "network:" + name not in skip:
                raise HookError(
                    f"interface on network {name!r} is an SR-IOV pool: libvirt picks its VF on "
                    "this host itself, so migd cannot place it; use <interface type='hostdev'> "
                    f"with the VF's address, or opt it out (<migd:skip network='{name}'/>)")
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
        if _address(addr) in skip:
            continue
        found.append(addr)
    return found


def _parse(xml: str) -> ET.Element:
    """The domain, with its namespace prefixes registered so that they come out as
    they went in (``nova:``, not ``ns0:``)."""
    try:
        for _, (prefix, uri) in ET.iterparse(io.StringIO(xml), events=("start-ns",)):
            if prefix:
                ET.register_namespace(prefix, uri)
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise HookError(f"domain XML is not well formed: {exc}") from None
    except ValueError as exc:  # a prefix ElementTree reserves (ns0, ...)
        raise HookError(f"domain XML: {exc}") from None
    if root.tag != "domain":
        raise HookError(f"expected a <domain>, got <{root.tag}>")
    return root


def migrate_begin(guest: str, xml: str, control: str) -> str:
    root = _parse(xml)
    vfs = vfio_vf_addresses(root)
    if not vfs:
        return ""
    sources = [_address(a) for a in vfs]
    with ControlClient(control, timeout=TIMEOUT) as c:
        answer = c.call("prepare-incoming", **{"source-addresses": sources, "vm": guest})
    changed = False
    for addr, source in zip(vfs, sources, strict=True):
        placed = answer["placed"].get(source)
        if placed is None:
            continue  # not a VF of migd's: libvirt keeps it as it is
        local = placed.get("address") or ""
        if not local:
            raise HookError(f"pool VF {placed.get('device')} has no PCI address configured")
        if local != source:
            _set_address(addr, local)
            changed = True
    return ET.tostring(root, encoding="unicode") if changed else ""


def release(guest: str, xml: str, control: str) -> None:
    try:
        addresses = [_address(a) for a in vfio_vf_addresses(_parse(xml))]
    except HookError:
        addresses = None  # cannot tell: ask the daemon anyway
    if addresses == []:
        return  # no VFs: nothing of migd's to release
    with ControlClient(control, timeout=TIMEOUT) as c:
        c.call("release-vm", vm=guest, addresses=addresses or [])


def main(argv: list[str] | None = None, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout,
         stderr: TextIO = sys.stderr) -> int:
    args = (argv if argv is not None else sys.argv)[1:]
    if len(args) < 3:
        print("migd hook: usage: HOOK GUEST OPERATION SUBOP [EXTRA]", file=stderr)
        return 2
    guest, op, subop = args[0], args[1], args[2]
    try:
        if (op, subop) == ("migrate", "begin"):
            out = migrate_begin(guest, stdin.read(), control_path())
            if out:
                stdout.write(out)
        elif (op, subop) == ("release", "end"):
            # libvirt ignores the result here: a failure is only worth a line.
            try:
                release(guest, stdin.read(), control_path())
            except (HookError, MigdError) as exc:
                msg = exc.message if isinstance(exc, MigdError) else str(exc)
                print(f"migd hook: release of {guest}: {msg}", file=stderr)
        return 0
    except (HookError, MigdError) as exc:
        msg = exc.message if isinstance(exc, MigdError) else str(exc)
        print(f"migd hook: {guest}: {msg}", file=stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
