"""Benchmark: the watchdog daemon (`quay-bootstrap run`): a killed Quay back to healthy, the detection
time of a broken health endpoint, and the idle agent's CPU and peak RSS.

Usage: python bench/watchdog.py [--rounds 5] [--idle-seconds 60] [--only kill,detect,idle]
                                [--json PATH] [--keep]

Uses the test bed named by $TESTBED_DIR when it runs, else starts one of its own and stops it at
the end. Set-up, not measured: the sample conf/stack (tests/testbed/stacks.py) goes to a new
bucket on the bed's moto and the fake Quay (tests/testbed/fake_quay.py) to the bed's registry;
one warm-up agent creates the container (host networking, a loopback port, a control folder at
/control). Every measured agent is a new `quay-bootstrap --config CFG run` process under the
launcher of cli_startup (so its own peak RSS and CPU are known when it exits), with
report.autoscaling false and its endpoint on a loopback port. A new agent per run keeps rounds
apart: the agent's restart backoff (restart.backoff_initial, doubled per restart, reset after
600 s healthy) would otherwise delay every restart after the first.

    kill     Each round, three sides, alternating their order, each on a container that has run
             for at least 11 s (Docker's own restart delay resets after 10 s of running):
               agent_kill    the agent (health.interval 10s) runs; `docker kill` the container
               agent_crash   the agent runs; SIGKILL the container's init from the host (a
                             crash: Docker's unless-stopped policy restarts it too, a race)
               docker_crash  no agent; the same SIGKILL; Docker's restart policy alone, and a
                             poll of /health/instance every 0.25 s (the agent's START_POLL)
                             until 200: the floor
             `docker kill` is not the floor's kill because Docker counts it as a manual stop:
             the unless-stopped policy never restarts a container that `docker kill` ended.
             Recorded: the kill, the die event (timeNano), the agent's `container.restarting`
             or `container.restarted_by_docker` log line, the next start event, and healthy
             again (the agent's /status `since`, or the floor's first 200); with an agent, when
             Quay itself answers 200 again (an outside poll every 0.1 s), which splits die ->
             healthy into Docker + Quay and the agent's own judgement; how many times the fake
             Quay started and how many restarts the agent counted (a double restart shows
             there). Then once: a second `docker kill` 2 s after the agent is healthy again, to
             show the restart backoff; and, with a new agent, a crash and then a `docker kill`
             each within a second of the agent's own restart, to show whether it acts on them
             (it treats Docker's events of that second as echoes of its restart).
    detect   An agent with health.interval 1s, timeout 1s, failure_threshold 3; once healthy,
             after a random part of an interval, /control/state becomes `fail web_gunicorn`
             (503) or `hang` (no answer); time until the agent logs `container.restarting`,
             against the configured bound failure_threshold x interval + timeout.
    idle     An agent (health.interval 10s) healthy for 2 s, then for IDLE_SECONDS its CPU time
             (utime + stime of /proc/PID/stat, every thread) as % of one core and its peak RSS
             (VmHWM of /proc/PID/status), and how many stack refreshes (one pass every
             stack.refresh_interval, 60 s +-20% by default) fell in the window; side by side, in
             the same seconds, a bash loop `curl -fsS URL; sleep 10` (CPU with its children, from
             the launcher).

Goals (the issue): restart issued within 0.5 s of the die event (every agent_kill round); idle
peak RSS 64 MiB or less; idle CPU 0.5% of a core or less (every idle round). Results go to stdout
and bench/results/watchdog.json. Exit status: 0 ok (a goal not met is reported, not an error),
1 a run failed, 2 a tool or the test bed is missing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

# Every benchmark measures children the same way; the script's folder is on sys.path.
from cli_startup import measure as measure_child
from cli_startup import tool
from fetch_vs_sync import (
    BenchError,
    MissingTool,
    child_env,
    cpu_seconds,
    delete_bucket,
    failed,
    finish,
    machine,
)
from once_vs_init_script import _testbed, docker_client, free_port, open_bed, upload_stack

HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "results" / "watchdog.json"
HOST = "127.0.0.1"
PREFIX = "conf/stack"
# A release-shaped tag (the agent's default image.allowed_tags); removed from a shared daemon at
# the end.
IMAGE_TAG = "v3.9.0-wdbench"
GOAL_RESTART_S = 0.5
GOAL_RSS_MIB = 64.0
GOAL_CPU_PCT = 0.5
POLL_S = 0.25  # the agent's START_POLL (quay_bootstrap/pipeline.py), for the floor's poll
SETTLE_S = 11.0  # Docker's restart delay (100 ms, doubling) resets once a container ran 10 s
IDLE_INTERVAL = "10s"
DETECT = {"interval": 1.0, "timeout": 1.0, "failure_threshold": 3}
DETECT_MODES = {"fail": "fail web_gunicorn", "hang": "hang"}
KILL_SIDES = ("agent_kill", "agent_crash", "docker_crash")


# ---------------------------------------------------------------- small helpers


def _proc_stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name: [0] state, [1] ppid, [11] utime, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _proc_status(pid: int) -> dict[str, str]:
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        found[key] = value.strip()
    return found


def _kib_to_mib(value: str) -> float:
    return int(value.split()[0]) / 1024


def _log_time(text: str) -> float:
    """An ISO UTC timestamp as epoch seconds: structlog's (2024-05-01T07:34:27.123456Z) or
    Docker's, with 0 to 9 digits of fraction (Python 3.9's fromisoformat wants 0, 3 or 6)."""
    whole, _, fraction = text.rstrip("Z").replace("+00:00", "").partition(".")
    moment = datetime.datetime.fromisoformat(whole).replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp() + (float("0." + fraction) if fraction else 0.0)


def read_log(path: Path) -> list[dict]:
    """The agent's JSON log lines, each with `t` (epoch seconds) added."""
    lines = []
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return lines
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and isinstance(event.get("timestamp"), str):
            event["t"] = _log_time(event["timestamp"])
            lines.append(event)
    return lines


