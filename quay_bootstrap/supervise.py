"""The daemon's long-lived threads (the prober, the Docker events watcher, the lifecycle
watcher), kept running by the loop: `restarts_due` decides (pure), `Supervisor` acts."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import structlog

log = structlog.get_logger(__name__)

# The loop looks at its threads this often; one that keeps dying waits 1 s, doubling to 60 s,
# before each restart (none after it ran that long: a new failure).
CHECK_THREADS_EVERY = 2.0
THREAD_BACKOFF = (1.0, 60.0)


@dataclass(frozen=True)
class Ended:
    """How a supervised thread ended: when, the exception that ended it (None: it returned),
    and whether the agent was stopping then."""

    at: float
    error: Optional[BaseException]
    stopping: bool


@dataclass(frozen=True)
class Seen:
    """A supervised thread as the check sees it. `delay` is what its previous restart waited;
    `finishes`: it may return when its work is done (only an exception is a death)."""

    name: str
    started_at: float
    ended: Optional[Ended] = None  # None while it runs
    delay: float = 0.0
    finishes: bool = False


def thread_backoff(previous: float, ran: float) -> float:
    """The wait before restarting a thread that died after running `ran` seconds, when its
    previous restart waited `previous`: none after a long run, else 1 s doubling to 60 s."""
    initial, most = THREAD_BACKOFF
    if ran >= most:
        return 0.0
    return min(most, max(initial, previous * 2))


def restarts_due(threads: Iterable[Seen], now: float, stopping: bool) -> List[Tuple[str, float]]:
    """Which threads to restart now, each with the backoff it waited: those that died (raised,
    or returned though meant to run until stop) while the agent was not stopping, once their
    backoff since the death has passed."""
    if stopping:
        return []
    due = []
    for seen in threads:
        ended = seen.ended
        if ended is None or ended.stopping or (seen.finishes and ended.error is None):
            continue
        delay = thread_backoff(seen.delay, ended.at - seen.started_at)
        if now >= ended.at + delay:
            due.append((seen.name, delay))
    return due


class _Supervised:
    def __init__(self, name: str, target: Callable[[], None], finishes: bool) -> None:
        self.name, self.target, self.finishes = name, target, finishes
        self.thread: Optional[threading.Thread] = None
        self.started_at = 0.0
        self.ended: Optional[Ended] = None  # written once by its thread, as it ends
        self.delay = 0.0


class Supervisor:
    """The daemon's long-lived threads (the prober, the Docker events watcher, the lifecycle
    watcher), restarted by the loop when one dies: one exception must not end all probing.
    Modelled on WALinuxAgent's `_check_threads_running`; `check` runs on the loop's thread.

    Args:
        stop: the agent's stop event: a thread that ends once it is set is not restarted.
        clock: when threads start and end, for the backoff.
        restarts: the counter of restarts, labelled by thread (a series at 0 for each thread
            started, so that /metrics shows what is watched).
    """

    def __init__(self, stop: threading.Event, clock: Callable[[], float],
                 restarts=None) -> None:
        self.stop, self.clock, self.restarts = stop, clock, restarts
        self.threads: Dict[str, _Supervised] = {}

    def start(self, name: str, target: Callable[[], None], *, finishes: bool = False) -> None:
        """Runs `target` in a thread named `name`, kept running; `finishes`: it may return
        when its work is done (then only an exception restarts it)."""
        self.threads[name] = supervised = _Supervised(name, target, finishes)
        if self.restarts is not None:
            self.restarts.labels(name)
        self._start(supervised)

    def check(self) -> List[str]:
        """Restarts the threads that died, when their backoff allows; returns their names."""
        seen = {each.name: Seen(each.name, each.started_at,
                                None if each.thread is None or each.thread.is_alive()
                                else each.ended, each.delay, each.finishes)
                for each in self.threads.values()}
        due = restarts_due(seen.values(), self.clock(), self.stop.is_set())
        for name, delay in due:
            supervised, ended = self.threads[name], seen[name].ended  # not None: it died
            supervised.delay = delay
            self._start(supervised)
            error = ended.error
            log.warning("agent.thread_restarted", thread=name,
                        error=f"{type(error).__name__}: {error}" if error is not None
                        else "returned while the agent was not stopping",
                        ran_seconds=round(ended.at - seen[name].started_at, 1),
                        backoff_seconds=delay, exc_info=error)
            if self.restarts is not None:
                self.restarts.labels(name).inc()
        return [name for name, _ in due]

    def _start(self, supervised: _Supervised) -> None:
        def run() -> None:
            try:
                supervised.target()
            except BaseException as err:  # noqa: BLE001 - the check restarts it, logging this
                supervised.ended = Ended(self.clock(), err, self.stop.is_set())
                if supervised.ended.stopping:  # no restart to log it: threading.excepthook's
                    raise
            else:
                supervised.ended = Ended(self.clock(), None, self.stop.is_set())

        supervised.ended, supervised.started_at = None, self.clock()
        supervised.thread = threading.Thread(target=run, name=supervised.name, daemon=True)
        try:
            supervised.thread.start()
        except RuntimeError as err:  # no thread to be had: the next check tries again
            supervised.ended = Ended(self.clock(), err, self.stop.is_set())
            raise
