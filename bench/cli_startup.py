"""Benchmark: wall time of `quay-bootstrap --help` and `version`, against bare `python -c pass`.

Usage: python bench/cli_startup.py [--rounds 20] [--warmup 2] [--json PATH]

Runs the three commands interleaved (a burst of load hits all three alike), ROUNDS times each
after WARMUP unmeasured rounds, and reports the median and fastest wall time, the ratio to
`python -c pass` with the same interpreter and each child's peak RSS (see common.Launched). Then
checks with `python -X importtime -m quay_bootstrap --help` (and `version`) that no cloud SDK is
imported on those paths. Goal: `--help` under 150 ms. Exit status: 0 ok, 1 a forbidden import or
a failing command, 2 quay-bootstrap is not installed.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import common
from common import BenchError, stats

GOAL_HELP_MS = 150.0
# Top-level packages `--help` must never load (the SDKs are imported by the provider modules).
FORBIDDEN = ("boto3", "botocore", "google.cloud", "docker")


def imported_modules(command: str) -> list[str]:
    """The modules `python -X importtime -m quay_bootstrap COMMAND` imports."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "quay_bootstrap", command],
                          capture_output=True, text=True, env=common.child_env(), check=False)
    if done.returncode != 0:
        raise BenchError(f"quay_bootstrap {command} exited with {done.returncode}: "
                         f"{done.stderr.strip()[-500:]}")
    return [line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines()
            if line.startswith("import time:") and "|" in line]


def body(args, _bed) -> dict:
    qb = common.tool("quay-bootstrap")
    commands = {"python -c pass": [sys.executable, "-c", "pass"],
                "quay-bootstrap --help": [qb, "--help"], "quay-bootstrap version": [qb, "version"]}
    with tempfile.TemporaryDirectory(prefix="qb-bench-cli-") as work:
        runs = common.rounds(args, {name: lambda n, argv=argv: common.measure(
            argv, common.child_env(), Path(work) / "run") for name, argv in commands.items()},
            lambda got: f"{got['wall_s'] * 1000:.0f} ms")
    summary = {name: {"ms": stats(r["wall_s"] * 1000 for r in items),
                      "maxrss_mib": stats(r["maxrss_mib"] for r in items)}
               for name, items in runs.items()}
    base = summary["python -c pass"]["ms"]["median"]
    help_ms = summary["quay-bootstrap --help"]["ms"]["median"]
    bad = {c: [m for m in imported_modules(c) if any(m == f or m.startswith(f + ".")
                                                     for f in FORBIDDEN)] for c in ("--help", "version")}
    ok = not any(bad.values())
    report = ["### Start-up", "", "| command | median | fastest | vs `python -c pass` | peak RSS |",
              "|---|---:|---:|---:|---:|"]
    report += [f"| `{name}` | {v['ms']['median']:.0f} ms | {v['ms']['min']:.0f} ms | "
               f"{v['ms']['median'] / base:.2f} | {v['maxrss_mib']['median']:.1f} MiB |"
               for name, v in summary.items()]
    imports = (f"loads none of {', '.join(FORBIDDEN)}" if ok else
               f"**loads {sorted({m for ms in bad.values() for m in ms})}**")
    report += ["", f"Goal: `quay-bootstrap --help` under {GOAL_HELP_MS:.0f} ms: "
               f"{common.met(help_ms < GOAL_HELP_MS)} ({help_ms:.0f} ms). `python -X importtime -m "
               f"quay_bootstrap --help` {imports}. Medians of {args.rounds} interleaved runs."]
    if not ok:
        print("\n".join(report))
        raise BenchError(f"forbidden imports: {bad}")
    return {"params": {"rounds": args.rounds, "warmup": args.warmup}, "summary": summary,
            "goals": {"help_ms": {"max": GOAL_HELP_MS, "got": help_ms, "met": help_ms < GOAL_HELP_MS}},
            "import_check": {"forbidden": FORBIDDEN, "found": bad}, "report": report, "runs": runs}


if __name__ == "__main__":
    sys.exit(common.main("cli_startup", __doc__, body, 20, 2, use_bed=False))
