"""Stack sources on the real stores (moto S3 over HTTP, the GCS emulator, a directory) and a way
to run the agent's CLI against them and look at what is live on disk; Quay nodes for the agent
to run: the busybox fake (`node`) or, for a test marked `standin`, the Quay stand-in on the
bed's real PostgreSQL, Redis and SeaweedFS."""
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
from tests.testbed import quay_standin
from tests.testbed.stacks import sample_stack

PREFIX = "conf/stack"
# A daemon tuned for tests: seconds, not minutes.
FAST = {"interval": "0.5s", "timeout": "1s", "failure_threshold": 2, "start_period": "3s"}
BACKOFF = {"backoff_initial": "1s", "backoff_max": "4s", "unhealthy_after": 3, "window": "10m"}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "standin(tag='v3.11.0'): the `node` fixture (and so `daemon`) runs the Quay "
        "stand-in of that version on the bed's PostgreSQL (a database of its own), Redis and a "
        "SeaweedFS bucket, instead of the busybox fake")


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
                   "settle": "0s",  # tests/unit/test_stores.py and test_publish.py wait for it
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

    def spawn(self, *args: str, log_level: str = "info", log_format: str = "json",
              listen_socket: Optional[socket.socket] = None) -> subprocess.Popen:
        """The CLI as its own process, as systemd runs it; given LISTEN_SOCKET as systemd's
        socket activation passes one (fd 3, LISTEN_FDS, LISTEN_PID: the shell's pid, which
        exec keeps)."""
        env = {**os.environ, **self.env}
        command = [sys.executable, "-m", "quay_bootstrap", "--config", str(self.config_path), *args,
                   "--log-level", log_level, "--log-format", log_format]
        fds: Tuple[int, ...] = ()
        if listen_socket is not None:
            fd = listen_socket.fileno()
            command = ["/bin/bash", "-c", f'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@" 3<&{fd} {fd}<&-',
                       "bash", *command]
            fds = (fd,)
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                text=True, pass_fds=fds)

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
        self.image = {"reference": images.get("v3.9.0") or next(iter(images.values()))}
        self.container = {}
        self.health = {}
        self.listen = f"127.0.0.1:{free_port()}"
        # Never "auto" in tests: it would ask the real instance-metadata address.
        self.report = {"autoscaling": False, "listen": self.listen,
                       "state_file": str(tmp_path / "status.json")}
        self.restart = {}
        self.rollout = {}
        self.extra: dict = {}  # more top-level sections of the agent config (balancer)

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
        base = self.container_defaults()
        config["container"] = {**base, **self.container,
                               "env": {**base["env"], **self.container.get("env", {})}}
        health = {"url": f"http://127.0.0.1:{self.port}/health/instance",
                  "start_period": "20s", "timeout": "2s", **self.health}
        # None: the agent's own default.
        config["health"] = {key: value for key, value in health.items() if value is not None}
        config["report"] = self.report
        config["restart"] = self.restart
        config["rollout"] = self.rollout
        config.update(self.extra)
        self.agent.config_path.write_text(yaml.safe_dump(config))

    def container_defaults(self) -> dict:
        return {"name": self.name, "network_mode": "host", "ports": [], "sysctls": {},
                "env": {"PORT": str(self.port)}, "volumes": [f"{self.control}:/control"],
                "stop_timeout": "5s"}

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
                container.remove(force=True, v=True)


LOCAL_SERVICES = ("web_gunicorn", "registry_gunicorn", "service_key", "disk_space")


