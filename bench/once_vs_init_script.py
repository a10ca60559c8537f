"""Benchmark: a full `quay-bootstrap run --once` against the init script of Quay's HA guide.

Usage: python bench/once_vs_init_script.py [--rounds 5] [--warmup 1] [--json PATH] [--keep]

Uses the test bed named by $TESTBED_DIR when it runs, else starts one of its own (private
dockerd, registry, moto; tests/testbed/bed.py) and stops it at the end. Set-up, not measured:
the 21-file sample conf/stack (tests/testbed/stacks.py) goes to a new bucket on the bed's moto,
and the fake Quay image (tests/testbed/fake_quay.py) is built and pushed to the bed's registry
once; it stays in the daemon, so both sides start with the image cached. Then, each round, the
two sides run one after the other, alternating which goes first:

    agent    quay-bootstrap --config CFG run --once   (fresh stack.dir, no container present)
    script   bash user-data.sh: aws s3 sync + docker pull + docker run + curl until 200 (INIT_SCRIPT)

Both run the same image with host networking on a port of their own, under container names of
their own, and wait for the first 200 of /health/instance polling every 0.25 s (the agent's
START_POLL). After every run, outside the timing, the run is checked (exit status 0, the
container running the fake Quay image, /health/instance answering 200 with every service true,
the fake Quay started exactly once, the folder mounted at /conf/stack holding the 21 uploaded
files byte for byte) and its container is removed; a failing run stops the benchmark.

Wall time is measured around each child; its peak RSS and CPU time (with those of its own
children: aws, docker, curl for the script) come from the launcher of cli_startup. The CPU
seconds moto and dockerd + containerd spend during each run are recorded too. The agent's own
step timings (its JSON log lines `<step>.done`) show where its time goes. Results go to stdout
and to bench/results/once_vs_init_script.json. Exit status: 0 ok (a goal not met is reported,
not an error), 1 a run failed, 2 a tool or the test bed is missing.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

# Every benchmark measures children the same way; the script's folder is on sys.path.
from cli_startup import tool
from fetch_vs_sync import (
    BenchError,
    MissingTool,
    child_env,
    cpu_seconds,
    delete_bucket,
    failed,
    finish,
    machine,
    measure,
    verify_tree,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_JSON = HERE / "results" / "once_vs_init_script.json"
HOST = "127.0.0.1"
PREFIX = "conf/stack"
GOAL_RATIO = 0.7
VARIANTS = ("agent", "script")
DOCKER_CLI = "/usr/local/bin/docker"
# A release-shaped tag, which the agent's default image.allowed_tags accepts; only this
# benchmark builds it, and it removes it from the daemon at the end.
IMAGE_TAG = "v3.9.0-bench"
# Both sides: the agent's START_POLL (quay_bootstrap/pipeline.py), its default health timeout and
# the start period written into its config.
POLL_S = 0.25
PROBE_TIMEOUT_S = 5
START_PERIOD_S = 60
AGENT_STEPS = ("stack", "lock", "image", "container", "health")

# What an operator puts in a node's user data when following Quay's HA guide; the benchmark
# fills in the {placeholders} (shell-quoted) for each run. The deadline only keeps a broken run
# from hanging the benchmark; a healthy run never reaches it.
INIT_SCRIPT = """\
#!/bin/bash
# Quay node bootstrap: conf/stack from the bucket, the pinned image, run, wait until healthy.
set -e
{aws} s3 sync s3://{bucket}/{prefix} {stack} --endpoint-url {endpoint} --only-show-errors
{docker} pull {image}
{docker} run -d --name {name} --restart=always --network host -e PORT={port} \\
  -v {stack}:/conf/stack:ro -v {control}:/control {image}
deadline=$((SECONDS + {start_period}))
until curl -fsS --max-time {probe_timeout} http://127.0.0.1:{port}/health/instance >/dev/null; do
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "Quay is not healthy after {start_period} s" >&2
    exit 1
  fi
  sleep {poll}
done
"""


# ---------------------------------------------------------------- test bed and set-up


def _testbed():
    """tests.testbed's modules (the repository root is not on sys.path when run as a script)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.testbed import bed, fake_quay, stacks

    return bed, fake_quay, stacks


