"""Client load on a Quay cluster's address: short GETs and slow uploads, each on a new connection,
every request recorded with its outcome (ok, failed, cut), so a test can show that a roll or a
node's loss cut no request.

Standard library only, thread based: importable by tests and by bench scripts.

Outcomes:
    ok      a 2xx answer, read in full.
    failed  the request was never placed: the connect was refused, reset or timed out; or it
            was answered with a non-2xx status; or any step timed out.
    cut     the connection was reset or closed after the request began being sent and before the
            whole answer was read: an in-flight request lost.

Behind a TCP proxy (HAProxy `mode tcp`, an AWS NLB) the client's connect always succeeds at the
proxy: a request the proxy could not place on any node (every connect refused) is closed by the
proxy after the client sent it, and so counts as "cut", not "failed". Each record's `stage`
(connect, send, response) says where it ended.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass
from typing import Any

OK, FAILED, CUT = "ok", "failed", "cut"
GET, UPLOAD = "get", "upload"
# How often an upload sends a piece of its body: often enough to be "in flight" all along, rare
# enough that 8 clients stay cheap on 2 cores.
UPLOAD_TICK = 0.1
MAX_ERRORS_REPORTED = 10


@dataclass(frozen=True)
class Record:
    """One request. Times are time.time() (seconds since the epoch), comparable with logs."""

    kind: str  # "get" or "upload"
    start: float
    end: float
    outcome: str  # "ok", "failed" or "cut"
    stage: str  # where it ended: "connect", "send", "response" or "done"
    status: int | None = None
    error: str = ""
    sent: int = 0  # body bytes sent (uploads)

    @property
    def seconds(self) -> float:
        return self.end - self.start


class _Ended(Exception):
    """A request ended early; carries its outcome."""

    def __init__(self, outcome: str, stage: str, error: BaseException | str):
        super().__init__(str(error))
        self.outcome, self.stage = outcome, stage
        self.error = error if isinstance(error, str) else f"{type(error).__name__}: {error}"


class _Abandoned(Exception):
    """stop()'s bound passed while an upload was sending."""


def _timeout(err: BaseException) -> bool:
    return isinstance(err, (socket.timeout, TimeoutError))


def _early_answer(conn: http.client.HTTPConnection) -> int | None:
    """The status of an answer already sent by the server, if one can be read at once."""
    try:
        if conn.sock is not None:
            conn.sock.settimeout(0.2)
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return None