class StandinNode(Node):
    """A node whose Quay is the stand-in (tests/testbed/quay_standin.py): it validates its
    config against the bed's real services, migrates DATABASE (a DSN) on start, and answers
    /health/instance like Quay, slowly when the database is slow. Its conf/stack (config.yaml
    on DATABASE, the bed's Redis and the SeaweedFS BUCKET, and a robots.txt) is in the node's
    backend; the agent runs it with host networking on `port`. `/datastorage` and `/tmp` (two
    of the image's VOLUMEs) are named volumes of the node, removed with it."""

    def __init__(self, agent, backend, docker_client, testbed, images, tmp_path, monkeypatch,
                 *, database: str, bucket: str, tag: str = "v3.11.0"):
        super().__init__(agent, backend, docker_client, testbed, images, tmp_path, monkeypatch)
        self.bed, self.database, self.bucket = testbed, database, bucket
        self.image = {"reference": images[tag]}
        self.began = time.time()
        self.backend.upload({"config.yaml": self.config_yaml(),
                             "robots.txt": b"User-agent: *\nDisallow: /\n"})

    def config_yaml(self, **overrides) -> bytes:
        """Quay's config.yaml for this node's services; OVERRIDES as in quay_standin.config."""
        return yaml.safe_dump(quay_standin.config(self.bed, database=self.database,
                                                  bucket=self.bucket, **overrides)).encode()

    def volumes(self) -> list:
        return [f"{self.name}-datastorage", f"{self.name}-tmp"]

    def container_defaults(self) -> dict:
        datastorage, tmp = self.volumes()
        # Host networking: no port mapping, and no net.* sysctl (Docker refuses them there).
        return {"name": self.name, "network_mode": "host", "ports": [], "sysctls": {},
                "env": {"QUAY_STANDIN_HTTP_PORT": str(self.port),
                        "QUAY_STANDIN_MIGRATION_SECONDS": "0"},
                "volumes": [f"{self.control}:/control", f"{datastorage}:/datastorage",
                            f"{tmp}:/tmp"],
                "stop_timeout": "5s"}

    def state(self, text: str) -> None:
        """The fake's words for the stand-in's local services: "healthy", "fail SERVICE...",
        "hang" (the web worker that serves /health hangs). Shared services are the bed's own:
        make them down, hung or slow with tests/testbed/faults.py."""
        words = text.split()
        failing = words[1:] if words[:1] == ["fail"] else []
        for service in failing:
            if service not in LOCAL_SERVICES:
                raise ValueError(f"{service} is not local to a node; use tests/testbed/faults.py")
        for service in LOCAL_SERVICES:
            how = "fail" if service in failing else None
            if words == ["hang"] and service == "web_gunicorn":
                how = "hang"
            quay_standin.set_local(self.control, service, how)

    def starts(self) -> list:
        """One (unix time, image id) per start of a container under the node's name, as Docker
        reported it."""
        events = self.docker.api.events(
            since=self.began, until=time.time(), decode=True,
            filters={"type": "container", "event": "start", "container": self.name})
        return [(event["time"], event["Actor"]["Attributes"].get("image"))
                for event in events if event["Actor"]["Attributes"].get("name") == self.name]

    def revision(self):
        """The schema revision in the node's database."""
        return quay_standin.db_revision(self.database)

    def logs(self, since: Optional[float] = None) -> str:
        """What the container under the node's name printed (since SINCE, unix time)."""
        found = self.found()
        if found is None:
            return ""
        if since is None:
            return quay_standin.logs(found)
        return found.logs(since=since).decode(errors="replace")

    def image_id(self, tag: str) -> str:
        return self.docker.images.get(self.images[tag]).id

    def cleanup(self) -> None:
        super().cleanup()
        for name in self.volumes():
            try:
                self.docker.volumes.get(name).remove(force=True)
            except Exception:  # noqa: BLE001 - docker.errors.NotFound: never created
                pass


# Real Quay on this 2-core machine (tests/testbed/real_quay.py): no Go config-tool in the image,
# so no online validation (the stand-in keeps it); only the programs /health/instance needs
# (the ~30 background workers are each a Python process importing Quay: too heavy for three
# nodes here), one worker per gunicorn (upstream's default on 2 cores is 4 web + 8 registry).
REAL_QUAY_ENV = {"IGNORE_VALIDATION": "true", "QUAY_SERVICES": "nginx,gunicorn-web,gunicorn-registry",
                 "WORKER_COUNT_UNSUPPORTED_MINIMUM": "1", "WORKER_COUNT_WEB": "1",
                 "WORKER_COUNT_REGISTRY": "1"}


