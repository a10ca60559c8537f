"""What ships beside the package: the units, their copies in the user-data examples, Flatcar's
Ignition and coreos-cloudinit files."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
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


# coreos-cloudinit's dialect (no runcmd; units under coreos:), checked on its own below.
FLATCAR = REPO / "cloud-config" / "flatcar.yaml"
IGNITION = REPO / "cloud-config" / "flatcar.ign"
CONTAINER_UNIT = REPO / "systemd" / "quay-bootstrap-container.service"


def test_every_cloud_config_enables_the_unit_and_writes_the_config():
    for path in sorted(set((REPO / "cloud-config").glob("*.yaml")) - {FLATCAR}):
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


def _flatcar():
    """(files, units) of flatcar.yaml and of flatcar.ign, as {path: (mode, text)}, {name: text}."""
    doc = yaml.safe_load(FLATCAR.read_text())
    yaml_files = {f["path"]: (int(f["permissions"], 8), f["content"]) for f in doc["write_files"]}
    yaml_units = {u["name"]: u["content"] for u in doc["coreos"]["units"] if u.get("enable")}
    ign = json.loads(IGNITION.read_text())
    prefix = "data:,"
    ign_files = {f["path"]: (f["mode"], urllib.parse.unquote(f["contents"]["source"][len(prefix):]))
                 for f in ign["storage"]["files"] if f["contents"]["source"].startswith(prefix)}
    ign_units = {u["name"]: u["contents"] for u in ign["systemd"]["units"] if u.get("enabled")}
    return (yaml_files, yaml_units), (ign_files, ign_units)


def test_flatcar_ignition_and_cloudinit_write_the_same_files_and_units():
    (yaml_files, yaml_units), (ign_files, ign_units) = _flatcar()
    assert yaml_files == ign_files and yaml_units == ign_units
    assert yaml_units["quay-bootstrap.service"] == CONTAINER_UNIT.read_text()
    assert set(yaml_units) == {"quay-bootstrap.service", "quay-bootstrap-secrets.service"}


def test_flatcar_uses_the_same_agent_config_and_secrets_script_as_s3_compatible():
    (files, _), _ = _flatcar()
    doc = yaml.safe_load((REPO / "cloud-config" / "s3-compatible.yaml").read_text())
    other = {f["path"]: f["content"] for f in doc["write_files"]}
    assert files["/etc/quay-bootstrap/config.yaml"][1] == other["/etc/quay-bootstrap/config.yaml"]
    assert files["/opt/quay-bootstrap/secrets.py"][1] == \
        other["/usr/local/sbin/quay-bootstrap-secrets"]
    assert files["/etc/quay-bootstrap/config.yaml"][0] == 0o640
    assert files["/opt/quay-bootstrap/secrets.py"][0] == 0o700


def test_flatcar_ign_passes_ignition_validate():
    tool = shutil.which("ignition-validate")
    if tool is None:
        pytest.fail("ignition-validate is missing: `make deps` installs Debian's ignition package")
    done = subprocess.run([tool, str(IGNITION)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout + done.stderr == "", done.stdout + done.stderr


def test_the_flatcar_units_pass_systemd_analyze_verify(tmp_path):
    (_, units), _ = _flatcar()
    for name, text in units.items():
        (tmp_path / name).write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", *(str(tmp_path / n) for n in units)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "quay-bootstrap" not in done.stdout + done.stderr
