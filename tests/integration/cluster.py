"""A three-node Quay cluster on this one machine, for tests/integration/test_cluster.py.

Each node is an agent of its own (its own process, config, stack folder, status endpoint and
identity: an IMDSv2 stand-in answering its own instance id of one Auto Scaling group on moto)
running the Quay stand-in with host networking on a port of its own. The nodes share what a
real cluster shares: one PostgreSQL database (reached through a SlowProxy, so a test can slow
it), one Redis, one SeaweedFS bucket, and the stack in one object-store prefix with the
leases and the upgrade record beside it. `Sampler` records, every 50 ms, how many nodes do not
answer 200 on /health/instance.
"""
from __future__ import annotations

import bisect
import contextlib
import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from typing import Dict, List, Optional, Tuple

from docker import errors as docker_errors

from tests.integration.asg_standin import AsgStandIn, make_group
from tests.integration.conftest import Agent, Daemon, RealQuay, StandinNode, wait_for
from tests.testbed import faults

# The agents' settings: probes every second, the probe timeout left at the agent's default
# (it must allow for Quay's own worst case), short start period and backoff.
HEALTH = {"interval": "1s", "failure_threshold": 2, "start_period": "5s", "timeout": None}
RESTART = {"backoff_initial": "1s", "backoff_max": "4s", "unhealthy_after": 3, "window": "10m"}
ROLLOUT = {"max_unavailable": 1, "lease_ttl": "30s"}
REFRESH = "1s"
CANARY_CONTROL = "/control/canary"  # where a node's canary-only local faults are written


class ClusterNode(StandinNode):
    """A stand-in node whose config.yaml reaches the database through DSN (the proxy), with
    an identity of its own (IMDS), and every incarnation of its agent kept (`runs`)."""

    def __init__(self, *args, dsn: str, imds, moto: str, **kwargs):
        self.dsn = dsn
        super().__init__(*args, **kwargs)
        self.imds = imds
        self.report.update({"autoscaling": "auto"})
        self.identity = {"AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.url + "/",
                         "AWS_ENDPOINT_URL": moto}
        self.runs: List[Daemon] = []
        # Systemd's socket (conftest.held_socket), passed to every agent run, when set.
        self.listen_socket: Optional[socket.socket] = None
        canary = self.control / "canary"
        canary.mkdir()
        canary.chmod(0o777)

    @property
    def holder(self) -> str:
        """This node's name in the leases and the upgrade record."""
        return f"{self.imds.instance_id}:{self.name}"

    def config_yaml(self, **overrides) -> bytes:
        return super().config_yaml(**{"DB_URI": self.dsn, **overrides})

    def setup(self, *, image_tag: Optional[str] = None, env: Optional[dict] = None,
              health: Optional[dict] = None, rollout: Optional[dict] = None) -> None:
        """Write the agent config: the cluster's settings, IMAGE_TAG, extra container ENV,
        HEALTH and ROLLOUT settings over the cluster's."""
        if image_tag:
            self.image = {"reference": self.images[image_tag]}
        container = {"env": dict(env or {})}
        self.container = {}
        self.health = {}
        self.configure(health={**HEALTH, **(health or {})}, restart=dict(RESTART),
                       rollout={**ROLLOUT, **(rollout or {})}, container=container,
                       refresh_interval=REFRESH)

    @property
    def agent_run(self) -> Daemon:
        return self.runs[-1]

    def start_agent(self) -> Daemon:
        made = Daemon(self, self.identity, self.listen_socket)
        self.runs.append(made)
        return made

    def kill_agent(self, sig=signal.SIGKILL) -> None:
        proc = self.agent_run.proc
        if proc.poll() is None:
            proc.send_signal(sig)
        proc.wait(timeout=15)

    def log(self) -> str:
        """What every incarnation of this node's agent logged."""
        return "".join(run.log for run in self.runs)

    def events(self, name: str, since: float = 0.0) -> List[dict]:
        return [e for e in parse_events(self.log(), name) if e["at"] >= since]

    def container_starts(self, since: float) -> List[Tuple[float, str, str]]:
        """(unix time, image id, container id) of each start under the node's name since SINCE."""
        got = self.docker.api.events(since=int(since) - 1, until=int(time.time()) + 1, decode=True,
                                     filters={"type": "container", "event": "start"})
        return [(e["timeNano"] / 1e9, e["Actor"]["Attributes"].get("image"), e["id"])
                for e in got if e["Actor"]["Attributes"].get("name") == self.name
                and e["timeNano"] / 1e9 >= since]

    def quay_logs_all(self) -> str:
        """The logs of every container whose name starts with the node's (an aside copy too)."""
        out = []
        for item in self.docker.api.containers(all=True, filters={"name": self.name}):
            if item["Names"][0].lstrip("/").startswith(self.name):
                try:
                    out.append(self.docker.api.logs(item["Id"]).decode(errors="replace"))
                except docker_errors.NotFound:
                    pass  # removed by the agent meanwhile
        return "\n".join(out)

    def containers(self) -> List[str]:
        # One listing, no inspect per container: the agent may remove one in between.
        found = self.docker.api.containers(all=True, filters={"name": self.name})
        return sorted(f"{c['Names'][0].lstrip('/')}:{c['State']}" for c in found
                      if c["Names"][0].lstrip("/").startswith(self.name))

    def serving(self, timeout: float = 1.0) -> bool:
        return probe(self.port, timeout)


