"""Benchmark: how long a node's /health/instance is not 200 during a config roll, against the floor.

Usage: python bench/roll.py [--rounds 5] [--warmup 1] [--stop-timeout 30] [--json PATH] [--keep]

Uses the test bed named by $TESTBED_DIR when it runs, else starts one of its own and stops it at
the end. Set-up, not measured: the sample conf/stack (tests/testbed/stacks.py) goes to a new
bucket on the bed's moto, the fake Quay (tests/testbed/fake_quay.py) to the bed's registry, and
one agent daemon starts, `quay-bootstrap --config CFG run --log-format json` under the launcher
of cli_startup, with the node of tests/integration (host networking, PORT on a loopback port, a
control folder at /control), stack.refresh_interval 1s, health.interval 10s (production-like),
health.start_period 30s, container.stop_timeout STOP_TIMEOUT, report.autoscaling false and its
endpoint on a loopback port. It stays up for every round. Each round, three sides one after the
other, rotating which goes first:

    agent      with the daemon healthy, robots.txt of the stack changes in the bucket; the agent
               notices within a refresh interval, fetches, pulls (nothing: the image is already
               there), takes a lease, and replaces the container: stop, rename aside, create,
               start, first 200, remove the old one
    floor      `docker stop -t STOP_TIMEOUT` + `docker start` (the Docker CLI) of an equivalent
               fake Quay container (same image, same mounts: a stack folder :ro,Z and a control
               folder; same restart policy and stop timeout; created with the agent's own
               build_spec + create_and_start), on the same engine
    floor_api  the same stop + start through the engine API (docker SDK, this process): the
               floor without the two CLI start-ups

A poller thread GETs http://127.0.0.1:PORT/health/instance of the side being measured every
10 ms (each request with a 0.5 s timeout) and keeps every answer. The figure of a run is the
total time it is not 200: for each run of non-200 answers, from the first one sent to the next
200 sent (the poll step, about 10 ms, is the resolution). An agent run ends when the agent logs
`rollout.applied` and the container answers 200 again; it is checked: a new container, its
io.quay-bootstrap.stack-version label changed to the version the agent fetched, the folder it
mounts at /conf/stack holding the new stack byte for byte, the fake Quay started once more, no
`NAME-previous-*` container left. A floor run is checked the same way (same container, started
once more).

Where the time goes comes from Docker's event stream (kill, die, stop, rename, create, start,
destroy, with timeNano) and the agent's JSON log (`stack.done`, `lock.done`, `image.done`,
`rollout.lease_acquired`, `rollout.replacing`, `rollout.applied`): the fetch, the image check
and the lease must all end before the first non-200 answer (they do not count as downtime).

Goal (the issue): the agent adds 0.2 s or less to the floor (median agent - median floor, the
floor being `docker stop` + `docker start` with the CLI). Results go to stdout and
bench/results/roll.json. Exit status: 0 ok (a goal not met is reported, not an error), 1 a run
failed, 2 a tool or the test bed is missing.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

# Every benchmark measures children the same way; the script's folder is on sys.path.
from cli_startup import tool
from fetch_vs_sync import (
    BenchError,
    child_env,
    delete_bucket,
    failed,
    finish,
    machine,
    verify_tree,
)
from once_vs_init_script import DOCKER_CLI, _testbed, docker_client, free_port, open_bed, upload_stack
from watchdog import Launched, read_log, stats

HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "results" / "roll.json"
HOST = "127.0.0.1"
PREFIX = "conf/stack"
# A release-shaped tag (the agent's default image.allowed_tags); removed from a shared daemon at
# the end.
IMAGE_TAG = "v3.9.0-rollbench"
GOAL_EXTRA_S = 0.2
POLL_EVERY_S = 0.01
POLL_TIMEOUT_S = 0.5
VARIANTS = ("agent", "floor", "floor_api")
HEALTH = {"interval": "10s", "start_period": "30s"}
REFRESH_INTERVAL = "1s"
ROLL_TIMEOUT_S = 60.0  # a refresh interval, the start period, and room to spare
TAIL_S = 0.3  # keep polling this long after the end, so a flap would show
# The agent's log lines that tell where a roll's time goes, in the order they come.
ROLL_EVENTS = ("stack.done", "lock.done", "image.done", "rollout.lease_acquired",
               "rollout.replacing", "container.reconcile", "rollout.applied",
               "rollout.lease_released")
# Docker's events inside a window, in the order they come.
WINDOW_EVENTS = ("kill", "die", "stop", "rename", "create", "start")


# ---------------------------------------------------------------- the poller and the events


class Poller:
    """GET the URL every `every` s from its own thread, each request with `timeout`; every
    answer kept as (sent, answered, status or None)."""

    def __init__(self, url: str, every: float, timeout: float) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.path = parts.hostname, parts.port or 80, parts.path or "/"
        self.every, self.timeout = every, timeout
        self.samples: list[tuple[float, float, int | None]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="poller", daemon=True)
        self._thread.start()

    def _get(self) -> int | None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request("GET", self.path)
            response = conn.getresponse()
            response.read()
            return response.status
        except (OSError, http.client.HTTPException):
            return None
        finally:
            conn.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            sent = time.time()
            status = self._get()
            with self._lock:
                self.samples.append((sent, time.time(), status))
            self._stop.wait(max(0.0, sent + self.every - time.time()))

    def snapshot(self) -> list[tuple[float, float, int | None]]:
        with self._lock:
            return list(self.samples)

    def last_ok(self) -> bool:
        with self._lock:
            return bool(self.samples) and self.samples[-1][2] == 200

    def stop(self) -> list[tuple[float, float, int | None]]:
        self._stop.set()
        self._thread.join(5)
        return self.snapshot()


def outages(samples: list[tuple[float, float, int | None]]) -> list[tuple[float, float | None]]:
    """(first non-200 sent, next 200 sent) for every run of non-200 answers; None: not over."""
    found: list[tuple[float, float | None]] = []
    down = None
    for sent, _, status in samples:
        if status != 200 and down is None:
            down = sent
        elif status == 200 and down is not None:
            found.append((down, sent))
            down = None
    if down is not None:
        found.append((down, None))
    return found


def poll_figures(samples: list[tuple[float, float, int | None]], what: str) -> dict:
    """The not-200 total of one run and how it was seen; raises when it never ended or never
    began (a run that was not measured)."""
    gaps = outages(samples)
    if not gaps:
        raise BenchError(f"{what}: the poller never saw a non-200 answer "
                         f"({len(samples)} answers): the container was not stopped?")
    if gaps[-1][1] is None:
        raise BenchError(f"{what}: not 200 again at the end ({len(samples)} answers, "
                         f"last {samples[-1][2]})")
    start, end = gaps[0][0], gaps[-1][1]
    inside = [s for s in samples if start - POLL_EVERY_S <= s[0] <= end]
    steps = [b[0] - a[0] for a, b in zip(inside, inside[1:])]
    statuses: dict[str, int] = {}
    for sent, _, status in samples:
        if start <= sent < end:
            key = "no answer" if status is None else str(status)
            statuses[key] = statuses.get(key, 0) + 1
    return {"down_s": sum(b - a for a, b in gaps), "outages": len(gaps),
            "outage_s": [round(b - a, 4) for a, b in gaps], "down_start": start, "down_end": end,
            "answers": len(samples), "answers_in_window": statuses,
            "poll_step_max_s": max(steps) if steps else None,
            "request_max_s": max(got - sent for sent, got, _ in samples)}


class Events:
    """Docker's container events for names that start with `prefix` (also those renamed away
    from such a name), with timeNano, from one stream read by a thread."""

    def __init__(self, docker_host: str, prefix: str) -> None:
        self.prefix = prefix
        self._client = docker_client(docker_host)  # its own connection: the stream blocks it
        self._stream = self._client.events(decode=True, filters={"type": "container"})
        self._lock = threading.Lock()
        self.items: list[dict] = []
        threading.Thread(target=self._read, name="docker-events", daemon=True).start()

    def _read(self) -> None:
        try:
            for event in self._stream:
                actor = event.get("Actor") or {}
                attributes = actor.get("Attributes") or {}
                name = attributes.get("name") or ""
                old = (attributes.get("oldName") or "").lstrip("/")
                if not (name.startswith(self.prefix) or old.startswith(self.prefix)):
                    continue
                item = {"t": event["timeNano"] / 1e9,
                        "action": event.get("Action") or event.get("status") or "",
                        "name": name, "id": (actor.get("ID") or "")[:12]}
                for key, value in (("old_name", old), ("signal", attributes.get("signal")),
                                   ("exit", attributes.get("exitCode"))):
                    if value:
                        item[key] = value
                with self._lock:
                    self.items.append(item)
        except Exception:  # noqa: BLE001 - the stream is closed at the end
            pass

    def between(self, start: float, end: float) -> list[dict]:
        with self._lock:
            return [dict(e) for e in self.items if start <= e["t"] <= end]

    def close(self) -> None:
        try:
            self._stream.close()
        except Exception:  # noqa: BLE001
            pass
        self._client.close()


def first_event(events: list[dict], action: str, after: float | None,
                ident: str | None = None) -> float | None:
    if after is None:
        return None
    return next((e["t"] for e in events if e["action"] == action and e["t"] >= after
                 and (ident is None or e["id"] == ident)), None)


def span(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


# ---------------------------------------------------------------- the node, the floor, the agent


class Bench:
    """The node the agent runs, the floor's container, and the measured runs."""

    def __init__(self, work: Path, state: dict, env: dict[str, str], client, image: str,
                 bucket: str, qb: str, token: str, stop_timeout: int,
                 files: dict[str, bytes]) -> None:
        self.work, self.state, self.env, self.client = work, state, env, client
        self.image, self.bucket, self.qb, self.stop_timeout = image, bucket, qb, stop_timeout
        self.files = dict(files)
        self.prefix = f"qb-roll-{token}"
        self.name = f"{self.prefix}-node"
        self.floor_name = f"{self.prefix}-floor"
        self.port, self.floor_port = free_port(), free_port()
        self.url = f"http://{HOST}:{self.port}/health/instance"
        self.floor_url = f"http://{HOST}:{self.floor_port}/health/instance"
        self.control = self._folder(work / "control")
        self.floor_control = self._folder(work / "floor-control")
        self.events = Events(state["docker_host"], self.prefix)
        self.agent: Launched | None = None
        self.listen = ""
        self.s3 = None

    @staticmethod
    def _folder(path: Path) -> Path:
        path.mkdir()
        os.chmod(path, 0o777)  # the fake Quay runs as 1001, like Quay
        return path

    # ------------------------------------------------------------ set-up

    def start_agent(self) -> None:
        run_dir = self.work / "agent"
        run_dir.mkdir()
        self.listen = f"{HOST}:{free_port()}"
        config = run_dir / "agent.yaml"
        # JSON is YAML. The node of tests/integration (conftest.Node): host networking on a
        # loopback port, a control folder; production-like health pace, a fast refresh.
        config.write_text(json.dumps({
            "stack": {"source": f"s3://{self.bucket}/{PREFIX}",
                      "endpoint_url": self.state["moto_endpoint"], "region": "us-east-1",
                      "dir": str(self.work / "stack"), "refresh_interval": REFRESH_INTERVAL},
            "image": {"reference": self.image},
            "container": {"name": self.name, "network_mode": "host", "ports": [], "sysctls": {},
                          "env": {"PORT": str(self.port)},
                          "volumes": [f"{self.control}:/control"],
                          "stop_timeout": f"{self.stop_timeout}s"},
            "health": {"url": self.url, **HEALTH},
            # Never "auto": it would ask the real instance-metadata address.
            "report": {"autoscaling": False, "listen": self.listen,
                       "state_file": str(run_dir / "status.json")},
        }, indent=1))
        argv = [self.qb, "--config", str(config), "run", "--log-format", "json"]
        self.agent = Launched(argv, self.env, run_dir / "agent", str(config))
        self.wait_agent_healthy(after=0.0, timeout=90.0)

    def start_floor(self) -> None:
        """The floor's container, created the way the agent creates Quay's, on a stack folder
        of its own (the agent prunes its old versions)."""
        from quay_bootstrap.config import ContainerConfig
        from quay_bootstrap.container import Docker, build_spec

        stack = self.work / "floor-stack"
        for key, data in self.files.items():
            path = stack / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        found = self.client.images.get(self.image)
        digest = (found.attrs.get("RepoDigests") or ["floor"])[0]
        container = ContainerConfig(
            name=self.floor_name, network_mode="host", ports=[], sysctls={},
            env={"PORT": str(self.floor_port)}, volumes=[f"{self.floor_control}:/control"],
            stop_timeout=float(self.stop_timeout))
        spec = build_spec(container, found.id, digest, stack, "floor")
        engine = Docker(self.state["docker_host"])
        try:
            engine.create_and_start(spec)
        finally:
            engine.client.close()
        self.wait_200(self.floor_url, 30.0, "the floor's container")

    def upload(self, key: str, data: bytes) -> None:
        if self.s3 is None:
            import boto3

            self.s3 = boto3.session.Session().client(
                "s3", endpoint_url=self.state["moto_endpoint"], region_name="us-east-1",
                aws_access_key_id="testing", aws_secret_access_key="testing")
        self.s3.put_object(Bucket=self.bucket, Key=f"{PREFIX}/{key}", Body=data)
        self.files[key] = data

    # ------------------------------------------------------------ waiting

    def status(self) -> dict:
        try:
            host, _, port = self.listen.rpartition(":")
            conn = http.client.HTTPConnection(host, int(port), timeout=2)
            try:
                conn.request("GET", "/status")
                response = conn.getresponse()
                return json.loads(response.read()) if response.status == 200 else {}
            finally:
                conn.close()
        except (OSError, ValueError, http.client.HTTPException):
            return {}

    def wait_agent_healthy(self, after: float, timeout: float) -> float:
        """Until the agent's /status says healthy since a moment later than `after`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status()
            if status.get("state") == "healthy" and float(status.get("since") or 0) > after:
                return float(status["since"])
            if not self.agent.alive():
                raise BenchError(f"the agent exited ({self.agent.result or self.agent.failure}):"
                                 f"\n{self.agent_tail()}")
            time.sleep(0.05)
        raise BenchError(f"the agent is not healthy within {timeout:g} s; /status "
                         f"{self.status()}; log:\n{self.agent_tail()}")

    @staticmethod
    def wait_200(url: str, timeout: float, what: str) -> None:
        poller = Poller(url, 0.05, POLL_TIMEOUT_S)
        try:
            deadline = time.monotonic() + timeout
            while not poller.last_ok():
                if time.monotonic() > deadline:
                    raise BenchError(f"{what}: {url} not 200 within {timeout:g} s")
                time.sleep(0.05)
        finally:
            poller.stop()

    def agent_tail(self) -> str:
        try:
            return "\n".join(self.agent.err.read_text(errors="replace").splitlines()[-15:])
        except OSError:
            return ""

    def starts(self, control: Path) -> int:
        path = control / "starts"
        return len(path.read_text().splitlines()) if path.exists() else 0

    def inspect(self, name: str) -> dict:
        return self.client.api.inspect_container(name)

    # ------------------------------------------------------------ the runs

    def agent_run(self, label: str) -> dict:
        """Change robots.txt in the bucket; the agent rolls the node. One measured run."""
        from quay_bootstrap.container import STACK_VERSION

        since = self.wait_agent_healthy(after=0.0, timeout=30.0)
        before = self.inspect(self.name)
        old_id, old_version = before["Id"], before["Config"]["Labels"].get(STACK_VERSION, "")
        starts = self.starts(self.control)
        body = f"User-agent: *\nDisallow: /{label.replace(' ', '-')}-{secrets.token_hex(4)}\n"
        poller = Poller(self.url, POLL_EVERY_S, POLL_TIMEOUT_S)
        try:
            time.sleep(0.1)  # answers from before the change: the window has a start
            put = time.time()
            self.upload("robots.txt", body.encode())
            applied = self._wait_applied(put, poller, label)
            state_after = self.status().get("state")
            time.sleep(TAIL_S)
        finally:
            samples = poller.stop()
        got = poll_figures(samples, f"agent {label}")
        got.update(side="agent", put=put, old_id=old_id[:12], old_version=old_version,
                   healthy_since_before=since)
        lines = [e for e in read_log(self.agent.err) if e["t"] >= put - 5]
        got["log"] = self._roll_log(lines, put, applied, label)
        after = self.inspect(self.name)
        new_id, new_version = after["Id"], after["Config"]["Labels"].get(STACK_VERSION, "")
        got.update(new_id=new_id[:12], new_version=new_version)
        self._check_agent_run(label, got, old_id, old_version, new_id, new_version, after, starts)
        end = time.time()
        events = self.events.between(put, end)
        got["docker_events"] = [{**e, "t": round(e["t"] - got["down_start"], 4)} for e in events]
        got["spans"] = agent_spans(got, events, old_id[:12], new_id[:12])
        # The agent's own /status: healthy again after the roll, and how long after applied.
        healthy = self.wait_agent_healthy(after=applied, timeout=30.0)
        got["status_healthy_after_applied_s"] = healthy - applied
        got["status_state_at_applied"] = state_after
        return got

    def _wait_applied(self, put: float, poller: Poller, label: str) -> float:
        deadline = time.monotonic() + ROLL_TIMEOUT_S
        while time.monotonic() < deadline:
            lines = read_log(self.agent.err)
            bad = next((e for e in lines if e["t"] >= put and e.get("event") in (
                "rollout.failed", "rollout.rolling_back", "rollout.rolled_back")), None)
            if bad:
                raise BenchError(f"agent {label}: {bad.get('event')}: {bad}")
            done = next((e for e in lines if e["t"] >= put and e.get("event") ==
                         "rollout.applied"), None)
            if done and poller.last_ok():
                return done["t"]
            if not self.agent.alive():
                raise BenchError(f"agent {label}: the agent exited:\n{self.agent_tail()}")
            time.sleep(0.05)
        raise BenchError(f"agent {label}: no rollout.applied and 200 within "
                         f"{ROLL_TIMEOUT_S:g} s; log:\n{self.agent_tail()}")

    @staticmethod
    def _roll_log(lines: list[dict], put: float, applied: float, label: str) -> dict:
        """The roll's log lines: the fetch that saw the change, then the rest, in order."""
        fetched = next((e for e in lines if e.get("event") == "stack.done" and e["t"] >= put
                        and e.get("result") == "applied"), None)
        if fetched is None:
            raise BenchError(f"agent {label}: no `stack.done` with result applied after the "
                             "change")
        found: dict[str, dict] = {"stack.done": fetched}
        at = fetched["t"]
        for name in ROLL_EVENTS[1:]:
            line = next((e for e in lines if e.get("event") == name and e["t"] >= at), None)
            if line is None:
                if name == "rollout.lease_released":
                    continue  # written after the end; not needed
                raise BenchError(f"agent {label}: no `{name}` log line after the fetch")
            found[name] = line
            at = line["t"]
        notable = [{"event": e.get("event"), "level": e.get("level"), "t": e["t"]}
                   for e in lines if put <= e["t"] <= applied + 1
                   and e.get("level") in ("warning", "error", "critical")]
        return {"lines": {k: {key: v[key] for key in ("t", "seconds", "result", "detail",
                                                      "action", "reason") if key in v}
                          for k, v in found.items()},
                "warnings": notable}

    def _check_agent_run(self, label: str, got: dict, old_id: str, old_version: str,
                         new_id: str, new_version: str, found: dict, starts: int) -> None:
        what = f"agent {label}"
        if new_id == old_id:
            raise BenchError(f"{what}: the container was not replaced ({new_id[:12]})")
        if not new_version or new_version == old_version:
            raise BenchError(f"{what}: io.quay-bootstrap.stack-version did not change "
                             f"({old_version!r} -> {new_version!r})")
        detail = got["log"]["lines"]["stack.done"].get("detail", "")
        fetched = detail.split("version ", 1)[-1].split(",", 1)[0]
        if not fetched or not new_version.startswith(fetched):
            raise BenchError(f"{what}: the container runs stack {new_version[:12]}, the agent "
                             f"fetched {fetched!r}")
        if not found["State"].get("Running"):
            raise BenchError(f"{what}: the new container is {found['State'].get('Status')}")
        mounts = {m["Destination"]: m for m in found.get("Mounts") or []}
        if "/conf/stack" not in mounts:
            raise BenchError(f"{what}: nothing mounted at /conf/stack")
        expected = {k: hashlib.sha256(v).hexdigest() for k, v in self.files.items()}
        verify_tree(Path(mounts["/conf/stack"]["Source"]), expected, f"{what}, /conf/stack")
        if self.starts(self.control) != starts + 1:
            raise BenchError(f"{what}: the fake Quay started {self.starts(self.control) - starts} "
                             "times, not once")
        left = [c.name for c in self.client.containers.list(
            all=True, filters={"name": f"{self.name}-previous-"})]
        if left:
            raise BenchError(f"{what}: the old container is still there: {left}")

    def floor_run(self, label: str, api: bool) -> dict:
        """Stop + start the floor's container (the CLI, or the engine API), one measured run."""
        side = "floor_api" if api else "floor"
        before = self.inspect(self.floor_name)
        starts = self.starts(self.floor_control)
        commands: dict[str, float] = {}
        poller = Poller(self.floor_url, POLL_EVERY_S, POLL_TIMEOUT_S)
        try:
            time.sleep(0.1)
            began = time.time()
            if api:
                self.client.api.stop(self.floor_name, timeout=self.stop_timeout)
                commands["stop_returned"] = time.time()
                self.client.api.start(self.floor_name)
                commands["start_returned"] = time.time()
            else:
                for verb, argv in (("stop", [DOCKER_CLI, "stop", "-t", str(self.stop_timeout),
                                             self.floor_name]),
                                   ("start", [DOCKER_CLI, "start", self.floor_name])):
                    commands[f"{verb}_invoked"] = time.time()
                    done = subprocess.run(argv, capture_output=True, text=True, env=self.env,
                                          check=False)
                    commands[f"{verb}_returned"] = time.time()
                    if done.returncode != 0:
                        raise BenchError(f"{side} {label}: {' '.join(argv)} exited with "
                                         f"{done.returncode}: {done.stderr.strip()[-500:]}")
            deadline = time.monotonic() + 30
            while not poller.last_ok():
                if time.monotonic() > deadline:
                    raise BenchError(f"{side} {label}: not 200 within 30 s of the start")
                time.sleep(0.02)
            time.sleep(TAIL_S)
        finally:
            samples = poller.stop()
        got = poll_figures(samples, f"{side} {label}")
        after = self.inspect(self.floor_name)
        if after["Id"] != before["Id"] or not after["State"].get("Running"):
            raise BenchError(f"{side} {label}: the floor's container is "
                             f"{after['State'].get('Status')}")
        if self.starts(self.floor_control) != starts + 1:
            raise BenchError(f"{side} {label}: the fake Quay started "
                             f"{self.starts(self.floor_control) - starts} times, not once")
        events = self.events.between(began, time.time())
        got.update(side=side, began=began,
                   commands={k: round(v - got["down_start"], 4) for k, v in commands.items()},
                   docker_events=[{**e, "t": round(e["t"] - got["down_start"], 4)}
                                  for e in events])
        kill = first_event(events, "kill", began)
        die = first_event(events, "die", kill)
        stop = first_event(events, "stop", die)
        start = first_event(events, "start", stop)
        got["spans"] = {"command_to_kill": span(began, kill), "kill_to_die": span(kill, die),
                        "die_to_stop": span(die, stop), "stop_to_start": span(stop, start),
                        "start_to_200": span(start, got["down_end"]),
                        "kill_to_down_start": span(kill, got["down_start"]),
                        "die_to_200": span(die, got["down_end"])}
        return got

    # ------------------------------------------------------------ clean-up

    def close(self, notes: list[str]) -> None:
        import docker

        if self.agent is not None:
            result = self.agent.stop()
            if result is not None and result.get("exit") != 0:
                notes.append(f"the agent exited with {result.get('exit')} on SIGTERM")
        for item in self.client.containers.list(all=True, filters={"name": self.prefix}):
            if item.name.startswith(self.prefix):
                try:
                    item.remove(force=True)
                except docker.errors.APIError as err:
                    notes.append(f"container {item.name}: {err}")
        self.events.close()


