"""Benchmark: the watchdog daemon (`quay-bootstrap run`): a killed Quay back to healthy, the detection
time of a broken health endpoint, and the idle agent's CPU and peak RSS.

Usage: python bench/watchdog.py [--rounds 5] [--idle-seconds 60] [--only kill,detect,idle]
                                [--json PATH] [--keep]

Set-up, not measured: the sample conf/stack to a new bucket, the fake Quay to the bed's registry,
and a warm-up agent that creates the container (host networking, a loopback port, /control).
Every measured agent is a new `quay-bootstrap run` under the launcher (its lifetime peak RSS is
known when it exits), adopting that container: a new agent per run keeps the restart backoff of
one round out of the next.

    kill     Each round, three sides in turn, each on a container that has run 11 s (Docker's
             restart delay resets after 10 s): agent_kill, the agent (health.interval 10s) runs
             and the container gets `docker kill`; agent_crash, the agent runs and the
             container's init gets SIGKILL from the host (a crash); docker_crash, no agent, the
             same crash, Docker's unless-stopped policy alone and a poll every 0.25 s until 200:
             the floor (`docker kill` is a manual stop for Docker: its policy never restarts
             it). Recorded: die (Docker's event), restart issued (the agent's
             `container.restarting`), running (the next start event), healthy (the agent's
             /status `since`, or the floor's first 200), who started Quay first, its starts.
    detect   health.interval 1s, timeout 1s, failure_threshold 3; once healthy, at a random
             point of an interval, /control/state becomes `fail web_gunicorn` (503) or `hang`;
             time to `container.restarting` against the bound threshold x interval + timeout + the
             2 s ping timeout.
    idle     An agent (health.interval 10s) healthy for 2 s, then for IDLE_SECONDS its CPU
             (/proc/PID/stat) as % of one core and its peak RSS (VmHWM); in the same seconds a
             bash loop `curl -fsS URL; sleep 10` (CPU with its children, from the launcher).

Goals: restart issued within 0.5 s of the die event; idle CPU 0.5% of a core or less; idle peak
RSS 64 MiB or less; detection within the bound.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import time
from pathlib import Path

import common
from common import HOST, BenchError, Poller, stats, until

GOAL_RESTART_S, GOAL_CPU_PCT, GOAL_RSS_MIB = 0.5, 0.5, 64.0
SETTLE_S = 11.0
DETECT = {"interval": 1.0, "timeout": 1.0, "failure_threshold": 3}
# A probe without a verdict asks Quay's pings; the hung gunicorn's gives up after
# health.ping_timeout(timeout): 2 s here.
BOUND_S = DETECT["failure_threshold"] * DETECT["interval"] + DETECT["timeout"] + 2.0
MODES = {"fail": "fail web_gunicorn", "hang": "hang"}
SIDES = ("agent_kill", "agent_crash", "docker_crash")
BASELINE = """\
trap 'kill $! 2>/dev/null; exit 0' TERM
while :; do
  curl -fsS --max-time 5 {url} >/dev/null
  sleep 10 & wait $!
done
"""


def vmhwm_mib(pid: int) -> float:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


class Node:
    """The container of every agent here: its name, port, control folder and stack folder."""

    def __init__(self, bed) -> None:
        self.bed, self.name, self.port = bed, f"{bed.prefix}-node", common.free_port()
        self.url = f"http://{HOST}:{self.port}/health/instance"
        self.control = bed.folder("control")
        self.set_state("healthy")

    def agent(self, label: str, **health) -> common.Agent:
        return common.Agent(self.bed, label, self.name, self.port, {"dir": str(self.bed.work / "stack")},
                            container={"volumes": [f"{self.control}:/control"]}, health=health)

    def set_state(self, text: str) -> None:
        """Atomically: the fake Quay reads the file on every request."""
        tmp = self.control / ".state.tmp"
        tmp.write_text(text)
        os.chmod(tmp, 0o666)
        os.replace(tmp, self.control / "state")

    def starts(self) -> int:
        path = self.control / "starts"
        return len(path.read_text().splitlines()) if path.exists() else 0

    def settle(self) -> None:
        """Until the container has run SETTLE_S: a crash then looks like one on a node that ran."""
        state = self.bed.inspect(self.name)["State"]
        if not state.get("Running"):
            raise BenchError(f"container {self.name} is {state.get('Status')}, not running")
        time.sleep(max(0.0, SETTLE_S - (time.time() - common.log_time(state["StartedAt"]))))

    def crash(self) -> None:
        """SIGKILL the container's init from the host: what a crash of Quay looks like."""
        os.kill(self.bed.inspect(self.name)["State"]["Pid"], signal.SIGKILL)


