"""The shipped unit, checked by systemd's own tools."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys
import tomllib

from migd import config

ROOT = pathlib.Path(__file__).parents[2]
UNIT = ROOT / "systemd" / "migd.service"
EXAMPLE = ROOT / "systemd" / "migd.toml"


def analyze() -> str:
    tool = shutil.which("systemd-analyze")
    assert tool, "install systemd (scripts/setup does, as root): the unit is checked with it"
    return tool


def test_unit_verifies(tmp_path: pathlib.Path) -> None:
    # verify wants ExecStart to exist: point it at this checkout's migd.
    migd = pathlib.Path(sys.executable).with_name("migd")
    unit = tmp_path / "migd.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/migd", str(migd)))
    r = subprocess.run([analyze(), "verify", str(unit)], capture_output=True, text=True,
                       timeout=60)
    ours = [line for line in (r.stdout + r.stderr).splitlines() if "migd.service" in line]
    assert r.returncode == 0 and not ours, ours


def test_unit_exposure_score_is_at_most_2_5() -> None:
    r = subprocess.run([analyze(), "security", "--offline=true", str(UNIT)],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for migd.service: (\d+\.\d+)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.5
    text = UNIT.read_text()
    for directive in ("Type=notify", "WatchdogSec=", "RuntimeDirectory=migd",
                      "StateDirectory=migd", "ConfigurationDirectory=migd", "DeviceAllow=char-vfio",
                      "NoNewPrivileges=yes", "ProtectSystem=strict", "ExecReload="):
        assert directive in text


def test_example_config_documents_every_key() -> None:
    raw = tomllib.loads(EXAMPLE.read_text())
    assert set(raw) - {"defaults", "devices"} == set(config.TOP)
    assert set(raw["defaults"]) == set(config.DEFAULTS)
    cfg = config.load(str(EXAMPLE))
    assert cfg.devices[0].name == "vf0" and cfg.defaults.chunk_size == 1 << 20
