"""Benchmark: a full `quay-bootstrap run --once` against the init script of Quay's HA guide.

Usage: python bench/once_vs_init_script.py [--rounds 5] [--warmup 1] [--json PATH] [--keep]

Set-up, not measured: the 21-file sample conf/stack (tests/testbed/stacks.py) to a new bucket on
the bed's moto, the fake Quay (tests/testbed/fake_quay.py) to the bed's registry and daemon, so
both sides start with the image cached. Each round, alternating which goes first:

    agent    quay-bootstrap --config CFG run --once   (fresh stack.dir, no container present)
    script   bash user-data.sh: aws s3 sync + docker pull + docker run + curl until 200 (INIT_SCRIPT)
    floor    python -c FLOOR: what any agent on the design card's libraries pays before doing
             anything: Python, the imports of botocore, the docker SDK, structlog and tenacity,
             one S3 client and one call to each of the store and Docker (no stack, no container)

Both run the same image with host networking on a port of their own and poll /health/instance
every 0.25 s (the agent's START_POLL). After every run, outside the timing: the container runs
the image, answers 200 with every service true, started once, and mounts the 21 uploaded files
at /conf/stack; then it is removed. Recorded: wall, CPU and peak RSS (with the script's children),
moto's and dockerd + containerd's CPU, and the agent's `<step>.done` timings. Goal: the agent
takes at most 0.7 times the script's time.
"""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import common
from common import HOST, PREFIX, BenchError, measure, ratio, stats

GOAL_RATIO = 0.7
POLL_S = 0.25
STEPS = ("stack", "lock", "image", "container", "health")
FLOOR = """\
import os, botocore.session, docker, structlog, tenacity
s3 = botocore.session.Session().create_client("s3", endpoint_url=os.environ["FLOOR_ENDPOINT"])
s3.list_buckets()
docker.from_env().ping()
"""
# What an operator puts in a node's user data following Quay's HA guide; {placeholders} are
# filled in, shell-quoted, per run. The deadline only keeps a broken run from hanging.
INIT_SCRIPT = """\
#!/bin/bash
# Quay node bootstrap: conf/stack from the bucket, the pinned image, run, wait until healthy.
set -e
{aws} s3 sync s3://{bucket}/{prefix} {stack} --endpoint-url {endpoint} --only-show-errors
{docker} pull {image}
{docker} run -d --name {name} --restart=always --network host -e PORT={port} \\
  -v {stack}:/conf/stack:ro -v {control}:/control {image}
deadline=$((SECONDS + 60))
until curl -fsS --max-time 5 http://127.0.0.1:{port}/health/instance >/dev/null; do
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "Quay is not healthy after 60 s" >&2
    exit 1
  fi
  sleep {poll}
done
"""


def check(bed, what: str, name: str, port: int, control: Path, stack: Path, expected: dict) -> None:
    """The container runs the fake Quay, once, healthy, on the uploaded conf/stack."""
    found = bed.inspect(name)
    if not found["State"].get("Running") or found["Image"] != bed.docker().images.get(bed.image).id:
        raise BenchError(f"{what}: {name} is {found['State'].get('Status')}, image {found['Image']}")
    source = Path(next((m["Source"] for m in found.get("Mounts") or []
                        if m["Destination"] == "/conf/stack"), "/nonexistent"))
    if stack.resolve() not in (source, *source.parents):
        raise BenchError(f"{what}: /conf/stack is {source}, not under {stack}")
    common.verify_tree(source, expected, f"{what}, /conf/stack")
    status, body = common.get(f"http://{HOST}:{port}/health/instance", 5)
    services = json.loads(body or "{}").get("data", {}).get("services", {})
    if status != 200 or not services or not all(services.values()):
        raise BenchError(f"{what}: /health/instance answered {status} {body[:200]!r}")
    starts = (control / "starts").read_text().splitlines() if (control / "starts").exists() else []
    if len(starts) != 1:
        raise BenchError(f"{what}: the fake Quay started {len(starts)} times, not once")


