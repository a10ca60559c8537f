"""A simulated Quay cluster for model-based tests of the roll: 3 to 5 nodes, each running the
real decision code (node.Node over rollout.Roll, canary.Verdicts and the lease store's budget)
against fakes of the object store, Docker and the clock, and a model of Quay itself.

Each node's roll runs in a thread of its own, but one at a time: a roll runs only between
`Cluster.step(i)` and its next wait (a sleep for a lease or a verdict, a wait for health) or
its end, so an interleaving is a sequence of steps that hypothesis can choose, shrink and
replay. The world changes between any two steps: the lock, the stack, a crash, the clock.

Quay's model (what real Quay does, tests/integration/test_real_quay.py):
  - `registry` migrates the shared database to its image's version; an image older than the
    database exits at the migration with "Can't locate revision" (exit 255);
  - `registry-nomigrate` serves whatever the database is;
  - a bad stack fails validation before the migration (exits); a bad image fails after it
    (keeps running, unhealthy); while the database is down every Quay runs but fails its probe.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import List, Optional, Set, Tuple

from quay_bootstrap import canary, health, status, watchdog
from quay_bootstrap.container import IMAGE_DIGEST, IMAGE_TAG, SPEC_HASH, STACK_VERSION
from quay_bootstrap.node import Node
from quay_bootstrap.rollout import Roll
from tests.fakes import (
    FakeDocker,
    FakePass,
    FakeStackStore,
    FakeSystemd,
    MemoryLeases,
    Release,
    make_config,
    probe,
)

TAGS = ("v3.9.0", "v3.10.0", "v3.11.0", "v3.12.0")
TTL = 600.0
TURN = 10.0  # seconds: how long any one wait lasts


def release(stack: str, tag: str) -> Release:
    digit = str(TAGS.index(tag) + 1)
    return Release(stack, "sha256:" + digit * 64, f"sha256:image-{tag}", tag)


@dataclass
class World:
    """What the cluster shares: the source (stack and lock), the database, and the ground truth
    a test checks the agents against."""

    now: float = 1_000_000.0
    stack: str = "stack-1"
    tag: str = TAGS[0]
    database: Tuple[int, int, int] = (0, 0, 0)  # the version Quay's schema is at
    database_down: bool = False
    bad_stacks: Set[str] = field(default_factory=set)
    bad_images: Set[str] = field(default_factory=set)
    migrations: List[Tuple[str, str]] = field(default_factory=list)  # (tag, node)
    violations: List[str] = field(default_factory=list)
    # (node, stack version) -> how often its Quay failed while the database was down
    outage_failures: dict = field(default_factory=dict)

    def clock(self) -> float:
        return self.now

    def release(self) -> Release:
        return release(self.stack, self.tag)


class ModelDocker(FakeDocker):
    """FakeDocker whose containers behave as Quay does against the world's database."""

    def __init__(self, world: World, node: str) -> None:
        super().__init__()
        self.world, self.node = world, node

    agent: "Agent"

    def create_and_start(self, spec) -> str:
        self._fresh(spec)
        container_id = super().create_and_start(spec)
        self._boot(self.containers[container_id])
        return container_id

    def start(self, container_id: str) -> None:
        was = self._get(container_id).status
        super().start(container_id)
        if was != "running":
            self._boot(self._get(container_id))

    def restart_quay(self, spec, recreate, exited, expect):
        created = super().restart_quay(spec, recreate, exited, expect)
        found = self.named(spec.name)
        if created is None and found is not None and found.status == "running" and \
                self.calls[-1][0] == "restart":
            self._boot(found)
        return created

    def _fresh(self, spec) -> None:
        """A roll creates what the source says now, or puts back what ran before it."""
        if not threading.current_thread().name.startswith("roll-"):
            return
        made = (spec.labels[STACK_VERSION], spec.labels[IMAGE_DIGEST])
        now = (self.world.stack, self.world.release().digest)
        live = self.agent.node.live
        before = (live.stack_version, live.spec.labels[IMAGE_DIGEST])
        if made not in (now, before):
            self.world.violations.append(
                f"{self.node} applied a stale plan: {made}, while the source says {now}")
        key = (*made, spec.labels[SPEC_HASH])
        if made == now and key in self.agent.store.rejected:
            self.world.violations.append(f"{self.node} applied a version it rejected: {key}")

    def _boot(self, container, by_docker: bool = False) -> None:
        """Quay's entrypoint against the world. `by_docker`: Docker's restart policy started it,
        not the agent (a start into a failed migration then is Docker's, and the agent's watch
        must recreate it with `registry-nomigrate`)."""
        world, labels = self.world, container.labels
        tag = labels.get(IMAGE_TAG, "")
        version = canary.version_of(tag)
        migrating = not (container.spec and container.spec.command)
        container.healthy = False
        if labels.get(STACK_VERSION) in world.bad_stacks:
            container.logs = "Running init script 'd_validate_config_bundle.sh'\nFAILED"
            container.status = "exited"
            return
        if migrating:
            container.logs = "Running init script 'runmigration.sh'\n"
            if version < world.database and by_docker:
                container.logs += "FAILED: Can't locate revision"
                container.status = "exited"
                return
            if version < world.database:
                world.violations.append(
                    f"{self.node} started {tag} with `registry` against a database at "
                    f"{world.database}: Can't locate revision")
                container.logs += "FAILED: Can't locate revision"
                container.status = "exited"
                return
            record = self.agent.cluster.leases.record() or {}
            if version > world.database and not by_docker and \
                    (record.get("image"), record.get("canary")) != (labels[IMAGE_DIGEST],
                                                                    self.node):
                # Checked when the agent starts it: a start Docker retries through an outage
                # migrates later, when the claim may have moved on to a newer image.
                world.violations.append(f"{self.node} started {tag} to migrate the database "
                                        f"without being its canary: {record}")
            if version > world.database and world.database_down:
                # It cannot reach the database: Docker restarts it until it can (database_back).
                container.pending_migration = True
            elif version > world.database:
                world.database = version
                world.migrations.append((tag, self.node))
        if labels.get(IMAGE_DIGEST) in world.bad_images:
            container.logs += "Traceback: the image is broken"
            return  # runs, unhealthy
        container.healthy = True

    def database_back(self) -> None:
        """The database answers again: a Quay that Docker kept restarting migrates now."""
        found = self.named("quay")
        if found is not None and found.status == "running" and \
                getattr(found, "pending_migration", False):
            found.pending_migration = False
            self._boot(found, by_docker=True)  # one of Docker's restarts got through

    def quay(self, name: str = "quay"):
        return self.named(name)