def open_bed(work: Path) -> tuple[dict, bool]:
    """The bed of $TESTBED_DIR when it runs, else a new one under work; (state, ours)."""
    bed, _, _ = _testbed()
    directory = os.environ.get("TESTBED_DIR")
    if directory and bed.is_running(directory):
        return bed.load(directory), False
    if directory:
        print(f"note: no running test bed in $TESTBED_DIR={directory}; starting one", flush=True)
    try:
        return bed.start(work / "bed"), True
    except bed.TestbedError as err:
        raise MissingTool(f"could not start a test bed: {err}\n"
                          "Install what it needs with tests/testbed/install-debian.sh "
                          "(`make deps`).") from err


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def upload_stack(endpoint: str, bucket: str, files: dict[str, bytes]) -> None:
    import boto3  # the benchmark's own set-up; the children are what is measured

    client = boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=bucket)
    for key, data in files.items():
        client.put_object(Bucket=bucket, Key=f"{PREFIX}/{key}", Body=data)


def docker_client(docker_host: str):
    import docker

    return docker.DockerClient(base_url=docker_host, version="auto", timeout=60)


# ---------------------------------------------------------------- one run of each side


class Bench:
    """What every run shares, and the two kinds of run."""

    def __init__(self, work: Path, state: dict, env: dict[str, str], client, image: str,
                 bucket: str, expected: dict[str, str], qb: str, aws: str, token: str) -> None:
        self.work, self.state, self.env, self.client = work, state, env, client
        self.image, self.image_id = image, client.images.get(image).id
        self.bucket, self.expected, self.qb, self.aws = bucket, expected, qb, aws
        self.names = {"agent": f"qb-bench-{token}-agent", "script": f"qb-bench-{token}-script"}
        pids = state.get("pids") or {}
        self.moto_pid = pids.get("moto")
        self.daemon_pids = [pids.get("dockerd"), pids.get("containerd")]

    def _daemon_cpu(self) -> float | None:
        seconds = [cpu_seconds(pid) for pid in self.daemon_pids if pid]
        return None if not seconds or None in seconds else sum(seconds)

    def _prepare(self, variant: str, n: int) -> tuple[Path, Path, int]:
        """A new folder for the run (its stack.dir does not exist yet), a control folder the
        fake Quay (uid 1001) can write, a free port; and no container under the name."""
        run_dir = self.work / f"{variant}{n}"
        control = run_dir / "control"
        control.mkdir(parents=True)
        os.chmod(control, 0o777)
        self.remove(variant)
        return run_dir, control, free_port()

    def _measure(self, argv: list[str], log_prefix: Path) -> dict:
        before = self._daemon_cpu()
        got = measure(argv, self.env, log_prefix, self.moto_pid)
        after = self._daemon_cpu()
        got["docker_cpu_s"] = after - before if before is not None and after is not None else None
        return got

    def agent(self, n: int) -> dict:
        run_dir, control, port = self._prepare("agent", n)
        stack = run_dir / "stack"
        config = run_dir / "agent.yaml"
        # JSON is YAML. The node's settings of tests/testbed/demo.py: host networking on a
        # loopback port instead of Quay's published 443 and 80.
        config.write_text(json.dumps({
            "stack": {"source": f"s3://{self.bucket}/{PREFIX}",
                      "endpoint_url": self.state["moto_endpoint"], "region": "us-east-1",
                      "dir": str(stack)},
            "image": {"reference": self.image},
            "container": {"name": self.names["agent"], "network_mode": "host", "ports": [],
                          "sysctls": {}, "env": {"PORT": str(port)},
                          "volumes": [f"{control}:/control"]},
            "health": {"url": f"http://{HOST}:{port}/health/instance",
                       "start_period": f"{START_PERIOD_S}s", "timeout": f"{PROBE_TIMEOUT_S}s"},
        }, indent=1))
        log = run_dir / "run"
        got = self._measure([self.qb, "--config", str(config), "run", "--once"], log)
        out = log.with_suffix(".out").read_text(errors="replace")
        if "node healthy" not in out:
            raise BenchError(f"agent run {n}: did not report 'node healthy':\n{out[-2000:]}")
        self.verify("agent", n, port, control, stack)
        got["steps"] = agent_steps(log.with_suffix(".err"))
        missing = [s for s in AGENT_STEPS if s not in got["steps"]]
        if missing:
            raise BenchError(f"agent run {n}: no `<step>.done` log line for {missing}")
        return got

    def script(self, n: int) -> dict:
        run_dir, control, port = self._prepare("script", n)
        stack = run_dir / "stack"
        path = run_dir / "user-data.sh"
        values = {"aws": self.aws, "docker": DOCKER_CLI, "bucket": self.bucket, "prefix": PREFIX,
                  "stack": str(stack), "endpoint": self.state["moto_endpoint"],
                  "image": self.image, "name": self.names["script"], "port": port,
                  "control": str(control), "start_period": START_PERIOD_S,
                  "probe_timeout": PROBE_TIMEOUT_S, "poll": POLL_S}
        path.write_text(INIT_SCRIPT.format(**{k: shlex.quote(str(v)) for k, v in values.items()}))
        got = self._measure(["/bin/bash", str(path)], run_dir / "run")
        self.verify("script", n, port, control, stack)
        return got

    # ------------------------------------------------------------ checks and clean-up

    def verify(self, variant: str, n: int, port: int, control: Path, stack_dir: Path) -> None:
        """The container runs the fake Quay, once, healthy, on the uploaded conf/stack."""
        import docker

        what = f"{variant} run {n}"
        try:
            found = self.client.api.inspect_container(self.names[variant])
        except docker.errors.NotFound:
            raise BenchError(f"{what}: no container named {self.names[variant]}") from None
        if not found["State"].get("Running"):
            raise BenchError(f"{what}: container {self.names[variant]} is "
                             f"{found['State'].get('Status')}, not running")
        if found["Image"] != self.image_id:
            raise BenchError(f"{what}: container runs {found['Image']}, not {self.image_id}")
        mounts = {m["Destination"]: m for m in found.get("Mounts") or []}
        if "/conf/stack" not in mounts:
            raise BenchError(f"{what}: nothing mounted at /conf/stack")
        source = Path(mounts["/conf/stack"]["Source"])
        if stack_dir.resolve() not in (source, *source.parents):
            raise BenchError(f"{what}: /conf/stack is {source}, not under {stack_dir}")
        verify_tree(source, self.expected, f"{what}, /conf/stack ({source})")
        url = f"http://{HOST}:{port}/health/instance"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                status, body = response.status, response.read()
        except (urllib.error.URLError, OSError) as err:
            raise BenchError(f"{what}: {url} does not answer 200: {err}") from err
        try:
            services = json.loads(body)["data"]["services"]
        except (ValueError, KeyError, TypeError):
            services = {}
        if status != 200 or not services or not all(services.values()):
            raise BenchError(f"{what}: {url} answered {status} {body[:200]!r}")
        starts_file = control / "starts"
        starts = starts_file.read_text().splitlines() if starts_file.exists() else []
        if len(starts) != 1:
            raise BenchError(f"{what}: the fake Quay started {len(starts)} times, not once")

    def remove(self, variant: str) -> None:
        """Remove this benchmark's container of that side, if there is one (its own name)."""
        import docker

        try:
            self.client.api.remove_container(self.names[variant], force=True)
        except docker.errors.NotFound:
            pass


