"""The rollout leases on real stores: `stores.open_leases(stack)` + `rollout.Budget`, the way a node
opens them, with nodes racing as threads.

Stores: moto and SeaweedFS (S3 conditional writes: IfNoneMatch="*", IfMatch=<etag>) and
fake-gcs-server (GCS if_generation_match; the old GCS emulator ignored preconditions, so this is
the first proof for GCS). Over HTTPS with a private CA on SeaweedFS: the leases use
stack.ca_bundle like the fetch (the fetch's side is in test_fetch.py).
"""
from __future__ import annotations

import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple

import pytest

from quay_bootstrap import stores
from quay_bootstrap.budget import Budget, LeaseBody
from quay_bootstrap.config import StackConfig
from tests.integration.conftest import PREFIX
from tests.integration.stores_fixtures import CA_VARIABLES, isolate_aws_env, seaweedfs_keys

# seaweedfs_bucket, fake_gcs_bucket, seaweedfs_tls
pytest_plugins = ["tests.integration.stores_fixtures"]

NODES = 8


def released(got) -> bool:
    """A released slot: gone, or left behind already expired (release is a conditional
    replace, so a node that took an overrun lease over keeps it)."""
    return got is None or LeaseBody.decode(got[0]).expires <= time.time()


@pytest.fixture(params=["moto", "seaweedfs", "fake_gcs"])
def lease_stack(request, monkeypatch) -> StackConfig:
    """The stack settings of a cluster whose stack (and so whose leases) live on that store."""
    if request.param == "moto":
        request.getfixturevalue("s3")  # resets moto and clears the developer's AWS_* variables
        bucket = request.getfixturevalue("s3_bucket")
        for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
            monkeypatch.setenv(name, value)
        return StackConfig(source=f"s3://{bucket}/{PREFIX}",
                           endpoint_url=request.getfixturevalue("moto_endpoint"), region="us-east-1")
    if request.param == "seaweedfs":
        bucket = request.getfixturevalue("seaweedfs_bucket")
        return StackConfig(source=f"s3://{bucket}/{PREFIX}",
                           endpoint_url=request.getfixturevalue("testbed")["seaweedfs_endpoint"],
                           region="us-east-1")
    # GCS: the stores' client honours STORAGE_EMULATOR_HOST (set by the fake_gcs fixture) and
    # is then anonymous, as every Google client is.
    bucket = request.getfixturevalue("fake_gcs_bucket")
    return StackConfig(source=f"gs://{bucket}/{PREFIX}")


def race(count: int, work):
    """Run work(i) for i in range(count) on as many threads, released at once; their results
    (an exception in any thread is raised here)."""
    barrier = threading.Barrier(count)

    def run(i):
        barrier.wait(timeout=30)
        return work(i)

    with ThreadPoolExecutor(max_workers=count) as pool:
        return [f.result(timeout=120) for f in [pool.submit(run, i) for i in range(count)]]


def test_leases_live_beside_the_stack_on_the_store(lease_stack):
    leases = stores.open_leases(lease_stack)
    budget = Budget(leases, "node-a", slots=1, ttl=60)
    assert budget.try_acquire("a roll") == 0
    body, _ = leases.get("lease-0")
    assert LeaseBody.decode(body).holder == "node-a"
    assert Budget(stores.open_leases(lease_stack), "node-b", slots=1, ttl=60).try_acquire() is None
    # The source beside the leases sees none of them: they are outside the stack's prefix.
    source = stores.open_source(lease_stack.source, lease_stack)
    assert source.url + ".rollout" == leases.url
    budget.release(0)
    assert released(leases.get("lease-0"))


def test_a_conditional_create_has_exactly_one_winner(lease_stack):
    """NODES nodes create the same lease at the same instant: the store lets exactly one in."""
    nodes = [stores.open_leases(lease_stack) for _ in range(NODES)]
    won = race(NODES, lambda i: nodes[i].create("lease-0", f"node-{i}".encode()))
    assert sum(won) == 1, won
    assert nodes[0].get("lease-0")[0] == f"node-{won.index(True)}".encode()


def test_at_most_one_node_holds_the_budget_at_any_moment(lease_stack):
    """max_unavailable=1: NODES nodes, each taking the budget ROUNDS times and holding it a
    moment. Each holding is recorded from try_acquire's return to just before release, an
    interval inside the real holding: two that overlap would be two holders at once."""
    rounds, hold = 3, 0.02
    budgets = [Budget(stores.open_leases(lease_stack), f"node-{i}", slots=1, ttl=60)
               for i in range(NODES)]
    guard = threading.Lock()
    holders: List[int] = []
    held: List[Tuple[float, float, int]] = []
    refused = [0] * NODES
    most = [0]

    def node(i):
        for _ in range(rounds):
            while (slot := budgets[i].try_acquire("exclusivity test")) is None:
                refused[i] += 1
                time.sleep(random.uniform(0, 0.01))
            began = time.monotonic()
            with guard:
                holders.append(i)
                most[0] = max(most[0], len(holders))
            time.sleep(hold)
            with guard:
                holders.remove(i)
            held.append((began, time.monotonic(), i))
            budgets[i].release(slot)

    started = time.monotonic()
    race(NODES, node)
    assert most[0] == 1
    held.sort()
    overlaps = [(a, b) for a, b in zip(held, held[1:]) if b[0] < a[1]]
    assert overlaps == []
    assert sorted(i for _, _, i in held) == sorted(list(range(NODES)) * rounds)
    assert sum(refused) >= NODES - 1, "the nodes never contended: the test proved nothing"
    assert released(stores.open_leases(lease_stack).get("lease-0"))  # all given back
    assert time.monotonic() - started < 60


