"""Stack sources on the real stores (moto S3 over HTTP, the GCS emulator, a directory) and a way
to run the agent's CLI against them and look at what is live on disk."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import pytest
import yaml

from quay_bootstrap.cli import main
from tests.testbed.stacks import sample_stack

PREFIX = "conf/stack"
# A daemon tuned for tests: seconds, not minutes.
FAST = {"interval": "0.5s", "timeout": "1s", "failure_threshold": 2, "start_period": "3s"}
BACKOFF = {"backoff_initial": "1s", "backoff_max": "4s", "unhealthy_after": 3, "window": "10m"}


@dataclass
class Backend:
    """A stack source on one kind of store, and the agent config that reads it."""

    kind: str
    url: str
    put: Callable[..., None]
    delete: Callable[[str], None]
    stack_options: Dict[str, object] = field(default_factory=dict)
    env: Dict[str, str] = field(default_factory=dict)

    def upload(self, files: Dict[str, bytes]) -> None:
        for key, data in files.items():
            self.put(key, data)


@pytest.fixture
def s3_backend(s3, s3_bucket, moto_endpoint, monkeypatch) -> Backend:
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    def put(key: str, data: bytes, sha256: bool = False) -> None:
        extra = {"ChecksumAlgorithm": "SHA256"} if sha256 else {}
        s3.put_object(Bucket=s3_bucket, Key=f"{PREFIX}/{key}", Body=data, **extra)

    return Backend("s3", f"s3://{s3_bucket}/{PREFIX}", put,
                   lambda key: s3.delete_object(Bucket=s3_bucket, Key=f"{PREFIX}/{key}"),
                   {"endpoint_url": moto_endpoint, "region": "us-east-1"}, env)


@pytest.fixture
def gcs_backend(gcs_client, gcs_bucket, gcs_endpoint, monkeypatch) -> Backend:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_endpoint)
    bucket = gcs_client.bucket(gcs_bucket)

    def put(key: str, data: bytes, **_: object) -> None:
        bucket.blob(f"{PREFIX}/{key}").upload_from_string(data)

    return Backend("gcs", f"gs://{gcs_bucket}/{PREFIX}", put,
                   lambda key: bucket.blob(f"{PREFIX}/{key}").delete(),
                   env={"STORAGE_EMULATOR_HOST": gcs_endpoint})


@pytest.fixture
def file_backend(tmp_path) -> Backend:
    root = tmp_path / "source"
    root.mkdir()

    def put(key: str, data: bytes, **_: object) -> None:
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    return Backend("file", f"file://{root}", put, lambda key: (root / key).unlink())


@pytest.fixture(params=["s3", "gcs", "file"])
def backend(request) -> Backend:
    """The same behaviour on every kind of store."""
    return request.getfixturevalue(f"{request.param}_backend")


@pytest.fixture(params=["s3", "gcs"])
def cloud_backend(request) -> Backend:
    """The same behaviour on every object store (not a directory)."""
    return request.getfixturevalue(f"{request.param}_backend")


@dataclass
class Agent:
    """Writes the agent config and runs `quay-bootstrap` against it."""

    config_path: Path
    stack_dir: Path
    capsys: pytest.CaptureFixture
    env: Dict[str, str]

    def write_config(self, backend: Backend, **stack: object) -> None:
        options = {"source": backend.url, "dir": str(self.stack_dir), "retry_deadline": "5s",
                   **backend.stack_options, **stack}
        config = {"stack": options, "image": {"reference": "quay.io/projectquay/quay:v3.9.0"}}
        self.config_path.write_text(yaml.safe_dump(config))
        self.env = dict(backend.env)

    def run(self, *args: str) -> Tuple[int, str, str]:
        """The CLI in this process: fast, and what it prints is captured."""
        self.capsys.readouterr()
        code = main(["--config", str(self.config_path), *args, "--log-format", "json"])
        out, err = self.capsys.readouterr()
        return code, out, err

    def spawn(self, *args: str, log_level: str = "info",
              log_format: str = "json") -> subprocess.Popen:
        """The CLI as its own process, as systemd runs it."""
        env = {**os.environ, **self.env}
        return subprocess.Popen(
            [sys.executable, "-m", "quay_bootstrap", "--config", str(self.config_path), *args,
             "--log-level", log_level, "--log-format", log_format],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)

    def live(self) -> Tuple[Optional[str], Dict[str, bytes]]:
        """The version `current` points at and every file in it."""
        current = self.stack_dir / "current"
        if not current.is_symlink():
            return None, {}
        folder = current.resolve()
        files = {p.relative_to(folder).as_posix(): p.read_bytes()
                 for p in folder.rglob("*") if p.is_file()}
        return folder.name, files

    def staging(self) -> list:
        return sorted(p.name for p in self.stack_dir.glob(".staging-*"))


@pytest.fixture
def agent(tmp_path, capsys) -> Agent:
    return Agent(tmp_path / "agent.yaml", tmp_path / "stack", capsys, {})


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Node:
    """One Quay node: a unique container name and port, a control folder, the agent config."""

    def __init__(self, agent, backend, docker_client, testbed, images, tmp_path, monkeypatch):
        self.agent, self.backend, self.docker = agent, backend, docker_client
        self.images = images
        self.name = f"quay-test-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.control = tmp_path / "control"
        self.control.mkdir()
        os.chmod(self.control, 0o777)  # the fake Quay runs as 1001, like Quay
        monkeypatch.setenv("DOCKER_HOST", testbed["docker_host"])
        self.image = {"reference": images["v3.9.0"]}
        self.container = {}
        self.health = {}
        self.listen = f"127.0.0.1:{free_port()}"
        # Never "auto" in tests: it would ask the real instance-metadata address.
        self.report = {"autoscaling": False, "listen": self.listen,
                       "state_file": str(tmp_path / "status.json")}
        self.restart = {}
        self.rollout = {}

    def configure(self, *, image=None, container=None, health=None, report=None, restart=None,
                  rollout=None, **stack):
        self.image.update(image or {})
        self.container.update(container or {})
        self.health.update(health or {})
        self.report.update(report or {})
        self.restart.update(restart or {})
        self.rollout.update(rollout or {})
        self.agent.write_config(self.backend, **stack)
        config = yaml.safe_load(self.agent.config_path.read_text())
        config["image"] = self.image
        config["container"] = {"name": self.name, "network_mode": "host", "ports": [],
                               "sysctls": {}, "env": {"PORT": str(self.port)},
                               "volumes": [f"{self.control}:/control"], "stop_timeout": "5s",
                               **self.container}
        config["health"] = {"url": f"http://127.0.0.1:{self.port}/health/instance",
                            "start_period": "20s", "timeout": "2s", **self.health}
        config["report"] = self.report
        config["restart"] = self.restart
        config["rollout"] = self.rollout
        self.agent.config_path.write_text(yaml.safe_dump(config))

    def state(self, text: str) -> None:
        (self.control / "state").write_text(text)

    def found(self):
        try:
            return self.docker.containers.get(self.name)
        except Exception:  # noqa: BLE001 - docker.errors.NotFound
            return None

    def starts(self) -> list:
        path = self.control / "starts"
        return path.read_text().splitlines() if path.exists() else []

    def cleanup(self) -> None:
        for container in self.docker.containers.list(all=True):
            if container.name.startswith(self.name):
                container.remove(force=True)


@pytest.fixture
def node(agent, s3_backend, docker_client, testbed, fake_images, tmp_path, monkeypatch):
    s3_backend.upload(sample_stack())
    made = Node(agent, s3_backend, docker_client, testbed, fake_images, tmp_path, monkeypatch)
    made.configure()
    yield made
    made.cleanup()


def wait_for(check, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Daemon:
    def __init__(self, node, env=None):
        self.node = node
        node.agent.env.update(env or {})
        self.proc = node.agent.spawn("run", log_level="debug")
        self._out = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self._out.append(line)

    @property
    def log(self) -> str:
        return "".join(self._out)

    def get(self, path):
        try:
            with urllib.request.urlopen(f"http://{self.node.listen}{path}", timeout=2) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()
        except OSError:
            return None, b""

    def status(self):
        code, body = self.get("/status")
        return json.loads(body) if code == 200 else {}

    def wait_state(self, state, timeout=20):
        return wait_for(lambda: self.status().get("state") == state and self.status(), timeout,
                        f"state {state}; log:\n{self.log[-3000:]}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=10)


@pytest.fixture
def daemon(node):
    started = []

    def start(env=None, **config):
        node.configure(health={**FAST, **config.pop("health", {})},
                       restart={**BACKOFF, **config.pop("restart", {})}, **config)
        made = Daemon(node, env)
        started.append(made)
        return made

    yield start
    for made in started:
        made.stop()


@pytest.fixture
def asg_group(s3, moto_endpoint):
    """An Auto Scaling group on moto with one InService instance, behind AsgStandIn (IMDSv2
    naming that instance, and the lifecycle calls moto lacks); `.asg` is a client on moto."""
    import boto3

    from tests.integration.asg_standin import AsgStandIn

    asg = boto3.client("autoscaling", region_name="us-east-1", endpoint_url=moto_endpoint,
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    asg.create_launch_configuration(LaunchConfigurationName="quay", ImageId="ami-12c6146b",
                                    InstanceType="t3.medium")
    asg.create_auto_scaling_group(AutoScalingGroupName="quay", LaunchConfigurationName="quay",
                                  MinSize=1, MaxSize=1, DesiredCapacity=1,
                                  AvailabilityZones=["us-east-1a"])
    found = asg.describe_auto_scaling_groups(AutoScalingGroupNames=["quay"])
    standin = AsgStandIn(moto_endpoint, found["AutoScalingGroups"][0]["Instances"][0]["InstanceId"])
    standin.asg = asg
    yield standin
    standin.close()
