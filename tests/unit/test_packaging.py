"""What ships beside the package: the unit, its copy in the install-at-boot user-data."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "quay-bootstrap.service"


def test_install_at_boot_carries_the_same_unit():
    doc = yaml.safe_load((REPO / "cloud-config" / "install-at-boot.yaml").read_text())
    inline = [f for f in doc["write_files"] if f["path"].endswith("quay-bootstrap.service")]
    assert inline[0]["content"] == UNIT.read_text()


def test_systemd_analyze_verify_passes(tmp_path):
    # verify insists that ExecStart exists; point it at this venv's entry point.
    agent = Path(sys.executable).parent / "quay-bootstrap"
    unit = tmp_path / "quay-bootstrap.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/quay-bootstrap", str(agent)))
    socket_unit = tmp_path / "quay-bootstrap.socket"
    socket_unit.write_text((REPO / "systemd" / "quay-bootstrap.socket").read_text())
    done = subprocess.run(["systemd-analyze", "verify", str(unit), str(socket_unit)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "quay-bootstrap." not in done.stdout + done.stderr


def test_every_cloud_config_enables_the_unit_and_writes_the_config():
    for path in sorted((REPO / "cloud-config").glob("*.yaml")):
        text = path.read_text()
        assert text.startswith("#cloud-config\n"), path
        doc = yaml.safe_load(text)
        paths = [f["path"] for f in doc["write_files"]]
        assert "/etc/quay-bootstrap/config.yaml" in paths, path
        assert ["systemctl", "enable", "--now", "--no-block", "quay-bootstrap.service"] in \
            doc["runcmd"], path
        for item in doc["write_files"]:
            if item["path"] == "/etc/quay-bootstrap/config.yaml":
                from quay_bootstrap.config import parse_config

                parse_config(item["content"], f"{path.name}: config.yaml")  # valid agent config