def agent_spans(got: dict, events: list[dict], old: str, new: str) -> dict:
    lines = got["log"]["lines"]
    fetched = lines["stack.done"]
    fetch_start = fetched["t"] - float(fetched.get("seconds") or 0)
    kill = first_event(events, "kill", got["put"], old)
    die = first_event(events, "die", kill, old)
    stop = first_event(events, "stop", die, old)
    rename = first_event(events, "rename", stop, old)
    create = first_event(events, "create", stop, new)
    start = first_event(events, "start", create, new)
    destroy = first_event(events, "destroy", start, old)
    down = got["down_start"]
    prepared = [lines[k]["t"] for k in ("stack.done", "lock.done", "image.done",
                                        "rollout.lease_acquired")]
    return {
        # before the window: none of it is downtime
        "put_to_fetch_start": fetch_start - got["put"],
        "fetch": fetched.get("seconds"), "lock": lines["lock.done"].get("seconds"),
        "image": lines["image.done"].get("seconds"),
        "image_result": lines["image.done"].get("result"),
        "image_to_lease": lines["rollout.lease_acquired"]["t"] - lines["image.done"]["t"],
        "lease_to_replacing": lines["rollout.replacing"]["t"] - lines["rollout.lease_acquired"]["t"],
        "replacing_to_kill": span(lines["rollout.replacing"]["t"], kill),
        "fetch_start_to_down": down - fetch_start,
        "prepared_before_window": max(prepared) < down,
        "prepared_end_to_down": down - max(prepared),
        # inside the window
        "kill_to_die": span(kill, die), "die_to_stop": span(die, stop),
        "stop_to_rename": span(stop, rename), "rename_to_create": span(rename, create),
        "create_to_start": span(create, start), "stop_to_start": span(stop, start),
        "start_to_200": span(start, got["down_end"]),
        "kill_to_down_start": span(kill, down), "die_to_200": span(die, got["down_end"]),
        # after it
        "200_to_applied_logged": lines["rollout.applied"]["t"] - got["down_end"],
        "start_to_old_destroyed": span(start, destroy),
    }