def real_quay_env(port: int) -> Dict[str, str]:
    """The container env of a real Quay node serving HTTP on PORT of this host's network: nginx
    moved there (the image's test-bed patch), and SERVER_HOSTNAME localhost:PORT for this node
    alone, so Quay's gunicorn self-checks call its own nginx (health/services.py takes the port
    from SERVER_HOSTNAME only when the host is literally localhost, else 8080)."""
    return {"QB_HTTP_PORT": str(port), **REAL_QUAY_ENV,
            "QUAY_OVERRIDE_CONFIG": json.dumps({"SERVER_HOSTNAME": f"localhost:{port}"})}


class RealQuay:
    """Mixin: the node's Quay is real Quay, built from ../shared/quay (tests/testbed/real_quay.py),
    on the same database, Redis and SeaweedFS bucket as the stand-in's nodes."""

    def container_defaults(self) -> dict:
        made = super().container_defaults()
        made["env"] = real_quay_env(self.port)
        return made

    def revision(self):
        return quay_standin.db_revision(self.database)


class RealQuayNode(RealQuay, StandinNode):
    """A StandinNode whose Quay is real (v3.18.0 unless `tag`)."""


@pytest.fixture(scope="session")
def real_images(docker_client, registry):
    """{tag: reference} of real Quay v3.17.4 and v3.18.0 in the bed's registry. Built once per
    machine (cached by the archives' sha256), imported and pushed once per bed."""
    from tests.testbed import real_quay

    try:
        return real_quay.build(docker_client, registry)
    except real_quay.Unavailable as err:
        if os.environ.get("CI"):
            raise  # CI always has ../shared/quay: a real-Quay test is never skipped there
        pytest.skip(str(err))


@pytest.fixture
def real_db(testbed):
    """A new database with pg_trgm (migration e2894a3a3c19 needs it), dropped afterwards."""
    import psycopg2

    dsn = quay_standin.create_database(testbed)
    conn = psycopg2.connect(dsn, connect_timeout=5)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    finally:
        conn.close()
    yield dsn
    quay_standin.drop_database(testbed, dsn)


@pytest.fixture(scope="session")
def standin_images(docker_client, registry):
    """{tag: reference} of the stand-in's v3.9.0, v3.10.0 and v3.11.0 in the bed's registry."""
    return quay_standin.build(docker_client, registry)


@pytest.fixture
def quay_db(testbed):
    """The DSN of a new database on the bed's PostgreSQL, dropped afterwards."""
    dsn = quay_standin.create_database(testbed)
    yield dsn
    quay_standin.drop_database(testbed, dsn)


@pytest.fixture
def quay_bucket(testbed):
    """A new bucket on the bed's SeaweedFS, emptied and deleted afterwards."""
    from tests.testbed import bed

    name = quay_standin.create_bucket(testbed)
    yield name
    client = bed.seaweedfs_client(testbed)
    try:
        for item in client.list_objects_v2(Bucket=name).get("Contents", []):
            client.delete_object(Bucket=name, Key=item["Key"])
        client.delete_bucket(Bucket=name)
    except Exception:  # noqa: BLE001 - SeaweedFS stopped by a test: the bed goes with it
        pass
    finally:
        client.close()


@pytest.fixture
def node(request, agent, s3_backend, docker_client, testbed, tmp_path, monkeypatch):
    """The fake Quay, or the stand-in for a test marked `standin`."""
    marker = request.node.get_closest_marker("standin")
    if marker is None:
        s3_backend.upload(sample_stack())
        made = Node(agent, s3_backend, docker_client, testbed,
                    request.getfixturevalue("fake_images"), tmp_path, monkeypatch)
    else:
        made = StandinNode(agent, s3_backend, docker_client, testbed,
                           request.getfixturevalue("standin_images"), tmp_path, monkeypatch,
                           database=request.getfixturevalue("quay_db"),
                           bucket=request.getfixturevalue("quay_bucket"), **marker.kwargs)
    made.configure()
    yield made
    made.cleanup()