def first(lines: list[dict], event: str, after: float) -> dict | None:
    return next((e for e in lines if e.get("event") == event and e["t"] > after), None)


def get_json(url: str, timeout: float = 2.0) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return json.loads(answer.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def answers_200(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            answer.read()
            return answer.status == 200
    except (urllib.error.URLError, OSError):
        return False


def stats(values: list[float | None]) -> dict[str, float | int | None]:
    got = [v for v in values if v is not None]
    if not got:
        return {"n": 0, "median": None, "min": None, "max": None}
    return {"n": len(got), "median": statistics.median(got), "min": min(got), "max": max(got)}


def code_version(env: dict[str, str]) -> dict[str, object]:
    """Which agent code the children run: the commit, whether quay_bootstrap/ has uncommitted
    changes, and where the agent's interpreter imports it from (an editable install follows the
    working tree, so a change made during a run shows in later agents)."""
    root = HERE.parent

    def run(argv: list[str]) -> str:
        done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=root, check=False)
        return done.stdout.strip()

    imported = run([sys.executable, "-I", "-c", "import os, quay_bootstrap; "
                    "print(os.path.dirname(quay_bootstrap.__file__))"]) or None
    if imported != str(root / "quay_bootstrap"):
        # Not this working tree's code (a copy on the interpreter's path): its commit is unknown.
        return {"commit": None, "quay_bootstrap_changed": None, "imported_from": imported}
    return {"commit": run(["git", "rev-parse", "HEAD"]) or None,
            "quay_bootstrap_changed": bool(run(["git", "--no-optional-locks", "status",
                                                "--porcelain", "--", "quay_bootstrap"])),
            "imported_from": imported}


# ---------------------------------------------------------------- processes under the launcher


class Launched:
    """argv under cli_startup's launcher, in a thread; the child's PID is found in /proc (the
    launcher is our child, the command its child) so it can be read live and stopped by PID.
    `result` holds the launcher's figures (wall, the child's own peak RSS and CPU) once it exits.
    """

    def __init__(self, argv: list[str], env: dict[str, str], prefix: Path, marker: str) -> None:
        self.out, self.err = prefix.with_suffix(".out"), prefix.with_suffix(".err")
        self.result: dict | None = None
        self.failure: str | None = None
        self._thread = threading.Thread(target=self._launch, args=(argv, env), daemon=True)
        self._thread.start()
        self.pid = self._find(marker)

    def _launch(self, argv: list[str], env: dict[str, str]) -> None:
        try:
            self.result = measure_child(argv, env, str(self.out), str(self.err))
        except RuntimeError as err:
            self.failure = str(err)

    def _find(self, marker: str) -> int:
        deadline = time.monotonic() + 15
        me = str(os.getpid())
        while time.monotonic() < deadline:
            launcher = None
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    if _proc_stat(int(entry.name))[1] != me:
                        continue
                    if marker.encode() in (entry / "cmdline").read_bytes():
                        launcher = entry.name
                        break
                except (OSError, IndexError):
                    continue
            if launcher:
                try:
                    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
                except OSError:
                    children = []
                if children:
                    return int(children[0])
            if not self._thread.is_alive():
                break
            time.sleep(0.01)
        raise BenchError(f"could not find the process of {marker!r}: {self.failure or 'not started'}")

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 20.0) -> dict | None:
        """SIGTERM by PID, wait; SIGKILL if it does not go. Returns the launcher's figures."""
        if self._thread.is_alive():
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            self._thread.join(timeout)
            if self._thread.is_alive():
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self._thread.join(10)
        return self.result