# ---------------------------------------------------------------- report


SHORT = {"agent": "agent", "floor": "floor CLI", "floor_api": "floor API"}
SPAN_ROWS = (
    ("kill_to_die", "SIGTERM (kill event) -> die"),
    ("kill_to_down_start", "kill event -> first non-200 (<0: before)"),
    ("die_to_stop", "die -> stop event (engine done)"),
    ("stop_to_rename", "stop -> rename (agent: old aside)"),
    ("rename_to_create", "rename -> create (agent: new one)"),
    ("create_to_start", "create -> start"),
    ("stop_to_start", "stop -> start event"),
    ("start_to_200", "start -> first 200"),
    ("die_to_200", "die -> first 200"),
)
BEFORE_ROWS = (
    ("put_to_fetch_start", "change in the bucket -> fetch starts (refresh interval, jitter)"),
    ("fetch", "fetch of the changed stack (stack.done)"),
    ("lock", "image reference (lock.done)"),
    ("image", "image check/pull (image.done)"),
    ("image_to_lease", "lease acquired (moto)"),
    ("lease_to_replacing", "lease -> rollout.replacing"),
    ("replacing_to_kill", "rollout.replacing -> SIGTERM (find, tidy, stop call)"),
    ("prepared_end_to_down", "last of those -> first non-200"),
)


