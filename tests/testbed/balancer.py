"""The cluster's load balancer on the bed: HAProxy 2.6 in TCP mode in front of Quay nodes, health
checking each node's own readiness port, started and stopped by PID.

Like an AWS NLB or a classic on-premises HAProxy in front of Quay: TCP is forwarded unchanged to
a node's Quay port, while `GET <check_path>` on another port (the agent's /ready) decides whether
the node gets new connections. A refused connect goes to another node (`retries 3`, `option
redispatch`; with round robin and no persistence HAProxy 2.6 picks the next node at once, without
its 1-s turn-around: `wredis` counts it, `wretr` does not); a connection cut mid-request is not
retried (no L7 retries in TCP mode). Binds only 127.0.0.1 and a unix stats socket in its work
directory.
"""

from __future__ import annotations

import csv
import io
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

HOST = "127.0.0.1"
FRONTEND = "quay_in"
BACKEND = "quay"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
# The kernel's sun_path holds 108 bytes; pytest's tmp_path may be longer.
MAX_SOCKET_PATH = 100


class BalancerError(Exception):
    """HAProxy could not be started or asked for its state."""


def _ms(seconds: float) -> str:
    # HAProxy's time format takes integers only: "0.5s" is an error, "500ms" is not.
    return f"{max(1, round(seconds * 1000))}ms"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