def agent_steps(stderr: Path) -> dict[str, float]:
    """{step: seconds} from the agent's JSON log lines `<step>.done`."""
    steps = {}
    for line in stderr.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        name = str(event.get("event", "")) if isinstance(event, dict) else ""
        if name.endswith(".done") and isinstance(event.get("seconds"), (int, float)):
            steps[name[:-len(".done")]] = float(event["seconds"])
    return steps


# ---------------------------------------------------------------- report


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    def median_of(items: list[dict], key: str) -> float | None:
        values = [r[key] for r in items if r.get(key) is not None]
        return statistics.median(values) if values else None

    summary = {}
    for variant, items in runs.items():
        walls = [r["wall_s"] for r in items]
        summary[variant] = {
            "median_s": statistics.median(walls), "min_s": min(walls), "max_s": max(walls),
            "median_cpu_s": statistics.median(r["user_s"] + r["sys_s"] for r in items),
            "median_server_cpu_s": median_of(items, "server_cpu_s"),
            "median_docker_cpu_s": median_of(items, "docker_cpu_s"),
            "median_maxrss_mib": statistics.median(r["maxrss_mib"] for r in items),
            "max_maxrss_mib": max(r["maxrss_mib"] for r in items),
        }
    agent = runs["agent"]
    steps = {s: statistics.median(r["steps"][s] for r in agent) for s in AGENT_STEPS}
    # Interpreter start-up, imports, config, the Docker connection, exit: all but the steps.
    steps["outside steps"] = statistics.median(
        r["wall_s"] - sum(r["steps"][s] for s in AGENT_STEPS) for r in agent)
    summary["agent"]["median_steps_s"] = steps
    return summary


