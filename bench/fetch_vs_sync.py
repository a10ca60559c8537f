"""Benchmark: `quay-bootstrap fetch` of a 1,000-file stack, side by side with `aws s3 sync`.

Usage: python bench/fetch_vs_sync.py [--store seaweedfs|moto] [--rounds 5] [--warmup 1]
                                     [--files 1000] [--size 2048] [--published] [--json PATH]
                                     [--keep]

Uploads FILES objects of SIZE random bytes plus a valid config.yaml under conf/stack/ to a new
bucket on the bed's STORE (SeaweedFS by default; moto answers from one Python process and closes
every connection, so its CPU bounds any client), then each round, alternating which tool goes
first: the agent's fetch into an empty stack.dir and again with nothing changed, and `aws s3
sync` into an empty folder and again. Every run is checked (exit status 0, every file with the
uploaded bytes, nothing else); a failing run stops the benchmark. Recorded per run: wall time,
the client's CPU and peak RSS, the store's CPU. Goal: the agent's full fetch takes at most half
the time of `aws s3 sync`. With --published the files are also published once
(`quay-bootstrap publish`) and the agent fetches that version (one bundle); goal 0.1x. Beside
them runs the floor of any agent built on botocore (FLOOR below), so the report shows how much of
the agent's time is its own.
"""
from __future__ import annotations

import os
import sys

import common
from common import PREFIX, BenchError, measure, ratio, stats, verify_tree

GOAL_RATIO = 0.5
PUBLISHED_GOAL = 0.1  # issue 19: one bundle read instead of 1,001 GETs
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
AGENT = "quay-bootstrap --config CFG fetch --log-format json"
# With --published, a third side: the least any agent built on botocore (boto3's engine, the
# design's S3 library) pays for a cold fetch: the interpreter, botocore's import and S3 client,
# and the two GETs of the pointer and the bundle. No config, logs, unpacking, hashing or writes.
FLOOR = """\
import json, sys, botocore.session
endpoint, bucket, prefix = sys.argv[1:4]
s3 = botocore.session.Session().create_client("s3", endpoint_url=endpoint, region_name="us-east-1")
pointer = json.loads(s3.get_object(Bucket=bucket, Key=prefix + "pointer")["Body"].read())
key = f"{prefix}bundles/{pointer['bundle_sha256']}/stack.tar.gz"
assert len(s3.get_object(Bucket=bucket, Key=key)["Body"].read()) == pointer["bundle_size"]
"""
AWS = f"aws s3 sync s3://BUCKET/{PREFIX} DIR --endpoint-url URL --only-show-errors"


