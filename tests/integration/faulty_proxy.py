"""A forwarding HTTP proxy on 127.0.0.1 that injects the faults a real network and store produce.

It sits between the agent and a real store (moto or the GCS emulator) and, for requests whose
path contains a given text, the first N times: answers 503 SlowDown (an overloaded S3 or GCS),
flips a byte of the body (corruption on the wire: same length, wrong content), or sends half the
body and closes the connection (a truncated download). Everything else is forwarded unchanged.
"""
from __future__ import annotations

import http.client
import http.server
import threading
from dataclasses import dataclass, field
from typing import List
from urllib.parse import urlsplit


@dataclass
class Fault:
    match: str  # a text the request path must contain
    kind: str  # "status", "corrupt" or "truncate"
    times: int  # how many matching requests get the fault
    hits: int = 0


@dataclass
class FaultyProxy:
    upstream: str
    faults: List[Fault] = field(default_factory=list)
    requests: int = 0

    def __post_init__(self) -> None:
        target = urlsplit(self.upstream)
        proxy = self
        self._lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _forward(self) -> None:
                proxy.requests += 1
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fault = proxy._take(self.command, self.path)
                if fault and fault.kind == "status":
                    payload = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown"
                               b"</Code><Message>Please reduce your request rate.</Message></Error>")
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = target.netloc
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                conn.close()
                if fault and fault.kind == "corrupt" and data:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                if fault and fault.kind == "truncate":
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _take(self, method: str, path: str):
        with self._lock:
            for fault in self.faults:
                if method == "GET" and fault.match in path and fault.hits < fault.times:
                    fault.hits += 1
                    return fault
        return None

    def __enter__(self) -> "FaultyProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
