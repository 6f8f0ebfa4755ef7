"""The libvirt hook, run as libvirt runs it: argv, the domain XML on stdin, exit code."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time
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
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <driver name='vfio'/>
      <source><address domain='0x0000' bus='0x0a' slot='0x00' function='0x0'/></source>
    </hostdev>
    <interface type='network'><source network='default'/><model type='virtio'/></interface>
  </devices>
</domain>"""
#: The destination's VFs sit elsewhere: the hook handles the source's VF addresses
#: it is told of, and leaves the rest (the GPU at 0000:0a:00.0) to libvirt.
HOOK_ADDRESSES = 'hook_addresses = ["0000:06:12.*", "0000:00:07.0"]\n'


SOURCE_VFS = {"vf0": "0000:06:12.2", "vf1": "0000:06:12.3", "nic": "0000:00:07.0"}
POOL = {"pool0": "0000:81:00.1", "pool1": "0000:81:00.2", "pool2": "0000:81:00.3"}


def config(path: pathlib.Path, devices: dict[str, str], pool: bool, extra: str = "",
           top: str = "") -> str:
    text = top + "".join(f'[devices.{n}]\nbackend = "sim"\naddress = "{a}"\npool = {str(pool).lower()}\n'
                   f'options = {{ size = "4M", seed = "{i}" }}\n\n'
                   for i, (n, a) in enumerate(devices.items()))
    path.write_text(text + extra)
    return str(path)


def dst_config(tmp_path: pathlib.Path, extra: str = "") -> str:
    return config(tmp_path / "dst.toml", POOL, True, '[devices.busy]\nbackend = "sim"\n'
                  'options = { size = "4M" }\n', top=HOOK_ADDRESSES + extra)


@pytest.fixture
def hosts(tmp_path: pathlib.Path) -> Iterator[tuple[DaemonProc, DaemonProc, str]]:
    wd = str(tmp_path)
    a, b = write_identity(wd, "src"), write_identity(wd, "dst")
    dst = start_daemon(wd, "dst", [], [a.public],
                       extra=["--config", dst_config(tmp_path)])
    src = start_daemon(wd, "src", [], [b.public],
                       extra=["--config", config(tmp_path / "src.toml", SOURCE_VFS, False)])
    try:
        yield src, dst, wd
    finally:
        src.stop()
        dst.stop()


def hook(control: str, *args: str, xml: str = "", env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "migd.hook", *args], input=xml,
                          capture_output=True, text=True, timeout=30,
                          env={**os.environ, "MIGD_CONTROL": control, **(env or {})})


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
    # the three VFIO VFs now point at pool VFs; the kvm-assigned device and the VFIO
    # GPU that is not a VF of migd's are untouched
    assert sorted(addrs[:3]) == sorted(POOL.values())
    assert addrs[3:] == ["0000:09:00.0", "0000:0a:00.0"]
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
    assert full.returncode == 1 and "needs 3 free pool VF(s)" in full.stderr
    assert "0000:06:12.2, 0000:06:12.3, 0000:00:07.0; 0 free here" in full.stderr
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


def reservations(d: DaemonProc) -> dict[str, str]:
    return {r["source-address"]: f"{r['vm']}:{r['device']}" for r in d.call("query-reservations")}


def test_a_vm_is_reserved_whole_or_not_at_all_and_kept_across_a_restart(
        hosts: tuple[DaemonProc, DaemonProc, str]) -> None:
    _, dst, _ = hosts
    one = ("<domain type='kvm'><name>one</name><devices>" + "".join(
        f"<hostdev mode='subsystem' type='pci'><source><address domain='0x0000' bus='0x06' "
        f"slot='0x12' function='{fn}'/></source></hostdev>" for fn in ("0x2", "0x3"))
        + "</devices></domain>")
    assert hook(dst.control, "one", "migrate", "begin", "-", xml=one).returncode == 0
    assert len(reservations(dst)) == 2  # its two VFs
    # The next VM needs three; one is free: nothing is reserved for it.
    r = hook(dst.control, "three", "migrate", "begin", "-", xml=DOMAIN.format(name="three"))
    assert r.returncode == 1 and "needs 3 free pool VF(s)" in r.stderr and "1 free" in r.stderr
    assert all(v.startswith("one:") for v in reservations(dst).values())
    before = reservations(dst)
    dst.proc.kill()
    dst.proc.wait()
    dst.restart()
    assert reservations(dst) == before  # a restarted daemon hands them to nobody else
    assert "kept from before the restart" in dst.log()


