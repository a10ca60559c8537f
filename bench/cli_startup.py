"""Benchmark: wall time of `quay-bootstrap --help` and `version`, against bare `python -c pass`.

Usage: python bench/cli_startup.py [--runs 20] [--json PATH]

Runs the three commands interleaved (so a burst of load hits all three alike), RUNS times each
after two unmeasured warm-up runs, and reports the median and minimum wall time, the ratio to
`python -c pass` with the same interpreter, and the peak RSS of each child (os.wait4). Then checks
with `python -X importtime -m quay_bootstrap --help` (and `version`) that no cloud SDK is
imported on those paths. Results go to stdout and to bench/results/cli_startup.json.
Exit status: 0 ok, 1 a forbidden import or a failing command, 2 quay-bootstrap is not installed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "results" / "cli_startup.json"
GOAL_HELP_MS = 150.0
# Top-level packages `--help` must never load (the SDKs are imported by the provider modules).
FORBIDDEN = ("boto3", "botocore", "google.cloud", "docker")


def tool(name: str) -> str | None:
    """The executable next to the running Python (its venv) first, then PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    return shutil.which(name)


def child_env() -> dict[str, str]:
    """The caller's environment, with bytecode cached under bench/results/.pycache.

    An installed package runs from compiled modules; PYTHONDONTWRITEBYTECODE in the caller's
    environment would otherwise make every run compile the project from source.
    """
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(HERE / "results" / ".pycache")
    return env


# Peak RSS must not be read with os.wait4 on a child of this process: the kernel folds the
# memory of the process that forked into the child's ru_maxrss at exec, so every child would
# look at least as big as the benchmark itself. A bare interpreter (-I -S, about 9.5 MiB) starts
# the command and reports its rusage instead; below that floor figures are not meaningful.
_LAUNCHER = """
import json, os, sys, time
out, err, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
           (os.POSIX_SPAWN_OPEN, 1, out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
           (os.POSIX_SPAWN_OPEN, 2, err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)]
started = time.perf_counter()
pid = os.posix_spawnp(argv[0], argv, os.environ, file_actions=actions)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - started
print(json.dumps({"exit": os.waitstatus_to_exitcode(status), "wall_s": wall,
                  "maxrss_mib": usage.ru_maxrss / 1024, "user_s": usage.ru_utime,
                  "sys_s": usage.ru_stime}))
"""


def measure(argv: list[str], env: dict[str, str], out: str = os.devnull,
            err: str = os.devnull) -> dict[str, float]:
    """Run argv once with env, stdout and stderr to the files `out` and `err`.

    Returns wall_s (around the child only, not the launcher), the child's maxrss_mib, user_s,
    sys_s and exit. The caller decides what a non-zero exit means.
    """
    done = subprocess.run([sys.executable, "-I", "-S", "-c", _LAUNCHER, out, err, *argv],
                          capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"could not run {argv[0]}: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout)


def _checked(argv: list[str], env: dict[str, str], err: Path) -> dict[str, float]:
    got = measure(argv, env, err=str(err))
    if got["exit"] != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {got['exit']}: "
                           f"{err.read_text(errors='replace').strip()[-500:]}")
    return got


def imported_modules(argv: list[str], env: dict[str, str]) -> dict[str, int]:
    """{module: cumulative import microseconds} from `python -X importtime ...`."""
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {done.returncode}: "
                           f"{done.stderr.strip()[-500:]}")
    modules = {}
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = (part.strip() for part in line.split(":", 1)[1].split("|"))
        if cumulative.isdigit():
            modules[name] = int(cumulative)
    return modules


def forbidden_in(modules: dict[str, int]) -> list[str]:
    return sorted(m for m in modules
                  if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="measured runs per command")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    qb = tool("quay-bootstrap")
    if not qb:
        print("quay-bootstrap is not installed next to the interpreter nor on PATH; "
              "run `pip install -e .` first", file=sys.stderr)
        return 2

    env = child_env()
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "quay-bootstrap --help": [qb, "--help"],
        "quay-bootstrap version": [qb, "version"],
    }
    print(f"machine: {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
          f"Python {platform.python_version()}; load average "
          f"{[round(x, 2) for x in os.getloadavg()]}", flush=True)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in commands}
    with tempfile.TemporaryDirectory(prefix="qb-bench-cli-") as work:
        try:
            for n in range(2 + args.runs):
                for name, command in commands.items():
                    got = _checked(command, env, Path(work) / "stderr")
                    if n >= 2:  # the first two fill the bytecode and page caches
                        runs[name].append(got)
        except RuntimeError as err:
            print(f"FAIL: {err}", file=sys.stderr)
            return 1

    baseline = statistics.median(r["wall_s"] * 1000 for r in runs["python -c pass"])
    summary = {}
    print(f"\n{'command':<24} {'median ms':>10} {'min ms':>8} {'vs python -c pass':>18} "
          f"{'peak RSS MiB':>13}")
    for name, items in runs.items():
        median = statistics.median(r["wall_s"] * 1000 for r in items)
        summary[name] = {
            "median_ms": median,
            "min_ms": min(r["wall_s"] * 1000 for r in items),
            "ratio_to_python": median / baseline,
            "median_maxrss_mib": statistics.median(r["maxrss_mib"] for r in items),
        }
        s = summary[name]
        print(f"{name:<24} {median:>10.1f} {s['min_ms']:>8.1f} {s['ratio_to_python']:>17.2f}x "
              f"{s['median_maxrss_mib']:>13.1f}")
    help_ms = summary["quay-bootstrap --help"]["median_ms"]
    print(f"\n`quay-bootstrap --help` median {help_ms:.1f} ms "
          f"(goal < {GOAL_HELP_MS:.0f} ms: {'met' if help_ms < GOAL_HELP_MS else 'NOT MET'})")

    imports = {}
    failed = False
    for command in ("--help", "version"):
        try:
            modules = imported_modules(
                [sys.executable, "-X", "importtime", "-m", "quay_bootstrap", command], env)
        except RuntimeError as err:
            print(f"FAIL: {err}", file=sys.stderr)
            return 1
        bad = forbidden_in(modules)
        slowest = sorted(((us, m) for m, us in modules.items() if "." not in m), reverse=True)[:5]
        imports[command] = {"modules": len(modules), "forbidden": bad,
                            "slowest_top_level_ms": {m: us / 1000 for us, m in slowest}}
        if bad:
            failed = True
            print(f"\nFAIL FAIL FAIL: `python -m quay_bootstrap {command}` imports {', '.join(bad)}"
                  f" (none of {', '.join(FORBIDDEN)} may load on this path)", file=sys.stderr)
        else:
            print(f"import check `{command}`: ok, {len(modules)} modules, none of "
                  f"{', '.join(FORBIDDEN)}; slowest: "
                  + ", ".join(f"{m} {us / 1000:.1f} ms" for us, m in slowest))

    result = {
        "benchmark": "cli_startup",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"nproc": os.cpu_count(), "os": f"{platform.system()} {platform.release()}",
                    "python": platform.python_version(),
                    "loadavg": [round(x, 2) for x in os.getloadavg()]},
        "runs_per_command": args.runs,
        "summary": summary,
        "goal": {"help_median_ms_max": GOAL_HELP_MS, "met": help_ms < GOAL_HELP_MS},
        "import_check": {"forbidden": list(FORBIDDEN), "ok": not failed, "commands": imports},
        "runs": runs,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwritten: {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
