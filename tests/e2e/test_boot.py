"""The boot test: a real systemd + cloud-init machine (a container of the test bed's dockerd,
systemd as PID 1) given one of cloud-config/ as user-data, ends with a healthy Quay.

The machine uses host networking, so the agent inside reaches moto and the registry on
127.0.0.1, and the test bed's Docker socket, so the Quay it starts is a sibling container.
The tests run in file order on one booted machine: each step starts where the last one ended.
"""
from __future__ import annotations

import json
import re
import shutil
import socket
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.e2e import machine
from tests.integration.conftest import free_port, wait_for
from tests.testbed.stacks import sample_stack

REPO = Path(__file__).resolve().parents[2]
UNIT = "quay-bootstrap.service"


class Machine:
    def __init__(self, container):
        self.container = container

    def sh(self, command: str, check: bool = True) -> str:
        code, out = self.container.exec_run(["/bin/sh", "-c", command])
        text = out.decode(errors="replace")
        if check and code != 0:
            raise AssertionError(f"`{command}` exited {code}:\n{text}")
        return text

    def show(self, prop: str) -> str:
        return self.sh(f"systemctl show -p {prop} --value {UNIT}").strip()


@pytest.fixture(scope="module")
def deb(tmp_path_factory) -> Path:
    return machine.debian_package(tmp_path_factory.mktemp("deb"))


@pytest.fixture(scope="module")
def node_image(docker_client, tmp_path_factory, deb):
    return machine.node_image(docker_client, tmp_path_factory.mktemp("e2e-build"), deb)


@pytest.fixture(scope="module")
def world(moto_endpoint, fake_images, docker_client, tmp_path_factory):
    """The cluster's bucket on moto with the sample stack; folders shared with the machine."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    bucket = f"qb-e2e-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    for key, data in sample_stack().items():
        s3.put_object(Bucket=bucket, Key=f"conf/stack/{key}", Body=data)
    # The secrets the example's boot script reads from SSM Parameter Store, held by moto: the
    # store's keys are moto's, the registry password is not used (the test registry is open).
    ssm = boto3.client("ssm", endpoint_url=moto_endpoint, region_name="us-east-1",
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    secrets = {name: f"e2e-{name.rsplit('/', 1)[-1]}" for name in ssm_parameters()}
    secrets.update({name: "testing" for name in secrets if "access-key" in name})
    for name, value in secrets.items():
        ssm.put_parameter(Name=name, Value=value, Type="SecureString", Overwrite=True)
    # The stack folder must have the same path on the host and in the machine: the machine's
    # agent names it to the host's dockerd when it mounts it into Quay.
    shared = Path("/var/lib/quay-bootstrap") / f"e2e-{uuid.uuid4().hex[:8]}"
    shared.mkdir(parents=True)
    control = tmp_path_factory.mktemp("e2e-control")
    control.chmod(0o777)
    yield {"bucket": bucket, "moto": moto_endpoint, "shared": shared, "control": control,
           "secrets": secrets,
           "image": fake_images["v3.9.0"], "port": free_port(), "listen": free_port(),
           "name": f"quay-e2e-{uuid.uuid4().hex[:6]}"}
    shutil.rmtree(shared, ignore_errors=True)
    try:
        shared.parent.rmdir()
    except OSError:
        pass


SECRETS_SCRIPT = "/usr/local/sbin/quay-bootstrap-secrets"


def example() -> dict:
    return yaml.safe_load((REPO / "cloud-config/s3-compatible.yaml").read_text())


def ssm_parameters() -> list:
    """The SSM parameters the example's boot script reads."""
    script = next(f for f in example()["write_files"] if f["path"] == SECRETS_SCRIPT)
    return re.findall(r'"ssm:([^"]+)"', script["content"])


