"""Benchmark: real Quay v3.18.0 boot (empty and migrated database) and memory, beside the stand-in.

Usage: python bench/real_quay.py [--rounds 3] [--warmup 0] [--json PATH] [--keep]

Set-up: real Quay v3.18.0 built from ../shared/quay (tests/testbed/real_quay.py) and the stand-in
v3.11.0 (tests/testbed/quay_standin.py), each started by hand on the bed (host networking, its
own port) against a new PostgreSQL database (pg_trgm), the bed's Redis and a SeaweedFS bucket;
real Quay with nginx and both gunicorns, one worker each (as in the tests). Each round: a cold
start on the empty database (real Quay runs its 124 migrations), then, after a graceful stop, a
start on the migrated database; /health/instance is polled every 50 ms from `docker start` to the
first 200. Memory: the RSS and PSS summed over every process of a healthy real Quay (nginx,
supervisord, both gunicorns and their workers), read from /proc. The 3-node upgrade is measured
by tests/integration/test_real_cluster.py (its report line).
"""
from __future__ import annotations

import http.client
import time
from pathlib import Path

import common
from common import BenchError, quay_standin, stats

POLL_S = 0.05


def healthy_after(port: int, container, timeout: float = 300) -> float:
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", "/health/instance")
            if conn.getresponse().status == 200:
                return time.monotonic() - began
        except OSError:
            pass
        finally:
            conn.close()
        container.reload()
        if container.status == "exited":
            raise BenchError(f"Quay exited before 200:\n{quay_standin.logs(container)[-2000:]}")
        time.sleep(POLL_S)
    raise BenchError(f"no 200 within {timeout} s")


def memory(container) -> dict:
    """RSS and PSS (MiB) summed over the container's processes."""
    rss = pss = 0
    for row in container.top(ps_args="-e -o pid")["Processes"]:
        pid = row[0]
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        rss += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
        pss += next(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:"))
    return {"rss_mib": round(rss / 1024), "pss_mib": round(pss / 1024)}


def body(args, bed) -> dict:
    from tests.integration.conftest import real_quay_env
    from tests.testbed import real_quay

    docker = bed.docker()
    state = bed.state
    images = {"real": real_quay.build(docker, state["registry"], ("v3.18.0",))["v3.18.0"],
              "standin": quay_standin.build(docker, state["registry"], ("v3.11.0",))["v3.11.0"]}
    bucket = quay_standin.create_bucket(state)
    figures = {kind: {"cold": [], "migrated": []} for kind in images}
    mem = []
    for index in range(args.warmup + args.rounds):
        for kind, image in images.items():
            database = quay_standin.create_database(state)
            if kind == "real":
                import psycopg2

                conn = psycopg2.connect(database, connect_timeout=5)
                conn.autocommit = True
                conn.cursor().execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
                conn.close()
            stack = quay_standin.write_stack(bed.folder(f"stack-{kind}-{index}"), quay_standin.config(
                state, database=database, bucket=bucket))
            port = common.free_port()
            env = real_quay_env(port) if kind == "real" else {
                "QUAY_STANDIN_HTTP_PORT": str(port), "QUAY_STANDIN_MIGRATION_SECONDS": "0"}
            container = docker.containers.create(
                image, ["registry"], name=f"{bed.prefix}-{kind}-{index}", network_mode="host",
                environment=env, volumes={str(stack): {"bind": "/conf/stack", "mode": "ro"}})
            try:
                for phase in ("cold", "migrated"):
                    container.start()
                    took = healthy_after(port, container)
                    if index >= args.warmup:
                        figures[kind][phase].append(took)
                    if kind == "real" and phase == "migrated" and index >= args.warmup:
                        time.sleep(5)  # settled: the first requests' caches filled
                        mem.append(memory(container))
                    container.stop(timeout=120)
            finally:
                container.remove(force=True, v=True)
                quay_standin.drop_database(state, database)
    real, standin = figures["real"], figures["standin"]
    med = {kind: {phase: stats(values)["median"] for phase, values in figures[kind].items()}
           for kind in figures}
    rss = stats([m["rss_mib"] for m in mem])["median"]
    pss = stats([m["pss_mib"] for m in mem])["median"]
    report = [
        "## Real Quay v3.18.0: boot and memory, beside the stand-in (issue 16)",
        "",
        f"`python bench/real_quay.py --rounds {args.rounds}`; from `docker start` to the first 200 on "
        "/health/instance, polled every 50 ms; real Quay with nginx and both gunicorns, one worker "
        "each, 2 cores.",
        "",
        "| | real Quay | stand-in | ratio |",
        "|---|---|---|---|",
        f"| cold start, empty database (124 migrations), median | {med['real']['cold']:.1f} s | "
        f"{med['standin']['cold']:.2f} s | {med['real']['cold'] / med['standin']['cold']:.0f} |",
        f"| start on the migrated database, median | {med['real']['migrated']:.1f} s | "
        f"{med['standin']['migrated']:.2f} s | "
        f"{med['real']['migrated'] / med['standin']['migrated']:.0f} |",
        f"| cold / migrated | {med['real']['cold'] / med['real']['migrated']:.2f} | "
        f"{med['standin']['cold'] / med['standin']['migrated']:.2f} | |",
        f"| one healthy node, RSS (PSS) summed, median | {rss:.0f} MiB ({pss:.0f} MiB) | | |",
        "",
        f"Ranges: real cold {min(real['cold']):.1f}-{max(real['cold']):.1f} s, migrated "
        f"{min(real['migrated']):.1f}-{max(real['migrated']):.1f} s; stand-in cold "
        f"{min(standin['cold']):.2f}-{max(standin['cold']):.2f} s.",
    ]
    return {"figures": figures, "memory": mem, "report": report}


if __name__ == "__main__":
    raise SystemExit(common.main("real_quay", __doc__, body, rounds_default=3, warmup_default=0))