def answers(container, world: World) -> bool:
    return bool(container is not None and container.status == "running"
                and getattr(container, "healthy", False) and not world.database_down)


class ModelPass(FakePass):
    """A pipeline pass that reads the world's source when it prepares (as a fetch does) and
    whose health wait is one of the cluster's turns."""

    def __init__(self, cfg, docker, store, world: World, turn) -> None:
        super().__init__(cfg, docker, store, world.release())
        self.world, self.turn = world, turn

    def prepare(self):
        self.release = self.world.release()
        return super().prepare()

    def endtoend(self):
        if self.world.database_down:
            return health.Probe(False, 503, {"database": False, "redis": True},
                                error="HTTP 503, failing: database")
        return self.shared

    def wait_healthy(self, container_id: str):
        self.waited.append(container_id)
        self.turn(TURN)
        found = self.docker.containers.get(container_id)
        if answers(found, self.world):
            return probe(True)
        if self.world.database_down:
            found_version = found.labels[STACK_VERSION] if found is not None else ""
            key = (self.docker.node, found_version)
            self.world.outage_failures[key] = self.world.outage_failures.get(key, 0) + 1
            return health.Probe(False, 503, {"database": False, "web_gunicorn": True},
                                error="HTTP 503, failing: database")
        return probe(False)


