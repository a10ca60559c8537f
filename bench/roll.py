"""Benchmark: how long a node's /health/instance is not 200 during a config roll, against the floor.

Usage: python bench/roll.py [--rounds 5] [--warmup 1] [--stop-timeout 30] [--json PATH] [--keep]

Set-up, not measured: the sample conf/stack to a new bucket, the fake Quay to the bed's registry,
and one agent daemon (`quay-bootstrap run`, stack.refresh_interval 1s, health.interval 10s,
start_period 30s, container.stop_timeout STOP_TIMEOUT) that stays up for every round; and the
floor's container, created with the agent's own build_spec + create_and_start (same image,
mounts, restart policy and stop timeout). Each round, three sides, each first in turn:

    agent      robots.txt changes in the bucket; the agent fetches, checks the image, takes a
               lease and replaces the container (stop, rename aside, create, start, first 200)
    floor      `docker stop -t STOP_TIMEOUT` + `docker start` of the floor's container (CLI)
    floor_api  the same stop + start through the engine API (no CLI start-ups)

A poller GETs the side's /health/instance every 10 ms (0.5 s timeout); a run's figure is the
total time it is not 200 (from the first non-200 sent to the next 200 sent). An agent run ends at
`rollout.applied` and 200 again, and is checked: a new container whose stack-version label is the
version fetched, mounting the new stack byte for byte, the fake Quay started once more, no
`NAME-previous-*` left; the fetch, image check and lease must end before the window opens. A floor
run: the same container, started once more. Docker's events split the window (kill, die, stop,
rename, create, start). Goal: the agent adds 0.2 s or less to the floor (medians).
"""
from __future__ import annotations

import secrets
import subprocess
import sys
import time
from pathlib import Path

import common
from common import HOST, BenchError, Poller, span, stats, until

GOAL_EXTRA_S = 0.2
POLL_S = 0.01
TAIL_S = 0.3  # keep polling this long after the end, so a flap would show
SIDES = ("agent", "floor", "floor_api")
PREPARED = ("stack.done", "lock.done", "image.done", "rollout.lease_acquired")


def downtime(samples: list, what: str) -> dict:
    """The not-200 total of one run: every run of non-200 answers, from the first one sent to
    the next 200 sent. Raises when it never began or never ended."""
    gaps, down = [], None
    for sent, _, status in samples:
        if status != 200 and down is None:
            down = sent
        elif status == 200 and down is not None:
            gaps.append((down, sent))
            down = None
    if not gaps or down is not None:
        raise BenchError(f"{what}: the poller saw {'no outage' if not gaps else 'no 200 at the end'}"
                         f" ({len(samples)} answers)")
    return {"down_s": sum(b - a for a, b in gaps), "outages": len(gaps), "down_start": gaps[0][0],
            "down_end": gaps[-1][1]}


