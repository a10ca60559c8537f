"""Benchmark: the agent's memory, idle for a long time and library by library (issue 21).

Usage: python bench/idle_memory.py [--minutes 60] [--refresh 60s] [--base REV] [--rounds 5]
                                   [--only imports,idle] [--json PATH] [--keep]

    imports  Fresh interpreters, each importing one more of what a node's daemon loads, in the
             daemon's order (the interpreter, structlog, pydantic, the agent's config, the docker
             SDK, the agent's own modules, botocore, one S3 client, then the Auto Scaling, RDS
             and ECR clients of an AWS node), VmRSS and wall time after each step; and the same
             AWS clients made as the agent made them before the shared session (a botocore
             session for S3, a boto3 session for each of the others); and google-cloud-storage,
             which only a gs:// node loads. Medians of ROUNDS.
    idle     Two daemons (`quay-bootstrap run`) side by side on the bed for MINUTES: HEAD and
             BASE (a `git worktree` of REV, run through PYTHONPATH), each with its own fake Quay
             container, the 21-file sample stack on SeaweedFS (S3 over HTTP), refresh_interval
             REFRESH, the health probe every 10 s (its default), the report endpoint on. Every
             minute: VmRSS and VmHWM from /proc/PID/status; at the end their CPU over the
             window and the lines each logged at info (per day, at this refresh).

Goal: idle RSS (VmRSS after MINUTES) at most 48 MiB.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common
from common import BenchError, stats

GOAL_MIB = 48.0
REPO = Path(__file__).resolve().parent.parent

# (label, statement): run in order in one interpreter; its VmRSS after each.
DAEMON_STEPS = [
    ("interpreter", "pass"),
    ("structlog", "import structlog"),
    ("pydantic", "import pydantic"),
    ("the agent's config", "import quay_bootstrap.config"),
    ("docker SDK", "import docker"),
    ("the agent's modules", "import quay_bootstrap.daemon, quay_bootstrap.pipeline, "
                            "quay_bootstrap.rollout, quay_bootstrap.health"),
    ("botocore", "import botocore.session, botocore.config"),
    ("one S3 client", "from quay_bootstrap.stores import s3; s3.client('s3://b/conf/stack', None)"),
    ("+ Auto Scaling, RDS, ECR clients (one session)",
     "from quay_bootstrap import aws_session as a; "
     "[a.client(n, region_name='us-east-1') for n in ('autoscaling', 'rds', 'ecr')]"),
]
# How the agent made its AWS clients before the shared session (3f6cf10 and earlier): S3 from a
# botocore session of its own, the others from boto3 sessions (Lifecycle, Standby and RDS one
# each; mark_unhealthy and ECR shared boto3's default one): modelled as one boto3 session each.
SESSION_PER_CALLER = [
    ("interpreter", "pass"),
    ("structlog, pydantic, config, docker SDK, the agent's modules",
     "import structlog, pydantic, docker, quay_bootstrap.config, quay_bootstrap.daemon, "
     "quay_bootstrap.pipeline, quay_bootstrap.rollout, quay_bootstrap.health"),
    ("botocore", "import botocore.session, botocore.config"),
    ("one S3 client (its own session)",
     "botocore.session.Session().create_client('s3', region_name='us-east-1')"),
    ("+ Auto Scaling, RDS, ECR clients (a boto3 session each)",
     "import boto3; [boto3.session.Session().client(n, region_name='us-east-1') "
     "for n in ('autoscaling', 'rds', 'ecr')]"),
]
GCS_STEP = [("interpreter", "pass"), ("google-cloud-storage", "import google.cloud.storage")]

PROBE = r"""
import json, sys, time
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
out = []
for label, statement in json.loads(sys.argv[1]):
    started = time.perf_counter()
    exec(statement)
    out.append([label, rss(), time.perf_counter() - started])
