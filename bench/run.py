"""Run every benchmark (what `make bench` runs) and print a Markdown fragment for BENCHMARKS.md.

Usage: python bench/run.py [--rounds 5] [--runs 20] [--idle-seconds 60] [--idle-minutes 10]

Runs each benchmark as a child process with this interpreter (its output shows as it goes), then
prints the Markdown section each wrote into its JSON result (bench/results/NAME.json). Exit
status: 0 when every benchmark ran (a goal not met is reported, not an error), otherwise the
first failing benchmark's status.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import BUSY_LOAD, HERE, RESULTS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each comparison (default 5)")
    parser.add_argument("--runs", type=int, default=20, help="cli_startup runs (default 20)")
    parser.add_argument("--idle-seconds", default="60", help="watchdog's idle window (default 60)")
    parser.add_argument("--idle-minutes", default="10",
                        help="idle_memory's window (default 10; BENCHMARKS.md's figure is of 60)")
    args = parser.parse_args()
    rounds = ["--rounds", str(args.rounds)]
    benchmarks = {"once_vs_init_script": rounds, "roll": rounds, "fetch_vs_sync": rounds,
                  "cli_startup": ["--rounds", str(args.runs)],
                  "watchdog": rounds + ["--idle-seconds", args.idle_seconds],
                  "real_quay": ["--rounds", str(min(args.rounds, 3))],
                  "drain": ["--rounds", "1"],
                  "idle_memory": rounds + ["--minutes", args.idle_minutes]}
    codes, results = {}, {}
    for name, extra in benchmarks.items():
        path = RESULTS / f"{name}.json"
        path.unlink(missing_ok=True)  # never report a stale figure from an earlier run
        print(f"\n=== {name} {' '.join(extra)}", flush=True)
        codes[name] = subprocess.run([sys.executable, str(HERE / f"{name}.py"), *extra],
                                     check=False).returncode
        if codes[name] == 0 and path.exists():
            results[name] = json.loads(path.read_text())
    m = next((r["machine"] for r in results.values() if "cpu" in r["machine"]), {})
    loads = [x for r in results.values() for x in r["machine"].get("loadavg", [])[:1]]
    print("\n=== Markdown for BENCHMARKS.md\n\n## Benchmarks\n")
    print(f"Measured with `make bench` on {time.strftime('%Y-%m-%d')}; machine: {m.get('nproc')} cores "
          f"({m.get('cpu')}), {m.get('os')}, Python {m.get('python')}, moto {m.get('moto')}, "
          f"{m.get('aws_cli')}, Docker CLI {m.get('docker_cli')}, dockerd {m.get('dockerd')}."
          + (f" The machine was not idle (1-minute load average up to {max(loads):.1f}); absolute "
             "times are noisy, ratios less so." if loads and max(loads) > BUSY_LOAD else ""))
    for result in results.values():
        print("\n" + "\n".join(result["report"]))
    failed = [name for name, code in codes.items() if code or name not in results]
    if failed:
        print(f"\nFAIL: {', '.join(failed)} did not complete; their figures are missing above",
              file=sys.stderr)
    return next((codes[name] or 1 for name in failed), 0)


if __name__ == "__main__":
    sys.exit(main())
