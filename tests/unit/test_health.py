"""Judging one answer of /health/instance: Quay's body shape, redirects, timeouts."""
from __future__ import annotations

import http.server
import threading

import pytest

from quay_bootstrap.health import parse_body, probe, wait_healthy

QUAY_OK = (b'{"data":{"services":{"auth":true,"database":true,"disk_space":true,'
           b'"registry_gunicorn":true,"service_key":true,"web_gunicorn":true}},"status_code":200}')


@pytest.mark.parametrize("body,services", [
    (QUAY_OK, {"auth": True, "database": True, "disk_space": True, "registry_gunicorn": True,
               "service_key": True, "web_gunicorn": True}),
    (b'{"data":{"services":{"database":false,"redis":true}},"status_code":503}',
     {"database": False, "redis": True}),
    (b"<html>nginx</html>", {}),
    (b'{"data": []}', {}),
    (b'{"data":{"services":["x"]}}', {}),
    (b"\xff", {}),
])
def test_parse_body(body, services):
    assert parse_body(body) == services


class FakeQuay(http.server.BaseHTTPRequestHandler):
    answers = {}

    def do_GET(self):  # noqa: N802 - http.server's name
        status, body, headers = self.answers[self.path]
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeQuay)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_probe_verdicts(server):
    FakeQuay.answers = {
        "/ok": (200, QUAY_OK, {}),
        "/db": (503, b'{"data":{"services":{"database":false,"web_gunicorn":true}},'
                     b'"status_code":503}', {}),
        "/redirect": (301, b"", {"Location": "https://quay.example.com/health/instance"}),
        "/plain": (200, b"ok", {}),
    }
    ok = probe(server + "/ok", timeout=2)
    assert ok.ok and ok.status == 200 and ok.services["web_gunicorn"] is True
    db = probe(server + "/db", timeout=2)
    assert not db.ok and db.failing_services == ["database"]
    assert db.error == "HTTP 503, failing: database"
    moved = probe(server + "/redirect", timeout=2)
    assert not moved.ok and "probe the HTTPS port" in moved.error
    plain = probe(server + "/plain", timeout=2)
    assert not plain.ok and "without Quay's health body" in plain.error


def test_nothing_listening_is_a_failed_probe_not_an_exception():
    import socket

    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        port = probe_socket.getsockname()[1]
    result = probe(f"http://127.0.0.1:{port}/health/instance", timeout=1)
    assert not result.ok and result.status is None and "Connection" in result.error


def test_a_hanging_endpoint_times_out():
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()  # accepts, never answers
        port = listener.getsockname()[1]
        result = probe(f"http://127.0.0.1:{port}/health/instance", timeout=0.3)
    assert not result.ok and result.error == "timed out after 0.3s"


def test_wait_healthy_stops_when_the_container_exits(server):
    FakeQuay.answers = {"/db": (503, b"{}", {})}
    result = wait_healthy(server + "/db", within=30, interval=0.01, timeout=1,
                          still_running=lambda: False)
    assert not result.ok and result.error.startswith("the container exited")


def test_probes_start_on_the_cadence_beside_one_that_hangs():
    """A Quay that accepts and never answers: with a 1 s timeout every 0.2 s, failures arrive
    about every 0.2 s after the first timeout, not one per timeout."""
    import socket
    import threading
    import time
    from types import SimpleNamespace

    from quay_bootstrap.health import Prober

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    port = server.getsockname()[1]
    cfg = SimpleNamespace(health=SimpleNamespace(timeout=1.0, interval=0.2, tls_verify=False),
                          report=SimpleNamespace(rds=None))
    seen, stop = [], threading.Event()
    prober = Prober(lambda: (cfg, f"http://127.0.0.1:{port}/health/instance"), seen.append, stop)
    prober.fast.clear()
    threading.Thread(target=prober.run, daemon=True).start()
    try:
        deadline = time.monotonic() + 5
        while len(seen) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        prober.wake.set()
        server.close()
    assert len(seen) >= 4 and not any(p.ok for p in seen)
    assert seen[3].at - seen[0].at < 1.0  # four failures within one timeout of each other


class BusyQuay(http.server.BaseHTTPRequestHandler):
    """Real Quay with every database round trip slow: /health/instance answers after the probe's
    timeout, and each gunicorn answers its ping only once its one worker is free."""

    def do_GET(self):  # noqa: N802 - http.server's name
        import time

        delay, body = (1.0, QUAY_OK) if self.path == "/health/instance" else (0.4, b"true")
        time.sleep(delay)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_probe_timed_out_on_a_busy_quay_whose_pings_answer_late_is_alive(monkeypatch):
    """The pings wait as long as the probe: answers slower than Quay's own 2 s (here scaled down
    to 0.2 s) but within the timeout are busy gunicorns, a shared slowness, not a hung Quay."""
    import time
    from types import SimpleNamespace

    from quay_bootstrap import health

    monkeypatch.setattr(health, "PING_TIMEOUT", 0.2)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), BusyQuay)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    cfg = SimpleNamespace(health=SimpleNamespace(timeout=0.6, interval=5.0, tls_verify=False),
                          report=SimpleNamespace(rds=None))
    seen, stop = [], threading.Event()
    prober = health.Prober(lambda: (cfg, f"http://127.0.0.1:{httpd.server_address[1]}/health/instance"),
                           seen.append, stop)
    prober.fast.clear()
    threading.Thread(target=prober.run, daemon=True).start()
    try:
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        prober.wake.set()
        httpd.shutdown()
        httpd.server_close()
    assert seen and not seen[0].ok and "timed out" in seen[0].error
    assert seen[0].gunicorns_alive