def kill_side(node: Node, side: str, n: int) -> dict:
    events, agent = node.bed.events, None
    if side != "docker_crash":
        agent = node.agent(f"{side}{n}", interval="10s")
        agent.wait_healthy()
    node.settle()
    if agent is not None:
        time.sleep(random.uniform(0, 10))  # anywhere in the agent's probe cycle
    starts, killed = node.starts(), time.time()
    if side == "agent_kill":
        node.bed.docker().api.kill(node.name)
    else:
        node.crash()
    poller = Poller(node.url, 0.1 if agent else 0.25)  # the floor: the agent's START_POLL
    try:
        healthy = agent.wait_healthy(after=killed) if agent else until(
            lambda: poller.first_ok(killed), 60, f"{side} {n}: Docker did not bring Quay back")
        time.sleep(1.0)  # a second restart, if there is one, shows in the events and starts
    finally:
        poller.stop()
    die = events.after("die", killed)
    start = events.after("start", die)
    if die is None:
        raise BenchError(f"{side} {n}: no die event after the kill")
    # The agent restarts a running or restarting container with `docker restart` (start and
    # restart events together); Docker's policy emits a lone start.
    paired = any(e["action"] == "restart" and start and abs(e["t"] - start) < 0.01
                 for e in list(events.items))
    got = {"die_to_running_s": common.span(die, start), "die_to_healthy_s": healthy - die,
           "die_to_answering_s": common.span(die, poller.first_ok(start)),
           "starts": node.starts() - starts, "events": events.between(killed),
           "first_start_by": "agent" if side == "agent_kill" or (side == "agent_crash" and paired)
           else "docker"}
    if agent is not None:
        restarting = common.first(agent.log(), "container.restarting", killed)
        got["die_to_restart_issued_s"] = restarting["t"] - die if restarting else None
        got["agent"] = agent.finish()
    return got


def detect_round(node: Node, mode: str, n: int) -> dict:
    agent = node.agent(f"detect_{mode}{n}", interval=f"{DETECT['interval']:g}s",
                       timeout=f"{DETECT['timeout']:g}s", failure_threshold=DETECT["failure_threshold"])
    agent.wait_healthy()
    time.sleep(random.uniform(0, DETECT["interval"]))  # any point of the probe cycle
    broken = time.time()
    node.set_state(MODES[mode])
    try:
        restarting = agent.wait_event("container.restarting", broken, 4 * BOUND_S + 30)
    finally:
        node.set_state("healthy")
    healthy = agent.wait_healthy(after=restarting["t"])
    return {"detect_s": restarting["t"] - broken, "restart_to_healthy_s": healthy - restarting["t"],
            "reason": restarting.get("reason"), "agent": agent.finish()}


def idle_round(node: Node, n: int, seconds: float) -> dict:
    agent = node.agent(f"idle{n}", interval="10s")
    agent.wait_healthy()
    time.sleep(2.0)
    t0, cpu0 = time.monotonic(), common.cpu_seconds(agent.pid())
    baseline = common.Launched(["/bin/bash", "-c", BASELINE.format(url=node.url)], node.bed.env,
                               node.bed.work / f"idle{n}" / "baseline")
    time.sleep(seconds)
    cpu, window = common.cpu_seconds(agent.pid()) - cpu0, time.monotonic() - t0
    got = {"agent_cpu_pct": 100 * cpu / window, "agent_vmhwm_mib": vmhwm_mib(agent.pid()),
           "bash_vmhwm_mib": vmhwm_mib(baseline.pid())}
    base = baseline.stop()
    got.update(baseline_cpu_pct=100 * base["cpu_s"] / base["wall_s"], agent=agent.finish())
    return got


