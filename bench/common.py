"""What every benchmark shares: the test bed, launching and measuring children, polling, Docker's
events, the agent as a child process, rounds, the JSON result (or failure) and the clean-up.

A benchmark is `common.main(NAME, __doc__, body, ...)`: body(args, bed) measures and returns its
result (figures, goals, and `report`, its Markdown section for BENCHMARKS.md); main writes it to
bench/results/NAME.json, or on a failed run prints why and exits 1 (2: a tool is missing), and
always removes what the run made. The bed is the test bed of $TESTBED_DIR when it runs, else one
of its own (tests/testbed) that it stops at the end; on a shared bed it removes only its bucket,
its containers (names starting with its prefix) and its image tag.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import hashlib
import http.client
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
if str(HERE.parent) not in sys.path:  # run as a script: the repository root is not on the path
    sys.path.append(str(HERE.parent))
from tests.testbed import bed as testbed  # noqa: E402
from tests.testbed import fake_quay, quay_standin, stacks  # noqa: E402, F401 - for the benchmarks

HOST = "127.0.0.1"
PREFIX = "conf/stack"
DOCKER_CLI = "/usr/local/bin/docker"
BUSY_LOAD = 0.5


class BenchError(Exception):
    """A run failed or the set-up did not work; the message says which and why."""


class MissingTool(BenchError):
    pass


def tool(name: str) -> str:
    """The executable next to the running Python (its venv) first, then PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise MissingTool(f"{name} is not installed next to {sys.executable} nor on PATH "
                          "(`make bench` installs the project with its `bench` extra)")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def stats(values) -> dict:
    got = [v for v in values if v is not None]
    if not got:
        return {"n": 0, "median": None, "min": None, "max": None}
    return {"n": len(got), "median": statistics.median(got), "min": min(got), "max": max(got)}


def until(check, timeout: float, what: str, every: float = 0.05):
    """Call check() every `every` s until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise BenchError(f"{what} within {timeout:g} s")
        time.sleep(every)


def proc_stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name: [0] state, [1] ppid, [11] utime, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(*pids) -> float | None:
    """User + system CPU seconds the processes have used so far (None if one cannot be read)."""
    try:
        return sum(int(f[11]) + int(f[12]) for f in map(proc_stat, pids)) / os.sysconf("SC_CLK_TCK")
    except (OSError, TypeError):
        return None


def verify_tree(root: Path, expected: dict[str, str], what: str) -> None:
    """Every expected file (relative path -> sha256) under root, and nothing else."""
    found = {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in root.rglob("*") if p.is_file()}
    if found != expected:
        wrong = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
        raise BenchError(f"{what}: {len(found)} files in {root}, expected {len(expected)}; "
                         f"missing, extra or different: {wrong[:5]}")


def child_env() -> dict[str, str]:
    """The caller's environment, with bytecode cached under bench/results/.pycache, as an
    installed package runs, whatever PYTHONDONTWRITEBYTECODE says."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, "PYTHONPYCACHEPREFIX": str(RESULTS / ".pycache")}


def sha256s(files: dict[str, bytes]) -> dict[str, str]:
    return {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}


# ---------------------------------------------------------------- children under a launcher

# Peak RSS must not be read with os.wait4 on a child of the benchmark: the kernel folds the
# memory of the process that forked into the child's ru_maxrss, so every child would look at
# least as big as the benchmark. A bare interpreter (-I -S, about 10 MiB) starts the command
# and reports its rusage (with its own children's) instead.
_LAUNCHER = """
import json, os, sys, time
out, err, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
           (os.POSIX_SPAWN_OPEN, 1, out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
           (os.POSIX_SPAWN_OPEN, 2, err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)]
started = time.perf_counter()
pid = os.posix_spawnp(argv[0], argv, os.environ, file_actions=actions)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - started
print(json.dumps({"exit": os.waitstatus_to_exitcode(status), "wall_s": wall,
                  "maxrss_mib": usage.ru_maxrss / 1024, "cpu_s": usage.ru_utime + usage.ru_stime}))
"""


