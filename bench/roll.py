"""Benchmark: a 3-node roll on the Quay stand-in, for a config change and an image upgrade, against the floor.

Usage: python bench/roll.py [--rounds 5] [--warmup 1] [--stop-timeout 10] [--json PATH] [--keep]

Set-up: stand-in images v3.9.0, v3.10.0, v3.11.0 (tests/testbed/quay_standin.py); one PostgreSQL
database, Redis, one SeaweedFS bucket for the shared stack prefix (conf/stack/, leases beside it)
and Quay's storage; three agents (`quay-bootstrap run`, max_unavailable 1, refresh 1 s) each
running a stand-in on v3.9.0 on its own port, host networking. The floor: a fourth stand-in (same
image, its own database) stopped and started through the engine API. Each round: a config roll
(robots.txt changes in the bucket) and a floor run; then, once each, upgrades to v3.10.0 and to
v3.11.0 (image.reference changed in every agent's config, SIGHUP to all three). Every node's
/health/instance is polled every 50 ms; its downtime runs from the first non-200 sent to the next
200 sent. Per roll: total time (change -> every node applied and 200), most nodes down at once,
each node's downtime, its phases (Docker's events); each node must run a new container with the
new stack or image, started once. Goal: each node's downtime 0.2 s or less over the floor's.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import time
from pathlib import Path

import common
from common import HOST, BenchError, Poller, quay_standin, stats, until

GOAL_EXTRA_S = 0.2
POLL_S = 0.05
NODES = 3
TAGS = ("v3.9.0", "v3.10.0", "v3.11.0")
BAD = ("rollout.failed", "rollout.rolling_back", "rollout.rolled_back", "rollout.stopped")


def gaps(samples: list, what: str) -> list[tuple[float, float]]:
    """Every run of non-200 answers: (first one sent, next 200 sent). Raises if one never ends."""
    found, down = [], None
    for sent, _, status in samples:
        if status != 200 and down is None:
            down = sent
        elif status == 200 and down is not None:
            found.append((down, sent))
            down = None
    if down is not None or not samples:
        raise BenchError(f"{what}: no 200 at the end ({len(samples)} answers)")
    return found


def most_down(spans: list[tuple[float, float]]) -> int:
    """The most of these intervals open at one moment."""
    now = top = 0
    for _, step in sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans]):
        now += step
        top = max(top, now)
    return top


def phases(events, since: float, old: str, new: str, down: list) -> dict:
    """An outage split by Docker's events: first non-200 -> die, die -> start, start -> 200."""
    die = events.after("die", since, old)
    start = events.after("start", die, new)
    return {"to_die": common.span(down[0][0], die), "die_to_start": common.span(die, start),
            "start_to_200": common.span(start, down[-1][1])}


def body(args, bed) -> dict:
    bed.on_seaweedfs()
    state, client = bed.state, bed.docker()
    images = quay_standin.build(client, state["registry"], TAGS)
    bed.events = common.DockerEvents(state["docker_host"], bed.prefix)
    databases = [quay_standin.create_database(state) for _ in range(2)]
    try:
        return measure(args, bed, images, databases)
    finally:
        for dsn in databases:
            quay_standin.drop_database(state, dsn)