def body(args, bed) -> dict:
    scenarios = [s.strip() for s in args.only.split(",") if s.strip()]
    bed.upload(common.stacks.sample_stack())
    bed.fake_quay()
    node = Node(bed)
    warm = node.agent("warmup", interval="10s")  # creates the container; every later agent adopts it
    warm.wait_healthy()
    warm.finish()
    if bed.inspect(node.name)["State"].get("Status") != "running":
        raise BenchError("the agent stopped the container on SIGTERM; it must leave it running")
    once = argparse.Namespace(rounds=args.rounds, warmup=0)
    runs: dict = {}
    if "kill" in scenarios:
        runs["kill"] = common.rounds(once, {side: lambda n, side=side: kill_side(node, side, n)
                                            for side in SIDES},
                                     lambda got: f"die->healthy {got['die_to_healthy_s']:.3f} s")
    if "detect" in scenarios:
        runs["detect"] = common.rounds(once, {m: lambda n, m=m: detect_round(node, m, n) for m in MODES},
                                       lambda got: f"{got['detect_s']:.2f} s")
    if "idle" in scenarios:
        runs["idle"] = common.rounds(once, {"idle": lambda n: idle_round(node, n, args.idle_seconds)},
                                     lambda got: f"CPU {got['agent_cpu_pct']:.3f}% VmHWM "
                                                 f"{got['agent_vmhwm_mib']:.1f} MiB")
    summary = {group: {side: {k: stats(r.get(k) for r in items) for k in
                              {k for r in items for k, v in r.items() if isinstance(v, (int, float))}}
                       for side, items in sides.items()} for group, sides in runs.items()}
    goals, report = {}, ["### The watchdog"]
    if "kill" in runs:
        kill = summary["kill"]
        floor = kill["docker_crash"]["die_to_healthy_s"]["median"]
        restart = kill["agent_kill"]["die_to_restart_issued_s"]
        goals["restart"] = {"max": GOAL_RESTART_S, "got": restart["max"],
                            "met": restart["max"] is not None and restart["max"] <= GOAL_RESTART_S}
        by_agent = sum(r["first_start_by"] == "agent" for s in SIDES[:2] for r in runs["kill"][s])
        once_each = all(r["starts"] == 1 for s in SIDES for r in runs["kill"][s])
        crash = kill["agent_crash"].get("die_to_restart_issued_s", {}).get("median")
        report += ["", "| kill -> healthy, median | agent + `docker kill` | agent + crash | "
                   "Docker alone + crash |", "|---|---:|---:|---:|",
                   f"| die -> restart issued | {common.s(restart['median'], 3)} (max "
                   f"{common.s(restart['max'], 3)}) | {common.s(crash, 3)} | - |"]
        report += [f"| {what} | " + " | ".join(common.s(kill[s][key]["median"], 3) for s in SIDES) + " |"
                   for key, what in (("die_to_running_s", "die -> running"),
                                     ("die_to_healthy_s", "die -> healthy"))]
        report += ["| ratio to Docker alone | " + " | ".join(common.r(common.ratio(
            kill[s]["die_to_healthy_s"]["median"], floor)) for s in SIDES) + " |", "",
            f"Goal: restart issued within {GOAL_RESTART_S} s of the die event: "
            f"{common.met(goals['restart']['met'])} ({common.s(restart['max'], 3)} worst). The agent "
            f"made the first start in {by_agent} of {2 * args.rounds} rounds; Quay started exactly once "
            f"each time: {'yes' if once_each else '**no**'}."]
    if "detect" in runs:
        report += ["", f"| detection (interval {DETECT['interval']:g} s, timeout {DETECT['timeout']:g} s, "
                   f"failure_threshold {DETECT['failure_threshold']}; bound {BOUND_S:g} s) | median (range) "
                   "| within bound |", "|---|---:|---:|"]
        for mode, text in MODES.items():
            d = summary["detect"][mode]["detect_s"]
            within = sum(r["detect_s"] <= BOUND_S for r in runs["detect"][mode])
            goals[f"detect_{mode}"] = {"bound": BOUND_S, "got": d["max"], "met": within == d["n"]}
            report.append(f"| `{text}` | {d['median']:.2f} s ({d['min']:.2f}-{d['max']:.2f}) | "
                          f"{within} of {d['n']} |")
    if "idle" in runs:
        idle = summary["idle"]["idle"]
        cpu, rss = idle["agent_cpu_pct"], idle["agent_vmhwm_mib"]
        goals["idle_cpu"] = {"max": GOAL_CPU_PCT, "got": cpu["max"], "met": cpu["max"] <= GOAL_CPU_PCT}
        goals["idle_rss"] = {"max": GOAL_RSS_MIB, "got": rss["max"], "met": rss["max"] <= GOAL_RSS_MIB}
        report += ["", f"| idle, {args.idle_seconds:g} s windows, `health.interval` 10 s | agent | "
                   "bash + curl loop |", "|---|---:|---:|",
                   f"| CPU, % of one core | {cpu['median']:.2f}% (worst {cpu['max']:.2f}%) | "
                   f"{idle['baseline_cpu_pct']['median']:.2f}% |",
                   f"| peak RSS (VmHWM) | {rss['min']:.0f}-{rss['max']:.0f} MiB | "
                   f"{idle['bash_vmhwm_mib']['median']:.1f} MiB (bash) |", "",
                   f"Goal: CPU at most {GOAL_CPU_PCT}% of a core: {common.met(goals['idle_cpu']['met'])}."
                   f" Goal: RSS at most {GOAL_RSS_MIB:g} MiB: {common.met(goals['idle_rss']['met'])}."]
    return {"params": {"rounds": args.rounds, "idle_seconds": args.idle_seconds, "scenarios": scenarios,
                       "detect": DETECT}, "summary": summary, "goals": goals, "report": report,
            "runs": runs}


def _args(parser) -> None:
    parser.add_argument("--idle-seconds", type=float, default=60.0, help="an idle window (default 60)")
    parser.add_argument("--only", default="kill,detect,idle", help="scenarios: kill, detect, idle")


if __name__ == "__main__":
    sys.exit(common.main("watchdog", __doc__, body, add_args=_args))