def body(args, bed) -> dict:
    qb, aws = common.tool("quay-bootstrap"), common.tool("aws")
    files = common.stacks.sample_stack()
    expected = bed.upload(files)
    bed.fake_quay()
    watch = {"server": [bed.moto_pid], "docker": bed.daemon_pids}

    def run(side: str, n: int) -> dict:
        control, port, name = bed.folder(f"{side}{n}/control"), common.free_port(), f"{bed.prefix}-{side}"
        run_dir, stack = control.parent, control.parent / "stack"
        if side == "agent":
            config = bed.node_config(run_dir, name, port, {"dir": str(stack)},
                                     container={"volumes": [f"{control}:/control"]},
                                     health={"start_period": "60s", "timeout": "5s"})
            argv = [qb, "--config", str(config), "run", "--once"]
        elif side == "floor":
            return measure([sys.executable, "-c", FLOOR], {**bed.env, "FLOOR_ENDPOINT": bed.moto},
                           run_dir / "run", watch)
        else:
            values = {"aws": aws, "docker": common.DOCKER_CLI, "bucket": bed.bucket, "prefix": PREFIX,
                      "stack": stack, "endpoint": bed.moto, "image": bed.image, "name": name,
                      "port": port, "control": control, "poll": POLL_S}
            script = run_dir / "user-data.sh"
            script.write_text(INIT_SCRIPT.format(**{k: shlex.quote(str(v)) for k, v in values.items()}))
            argv = ["/bin/bash", str(script)]
        got = measure(argv, bed.env, run_dir / "run", watch)
        check(bed, f"{side} run {n}", name, port, control, stack, expected)
        bed.remove(name)
        if side == "agent":
            lines = common.read_log(run_dir / "run.err")
            got["steps"] = {s: (common.first(lines, f"{s}.done") or {}).get("seconds") for s in STEPS}
            if None in got["steps"].values():
                raise BenchError(f"agent run {n}: a `<step>.done` line is missing: {got['steps']}")
        return got

    runs = common.rounds(args, {side: lambda n, side=side: run(side, n)
                                for side in ("agent", "script", "floor")},
                         lambda got: f"{got['wall_s']:.3f} s")
    keys = ("wall_s", "cpu_s", "server_cpu_s", "docker_cpu_s", "maxrss_mib")
    summary = {side: {key: stats(r[key] for r in items) for key in keys} for side, items in runs.items()}
    a, w, f = summary["agent"], summary["script"], summary["floor"]
    ratios = {key: ratio(a[key]["median"], w[key]["median"]) for key in ("wall_s", "cpu_s", "maxrss_mib")}
    ratios["wall_min"] = ratio(a["wall_s"]["min"], w["wall_s"]["min"])
    ratios["floor_wall_s"] = ratio(f["wall_s"]["median"], w["wall_s"]["median"])
    steps = {s: stats(r["steps"][s] for r in runs["agent"])["median"] for s in STEPS}
    steps["outside steps"] = stats(r["wall_s"] - sum(r["steps"].values()) for r in runs["agent"])["median"]
    ok = ratios["wall_s"] <= GOAL_RATIO

    def row(what: str, key: str, pick: str = "median", ratio_key: str = "") -> str:
        cells = [a[key][pick], w[key][pick]]
        text = [f"{c:.0f} MiB" for c in cells] if key == "maxrss_mib" else map(common.s, cells)
        return f"| {what} | " + " | ".join(text) + f" | {common.r(ratios.get(ratio_key or key))} |"

    report = [f"### `run --once` (cached image, {len(files)}-file stack, fake Quay) against the init "
              "script of Quay's HA guide", "", "| | `quay-bootstrap run --once` | init script | ratio |",
              "|---|---:|---:|---:|", row("until Quay answers 200, median", "wall_s"),
              row("fastest run", "wall_s", "min", "wall_min"),
              row("client CPU (user + system, with child processes)", "cpu_s"),
              row("moto server CPU", "server_cpu_s", ratio_key="-"),
              row("dockerd + containerd CPU", "docker_cpu_s", ratio_key="-"),
              row("peak RSS", "maxrss_mib"), "",
              f"Goal: {GOAL_RATIO}x the init script's time or less: {common.met(ok)} "
              f"({ratios['wall_s']:.2f}). The floor of any agent on the design card's libraries "
              f"(Python, botocore, the docker SDK, structlog and tenacity imported, one S3 client, "
              f"one call to the store and one to Docker, nothing done) took "
              f"{common.s(f['wall_s']['median'])} ({common.r(ratios['floor_wall_s'])} of the script). "
              "Where the agent's time goes (medians of its `<step>.done` lines): "
              + ", ".join(f"{k} {v:.2f} s" for k, v in steps.items())
              + f". Medians of {args.rounds} rounds after {args.warmup} warm-up."]
    return {"params": {"files": len(files), "rounds": args.rounds, "warmup": args.warmup,
                       "poll_s": POLL_S}, "init_script": INIT_SCRIPT, "summary": summary,
            "steps": steps, "ratios": ratios,
            "goals": {"wall_ratio": {"max": GOAL_RATIO, "got": ratios["wall_s"], "met": ok}},
            "report": report, "runs": runs}


if __name__ == "__main__":
    sys.exit(common.main("once_vs_init_script", __doc__, body))
