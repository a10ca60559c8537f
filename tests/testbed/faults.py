"""Faults of the bed's real services: down (stopped), hung (SIGSTOP) or slow (a delaying TCP proxy)."""

from __future__ import annotations

import contextlib
import select
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from tests.testbed import bed


@contextlib.contextmanager
def down(directory: str | Path, name: str) -> Iterator[None]:
    """The bed's NAME (postgres, redis, seaweedfs, fake_gcs) stopped inside the block, started
    again (same port, same data) after it."""
    bed.stop_service(directory, name)
    try:
        yield
    finally:
        bed.start_service(directory, name)


@contextlib.contextmanager
def hung(directory: str | Path, name: str) -> Iterator[None]:
    """NAME SIGSTOPped inside the block: connections are accepted by the kernel, nothing answers."""
    bed.signal_service(directory, name, signal.SIGSTOP)
    try:
        yield
    finally:
        bed.signal_service(directory, name, signal.SIGCONT)


class SlowProxy:
    """A TCP proxy on 127.0.0.1 that holds every chunk from the client DELAY seconds before
    passing it on to UPSTREAM (host, port): each round trip to the service costs DELAY more.

    Protocol-blind, so it slows PostgreSQL and Redis as well as HTTP. Use as a context manager;
    `port` is where to connect instead of the service. `delay` may be changed while it runs.
    """

    def __init__(self, upstream: tuple[str, int], delay: float):
        self.upstream = upstream
        self.delay = delay
        self._listener = socket.socket()
        self._listener.bind((bed.HOST, 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> SlowProxy:
        self._spawn(self._accept)
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        self._listener.close()

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._spawn(self._serve, client)

    def _serve(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            client.close()
            return
        with client, server:
            pair = {client: server, server: client}
            while not self._closing.is_set():
                ready, _, _ = select.select(list(pair), [], [], 0.5)
                for sock in ready:
                    try:
                        data = sock.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    if sock is client and self.delay:
                        time.sleep(self.delay)
                    try:
                        pair[sock].sendall(data)
                    except OSError:
                        return
