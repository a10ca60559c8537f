"""The /healthz /status /metrics endpoint: one asyncio thread, deadlines and a connection cap,
so slow clients cost a socket, never a thread, and /healthz stays answerable."""
from __future__ import annotations

import asyncio
import contextlib
import email.utils
import http
import json
import os
import re
import socket
import threading
import time
from typing import Any, Dict, Optional

import structlog

from quay_bootstrap.drain import ready
from quay_bootstrap.status import Board

log = structlog.get_logger(__name__)

# The endpoint's limits. Its clients (a load balancer's health check, Prometheus, an operator's
# curl) send a whole request at once and read the short answer at once, so anything slower is
# cut off rather than given a thread: /healthz must stay answerable during a slow-loris.
HEAD_TIMEOUT = 5.0  # seconds from accept to the end of the headers, in total (not per read)
WRITE_TIMEOUT = 5.0  # seconds for the answer to leave once it is written
MAX_HEAD = 8192  # bytes of request line and headers
# systemd's default LimitNOFILE is 1024 (soft) and the unit does not raise it; 256 connections
# leave some 750 descriptors for the agent's own sockets (Docker, the object store, the health
# probe, the state file), so a flood of clients can never starve them.
MAX_CONNECTIONS = 256
_ACCEPT_RETRY = 0.5  # seconds to wait when accept() fails (out of descriptors, say)
_WARN_EVERY = 60.0  # seconds between two warnings about slow or shed clients
_END_OF_HEAD = re.compile(rb"\r?\n\r?\n")


def inherited_socket(listen: str) -> Optional[socket.socket]:
    """The listening socket systemd passed (quay-bootstrap.socket), or None.

    systemd holds it open while the agent restarts (an agent upgrade reaches every node at
    once): a load balancer's check made meanwhile waits in its queue and is answered by the
    next agent instead of being refused. LISTEN_PID must be this process (sd_listen_fds(3))."""
    from systemd import daemon

    fds = daemon.listen_fds()  # also clears LISTEN_* so nothing this agent runs inherits them
    if not fds:
        return None
    for extra in fds[1:]:
        os.close(extra)
    sock = socket.socket(fileno=fds[0])
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM \
            or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.close()
        log.warning("endpoint.inherited_unusable", fds=len(fds),
                    hint="quay-bootstrap.socket must have one ListenStream=; "
                         f"listening on report.listen ({listen}) instead")
        return None
    port = sock.getsockname()[1]
    wanted = int(listen.rpartition(":")[2])
    log.info("endpoint.inherited", port=port, note="held by systemd across agent restarts")
    if wanted not in (0, port):
        log.warning("endpoint.inherited_port_differs", port=port, listen=listen,
                    hint="quay-bootstrap.socket's ListenStream= wins; make it and report.listen "
                         "the same port, the one the load balancer checks")
    return sock


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if host.startswith("[") else socket.AF_INET,
                         socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        # A burst of connections waits in the kernel's queue (which costs this process no
        # descriptor) rather than having its SYNs dropped and retried a second later.
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


class Endpoint:
    """GET or HEAD /healthz (200 fine, 503 once marked: what autohealing checks), /ready (200
    while Quay is healthy and not draining: what a load balancer checks), /status (JSON),
    /metrics (Prometheus).

    One asyncio loop in one thread serves every connection, so slow clients cost a socket each,
    never a thread. Each connection is closed after one answer (`Connection: close`); one that
    has not sent its headers within `head_timeout` is answered 408 (or closed if it sent nothing).
    At `max_connections` the oldest connection still waiting for its request is dropped for the
    new one: a flood of slow clients cannot lock out a load balancer that asks at once.

    Args:
        board: the status board the answers are read from.
        listen: HOST:PORT, an IPv6 host in brackets ("[::1]:9101"); port 0 picks a free port,
            which `address` then names.
        sock: a listening socket to serve instead (systemd's, from `inherited_socket`).
    """

    def __init__(self, board: Board, listen: str, *, sock: Optional[socket.socket] = None,
                 max_connections: int = MAX_CONNECTIONS, head_timeout: float = HEAD_TIMEOUT,
                 write_timeout: float = WRITE_TIMEOUT) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections}")
        host, _, port = listen.rpartition(":")
        if sock is None:
            sock = _bind(host, int(port))
        else:  # systemd's (inherited_socket): it outlives this agent
            sock.setblocking(False)
            host = _host(sock.getsockname()[0])
        self._sock = sock
        self.address = f"{host}:{sock.getsockname()[1]}"
        self.max_connections = max_connections
        self.head_timeout = head_timeout
        self.write_timeout = write_timeout
        self.peak = 0  # the most connections open at once, for tests and post-mortems
        self._answers = _answers(board)
        self._open: Dict[_Connection, None] = {}  # oldest first; only the loop's thread uses it
        self._troubles: Dict[str, int] = {}
        self._warned = -_WARN_EVERY
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._task: Optional[asyncio.Task] = None
        self._thread = threading.Thread(target=self._run, name="endpoint", daemon=True)

    @property
    def connections(self) -> int:
        """How many client connections are open now."""
        return len(self._open)

    def start(self) -> "Endpoint":
        self._loop = asyncio.new_event_loop()
        self._task = self._loop.create_task(self._accept())
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._loop is not None and self._task is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop has just ended on its own
                self._loop.call_soon_threadsafe(self._task.cancel)
            self._thread.join(timeout=2)
        self._sock.close()

    def _run(self) -> None:
        loop, task = self._loop, self._task
        assert loop is not None and task is not None
        try:
            loop.run_until_complete(task)
        except asyncio.CancelledError:
            pass
        except Exception:  # noqa: BLE001 - a bug here must be seen, not end the agent
            log.exception("endpoint.failed", address=self.address)
        finally:
            for conn in list(self._open):
                conn.drop()
            loop.run_until_complete(asyncio.sleep(0))  # their sockets close on this turn
            loop.close()

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(self._sock)
            except OSError as err:  # EMFILE and the like: wait rather than spin
                self._note("accept_failed", error=str(err))
                await asyncio.sleep(_ACCEPT_RETRY)
                continue
            if len(self._open) >= self.max_connections:
                self._shed()
            try:
                await loop.connect_accepted_socket(lambda: _Connection(self), sock)
            except OSError:
                sock.close()

    def _shed(self) -> None:
        """Drop the oldest connection still waiting for its request (else the oldest one)."""
        victim = next((c for c in self._open if not c.answered), None) or next(iter(self._open))
        victim.drop()
        self._note("shed")

    def _opened(self, conn: "_Connection") -> None:
        self._open[conn] = None
        self.peak = max(self.peak, len(self._open))

    def _closed(self, conn: "_Connection") -> None:
        self._open.pop(conn, None)

    def _note(self, trouble: str, **fields: Any) -> None:
        """Count slow, shed or refused clients; warn at most once a minute, with the counts."""
        self._troubles[trouble] = self._troubles.get(trouble, 0) + 1
        now = time.monotonic()
        if now - self._warned >= _WARN_EVERY:
            log.warning("endpoint.slow_clients", address=self.address, open=len(self._open),
                        limit=self.max_connections, **self._troubles, **fields)
            self._troubles.clear()
            self._warned = now


