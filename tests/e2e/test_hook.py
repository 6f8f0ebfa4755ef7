"""The libvirt hook, run as libvirt runs it: argv, the domain XML on stdin, exit code."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import pytest

from migd.harness import DaemonProc, start_daemon, write_identity

DOMAIN = """<domain type='kvm'>
  <name>{name}</name>
  <memory unit='KiB'>1048576</memory>
  <devices>
    <disk type='file' device='disk'><source file='/var/lib/libvirt/images/a.qcow2'/>
      <target dev='vda' bus='virtio'/></disk>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <driver name='vfio'/>
      <source><address domain='0x0000' bus='0x06' slot='0x12' function='0x2'/></source>
    </hostdev>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <source><address domain='0x0000' bus='0x06' slot='0x12' function='0x3'/></source>
    </hostdev>
    <interface type='hostdev' managed='yes'>
      <driver name='vfio'/>
      <source><address type='pci' domain='0x0000' bus='0x00' slot='0x07' function='0x0'/></source>
      <mac address='52:54:00:6d:90:02'/>
    </interface>
    <hostdev mode='subsystem' type='usb' managed='yes'>
      <source><vendor id='0x1234'/><product id='0xbeef'/></source>
    </hostdev>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <driver name='kvm'/>
      <source><address domain='0x0000' bus='0x09' slot='0x00' function='0x0'/></source>
    </hostdev>
    <interface type='network'><source network='default'/><model type='virtio'/></interface>
  </devices>