def ratios_of(summary: dict[str, dict]) -> dict[str, float]:
    agent, script = summary["agent"], summary["script"]
    return {
        "wall": agent["median_s"] / script["median_s"],
        "wall_min": agent["min_s"] / script["min_s"],
        "client_cpu": agent["median_cpu_s"] / script["median_cpu_s"],
        "rss": agent["median_maxrss_mib"] / script["median_maxrss_mib"],
    }


def table(summary: dict[str, dict], ratios: dict[str, float]) -> str:
    def cell(value: float | None) -> str:
        return format(value, ".3f") if value is not None else "-"

    rows = [(f"{'side':<8} {'median s':>9} {'min s':>7} {'max s':>7} {'client cpu s':>13} "
             f"{'moto cpu s':>11} {'dockerd cpu s':>14} {'peak RSS MiB':>13}")]
    for variant in VARIANTS:
        s = summary[variant]
        rows.append(f"{variant:<8} {s['median_s']:>9.3f} {s['min_s']:>7.3f} {s['max_s']:>7.3f} "
                    f"{s['median_cpu_s']:>13.3f} {cell(s['median_server_cpu_s']):>11} "
                    f"{cell(s['median_docker_cpu_s']):>14} {s['median_maxrss_mib']:>13.1f}")
    met = "met" if ratios["wall"] <= GOAL_RATIO else "NOT MET"
    steps = summary["agent"]["median_steps_s"]
    rows += [
        "",
        f"ratio agent/script, wall, medians:    {ratios['wall']:.3f}   (goal <= {GOAL_RATIO}: {met})",
        f"ratio agent/script, wall, minimums:   {ratios['wall_min']:.3f}",
        f"ratio agent/script, client CPU:       {ratios['client_cpu']:.3f}",
        f"ratio agent/script, peak RSS:         {ratios['rss']:.3f}",
        "",
        "agent steps, medians: " + ", ".join(f"{k} {v:.3f} s" for k, v in steps.items()),
    ]
    return "\n".join(rows)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="unmeasured rounds first, to fill caches (default 1)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work dir (logs, stacks, scripts, agent configs)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be at least 1 and --warmup at least 0")

    qb, aws = tool("quay-bootstrap"), tool("aws")
    missing = [what for what, found in (
        ("quay-bootstrap (run `pip install -e .`)", qb),
        (f"aws, the AWS CLI ({sys.executable} -m pip install awscli; `make bench` installs the "
         "project's `bench` extra, which brings it)", aws),
        (f"{DOCKER_CLI} (the Docker CLI)", os.access(DOCKER_CLI, os.X_OK)),
        ("curl", shutil.which("curl")),
        ("bash", os.access("/bin/bash", os.X_OK))) if not found]
    if missing:
        print("missing: " + "; ".join(missing), file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="qb-bench-once-"))
    token = secrets.token_hex(4)
    bucket = f"qb-bench-{token}"
    state: dict = {}
    ours = uploaded = False
    client = bench = image = None
    try:
        state, ours = open_bed(work)
        _, fake_quay, stacks = _testbed()
        docker_config = work / "docker-config"  # never ~/.docker/config.json, for CLI or SDK
        docker_config.mkdir()
        (docker_config / "config.json").write_text("{}\n")
        os.environ["DOCKER_CONFIG"] = str(docker_config)
        env = child_env(work, HERE / "results" / ".pycache")
        env.update(DOCKER_HOST=state["docker_host"], DOCKER_CONFIG=str(docker_config))

        info = machine(aws, env)
        client = docker_client(state["docker_host"])
        cli_version = subprocess.run([DOCKER_CLI, "version", "--format", "{{.Client.Version}}"],
                                     capture_output=True, text=True, env=env, check=False)
        info["docker_cli"] = cli_version.stdout.strip() or "?"
        info["dockerd"] = client.version().get("Version", "?")
        print(f"machine: {info['nproc']} cores ({info['cpu']}), {info['os']}, "
              f"Python {info['python']}, moto {info['moto']}, {info['aws_cli']}, "
              f"docker CLI {info['docker_cli']}, dockerd {info['dockerd']}, "
              f"quay-bootstrap {info['quay_bootstrap']}; load average {info['loadavg']}")
        if info["loadavg"][0] > 0.5:
            print("note: the machine is busy (1-minute load average above 0.5); "
                  "the figures will be noisy", flush=True)

        files = stacks.sample_stack()
        print(f"test bed: {'started for this run' if ours else 'TESTBED_DIR=' + state['dir']}; "
              f"uploading {len(files)} files to s3://{bucket}/{PREFIX} on "
              f"{state['moto_endpoint']}; building the fake Quay ...", flush=True)
        uploaded = True
        upload_stack(state["moto_endpoint"], bucket, files)
        expected = {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}
        image = fake_quay.build(client, state["registry"], IMAGE_TAG)
        bench = Bench(work, state, env, client, image, bucket, expected, qb, aws, token)

        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for n in range(args.warmup + args.rounds):
            warm = n < args.warmup
            label = f"warm-up {n + 1}" if warm else f"round {n - args.warmup + 1}/{args.rounds}"
            got = {}
            # Alternate which side goes first so neither always runs on a warmer machine.
            for who in (VARIANTS if n % 2 == 0 else VARIANTS[::-1]):
                got[who] = bench.agent(n) if who == "agent" else bench.script(n)
                bench.remove(who)
            print(f"  {label}: agent {got['agent']['wall_s']:.3f} s, "
                  f"script {got['script']['wall_s']:.3f} s", flush=True)
            if not warm:
                for who in VARIANTS:
                    runs[who].append(got[who])

        summary = summarize(runs)
        ratios = ratios_of(summary)
        print()
        print(table(summary, ratios))
        info["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        result = {
            "benchmark": "once_vs_init_script",
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": info,
            "params": {"files": len(files), "stack_bytes": sum(map(len, files.values())),
                       "rounds": args.rounds, "warmup": args.warmup, "poll_s": POLL_S,
                       "testbed": "own" if ours else "$TESTBED_DIR"},
            "commands": {
                "agent": "quay-bootstrap --config CFG run --once",
                "script": "bash user-data.sh: aws s3 sync + docker pull + docker run + "
                          f"curl every {POLL_S} s until 200",
            },
            "init_script": INIT_SCRIPT,
            "summary": summary,
            "ratios": ratios,
            "goal": {"ratio_max": GOAL_RATIO, "met": ratios["wall"] <= GOAL_RATIO},
            "runs": runs,
        }
        return finish(result, args.json)
    except BenchError as err:
        return failed(err, work, args)
    finally:
        cleanup(state, ours, uploaded, bucket, client, bench, image, work, args.keep)


def cleanup(state: dict, ours: bool, uploaded: bool, bucket: str, client, bench, image,
            work: Path, keep: bool) -> None:
    """Leave a shared bed as it was found: only what this run created goes."""
    notes = []
    if bench is not None:
        for variant in VARIANTS:
            try:
                bench.remove(variant)
            except Exception as err:  # noqa: BLE001 - tidying must not hide the result
                notes.append(f"container {bench.names[variant]}: {err}")
    if client is not None and image is not None and not ours:
        try:
            client.images.remove(image)
        except Exception as err:  # noqa: BLE001
            notes.append(f"image {image}: {err}")
    if uploaded and not ours:
        try:
            delete_bucket(state["moto_endpoint"], bucket)
        except Exception as err:  # noqa: BLE001
            notes.append(f"s3://{bucket}: {err}")
    if client is not None:
        client.close()
    if ours:
        bed, _, _ = _testbed()
        bed.stop(work / "bed")
    for note in notes:
        print(f"note: could not remove {note}", file=sys.stderr)
    if not keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