print(json.dumps(out))
"""


def probe(steps, env) -> list:
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(steps)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise BenchError(f"the import probe failed: {done.stderr.strip()[-800:]}")
    return json.loads(done.stdout)


def imports(args, env) -> dict:
    tables = {}
    for name, steps in (("daemon", DAEMON_STEPS), ("session_per_caller", SESSION_PER_CALLER),
                        ("gcs", GCS_STEP)):
        runs = [probe(steps, env) for _ in range(args.rounds)]
        tables[name] = [{"step": label, "rss_mib": statistics.median(r[i][1] for r in runs),
                         "seconds": statistics.median(r[i][2] for r in runs)}
                        for i, (label, _) in enumerate(steps)]
        print(f"  imports {name}: " + ", ".join(f"{row['step']} {row['rss_mib']:.1f}"
                                                  for row in tables[name]), flush=True)
    return tables


def status_mib(pid: int) -> dict:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if ":" in line)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}


def worktree(bed, rev: str) -> Path:
    path = bed.work / f"tree-{rev}"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(path), rev],
                   check=True, capture_output=True)
    return path


def idle(args, bed) -> dict:
    bed.on_seaweedfs()
    bed.upload(common.stacks.sample_stack())
    bed.fake_quay()
    base = worktree(bed, args.base)
    sides = {}
    try:
        for side, tree in (("head", None), ("base", base)):
            port = common.free_port()
            control = bed.folder(f"{side}/control")
            sides[side] = common.Agent(
                bed, f"{side}-agent", f"{bed.prefix}-{side}", port, {
                    "dir": str(bed.work / side / "stack"), "refresh_interval": args.refresh},
                container={"volumes": [f"{control}:/control"]}, tree=tree)
        for agent in sides.values():
            agent.wait_healthy()
        loaded = {side: agent.module_root() for side, agent in sides.items()}
        if loaded["base"] != base / "quay_bootstrap" or loaded["head"] == loaded["base"]:
            raise BenchError(f"the base daemon did not run the base tree: {loaded}")
        started, cpu0 = time.monotonic(), {s: common.cpu_seconds(a.pid()) for s, a in sides.items()}
        samples = {side: [] for side in sides}
        for minute in range(1, int(args.minutes) + 1):
            time.sleep(max(0.0, started + 60 * minute - time.monotonic()))
            for side, agent in sides.items():
                if not agent.alive():
                    raise BenchError(f"the {side} daemon exited:\n{agent.tail()}")
                samples[side].append({"minute": minute, **status_mib(agent.pid())})
            print(f"  minute {minute}: " + ", ".join(
                f"{s} VmRSS {v[-1]['VmRSS']:.1f} VmHWM {v[-1]['VmHWM']:.1f}" for s, v in samples.items()),
                flush=True)
        window = time.monotonic() - started
        cpu = {side: common.cpu_seconds(agent.pid()) - cpu0[side] for side, agent in sides.items()}
        got, mark = {}, time.time() - window
        for side, agent in sides.items():
            info = [e for e in agent.log() if e.get("level") == "info"
                    and common.log_time(e.get("timestamp", "")) >= mark]
            finish = agent.finish()
            got[side] = {"samples": samples[side], "cpu_pct": 100 * cpu[side] / window,
                         "info_lines": len(info), "info_events": sorted({e["event"] for e in info}),
                         "info_per_day": round(len(info) * 86400 / window),
                         "warnings": finish["warnings"], "module_root": str(loaded[side])}
        return {"window_s": window, "sides": got}
    finally:
        for agent in sides.values():
            if agent.alive():
                agent.stop()
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)],
                       check=False, capture_output=True)


def body(args, bed) -> dict:
    if args.minutes < 1:
        raise BenchError("--minutes must be at least 1 (the daemons are read once a minute)")
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    result: dict = {"params": {"minutes": args.minutes, "refresh": args.refresh, "base": args.base,
                               "rounds": args.rounds, "only": sorted(only)}}
    report = ["### The agent's memory: idle for a long time, and library by library", ""]
    goals = {}
    if "imports" in only:
        tables = result["imports"] = imports(args, bed.env)
        report += ["| a node's daemon, step by step | VmRSS | added | import time |",
                   "|---|---:|---:|---:|"]
        for name in ("daemon", "session_per_caller", "gcs"):
            previous = None
            if name != "daemon":
                title = "before the shared session" if name != "gcs" else "a gs:// node"
                report.append(f"| *{title}* | | | |")
            for row in tables[name]:
                added = "" if previous is None else f"+{row['rss_mib'] - previous:.1f}"
                report.append(f"| {row['step']} | {row['rss_mib']:.1f} MiB | {added} | "
                              f"{1000 * row['seconds']:.0f} ms |")
                previous = row["rss_mib"]
        report.append("")
    if "idle" in only:
        idle_got = result["idle"] = idle(args, bed)
        minutes = idle_got["window_s"] / 60
        last = {side: got["samples"][-1] for side, got in idle_got["sides"].items()}
        rss_stats = {side: stats(s["VmRSS"] for s in got["samples"])
                     for side, got in idle_got["sides"].items()}
        goals["idle_rss"] = {"max": GOAL_MIB, "got": last["head"]["VmRSS"],
                             "met": last["head"]["VmRSS"] <= GOAL_MIB}
        rows = (("VmRSS at the end", lambda side: last[side]["VmRSS"], mib),
                ("VmHWM at the end", lambda side: last[side]["VmHWM"], mib),
                ("CPU, % of one core", lambda side: idle_got["sides"][side]["cpu_pct"], pct),
                ("info lines per day at this refresh",
                 lambda side: idle_got["sides"][side]["info_per_day"], count))
        report += [f"| idle daemon, {minutes:.0f} min, refresh {args.refresh}, probe every 10 s | "
                   f"HEAD | {args.base} | ratio |", "|---|---:|---:|---:|",
                   *(f"| {what} | {fmt(value('head'))} | {fmt(value('base'))} | "
                     f"{common.r(common.ratio(value('head'), value('base')))} |"
                     for what, value, fmt in rows),
                   f"| VmRSS over the window (min-max) | {mib(rss_stats['head']['min'])}-"
                   f"{mib(rss_stats['head']['max'])} | {mib(rss_stats['base']['min'])}-"
                   f"{mib(rss_stats['base']['max'])} | |", "",
                   f"Goal: idle RSS at most {GOAL_MIB:g} MiB: {common.met(goals['idle_rss']['met'])} "
                   f"({last['head']['VmRSS']:.1f} MiB)."]
    return {**result, "goals": goals, "report": report}


def mib(value: float) -> str:
    return f"{value:.1f} MiB"


def pct(value: float) -> str:
    return f"{value:.2f}%"


def count(value: float) -> str:
    return f"{value:,.0f}"


def _args(parser) -> None:
    parser.add_argument("--minutes", type=float, default=60.0, help="the idle window (default 60)")
    parser.add_argument("--refresh", default="60s", help="the daemons' refresh_interval (default 60s)")
    parser.add_argument("--base", default="d5baafa",
                        help="the tree to compare with (default d5baafa, before issue 21)")
    parser.add_argument("--only", default="imports,idle", help="parts: imports, idle")


if __name__ == "__main__":
    sys.exit(common.main("idle_memory", __doc__, body, add_args=_args))