class Load:
    """CLIENTS threads sending requests to URL (http://127.0.0.1:PORT only) until stopped.

    Args:
        url: where to send; only 127.0.0.1 is accepted.
        clients: threads in all; UPLOADS of them upload, the rest GET back to back.
        uploads: upload threads; each PUTs UPLOAD_BYTES to UPLOAD_PATH, sent in small pieces
            spread evenly over UPLOAD_SECONDS, so each upload is in flight that long.
        get_path: the path the GET threads ask for.
        max_requests: stop issuing requests after this many in all (None: no limit).
        duration: stop issuing requests this many seconds after `start()` (None: until `stop()`).
        timeout: socket timeout of each connect, send and read.

    Nothing is rate-limited beyond this: a GET thread starts its next request when its last
    ends. `stop()` lets the requests in flight finish (bounded) and issues no more.
    """

    def __init__(self, url: str, *, clients: int = 8, uploads: int = 3,
                 upload_seconds: float = 2.0, upload_bytes: int = 64 * 1024,
                 get_path: str = "/v2/", upload_path: str = "/load/upload",
                 max_requests: int | None = None, duration: float | None = None,
                 timeout: float = 10.0):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or parts.hostname != "127.0.0.1" or parts.port is None:
            raise ValueError(f"load goes to http://127.0.0.1:PORT only, not {url!r}")
        if not 0 <= uploads <= clients:
            raise ValueError(f"uploads ({uploads}) must be between 0 and clients ({clients})")
        self.host, self.port = parts.hostname, parts.port
        self.clients, self.uploads = clients, uploads
        self.upload_seconds, self.upload_bytes = upload_seconds, upload_bytes
        self.get_path, self.upload_path = get_path, upload_path
        self.max_requests, self.duration, self.timeout = max_requests, duration, timeout
        self.started: float | None = None
        self.stopped: float | None = None
        self._records: list[Record] = []
        self._issued = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()  # issue no new request
        self._abort = threading.Event()  # end the uploads in flight now (stop's bound passed)
        self._abandoned = 0
        self._threads: list[threading.Thread] = []
        self._deadline: float | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> Load:
        if self._threads:
            raise RuntimeError("load already started")
        self.started = time.time()
        if self.duration is not None:
            self._deadline = time.monotonic() + self.duration
        for index in range(self.clients):
            kind = UPLOAD if index < self.uploads else GET
            thread = threading.Thread(target=self._client, args=(kind,), daemon=True,
                                      name=f"load-{kind}-{index}")
            thread.start()
            self._threads.append(thread)
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Whether every client thread ended (max_requests or duration reached, or stopped)
        within TIMEOUT seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        done = not any(thread.is_alive() for thread in self._threads)
        if done and self.stopped is None:
            self.stopped = time.time()
        return done

    def stop(self, timeout: float | None = None) -> None:
        """Issue no new request; wait for those in flight, at most TIMEOUT seconds (default: an
        upload's length plus the socket timeout). Uploads still running then are ended and
        counted as abandoned, not recorded."""
        self._stop.set()
        if timeout is None:
            timeout = self.upload_seconds + self.timeout + 1.0
        if not self.wait(timeout):
            self._abort.set()
            self.wait(self.timeout + 1.0)
        self.stopped = self.stopped or time.time()

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ results

    @property
    def records(self) -> list[Record]:
        with self._lock:
            return list(self._records)

    def count(self, kind: str | None = None, outcome: str | None = None) -> int:
        return sum(1 for r in self.records
                   if (kind is None or r.kind == kind) and (outcome is None or r.outcome == outcome))

    def failures(self, since: float | None = None, until: float | None = None) -> list[Record]:
        """The records not ok that started at or after SINCE and before UNTIL (time.time())."""
        return [r for r in self.records if r.outcome != OK
                and (since is None or r.start >= since) and (until is None or r.start < until)]

    def report(self) -> dict[str, Any]:
        """Counts by outcome and by kind, rate, and the first errors with their times (seconds
        after `start()`)."""
        records = self.records
        began = self.started or 0.0
        ended = self.stopped or time.time()
        by_kind: dict[str, dict[str, int]] = {}
        for kind in (GET, UPLOAD):
            mine = [r for r in records if r.kind == kind]
            by_kind[kind] = {o: sum(1 for r in mine if r.outcome == o) for o in (OK, FAILED, CUT)}
            by_kind[kind]["total"] = len(mine)
        errors = []
        for record in sorted((r for r in records if r.outcome != OK), key=lambda r: r.start):
            if len(errors) == MAX_ERRORS_REPORTED:
                break
            errors.append({**asdict(record), "at": round(record.start - began, 3),
                           "seconds": round(record.seconds, 3)})
        elapsed = max(ended - began, 1e-9)
        return {
            "total": len(records),
            **{o: sum(1 for r in records if r.outcome == o) for o in (OK, FAILED, CUT)},
            "by_kind": by_kind,
            "abandoned": self._abandoned,
            "seconds": round(elapsed, 3),
            "per_second": round(len(records) / elapsed, 1),
            "errors": errors,
        }

    # ------------------------------------------------------------ the clients

    def _take_ticket(self) -> bool:
        if self._stop.is_set():
            return False
        if self._deadline is not None and time.monotonic() >= self._deadline:
            return False
        with self._lock:
            if self.max_requests is not None and self._issued >= self.max_requests:
                return False
            self._issued += 1
            return True

    def _client(self, kind: str) -> None:
        while self._take_ticket():
            record = self._upload() if kind == UPLOAD else self._get()
            if record is None:
                with self._lock:
                    self._abandoned += 1
                return
            with self._lock:
                self._records.append(record)

    def _connect(self) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.connect()
        except OSError as err:
            conn.close()
            raise _Ended(FAILED, "connect", err) from err
        return conn

    def _get(self) -> Record:
        return self._request(GET, lambda conn: conn.request(
            "GET", self.get_path, headers={"Connection": "close"}))

    def _upload(self) -> Record | None:
        pieces = max(1, int(self.upload_seconds / UPLOAD_TICK))
        size, extra = divmod(self.upload_bytes, pieces)
        sent = [0]

        def send(conn: http.client.HTTPConnection) -> None:
            conn.putrequest("PUT", self.upload_path, skip_accept_encoding=True)
            conn.putheader("Content-Type", "application/octet-stream")
            conn.putheader("Content-Length", str(self.upload_bytes))
            conn.putheader("Connection", "close")
            conn.endheaders()
            began = time.monotonic()
            for index in range(pieces):
                # Paced from the start, not piece to piece, so slow sends do not stretch it.
                due = began + (index + 1) * self.upload_seconds / pieces
                if self._abort.wait(max(0.0, due - time.monotonic())):
                    raise _Abandoned()
                piece = b"x" * (size + (1 if index < extra else 0))
                conn.send(piece)
                sent[0] += len(piece)

        try:
            return self._request(UPLOAD, send, sent)
        except _Abandoned:
            return None

    def _request(self, kind: str, send, sent: list[int] | None = None) -> Record:
        start = time.time()
        status = None
        try:
            conn = self._connect()
            try:
                try:
                    send(conn)
                except OSError as err:
                    if _timeout(err):
                        raise _Ended(FAILED, "send", err) from err
                    # A node may answer (413, 503) and close before the body is all sent: a
                    # refusal, not a cut, if that answer can still be read.
                    status = _early_answer(conn)
                    if status is not None and not 200 <= status < 300:
                        raise _Ended(FAILED, "send", f"HTTP {status} before the body was sent"
                                     f" ({type(err).__name__}: {err})") from err
                    raise _Ended(CUT, "send", err) from err
                try:
                    response = conn.getresponse()
                    status = response.status
                    response.read()
                except (OSError, http.client.HTTPException) as err:
                    # RemoteDisconnected (closed, no answer) is a ConnectionResetError;
                    # IncompleteRead is a short body.
                    raise _Ended(FAILED if _timeout(err) else CUT, "response", err) from err
            finally:
                conn.close()
        except _Ended as ended:
            return Record(kind, start, time.time(), ended.outcome, ended.stage, status,
                          ended.error, sent[0] if sent else 0)
        end = time.time()
        if 200 <= status < 300:
            return Record(kind, start, end, OK, "done", status, "", sent[0] if sent else 0)
        return Record(kind, start, end, FAILED, "done", status, f"HTTP {status}",
                      sent[0] if sent else 0)


