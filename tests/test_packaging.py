"""The unit file, and the install script staged into a directory."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_unit_keeps_every_cache_the_daemon_keeps_in_its_cache_directory():
    """yapd run by hand points each cache at its folder of the cache dir (CACHE_VARS);
    the unit, whose environment comes first, must name the same ones, or a restart under
    systemd rebuilds what the first start built (minutes of compiling)."""
    from yapd.daemon import CACHE_VARS

    unit = (ROOT / "systemd" / "yapd.service").read_text().splitlines()
    named = dict(line.removeprefix("Environment=").split("=", 1) for line in unit
                 if line.startswith("Environment=") and line.split("=")[1] != "PYTHONUNBUFFERED")
    assert named == {var: f"/var/cache/yapd/{sub}" for var, sub in CACHE_VARS.items()}


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_verifies(tmp_path):
    yapd = shutil.which("yapd") or str(Path(__import__("sys").executable).parent / "yapd")
    unit = tmp_path / "yapd.service"
    unit.write_text((ROOT / "systemd" / "yapd.service").read_text().replace("/opt/yapd/venv/bin/yapd", yapd))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    sec = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True,
                         text=True, timeout=60)
    print(sec.stdout.strip().splitlines()[-1])
    text = unit.read_text()
    for key in ("Type=notify", "WatchdogSec=", "ExecReload=", "RuntimeDirectory=yapd", "CacheDirectory=yapd",
                "StateDirectory=yapd", "LogsDirectory=yapd", "KillMode=mixed", "NoNewPrivileges=yes",
                "ProtectSystem=strict", "DeviceAllow=/dev/nvidiactl", "Restart=on-failure", "User=yapd"):
        assert key in text, key


def test_install_script_staged_keeps_existing_config(tmp_path):
    root = tmp_path / "root"
    cmd = ["bash", str(ROOT / "packaging" / "install.sh"), "--root", str(root), "--skip-venv", "--cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    config = root / "etc/yapd/config.toml"
    assert config.read_text() == (ROOT / "config.example.toml").read_text()
    assert (root / "etc/systemd/system/yapd.service").exists()
    assert (root / "usr/lib/sysusers.d/yapd.conf").exists() and (root / "usr/lib/tmpfiles.d/yapd.conf").exists()
    config.write_text("# mine\n")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "keeping the existing" in r.stdout
    assert config.read_text() == "# mine\n"
    r = subprocess.run(["bash", str(ROOT / "packaging" / "uninstall.sh"), "--root", str(root)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and config.exists() and not (root / "etc/systemd/system/yapd.service").exists()
    r = subprocess.run(["bash", str(ROOT / "packaging" / "uninstall.sh"), "--root", str(root), "--purge"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not config.exists()