def body(args, bed) -> dict:
    from quay_bootstrap.config import ContainerConfig
    from quay_bootstrap.container import STACK_VERSION, build_spec
    from quay_bootstrap.engine import Docker

    files = common.stacks.sample_stack()
    bed.upload(files)
    image = bed.fake_quay()
    ports = {side: common.free_port() for side in ("agent", "floor")}
    controls = {side: bed.folder(f"{side}-control") for side in ports}
    names = {"agent": f"{bed.prefix}-node", "floor": f"{bed.prefix}-floor"}
    urls = {side: f"http://{HOST}:{port}/health/instance" for side, port in ports.items()}
    agent = common.Agent(bed, "agent", names["agent"], ports["agent"],
                         {"dir": str(bed.work / "stack"), "refresh_interval": "1s"},
                         container={"volumes": [f"{controls['agent']}:/control"],
                                    "stop_timeout": f"{args.stop_timeout}s"},
                         health={"interval": "10s", "start_period": "30s"})
    agent.wait_healthy()
    stack = bed.work / "floor-stack"  # of its own: the agent prunes its old versions
    for key, data in files.items():
        (stack / key).parent.mkdir(parents=True, exist_ok=True)
        (stack / key).write_bytes(data)
    found = bed.docker().images.get(image)
    spec = build_spec(ContainerConfig(
        name=names["floor"], network_mode="host", ports=[], sysctls={},
        env={"PORT": str(ports["floor"])}, volumes=[f"{controls['floor']}:/control"],
        stop_timeout=float(args.stop_timeout)), found.id, found.attrs["RepoDigests"][0], stack, "floor")
    engine = Docker(bed.state["docker_host"])
    try:
        engine.create_and_start(spec)
    finally:
        engine.client.close()
    common.wait_200(urls["floor"], 30, "the floor's container")

    def starts(side: str) -> int:
        path = controls[side] / "starts"
        return len(path.read_text().splitlines()) if path.exists() else 0

    def measured(side: str, what: str, act, done) -> dict:
        """Poll SIDE's health while act() runs, until done(); the downtime and Docker's events."""
        before, count = bed.inspect(names[side]), starts(side)
        poller = Poller(urls[side], POLL_S)
        try:
            time.sleep(0.1)  # answers from before: the window has a start
            began = time.time()
            act()
            until(lambda: done(began) and poller.last_ok(), 60, f"{what}: not done and 200")
            time.sleep(TAIL_S)
        finally:
            samples = poller.stop()
        got = {**downtime(samples, what), "began": began, "old_id": before["Id"][:12]}
        after = bed.inspect(names[side])
        got.update(new_id=after["Id"][:12], events=bed.events.between(began))
        if not after["State"].get("Running") or starts(side) != count + 1:
            raise BenchError(f"{what}: the container is {after['State'].get('Status')}; Quay started "
                             f"{starts(side) - count} times, not once")
        ev = bed.events
        kill = ev.after("kill", began - 0.001, got["old_id"])
        die = ev.after("die", kill, got["old_id"])
        stop = ev.after("stop", die, got["old_id"])
        start = ev.after("start", stop, got["new_id"])
        got["spans"] = {"kill_to_die": span(kill, die), "stop_to_start": span(stop, start),
                        "start_to_200": span(start, got["down_end"])}
        return got, before, after

    def agent_run(n: int) -> dict:
        agent.wait_healthy(timeout=30)
        robots = f"User-agent: *\nDisallow: /{n}-{secrets.token_hex(4)}\n".encode()
        files["robots.txt"] = robots

        def applied(began: float) -> bool:
            lines = agent.log()
            bad = next((e for e in lines if e["t"] >= began and e.get("event") in (
                "rollout.failed", "rollout.rolling_back", "rollout.rolled_back")), None)
            if bad or not agent.alive():
                raise BenchError(f"agent roll {n}: {bad or 'the agent exited'}:\n{agent.tail()}")
            return bool(common.first(lines, "rollout.applied", began))

        got, before, after = measured("agent", f"agent roll {n}", lambda: bed.upload(
            {"robots.txt": robots}), applied)
        lines, at = agent.log(), got["began"]
        fetched = common.first(lines, "stack.done", at, result="applied") or {}
        prepared = [fetched.get("t")] + [(common.first(lines, e, fetched.get("t", at)) or {}).get("t")
                                         for e in PREPARED[1:]]
        old, new = (x["Config"]["Labels"].get(STACK_VERSION, "") for x in (before, after))
        version = fetched.get("detail", "").split("version ", 1)[-1].split(",", 1)[0]
        if None in prepared or got["new_id"] == got["old_id"] or new == old or not version \
                or not new.startswith(version):
            raise BenchError(f"agent roll {n}: log lines {dict(zip(PREPARED, prepared))}; container "
                             f"{got['old_id']} -> {got['new_id']}, stack {old[:12]} -> {new[:12]}, "
                             f"fetched {version!r}")
        mount = next(m["Source"] for m in after["Mounts"] if m["Destination"] == "/conf/stack")
        common.verify_tree(Path(mount), common.sha256s(files), f"agent roll {n}, /conf/stack")
        if bed.docker().containers.list(all=True, filters={"name": f"{names['agent']}-previous-"}):
            raise BenchError(f"agent roll {n}: the old container is still there")
        stop = bed.events.after("stop", got["began"], got["old_id"])
        got["spans"].update(
            fetch=fetched.get("seconds"), image_and_lease=prepared[3] - prepared[1],
            prepared_before_window=max(prepared) < got["down_start"],
            stop_to_create=span(stop, bed.events.after("create", stop, got["new_id"])))
        return got

    def floor_run(n: int, api: bool) -> dict:
        name, t = names["floor"], str(args.stop_timeout)

        def act() -> None:
            if api:
                bed.docker().api.stop(name, timeout=args.stop_timeout)
                bed.docker().api.start(name)
                return
            for argv in ([common.DOCKER_CLI, "stop", "-t", t, name], [common.DOCKER_CLI, "start", name]):
                done = subprocess.run(argv, capture_output=True, text=True, env=bed.env, check=False)
                if done.returncode != 0:
                    raise BenchError(f"{' '.join(argv)}: {done.stderr.strip()[-500:]}")

        return measured("floor", f"floor{'_api' if api else ''} {n}", act, lambda _: True)[0]

    runs = common.rounds(args, {"agent": agent_run, "floor": lambda n: floor_run(n, False),
                                "floor_api": lambda n: floor_run(n, True)},
                         lambda got: f"{got['down_s']:.3f} s")
    summary = {side: {"down_s": stats(r["down_s"] for r in items),
                      "outages_max": max(r["outages"] for r in items),
                      "spans": {k: stats(r["spans"][k] for r in items) for k in items[0]["spans"]}}
               for side, items in runs.items()}
    median = {side: summary[side]["down_s"]["median"] for side in SIDES}
    paired = {f: stats(a["down_s"] - b["down_s"] for a, b in zip(runs["agent"], runs[f]))
              for f in ("floor", "floor_api")}
    extra = {f: median["agent"] - median[f] for f in ("floor", "floor_api")}
    spans = summary["agent"]["spans"]
    ready = sum(1 for r in runs["agent"] if r["spans"]["prepared_before_window"])
    what = {"agent": "agent roll", "floor": "floor: `docker stop` + `docker start` (CLI)",
            "floor_api": "floor: stop + start through the engine API"}
    report = [f"### A configuration roll: not-200 time against the floor (stop timeout "
              f"{args.stop_timeout} s)", "", "| | not-200 time, median | min | max |", "|---|---:|---:|---:|"]
    report += [f"| {what[side]} | {summary[side]['down_s']['median']:.3f} s | "
               f"{summary[side]['down_s']['min']:.3f} s | {summary[side]['down_s']['max']:.3f} s |"
               for side in SIDES]
    report += ["", f"Goal: the agent adds {GOAL_EXTRA_S} s or less: "
               f"{common.met(extra['floor'] <= GOAL_EXTRA_S)}"
               f" ({extra['floor']:+.3f} s over the CLI floor, {extra['floor_api']:+.3f} s over the "
               f"engine-API floor; per-round median {paired['floor_api']['median']:+.3f} s, max "
               f"{paired['floor_api']['max']:+.3f} s over the API floor). Inside the window the "
               f"agent's stop -> create (rename aside, create) takes "
               f"{spans['stop_to_create']['median']:.3f} s (median); the fetch "
               f"({spans['fetch']['median']:.2f} s), the image check and the lease "
               f"({spans['image_and_lease']['median']:.2f} s) finish before the window opens in "
               f"{ready} of {len(runs['agent'])} runs. Medians of {args.rounds} rounds after "
               f"{args.warmup} warm-up."]
    agent.finish()
    return {"params": {"rounds": args.rounds, "warmup": args.warmup, "stop_timeout_s": args.stop_timeout,
                       "poll_s": POLL_S}, "summary": summary,
            "goals": {"extra_s": {"max": GOAL_EXTRA_S, "got": extra["floor"], "vs_api_floor": extra[
                "floor_api"], "paired": paired, "met": extra["floor"] <= GOAL_EXTRA_S}},
            "report": report, "runs": runs}


def _args(parser) -> None:
    parser.add_argument("--stop-timeout", type=int, default=30,
                        help="container.stop_timeout and docker stop -t, seconds (default 30)")


if __name__ == "__main__":
    sys.exit(common.main("roll", __doc__, body, add_args=_args))
