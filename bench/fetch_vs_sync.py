"""Benchmark: `quay-bootstrap fetch` of a 1,000-file stack from moto, side by side with `aws s3 sync`.

Usage: python bench/fetch_vs_sync.py [--rounds 5] [--files 1000] [--size 2048] [--json PATH]

Starts its own moto server on 127.0.0.1 (or uses the test bed's when $TESTBED_DIR/testbed.json
names one), uploads FILES objects of SIZE random bytes plus a valid config.yaml under
conf/stack/, then alternates, each round, four measured runs:

    agent_full       quay-bootstrap fetch into an empty stack.dir (downloads every object)
    agent_nochange   quay-bootstrap fetch again on that dir, nothing changed in the bucket
    aws_full         aws s3 sync of the same prefix into an empty dir
    aws_nochange     aws s3 sync again on that dir

Every run is checked (exit status 0, every file present with the uploaded bytes, nothing else);
a failing run stops the benchmark, since timing it would be worthless. Wall time is measured
around each child; peak RSS and CPU time come from os.wait4 on that child. Results go to stdout
and to bench/results/fetch_vs_sync.json. Exit status: 0 ok, 1 a run failed, 2 a tool is missing.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

# Both benchmarks measure children the same way; the script's folder is on sys.path.
from cli_startup import measure as measure_child
from cli_startup import tool

HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "results" / "fetch_vs_sync.json"
HOST = "127.0.0.1"
PREFIX = "conf/stack"
GOAL_FULL_RATIO = 0.5
VARIANTS = ("agent_full", "agent_nochange", "aws_full", "aws_nochange")

# The shape of a real Quay config.yaml (every key Quay's schema requires). http, so the stack
# needs no ssl.cert/ssl.key; the values are placeholders nothing connects to.
QUAY_CONFIG = b"""\
PREFERRED_URL_SCHEME: http
SERVER_HOSTNAME: quay.example.com
DB_URI: postgresql://quay:Sup3rS3cretDB@db.example.com/quay
AUTHENTICATION_TYPE: Database
DISTRIBUTED_STORAGE_CONFIG:
  default: [S3Storage, {s3_bucket: b, s3_access_key: AKIAEXAMPLE1234, s3_secret_key: StorageS3cretKey}]
DISTRIBUTED_STORAGE_PREFERENCE: [default]
BUILDLOGS_REDIS: {host: redis, port: 6379, password: RedisPassw0rd}
USER_EVENTS_REDIS: {host: redis, port: 6379, password: RedisPassw0rd}
DEFAULT_TAG_EXPIRATION: 2w
TAG_EXPIRATION_OPTIONS: [2w]
SETUP_COMPLETE: true
SECRET_KEY: TheSecretKeyValue
DATABASE_SECRET_KEY: TheDatabaseSecretKey
"""


class BenchError(Exception):
    """A run failed or the set-up did not work; the message says which and why."""


class MissingTool(BenchError):
    pass

def finish(result: dict, path: Path) -> int:
    """Write a benchmark's result as JSON and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwritten: {path}")
    return 0


def failed(err: BenchError, work: Path, args) -> int:
    """A benchmark that could not measure: a missing tool exits 2; a failed run exits 1 and
    keeps its work folder (the logs) for a look."""
    if isinstance(err, MissingTool):
        print(err, file=sys.stderr)
        return 2
    print(f"FAIL: {err}", file=sys.stderr)
    print(f"(logs kept in {work})", file=sys.stderr)
    args.keep = True
    return 1



# ---------------------------------------------------------------- tools and environment


def child_env(work: Path, pycache: Path) -> dict[str, str]:
    """The environment of every measured child: fixed test credentials, no user AWS config.

    Bytecode is cached under `pycache` (PYTHONPYCACHEPREFIX) so the children run from compiled
    modules, as an installed package does, without writing anything into the source tree.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE=str(work / "no-such-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(work / "no-such-aws-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
        PYTHONPYCACHEPREFIX=str(pycache),
    )
    return env


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine(aws: str, env: dict[str, str]) -> dict[str, object]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    aws_version = subprocess.run([aws, "--version"], capture_output=True, text=True, env=env,
                                 check=False)
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "moto": _version("moto"),
        "boto3": _version("boto3"),
        "botocore": _version("botocore"),
        "aws_cli": (aws_version.stdout or aws_version.stderr).strip(),
        "quay_bootstrap": _version("quay-bootstrap"),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


# ---------------------------------------------------------------- moto


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    """Whether an HTTP server answers at url. Any status counts: a moto holding state it cannot
    serialize (Auto Scaling groups, say) answers 500 on /moto-api/data.json."""
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


def testbed_moto() -> tuple[str | None, int | None]:
    """The test bed's moto endpoint (and PID) when $TESTBED_DIR/testbed.json names one that answers."""
    directory = os.environ.get("TESTBED_DIR")
    if not directory:
        return None, None
    try:
        state = json.loads((Path(directory) / "testbed.json").read_text())
    except (OSError, ValueError):
        return None, None
    endpoint = state.get("moto_endpoint") if isinstance(state, dict) else None
    if not endpoint or not _answers(f"{endpoint}/moto-api/data.json"):
        return None, None
    pid = (state.get("pids") or {}).get("moto")
    return str(endpoint), (int(pid) if pid else None)


