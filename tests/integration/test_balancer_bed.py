"""The bed's load balancer (HAProxy, tests/testbed/balancer.py) and load generator (tests/loadgen.py)
on two small node processes: the stand-in's load paths on a Quay port, a switchable /ready on a
check port. Needs only the haproxy binary: no Docker, no agent, no bed."""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.loadgen import CUT, FAILED, GET, OK, UPLOAD, Load
from tests.testbed.balancer import Balancer

ROOT = Path(__file__).resolve().parents[2]
STANDIN = ROOT / "tests" / "testbed" / "standin" / "registry.py"
# Fast checks so a node leaves the pool in about a second.
INTER, FALL, RISE = 0.3, 2, 2
LOAD_SECONDS = 3.0


@pytest.fixture
def haproxy():
    if shutil.which("haproxy") is None and shutil.which("haproxy", path="/usr/sbin:/sbin") is None:
        if os.environ.get("CI"):
            raise AssertionError("haproxy missing: tests/testbed/install-debian.sh installs it")
        pytest.skip("haproxy not installed (apt-get install haproxy; tests/testbed/install-debian.sh)")


# ---------------------------------------------------------------- the node process


def serve_node() -> None:
    """A node (run in its own process, so it can be killed): the stand-in's Handler on a Quay
    port, and on a check port `GET /ready` (200 or 503), `GET /counts` (requests that reached
    the Quay port), `POST /ready/<code>` and `POST /close` (close the Quay port's listener)."""
    spec = importlib.util.spec_from_file_location("standin_registry", STANDIN)
    standin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(standin)
    lock = threading.Lock()
    state = {"ready": 200, GET: 0, UPLOAD: 0, "uploading": 0}

    def add(key: str, value: int) -> None:
        with lock:
            state[key] += value

    class Quay(standin.Handler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self):  # noqa: N802
            if self.path == "/v2/":
                add(GET, 1)
            super().do_GET()

        def do_PUT(self):  # noqa: N802
            add(UPLOAD, 1)
            add("uploading", 1)
            try:
                super().do_PUT()
            finally:
                add("uploading", -1)

    class Check(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _answer(self, status: int, data: object) -> None:
            body = json.dumps(data).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            try:
                self.end_headers()
                self.wfile.write(body)
            except ConnectionError:
                pass  # HAProxy resets a check's connection once it has read the status line

        def do_GET(self):  # noqa: N802
            if self.path == "/ready":
                self._answer(state["ready"], {"ready": state["ready"] == 200})
            else:
                with lock:
                    self._answer(200, dict(state))

        def do_POST(self):  # noqa: N802
            if self.path.startswith("/ready/"):
                state["ready"] = int(self.path.rsplit("/", 1)[1])
            elif self.path == "/close":
                quay.shutdown()
                quay.server_close()
            self._answer(200, {})

    quay = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quay)
    check = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Check)
    for server in (quay, check):
        server.daemon_threads = True
    threading.Thread(target=quay.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    print(json.dumps({"quay": quay.server_address[1], "check": check.server_address[1]}), flush=True)
    check.serve_forever()


class Node:
    """A node process of this test, ended by its PID."""

    def __init__(self, name: str):
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from tests.integration.test_balancer_bed import serve_node; "
             "serve_node()"], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"node {name} exited with {self.proc.wait()} before listening")
        ports = json.loads(line)
        self.quay_port, self.check_port = ports["quay"], ports["check"]

    @property
    def server(self) -> tuple[str, int, int]:
        return self.name, self.quay_port, self.check_port

    def _call(self, method: str, path: str) -> dict:
        request = urllib.request.Request(f"http://127.0.0.1:{self.check_port}{path}", method=method)
        with urllib.request.urlopen(request, timeout=5) as answer:
            return json.loads(answer.read())

    def counts(self) -> dict:
        return self._call("GET", "/counts")

    def requests(self) -> int:
        counts = self.counts()
        return counts[GET] + counts[UPLOAD]

    def ready(self, status: int) -> None:
        self._call("POST", f"/ready/{status}")

    def close_listener(self) -> None:
        self._call("POST", "/close")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=5)

    def stop(self) -> None:
        self.kill()
        self.proc.stdout.close()


@pytest.fixture
def nodes():
    """Two node processes, a and b; killed afterwards."""
    made = []
    try:
        for name in ("a", "b"):
            made.append(Node(name))
        yield made
    finally:
        for node in made:
            node.stop()


@pytest.fixture
def balancer(haproxy, nodes, tmp_path):
    with Balancer([node.server for node in nodes], inter=INTER, fall=FALL, rise=RISE,
                  workdir=tmp_path / "haproxy") as made:
        yield made