def user_data(world) -> str:
    """cloud-config/s3-compatible.yaml, pointed at the test bed."""
    doc = example()
    files = {f["path"]: f for f in doc["write_files"]}
    # The boot script as written, reading SSM at moto: the machine has no instance profile,
    # so moto's test credentials stand in for it in the script's environment only.
    fetch = [n for n, cmd in enumerate(doc["runcmd"]) if SECRETS_SCRIPT in str(cmd)]
    assert len(fetch) == 1, doc["runcmd"]
    doc["runcmd"][fetch[0]] = doc["runcmd"][fetch[0]].replace(
        SECRETS_SCRIPT, f"env AWS_ENDPOINT_URL_SSM={world['moto']} AWS_ACCESS_KEY_ID=testing "
                        f"AWS_SECRET_ACCESS_KEY=testing {SECRETS_SCRIPT}")
    config = yaml.safe_load(files["/etc/quay-bootstrap/config.yaml"]["content"])
    config["stack"].update(source=f"s3://{world['bucket']}/conf/stack",
                           endpoint_url=world["moto"], dir=str(world["shared"] / "stack"))
    config["image"] = {"reference": world["image"]}
    config["container"] = {"name": world["name"], "network_mode": "host", "ports": [],
                           "sysctls": {}, "env": {"PORT": str(world["port"])},
                           "volumes": [f"{world['control']}:/control"]}
    config["health"] = {"url": f"http://127.0.0.1:{world['port']}/health/instance",
                        "interval": "1s", "start_period": "30s"}
    config["report"] = {"autoscaling": False, "listen": f"127.0.0.1:{world['listen']}"}
    files["/etc/quay-bootstrap/config.yaml"]["content"] = yaml.safe_dump(config)
    return "#cloud-config\n" + yaml.safe_dump(doc)


@pytest.fixture(scope="module")
def booted(node_image, deb, world, docker_client, testbed, tmp_path_factory):
    seed = tmp_path_factory.mktemp("nocloud")
    (seed / "meta-data").write_text("instance-id: qb-e2e-1\nlocal-hostname: quay-node-1\n")
    (seed / "user-data").write_text(user_data(world))
    socket_path = testbed["docker_host"].replace("unix://", "")
    container = docker_client.containers.run(
        node_image, detach=True, name=f"qb-e2e-machine-{uuid.uuid4().hex[:6]}",
        stop_signal="SIGRTMIN+3",  # systemd's halt
        network_mode="host", cap_add=["SYS_ADMIN", "NET_ADMIN"],
        security_opt=["seccomp=unconfined", "apparmor=unconfined"],
        tmpfs={"/run": "", "/run/lock": "", "/tmp": ""}, environment={"container": "docker"},
        volumes={"/sys/fs/cgroup": {"bind": "/sys/fs/cgroup", "mode": "rw"},
                 str(seed): {"bind": "/var/lib/cloud/seed/nocloud", "mode": "ro"},
                 socket_path: {"bind": "/run/docker.sock", "mode": "rw"},
                 str(world["shared"]): {"bind": str(world["shared"]), "mode": "rw"},
                 str(REPO / "cloud-config"): {"bind": "/src/cloud-config", "mode": "ro"},
                 str(deb.parent): {"bind": "/debs", "mode": "ro"}})
    node = Machine(container)
    try:
        yield node
    finally:
        print(node.sh("journalctl -u quay-bootstrap --no-pager | tail -40", check=False))
        container.remove(force=True)
        for other in docker_client.containers.list(all=True):
            if other.name.startswith(world["name"]):
                other.remove(force=True)


def quay_started_at(docker_client, world) -> str:
    return docker_client.containers.get(world["name"]).attrs["State"]["StartedAt"]


def test_the_package_is_lintian_clean_of_errors(deb):
    import subprocess

    done = subprocess.run(["lintian", "--tag-display-limit", "0", str(deb)],
                          capture_output=True, text=True)
    errors = [line for line in done.stdout.splitlines() if line.startswith("E:")]
    assert done.returncode == 0 and errors == [], done.stdout + done.stderr


def test_the_package_enables_the_service_and_starts_nothing(node_image, docker_client):
    """At image-build time: the service enabled (it starts at boot once a config exists), the
    socket installed but not enabled, the command on PATH, no config written."""
    out = docker_client.containers.run(node_image, ["/bin/sh", "-c",
        "ls /etc/systemd/system/multi-user.target.wants/ /etc/systemd/system/sockets.target.wants/"
        " 2>/dev/null; ls /etc/quay-bootstrap; readlink -f /usr/bin/quay-bootstrap;"
        " grep ^ExecStart= /lib/systemd/system/quay-bootstrap.service; quay-bootstrap version"],
        network_mode="none", remove=True).decode()
    assert "quay-bootstrap.service" in out and "quay-bootstrap.socket" not in out, out
    assert "config.example.yaml" in out and "config.yaml\n" not in out, out
    assert "/opt/quay-bootstrap/bin/quay-bootstrap" in out, out
    assert "ExecStart=/usr/bin/quay-bootstrap run" in out, out
    assert "0.1.0" in out, out


