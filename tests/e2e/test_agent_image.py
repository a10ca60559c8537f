"""The agent as a container image (Containerfile), built by `make image`'s code on the local
Debian base, run against the test bed's engine: `run --once` in it, and the agent started
exactly as systemd/quay-bootstrap-container.service (Flatcar's unit) starts it.

The stack folder has the same path on the host and in the agent's container (the agent names it
to the engine when it mounts it into Quay), as the unit's mounts make it on a real host.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from tests.e2e import machine
from tests.integration.conftest import free_port, wait_for
from tests.testbed.stacks import sample_stack

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "quay-bootstrap-container.service"
DOCKER = shutil.which("docker") or "/usr/bin/docker"


@pytest.fixture(scope="module")
def agent_image(docker_client, tmp_path_factory) -> str:
    tag = f"qb-e2e-agent:{uuid.uuid4().hex[:8]}"
    yield machine.agent_image(docker_client, tmp_path_factory.mktemp("agent-image"), tag)
    docker_client.images.remove(tag, force=True)


@pytest.fixture
def node(moto_endpoint, fake_images, docker_client, tmp_path):
    """A node's config (the bucket on moto with the sample stack) and the folders the unit
    mounts: /etc/quay-bootstrap (here a folder of the test's) and /var/lib/quay-bootstrap."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    bucket = f"qb-image-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    for key, data in sample_stack().items():
        s3.put_object(Bucket=bucket, Key=f"conf/stack/{key}", Body=data)
    state = Path("/var/lib/quay-bootstrap") / f"e2e-image-{uuid.uuid4().hex[:8]}"
    state.mkdir(parents=True)
    etc = tmp_path / "etc-quay-bootstrap"
    etc.mkdir()
    port, listen, name = free_port(), free_port(), f"quay-image-{uuid.uuid4().hex[:6]}"
    config = {
        "stack": {"source": f"s3://{bucket}/conf/stack", "endpoint_url": moto_endpoint,
                  "region": "us-east-1", "dir": str(state / "stack"), "settle": "0s"},
        "image": {"reference": fake_images["v3.9.0"]},
        "container": {"name": name, "network_mode": "host", "ports": [], "sysctls": {},
                      "env": {"PORT": str(port)}},
        "health": {"url": f"http://127.0.0.1:{port}/health/instance", "interval": "1s",
                   "start_period": "30s"},
        "report": {"autoscaling": False, "listen": f"127.0.0.1:{listen}",
                   "state_file": str(state / "state.json")},
    }
    (etc / "config.yaml").write_text(yaml.safe_dump(config))
    (etc / "environment").write_text("AWS_ACCESS_KEY_ID=testing\nAWS_SECRET_ACCESS_KEY=testing\n")
    yield {"etc": etc, "state": state, "name": name, "port": port, "listen": listen}
    for container in docker_client.containers.list(all=True):
        if container.name in (name, "quay-bootstrap-e2e"):
            container.remove(force=True)
    shutil.rmtree(state, ignore_errors=True)


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/instance", timeout=2) as got:
            return got.status == 200
    except OSError:
        return False


def test_run_once_in_the_image_brings_up_quay(agent_image, node, docker_client, testbed):
    socket_path = testbed["docker_host"].replace("unix://", "")
    agent = docker_client.containers.run(
        agent_image, ["run", "--once"], detach=True, network_mode="host",
        environment={"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "DOCKER_HOST": "unix:///run/docker.sock"},
        volumes={socket_path: {"bind": "/run/docker.sock", "mode": "rw"},
                 str(node["etc"]): {"bind": "/etc/quay-bootstrap", "mode": "ro"},
                 str(node["state"]): {"bind": str(node["state"]), "mode": "rw"}})
    try:
        result = agent.wait(timeout=180)
        logs = agent.logs().decode(errors="replace")
        assert result["StatusCode"] == 0, logs
    finally:
        agent.remove(force=True)
    quay = docker_client.containers.get(node["name"])
    assert quay.status == "running" and _healthy(node["port"]), logs
    live = node["state"] / "stack" / "current"
    assert (live / "config.yaml").read_bytes() == sample_stack()["config.yaml"]


def _unit_commands(unit: str, image: str, node: dict, socket_path: str) -> dict:
    """The unit's ExecStartPre/ExecStart/ExecStop command lines as systemd would run them (line
    continuations joined, ${QB_IMAGE} expanded), with the host paths this test bed has instead
    of a real host's: its engine's socket, a private /etc/quay-bootstrap, the e2e state folder."""
    text = re.sub(r"\\\n\s*", "", unit)
    env = dict(re.findall(r"^Environment=(\w+)=(.*)$", text, flags=re.M))
    env["QB_IMAGE"] = image
    commands: dict = {"ExecStartPre": [], "ExecStart": [], "ExecStop": []}
    for key, value in re.findall(r"^(ExecStartPre|ExecStart|ExecStop)=(.*)$", text, flags=re.M):
        value = value.lstrip("-")
        value = value.replace("${QB_IMAGE}", image)
        value = value.replace("/run/docker.sock:", f"{socket_path}:")
        value = value.replace("/etc/quay-bootstrap:/etc/quay-bootstrap", f"{node['etc']}:/etc/quay-bootstrap")
        value = re.sub(r"/etc/quay-bootstrap(?=/| )", str(node["etc"]), value)
        value = value.replace("/var/lib/quay-bootstrap:/var/lib/quay-bootstrap",
                              f"{node['state']}:{node['state']}")
        value = value.replace("--name quay-bootstrap ", "--name quay-bootstrap-e2e ")
        value = re.sub(r"quay-bootstrap$", "quay-bootstrap-e2e", value)
        commands[key].append(value)
    return {"env": env, **commands}


def test_the_flatcar_unit_runs_the_agent_which_brings_up_quay_and_stops_alone(
        agent_image, node, docker_client, testbed):
    socket_path = testbed["docker_host"].replace("unix://", "")
    plan = _unit_commands(UNIT.read_text(), agent_image, node, socket_path)
    env = {**os.environ, **plan["env"], "DOCKER_HOST": testbed["docker_host"]}
    for command in plan["ExecStartPre"]:
        subprocess.run(shlex.split(command), env=env, check=False, capture_output=True)
    assert len(plan["ExecStart"]) == 1 and "--network host" in plan["ExecStart"][0]
    agent = subprocess.Popen(shlex.split(plan["ExecStart"][0]), env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def status() -> dict:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{node['listen']}/status",
                                            timeout=2) as got:
                    return json.loads(got.read())
            except OSError:
                return {}
        def logs() -> str:
            done = subprocess.run([DOCKER, "logs", "--tail", "40", "quay-bootstrap-e2e"], env=env,
                                  capture_output=True, text=True)
            return f"the agent's status healthy; its log:\n{done.stdout}{done.stderr}"
        def healthy() -> bool:
            if agent.poll() is not None:
                pytest.fail(f"the agent's docker run exited {agent.returncode}:\n"
                            f"{agent.stdout.read()[-3000:]}")
            return status().get("state") == "healthy"
        wait_for(healthy, 180, logs)
        quay = docker_client.containers.get(node["name"])
        started = quay.attrs["State"]["StartedAt"]
        assert _healthy(node["port"])
        for command in plan["ExecStop"]:
            subprocess.run(shlex.split(command), env=env, check=True, capture_output=True)
        output = agent.communicate(timeout=60)[0]
        assert agent.returncode == 0, output
    finally:
        if agent.poll() is None:
            agent.kill()
    quay.reload()
    assert quay.status == "running" and quay.attrs["State"]["StartedAt"] == started
    assert not [c for c in docker_client.containers.list(all=True)
                if c.name == "quay-bootstrap-e2e"]


def test_install_sh_installs_offline_from_wheels_and_enables_the_unit(docker_client, tmp_path):
    """`make install`'s script, the generic path for image builders (the boot test installs
    the .deb)."""
    out = machine.install_sh_check(docker_client, tmp_path)
    assert "quay-bootstrap installed in /opt/quay-bootstrap" in out, out
    assert "quay-bootstrap 0.1.0" in out and "quay-bootstrap.service" in out, out
    assert "config.example.yaml" in out, out
    assert "ExecStart=/usr/local/bin/quay-bootstrap run" in out, out