def wait_for(check, timeout: float, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what() if callable(what) else what}")


def run_load(url: str, **options) -> Load:
    load = Load(url, duration=LOAD_SECONDS, upload_seconds=1.0, **options).start()
    assert load.wait(LOAD_SECONDS + 15), "the load did not end"
    return load


# ---------------------------------------------------------------- tests


def test_load_counts_refused_connects_and_error_answers_as_failed(nodes):
    a, _ = nodes
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        refused = Load(f"http://127.0.0.1:{probe.getsockname()[1]}", clients=2, uploads=1,
                       max_requests=4).start()
        assert refused.wait(10)
    a.ready(503)
    answered = Load(f"http://127.0.0.1:{a.check_port}", clients=1, uploads=0, get_path="/ready",
                    max_requests=3).start()
    assert answered.wait(10)

    assert {(r.outcome, r.stage) for r in refused.records} == {(FAILED, "connect")}
    assert refused.report()["total"] == 4
    assert [(r.outcome, r.status, r.error) for r in answered.records] == [(FAILED, 503, "HTTP 503")] * 3


def test_balancer_config_binds_loopback_only(nodes, tmp_path):
    balancer = Balancer([node.server for node in nodes], workdir=tmp_path)
    balancer.port = 8443

    config = balancer.config()

    binds = [line.split()[1] for line in config.splitlines() if line.strip().startswith("bind ")]
    assert binds == ["127.0.0.1:8443"]
    assert "option redispatch" in config and "retries 3" in config
    assert f"check port {nodes[0].check_port} inter 1000ms fall 2 rise 2" in config


def test_every_request_ok_and_a_node_marked_down_gets_none(nodes, balancer):
    a, b = nodes
    assert balancer.states() == {"a": "UP", "b": "UP"}

    steady = run_load(balancer.url).report()

    assert steady["ok"] == steady["total"] > 50, steady
    assert steady["by_kind"][UPLOAD]["ok"] >= 3, steady
    assert a.requests() + b.requests() == steady["total"]  # each request reached one node
    assert a.requests() > 0 and b.requests() > 0

    a.ready(503)
    balancer.wait_state("a", "DOWN", timeout=5)
    before_a, before_b = a.requests(), b.requests()

    drained = run_load(balancer.url).report()

    assert drained["ok"] == drained["total"] > 50, drained
    assert b.requests() - before_b == drained["total"]
    assert a.requests() == before_a
    assert "Server quay/a is DOWN" in balancer.log()


def test_refused_connects_are_redispatched(nodes, balancer):
    a, b = nodes
    with Load(balancer.url, upload_seconds=1.0) as load:
        wait_for(lambda: load.count(outcome=OK) >= 20, 10, lambda: load.report())
        closing = time.time()
        b.close_listener()
        closed = time.time()
        # b still passes its checks: every connect to it is refused and must be redispatched.
        wait_for(lambda: int(balancer.stats()["b"]["wredis"]) >= 50, 15,
                 lambda: balancer.stats()["b"])
        wait_for(lambda: len([r for r in load.records if r.start > closed]) >= 50, 10,
                 lambda: load.report())
    report = load.report()

    assert balancer.states()["b"] == "UP"
    assert report[FAILED] == 0, report
    # Every request begun after the listener closed reached a, at once (no retry delay).
    after = [r for r in load.records if r.start > closed]
    assert [r for r in after if r.outcome != OK] == [], report
    assert max(r.seconds for r in after if r.kind == GET) < 1.0
    # Connections already in b's accept queue when it closed are reset by b's kernel after
    # HAProxy passed the request on: cut, never retried (TCP mode has no L7 retries). Only those.
    cut = load.failures()
    assert all(r.outcome == CUT and r.start < closed and r.end > closing for r in cut), report


def test_a_node_killed_mid_upload_cuts_that_upload(nodes, balancer):
    a, b = nodes
    with Load(balancer.url, clients=4, uploads=4, upload_seconds=1.5) as load:
        wait_for(lambda: b.counts()["uploading"] >= 1, 10, "an upload in flight on b")
        killed = time.time()
        b.kill()
        balancer.wait_state("b", "DOWN", timeout=5)
        # Uploads started once b is out of the pool all go to a.
        down = time.time()
        wait_for(lambda: len([r for r in load.records if r.start > down and r.outcome == OK]) >= 4,
                 15, lambda: load.report())
    report = load.report()

    cut = [r for r in load.records if r.outcome == CUT]
    assert cut, report
    assert all(r.kind == UPLOAD and r.start < killed < r.end for r in cut), cut
    assert all(r.stage in ("send", "response") for r in cut), cut
    assert load.failures(since=down) == [], report
    assert report[FAILED] == 0, report