def test_every_cloud_config_example_passes_the_schema(booted):
    # flatcar.yaml is coreos-cloudinit's dialect, not cloud-init's (tests/unit/test_packaging.py)
    for path in sorted(set((REPO / "cloud-config").glob("*.yaml")) - {REPO / "cloud-config/flatcar.yaml"}):
        out = booted.sh(f"cloud-init schema --config-file /src/cloud-config/{path.name}")
        assert f"Valid cloud-config: /src/cloud-config/{path.name}" in out, out


def test_the_unit_verifies(booted):
    out = booted.sh(f"systemd-analyze verify /lib/systemd/system/{UNIT} 2>&1", check=False)
    assert "quay-bootstrap" not in out, out


def test_boot_ends_with_a_healthy_quay(booted, world, docker_client):
    status = booted.sh("cloud-init status --wait", check=False)
    assert "status: done" in status, status
    result = json.loads(booted.sh("cat /run/cloud-init/result.json"))
    assert result["v1"]["errors"] == [], result
    wait_for(lambda: booted.show("ActiveState") == "active", 120, "the unit active")
    assert docker_client.containers.get(world["name"]).status == "running"
    assert "healthy" in wait_for(lambda: booted.show("StatusText"), 30, "a status text")
    version = booted.sh(f"readlink {world['shared']}/stack/current").strip()
    assert version.startswith("versions/")


def test_the_secrets_were_read_at_boot_into_root_only_files(booted, world):
    for path in ("/etc/quay-bootstrap/environment", "/etc/quay-bootstrap/registry-password"):
        assert booted.sh(f"stat -c '%a %U' {path}").split() == ["600", "root"], path
    environment = booted.sh("cat /etc/quay-bootstrap/environment").split()
    assert environment == ["AWS_ACCESS_KEY_ID=testing", "AWS_SECRET_ACCESS_KEY=testing"]
    password = next(v for k, v in world["secrets"].items() if "registry" in k)
    assert booted.sh("cat /etc/quay-bootstrap/registry-password").strip() == password


def test_the_agent_runs_in_the_units_sandbox(booted, world):
    # Proof that the boot test ran the agent hardened, not under a unit whose directives the
    # container made systemd drop: seccomp on, capabilities cut to CAP_CHOWN|CAP_DAC_OVERRIDE.
    pid = booted.show("MainPID")
    status = dict(line.split(":", 1) for line in booted.sh(f"cat /proc/{pid}/status").splitlines())
    assert status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2"
    assert int(status["CapBnd"], 16) == int(status["CapEff"], 16) == 0b11
    assert status["Umask"].strip() == "0077"
    # ... and Quay can still read the stack the agent wrote under that umask.
    live = f"{world['shared']}/stack/current"
    assert booted.sh(f"stat -L -c '%a %u' {live} {live}/config.yaml").split() == \
        ["750", "1001", "640", "1001"]


def test_stopping_the_agent_leaves_quay_running(booted, world, docker_client):
    before = quay_started_at(docker_client, world)
    booted.sh(f"systemctl stop {UNIT}")
    assert booted.show("ActiveState") == "inactive"
    quay = docker_client.containers.get(world["name"])
    assert quay.status == "running" and quay.attrs["State"]["StartedAt"] == before
    booted.sh(f"systemctl start {UNIT}")
    wait_for(lambda: booted.show("ActiveState") == "active", 60, "the unit active again")
    assert quay_started_at(docker_client, world) == before


def test_a_killed_agent_is_restarted_by_systemd_and_adopts_quay(booted, world, docker_client):
    before = quay_started_at(docker_client, world)
    # systemctl may answer nothing while the unit changes state: read the count until it does.
    def restarts() -> int:
        value = booted.show("NRestarts")
        return int(value) if value.isdigit() else -1

    before_kill = wait_for(lambda: restarts() + 1, 30, "systemd's restart count") - 1
    booted.sh(f"systemctl kill -s KILL {UNIT}")
    wait_for(lambda: restarts() > before_kill, 30, "systemd restarting it")
    wait_for(lambda: booted.show("ActiveState") == "active", 60, "the unit active again")
    assert quay_started_at(docker_client, world) == before