class Balancer:
    """HAProxy forwarding 127.0.0.1:`port` (TCP) round-robin to the healthy SERVERS.

    Args:
        servers: (name, quay_port, check_port) per node, all on 127.0.0.1: connections go to
            quay_port; `GET check_path` on check_port must answer 2xx/3xx for the node to be UP.
        inter: seconds between two health checks of a node.
        check_timeout: seconds a connected check waits for its answer (HAProxy's `timeout
            check`; the connect itself gets min(timeout connect, inter)); default `inter`.
        fall: consecutive failed checks that take an UP node DOWN.
        rise: consecutive passed checks that bring a DOWN node UP.
        check_path: the path of the readiness check.
        workdir: where the config, the log and the stats socket go.

    HAProxy 2.6 starts each node as "UP 1/2" (check_status INI) and gives it traffic before its
    first check; that first check, if it fails, takes the node DOWN at once (not after `fall`).
    The first checks are staggered over `inter`, so `start()` returns (within about `inter`) once
    each node has been checked once: `states()` is then real. Use as a context manager, or
    `start()` and `stop()`.
    """

    def __init__(self, servers: Sequence[tuple[str, int, int]], *, inter: float = 1.0,
                 fall: int = 2, rise: int = 2, check_path: str = "/ready",
                 check_timeout: float | None = None, workdir: str | Path):
        if not servers:
            raise ValueError("a balancer needs at least one server")
        if not check_path.startswith("/") or any(c.isspace() for c in check_path):
            raise ValueError(f"check_path must be a path without spaces, not {check_path!r}")
        names = [name for name, _, _ in servers]
        if len(set(names)) != len(names):
            raise ValueError(f"server names must be unique: {names}")
        self.servers = [(str(name), int(quay), int(check)) for name, quay, check in servers]
        self.inter, self.fall, self.rise = inter, fall, rise
        self.check_timeout = inter if check_timeout is None else check_timeout
        self.check_path = check_path
        self.workdir = Path(workdir)
        self.port: int | None = None
        self._proc: subprocess.Popen | None = None
        self._log_handle = None
        self._socket_dir: str | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise BalancerError("the balancer is not started")
        return f"http://{HOST}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.workdir / "haproxy.cfg"

    @property
    def log_path(self) -> Path:
        return self.workdir / "haproxy.log"

    @property
    def socket_path(self) -> Path:
        return Path(self._socket_dir or self.workdir) / "haproxy.sock"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def config(self) -> str:
        """The HAProxy configuration for the current port and stats socket."""
        checks = f"check port {{}} inter {_ms(self.inter)} fall {self.fall} rise {self.rise}"
        lines = [
            "global",
            f"    stats socket {self.socket_path} mode 600 level admin",
            "",
            "defaults",
            "    mode tcp",
            "    timeout connect 2s",
            "    timeout client 60s",
            "    timeout server 60s",
            # The check's read timeout once connected.
            f"    timeout check {_ms(self.check_timeout)}",
            "    retries 3",
            "    option redispatch",
            "",
            f"frontend {FRONTEND}",
            f"    bind {HOST}:{self.port}",
            f"    default_backend {BACKEND}",
            "",
            f"backend {BACKEND}",
            "    balance roundrobin",
            "    option httpchk",
            f"    http-check send meth GET uri {self.check_path}",
        ]
        for name, quay_port, check_port in self.servers:
            lines.append(f"    server {name} {HOST}:{quay_port} " + checks.format(check_port))
        return "\n".join(lines) + "\n"

    def start(self) -> Balancer:
        """Writes the config, runs `haproxy -db -f CFG` and waits until the frontend is bound
        (its stats say OPEN) and every server has had its first health check.

        Raises:
            BalancerError: no haproxy binary, or it exited or did not come up in time (its log
                is in the message).
        """
        if self._proc is not None:
            raise BalancerError("the balancer is already started")
        binary = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")
        if binary is None:
            raise BalancerError("haproxy not found on PATH: apt-get install haproxy")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if len(str(self.workdir / "haproxy.sock")) > MAX_SOCKET_PATH:
            self._socket_dir = tempfile.mkdtemp(prefix="qb-haproxy-")
        # A port picked by binding port 0 may be taken before HAProxy binds it: pick again.
        for attempt in range(3):
            self.port = _free_port()
            self.config_path.write_text(self.config())
            self._log_handle = open(self.log_path, "ab")
            self._proc = subprocess.Popen(
                [binary, "-db", "-f", str(self.config_path)], stdin=subprocess.DEVNULL,
                stdout=self._log_handle, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                self._wait_started()
                return self
            except BalancerError:
                bind_failed = "cannot bind socket" in self.log()
                self.stop()
                if not bind_failed or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _wait_started(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT + self.inter
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BalancerError(
                    f"haproxy exited with code {self._proc.returncode}; log:\n{self.log()}")
            # Not a test connection to the port: HAProxy would forward it to a node, which would
            # see a connection reset before any request. Its stats say the port is bound.
            if self.socket_path.exists():
                try:
                    rows = self._rows()
                except BalancerError:
                    rows = []
                servers = [row for row in rows if row["pxname"] == BACKEND
                           and row["svname"] not in ("BACKEND", "FRONTEND")]
                bound = any(row["pxname"] == FRONTEND and row["svname"] == "FRONTEND"
                            and row["status"] == "OPEN" for row in rows)
                # "INI" (or "* INI" while running): the server's first check has not ended.
                if bound and servers and all(
                        row["check_status"].lstrip("* ") not in ("", "INI") for row in servers):
                    return
            time.sleep(0.05)
        raise BalancerError(f"haproxy not ready after {START_TIMEOUT:.0f} s; log:\n{self.log()}")

    def stop(self) -> None:
        """SIGTERM to HAProxy's PID and wait; SIGKILL after 5 s."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=STOP_TIMEOUT)
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    def __enter__(self) -> Balancer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def command(self, line: str, timeout: float = 2.0) -> str:
        """The answer of HAProxy's runtime API (the stats socket, level admin) to LINE."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout)
                sock.connect(str(self.socket_path))
                sock.sendall(line.encode() + b"\n")
                chunks = []
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
        except OSError as err:
            raise BalancerError(f"stats socket {self.socket_path}: {err}") from err
        return b"".join(chunks).decode(errors="replace")

    def stats(self) -> dict[str, dict[str, str]]:
        """`show stat` of the backend's servers: {server name: {column: value}}; columns such as
        status, check_status, stot (sessions), econ (connect errors), wretr (retries), wredis
        (redispatches)."""
        return {row["svname"]: row for row in self._rows()
                if row["pxname"] == BACKEND and row["svname"] not in ("BACKEND", "FRONTEND")}

    def _rows(self) -> list[dict[str, str]]:
        text = self.command("show stat")
        if not text.startswith("# "):
            raise BalancerError(f"unexpected answer to show stat: {text[:200]!r}")
        return list(csv.DictReader(io.StringIO(text[2:])))

    def states(self) -> dict[str, str]:
        """{server name: status}: "UP", "DOWN", "MAINT", "DRAIN", or a transition such as
        "UP 1/2" (failing, not yet down) or "DOWN 1/2" (passing, not yet up)."""
        return {name: row["status"] for name, row in self.stats().items()}

    def wait_state(self, name: str, state: str, timeout: float = 10.0) -> dict[str, str]:
        """All states once server NAME's is exactly STATE.

        Raises:
            AssertionError: not within TIMEOUT seconds (the states and the log are in it).
        """
        deadline = time.monotonic() + timeout
        while True:
            states = self.states()
            if name not in states:
                raise KeyError(f"no server {name!r}: {sorted(states)}")
            if states[name] == state:
                return states
            if time.monotonic() >= deadline:
                raise AssertionError(f"server {name} not {state} after {timeout} s: {states}; "
                                     f"log:\n{self.log()[-2000:]}")
            time.sleep(0.05)

    def log(self) -> str:
        """What HAProxy printed: its warnings, e.g. "Server quay/n1 is DOWN, reason: ..."."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