</domain>"""

SOURCE_VFS = {"vf0": "0000:06:12.2", "vf1": "0000:06:12.3", "nic": "0000:00:07.0"}
POOL = {"pool0": "0000:81:00.1", "pool1": "0000:81:00.2", "pool2": "0000:81:00.3"}


def config(path: pathlib.Path, devices: dict[str, str], pool: bool, extra: str = "") -> str:
    text = "".join(f'[devices.{n}]\nbackend = "sim"\naddress = "{a}"\npool = {str(pool).lower()}\n'
                   f'options = {{ size = "4M", seed = "{i}" }}\n\n'
                   for i, (n, a) in enumerate(devices.items()))
    path.write_text(text + extra)
    return str(path)


@pytest.fixture
def hosts(tmp_path: pathlib.Path) -> Iterator[tuple[DaemonProc, DaemonProc, str]]:
    wd = str(tmp_path)
    a, b = write_identity(wd, "src"), write_identity(wd, "dst")
    dst = start_daemon(wd, "dst", [], [a.public],
                       extra=["--config", config(tmp_path / "dst.toml", POOL, True,
                                                 '[devices.busy]\nbackend = "sim"\n'
                                                 'options = { size = "4M" }\n')])
    src = start_daemon(wd, "src", [], [b.public],
                       extra=["--config", config(tmp_path / "src.toml", SOURCE_VFS, False)])
    try:
        yield src, dst, wd
    finally:
        src.stop()
        dst.stop()


def hook(control: str, *args: str, xml: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "migd.hook", *args], input=xml,
                          capture_output=True, text=True, timeout=30,
                          env={**os.environ, "MIGD_CONTROL": control})


def vf_addresses(xml: str) -> list[str]:
    root = ET.fromstring(xml)
    out = []
    for a in root.iter("address"):
        if a.get("domain") is not None:
            out.append(f"{int(a.get('domain', '0'), 0):04x}:{int(a.get('bus', '0'), 0):02x}:"
                       f"{int(a.get('slot', '0'), 0):02x}.{int(a.get('function', '0'), 0):x}")
    return out


def test_migrate_begin_places_every_vfio_vf(hosts: tuple[DaemonProc, DaemonProc, str]) -> None:
    src, dst, _ = hosts
    r = hook(dst.control, "guest1", "migrate", "begin", "-", xml=DOMAIN.format(name="guest1"))
    assert r.returncode == 0, r.stderr
    addrs = vf_addresses(r.stdout)
    # the three VFIO VFs now point at pool VFs; the kvm-assigned device is untouched
    assert sorted(addrs[:3]) == sorted(POOL.values()) and addrs[3] == "0000:09:00.0"
    assert "<vendor id=\"0x1234\" />" in r.stdout or "vendor id" in r.stdout
    again = hook(dst.control, "guest1", "migrate", "begin", "-", xml=DOMAIN.format(name="guest1"))
    assert again.stdout == r.stdout  # libvirt may retry: the same placement
    # the migration arrives and lands on the VF the hook reserved, by source address
    with src.client() as c:
        final = c.migrate_follow({"device": "vf0", "peer": dst.address})
    assert final["status"] == "completed", final.get("error-desc")
    placed = {x["name"]: x for x in dst.call("query-devices")}
    pool_for_vf0 = next(n for n, a in POOL.items() if a == addrs[0])
    assert dst.call("device-digest", device=pool_for_vf0)["sha256"] == \
        src.call("device-digest", device="vf0")["sha256"]
    assert placed[pool_for_vf0]["state"] == "RUNNING"
    # every pool VF is now taken: the next VM's migration is refused, with the reason
    full = hook(dst.control, "guest2", "migrate", "begin", "-", xml=DOMAIN.format(name="guest2"))
    assert full.returncode == 1 and "no free pool VF" in full.stderr
    assert len(full.stderr.strip().splitlines()) == 1
    # on the source, "release end migrated" resets the VF that left
    assert next(x for x in src.call("query-devices") if x["name"] == "vf0")["state"] == "STOP"
    rel = hook(src.control, "guest1", "release", "end", "migrated",
               xml=DOMAIN.format(name="guest1"))
    assert rel.returncode == 0, rel.stderr
    assert next(x for x in src.call("query-devices") if x["name"] == "vf0")["state"] == "RUNNING"
    # and on the destination releasing the VM frees its pool VFs again
    assert hook(dst.control, "guest1", "release", "end", "shutdown",
                xml=r.stdout).returncode == 0
    assert hook(dst.control, "guest2", "migrate", "begin", "-",
                xml=DOMAIN.format(name="guest2")).returncode == 0


def test_nothing_to_do_prints_nothing(hosts: tuple[DaemonProc, DaemonProc, str]) -> None:
    _, dst, _ = hosts
    plain = "<domain type='kvm'><name>g</name><devices><disk type='file'/></devices></domain>"
    r = hook(dst.control, "g", "migrate", "begin", "-", xml=plain)
    assert r.returncode == 0 and r.stdout == ""


def test_bad_input_and_other_operations(hosts: tuple[DaemonProc, DaemonProc, str],
                                        tmp_path: pathlib.Path) -> None:
    _, dst, _ = hosts
    r = hook(dst.control, "g", "migrate", "begin", "-", xml="<domain><devices><hostdev")
    assert r.returncode == 1 and "not well formed" in r.stderr
    broken = DOMAIN.format(name="g").replace("<source><address domain='0x0000' bus='0x06' "
                                             "slot='0x12' function='0x3'/></source>", "")
    r = hook(dst.control, "g", "migrate", "begin", "-", xml=broken)
    assert r.returncode == 1 and "has no <source><address>" in r.stderr
    nowhere = str(tmp_path / "no.sock")
    r = hook(nowhere, "g", "migrate", "begin", "-", xml=DOMAIN.format(name="g"))
    assert r.returncode == 1 and "is 'migd serve' running?" in r.stderr
    for op in (("prepare", "begin", "-"), ("start", "begin", "-"), ("started", "begin", "-"),
               ("stopped", "end", "-"), ("reconnect", "begin", "-")):
        r = hook(nowhere, "g", *op, xml=DOMAIN.format(name="g"))  # no daemon needed
        assert r.returncode == 0 and r.stdout == "", op
    assert hook(nowhere, "g").returncode == 2