def measure(args, bed, images: dict, databases: list) -> dict:
    stop_s = f"{args.stop_timeout}s"
    conf = quay_standin.config(bed.state, database=databases[0], bucket=bed.bucket)
    robots = b"User-agent: *\nDisallow: /\n"
    bed.upload({"config.yaml": json.dumps(conf).encode(), "robots.txt": robots})
    ports = [common.free_port() for _ in range(NODES + 1)]
    names = [f"{bed.prefix}-n{i}" for i in range(NODES)] + [f"{bed.prefix}-floor"]
    urls = [f"http://{HOST}:{port}/health/instance" for port in ports]
    agents = [common.Agent(
        bed, f"n{i}", names[i], ports[i], {"dir": str(bed.work / f"n{i}-stack"), "refresh_interval": "1s"},
        image={"reference": images[TAGS[0]]}, rollout={"max_unavailable": 1, "lease_ttl": "60s"},
        container={"env": {"QUAY_STANDIN_HTTP_PORT": str(ports[i]), "QUAY_STANDIN_MIGRATION_SECONDS": "0"},
                   "stop_timeout": stop_s, "volumes": [f"{bed.folder(f'n{i}-control')}:/control"]},
        health={"interval": "1s", "failure_threshold": 2, "start_period": "5s"}) for i in range(NODES)]
    floor_stack = quay_standin.write_stack(bed.work / "floor-stack", quay_standin.config(
        bed.state, database=databases[1], bucket=bed.bucket), {"robots.txt": robots})
    quay_standin.start(bed.docker(), images[TAGS[0]], floor_stack, http_port=ports[NODES],
                       control_dir=bed.work / "floor-control", name=names[NODES])
    for i, agent in enumerate(agents):
        agent.wait_healthy(timeout=120)
        common.wait_200(urls[i], 60, f"node {i}")
    common.wait_200(urls[NODES], 60, "the floor")

    def roll(what: str, act, check) -> dict:
        """Poll every node while act() changes the cluster, until every agent applied it and
        every node is 200; the figures, after check(node, before, after) of each node."""
        before = [bed.inspect(name) for name in names[:NODES]]
        pollers = [Poller(url, POLL_S) for url in urls[:NODES]]
        try:
            time.sleep(0.2)
            began = time.time()
            act()

            def done():
                for agent in agents:
                    bad = next((e for e in agent.log() if e["t"] >= began and e.get("event") in BAD), None)
                    if bad or not agent.alive():
                        raise BenchError(f"{what}, {agent.label}: {bad or 'exited'}:\n{agent.tail()}")
                applied = [common.first(a.log(), "rollout.applied", began) for a in agents]
                return None not in applied and all(p.last_ok() for p in pollers) and applied
            applied = until(done, 300, f"{what}: not applied and 200 on every node", 0.1)
            time.sleep(0.5)  # a flap after the end would show
        finally:
            samples = [p.stop() for p in pollers]
        down, split = [gaps(s, f"{what}, node {i}") for i, s in enumerate(samples)], []
        for i, name in enumerate(names[:NODES]):
            after = bed.inspect(name)
            starts = [e for e in bed.events.between(began) if e["name"] == name and e["action"] == "start"]
            if after["Id"] == before[i]["Id"] or len(starts) != 1 or not down[i]:
                raise BenchError(f"{what}, node {i}: container {before[i]['Id'][:12]} -> "
                                 f"{after['Id'][:12]}, {len(starts)} starts, outages {down[i]}")
            check(i, before[i], after)
            split.append(phases(bed.events, began, before[i]["Id"][:12], after["Id"][:12], down[i]))
        end = max([e["t"] for e in applied] + [b for d in down for _, b in d])
        leases = sorted((e["t"], e["event"][14:]) for a in agents for e in a.log() if e["t"] >= began
                        and e.get("event") in ("rollout.lease_acquired", "rollout.lease_released"))
        pairs = {k: [y[0] - x[0] for x, y in zip(leases, leases[1:]) if (x[1], y[1]) == k]
                 for k in (("acquired", "released"), ("released", "acquired"))}
        return {"total_s": end - began, "phases": split, "most_down": most_down(sum(down, [])),
                "lease_held_s": pairs["acquired", "released"], "handoff_s": pairs["released", "acquired"],
                "down_s": [sum(b - a for a, b in d) for d in down], "outages": [len(d) for d in down]}

    def config_roll(n: int) -> dict:
        new = f"User-agent: *\nDisallow: /{n}-{secrets.token_hex(4)}\n".encode()

        def check(i: int, before: dict, after: dict) -> None:
            mount = next(m["Source"] for m in after["Mounts"] if m["Destination"] == "/conf/stack")
            if (Path(mount) / "robots.txt").read_bytes() != new:
                raise BenchError(f"config roll {n}, node {i}: {mount} has the old robots.txt")
        return roll(f"config roll {n}", lambda: bed.upload({"robots.txt": new}), check)

    def upgrade(tag: str) -> dict:
        image_id = bed.docker().images.get(images[tag]).id

        def act() -> None:
            for agent in agents:
                config = json.loads(agent.config.read_text())
                config["image"]["reference"] = images[tag]
                agent.config.write_text(json.dumps(config))
            for agent in agents:
                os.kill(agent.pid(), signal.SIGHUP)

        def check(i: int, before: dict, after: dict) -> None:
            if after["Image"] != image_id:
                raise BenchError(f"upgrade to {tag}, node {i}: runs {after['Config']['Image']}")
        return roll(f"upgrade to {tag}", act, check)

    def floor(n: int) -> dict:
        poller = Poller(urls[NODES], POLL_S)
        try:
            time.sleep(0.2)
            began = time.time()
            bed.docker().api.stop(names[NODES], timeout=args.stop_timeout)
            bed.docker().api.start(names[NODES])
            until(poller.last_ok, 60, f"floor {n}: not 200 again")
            time.sleep(0.5)
        finally:
            samples = poller.stop()
        down, ident = gaps(samples, f"floor {n}"), bed.inspect(names[NODES])["Id"][:12]
        split = phases(bed.events, began, ident, ident, down)
        return {"down_s": [sum(b - a for a, b in down)], "phases": [split]}

    runs = common.rounds(args, {"config": config_roll, "floor": floor},
                         lambda got: " / ".join(f"{x:.2f}" for x in got["down_s"]) + " s down")
    for tag in TAGS[1:]:
        runs[tag] = [upgrade(tag)]
        print(f"  upgrade to {tag}: {runs[tag][0]['total_s']:.1f} s, nodes down {runs[tag][0]['down_s']}")
    floor_s = stats(r["down_s"][0] for r in runs["floor"])["median"]
    split = {k: {p: stats(x[p] for r in runs[k] for x in r["phases"])["median"]
                 for p in runs[k][0]["phases"][0]} for k in ("config", "floor")}
    summary = {kind: {**{k: stats(x for r in items for x in r[k]) for k in ("lease_held_s", "handoff_s")},
                      "total_s": stats(r["total_s"] for r in items),
                      "most_down": max(r["most_down"] for r in items),
                      "down_s": [stats(r["down_s"][i] for r in items) for i in range(NODES)]}
               for kind, items in runs.items() if kind != "floor"}
    extra = {kind: max(d["median"] for d in s["down_s"]) - floor_s for kind, s in summary.items()}
    worst = {kind: max(x for r in runs[kind] for x in r["down_s"]) - floor_s for kind in summary}
    met, config = all(x <= GOAL_EXTRA_S for x in extra.values()), summary["config"]
    what = {"config": f"config roll (robots.txt), median of {args.rounds}",
            **{tag: f"upgrade {old} -> {tag}, once" for old, tag in zip(TAGS, TAGS[1:])}}
    report = [f"### A 3-node roll on the stand-in against the floor (stop timeout {args.stop_timeout} s,"
              " max_unavailable 1)", "", "| | total time | most nodes down at once | each node's "
              "downtime | worst node over the floor |", "|---|---:|---:|---:|---:|"]
    report += [f"| {what[k]} | {s['total_s']['median']:.2f} s | {s['most_down']} | "
               + " / ".join(f"{d['median']:.2f}" for d in s["down_s"]) + f" s | {extra[k]:+.2f} s |"
               for k, s in summary.items()]
    report += [f"| floor: stop + start through the engine API, median of {args.rounds} | | 1 | "
               f"{floor_s:.2f} s | |", "",
               f"Goal: each node's downtime at most {GOAL_EXTRA_S} s over the floor: {common.met(met)} "
               f"(worst single run: " + ", ".join(f"{k} {v:+.2f} s" for k, v in worst.items())
               + f"). Health sampled every {POLL_S * 1000:.0f} ms per node; {args.warmup} warm-up round. "
               f"Config rolls (medians): a node holds its lease {config['lease_held_s']['median']:.2f} s, "
               f"the next takes it {config['handoff_s']['median']:.2f} s after its release; a node's "
               "outage, agent / floor: " + ", ".join(f"{p.replace('_', ' ')} {split['config'][p]:.3f} / "
                                                    f"{v:.3f} s" for p, v in split["floor"].items()) + "."]
    for agent in agents:
        agent.finish()
    return {"params": {"rounds": args.rounds, "warmup": args.warmup, "stop_timeout_s": args.stop_timeout,
                       "poll_s": POLL_S, "nodes": NODES}, "summary": summary, "floor_s": floor_s,
            "phases": split, "goals": {"extra_s": {"max": GOAL_EXTRA_S, "got": extra, "worst": worst,
                                                   "met": met}}, "report": report, "runs": runs}

def _args(parser) -> None:
    parser.add_argument("--stop-timeout", type=int, default=10,
                        help="container.stop_timeout and the floor's stop timeout, seconds (default 10)")


if __name__ == "__main__":
    sys.exit(common.main("roll", __doc__, body, add_args=_args))