LAUNCHED: list[Launched] = []  # every one, so a failed benchmark leaves none running


class Launched:
    """argv under the launcher, stdout and stderr to PREFIX.out and PREFIX.err. `pid()` is the
    command's own PID (the launcher's child), to read it live or stop it."""

    def __init__(self, argv: list[str], env: dict[str, str], prefix: Path) -> None:
        self.argv, self.out, self.err = argv, prefix.with_suffix(".out"), prefix.with_suffix(".err")
        self.proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _LAUNCHER, str(self.out),
                                      str(self.err), *argv], env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._pid: int | None = None
        LAUNCHED.append(self)

    def pid(self) -> int:
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        self._pid = self._pid or int(until(lambda: self.alive() and children.read_text().split(),
                                           15, f"no process of {self.argv[0]}", 0.005)[0])
        return self._pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 15) -> str:
        text = "".join(p.read_text(errors="replace") for p in (self.out, self.err) if p.exists())
        return "\n".join(text.strip().splitlines()[-lines:])

    def wait(self, timeout: float | None = None, check: bool = True) -> dict:
        """The launcher's figures: exit, wall_s, maxrss_mib, cpu_s (with its children)."""
        out, err = self.proc.communicate(timeout=timeout)
        if self.proc.returncode != 0:
            raise BenchError(f"could not run {self.argv[0]}: {err.strip()[-500:]}")
        got = json.loads(out)
        if check and got["exit"] != 0:
            raise BenchError(f"{' '.join(self.argv)} exited with {got['exit']}:\n{self.tail(20)}")
        return got

    def stop(self, timeout: float = 20.0) -> dict:
        """SIGTERM by PID (as systemd does), then SIGKILL if it does not go; its figures."""
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            if not self.alive():
                break
            try:
                os.kill(self.pid(), sig)
                self.proc.wait(wait)
            except (ProcessLookupError, BenchError, subprocess.TimeoutExpired):
                pass
        return self.wait(check=False)


def measure(argv: list[str], env: dict[str, str], prefix: Path, watch=None) -> dict:
    """Run argv once (see Launched); a non-zero exit raises BenchError. WATCH: {name: [PIDs]},
    the CPU seconds those processes spend during the run, as NAME_cpu_s."""
    watch = {k: [p for p in v if p] for k, v in (watch or {}).items()}
    before = {k: cpu_seconds(*v) if v else None for k, v in watch.items()}
    got = Launched(argv, env, prefix).wait()
    for key, pids in watch.items():
        after = cpu_seconds(*pids) if pids else None
        got[f"{key}_cpu_s"] = None if None in (before[key], after) else after - before[key]
    return got


def log_time(text: str) -> float:
    """An ISO UTC timestamp as epoch seconds: structlog's or Docker's, 0 to 9 digits of fraction."""
    whole, _, fraction = text.rstrip("Z").replace("+00:00", "").partition(".")
    moment = datetime.datetime.fromisoformat(whole).replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp() + (float("0." + fraction) if fraction else 0.0)


def read_log(path: Path) -> list[dict]:
    """The agent's JSON log lines, each with `t` (epoch seconds) added."""
    lines = []
    for line in (path.read_text(errors="replace").splitlines() if path.exists() else ()):
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and isinstance(event.get("timestamp"), str):
            lines.append({**event, "t": log_time(event["timestamp"])})
    return lines


def first(lines: list[dict], event: str, after: float = 0.0, **fields) -> dict | None:
    return next((e for e in lines if e.get("event") == event and e["t"] >= after
                 and all(e.get(k) == v for k, v in fields.items())), None)


# ---------------------------------------------------------------- polling and Docker's events