def test_upgrading_the_package_restarts_the_agent_and_leaves_quay_running(booted, world, deb,
                                                                          docker_client):
    before, agent = quay_started_at(docker_client, world), booted.show("MainPID")
    booted.sh(f"dpkg -i /debs/{deb.name}")  # the same version again: dpkg's upgrade path
    wait_for(lambda: booted.show("MainPID") not in (agent, "0", ""), 60, "a new agent")
    wait_for(lambda: booted.show("ActiveState") == "active", 60, "the unit active again")
    assert booted.sh("systemctl is-enabled quay-bootstrap.service").strip() == "enabled"
    assert quay_started_at(docker_client, world) == before


def test_on_its_socket_a_check_made_while_the_agent_is_stopped_is_answered(booted, world,
                                                                         docker_client):
    """quay-bootstrap.socket, enabled as the README says: systemd holds /ready's socket, and a
    load balancer's check sent while no agent runs starts the agent and gets its 200."""
    before = quay_started_at(docker_client, world)
    booted.sh("mkdir -p /etc/systemd/system/quay-bootstrap.socket.d && printf '[Socket]\\n"
              f"ListenStream=\\nListenStream=127.0.0.1:{world['listen']}\\n' "
              "> /etc/systemd/system/quay-bootstrap.socket.d/listen.conf")
    booted.sh(f"systemctl stop {UNIT} && systemctl daemon-reload && "
              f"systemctl enable --now quay-bootstrap.socket && systemctl start {UNIT}")
    assert "endpoint.inherited" in booted.sh(f"journalctl -u {UNIT} --no-pager -n 200")
    booted.sh(f"systemctl stop {UNIT}")
    assert booted.show("ActiveState") == "inactive"
    try:
        with socket.create_connection(("127.0.0.1", world["listen"]), timeout=60) as check:
            check.sendall(b"GET /ready HTTP/1.1\r\nHost: lb\r\n\r\n")
            answer = check.makefile("rb").readline()
        assert answer.startswith(b"HTTP/1.1 200"), answer
        wait_for(lambda: booted.show("ActiveState") == "active", 60, "the agent started by it")
        assert quay_started_at(docker_client, world) == before
    finally:  # as the other steps expect the machine: the socket not enabled
        booted.sh("systemctl disable --now quay-bootstrap.socket")


def test_a_broken_config_fails_with_78_and_does_not_restart_loop(booted, world, docker_client):
    booted.sh("cp /etc/quay-bootstrap/config.yaml /tmp/config.yaml.good")
    booted.sh("printf 'stack: [unclosed\\n' > /etc/quay-bootstrap/config.yaml")
    booted.sh(f"systemctl restart {UNIT}", check=False)
    wait_for(lambda: booted.show("ActiveState") == "failed", 30, "the unit failed")
    assert booted.show("ExecMainStatus") == "78"
    restarts = booted.show("NRestarts")
    time.sleep(7)  # longer than RestartSec
    assert booted.show("ActiveState") == "failed" and booted.show("NRestarts") == restarts
    journal = booted.sh(f"journalctl -u {UNIT} --no-pager")
    assert "the agent config is not valid YAML" in journal
    assert docker_client.containers.get(world["name"]).status == "running"


def test_removing_the_package_stops_the_agent_and_leaves_quay_and_the_stack(booted, world,
                                                                           docker_client):
    before = quay_started_at(docker_client, world)
    booted.sh("cp /tmp/config.yaml.good /etc/quay-bootstrap/config.yaml")
    booted.sh("dpkg --purge quay-bootstrap")
    assert booted.show("ActiveState") in ("inactive", "failed")
    assert booted.sh("test -e /opt/quay-bootstrap/bin || echo gone").strip() == "gone"
    assert booted.sh("test -f /etc/quay-bootstrap/config.yaml && echo kept").strip() == "kept"
    assert booted.sh(f"readlink {world['shared']}/stack/current").startswith("versions/")
    quay = docker_client.containers.get(world["name"])
    assert quay.status == "running" and quay.attrs["State"]["StartedAt"] == before
