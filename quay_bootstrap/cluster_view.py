"""`quay-bootstrap cluster`: every node's last record, the leases, the canary and database records
and the published version, read from the object store alone. `view`, `exit_code` and `render`
are pure; `read_cluster` reads the store."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from quay_bootstrap.node_record import PREFIX, STALE_AFTER


@dataclass(frozen=True)
class NodeView:
    name: str
    record: Dict[str, Any]
    age: float
    stale: bool
    healthy: bool
    on_target: bool  # on the published version (or, with none, on the one most nodes run)


@dataclass(frozen=True)
class ClusterView:
    nodes: List[NodeView]
    target: Optional[str]  # the stack version every node should run
    published: Optional[Dict[str, Any]] = None  # the pointer's summary, when one exists
    leases: Dict[str, Any] = field(default_factory=dict)
    upgrade: Optional[Dict[str, Any]] = None
    database: Optional[Dict[str, Any]] = None


def view(records: Dict[str, Dict[str, Any]], now: float, published: Optional[Dict[str, Any]] = None,
         leases: Optional[Dict[str, Any]] = None, upgrade=None, database=None,
         stale_after: float = STALE_AFTER) -> ClusterView:
    """RECORDS by node name. A node silent for STALE_AFTER is stale: shown, never dropped, and
    not counted as healthy. Without a published version the target is the version most fresh
    nodes run."""
    ages = {name: now - float(rec.get("at", 0)) for name, rec in records.items()}
    fresh = [rec for name, rec in records.items() if ages[name] <= stale_after]
    target = (published or {}).get("version")
    if target is None and fresh:
        counts: Dict[str, int] = {}
        for rec in fresh:
            counts[rec.get("stack_version")] = counts.get(rec.get("stack_version"), 0) + 1
        target = max(sorted(counts, key=str), key=counts.__getitem__)
    nodes = []
    for name in sorted(records):
        rec, stale = records[name], ages[name] > stale_after
        healthy = not stale and rec.get("state") == "healthy" and not rec.get("held") and \
            not rec.get("marked_unhealthy") and not rec.get("draining")
        nodes.append(NodeView(name, rec, ages[name], stale, healthy,
                              rec.get("stack_version") == target))
    return ClusterView(nodes, target, published, dict(leases or {}), upgrade, database)


def exit_code(cluster: ClusterView) -> int:
    """0 when there is a fresh node and every fresh node is healthy on the target version."""
    fresh = [n for n in cluster.nodes if not n.stale]
    return 0 if fresh and all(n.healthy and n.on_target for n in fresh) else 1


def as_json(cluster: ClusterView) -> str:
    return json.dumps({
        "ok": exit_code(cluster) == 0, "target": cluster.target, "published": cluster.published,
        "nodes": [{"name": n.name, "age": round(n.age, 1), "stale": n.stale, "healthy": n.healthy,
                   "on_target": n.on_target, **n.record} for n in cluster.nodes],
        "leases": cluster.leases, "upgrade": cluster.upgrade, "database": cluster.database},
        indent=1, sort_keys=True, default=str)


def render(cluster: ClusterView) -> List[str]:
    """The view as an operator reads it: one line per node, then the records."""
    def short(value) -> str:
        text = str(value or "-")
        return text.split(":")[-1][:12] if text != "-" else text

    pub = cluster.published
    out = [f"published: {short(pub['version'])} (serial {pub.get('serial')}, {pub.get('by')}, "
           f"{pub.get('at')})" if pub else
           f"published: nothing (hand-uploaded stack; target {short(cluster.target)})",
           f"{'node':<32} {'state':<10} {'stack':<12} {'image':<12} {'age':>7}  notes"]
    for n in cluster.nodes:
        rec = n.record
        notes = [word for word, on in (("STALE", n.stale), ("held", rec.get("held")),
                                       ("degraded", rec.get("degraded")),
                                       ("draining", rec.get("draining")),
                                       ("marked", rec.get("marked_unhealthy")),
                                       ("not on target", not n.on_target)) if on]
        if isinstance(rec.get("held"), str):
            notes.append(f"held: {rec['held']}")
        change = rec.get("last_change") or {}
        if isinstance(change, dict) and change.get("result"):
            notes.append(f"last change {change.get('result')}")
        out.append(f"{n.name[:32]:<32} {str(rec.get('state', '?'))[:10]:<10} "
                   f"{short(rec.get('stack_version')):<12} {short(rec.get('image_digest')):<12} "
                   f"{n.age:>6.0f}s  {', '.join(notes)}")
    for name, lease in sorted(cluster.leases.items()):
        out.append(f"{name}: {lease.get('holder', lease) if isinstance(lease, dict) else lease}")
    if cluster.upgrade:
        out.append(f"canary: {cluster.upgrade.get('canary')} {cluster.upgrade.get('state')} "
                   f"({cluster.upgrade.get('tag') or cluster.upgrade.get('image')})")
    if cluster.database:
        out.append(f"database migrated by: {cluster.database.get('tag') or cluster.database.get('image')}")
    out.append("ok: every fresh node is healthy on the target version" if exit_code(cluster) == 0
               else "NOT ok: a fresh node is not healthy on the target version (or none is fresh)")
    return out


def read_cluster(stack, now: Optional[float] = None, url: Optional[str] = None) -> ClusterView:
    """Everything under `<source>.rollout/` (records, leases, canary, database) and the
    published pointer, on one client."""
    from quay_bootstrap.errors import SourceError
    from quay_bootstrap.stack.published import open_published, read_pointer
    from quay_bootstrap.stores import lease_prefix, provider

    source = url or stack.source
    where = lease_prefix(source)
    module = provider(where)
    client = module.client(where, stack, 4)
    rollout = module.Source(where, client)
    try:
        listed = rollout.list(10_000)
    except SourceError as err:  # file://: no node has written anything yet
        if not where.startswith("file://") or "directory does not exist" not in str(err):
            raise
        listed = []
    records: Dict[str, Dict[str, Any]] = {}
    leases: Dict[str, Any] = {}
    upgrade = database = None
    for obj in listed:
        if obj.size > 1 << 20:
            continue  # not ours
        try:
            doc = json.loads(rollout.read(obj).data)
        except ValueError:
            continue
        if obj.key.startswith(PREFIX) and obj.key.endswith(".json") and isinstance(doc, dict):
            records[doc.get("node") or obj.key[len(PREFIX):-5]] = doc
        elif obj.key.startswith("lease-"):
            leases[obj.key] = doc
        elif obj.key == "upgrade":
            upgrade = doc
        elif obj.key == "database":
            database = doc
    pointer = read_pointer(open_published(stack, source, client=client))
    return view(records, time.time() if now is None else now,
                pointer.summary() if pointer else None, leases, upgrade, database)


def run_cluster(stack, as_json_output: bool, wait: Optional[float], out, url=None,
                poll: float = 5.0, sleep=time.sleep, clock=time.monotonic) -> int:
    """Print the view; with WAIT, read again every POLL seconds until it is ok or WAIT is up."""
    give_up = clock() + (wait or 0)
    while True:
        cluster = read_cluster(stack, url=url)
        code = exit_code(cluster)
        if code == 0 or wait is None or clock() >= give_up:
            break
        sleep(poll)
    out.write((as_json(cluster) + "\n") if as_json_output else "\n".join(render(cluster)) + "\n")
    return code