class Agent:
    """One node's agent: the real Node and Roll, with its Docker, stack folder and a thread
    for the roll in progress that runs only when the cluster gives it a turn."""

    def __init__(self, cluster: "Cluster", name: str, docker: ModelDocker,
                 store: FakeStackStore) -> None:
        self.cluster, self.name, self.docker, self.store = cluster, name, docker, store
        self.world = cluster.world
        self.cfg = make_config(f"rollout: {{max_unavailable: {cluster.max_unavailable}, "
                               f"lease_ttl: {TTL:g}}}")
        self.alive = True
        self.outcomes: list = []
        self.thread: Optional[threading.Thread] = None
        self._go, self._back = threading.Semaphore(0), threading.Semaphore(0)
        self.running_roll = False
        self.roll = ModelRoll(lambda stack: cluster.leases, name, self.turn,
                              clock=self.world.clock, poll=TURN)
        self.roll.agent = self
        docker.agent = self
        self.node = Node(self.roll, status.Board(), FakeSystemd(), lambda seen: None,
                         lambda: None, self.world.clock, self._spawn, self.outcomes.append)

    # -- turns ---------------------------------------------------------------------------------
    def turn(self, seconds: float) -> None:
        """A wait inside the roll: the turn goes back to the cluster until it resumes this one."""
        if threading.current_thread() is not self.thread:
            self.cluster.tick(seconds)  # the first pass, on the loop's thread: time passes for
            return  # every node (their keepers renew their leases meanwhile)
        self._back.release()
        self._go.acquire()
        if not self.alive:
            raise _Killed()

    def _spawn(self, fn) -> None:
        def body() -> None:
            self._go.acquire()
            try:
                fn()
            except _Killed:
                return
            finally:
                self.running_roll = False
                self._back.release()

        self.running_roll = True
        self.thread = threading.Thread(target=body, name=f"roll-{self.name}", daemon=True)
        self.thread.start()

    def resume(self) -> None:
        self._go.release()
        if not self._back.acquire(timeout=20):
            raise AssertionError(f"{self.name}'s roll did not yield within 20 s")

    # -- what the daemon's loop does -------------------------------------------------------------
    def first_pass(self) -> None:
        """The agent (re)starts; a first pass that fails ends it, and systemd starts it again
        (Restart=always) at its next step."""
        try:
            self.node.first_pass(ModelPass(self.cfg, self.docker, self.store, self.world,
                                           self.turn))
        except Exception:  # noqa: BLE001 - the CLI exits non-zero
            self.node.live = None

    def step(self) -> None:
        """The loop's next beat: a roll in progress runs to its next wait; otherwise the watch
        judges Quay (a restart when it exited) and a refresh starts a roll."""
        if self.node.live is None:
            self.first_pass()
        elif self.running_roll:
            if not (self.node.held or self.node.replacing.is_set()):
                self.watch_crash()  # the watch goes on while a roll waits (invariant 6)
            self.resume()
        elif self.outcomes:
            self.node.finish_roll(self.outcomes.pop())
        else:
            found = self.docker.quay()
            if not self.node.held:  # a held node is out of service: the watch waits
                if found is None or found.status != "running":
                    self.node.restart(watchdog.Restart("exited", exited=found is not None,
                                                       recreate=found is None),
                                      watchdog.State())
                    return
                phase = "healthy" if answers(found, self.world) else (
                    "shared-outage" if self.world.database_down else "failing")
                if phase == "healthy":
                    self.node.healthy()
                self.node.first_verdict(phase)
            self.node.start_roll(lambda cfg: ModelPass(cfg, self.docker, self.store, self.world,
                                                       self.turn), self.cfg, "refresh")
            if self.running_roll:
                self.resume()
        if not self.running_roll and self.outcomes:
            self.node.finish_roll(self.outcomes.pop())

    def watch_crash(self) -> None:
        found = self.docker.quay()
        if found is not None and found.status != "running":
            self.node.restart(watchdog.Restart("exited", exited=True), watchdog.State())
            if self.docker.quay() is None or self.docker.quay().status != "running" and \
                    self.docker.quay().labels.get(STACK_VERSION) not in self.world.bad_stacks:
                self.world.violations.append(f"{self.name}: an exited Quay was not restarted "
                                             "while a roll waited")

    def out_of_service(self) -> bool:
        """Taken out by this agent: a replacement in progress, or held."""
        return bool(self.node.replacing.is_set() or self.node.held)

    def kill(self) -> None:
        """kill -9: the roll in progress never runs again (no finally, no release)."""
        self.alive = False