class _Connection(asyncio.Protocol):
    """One client: its request head is gathered under one deadline, then one answer, then close."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.head = bytearray()
        self.scanned = 0  # where to resume looking for the blank line: a byte-a-time client
        self.answered = False  # must not cost a rescan of its whole head per byte
        self.transport: Any = None
        self.timer: Optional[asyncio.TimerHandle] = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.endpoint._opened(self)
        self.timer = asyncio.get_running_loop().call_later(self.endpoint.head_timeout, self._late)

    def data_received(self, data: bytes) -> None:
        if self.answered:
            return
        self.head += data
        end = _END_OF_HEAD.search(self.head, max(0, self.scanned - 3))
        self.scanned = len(self.head)
        if end is None and len(self.head) <= MAX_HEAD:
            return
        if end is None or end.start() > MAX_HEAD:
            self.answer(431, b"request header fields too large\n")
        else:
            self.answer(*self.endpoint._answers(bytes(self.head[:end.start()])))

    def eof_received(self) -> bool:
        return False  # a client that gave up before its request is closed; an answer still leaves

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self.timer:
            self.timer.cancel()
        self.endpoint._closed(self)

    def answer(self, code: int, body: bytes, kind: str = "text/plain", head_only: bool = False,
               extra: str = "") -> None:
        self.answered = True
        phrase = http.HTTPStatus(code).phrase
        self.transport.write(
            f"HTTP/1.1 {code} {phrase}\r\nDate: {email.utils.formatdate(usegmt=True)}\r\n"
            f"Content-Type: {kind}\r\nContent-Length: {len(body)}\r\n{extra}"
            "Connection: close\r\n\r\n".encode("latin-1") + (b"" if head_only else body))
        self.transport.close()  # after the answer has left
        if self.timer:
            self.timer.cancel()
        # A client that does not read its answer must not keep the socket.
        self.timer = asyncio.get_running_loop().call_later(self.endpoint.write_timeout, self.drop)

    def drop(self) -> None:
        self.endpoint._closed(self)
        self.transport.abort()

    def _late(self) -> None:
        if self.answered:
            self.drop()
            return
        self.endpoint._note("timed_out")
        if self.head:
            self.answer(408, b"request timeout\n")
        else:
            self.transport.close()


def _answers(board: Board):
    """The answer to a request head, as `_Connection.answer`'s arguments."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    def answers(head: bytes) -> tuple:
        parts = head.lstrip(b"\r\n").split(b"\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return 400, b"bad request\n"
        method, target = parts[0], parts[1]
        if method not in (b"GET", b"HEAD"):
            return 405, b"method not allowed\n", "text/plain", False, "Allow: GET, HEAD\r\n"
        head_only = method == b"HEAD"
        try:
            status = board.snapshot()
            if target == b"/ready":  # the load balancer's check (drain.ready)
                code, word = ready(status, time.time())
                return code, word.encode() + b"\n", "text/plain", head_only
            if target == b"/healthz":
                marked = status.get("marked_unhealthy")
                return (503 if marked else 200, b"unhealthy\n" if marked else b"ok\n",
                        "text/plain", head_only)
            if target == b"/status":
                return 200, json.dumps(status, default=str).encode(), "application/json", head_only
            if target == b"/metrics":
                return 200, generate_latest(board.registry), CONTENT_TYPE_LATEST, head_only
        except Exception:  # noqa: BLE001 - one bad answer must not take the endpoint down
            log.exception("endpoint.answer_failed", path=target.decode("latin-1"))
            return 500, b"internal error\n", "text/plain", head_only
        return 404, b"not found\n", "text/plain", head_only

    return answers