def get(url: str, timeout: float = 2.0) -> tuple[int | None, bytes]:
    """(status, body) of a GET; status None when nothing answered."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    try:
        conn.request("GET", parts.path or "/")
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return None, b""
    finally:
        conn.close()


class Poller:
    """GET the URL every `every` s from a thread, each request with `timeout`; every answer kept
    as (sent, answered, status or None)."""

    def __init__(self, url: str, every: float, timeout: float = 0.5) -> None:
        self.url, self.every, self.timeout = url, every, timeout
        self.samples: list[tuple[float, float, int | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            sent = time.time()
            status, _ = get(self.url, self.timeout)
            self.samples.append((sent, time.time(), status))
            self._stop.wait(max(0.0, sent + self.every - time.time()))

    def last_ok(self) -> bool:
        return bool(self.samples) and self.samples[-1][2] == 200

    def first_ok(self, after: float | None) -> float | None:
        """When the first 200 sent after `after` came back."""
        return None if after is None else next(
            (got for sent, got, status in list(self.samples) if sent > after and status == 200), None)

    def stop(self) -> list[tuple[float, float, int | None]]:
        self._stop.set()
        self._thread.join(5)
        return list(self.samples)


def wait_200(url: str, timeout: float, what: str, every: float = 0.05) -> float:
    """Until URL answers 200; when that answer came."""
    poller = Poller(url, every)
    try:
        return until(lambda: poller.first_ok(0.0), timeout, f"{what}: {url} not 200")
    finally:
        poller.stop()


class DockerEvents:
    """Docker's container events for names that start with PREFIX (or renamed away from one),
    with timeNano, from one stream read by a thread."""

    def __init__(self, docker_host: str, prefix: str) -> None:
        import docker

        self.prefix, self.items = prefix, []
        self._client = docker.DockerClient(base_url=docker_host, version="auto", timeout=60)
        self._stream = self._client.events(decode=True, filters={"type": "container"})
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for event in self._stream:
                actor = event.get("Actor") or {}
                attributes = actor.get("Attributes") or {}
                name, old = attributes.get("name") or "", (attributes.get("oldName") or "").lstrip("/")
                if name.startswith(self.prefix) or old.startswith(self.prefix):
                    self.items.append({"t": event["timeNano"] / 1e9, "name": name,
                                       "action": event.get("Action") or event.get("status") or "",
                                       "id": (actor.get("ID") or "")[:12]})
        except Exception:  # noqa: BLE001 - the stream is closed at the end
            pass

    def after(self, action: str, t: float | None, ident: str | None = None) -> float | None:
        return None if t is None else next(
            (e["t"] for e in list(self.items) if e["action"] == action and e["t"] > t
             and ident in (None, e["id"])), None)

    def between(self, start: float, end: float | None = None) -> list[dict]:
        return [{**e, "t": round(e["t"] - start, 4)} for e in list(self.items)
                if start < e["t"] <= (end or time.time())]

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            self._client.close()


def span(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


# ---------------------------------------------------------------- the bed and the agent


class Bed:
    """A work folder, the test bed, the environment of every child, and what this run puts on
    the bed (a bucket, an image tag, containers named PREFIX-*); close() removes only those."""

    def __init__(self, name: str) -> None:
        self.name, self.keep = name, False
        self.work = Path(tempfile.mkdtemp(prefix=f"qb-bench-{name}-"))
        self.prefix = f"qb-{name.replace('_', '-')}-{secrets.token_hex(4)}"
        self.bucket, self.image, self._s3, self._docker, self.events = self.prefix, None, None, None, None
        directory = os.environ.get("TESTBED_DIR")
        self.ours = not (directory and testbed.is_running(directory))
        if self.ours:
            print(f"note: no running test bed in $TESTBED_DIR ({directory}); starting one", flush=True)
            try:
                self.state = testbed.start(self.work / "bed")
            except testbed.TestbedError as err:
                raise MissingTool(f"could not start a test bed: {err} (`make deps` installs "
                                  "what it needs)") from err
        else:
            self.state = testbed.load(directory)
        pids = self.state.get("pids") or {}
        self.moto_pid, self.daemon_pids = pids.get("moto"), [pids.get("dockerd"), pids.get("containerd")]
        config = self.work / "docker-config"  # never ~/.docker/config.json, for CLI or SDK
        config.mkdir()
        (config / "config.json").write_text("{}\n")
        # Fixed test credentials, no user AWS config.
        self.env = {k: v for k, v in child_env().items() if not k.startswith("AWS_")}
        self.env.update(
            AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE=str(self.work / "no-aws-config"),
            AWS_SHARED_CREDENTIALS_FILE=str(self.work / "no-aws-credentials"),
            AWS_EC2_METADATA_DISABLED="true",
            DOCKER_HOST=self.state["docker_host"], DOCKER_CONFIG=str(config))
        self.endpoint, self.server_pid = self.moto, self.moto_pid
        os.environ["DOCKER_CONFIG"] = str(config)

    @property
    def moto(self) -> str:
        return self.state["moto_endpoint"]

    def on_seaweedfs(self) -> None:
        """The run's bucket on the bed's SeaweedFS instead of moto (before the first upload)."""
        self.endpoint, self.server_pid = self.state["seaweedfs_endpoint"], self.state["pids"]["seaweedfs"]
        self.env.update(AWS_ACCESS_KEY_ID=self.state["seaweedfs_access_key"],
                        AWS_SECRET_ACCESS_KEY=self.state["seaweedfs_secret_key"])

    def s3(self):
        if self._s3 is None:
            import boto3  # the benchmark's own set-up; the children are what is measured

            self._s3 = boto3.session.Session().client(
                "s3", endpoint_url=self.endpoint, region_name="us-east-1",
                aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"])
            self._s3.create_bucket(Bucket=self.bucket)
        return self._s3

    def upload(self, files: dict[str, bytes]) -> dict[str, str]:
        """Put FILES under s3://BUCKET/conf/stack/; their sha256s, to verify against."""
        client = self.s3()
        with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(lambda kv: client.put_object(Bucket=self.bucket, Key=f"{PREFIX}/{kv[0]}",
                                                       Body=kv[1]), files.items()))
        return sha256s(files)

    def docker(self):
        if self._docker is None:
            import docker

            self._docker = docker.DockerClient(base_url=self.state["docker_host"], version="auto",
                                               timeout=60)
        return self._docker

    def fake_quay(self) -> str:
        """The fake Quay under a release-shaped tag of this benchmark, pushed; its reference."""
        tag = f"v3.9.0-{self.name.replace('_', '')}"
        self.image = fake_quay.build(self.docker(), self.state["registry"], tag)
        self.events = DockerEvents(self.state["docker_host"], self.prefix)
        return self.image

    def folder(self, name: str) -> Path:
        path = self.work / name
        path.mkdir(parents=True)
        os.chmod(path, 0o777)  # the fake Quay runs as 1001, like Quay
        return path

    def inspect(self, name: str) -> dict:
        return self.docker().api.inspect_container(name)

    def remove(self, name: str) -> None:
        import docker

        try:
            self.docker().api.remove_container(name, force=True)
        except docker.errors.NotFound:
            pass

    def node_config(self, run_dir: Path, name: str, port: int, stack: dict, listen: str = "",
                    container: dict | None = None, health: dict | None = None, **sections) -> Path:
        """An agent's config: the node of tests/integration (host networking, PORT on a loopback
        port, a control folder at /control); the report endpoint on LISTEN when given; SECTIONS
        (image, rollout, ...) as given."""
        config = {
            # settle 0: its wait (stack.settle, 5 s) is a deliberate pause, not work measured.
            "stack": {"source": f"s3://{self.bucket}/{PREFIX}", "endpoint_url": self.endpoint,
                      "settle": "0s",
                      "region": "us-east-1", **stack},
            "image": {"reference": self.image or "quay.io/projectquay/quay:v3.9.0"},
            "container": {"name": name, "network_mode": "host", "ports": [], "sysctls": {},
                          "env": {"PORT": str(port)}, **(container or {})},
            "health": {"url": f"http://{HOST}:{port}/health/instance", **(health or {})}, **sections}
        if listen:  # never "auto": it would ask the real instance-metadata address
            config["report"] = {"autoscaling": False, "listen": listen,
                                "state_file": str(run_dir / "status.json")}
        path = run_dir / "agent.yaml"
        path.write_text(json.dumps(config, indent=1))  # JSON is YAML
        return path

    def machine(self) -> dict:
        cpu = next((line.split(":", 1)[1].strip() for line in
                    Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "")

        def version(argv: list[str]) -> str:
            done = subprocess.run(argv, capture_output=True, text=True, env=self.env, check=False)
            return (done.stdout or done.stderr).strip().split(" ")[0]

        info = {"nproc": os.cpu_count(), "cpu": cpu, "os": f"{platform.system()} {platform.release()}",
                "python": platform.python_version(), "moto": metadata.version("moto"),
                "quay_bootstrap": metadata.version("quay-bootstrap"),
                "aws_cli": version([tool("aws"), "--version"]),
                "docker_cli": version([DOCKER_CLI, "version", "--format", "{{.Client.Version}}"]),
                "dockerd": self.docker().version().get("Version", "?"),
                "loadavg": [round(x, 2) for x in os.getloadavg()]}
        print(f"machine: {json.dumps(info)}", flush=True)
        return info

    def close(self) -> None:
        notes = []
        for what, undo in (("agents", lambda: [p.stop() for p in LAUNCHED if p.alive()]),
                           ("events", lambda: self.events and self.events.close()),
                           ("containers", self._remove_containers),
                           ("image", lambda: self.image and not self.ours
                            and self.docker().images.remove(self.image)),
                           ("bucket", lambda: self._s3 and not self.ours and self._delete_bucket()),
                           ("docker client", lambda: self._docker and self._docker.close()),
                           ("test bed", lambda: self.ours and testbed.stop(self.work / "bed"))):
            try:
                undo()
            except Exception as err:  # noqa: BLE001 - tidying must not hide the result
                notes.append(f"note: could not remove the {what}: {err}")
        print("\n".join(notes), file=sys.stderr, end="\n" if notes else "")
        if self.keep:
            print(f"(work folder kept: {self.work})", file=sys.stderr)
        else:
            shutil.rmtree(self.work, ignore_errors=True)

    def _remove_containers(self) -> None:
        if self._docker is not None:
            for item in self._docker.containers.list(all=True, filters={"name": self.prefix}):
                item.remove(force=True, v=True)

    def _delete_bucket(self) -> None:
        for page in self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", ())]
            if keys:
                self._s3.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})
        self._s3.delete_bucket(Bucket=self.bucket)