class ModelRoll(Roll):
    """The real Roll, whose budgets say which agent took them: a lease is kept alive by its
    agent's keeper (Budget.keep, patched by Cluster) only while that agent lives."""

    agent: Agent

    def budget(self, cfg, act: str = "roll"):
        budget = super().budget(cfg, act)
        budget.agent = self.agent
        kept, release = self.agent.cluster.kept, budget.release

        def keep(slot: int, reason: str = "") -> None:
            kept.append((budget, slot))

        def released(slot: int) -> None:
            if (budget, slot) in kept:
                kept.remove((budget, slot))
            release(slot)

        budget.keep, budget.release = keep, released
        return budget


class _Killed(BaseException):
    """Ends an abandoned roll thread at teardown without running the agent's handlers."""


class Cluster:
    def __init__(self, size: int = 3, max_unavailable: int = 1) -> None:
        self.world = World()
        self.leases = MemoryLeases()
        self.max_unavailable = max_unavailable
        self.agents: List[Agent] = []
        self.all: List[Agent] = []  # killed ones too: their threads end at close
        self.kept: List[tuple] = []  # (budget, slot) kept alive
        for index in range(size):
            name = f"node-{index + 1}"
            agent = Agent(self, name, ModelDocker(self.world, name), FakeStackStore())
            self.all.append(agent)
            agent.first_pass()
            self.agents.append(agent)

    def restart_agent(self, index: int) -> None:
        old = self.agents[index]
        old.kill()
        agent = Agent(self, old.name, old.docker, old.store)
        self.all.append(agent)
        self.agents[index] = agent  # before its first pass, which may touch Docker
        agent.first_pass()
        if agent.node.live is not None and agent.docker.quay() is None:  # invariant 7
            self.world.violations.append(f"{agent.name}: no Quay after the agent restarted")
        self.agents[index] = agent

    def tick(self, seconds: float) -> None:
        """Time passes; each live agent's keeper renews the leases it holds, as its thread would
        every third of the ttl."""
        while seconds > 0:
            step = min(seconds, TTL / 3)
            self.world.now += step
            seconds -= step
            for budget, slot in list(self.kept):
                for _ in range(40):  # Budget.keep tries again RENEW_RETRY after a blink
                    if not budget.agent.alive:
                        break
                    try:
                        budget.renew(slot)
                        break
                    except OSError:
                        continue

    def database(self, down: bool) -> None:
        self.world.database_down = down
        if not down:
            for agent in self.agents:
                agent.docker.database_back()

    def settle(self, until=lambda: False, rounds: int = 200) -> None:
        """Changes have stopped: every agent moves and time passes, round after round (200 of
        10 s: past any backoff and lease), until `until()` says it is over."""
        for _ in range(rounds):
            for agent in self.agents:
                agent.step()
            self.tick(TURN)
            if until():
                return

    def explains(self, agent: Agent, target: Release) -> bool:
        """Whether a node not on `target` says why: held, the stack or image rejected here,
        the canary failed on the image, or the target is broken (the ground truth)."""
        world = self.world
        if target.version in world.bad_stacks or target.digest in world.bad_images:
            return True
        record = self.leases.record() or {}
        if record.get("image") == target.digest and record.get("state") in canary.FAILED:
            return True
        snapshot = agent.node.board.snapshot()  # what /status says: not applied, and why
        return bool(agent.node.held or snapshot.get("not_applied") or any(
            version == target.version for version, _, _ in agent.store.rejected))

    def close(self) -> None:
        for agent in self.all:
            agent.alive = False
            if agent.running_roll:
                agent._go.release()

    def out_of_service(self) -> List[str]:
        return [a.name for a in self.agents if a.out_of_service()]