def body(args, bed) -> dict:
    qb, aws = common.tool("quay-bootstrap"), common.tool("aws")
    if args.store == "seaweedfs":
        bed.on_seaweedfs()
    files = {"config.yaml": QUAY_CONFIG}
    # 100 files per folder, like a stack with several folders of certificates and extras.
    files.update((f"d{i // 100:02d}/f{i:04d}.bin", os.urandom(args.size)) for i in range(args.files))
    print(f"uploading {len(files)} files to s3://{bed.bucket}/{PREFIX} ...", flush=True)
    expected = bed.upload(files)
    watch = {"server": [bed.server_pid]}
    if args.published:  # the same files, published once: the agent's fetch reads the bundle
        folder = bed.work / "publish-me"
        for key, data in files.items():
            (folder / key).parent.mkdir(parents=True, exist_ok=True)
            (folder / key).write_bytes(data)
        config = bed.node_config(bed.work, "unused", 8080, {"dir": str(bed.work / "unused")})
        done = measure([qb, "--config", str(config), "publish", str(folder)], bed.env,
                       bed.work / "publish", watch)
        print(f"published in {done['wall_s']:.2f} s", flush=True)

    def pair(side: str, n: int) -> dict:
        """A full fetch into a new folder, then again with nothing changed; both checked."""
        run = bed.work / f"{side}{n}"
        if side == "agent":
            config = bed.node_config(bed.work, "unused", 8080, {"dir": str(run)})  # never probed
            argv, tree = [qb, "--config", str(config), "fetch", "--log-format", "json"], run / "current"
        else:
            run.mkdir()
            argv, tree = [aws, "s3", "sync", f"s3://{bed.bucket}/{PREFIX}", str(run),
                          "--endpoint-url", bed.endpoint, "--only-show-errors"], run
        got = {}
        for kind, word in (("full", "applied"), ("nochange", "unchanged")):
            got[kind] = measure(argv, bed.env, bed.work / f"{side}{n}-{kind}", watch)
            if side == "agent" and word not in (bed.work / f"{side}{n}-{kind}.out").read_text():
                raise BenchError(f"agent fetch {n} ({kind}) did not report {word!r}")
            verify_tree(tree.resolve(), expected, f"{side} {kind} fetch {n}")
        return got

    def floor(n: int) -> dict:
        """Only the GETs a published fetch makes, from a process that imports botocore alone."""
        argv = [sys.executable, "-c", FLOOR, bed.endpoint, bed.bucket, f"{PREFIX}.published/"]
        return {"full": measure(argv, bed.env, bed.work / f"floor{n}", watch)}

    sides = {side: lambda n, side=side: pair(side, n) for side in ("agent", "aws")}
    if args.published:
        sides["floor"] = floor
    runs = common.rounds(args, sides, lambda got: " / ".join(f"{got[kind]['wall_s']:.2f} s"
                                                             for kind in ("full", "nochange")
                                                             if kind in got))
    summary = {side: {kind: {key: stats(r[kind][key] for r in items) for key in
                             ("wall_s", "cpu_s", "server_cpu_s", "maxrss_mib")}
                      for kind in ("full", "nochange") if kind in items[0]}
               for side, items in runs.items()}
    a, w = summary["agent"], summary["aws"]
    ratios = {"full": ratio(a["full"]["wall_s"]["median"], w["full"]["wall_s"]["median"]),
              "full_min": ratio(a["full"]["wall_s"]["min"], w["full"]["wall_s"]["min"]),
              "nochange": ratio(a["nochange"]["wall_s"]["median"], w["nochange"]["wall_s"]["median"]),
              "cpu": ratio(a["full"]["cpu_s"]["median"], w["full"]["cpu_s"]["median"]),
              "rss": ratio(a["full"]["maxrss_mib"]["median"], w["full"]["maxrss_mib"]["median"])}
    if args.published:
        ratios["floor"] = ratio(summary["floor"]["full"]["wall_s"]["median"], w["full"]["wall_s"]["median"])

    def row(what: str, kind: str, key: str, ratio_key: str = "", pick: str = "median") -> str:
        cells = [a[kind][key][pick], w[kind][key][pick]]
        text = ([f"{c:.0f} MiB" for c in cells] if key == "maxrss_mib" else map(common.s, cells))
        return f"| {what} | " + " | ".join(text) + f" | {common.r(ratios.get(ratio_key))} |"

    goal = PUBLISHED_GOAL if args.published else GOAL_RATIO
    kind = "published " if args.published else ""
    report = [f"### Fetch of a {kind}{args.files:,}-file stack ({args.size // 1024} KB files) from "
              f"{args.store}, against `aws s3 sync`", "",
              "| | `quay-bootstrap fetch` | `aws s3 sync` | ratio |",
              "|---|---:|---:|---:|",
              row("full fetch into an empty folder, median", "full", "wall_s", "full"),
              row("full fetch, fastest run", "full", "wall_s", "full_min", "min"),
              row("no change (second run on the same folder), median", "nochange", "wall_s", "nochange"),
              row("client CPU (user + system), full fetch", "full", "cpu_s", "cpu"),
              row(f"{args.store} server CPU during the full fetch", "full", "server_cpu_s"),
              row("peak RSS, full fetch", "full", "maxrss_mib", "rss"), "",
              *(floor_report(summary["floor"]["full"], w["full"], ratios["floor"])
                if args.published else []),
              f"Goal: {goal}x the time of `aws s3 sync` or less: {common.met(ratios['full'] <= goal)}"
              f" ({ratios['full']:.2f}). Medians of {args.rounds} rounds after {args.warmup} warm-up; "
              f"every run's {len(files):,} files checked byte for byte. Commands: `{AGENT}` and `{AWS}`."]
    return {"params": {"store": args.store, "files": len(files), "object_bytes": args.size,
                       "published": args.published,
                       "rounds": args.rounds, "warmup": args.warmup},
            "commands": {"agent": AGENT, "aws": AWS}, "summary": summary, "ratios": ratios,
            "goals": {"full_ratio": {"max": goal, "got": ratios["full"],
                                     "met": ratios["full"] <= goal}},
            "report": report, "runs": runs}


def floor_report(floor: dict, aws: dict, got: float) -> list:
    return ["The floor of any botocore-based agent (a process that imports botocore, makes the S3 "
            "client and GETs the pointer and the bundle, nothing else), in the same rounds: "
            f"{common.s(floor['wall_s']['median'])} median, {got:.2f}x `aws s3 sync` "
            f"({floor['cpu_s']['median']:.2f} s CPU, {floor['maxrss_mib']['median']:.0f} MiB).", ""]


def _args(parser) -> None:
    parser.add_argument("--store", choices=("seaweedfs", "moto"), default="seaweedfs", help="S3 server")
    parser.add_argument("--files", type=int, default=1000, help="objects besides config.yaml")
    parser.add_argument("--size", type=int, default=2048, help="bytes per object")
    parser.add_argument("--published", action="store_true",
                        help="publish the files first (`quay-bootstrap publish`): the agent "
                             "fetches the bundle, aws s3 sync the files")


if __name__ == "__main__":
    sys.exit(common.main("fetch_vs_sync", __doc__, body, add_args=_args))