class DockerEvents:
    """die/start/... events of one container name, from Docker's event stream, with timeNano."""

    def __init__(self, docker_host: str, name: str) -> None:
        self._client = docker_client(docker_host)  # its own connection: the stream blocks it
        self._stream = self._client.events(decode=True,
                                           filters={"type": "container", "container": name})
        self._lock = threading.Lock()
        self.items: list[tuple[float, str, str | None]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for event in self._stream:
                action = event.get("Action") or event.get("status") or ""
                code = (event.get("Actor") or {}).get("Attributes", {}).get("exitCode")
                with self._lock:
                    self.items.append((event["timeNano"] / 1e9, action, code))
        except Exception:  # noqa: BLE001 - closed at the end
            pass

    def after(self, action: str, t: float | None) -> float | None:
        if t is None:
            return None
        with self._lock:
            return next((at for at, what, _ in self.items if what == action and at > t), None)

    def count(self, action: str, start: float, end: float) -> int:
        with self._lock:
            return sum(1 for at, what, _ in self.items if what == action and start < at <= end)

    def between(self, start: float, end: float) -> list[list]:
        """[[seconds after start, action, exit code], ...]: the evidence of one round."""
        with self._lock:
            return [[round(at - start, 4), what, code] for at, what, code in self.items
                    if start < at <= end]

    def close(self) -> None:
        try:
            self._stream.close()
        except Exception:  # noqa: BLE001
            pass
        self._client.close()


class Poller:
    """GET the health URL every `every` s from a thread, remembering when it answered 200."""

    def __init__(self, url: str, every: float) -> None:
        self.url, self.every = url, every
        self.ok: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if answers_200(self.url):
                self.ok.append(time.time())
            self._stop.wait(self.every)

    def first_after(self, t: float | None) -> float | None:
        return None if t is None else next((at for at in self.ok if at > t), None)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


# ---------------------------------------------------------------- the bench


class Bench:
    """The node (one container name, port, control folder, stack dir) and its agents."""

    def __init__(self, work: Path, state: dict, env: dict[str, str], client, image: str,
                 bucket: str, qb: str, token: str) -> None:
        self.work, self.state, self.env, self.client = work, state, env, client
        self.image, self.bucket, self.qb = image, bucket, qb
        self.name = f"qb-wd-{token}"
        self.port = free_port()
        self.health_url = f"http://{HOST}:{self.port}/health/instance"
        self.control = work / "control"
        self.control.mkdir()
        os.chmod(self.control, 0o777)  # the fake Quay runs as 1001, like Quay
        self.set_state("healthy")
        self.agents: list[Launched] = []
        self.events = DockerEvents(state["docker_host"], self.name)
        pids = state.get("pids") or {}
        self.daemon_pids = [pids.get("dockerd"), pids.get("containerd")]

    # ------------------------------------------------------------ the node

    def set_state(self, text: str) -> None:
        """Atomically: the fake Quay reads the file on every request."""
        tmp = self.control / ".state.tmp"
        tmp.write_text(text)
        os.chmod(tmp, 0o666)
        os.replace(tmp, self.control / "state")

    def starts(self) -> int:
        path = self.control / "starts"
        return len(path.read_text().splitlines()) if path.exists() else 0

    def inspect(self) -> dict:
        return self.client.api.inspect_container(self.name)["State"]

    def settle(self) -> None:
        """Until the container has run SETTLE_S: a crash then looks like one on a node that ran."""
        state = self.inspect()
        if not state.get("Running"):
            raise BenchError(f"container {self.name} is {state.get('Status')}, not running")
        age = time.time() - _log_time(state["StartedAt"])
        if age < SETTLE_S:
            time.sleep(SETTLE_S - age)

    def crash(self) -> None:
        """SIGKILL the container's init from the host: what a crash of Quay looks like."""
        pid = self.inspect().get("Pid")
        if not pid:
            raise BenchError(f"container {self.name} has no PID")
        try:
            os.kill(pid, signal.SIGKILL)
        except PermissionError as err:
            raise MissingTool("killing the container's process needs root (or its uid 1001)") from err

    def remove(self) -> None:
        import docker

        try:
            self.client.api.remove_container(self.name, force=True)
        except docker.errors.NotFound:
            pass

    def daemon_cpu(self) -> float | None:
        seconds = [cpu_seconds(pid) for pid in self.daemon_pids if pid]
        return None if not seconds or None in seconds else sum(seconds)

    # ------------------------------------------------------------ agents

    def start_agent(self, label: str, stack: dict | None = None, **health: object) -> Agent:
        run_dir = self.work / label
        run_dir.mkdir()
        listen = f"{HOST}:{free_port()}"
        config = run_dir / "agent.yaml"
        # JSON is YAML. The node of tests/integration: host networking on a loopback port; one
        # stack.dir for every agent, so each adopts the container the first one created.
        config.write_text(json.dumps({
            "stack": {"source": f"s3://{self.bucket}/{PREFIX}",
                      "endpoint_url": self.state["moto_endpoint"], "region": "us-east-1",
                      "dir": str(self.work / "stack"), **(stack or {})},
            "image": {"reference": self.image},
            "container": {"name": self.name, "network_mode": "host", "ports": [], "sysctls": {},
                          "env": {"PORT": str(self.port)},
                          "volumes": [f"{self.control}:/control"]},
            "health": {"url": self.health_url, **health},
            # Never "auto": it would ask the real instance-metadata address.
            "report": {"autoscaling": False, "listen": listen,
                       "state_file": str(run_dir / "status.json")},
        }, indent=1))
        argv = [self.qb, "--config", str(config), "run", "--log-format", "json",
                "--log-level", "info"]
        agent = Agent(argv, self.env, run_dir / "agent", str(config), listen, label)
        self.agents.append(agent)
        return agent

    def stop_agents(self) -> None:
        for agent in self.agents:
            agent.stop()


class Agent(Launched):
    def __init__(self, argv: list[str], env: dict[str, str], prefix: Path, marker: str,
                 listen: str, label: str) -> None:
        self.listen, self.label = listen, label
        super().__init__(argv, env, prefix, marker)

    def status(self) -> dict:
        return get_json(f"http://{self.listen}/status") or {}

    def probes(self) -> float | None:
        """How many probes the agent has made (its Prometheus histogram's count)."""
        try:
            with urllib.request.urlopen(f"http://{self.listen}/metrics", timeout=2) as answer:
                text = answer.read().decode()
        except (urllib.error.URLError, OSError):
            return None
        for line in text.splitlines():
            if line.startswith("quay_bootstrap_probe_seconds_count"):
                return float(line.split()[-1])
        return None

    def log(self) -> list[dict]:
        return read_log(self.err)

    def tail(self) -> str:
        try:
            return "\n".join(self.err.read_text(errors="replace").splitlines()[-15:])
        except OSError:
            return ""

    def wait_healthy(self, after: float = 0.0, timeout: float = 90.0) -> tuple[float, float]:
        """Until /status says healthy since a moment later than `after`: (since, seen at)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status()
            if status.get("state") == "healthy" and float(status.get("since") or 0) > after:
                return float(status["since"]), time.time()
            if not self.alive():
                raise BenchError(f"agent {self.label} exited ({self.result or self.failure}):\n"
                                 + self.tail())
            time.sleep(0.05)
        raise BenchError(f"agent {self.label}: not healthy within {timeout:g} s; /status "
                         f"{self.status()}; log:\n{self.tail()}")

    def wait_event(self, event: str, after: float, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = first(self.log(), event, after)
            if found:
                return found
            if not self.alive():
                break
            time.sleep(0.02)
        raise BenchError(f"agent {self.label}: no {event} within {timeout:g} s; log:\n" + self.tail())

    def finish(self) -> dict:
        """Stop it (SIGTERM, as systemd does) and return its launcher figures and notable lines."""
        result = self.stop()
        if result is None:
            raise BenchError(f"agent {self.label}: the launcher failed: {self.failure}")
        if result["exit"] != 0:
            raise BenchError(f"agent {self.label} exited with {result['exit']} on SIGTERM:\n"
                             + self.tail())
        notable = [f"{e.get('level')} {e.get('event')}" for e in self.log()
                   if e.get("level") in ("warning", "error", "critical")]
        return {"maxrss_mib": result["maxrss_mib"], "cpu_s": result["user_s"] + result["sys_s"],
                "wall_s": result["wall_s"], "warnings": notable}


# ---------------------------------------------------------------- scenario 1: kill -> healthy


def kill_side(bench: Bench, side: str, label: str) -> dict:
    agent = poller = None
    if side != "docker_crash":
        agent = bench.start_agent(label, interval=IDLE_INTERVAL)
        agent.wait_healthy()
    bench.settle()
    if agent is not None:
        # Anywhere in the agent's probe cycle (it probes every health.interval once healthy).
        time.sleep(random.uniform(0, 10))
    starts_before = bench.starts()
    killed = time.time()
    if side == "agent_kill":
        bench.client.api.kill(bench.name)
    else:
        bench.crash()
    restarts_in_window = None
    if agent is not None:
        # When Quay itself answers again, seen from outside: the agent's own judgement is the
        # rest of die -> healthy.
        poller = Poller(bench.health_url, 0.1)
        try:
            healthy, seen = agent.wait_healthy(after=killed)
        finally:
            poller.stop()
    else:
        deadline = time.monotonic() + 60
        while not answers_200(bench.health_url):
            if time.monotonic() > deadline:
                raise BenchError(f"{label}: Docker did not bring the container back within 60 s "
                                 f"({bench.inspect().get('Status')})")
            time.sleep(POLL_S)
        healthy = seen = time.time()
    time.sleep(1.0)  # a second restart, if there is one, shows in the events and the starts file
    if agent is not None:
        restarts_in_window = agent.status().get("restarts_in_window")
    die = bench.events.after("die", killed)
    start = bench.events.after("start", die)
    answered = poller.first_after(start) if poller is not None else None
    events = bench.events.between(killed, time.time())
    got = {"side": side, "killed": killed, "die": die, "start": start, "healthy": healthy,
           "healthy_seen": seen, "kill_to_die_s": (die - killed) if die else None,
           "die_to_running_s": (start - die) if die and start else None,
           "die_to_healthy_s": (healthy - die) if die else None,
           "kill_to_healthy_s": healthy - killed,
           "starts": bench.starts() - starts_before,
           "start_events": bench.events.count("start", killed, time.time()),
           "die_to_answering_s": (answered - die) if answered and die else None,
           "answering_to_healthy_s": (healthy - answered) if answered else None,
           "docker_events": events, "first_start_by": first_start_by(side, events),
           "restarts_in_window": restarts_in_window, "agent_logged": None}
    if agent is not None:
        lines = agent.log()
        ours = first(lines, "container.restarting", killed)
        docker = first(lines, "container.restarted_by_docker", killed)
        if ours and (not docker or ours["t"] <= docker["t"]):
            got["agent_logged"] = "container.restarting"
        elif docker:
            got["agent_logged"] = "container.restarted_by_docker"
        got["restart_issued"] = ours["t"] if ours else None
        got["die_to_restart_issued_s"] = (ours["t"] - die) if ours and die else None
        got["docker_restart_logged"] = docker["t"] if docker else None
        got["agent_lines"] = [e.get("event") for e in lines if e["t"] > killed]
        got["agent"] = agent.finish()
    if got["die"] is None:
        raise BenchError(f"{label}: no die event after the kill")
    return got


def first_start_by(side: str, events: list[list]) -> str:
    """Who started Quay first after the die, from Docker's events. The agent restarts a container
    that is `running` or `restarting` with `docker restart` (events start + restart, together) and
    an exited one with `docker start`; Docker's restart policy emits a lone start, and never
    acts after `docker kill` (a manual stop for Docker)."""
    if side != "agent_crash":
        return "agent" if side == "agent_kill" else "docker"
    starts = [at for at, what, _ in events if what == "start"]
    if not starts:
        return "nobody"
    paired = any(what == "restart" and 0 <= at - starts[0] < 0.01 for at, what, _ in events)
    return "agent" if paired else "docker"


def backoff_check(bench: Bench) -> dict:
    """Two `docker kill`s, the second 2 s after the agent says healthy again: its restart waits
    for the rest of restart.backoff_initial."""
    agent = bench.start_agent("backoff", interval=IDLE_INTERVAL)
    agent.wait_healthy()
    bench.settle()
    first_kill = time.time()
    bench.client.api.kill(bench.name)
    healthy, _ = agent.wait_healthy(after=first_kill)
    time.sleep(2.0)  # past the second after a restart in which the agent ignores Docker's events
    second_kill = time.time()
    bench.client.api.kill(bench.name)
    restarting = agent.wait_event("container.restarting", second_kill, 120)
    agent.wait_healthy(after=restarting["t"])
    die = bench.events.after("die", second_kill)
    return {"first_kill_to_healthy_s": healthy - first_kill,
            "second_die_to_restart_issued_s": restarting["t"] - die if die else None,
            "backoff_logged": restarting.get("backoff"), "agent": agent.finish()}


def echo_check(bench: Bench) -> dict:
    """A kill, and a crash, within a second of the agent's own restart: does the agent act on
    them? (It ignores Docker's events for a while after its restart, as echoes of it.)"""
    agent = bench.start_agent("echo", interval=IDLE_INTERVAL)
    agent.wait_healthy()
    bench.settle()
    got: dict = {}
    for what in ("crash", "docker_kill"):
        before = time.time()
        bench.client.api.kill(bench.name)
        restarting = agent.wait_event("container.restarting", before, 120)
        agent.wait_healthy(after=restarting["t"])
        counted = agent.status().get("restarts_in_window")
        hit = time.time()
        if what == "crash":
            bench.crash()
        else:
            bench.client.api.kill(bench.name)
        deadline = time.monotonic() + 3 * 10 + 20  # 3 failed probes at interval 10 s, and some
        noticed = None
        while time.monotonic() < deadline:
            status = agent.status()
            if float(status.get("since") or 0) > hit or (status.get("restarts_in_window") or 0) > counted:
                noticed = time.time()
                break
            if what == "crash" and answers_200(bench.health_url) and time.time() - hit > 2 * 10 + 2:
                break  # Docker brought it back and two probe intervals passed: not noticed
            time.sleep(0.1)
        time.sleep(0.5)  # the log line and the events that go with a change of state
        restarted = first(agent.log(), "container.restarting", hit)
        die = bench.events.after("die", hit)
        start = bench.events.after("start", die)
        got[what] = {
            "die_after_restart_issued_s": (die - restarting["t"]) if die else None,
            "agent_noticed_after_s": (noticed - die) if noticed and die else None,
            "die_to_restart_issued_s": (restarted["t"] - die) if restarted and die else None,
            "die_to_running_s": (start - die) if start and die else None,
            "restarts_counted": [counted, agent.status().get("restarts_in_window")],
            "agent_logged": [e.get("event") for e in agent.log() if e["t"] > hit],
            "docker_events": bench.events.between(hit, time.time())}
        if restarted:
            agent.wait_healthy(after=restarted["t"])
        elif not bench.inspect().get("Running"):
            bench.client.api.start(bench.name)  # the later scenarios need Quay running
            agent.wait_healthy(after=hit)
    got["agent"] = agent.finish()
    return got


# ---------------------------------------------------------------- scenario 2: detection


def detect_round(bench: Bench, mode: str, label: str) -> dict:
    agent = bench.start_agent(label, interval=f"{DETECT['interval']:g}s",
                              timeout=f"{DETECT['timeout']:g}s",
                              failure_threshold=DETECT["failure_threshold"])
    agent.wait_healthy()
    time.sleep(random.uniform(0, DETECT["interval"]))  # any point of the probe cycle
    broken = time.time()
    bench.set_state(DETECT_MODES[mode])
    bound = DETECT["failure_threshold"] * DETECT["interval"] + DETECT["timeout"]
    try:
        restarting = agent.wait_event("container.restarting", broken, 4 * bound + 30)
    finally:
        bench.set_state("healthy")
    healthy, _ = agent.wait_healthy(after=restarting["t"])
    failing = first(agent.log(), "health.failing", broken)
    die = bench.events.after("die", restarting["t"] - 0.001)
    start = bench.events.after("start", die)
    return {"mode": mode, "broken": broken, "restart_issued": restarting["t"],
            "detect_s": restarting["t"] - broken, "bound_s": bound,
            "reason": restarting.get("reason"),
            "failing_logged_s": (failing["t"] - broken) if failing else None,
            "restart_to_running_s": (start - restarting["t"]) if start else None,
            "restart_to_healthy_s": healthy - restarting["t"],
            "agent": agent.finish()}


# ---------------------------------------------------------------- scenario 3: idle


BASELINE = """\
trap 'kill $! 2>/dev/null; exit 0' TERM
while :; do
  {curl} -fsS --max-time 5 {url} >/dev/null
  sleep 10 & wait $!
done
"""


def idle_round(bench: Bench, label: str, seconds: float, curl: str) -> dict:
    agent = bench.start_agent(label, interval=IDLE_INTERVAL)
    agent.wait_healthy()
    time.sleep(2.0)
    probes_before = agent.probes()
    daemon_before = bench.daemon_cpu()
    clock = os.sysconf("SC_CLK_TCK")
    t0 = time.monotonic()
    fields0 = _proc_stat(agent.pid)
    marker = f"{bench.health_url}#{label}"  # unique, so the launcher's command line is found
    script = BASELINE.format(curl=curl, url=f"'{marker}'")
    baseline = Launched(["/bin/bash", "-c", script], bench.env, bench.work / label / "baseline",
                        marker)
    time.sleep(seconds - (time.monotonic() - t0))
    fields1 = _proc_stat(agent.pid)
    t1 = time.monotonic()
    proc = _proc_status(agent.pid)
    bash = _proc_status(baseline.pid)
    base = baseline.stop()
    daemon_after = bench.daemon_cpu()
    probes_after = agent.probes()
    status = agent.status()
    window = t1 - t0
    started = time.time() - (time.monotonic() - t0)  # t0 on the log's clock
    # The daemon re-runs the pass (stack, lock, image) every stack.refresh_interval.
    refreshes = sum(1 for e in agent.log() if e.get("event") == "stack.done"
                    and started < e["t"] <= started + window)
    cpu = (int(fields1[11]) + int(fields1[12]) - int(fields0[11]) - int(fields0[12])) / clock
    if base is None:
        raise BenchError(f"{label}: the baseline's launcher failed: {baseline.failure}")
    got = {
        "window_s": window,
        "agent_cpu_s": cpu, "agent_cpu_pct": 100 * cpu / window,
        "agent_user_s": (int(fields1[11]) - int(fields0[11])) / clock,
        "agent_sys_s": (int(fields1[12]) - int(fields0[12])) / clock,
        "agent_vmhwm_mib": _kib_to_mib(proc["VmHWM"]), "agent_vmrss_mib": _kib_to_mib(proc["VmRSS"]),
        "agent_threads": int(proc["Threads"]),
        "agent_probes": (probes_after - probes_before
                         if probes_after is not None and probes_before is not None else None),
        "agent_state_after": status.get("state"), "agent_stack_refreshes": refreshes,
        "baseline_cpu_s": base["user_s"] + base["sys_s"], "baseline_wall_s": base["wall_s"],
        "baseline_cpu_pct": 100 * (base["user_s"] + base["sys_s"]) / base["wall_s"],
        "baseline_maxrss_mib": base["maxrss_mib"], "baseline_bash_vmhwm_mib":
            _kib_to_mib(bash["VmHWM"]),
        "dockerd_containerd_cpu_s": (daemon_after - daemon_before
                                     if daemon_after is not None and daemon_before is not None
                                     else None),
    }
    got["agent"] = agent.finish()
    return got


# ---------------------------------------------------------------- report


def summarize(results: dict) -> dict:
    summary: dict = {}
    kill = results.get("kill") or []
    for side in KILL_SIDES:
        rows = [r for r in kill if r["side"] == side]
        if not rows:
            continue
        summary[side] = {key: stats([r.get(key) for r in rows]) for key in (
            "kill_to_die_s", "die_to_restart_issued_s", "die_to_running_s", "die_to_answering_s",
            "answering_to_healthy_s", "die_to_healthy_s", "kill_to_healthy_s")}
        summary[side]["first_start_by"] = {who: sum(1 for r in rows if r["first_start_by"] == who)
                                           for who in ("agent", "docker")}
        summary[side]["agent_logged"] = {what: sum(1 for r in rows if r["agent_logged"] == what)
                                         for what in ("container.restarting",
                                                      "container.restarted_by_docker")}
        summary[side]["extra_starts"] = sum(max(r["starts"] - 1, 0) for r in rows)
        summary[side]["restarts_counted"] = [r["restarts_in_window"] for r in rows]
    floor = summary.get("docker_crash", {}).get("die_to_healthy_s", {}).get("median")
    for side in ("agent_kill", "agent_crash"):
        median = summary.get(side, {}).get("die_to_healthy_s", {}).get("median")
        if floor and median is not None:
            summary[side]["ratio_to_docker_alone"] = median / floor
    for mode in DETECT_MODES:
        rows = [r for r in results.get("detect") or [] if r["mode"] == mode]
        if rows:
            summary[f"detect_{mode}"] = {
                "detect_s": stats([r["detect_s"] for r in rows]), "bound_s": rows[0]["bound_s"],
                "within_bound": sum(1 for r in rows if r["detect_s"] <= r["bound_s"]),
                "rounds": len(rows),
                "restart_to_healthy_s": stats([r["restart_to_healthy_s"] for r in rows])}
    idle = results.get("idle") or []
    if idle:
        summary["idle"] = {key: stats([r[key] for r in idle]) for key in (
            "agent_cpu_pct", "agent_vmhwm_mib", "agent_vmrss_mib", "agent_probes",
            "agent_stack_refreshes",
            "baseline_cpu_pct", "baseline_maxrss_mib", "baseline_bash_vmhwm_mib",
            "dockerd_containerd_cpu_s")}
    agents = [r["agent"] for group in ("kill", "detect", "idle") for r in results.get(group) or []
              if r.get("agent")]
    if agents:
        summary["agent_lifetime"] = {"maxrss_mib": stats([a["maxrss_mib"] for a in agents])}
    return summary


def goals_of(summary: dict) -> dict:
    goals = {}
    restart = summary.get("agent_kill", {}).get("die_to_restart_issued_s", {})
    if restart.get("n"):
        goals["die_to_restart_issued"] = {"max_s": GOAL_RESTART_S, "worst_s": restart["max"],
                                          "met": restart["max"] <= GOAL_RESTART_S}
    idle = summary.get("idle")
    if idle:
        goals["idle_peak_rss"] = {"max_mib": GOAL_RSS_MIB, "worst_mib": idle["agent_vmhwm_mib"]["max"],
                                  "met": idle["agent_vmhwm_mib"]["max"] <= GOAL_RSS_MIB}
        goals["idle_cpu"] = {"max_pct": GOAL_CPU_PCT, "worst_pct": idle["agent_cpu_pct"]["max"],
                             "met": idle["agent_cpu_pct"]["max"] <= GOAL_CPU_PCT}
    for mode in DETECT_MODES:
        found = summary.get(f"detect_{mode}")
        if found:
            goals[f"detect_{mode}_within_bound"] = {
                "bound_s": found["bound_s"], "worst_s": found["detect_s"]["max"],
                "met": found["within_bound"] == found["rounds"]}
    return goals


def table(summary: dict, goals: dict, results: dict) -> str:
    def cell(value, fmt=".3f") -> str:
        return format(value, fmt) if value is not None else "-"

    def row(what: str, s: dict, unit: str = "s", fmt: str = ".3f") -> str:
        return (f"  {what:<44} {cell(s['median'], fmt):>9} {cell(s['min'], fmt):>9} "
                f"{cell(s['max'], fmt):>9}  {unit}")

    def met(key: str) -> str:
        return "met" if goals[key]["met"] else "NOT MET"

    out = [f"  {'':<44} {'median':>9} {'min':>9} {'max':>9}"]
    names = {"agent_kill": "agent + docker kill", "agent_crash": "agent + crash (SIGKILL init)",
             "docker_crash": "Docker alone + crash (floor)"}
    for side in KILL_SIDES:
        s = summary.get(side)
        if not s:
            continue
        counted = "" if side == "docker_crash" else (
            f"; restarts the agent counted per round {s['restarts_counted']}")
        out.append(f"{names[side]} ({s['kill_to_healthy_s']['n']} rounds; first start by the "
                   f"agent {s['first_start_by']['agent']}x, by Docker {s['first_start_by']['docker']}x;"
                   f" Quay started more than once {s['extra_starts']}x{counted})")
        for key, what in (("kill_to_die_s", "kill -> die event"),
                          ("die_to_restart_issued_s", "die -> restart issued (agent's log)"),
                          ("die_to_running_s", "die -> start event (running)"),
                          ("die_to_answering_s", "die -> Quay answers 200 (outside poll)"),
                          ("answering_to_healthy_s", "Quay answers 200 -> agent says healthy"),
                          ("die_to_healthy_s", "die -> healthy"),
                          ("kill_to_healthy_s", "kill -> healthy")):
            if s[key]["n"]:
                out.append(row(what, s[key]))
        if "ratio_to_docker_alone" in s:
            out.append(f"  ratio die -> healthy to Docker alone (medians): "
                       f"{s['ratio_to_docker_alone']:.2f}")
    if "die_to_restart_issued" in goals:
        g = goals["die_to_restart_issued"]
        out.append(f"goal: restart issued within {GOAL_RESTART_S} s of the die event (docker kill, "
                   f"worst {g['worst_s']:.3f} s): {met('die_to_restart_issued')}")
    backoff = results.get("backoff")
    if backoff:
        out.append(f"second docker kill 2 s after healthy again: restart issued "
                   f"{cell(backoff['second_die_to_restart_issued_s'])} s after the die "
                   f"(restart.backoff_initial; that log line says backoff={backoff['backoff_logged']})")
    echo = results.get("echo")
    if echo:
        for what in ("crash", "docker_kill"):
            e = echo[what]
            out.append(
                f"{what.replace('_', ' ')} {cell(e['die_after_restart_issued_s'])} s after the agent's "
                f"restart: agent noticed "
                + (f"after {cell(e['agent_noticed_after_s'])} s" if e["agent_noticed_after_s"]
                   is not None else "NEVER")
                + f", restart issued {cell(e['die_to_restart_issued_s'])} s, running "
                f"{cell(e['die_to_running_s'])} s after the die; restarts counted "
                f"{e['restarts_counted'][0]} -> {e['restarts_counted'][1]}; logged "
                + (", ".join(e["agent_logged"]) or "nothing"))
    for mode in DETECT_MODES:
        s = summary.get(f"detect_{mode}")
        if s:
            out += ["", f"detection, state `{DETECT_MODES[mode]}` (interval {DETECT['interval']:g}s, "
                    f"timeout {DETECT['timeout']:g}s, failure_threshold {DETECT['failure_threshold']};"
                    f" bound {s['bound_s']:g} s; {s['within_bound']}/{s['rounds']} within)",
                    row("broken -> restart issued", s["detect_s"]),
                    row("restart issued -> healthy", s["restart_to_healthy_s"]),
                    f"goal: within the bound: {met(f'detect_{mode}_within_bound')}"]
    s = summary.get("idle")
    if s:
        out += ["", f"idle, health.interval {IDLE_INTERVAL}, {s['agent_cpu_pct']['n']} windows of "
                f"{results['params']['idle_seconds']:g} s",
                row("agent CPU, % of one core", s["agent_cpu_pct"], "%"),
                row("agent peak RSS (VmHWM)", s["agent_vmhwm_mib"], "MiB", ".1f"),
                row("agent RSS at the end (VmRSS)", s["agent_vmrss_mib"], "MiB", ".1f"),
                row("agent probes in the window", s["agent_probes"], "", ".0f"),
                row("agent stack refreshes in the window", s["agent_stack_refreshes"], "", ".0f"),
                row("bash + curl loop CPU (with children), %", s["baseline_cpu_pct"], "%"),
                row("bash + curl loop peak RSS (launcher)", s["baseline_maxrss_mib"], "MiB", ".1f"),
                row("bash's own peak RSS (VmHWM)", s["baseline_bash_vmhwm_mib"], "MiB", ".1f"),
                row("dockerd + containerd CPU in the window", s["dockerd_containerd_cpu_s"]),
                f"goal: CPU <= {GOAL_CPU_PCT}% (worst {goals['idle_cpu']['worst_pct']:.3f}%): "
                f"{met('idle_cpu')}",
                f"goal: peak RSS <= {GOAL_RSS_MIB:g} MiB (worst "
                f"{goals['idle_peak_rss']['worst_mib']:.1f} MiB): {met('idle_peak_rss')}"]
    life = summary.get("agent_lifetime")
    if life:
        out += ["", "every agent run, lifetime peak RSS (launcher): "
                f"median {life['maxrss_mib']['median']:.1f} MiB, max {life['maxrss_mib']['max']:.1f} MiB"]
    return "\n".join(out)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds per scenario (default 5)")
    parser.add_argument("--idle-seconds", type=float, default=60.0,
                        help="length of an idle window (default 60)")
    parser.add_argument("--only", default="kill,detect,idle",
                        help="comma-separated scenarios: kill, detect, idle (default all)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (agent logs)")
    args = parser.parse_args(argv)
    scenarios = [s.strip() for s in args.only.split(",") if s.strip()]
    if args.rounds < 1 or args.idle_seconds < 10 or \
            not set(scenarios) <= {"kill", "detect", "idle"} or not scenarios:
        parser.error("--rounds >= 1, --idle-seconds >= 10, --only of kill, detect, idle")

    qb, curl = tool("quay-bootstrap"), shutil.which("curl")
    missing = [what for what, found in (("quay-bootstrap (run `pip install -e .`)", qb),
                                        ("curl", curl), ("bash", os.access("/bin/bash", os.X_OK)))
               if not found]
    if missing:
        print("missing: " + "; ".join(missing), file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="qb-bench-wd-"))
    token = secrets.token_hex(4)
    bucket = f"qb-bench-{token}"
    state: dict = {}
    ours = uploaded = False
    client = bench = image = None
    try:
        state, ours = open_bed(work)
        _, fake_quay, stacks = _testbed()
        docker_config = work / "docker-config"  # never ~/.docker/config.json
        docker_config.mkdir()
        (docker_config / "config.json").write_text("{}\n")
        os.environ["DOCKER_CONFIG"] = str(docker_config)
        env = child_env(work, HERE / "results" / ".pycache")
        env.update(DOCKER_HOST=state["docker_host"], DOCKER_CONFIG=str(docker_config))
        aws = tool("aws")
        info = machine(aws, env) if aws else {"nproc": os.cpu_count()}
        client = docker_client(state["docker_host"])
        info["dockerd"] = client.version().get("Version", "?")
        info["agent_code"] = code_version(env)
        print(f"machine: {info.get('nproc')} cores ({info.get('cpu', '?')}), {info.get('os', '?')}, "
              f"Python {info.get('python', '?')}, dockerd {info['dockerd']}, quay-bootstrap "
              f"{info.get('quay_bootstrap', '?')} ({info['agent_code']['commit']}"
              f"{', quay_bootstrap/ changed' if info['agent_code']['quay_bootstrap_changed'] else ''}, "
              f"from {info['agent_code']['imported_from']}); load average "
              f"{[round(x, 2) for x in os.getloadavg()]}", flush=True)
        if os.getloadavg()[0] > 0.5:
            print("note: the machine is busy (1-minute load average above 0.5); "
                  "the figures will be noisy", flush=True)

        files = stacks.sample_stack()
        print(f"test bed: {'started for this run' if ours else 'TESTBED_DIR=' + state['dir']}; "
              f"stack to s3://{bucket}/{PREFIX}; building the fake Quay ...", flush=True)
        uploaded = True
        upload_stack(state["moto_endpoint"], bucket, files)
        image = fake_quay.build(client, state["registry"], IMAGE_TAG)
        bench = Bench(work, state, env, client, image, bucket, qb, token)

        # Warm-up: the first agent fetches the stack and creates the container; every later
        # agent adopts it.
        warm = bench.start_agent("warmup", interval=IDLE_INTERVAL)
        warm.wait_healthy()
        warm.finish()
        if bench.inspect().get("Status") != "running":
            raise BenchError("the agent stopped the container on SIGTERM; it must leave it running")

        results: dict = {"params": {"rounds": args.rounds, "idle_seconds": args.idle_seconds,
                                    "scenarios": scenarios, "settle_s": SETTLE_S,
                                    "floor_poll_s": POLL_S, "detect": DETECT,
                                    "idle_interval": IDLE_INTERVAL,
                                    "testbed": "own" if ours else "$TESTBED_DIR"}}
        if "kill" in scenarios:
            results["kill"] = []
            for n in range(args.rounds):
                order = KILL_SIDES if n % 2 == 0 else KILL_SIDES[::-1]
                line = []
                for side in order:
                    got = kill_side(bench, side, f"{side}{n}")
                    results["kill"].append(got)
                    line.append(f"{side} die->healthy {got['die_to_healthy_s']:.3f} s"
                                + (f" (restart issued +{got['die_to_restart_issued_s']:.3f} s)"
                                   if got.get("die_to_restart_issued_s") is not None else "")
                                + (f" [first start by {got['first_start_by']}, "
                                   f"Quay starts {got['starts']}]"))
                print(f"  kill round {n + 1}/{args.rounds}: " + "; ".join(line), flush=True)
            results["backoff"] = backoff_check(bench)
            print(f"  backoff: second kill, restart issued "
                  f"{results['backoff']['second_die_to_restart_issued_s']:.3f} s after the die",
                  flush=True)
            results["echo"] = echo_check(bench)
            print("  within a second of the agent's restart: "
                  + "; ".join(f"{what} noticed after {results['echo'][what]['agent_noticed_after_s']}"
                              for what in ("crash", "docker_kill")), flush=True)
        if "detect" in scenarios:
            results["detect"] = []
            for n in range(args.rounds):
                for mode in (DETECT_MODES if n % 2 == 0 else list(DETECT_MODES)[::-1]):
                    got = detect_round(bench, mode, f"detect_{mode}{n}")
                    results["detect"].append(got)
                    print(f"  detect round {n + 1}/{args.rounds} {mode}: restart issued "
                          f"{got['detect_s']:.3f} s after the break (bound {got['bound_s']:g} s)",
                          flush=True)
        if "idle" in scenarios:
            results["idle"] = []
            for n in range(args.rounds):
                got = idle_round(bench, f"idle{n}", args.idle_seconds, curl)
                results["idle"].append(got)
                print(f"  idle round {n + 1}/{args.rounds}: agent CPU {got['agent_cpu_pct']:.3f}% "
                      f"VmHWM {got['agent_vmhwm_mib']:.1f} MiB ({got['agent_probes']:.0f} probes, "
                      f"{got['agent_stack_refreshes']} stack refreshes); "
                      f"bash loop CPU {got['baseline_cpu_pct']:.3f}%", flush=True)

        summary = summarize(results)
        goals = goals_of(summary)
        print()
        print(table(summary, goals, results))
        info["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        result = {
            "benchmark": "watchdog",
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": info,
            "stack_files": len(files),
            "commands": {"agent": "quay-bootstrap --config CFG run --log-format json "
                                  "--log-level info",
                         "baseline": BASELINE.format(curl="curl", url="URL")},
            "summary": summary,
            "goals": goals,
            **results,
        }
        return finish(result, args.json)
    except BenchError as err:
        return failed(err, work, args)
    finally:
        cleanup(state, ours, uploaded, bucket, client, bench, image, work, args.keep)


def cleanup(state: dict, ours: bool, uploaded: bool, bucket: str, client, bench, image,
            work: Path, keep: bool) -> None:
    """Leave a shared bed as it was found: only what this run created goes."""
    notes = []
    if bench is not None:
        bench.stop_agents()
        bench.events.close()
        try:
            bench.remove()
        except Exception as err:  # noqa: BLE001 - tidying must not hide the result
            notes.append(f"container {bench.name}: {err}")
    if client is not None and image is not None and not ours:
        try:
            client.images.remove(image)
        except Exception as err:  # noqa: BLE001
            notes.append(f"image {image}: {err}")
    if uploaded and not ours:
        try:
            delete_bucket(state["moto_endpoint"], bucket)
        except Exception as err:  # noqa: BLE001
            notes.append(f"s3://{bucket}: {err}")
    if client is not None:
        client.close()
    if ours:
        bed, _, _ = _testbed()
        bed.stop(work / "bed")
    for note in notes:
        print(f"note: could not remove {note}", file=sys.stderr)
    if not keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