class Agent(Launched):
    """`quay-bootstrap --config CFG run` under the launcher, with its report endpoint."""

    def __init__(self, bed: Bed, label: str, name: str, port: int, stack: dict,
                 tree: Path | None = None, **config) -> None:
        """TREE: run the agent of that source tree (a `git worktree`) instead of the installed one."""
        run_dir = bed.work / label
        run_dir.mkdir()
        self.label, self.listen = label, f"{HOST}:{free_port()}"
        self.config = path = bed.node_config(run_dir, name, port, stack, self.listen, **config)
        argv = [tool("quay-bootstrap")] if tree is None else [sys.executable, "-P", "-m", "quay_bootstrap"]
        self.env = bed.env if tree is None else {**bed.env, "PYTHONPATH": str(tree)}
        super().__init__([*argv, "--config", str(path), "run", "--log-format", "json", "--log-level",
                          "info"], self.env, run_dir / "agent")

    def module_root(self) -> Path:
        """The folder of the quay_bootstrap package this agent's environment imports."""
        done = subprocess.run([sys.executable, "-P", "-c", "import os, quay_bootstrap; "
                               "print(os.path.dirname(quay_bootstrap.__file__))"],
                              env=self.env, capture_output=True, text=True, check=True)
        return Path(done.stdout.strip())

    def status(self) -> dict:
        status, body = get(f"http://{self.listen}/status")
        return json.loads(body) if status == 200 else {}

    def log(self) -> list[dict]:
        return read_log(self.err)

    def wait_healthy(self, after: float = 0.0, timeout: float = 90.0) -> float:
        """Until /status says healthy since a moment later than AFTER; that moment."""
        def healthy():
            if not self.alive():
                raise BenchError(f"agent {self.label} exited:\n{self.tail()}")
            status = self.status()
            since = float(status.get("since") or 0)
            return since if status.get("state") == "healthy" and since > after else None
        return until(healthy, timeout, f"agent {self.label}: not healthy ({self.tail()})")

    def wait_event(self, event: str, after: float, timeout: float, **fields) -> dict:
        def found():
            if not self.alive():
                raise BenchError(f"agent {self.label} exited:\n{self.tail()}")
            return first(self.log(), event, after, **fields)
        return until(found, timeout, f"agent {self.label}: no {event}")

    def finish(self) -> dict:
        """Stop it with SIGTERM; its lifetime figures and warnings. A non-zero exit fails."""
        got = self.stop()
        if got["exit"] != 0:
            raise BenchError(f"agent {self.label} exited with {got['exit']} on SIGTERM:\n{self.tail()}")
        got["warnings"] = [f"{e.get('level')} {e.get('event')}" for e in self.log()
                           if e.get("level") in ("warning", "error", "critical")]
        return got