def _ghost(leases, expired_seconds_ago: float = 60) -> None:
    """A lease left by a node that died mid-roll, expired."""
    body = LeaseBody("ghost", time.time() - expired_seconds_ago, "died mid-roll").encode()
    assert leases.create("lease-0", body)


def test_an_expired_lease_is_taken_over_exactly_once(lease_stack):
    _ghost(stores.open_leases(lease_stack))
    budgets = [Budget(stores.open_leases(lease_stack), f"node-{i}", slots=1, ttl=60)
               for i in range(NODES)]
    got = race(NODES, lambda i: budgets[i].try_acquire("take-over"))
    winners = [i for i, slot in enumerate(got) if slot is not None]
    assert len(winners) == 1 and got[winners[0]] == 0, got
    body, _ = stores.open_leases(lease_stack).get("lease-0")
    assert LeaseBody.decode(body).holder == f"node-{winners[0]}"
    # Nobody else can take it now: it is live again.
    assert all(b.try_acquire() is None for i, b in enumerate(budgets) if i != winners[0])


class _Interleaved:
    """A node's real lease store, with what another node does between this node's next read
    of a lease and its following write run in that gap, once."""

    def __init__(self, store):
        self.store, self.gap = store, None

    def get(self, key: str) -> Optional[Tuple[bytes, str]]:
        got = self.store.get(key)
        if self.gap:
            gap, self.gap = self.gap, None
            gap()
        return got

    def create(self, key, data):
        return self.store.create(key, data)

    def replace(self, key, data, token):
        return self.store.replace(key, data, token)

    def delete(self, key):
        return self.store.delete(key)


def test_releasing_an_overrun_lease_never_deletes_the_take_over(lease_stack):
    """Node A overran its lease (expired) and releases it while node B takes it over. A's read
    still shows A's lease; B's conditional replace lands; A's delete must not remove B's lease
    (a conditional delete, or releasing by a conditional replace, would not)."""
    a_store = _Interleaved(stores.open_leases(lease_stack))
    slow = Budget(a_store, "node-a", slots=1, ttl=60, clock=lambda: time.time() - 120)
    b = Budget(stores.open_leases(lease_stack), "node-b", slots=1, ttl=60)
    c = Budget(stores.open_leases(lease_stack), "node-c", slots=1, ttl=60)
    assert slow.try_acquire("a roll that overran") == 0  # written already expired
    taken: Dict[str, Optional[int]] = {}
    a_store.gap = lambda: taken.update(b=b.try_acquire("take-over"))
    slow.release(0)
    assert taken["b"] == 0
    body = stores.open_leases(lease_stack).get("lease-0")
    assert body is not None and LeaseBody.decode(body[0]).holder == "node-b"
    assert c.try_acquire() is None  # B still holds the only slot


# --- HTTPS with a private CA (SeaweedFS's S3 over TLS) ----------------------------------------

@pytest.fixture
def tls_stack(seaweedfs_tls, seaweedfs_bucket, testbed, monkeypatch, tmp_path):
    """Stack settings on SeaweedFS over HTTPS, without ca_bundle; nothing in the environment
    (AWS_CA_BUNDLE, REQUESTS_CA_BUNDLE, SSL_CERT_FILE, ~/.aws/config) trusts the private CA."""
    isolate_aws_env(monkeypatch, tmp_path, seaweedfs_keys(testbed))
    return StackConfig(source=f"s3://{seaweedfs_bucket}/{PREFIX}",
                       endpoint_url=seaweedfs_tls["endpoint"], region="us-east-1")


def test_leases_over_https_use_the_stacks_ca_bundle(tls_stack, seaweedfs_tls):
    stack = tls_stack.model_copy(update={"ca_bundle": seaweedfs_tls["ca"]})
    budget = Budget(stores.open_leases(stack), "node-a", slots=1, ttl=60)
    assert budget.try_acquire("over https") == 0
    assert Budget(stores.open_leases(stack), "node-b", slots=1, ttl=60).try_acquire() is None
    budget.release(0)
    assert released(stores.open_leases(stack).get("lease-0"))


def test_leases_over_https_without_the_ca_bundle_fail_on_the_certificate(tls_stack, seaweedfs_tls,
                                                                         monkeypatch):
    import botocore.exceptions

    assert not any(name in os.environ for name in CA_VARIABLES)
    budget = Budget(stores.open_leases(tls_stack), "node-a", slots=1, ttl=60)
    with pytest.raises(botocore.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
        budget.try_acquire("over https")
    # The control: what an operator's AWS_CA_BUNDLE would have done (so the refusal above is
    # the missing CA, not a broken endpoint).
    monkeypatch.setenv("AWS_CA_BUNDLE", seaweedfs_tls["ca"])
    trusting = Budget(stores.open_leases(tls_stack), "node-a", slots=1, ttl=60)
    assert trusting.try_acquire("over https") == 0
    trusting.release(0)