def test_an_unclaimed_reservation_expires(tmp_path: pathlib.Path) -> None:
    wd = str(tmp_path)
    a = write_identity(wd, "src")
    write_identity(wd, "dst")
    dst = start_daemon(wd, "dst", [], [a.public],
                       extra=["--config", dst_config(tmp_path, "reservation_ttl = 1\n")])
    try:
        assert hook(dst.control, "g", "migrate", "begin", "-",
                    xml=DOMAIN.format(name="g")).returncode == 0
        assert len(reservations(dst)) == 3
        time.sleep(1.5)
        assert reservations(dst) == {}
        assert "expired: no migration came within reservation_ttl" in dst.log()
    finally:
        dst.stop()


def test_a_migration_for_another_vm_does_not_take_a_reserved_vf(
        hosts: tuple[DaemonProc, DaemonProc, str]) -> None:
    src, dst, _ = hosts
    assert hook(dst.control, "guest1", "migrate", "begin", "-",
                xml=DOMAIN.format(name="guest1")).returncode == 0
    with src.client() as c:
        final = c.migrate_follow({"device": "vf0", "peer": dst.address, "vm": "other"})
    assert final["status"] == "failed"
    assert "reserved here for VM guest1, and this migration says VM other" in final["error-desc"]
    assert all(d["state"] == "RUNNING" for d in src.call("query-devices"))


def test_metadata_opt_outs_namespaces_and_sriov_network_pools(
        hosts: tuple[DaemonProc, DaemonProc, str]) -> None:
    _, dst, _ = hosts
    meta = ("<metadata><nova:instance xmlns:nova='http://openstack.org/xmlns/libvirt/nova/1.1'>"
            "<nova:name>web</nova:name></nova:instance>"
            "<migd:migd xmlns:migd='urn:migd:libvirt:1'><migd:skip address='0000:06:12.3'/>"
            "</migd:migd></metadata>")
    xml = DOMAIN.format(name="m").replace("<devices>", meta + "<devices>", 1)
    r = hook(dst.control, "m", "migrate", "begin", "-", xml=xml)
    assert r.returncode == 0, r.stderr
    assert "<nova:instance" in r.stdout and "ns0:" not in r.stdout
    assert "0000:06:12.3" in vf_addresses(r.stdout)  # opted out: left as it was
    assert "0000:06:12.3" not in reservations(dst)
    pool_net = ("<interface type='network'><source network='sriov'/><driver name='vfio'/>"
                "</interface></devices>")
    xml = DOMAIN.format(name="n").replace("</devices>", pool_net)
    r = hook(dst.control, "n", "migrate", "begin", "-", xml=xml)
    assert r.returncode == 1 and "network 'sriov' is an SR-IOV pool" in r.stderr
    skip_all = xml.replace("<devices>", "<metadata><migd:migd xmlns:migd='urn:migd:libvirt:1'>"
                                        "<migd:skip/></migd:migd></metadata><devices>", 1)
    r = hook(dst.control, "n", "migrate", "begin", "-", xml=skip_all)
    assert r.returncode == 0 and r.stdout == ""


def test_the_hook_finds_the_socket_in_the_config_and_never_hangs(
        hosts: tuple[DaemonProc, DaemonProc, str], tmp_path: pathlib.Path) -> None:
    _, dst, _ = hosts
    conf = tmp_path / "hook.toml"
    conf.write_text(f'control = "{dst.control}"\n')
    env = {"MIGD_CONTROL": "", "MIGD_CONFIG": str(conf), "MIGD_HOOK_TIMEOUT": "1"}
    r = hook("", "g", "migrate", "begin", "-", xml=DOMAIN.format(name="g"), env=env)
    assert r.returncode == 0 and len(vf_addresses(r.stdout)) == 5, r.stderr
    plain = "<domain type='kvm'><name>p</name><devices><disk type='file'/></devices></domain>"
    os.kill(dst.proc.pid, signal.SIGSTOP)  # a hung daemon
    try:
        t0 = time.monotonic()
        r = hook("", "p", "release", "end", "-", xml=plain, env=env)
        assert r.returncode == 0 and r.stderr == "" and time.monotonic() - t0 < 1.0
        for args, code in (((("g", "release", "end", "-")), 0),
                           ((("g", "migrate", "begin", "-")), 1)):
            t0 = time.monotonic()
            r = hook("", *args, xml=DOMAIN.format(name="g"), env=env)
            took = time.monotonic() - t0
            assert r.returncode == code and took < 5, (r, took)
            assert "did not answer within 1s" in r.stderr and "Traceback" not in r.stderr
            assert len(r.stderr.strip().splitlines()) == 1
    finally:
        os.kill(dst.proc.pid, signal.SIGCONT)
