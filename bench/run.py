"""Run every benchmark (what `make bench` runs) and print a Markdown fragment for BENCHMARKS.md.

Usage: python bench/run.py [--rounds 5] [--runs 20]

Runs bench/cli_startup.py, bench/fetch_vs_sync.py and bench/once_vs_init_script.py as child
processes with this interpreter (their own output is shown as they go), then reads their JSON
results from bench/results/ and prints the figures, ratios and goals as Markdown. Exit status: 0
when every benchmark ran (a goal not met is reported, not an error), otherwise the first failing
benchmark's status.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BUSY_LOAD = 0.5


def run(script: str, args: list[str], result: Path) -> tuple[int, dict | None]:
    """Run one benchmark; its JSON result, or None when it failed or wrote none."""
    result.unlink(missing_ok=True)  # never report a stale figure from an earlier run
    print(f"\n=== {script} {' '.join(args)}", flush=True)
    code = subprocess.run([sys.executable, str(HERE / script), "--json", str(result), *args],
                          check=False).returncode
    if code != 0 or not result.exists():
        return code or 1, None
    return 0, json.loads(result.read_text())


def _s(seconds: float) -> str:
    return f"{seconds:.2f} s"


def _met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def fetch_section(r: dict) -> list[str]:
    s, q = r["summary"], r["ratios"]
    agent, aws = s["agent_full"], s["aws_full"]
    agent_nc, aws_nc = s["agent_nochange"], s["aws_nochange"]
    p = r["params"]
    lines = [
        (f"### Fetch of a {p['files'] - 1:,}-file stack ({p['object_bytes'] // 1024} KB files) "
         "from moto, against `aws s3 sync`"),
        "",
        "| | `quay-bootstrap fetch` | `aws s3 sync` | ratio |",
        "|---|---:|---:|---:|",
        (f"| full fetch into an empty folder, median | {_s(agent['median_s'])} | "
         f"{_s(aws['median_s'])} | {q['full']:.2f} |"),
        (f"| full fetch, fastest run | {_s(agent['min_s'])} | {_s(aws['min_s'])} | "
         f"{q['full_min']:.2f} |"),
        (f"| no change (second run on the same folder), median | {_s(agent_nc['median_s'])} | "
         f"{_s(aws_nc['median_s'])} | {q['nochange']:.2f} |"),
        (f"| client CPU (user + system), full fetch | {_s(agent['median_cpu_s'])} | "
         f"{_s(aws['median_cpu_s'])} | {q['full_client_cpu']:.2f} |"),
    ]
    if agent["median_server_cpu_s"] is not None and aws["median_server_cpu_s"] is not None:
        lines.append(f"| moto server CPU during the full fetch | "
                     f"{_s(agent['median_server_cpu_s'])} | {_s(aws['median_server_cpu_s'])} | |")
    lines += [
        (f"| peak RSS, full fetch | {agent['median_maxrss_mib']:.0f} MiB | "
         f"{aws['median_maxrss_mib']:.0f} MiB | {q['full_rss']:.2f} |"),
        "",
        (f"Goal: half the time of `aws s3 sync` or less (ratio of medians at most "
         f"{r['goal']['full_ratio_max']:.2f}): {_met(r['goal']['met'])} ({q['full']:.2f})."),
        "",
        f"Medians of {p['rounds']} rounds after {p['warmup']} warm-up round(s); within a round the "
        "two tools alternate which goes first, each full fetch starts from an empty folder, and "
        f"after every run all {p['files']:,} files are checked byte for byte against what was "
        "uploaded. Commands: `" + r["commands"]["agent"] + "` and `" + r["commands"]["aws"] + "`.",
    ]
    return lines


def once_section(r: dict) -> list[str]:
    s, q, p = r["summary"], r["ratios"], r["params"]
    agent, script = s["agent"], s["script"]
    lines = [
        (f"### `run --once` (cached image, {p['files']}-file stack, fake Quay) against the init "
         "script of Quay's HA guide"),
        "",
        "| | `quay-bootstrap run --once` | init script | ratio |",
        "|---|---:|---:|---:|",
        (f"| until Quay answers 200, median | {_s(agent['median_s'])} | "
         f"{_s(script['median_s'])} | {q['wall']:.2f} |"),
        f"| fastest run | {_s(agent['min_s'])} | {_s(script['min_s'])} | {q['wall_min']:.2f} |",
        (f"| client CPU (user + system, with child processes) | {_s(agent['median_cpu_s'])} | "
         f"{_s(script['median_cpu_s'])} | {q['client_cpu']:.2f} |"),
    ]
    for key, what in (("median_server_cpu_s", "moto server CPU"),
                      ("median_docker_cpu_s", "dockerd + containerd CPU")):
        if agent[key] is not None and script[key] is not None:
            lines.append(f"| {what} | {_s(agent[key])} | {_s(script[key])} | |")
    lines += [
        (f"| peak RSS | {agent['median_maxrss_mib']:.0f} MiB | "
         f"{script['median_maxrss_mib']:.0f} MiB | {q['rss']:.2f} |"),
        "",
        (f"Goal: {r['goal']['ratio_max']:.1f}x the init script's time or less (ratio of medians): "
         f"{_met(r['goal']['met'])} ({q['wall']:.2f})."),
        "",
        "Where the agent's time goes (medians of its own `<step>.done` log lines): "
        + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in
                    agent["median_steps_s"].items())
        + " (outside steps: interpreter start-up, imports, config, Docker connection, exit).",
        "",
        f"Medians of {p['rounds']} rounds after {p['warmup']} warm-up round(s); within a round the "
        "two sides alternate which goes first. Both start with the image in the daemon, a new "
        "stack folder and no container, run the same image with host networking and poll "
        f"/health/instance every {p['poll_s']:g} s; after every run the container, its health "
        "and the mounted conf/stack are checked. The script: `" + r["commands"]["script"] + "`.",
    ]
    return lines


def cli_section(r: dict) -> list[str]:
    s = r["summary"]
    lines = [
        "### Start-up",
        "",
        "| command | median | fastest | vs `python -c pass` | peak RSS |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in s.items():
        lines.append(f"| `{name}` | {row['median_ms']:.0f} ms | {row['min_ms']:.0f} ms | "
                     f"{row['ratio_to_python']:.2f} | {row['median_maxrss_mib']:.1f} MiB |")
    help_ms = s["quay-bootstrap --help"]["median_ms"]
    check = r["import_check"]
    imports = ("loads none of " + ", ".join(check["forbidden"]) if check["ok"] else
               "**loads " + ", ".join(sorted({m for c in check["commands"].values()
                                              for m in c["forbidden"]})) + "**")
    lines += [
        "",
        (f"Goal: `quay-bootstrap --help` under {r['goal']['help_median_ms_max']:.0f} ms: "
         f"{_met(r['goal']['met'])} ({help_ms:.0f} ms). "
         f"`python -X importtime -m quay_bootstrap --help` {imports}. "
         f"Medians of {r['runs_per_command']} runs of each command, interleaved."),
    ]
    return lines


def markdown(fetch: dict | None, cli: dict | None, once: dict | None = None) -> str:
    m = (fetch or once or cli or {}).get("machine", {})
    when = time.strftime("%Y-%m-%d")
    machine = (f"{m.get('nproc')} cores" + (f" ({m['cpu']})" if m.get("cpu") else "")
               + f", {m.get('os')}, Python {m.get('python')}")
    if fetch or once:
        machine += f", moto {m.get('moto')}, {m.get('aws_cli', '').split(' ')[0]}"
    if once:
        docker = once["machine"]
        machine += f", Docker CLI {docker.get('docker_cli')}, dockerd {docker.get('dockerd')}"
    lines = ["## Benchmarks", "",
             f"Measured with `make bench` on {when}; machine: {machine}."]
    loads = [x for r in (fetch, cli, once) if r for x in r["machine"].get("loadavg", [])[:1]]
    if loads and max(loads) > BUSY_LOAD:
        lines.append(f"The machine was not idle (1-minute load average up to {max(loads):.1f}); "
                     "absolute times are noisy, ratios less so.")
    if once:
        lines += [""] + once_section(once)
    if fetch:
        lines += [""] + fetch_section(fetch)
    if cli:
        lines += [""] + cli_section(cli)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5,
                        help="fetch_vs_sync and once_vs_init_script rounds (default 5)")
    parser.add_argument("--runs", type=int, default=20, help="cli_startup runs (default 20)")
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    cli_code, cli = run("cli_startup.py", ["--runs", str(args.runs)],
                        RESULTS / "cli_startup.json")
    fetch_code, fetch = run("fetch_vs_sync.py", ["--rounds", str(args.rounds)],
                            RESULTS / "fetch_vs_sync.json")
    once_code, once = run("once_vs_init_script.py", ["--rounds", str(args.rounds)],
                          RESULTS / "once_vs_init_script.json")
    # These two print their own tables (goals, figures) and write their JSON.
    watchdog_code, _ = run("watchdog.py", ["--rounds", str(args.rounds)],
                           RESULTS / "watchdog.json")
    roll_code, _ = run("roll.py", ["--rounds", str(args.rounds)], RESULTS / "roll.json")
    print("\n=== Markdown for BENCHMARKS.md\n")
    print(markdown(fetch, cli, once))
    codes = (("cli_startup", cli_code), ("fetch_vs_sync", fetch_code),
             ("once_vs_init_script", once_code), ("watchdog", watchdog_code),
             ("roll", roll_code))
    failed = [name for name, code in codes if code]
    if failed:
        print(f"\nFAIL: {', '.join(failed)} did not complete; its figures are missing above",
              file=sys.stderr)
    return next((code for _, code in codes if code), 0)


if __name__ == "__main__":
    sys.exit(main())
