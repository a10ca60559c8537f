"""Benchmark: requests lost through a TCP load balancer during planned changes, with and without draining.

Usage: python bench/drain.py [--rounds 1] [--json PATH]

Set-up (tests/integration/test_drain.py, run by pytest with QB_DRAIN_COMPARE=1): three agents,
each running the Quay stand-in on its own port, behind HAProxy in TCP mode checking each agent's
/ready every second (fall 5, rise 2); a load of 8 clients through HAProxy (5 short GETs back to
back, 3 uploads of 2 s), every request on a new connection. Scenarios: a stack roll across the 3
nodes, an image upgrade through its canary, every agent restarted at once, an Auto Scaling
termination of one node; each with `rollout.drain` on (the default: 9 s drain here) and off, side
by side within one pytest run (each scenario's two sides one after the other, on fresh clusters),
and a crash of one node (not planned: no drain). Reported per scenario and side: requests, failed
(refused or an error answer) and cut (in flight when Quay stopped), and failures per 1,000
requests. Goal: 0 failed and 0 cut with draining in every planned scenario.
It needs the test bed of $TESTBED_DIR (`make bench` starts it).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import common
from common import BenchError, MissingTool

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("stack roll, 3 nodes", "image upgrade with its canary", "every agent restarted at once",
             "Auto Scaling termination of one node", "a crash of one node")


def run_once(report: Path) -> None:
    env = {**os.environ, "QB_DRAIN_COMPARE": "1", "CLUSTER_REPORT": str(report)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/integration/test_drain.py"], cwd=ROOT, env=env, check=False)
    if done.returncode not in (0, 1):  # 1: a test failed (its figures are still reported)
        raise BenchError(f"pytest ended with status {done.returncode}")


def body(args, _bed) -> dict:
    if not os.environ.get("TESTBED_DIR"):
        raise MissingTool("no test bed: run it under `make bench`, or start one and set TESTBED_DIR")
    lines = []
    with tempfile.TemporaryDirectory(prefix="qb-bench-drain-") as work:
        report = Path(work) / "report.jsonl"
        for _ in range(args.warmup + args.rounds):
            run_once(report)
        for line in report.read_text().splitlines():
            lines.append(json.loads(line))
    runs = [r for r in lines if r["test"].startswith("drain: ") and "total" in r]
    totals = {}
    for run in runs:
        key = (run["test"][len("drain: "):], run["side"])
        seen = totals.setdefault(key, {"runs": 0, "total": 0, "failed": 0, "cut": 0})
        seen["runs"] += 1
        for field in ("total", "failed", "cut"):
            seen[field] += run[field]

    def per_1000(seen) -> str:
        return f"{1000 * (seen['failed'] + seen['cut']) / max(seen['total'], 1):.2f}"

    out = ["## Draining behind a TCP load balancer (`bench/drain.py`)", "",
           "HAProxy (TCP, checks /ready every 1 s, fall 5) in front of 3 stand-in nodes; 8 clients "
           "(5 GETs back to back, 3 two-second uploads), each request on a new connection. "
           f"{args.rounds} run(s) of every scenario per side.", "",
           "| scenario | side | requests | failed | cut | lost per 1,000 |", "|---|---|---|---|---|---|"]
    met = True
    for scenario in SCENARIOS:
        for side in ("drain", "no-drain"):
            seen = totals.get((scenario, side))
            if seen is None:
                continue
            out.append(f"| {scenario} | {side} | {seen['total']} | {seen['failed']} | "
                       f"{seen['cut']} | {per_1000(seen)} |")
            if side == "drain" and scenario != "a crash of one node":
                met = met and seen["failed"] + seen["cut"] == 0
    out += ["", f"Goal (0 failed, 0 cut with draining in every planned change): "
                f"{common.met(met)}."]
    return {"report": out, "runs": runs, "totals": {f"{k[0]} / {k[1]}": v for k, v in totals.items()}}


if __name__ == "__main__":
    sys.exit(common.main("drain", __doc__, body, rounds_default=1, warmup_default=0,
                         use_bed=False))