def wait_for(check, timeout, what, every: float = 0.05):
    """CHECK's first true value within TIMEOUT seconds; WHAT says what was awaited (a callable is
    called when it times out, so its message sees the logs of that moment)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what() if callable(what) else what}")


def held_socket(listen: str) -> socket.socket:
    """A listening socket on LISTEN, as systemd's quay-bootstrap.socket holds one open across
    agent restarts (pass it to `Daemon`)."""
    host, _, port = listen.rpartition(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    sock.listen(socket.SOMAXCONN)
    return sock


class Daemon:
    def __init__(self, node, env=None, listen_socket: Optional[socket.socket] = None):
        self.node = node
        node.agent.env.update(env or {})
        self.proc = node.agent.spawn("run", log_level="debug", listen_socket=listen_socket)
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


# The positive events after which "nothing happened" may be asserted: the agent had its chance
# to act (a refresh, a probe) and chose not to. Never a sleep.

# How a roll (a refresh's, a SIGHUP's) ends when it leaves Quay alone (debug lines: the test
# agents log at debug).
LEFT_ALONE = ("rollout.unchanged", "rollout.still_rejected", "rollout.backing_off")


def lines(agent: Daemon, event, since: int = 0) -> list:
    """The agent's log lines (JSON-decoded) of EVENT (a name or a tuple of names) logged after
    SINCE (a mark: `len(agent.log)` at that moment)."""
    names = (event,) if isinstance(event, str) else tuple(event)
    found = []
    for line in agent.log[since:].splitlines():
        if not any(f'"{name}"' in line for name in names):
            continue
        try:
            decoded = json.loads(line)
        except ValueError:
            continue
        if decoded.get("event") in names:
            found.append(decoded)
    return found


def wait_for_lines(agent: Daemon, event, count: int = 1, since: int = 0,
                   timeout: float = 30) -> list:
    """Once the agent has logged COUNT lines of EVENT after SINCE, those lines."""
    return wait_for(lambda: len(lines(agent, event, since)) >= count and lines(agent, event, since),
                    timeout, lambda: f"{count} x {event} since the mark; log:\n{agent.log[-3000:]}")


def probes(agent: Daemon) -> int:
    """How many health probes the agent has completed (its probe-latency histogram's count)."""
    code, body = agent.get("/metrics")
    for line in body.decode().splitlines() if code == 200 else []:
        if line.startswith("quay_bootstrap_probe_seconds_count "):
            return int(float(line.split()[1]))
    return 0


def wait_for_probes(agent: Daemon, more: int, since: Optional[int] = None,
                    timeout: float = 30) -> int:
    """Once the agent has completed MORE health probes after SINCE (a count from `probes`; now
    when None), their count. A probe is counted a moment before the watchdog judges it: ask
    for one more than must have been judged."""
    base = probes(agent) if since is None else since
    return wait_for(lambda: (lambda n: n >= base + more and n)(probes(agent)), timeout,
                    lambda: f"{more} more probes after {base}; log:\n{agent.log[-3000:]}")


@pytest.fixture
def daemon(node):
    started = []

    def start(env=None, listen_socket=None, **config):
        node.configure(health={**FAST, **config.pop("health", {})},
                       restart={**BACKOFF, **config.pop("restart", {})}, **config)
        made = Daemon(node, env, listen_socket)
        started.append(made)
        return made

    yield start
    for made in started:
        made.stop()


@pytest.fixture
def asg_group(s3, moto_endpoint):
    """An Auto Scaling group on moto with one InService instance, behind AsgStandIn (IMDSv2
    naming that instance, and the lifecycle calls moto lacks); `.asg` is a client on moto."""
    from tests.integration.asg_standin import AsgStandIn, make_group

    asg, (instance,) = make_group(moto_endpoint, 1)
    standin = AsgStandIn(moto_endpoint, instance)
    standin.asg = asg
    yield standin
    standin.close()