def summarize(runs: dict[str, list[dict]]) -> dict:
    summary: dict = {}
    for side, items in runs.items():
        summary[side] = {
            "down_s": stats([r["down_s"] for r in items]),
            "outages": [r["outages"] for r in items],
            "spans": {key: stats([r["spans"].get(key) for r in items])
                      for key in {k for r in items for k, v in r["spans"].items()
                                  if isinstance(v, (int, float)) and not isinstance(v, bool)}},
            "poll_step_max_s": max((r["poll_step_max_s"] or 0) for r in items),
        }
    agent = runs["agent"]
    summary["agent"]["prepared_before_window"] = sum(
        1 for r in agent if r["spans"]["prepared_before_window"])
    summary["agent"]["image_results"] = sorted({r["spans"]["image_result"] for r in agent})
    summary["agent"]["status_healthy_after_applied_s"] = stats(
        [r["status_healthy_after_applied_s"] for r in agent])
    summary["agent"]["status_state_at_applied"] = [r["status_state_at_applied"] for r in agent]
    summary["agent"]["roll_reasons"] = sorted(
        {r["log"]["lines"]["rollout.replacing"].get("reason", "") for r in agent})
    return summary


def goals_of(summary: dict, runs: dict[str, list[dict]]) -> dict:
    agent = summary["agent"]["down_s"]["median"]
    extra = agent - summary["floor"]["down_s"]["median"]
    extra_api = agent - summary["floor_api"]["down_s"]["median"]
    # The same difference within each round (the sides run back to back): less load noise.
    paired = [a["down_s"] - f["down_s"] for a, f in zip(runs["agent"], runs["floor"])]
    paired_api = [a["down_s"] - f["down_s"] for a, f in zip(runs["agent"], runs["floor_api"])]
    return {"extra_max_s": GOAL_EXTRA_S, "extra_s": extra, "met": extra <= GOAL_EXTRA_S,
            "extra_vs_api_floor_s": extra_api, "met_vs_api_floor": extra_api <= GOAL_EXTRA_S,
            "paired_extra_s": stats(paired), "paired_extra_vs_api_floor_s": stats(paired_api)}