class RealClusterNode(RealQuay, ClusterNode):
    """A cluster node whose Quay is real Quay (tests/testbed/real_quay.py): its boot takes
    seconds to minutes on this 2-core machine (three nodes importing Quay at once), so a
    longer start period than the stand-in's."""

    def setup(self, *, health: Optional[dict] = None, rollout: Optional[dict] = None,
              **kwargs) -> None:
        # The lease outlives a replacement: stop_timeout (5 s here) + start_period.
        super().setup(health={"start_period": "180s", **(health or {})},
                      rollout={"lease_ttl": "200s", **(rollout or {})}, **kwargs)


def parse_events(text: str, name: str) -> List[dict]:
    found = []
    for line in text.splitlines():
        if f'"{name}"' not in line:
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") != name:
            continue
        event["at"] = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
        found.append(event)
    return found


def probe(port: int, timeout: float = 1.0) -> bool:
    """True when the node answers 200 on /health/instance within TIMEOUT."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/instance",
                                    timeout=timeout) as answer:
            answer.read()
            return answer.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False
    except Exception:  # noqa: BLE001 - http.client's RemoteDisconnected and such: not 200
        return False


@dataclass
class Sampler:
    """One thread per node probes /health/instance every PERIOD (TIMEOUT each; a timeout is a
    "down"); `worst()` reads the record on a PERIOD grid: at each instant a node counts as
    down when the latest probe that began at or before it did not answer 200 (so a probe
    still waiting counts from when it began)."""

    nodes: List[ClusterNode]
    period: float = 0.05
    timeout: float = 1.0
    _samples: Dict[str, List[Tuple[float, bool]]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: List[threading.Thread] = field(default_factory=list)

    def start(self) -> "Sampler":
        for node in self.nodes:
            self._samples[node.name] = []
            thread = threading.Thread(target=self._run, args=(node,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _run(self, node: ClusterNode) -> None:
        record = self._samples[node.name]
        while not self._stop.is_set():
            began = time.time()
            record.append((began, probe(node.port, self.timeout)))
            self._stop.wait(max(0.0, began + self.period - time.time()))

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)

    def down_at(self, at: float) -> List[str]:
        down = []
        for name, record in self._samples.items():
            index = bisect.bisect_right(record, (at, True)) - 1
            if index >= 0 and not record[index][1]:
                down.append(name)
        return down

    def worst(self, since: float = 0.0, until: Optional[float] = None) -> Tuple[int, float, list]:
        """(most nodes down at once, when, which) between SINCE and UNTIL (unix time)."""
        starts = [rec[0][0] for rec in self._samples.values() if rec]
        if len(starts) < len(self._samples):
            return 0, since, []
        at = max(since, max(starts))
        end = until if until is not None else time.time()
        best = (0, at, [])
        while at <= end:
            down = self.down_at(at)
            if len(down) > best[0]:
                best = (len(down), at, down)
            at += self.period
        return best


@contextlib.contextmanager
def running_cluster(*, s3, s3_bucket, s3_backend, docker_client, testbed, images, database: str,
                    bucket: str, tmp_path, monkeypatch, moto_endpoint: str, tag: str,
                    kind: type = None, boot: float = 60, sampling: Optional[dict] = None,
                    health: Optional[dict] = None, together: bool = False,
                    prepare=None):
    """Three healthy nodes on TAG (KIND: ClusterNode, the stand-in, or RealClusterNode), their
    agents started within BOOT seconds (the first alone creates the schema, unless TOGETHER:
    then the canary gate decides), HEALTH over the cluster's settings, PREPARE(node) called
    before each node's config is written, the sampler running (SAMPLING: its period and
    timeout); every agent stopped and container removed after."""
    proxy = faults.SlowProxy(("127.0.0.1", testbed["postgres_port"]), 0.0).__enter__()
    dsn = database.replace(f":{testbed['postgres_port']}/", f":{proxy.port}/")
    asg, instances = make_group(moto_endpoint, 4)
    imds = [AsgStandIn(moto_endpoint, instance) for instance in instances]
    spare = dict(backend=s3_backend, docker_client=docker_client, testbed=testbed,
                 images=images, tmp_path=tmp_path, monkeypatch=monkeypatch,
                 database=database, dsn=dsn, bucket=bucket, moto=moto_endpoint, imds=imds,
                 kind=kind)
    nodes = [make_node(i, imds=imds[i], tag=tag,
                       **{k: v for k, v in spare.items() if k != "imds"}) for i in range(3)]
    sampler = Sampler(nodes, **(sampling or {}))
    made = Cluster(nodes, sampler, proxy, testbed, s3, s3_bucket, asg, spare)
    try:
        for node in nodes:
            if prepare is not None:
                prepare(node)
            node.setup(health=health)
        if together:
            start_agents(nodes, boot)
        else:  # the first node alone creates the schema; then the other two
            start_agents(nodes[:1], boot)
            start_agents(nodes[1:], boot)
        wait_all(lambda n: n.serving(), nodes, 20, "every node serving")
        assert len({n.holder for n in nodes}) == 3
        sampler.start()
        wait_for(lambda: sampler.worst()[0] == 0 and sampler.down_at(time.time() - 0.1) == [],
                 10, "the sampler seeing every node up")
        made.began = time.time()
        yield made
    finally:
        sampler.stop()
        if os.environ.get("CLUSTER_LOGS"):  # every agent's log, for a look after a failure
            for node in nodes + made.extra:
                with open(os.path.join(os.environ["CLUSTER_LOGS"], node.name + ".log"), "w") as out:
                    out.write(node.log())
        for node in nodes + made.extra:
            for run in node.runs:
                if run.proc.poll() is None:
                    run.proc.send_signal(signal.SIGTERM)
        for node in nodes + made.extra:
            for run in node.runs:
                try:
                    run.proc.wait(timeout=15)
                except Exception:  # noqa: BLE001 - a wedged agent: end it
                    run.proc.kill()
            node.cleanup()
        for each in imds:
            each.close()
        proxy.__exit__(None, None, None)


def wait_all(check, nodes, timeout: float, what: str):
    return wait_for(lambda: all(check(n) for n in nodes), timeout,
                    lambda: what + "; containers: " + str([n.containers() for n in nodes])
                    + "\nlogs:\n" + "\n".join(n.log()[-2500:] for n in nodes), every=0.02)


def start_agents(nodes: List[ClusterNode], timeout: float = 60) -> None:
    for node in nodes:
        node.start_agent()

    def healthy(node: ClusterNode) -> bool:
        if node.agent_run.proc.poll() is not None:
            raise AssertionError(f"the agent of {node.name} exited:\n{node.log()[-3000:]}")
        return node.agent_run.status().get("state") == "healthy"

    wait_all(healthy, nodes, timeout, "every agent healthy")


def restarts_and_marks(node: ClusterNode) -> Tuple[int, int]:
    log = node.log()
    return log.count('"container.restarting"'), log.count('"instance.marking_unhealthy"')


def mixed(nodes) -> Dict[str, object]:
    """What the test report wants about each node, for assertion messages."""
    return {n.name: {"status": n.agent_run.status(), "containers": n.containers()} for n in nodes}


def make_node(index: int, *, backend, docker_client, testbed, images, tmp_path, monkeypatch,
              database: str, dsn: str, bucket: str, imds, moto: str, tag: str,
              kind: type = None) -> ClusterNode:
    """A node of the cluster; KIND: ClusterNode (the stand-in) or RealClusterNode."""
    folder = tmp_path / f"node{index}"
    folder.mkdir()
    agent = Agent(folder / "agent.yaml", folder / "stack", None, {})
    return (kind or ClusterNode)(agent, backend, docker_client, testbed, images, folder, monkeypatch,
                                 database=database, bucket=bucket, tag=tag, dsn=dsn, imds=imds,
                                 moto=moto)


@dataclass
class Cluster:
    """The three nodes, the sampler over them, and what they share."""

    nodes: List[ClusterNode]
    sampler: Sampler
    proxy: object  # faults.SlowProxy in front of PostgreSQL
    testbed: dict
    s3: object
    bucket: str
    asg: object
    spare: Dict[str, object]  # what make_node needs for a fourth node
    extra: List[ClusterNode] = field(default_factory=list)

    def rollout_records(self) -> Dict[str, dict]:
        """The objects beside the leases (conf/stack.rollout/...), JSON-decoded, by key."""
        found = {}
        listing = self.s3.list_objects_v2(Bucket=self.bucket, Prefix="conf/stack.rollout/")
        for item in listing.get("Contents", []):
            body = self.s3.get_object(Bucket=self.bucket, Key=item["Key"])["Body"].read()
            try:
                found[item["Key"].rsplit("/", 1)[-1]] = json.loads(body)
            except ValueError:
                found[item["Key"].rsplit("/", 1)[-1]] = {"unreadable": body.decode(errors="replace")}
        return found

    def upgrade(self, tag: Optional[str] = None) -> Optional[dict]:
        """The upgrade record (the canary and its verdict), or None; with TAG, only a record
        of that release (the first start's record of the old one says "healthy" until the
        upgrade's canary claims it: a wait for a verdict must not take that one)."""
        records = self.rollout_records()
        found = next((v for k, v in records.items() if "upgrade" in k), None)
        if tag is not None and (found or {}).get("tag") != tag:
            return None
        return found

    def health_statuses(self) -> Dict[str, str]:
        ids = [n.imds.instance_id for n in self.nodes + self.extra]
        found = self.asg.describe_auto_scaling_instances(InstanceIds=ids)["AutoScalingInstances"]
        return {i["InstanceId"]: i["HealthStatus"].upper() for i in found}

    def add_node(self, tag: str) -> ClusterNode:
        index = len(self.nodes) + len(self.extra)
        made = make_node(index, imds=self.spare["imds"][index], tag=tag,
                         **{k: v for k, v in self.spare.items() if k != "imds"})
        self.extra.append(made)
        return made


def verdict(record: Optional[dict]) -> str:
    """The upgrade record's state or verdict, lower case ("" when none)."""
    if not record:
        return ""
    return str(record.get("verdict") or record.get("state") or "").lower()


def passed(record: Optional[dict]) -> bool:
    return verdict(record) in ("healthy", "passed", "pass", "ok")


def failed(record: Optional[dict]) -> bool:
    return "fail" in verdict(record)


def trouble(node: ClusterNode) -> List[dict]:
    """The node's restart and unhealthy-mark events, for assertion messages."""
    return node.events("container.restarting") + node.events("instance.marking_unhealthy")


def sighup(nodes: List[ClusterNode], tries: int = 40) -> None:
    """SIGHUP each agent (it re-reads its config and rolls the change). An agent busy with a
    refresh's roll answers "rollout.busy ... tried again at the next refresh", but the refresh
    rolls the config it had, so that SIGHUP is lost (reported): it is sent again."""
    at = time.time()
    for node in nodes:
        node.agent_run.proc.send_signal(signal.SIGHUP)
    seen = {node.name: 0 for node in nodes}
    for _ in range(tries):
        time.sleep(0.5)
        again = []
        for node in nodes:
            busy = [e for e in node.events("rollout.busy", at) if e.get("why") == "SIGHUP"]
            if len(busy) > seen[node.name]:
                seen[node.name] = len(busy)
                again.append(node)
        if not again:
            return
        for node in again:
            node.agent_run.proc.send_signal(signal.SIGHUP)
