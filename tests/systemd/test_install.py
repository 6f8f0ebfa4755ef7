"""scripts/install and scripts/uninstall, into a scratch root (DESTDIR).

The installed files are then used as they are, with no path changed: in a private
mount namespace the scratch root's /opt and /usr/local/bin are mounted where the
files say they are, and there systemd-analyze verifies the installed units and the
installed libvirt hook runs as libvirt runs it (empty environment)."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
PLAIN = "<domain type='kvm'><name>p</name><devices><disk type='file'/></devices></domain>"
ONE_VF = ("<domain type='kvm'><name>v</name><devices><hostdev mode='subsystem' type='pci'>"
          "<source><address domain='0x0000' bus='0x06' slot='0x12' function='0x2'/></source>"
          "</hostdev></devices></domain>")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("root")
    (root / "etc/migd").mkdir(parents=True)
    (root / "etc/migd/migd.toml").write_text('log_level = "debug"\n')  # an operator's
    r = subprocess.run([str(REPO / "scripts/install"), "--prefix", "/opt/migd"], cwd=REPO,
                       env={**os.environ, "DESTDIR": str(root)}, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    return root


def in_root(root: pathlib.Path, script: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` where the scratch root's /opt and /usr/local/bin are the real ones."""
    assert shutil.which("unshare"), "util-linux's unshare is needed (as root)"
    setup = (f"mount --bind {root}/opt /opt && "
             f"mount --bind {root}/usr/local/bin /usr/local/bin && ")
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           setup + script], capture_output=True, text=True, timeout=120)


def test_the_layout_and_the_operators_config_kept(installed: pathlib.Path) -> None:
    root = installed
    for cmd in ("migd", "migd-libvirt-hook"):
        assert os.readlink(root / "usr/local/bin" / cmd) == f"/opt/migd/bin/{cmd}"
        first = (root / "opt/migd/bin" / cmd).read_text().splitlines()[0]
        assert first == "#!/opt/migd/bin/python"  # the final path, not the scratch one
    assert (root / "etc/migd/migd.toml").read_text() == 'log_level = "debug"\n'
    assert "hook_addresses" in (root / "etc/migd/migd.toml.example").read_text()
    hook = root / "etc/libvirt/hooks/qemu.d/migd"
    assert hook.stat().st_mode & 0o777 == 0o755
    assert oct((root / "etc/migd").stat().st_mode & 0o777) == "0o750"
    for unit in ("migd.service", "migd.socket"):
        assert (root / "etc/systemd/system" / unit).read_text() == \
            (REPO / "systemd" / unit).read_text()  # as shipped: no path substituted


def test_the_installed_units_verify_and_the_installed_hook_runs(
        installed: pathlib.Path) -> None:
    root = installed
    units = f"{root}/etc/systemd/system"
    r = in_root(root, f"systemd-analyze verify {units}/migd.service {units}/migd.socket")
    ours = [line for line in (r.stdout + r.stderr).splitlines() if "migd." in line]
    assert r.returncode == 0 and not ours, r.stdout + r.stderr
    hook = f"{root}/etc/libvirt/hooks/qemu.d/migd"
    r = in_root(root, f"/usr/local/bin/migd --version && echo \"{PLAIN}\" | "
                      f"env -i {hook} p migrate begin - && echo \"{PLAIN}\" | "
                      f"env -i {hook} p release end -")
    assert r.returncode == 0 and r.stdout.startswith("migd "), r.stdout + r.stderr
    assert r.stderr == ""  # no VFs: nothing to do, and the daemon is not asked
    # A VM with a VF and no daemon: one line, and libvirt cancels the migration.
    r = in_root(root, f"echo \"{ONE_VF}\" | env -i {hook} v migrate begin -")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "cannot reach migd at /run/migd/migd.sock" in r.stderr


def test_uninstall_removes_what_install_put_but_the_operators_files(
        installed: pathlib.Path) -> None:
    root = installed
    r = subprocess.run([str(REPO / "scripts/uninstall"), "--prefix", "/opt/migd"],
                       env={**os.environ, "DESTDIR": str(root)}, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert not (root / "opt/migd").exists() and not (root / "usr/local/bin/migd").exists()
    assert not (root / "etc/systemd/system/migd.service").exists()
    assert not (root / "etc/libvirt/hooks/qemu.d/migd").exists()
    assert (root / "etc/migd/migd.toml").exists()  # keys and config stay


LIBVIRT_DOMAIN = """<domain type='qemu'>
  <name>migd-plain</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <graphics type='vnc' autoport='yes' listen='127.0.0.1'/>
    <memballoon model='none'/>
  </devices>
</domain>"""

# libvirtd started by hand with every directory of its own (config, run, state,
# cache, logs) in the scratch directory, mounted over the system's in a private
# mount namespace: nothing of the host's libvirt is touched, nothing outlives it.
LIBVIRTD = r"""
S={scratch}
mkdir -p $S/run $S/lib $S/cache $S/log /run/libvirt /var/lib/libvirt /var/cache/libvirt \
    /var/log/libvirt /etc/libvirt
cp -a /etc/libvirt/. $S/etc/
printf 'user = "root"\ngroup = "root"\nsecurity_driver = "none"\nstdio_handler = "file"\n' \
    >> $S/etc/qemu.conf
mkdir -p $S/etc/hooks/qemu.d
cp {hook} $S/etc/hooks/qemu.d/migd
printf '#!/bin/sh\necho "$@" >> {scratch}/hook.trace\n' > $S/etc/hooks/qemu.d/zz-trace
chmod 0755 $S/etc/hooks/qemu.d/zz-trace
mount --bind $S/etc /etc/libvirt
for d in run:/run/libvirt lib:/var/lib/libvirt cache:/var/cache/libvirt log:/var/log/libvirt; do
    mount --bind $S/${{d%%:*}} ${{d#*:}}
done
libvirtd --daemon --pid-file=$S/libvirtd.pid
trap 'kill $(cat $S/libvirtd.pid) 2>/dev/null' EXIT
for i in $(seq 100); do [ -S /run/libvirt/libvirt-sock ] && break; sleep 0.1; done
V="virsh -q -c qemu:///system"
$V define $S/dom.xml >/dev/null
$V start migd-plain
$V domstate migd-plain
$V destroy migd-plain
$V undefine migd-plain >/dev/null
"""


def test_a_libvirt_vm_starts_and_stops_with_the_installed_hook(
        installed: pathlib.Path, tmp_path: pathlib.Path) -> None:
    for tool in ("libvirtd", "virsh", "qemu-system-x86_64"):
        assert shutil.which(tool), f"{tool} is missing: scripts/setup installs libvirt (root)"
    scratch = tmp_path / "libvirt"
    (scratch / "etc").mkdir(parents=True)
    (scratch / "dom.xml").write_text(LIBVIRT_DOMAIN)
    hook = installed / "etc/libvirt/hooks/qemu.d/migd"
    r = in_root(installed, LIBVIRTD.format(scratch=scratch, hook=hook))
    log = (scratch / "log/libvirtd.log")
    assert r.returncode == 0, r.stdout + r.stderr + (log.read_text()[-3000:] if log.exists()
                                                     else "")
    assert "Hook script execution failed" not in r.stderr
    assert "running" in r.stdout
    # libvirt ran the hooks (ours first, then the tracer) at each step of the VM's life.
    trace = (scratch / "hook.trace").read_text().splitlines()
    assert "migd-plain prepare begin -" in trace and "migd-plain release end -" in trace