def cpu_seconds(pid: int | None) -> float | None:
    """User+system CPU seconds a process has used so far (None when it cannot be read)."""
    if not pid:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class MotoServer:
    """A moto_server of our own on a free loopback port; stopped by its PID only."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.proc: subprocess.Popen | None = None
        self.endpoint = ""

    def start(self) -> str:
        binary = tool("moto_server")
        if not binary:
            raise MissingTool("moto_server not found next to the interpreter nor on PATH; "
                              "install it with: pip install 'moto[server]'")
        port = _free_port()
        self.endpoint = f"http://{HOST}:{port}"
        with open(self.work / "moto.log", "ab") as log:
            self.proc = subprocess.Popen([binary, "-H", HOST, "-p", str(port)],
                                         stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"moto_server exited with {self.proc.returncode}; "
                                 f"see {self.work / 'moto.log'}")
            if _answers(f"{self.endpoint}/moto-api/data.json"):
                return self.endpoint
            time.sleep(0.05)
        raise BenchError(f"moto_server did not answer on {self.endpoint} within 30 s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


# ---------------------------------------------------------------- the stack in the bucket


def upload_stack(endpoint: str, bucket: str, files: int, size: int) -> dict[str, str]:
    """Create the bucket and upload the stack; returns {relative path: sha256} to verify against."""
    import boto3  # the benchmark's own set-up; the children are what is measured

    client = boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=bucket)
    stack = {"config.yaml": QUAY_CONFIG}
    for i in range(files):
        # 100 files per folder, like a stack with several folders of certificates and extras.
        stack[f"d{i // 100:02d}/f{i:04d}.bin"] = os.urandom(size)
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda item: client.put_object(Bucket=bucket, Key=f"{PREFIX}/{item[0]}",
                                                     Body=item[1]), stack.items()))
    return {key: hashlib.sha256(data).hexdigest() for key, data in stack.items()}


def delete_bucket(endpoint: str, bucket: str) -> None:
    import boto3

    client = boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing")
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", ())]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
    client.delete_bucket(Bucket=bucket)


# ---------------------------------------------------------------- measuring and checking


def measure(argv: list[str], env: dict[str, str], log_prefix: Path,
            server_pid: int | None = None) -> dict[str, float | None]:
    """Run argv once: wall time around the child, its own peak RSS and CPU (see cli_startup).

    The object store's CPU seconds over the run are recorded too (when its PID is known): moto
    answers from one Python process, so its CPU bounds how fast any client can be.
    Raises BenchError (with the tail of its output) when it exits non-zero.
    """
    out_path, err_path = log_prefix.with_suffix(".out"), log_prefix.with_suffix(".err")
    server_before = cpu_seconds(server_pid)
    try:
        got = measure_child(argv, env, str(out_path), str(err_path))
    except RuntimeError as err:
        raise BenchError(str(err)) from err
    server_after = cpu_seconds(server_pid)
    if got["exit"] != 0:
        tail = out_path.read_text(errors="replace") + err_path.read_text(errors="replace")
        raise BenchError(f"{' '.join(argv)} exited with {got['exit']}:\n"
                         + "\n".join(tail.strip().splitlines()[-20:]))
    got["server_cpu_s"] = (server_after - server_before
                           if server_before is not None and server_after is not None else None)
    return got


def verify_tree(root: Path, expected: dict[str, str], what: str) -> None:
    """Every expected file under root with the uploaded bytes, and nothing else."""
    found: dict[str, str] = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder, name)
            found[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    if found != expected:
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        wrong = sorted(k for k in set(found) & set(expected) if found[k] != expected[k])
        raise BenchError(f"{what}: {len(found)} files in {root}, expected {len(expected)}; "
                         f"missing {missing[:5]}, extra {extra[:5]}, wrong bytes {wrong[:5]}")


@dataclass(frozen=True)
class Setup:
    """What every measured run shares."""

    work: Path
    endpoint: str
    bucket: str
    env: dict[str, str]
    expected: dict[str, str]
    server_pid: int | None


def agent_config(setup: Setup, name: str) -> Path:
    path = setup.work / f"{name}.yaml"
    # JSON is YAML; no quoting questions for paths or URLs.
    path.write_text(json.dumps({
        "stack": {"source": f"s3://{setup.bucket}/{PREFIX}", "endpoint_url": setup.endpoint,
                  "region": "us-east-1", "dir": str(setup.work / name)},
        "image": {"reference": "quay.io/projectquay/quay:v3.9.0"},
    }, indent=1))
    return path


def agent_pair(qb: str, setup: Setup, name: str) -> tuple[dict, dict]:
    """A full fetch into a new stack.dir, then the no-change refresh of the same dir."""
    work = setup.work
    argv = [qb, "--config", str(agent_config(setup, name)), "fetch", "--log-format", "json"]
    full = measure(argv, setup.env, work / f"{name}-full", setup.server_pid)
    if "applied" not in (work / f"{name}-full.out").read_text():
        raise BenchError(f"agent full fetch {name}: did not report 'applied'")
    verify_tree((work / name / "current").resolve(), setup.expected, f"agent full fetch {name}")
    again = measure(argv, setup.env, work / f"{name}-nochange", setup.server_pid)
    if "unchanged" not in (work / f"{name}-nochange.out").read_text():
        raise BenchError(f"agent no-change fetch {name}: did not report 'unchanged'")
    verify_tree((work / name / "current").resolve(), setup.expected,
                f"agent no-change fetch {name}")
    return full, again


def aws_pair(aws: str, setup: Setup, name: str) -> tuple[dict, dict]:
    """`aws s3 sync` into a new dir, then again on the same dir."""
    target = setup.work / name
    target.mkdir()
    argv = [aws, "s3", "sync", f"s3://{setup.bucket}/{PREFIX}", str(target),
            "--endpoint-url", setup.endpoint, "--only-show-errors"]
    full = measure(argv, setup.env, setup.work / f"{name}-full", setup.server_pid)
    verify_tree(target, setup.expected, f"aws s3 sync {name}")
    again = measure(argv, setup.env, setup.work / f"{name}-nochange", setup.server_pid)
    verify_tree(target, setup.expected, f"aws s3 sync again {name}")
    return full, again


# ---------------------------------------------------------------- report


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    summary = {}
    for variant, items in runs.items():
        walls = [r["wall_s"] for r in items]
        server = [r["server_cpu_s"] for r in items if r["server_cpu_s"] is not None]
        summary[variant] = {
            "median_s": statistics.median(walls), "min_s": min(walls), "max_s": max(walls),
            "median_cpu_s": statistics.median(r["user_s"] + r["sys_s"] for r in items),
            "median_server_cpu_s": statistics.median(server) if server else None,
            "median_maxrss_mib": statistics.median(r["maxrss_mib"] for r in items),
            "max_maxrss_mib": max(r["maxrss_mib"] for r in items),
        }
    return summary


def ratios_of(summary: dict[str, dict]) -> dict[str, float]:
    agent, aws = summary["agent_full"], summary["aws_full"]
    return {
        "full": agent["median_s"] / aws["median_s"],
        "full_min": agent["min_s"] / aws["min_s"],
        "nochange": summary["agent_nochange"]["median_s"] / summary["aws_nochange"]["median_s"],
        "full_client_cpu": agent["median_cpu_s"] / aws["median_cpu_s"],
        "full_rss": agent["median_maxrss_mib"] / aws["median_maxrss_mib"],
    }


def table(summary: dict[str, dict], ratios: dict[str, float]) -> str:
    rows = [(f"{'variant':<16} {'median s':>9} {'min s':>7} {'max s':>7} {'client cpu s':>13} "
            f"{'moto cpu s':>11} {'peak RSS MiB':>13}")]
    for variant in VARIANTS:
        s = summary[variant]
        server = s["median_server_cpu_s"]
        rows.append(f"{variant:<16} {s['median_s']:>9.3f} {s['min_s']:>7.3f} {s['max_s']:>7.3f} "
                    f"{s['median_cpu_s']:>13.3f} "
                    f"{format(server, '.3f') if server is not None else '-':>11} "
                    f"{s['median_maxrss_mib']:>13.1f}")
    met = "met" if ratios["full"] <= GOAL_FULL_RATIO else "NOT MET"
    rows += [
        "",
        (f"ratio agent/aws, full fetch, medians:     {ratios['full']:.3f}   "
        f"(goal <= {GOAL_FULL_RATIO}: {met})"),
        f"ratio agent/aws, full fetch, minimums:    {ratios['full_min']:.3f}",
        f"ratio agent/aws, no change, medians:      {ratios['nochange']:.3f}",
        f"ratio agent/aws, full fetch, client CPU:  {ratios['full_client_cpu']:.3f}",
        f"ratio agent/aws, full fetch, peak RSS:    {ratios['full_rss']:.3f}",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="unmeasured rounds first, to fill caches (default 1)")
    parser.add_argument("--files", type=int, default=1000, help="objects besides config.yaml")
    parser.add_argument("--size", type=int, default=2048, help="bytes per object")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, stacks)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be at least 1 and --warmup at least 0")

    qb, aws = tool("quay-bootstrap"), tool("aws")
    if not qb:
        print("quay-bootstrap is not installed next to the interpreter nor on PATH; "
              "run `pip install -e .` first", file=sys.stderr)
        return 2
    if not aws:
        print("aws (the AWS CLI) is not installed next to the interpreter nor on PATH.\n"
              f"Install it with: {sys.executable} -m pip install awscli\n"
              "(`make bench` installs the project's `bench` extra, which brings it.)",
              file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="qb-bench-fetch-"))
    env = child_env(work, HERE / "results" / ".pycache")
    moto = MotoServer(work)
    bucket = f"qb-bench-{secrets.token_hex(4)}"
    endpoint, server_pid = testbed_moto()
    moto_source = "test bed ($TESTBED_DIR)" if endpoint else "own moto_server"
    uploaded = False
    try:
        if not endpoint:
            endpoint = moto.start()
            server_pid = moto.proc.pid if moto.proc else None
        info = machine(aws, env)
        print(f"machine: {info['nproc']} cores ({info['cpu']}), {info['os']}, "
              f"Python {info['python']}, moto {info['moto']}, {info['aws_cli']}, "
              f"quay-bootstrap {info['quay_bootstrap']}; load average {info['loadavg']}")
        if info["loadavg"][0] > 0.5:
            print("note: the machine is busy (1-minute load average above 0.5); "
                  "the figures will be noisy", flush=True)
        print(f"moto: {endpoint} ({moto_source}); uploading {args.files} x {args.size} B + "
              f"config.yaml to s3://{bucket}/{PREFIX} ...", flush=True)
        uploaded = True
        setup = Setup(work, endpoint, bucket, env,
                      upload_stack(endpoint, bucket, args.files, args.size), server_pid)

        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for n in range(args.warmup + args.rounds):
            warm = n < args.warmup
            label = f"warm-up {n + 1}" if warm else f"round {n - args.warmup + 1}/{args.rounds}"
            # Alternate which tool goes first so neither always runs on a warmer machine.
            got: dict[str, tuple[dict, dict]] = {}
            for who in (("agent", "aws") if n % 2 == 0 else ("aws", "agent")):
                got[who] = (agent_pair(qb, setup, f"stack{n}") if who == "agent"
                            else aws_pair(aws, setup, f"sync{n}"))
            print(f"  {label}: agent {got['agent'][0]['wall_s']:.3f} s / "
                  f"{got['agent'][1]['wall_s']:.3f} s, aws {got['aws'][0]['wall_s']:.3f} s / "
                  f"{got['aws'][1]['wall_s']:.3f} s (full / no change)", flush=True)
            if not warm:
                for i, kind in enumerate(("full", "nochange")):
                    runs[f"agent_{kind}"].append(got["agent"][i])
                    runs[f"aws_{kind}"].append(got["aws"][i])

        summary = summarize(runs)
        ratios = ratios_of(summary)
        print()
        print(table(summary, ratios))
        info["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        result = {
            "benchmark": "fetch_vs_sync",
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": info,
            "params": {"files": args.files + 1, "object_bytes": args.size,
                       "rounds": args.rounds, "warmup": args.warmup, "moto": moto_source},
            "commands": {
                "agent": "quay-bootstrap --config CFG fetch --log-format json",
                "aws": f"aws s3 sync s3://BUCKET/{PREFIX} DIR --endpoint-url URL "
                       "--only-show-errors",
            },
            "summary": summary,
            "ratios": ratios,
            "goal": {"full_ratio_max": GOAL_FULL_RATIO, "met": ratios["full"] <= GOAL_FULL_RATIO},
            "runs": runs,
        }
        return finish(result, args.json)
    except BenchError as err:
        return failed(err, work, args)
    finally:
        if moto.proc is None and uploaded:
            try:
                delete_bucket(endpoint, bucket)  # the test bed's moto outlives us: tidy it
            except Exception as err:  # noqa: BLE001 - tidying must not hide the result
                print(f"note: could not delete s3://{bucket}: {err}", file=sys.stderr)
        moto.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