def _cell(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def table(summary: dict, goals: dict) -> str:
    names = {"agent": "agent roll", "floor": "floor: docker stop + start (CLI)",
             "floor_api": "floor: stop + start (engine API)"}
    rows = [f"{'not 200 during':<34} {'median s':>9} {'min s':>7} {'max s':>7} {'outages':>9}"]
    for side in VARIANTS:
        s = summary[side]["down_s"]
        outages_seen = summary[side]["outages"]
        rows.append(f"{names[side]:<34} {_cell(s['median']):>9} {_cell(s['min']):>7} "
                    f"{_cell(s['max']):>7} {max(outages_seen):>9}")
    met = "met" if goals["met"] else "NOT MET"
    rows += [
        "",
        f"agent - floor (CLI), medians:   {goals['extra_s']:+.3f} s   "
        f"(goal <= {GOAL_EXTRA_S} s: {met})",
        f"agent - floor (API), medians:   {goals['extra_vs_api_floor_s']:+.3f} s   "
        f"({'within' if goals['met_vs_api_floor'] else 'over'} {GOAL_EXTRA_S} s)",
        f"agent - floor within each round:  CLI median {_cell(goals['paired_extra_s']['median'])}"
        f" s (min {_cell(goals['paired_extra_s']['min'])}, max "
        f"{_cell(goals['paired_extra_s']['max'])}); API median "
        f"{_cell(goals['paired_extra_vs_api_floor_s']['median'])} s (min "
        f"{_cell(goals['paired_extra_vs_api_floor_s']['min'])}, max "
        f"{_cell(goals['paired_extra_vs_api_floor_s']['max'])})",
        "",
        f"{'inside the window, medians (s)':<40}" + "".join(f"{SHORT[s]:>12}" for s in VARIANTS),
    ]
    for key, what in SPAN_ROWS:
        cells = [summary[s]["spans"].get(key, {}).get("median") for s in VARIANTS]
        if all(c is None for c in cells):
            continue
        rows.append(f"  {what:<38}" + "".join(f"{_cell(c):>12}" for c in cells))
    agent = summary["agent"]
    n = agent["down_s"]["n"]
    rows += ["", f"agent, before the window (not downtime), medians; image "
                 f"{'/'.join(agent['image_results'])}; all of it before the first non-200 in "
                 f"{agent['prepared_before_window']}/{n} runs:"]
    for key, what in BEFORE_ROWS:
        rows.append(f"  {what:<62} {_cell(agent['spans'].get(key, {}).get('median')):>8} s")
    late = agent["status_healthy_after_applied_s"]
    rows += ["", f"agent /status just after rollout.applied: "
                 f"{', '.join(str(x) for x in agent['status_state_at_applied'])}; healthy again "
                 f"after: median {_cell(late['median'])} s, max {_cell(late['max'])} s "
                 f"(health.interval {HEALTH['interval']})",
             f"agent's reason for the roll (robots.txt changed): "
             f"{'; '.join(agent['roll_reasons'])}",
             f"poll resolution: largest step between answers in a window "
             f"{max(summary[s]['poll_step_max_s'] for s in VARIANTS):.3f} s"]
    return "\n".join(rows)


def explain(summary: dict) -> str:
    """When the goal is missed: where the agent's window is longer than the floor's."""
    a, f = summary["agent"]["spans"], summary["floor"]["spans"]

    def med(spans: dict, key: str) -> float:
        return (spans.get(key) or {}).get("median") or 0.0

    parts = [
        f"stop -> start {med(a, 'stop_to_start'):.3f} s against {med(f, 'stop_to_start'):.3f} s "
        f"(agent: rename {med(a, 'stop_to_rename'):.3f} s, create "
        f"{med(a, 'rename_to_create'):.3f} s, start {med(a, 'create_to_start'):.3f} s)",
        f"start -> first 200 {med(a, 'start_to_200'):.3f} s against {med(f, 'start_to_200'):.3f} s",
        f"SIGTERM -> die {med(a, 'kill_to_die'):.3f} s against {med(f, 'kill_to_die'):.3f} s",
    ]
    return "where the agent's extra time goes (medians): " + "; ".join(parts)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="unmeasured rounds first, to fill caches (default 1)")
    parser.add_argument("--stop-timeout", type=int, default=30,
                        help="container.stop_timeout and docker stop -t, seconds (default 30, "
                             "the agent's default)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work dir (agent config and log, stacks)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0 or args.stop_timeout < 0:
        parser.error("--rounds must be at least 1, --warmup and --stop-timeout at least 0")

    qb = tool("quay-bootstrap")
    missing = [what for what, found in (
        ("quay-bootstrap (run `pip install -e .`)", qb),
        (f"{DOCKER_CLI} (the Docker CLI)", os.access(DOCKER_CLI, os.X_OK))) if not found]
    if missing:
        print("missing: " + "; ".join(missing), file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="qb-bench-roll-"))
    token = secrets.token_hex(4)
    bucket = f"qb-roll-{token}"
    state: dict = {}
    ours = uploaded = False
    client = bench = image = None
    try:
        state, ours = open_bed(work)
        _, fake_quay, stacks = _testbed()
        docker_config = work / "docker-config"  # never ~/.docker/config.json, for CLI or SDK
        docker_config.mkdir()
        (docker_config / "config.json").write_text("{}\n")
        os.environ["DOCKER_CONFIG"] = str(docker_config)
        env = child_env(work, HERE / "results" / ".pycache")
        env.update(DOCKER_HOST=state["docker_host"], DOCKER_CONFIG=str(docker_config))

        info = machine(tool("aws") or "/bin/true", env)
        info.pop("aws_cli", None)
        client = docker_client(state["docker_host"])
        cli_version = subprocess.run([DOCKER_CLI, "version", "--format", "{{.Client.Version}}"],
                                     capture_output=True, text=True, env=env, check=False)
        info["docker_cli"] = cli_version.stdout.strip() or "?"
        info["dockerd"] = client.version().get("Version", "?")
        print(f"machine: {info['nproc']} cores ({info['cpu']}), {info['os']}, "
              f"Python {info['python']}, moto {info['moto']}, docker CLI {info['docker_cli']}, "
              f"dockerd {info['dockerd']}, quay-bootstrap {info['quay_bootstrap']}; "
              f"load average {info['loadavg']}")
        if info["loadavg"][0] > 0.5:
            print("note: the machine is busy (1-minute load average above 0.5); "
                  "the figures will be noisy", flush=True)

        files = stacks.sample_stack()
        print(f"test bed: {'started for this run' if ours else 'TESTBED_DIR=' + state['dir']}; "
              f"uploading {len(files)} files to s3://{bucket}/{PREFIX}; building the fake Quay; "
              "starting the agent and the floor's container ...", flush=True)
        uploaded = True
        upload_stack(state["moto_endpoint"], bucket, files)
        image = fake_quay.build(client, state["registry"], IMAGE_TAG)
        bench = Bench(work, state, env, client, image, bucket, qb, token, args.stop_timeout,
                      files)
        bench.start_agent()
        bench.start_floor()

        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for n in range(args.warmup + args.rounds):
            warm = n < args.warmup
            label = f"warm-up {n + 1}" if warm else f"round {n - args.warmup + 1}"
            order = VARIANTS[n % 3:] + VARIANTS[:n % 3]  # each side first in turn
            got = {}
            for side in order:
                got[side] = (bench.agent_run(label) if side == "agent"
                             else bench.floor_run(label, api=side == "floor_api"))
            print(f"  {label}{'' if warm else '/' + str(args.rounds)}: not 200 for agent "
                  f"{got['agent']['down_s']:.3f} s, floor {got['floor']['down_s']:.3f} s, "
                  f"floor_api {got['floor_api']['down_s']:.3f} s (order: {', '.join(order)})",
                  flush=True)
            if not warm:
                for side in VARIANTS:
                    runs[side].append(got[side])

        summary = summarize(runs)
        goals = goals_of(summary, runs)
        print()
        print(table(summary, goals))
        if not goals["met"]:
            print()
            print(explain(summary))
        info["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        result = {
            "benchmark": "roll",
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": info,
            "params": {"rounds": args.rounds, "warmup": args.warmup,
                       "stop_timeout_s": args.stop_timeout, "poll_every_s": POLL_EVERY_S,
                       "poll_timeout_s": POLL_TIMEOUT_S, "refresh_interval": REFRESH_INTERVAL,
                       "health": HEALTH, "files": len(files),
                       "testbed": "own" if ours else "$TESTBED_DIR"},
            "commands": {
                "agent": "quay-bootstrap --config CFG run --log-format json; robots.txt "
                         "changed in the bucket",
                "floor": f"docker stop -t {args.stop_timeout} NAME && docker start NAME",
                "floor_api": f"POST /containers/NAME/stop?t={args.stop_timeout}, "
                             "POST /containers/NAME/start",
            },
            "summary": summary,
            "goal": goals,
            "runs": runs,
        }
        return finish(result, args.json)
    except BenchError as err:
        return failed(err, work, args)
    finally:
        cleanup(state, ours, uploaded, bucket, client, bench, image, work, args.keep)


def cleanup(state: dict, ours: bool, uploaded: bool, bucket: str, client, bench, image,
            work: Path, keep: bool) -> None:
    """Leave a shared bed as it was found: only what this run created goes."""
    notes: list[str] = []
    if bench is not None:
        try:
            bench.close(notes)
        except Exception as err:  # noqa: BLE001 - tidying must not hide the result
            notes.append(f"the agent or its containers: {err}")
    if client is not None and image is not None and not ours:
        try:
            client.images.remove(image)
        except Exception as err:  # noqa: BLE001
            notes.append(f"image {image}: {err}")
    if uploaded and not ours:
        try:
            delete_bucket(state["moto_endpoint"], bucket)  # the stack and the agent's leases
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
