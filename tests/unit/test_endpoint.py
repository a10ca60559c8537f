"""The /healthz /status /metrics endpoint: its answers, and its limits under slow clients."""
from __future__ import annotations

import json
import os
import re
import resource
import socket
import statistics
import threading
import time
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import pytest
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from quay_bootstrap.endpoint import MAX_CONNECTIONS, Endpoint, inherited_socket
from quay_bootstrap.status import Board

PARTIAL = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"  # a request whose blank line never comes


@pytest.fixture
def sockets() -> Iterator[List[socket.socket]]:
    """Client sockets a test opens; all closed at the end."""
    opened: List[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


@pytest.fixture
def board() -> Board:
    board = Board()
    board.update(state="healthy", stack_version="v1", image_digest="sha256:abc")
    return board


@pytest.fixture
def serve(board: Board) -> Iterator:
    """serve(**limits) -> (endpoint, port), started on 127.0.0.1 and stopped at the end."""
    started: List[Endpoint] = []

    def serve(**limits) -> Tuple[Endpoint, int]:
        endpoint = Endpoint(board, "127.0.0.1:0", **limits).start()
        started.append(endpoint)
        return endpoint, int(endpoint.address.rsplit(":", 1)[1])

    yield serve
    for endpoint in started:
        endpoint.stop()


@pytest.fixture
def enough_descriptors() -> Iterator[None]:
    """Room for 500+ client sockets and their server-side ends in this one process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2048 if hard == resource.RLIM_INFINITY else min(2048, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 1200:
        pytest.fail(f"RLIMIT_NOFILE hard limit {hard} is too low for 500 clients and the server")
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def ask(port: int, raw: bytes, timeout: float = 5) -> Tuple[int, dict, bytes]:
    """Send raw bytes, read to EOF: (status, headers with lower-case names, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        answer = read_to_eof(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def get(port: int, path: str) -> Tuple[int, dict, bytes]:
    return ask(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


def closed_by_server(sock: socket.socket, timeout: float) -> Optional[float]:
    """Seconds until the server closed `sock` (EOF or reset), reading whatever it answered;
    None if it was still open after `timeout`."""
    start = time.monotonic()
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except (socket.timeout, BlockingIOError):  # BlockingIOError: `timeout` 0, still open
        return None
    except OSError:
        pass
    return time.monotonic() - start


def slow_clients(port: int, count: int, sockets: List[socket.socket]) -> List[socket.socket]:
    """`count` clients: every other one sends half a request, the rest nothing at all."""
    clients = []
    for i in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sockets.append(sock)
        clients.append(sock)
        if i % 2 == 0:
            sock.sendall(PARTIAL)
    return clients


def wait_for(condition, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def healthz_latency(port: int) -> float:
    """Milliseconds from connect to the whole answer of GET /healthz."""
    start = time.perf_counter()
    code, _, body = get(port, "/healthz")
    elapsed = (time.perf_counter() - start) * 1000
    assert (code, body) == (200, b"ok\n")
    return elapsed


# --- what the three paths answer (as the http.server version did) ---------------------------

def test_healthz_says_ok_then_unhealthy_once_marked(serve, board):
    _, port = serve()
    assert get(port, "/healthz")[::2] == (200, b"ok\n")
    assert get(port, "/healthz")[1]["content-type"] == "text/plain"
    board.update(marked_unhealthy=True)
    code, headers, body = get(port, "/healthz")
    assert (code, headers["content-type"], body) == (503, "text/plain", b"unhealthy\n")


def test_ready_is_what_a_load_balancer_checks(serve, board):
    _, port = serve()
    assert get(port, "/ready")[::2] == (200, b"ready\n")
    board.update(draining={"why": "refresh: roll"})
    assert get(port, "/ready")[::2] == (503, b"draining\n")
    assert get(port, "/healthz")[::2] == (200, b"ok\n")  # autohealing must not replace it
    board.update(draining=None, state="starting")
    assert get(port, "/ready")[::2] == (503, b"starting\n")
    assert ask(port, b"HEAD /ready HTTP/1.1\r\nHost: x\r\n\r\n")[::2] == (503, b"")


def test_status_is_the_board_as_json(serve, board):
    _, port = serve()
    code, headers, body = get(port, "/status")
    assert (code, headers["content-type"]) == (200, "application/json")
    assert json.loads(body) == json.loads(json.dumps(board.snapshot(), default=str))
    assert int(headers["content-length"]) == len(body)


def test_metrics_are_prometheus_text(serve, board):
    _, port = serve()
    code, headers, body = get(port, "/metrics")
    assert (code, headers["content-type"]) == (200, CONTENT_TYPE_LATEST)
    assert 'quay_bootstrap_state{state="healthy"} 1.0' in body.decode()
    assert 'quay_bootstrap_info{image_digest="sha256:abc",stack_version="v1"} 1.0' in body.decode()


@pytest.mark.parametrize("path", ["/", "/nope", "/healthz?verbose", "/healthz/"])
def test_other_paths_are_not_found(serve, path):
    _, port = serve()
    code, headers, body = get(port, path)
    assert (code, headers["content-type"], body) == (404, "text/plain", b"not found\n")


def test_head_answers_the_headers_of_get_without_a_body(serve):
    _, port = serve()
    code, headers, body = ask(port, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (code, headers["content-length"], body) == (200, "3", b"")


@pytest.mark.parametrize("raw, code", [
    (b"POST /healthz HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
    (b"DELETE /status HTTP/1.1\r\n\r\n", 405),
    (b"garbage\r\n\r\n", 400),
    (b"GET /healthz\r\n\r\n", 400),
    (b"GET /healthz SPDY/3\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431),
    (b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 20000, 431),  # too big before its end came
])
def test_bad_requests_get_a_short_error(serve, raw, code):
    _, port = serve()
    answer = ask(port, raw)
    assert answer[0] == code and answer[1]["connection"] == "close"
    if code == 405:
        assert answer[1]["allow"] == "GET, HEAD"


def test_a_request_in_many_small_pieces_or_with_bare_newlines_is_answered(serve, sockets):
    _, port = serve()
    assert ask(port, b"GET /healthz HTTP/1.0\n\n")[::2] == (200, b"ok\n")
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sockets.append(sock)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for byte in b"\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n":
        sock.send(bytes([byte]))
        time.sleep(0.001)
    assert read_to_eof(sock).endswith(b"\r\n\r\nok\n")


def test_the_address_names_the_port_picked_and_stop_closes_it(board):
    endpoint = Endpoint(board, "127.0.0.1:0").start()
    port = int(endpoint.address.rsplit(":", 1)[1])
    assert endpoint.address == f"127.0.0.1:{port}" and port > 0
    assert get(port, "/healthz")[0] == 200
    endpoint.stop()
    endpoint.stop()  # twice is harmless
    assert not any(t.name == "endpoint" and t.is_alive() for t in threading.enumerate())
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()



def systemd_passes(monkeypatch, sock: socket.socket) -> None:
    """As if systemd's socket activation had passed a copy of SOCK (sd_listen_fds)."""
    from systemd import daemon

    fd = os.dup(sock.fileno())
    monkeypatch.setattr(daemon, "listen_fds", lambda: [fd])


def test_systemds_socket_is_served_and_outlives_the_agent(board, monkeypatch):
    import structlog

    held = socket.create_server(("127.0.0.1", 0))
    try:
        port = held.getsockname()[1]
        for _ in range(2):  # two agents in turn on the socket systemd holds
            systemd_passes(monkeypatch, held)
            with structlog.testing.capture_logs() as logs:
                sock = inherited_socket(f"127.0.0.1:{port}")
            assert [e["event"] for e in logs] == ["endpoint.inherited"]
            endpoint = Endpoint(board, f"127.0.0.1:{port}", sock=sock).start()
            assert endpoint.address == f"127.0.0.1:{port}"
            assert get(port, "/ready")[0] == 200
            endpoint.stop()
    finally:
        held.close()


def test_systemds_socket_on_another_port_than_report_listen_wins_with_a_warning(monkeypatch):
    import structlog

    held = socket.create_server(("127.0.0.1", 0))
    systemd_passes(monkeypatch, held)
    with structlog.testing.capture_logs() as logs:
        sock = inherited_socket("127.0.0.1:1")
    try:
        assert sock.getsockname() == held.getsockname()
        differs = [e for e in logs if e["event"] == "endpoint.inherited_port_differs"]
        assert differs and "ListenStream=" in differs[0]["hint"]
    finally:
        sock.close()
        held.close()


def test_a_passed_socket_that_does_not_listen_is_ignored_and_report_listen_used(monkeypatch):
    import structlog

    datagram = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    systemd_passes(monkeypatch, datagram)
    with structlog.testing.capture_logs() as logs:
        assert inherited_socket("127.0.0.1:9101") is None
    datagram.close()
    assert [e["event"] for e in logs] == ["endpoint.inherited_unusable"]


def test_without_systemds_socket_nothing_is_inherited(monkeypatch):
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))  # meant for another process
    assert inherited_socket("127.0.0.1:9101") is None


def test_a_cap_below_one_is_refused(board):
    with pytest.raises(ValueError, match="max_connections"):
        Endpoint(board, "127.0.0.1:0", max_connections=0)


# --- slow clients ---------------------------------------------------------------------------

@pytest.mark.parametrize("max_connections", [MAX_CONNECTIONS, 600],
                         ids=["shedding-at-the-default-cap", "all-500-held"])
def test_healthz_answers_within_100ms_while_500_slow_clients_are_connected(
        serve, sockets, enough_descriptors, max_connections):
    endpoint, port = serve(max_connections=max_connections)
    threads = threading.active_count()
    slow_clients(port, 500, sockets)
    wait_for(lambda: endpoint.connections == min(500, max_connections)
             and endpoint.peak == min(500, max_connections))
    # Best of 3 rounds of 20, each round judged by its worst answer: a stall of this test's own
    # process (other test runs on the same 2 cores, the GIL it shares with the server) can
    # spoil one round, while a server that slow clients block fails every round, by seconds.
    # Every answer of every round stays bounded too.
    rounds = []
    for _ in range(3):
        samples = []
        for _ in range(20):
            samples.append(healthz_latency(port))
            time.sleep(0.005)
        rounds.append(samples)
        assert max(samples) < 1000, samples
        if max(samples) < 100:
            break
    best = min(rounds, key=max)
    assert max(best) < 100, (rounds, statistics.median(best))
    assert threading.active_count() == threads  # no thread per connection
    assert endpoint.connections <= max_connections


def test_slow_and_idle_connections_are_closed_after_the_deadline(serve, sockets):
    deadline = 1.0
    endpoint, port = serve(head_timeout=deadline)
    idle, partial = slow_clients(port, 2, sockets)[::-1]
    trickle = socket.create_connection(("127.0.0.1", port), timeout=5)  # a byte every 0.1 s:
    sockets.append(trickle)  # the deadline is for the whole head, not for each read
    start = time.monotonic()
    closed_at = None
    for byte in PARTIAL * 3:
        try:
            trickle.send(bytes([byte]))
        except OSError:
            closed_at = time.monotonic() - start
            break
        time.sleep(0.1)
        if time.monotonic() - start > deadline + 3:
            break
    waited = closed_by_server(trickle, 0.1) if closed_at is None else 0
    assert waited is not None, "the trickling client was still open past the deadline"
    closed_at = closed_at or time.monotonic() - start
    assert deadline - 0.2 <= closed_at <= deadline + 3.0
    for sock in (idle, partial):
        waited = closed_by_server(sock, deadline + 3.0)
        assert waited is not None and time.monotonic() - start <= deadline + 3.0
    wait_for(lambda: endpoint.connections == 0)


def test_a_partial_request_is_answered_408_at_the_deadline(serve, sockets):
    _, port = serve(head_timeout=0.5)
    start = time.monotonic()
    code, headers, _ = ask(port, PARTIAL)
    assert (code, headers["connection"]) == (408, "close")
    assert 0.4 <= time.monotonic() - start <= 3.5


def test_the_connection_cap_holds_and_sheds_the_oldest_slow_client(serve, sockets):
    endpoint, port = serve(max_connections=50, head_timeout=10)
    threads = threading.active_count()
    clients = slow_clients(port, 150, sockets)
    wait_for(lambda: sum(closed_by_server(s, 0) is not None for s in clients[:100]) == 100)
    assert endpoint.peak <= 50 and endpoint.connections <= 50
    assert [closed_by_server(s, 0) for s in clients[100:]] == [None] * 50  # the newest stay
    assert established_server_side(port) <= 50  # the kernel's count agrees
    assert threading.active_count() == threads
    # A real client still gets in, at the expense of the oldest slow one.
    assert get(port, "/healthz")[::2] == (200, b"ok\n")
    assert endpoint.peak <= 50
    assert closed_by_server(clients[100], 2) is not None


def established_server_side(port: int) -> int:
    """Connections in ESTABLISHED state whose local end is the endpoint's port (from
    /proc/net/tcp, so the kernel's count, not the endpoint's); 0 where there is no /proc."""
    table = Path("/proc/net/tcp")
    if not table.exists():
        return 0
    rows = [line.split() for line in table.read_text().splitlines()[1:]]
    return sum(1 for row in rows if int(row[1].split(":")[1], 16) == port and row[3] == "01")


def test_the_cap_sits_well_below_the_units_descriptor_limit():
    # Without LimitNOFILE in the unit, systemd's default soft limit, 1024, applies; the rest of
    # the descriptors are the agent's own (Docker, the object store, the probe, the state file).
    unit = (Path(__file__).parents[2] / "systemd" / "quay-bootstrap.service").read_text()
    limit = re.search(r"^LimitNOFILE=(\d+)", unit, re.MULTILINE)
    soft = int(limit.group(1)) if limit else 1024
    assert MAX_CONNECTIONS <= soft // 3


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_the_board_masks_secrets_and_writes_its_state_file_0640(tmp_path, umask):
    from quay_bootstrap.logs import Redactor

    redactor = Redactor()
    redactor.add(["StackSecret-123"])
    state = tmp_path / "status.json"
    state.write_text("{}")
    state.chmod(0o644)  # left by an older agent
    fresh = tmp_path / "new" / "run" / "status.json"  # folders the board makes
    saved = os.umask(umask)
    try:
        Board(fresh).update(state="starting")
        board = Board(state, redactor.redact)
        board.update(state="failing", last_change={
            "error": "login to https://ops:UrlPw-456@registry.example.net failed: StackSecret-123",
            "argv": ["curl", "-u", "ops:CurlPw-789"]})
    finally:
        os.umask(saved)
    for text in (json.dumps(board.snapshot()), state.read_text(),
                 generate_latest(board.registry).decode()):
        assert "StackSecret-123" not in text and "UrlPw-456" not in text and "CurlPw-789" not in text
    assert board.snapshot()["last_change"]["error"].startswith("login to https://ops:***@")
    assert oct(state.stat().st_mode & 0o777) == oct(fresh.stat().st_mode & 0o777) == "0o640"
    assert {oct(d.stat().st_mode & 0o777) for d in (fresh.parent, fresh.parent.parent)} == {"0o750"}