# ---------------------------------------------------------------- rounds, report, main


def rounds(args, sides: dict, show) -> dict[str, list]:
    """Each round, every side once (side(n) -> its figures), each side first in turn; after
    args.warmup unmeasured rounds, args.rounds measured ones. show(figures) -> a short text."""
    runs: dict[str, list] = {side: [] for side in sides}
    names = list(sides)
    for n in range(args.warmup + args.rounds):
        got = {side: sides[side](n) for side in names[n % len(names):] + names[:n % len(names)]}
        label = f"warm-up {n + 1}" if n < args.warmup else f"round {n - args.warmup + 1}/{args.rounds}"
        print(f"  {label}: " + ", ".join(f"{s} {show(got[s])}" for s in names), flush=True)
        for side in names:
            if n >= args.warmup:
                runs[side].append(got[side])
    return runs


def s(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f} s"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def r(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def main(name: str, doc: str, body, rounds_default: int = 5, warmup_default: int = 1,
         use_bed: bool = True, add_args=None) -> int:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=rounds_default, help="measured rounds")
    parser.add_argument("--warmup", type=int, default=warmup_default, help="unmeasured rounds first")
    parser.add_argument("--json", type=Path, default=RESULTS / f"{name}.json", help="result file")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    if add_args:
        add_args(parser)
    args = parser.parse_args()
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be at least 1 and --warmup at least 0")
    bed = None
    try:
        bed = Bed(name) if use_bed else None
        if bed:
            bed.keep = args.keep
        machine = bed.machine() if bed else {"loadavg": [round(x, 2) for x in os.getloadavg()]}
        if os.getloadavg()[0] > BUSY_LOAD:
            print("note: the machine is busy (1-minute load average above "
                  f"{BUSY_LOAD}); the figures will be noisy", flush=True)
        result = {"benchmark": name, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "machine": machine, **body(args, bed)}
        machine["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        print("\n" + "\n".join(result["report"]))
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nwritten: {args.json}")
        return 0
    except BenchError as err:
        print(f"{'' if isinstance(err, MissingTool) else 'FAIL: '}{err}", file=sys.stderr)
        if bed is not None:
            bed.keep = True
        return 2 if isinstance(err, MissingTool) else 1
    finally:
        if bed is not None:
            bed.close()
