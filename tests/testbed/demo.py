"""`make demo`: the agent's main job on this machine, against a local object store and Docker.

Starts the test bed (its moto S3 stands in for the cluster's bucket), uploads a sample conf/stack,
writes an agent config under .demo/, and runs the agent the way a node does at boot. Everything
stays on 127.0.0.1. `make demo-clean` stops the services and removes .demo/.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.testbed import bed
from tests.testbed.stacks import sample_stack

BUCKET = "quay-demo"
PREFIX = "conf/stack"


def main(root: Path) -> int:
    root.mkdir(parents=True, exist_ok=True)
    bed_dir = root / "bed"
    state = bed.load(bed_dir) if bed.is_running(bed_dir) else bed.start(bed_dir)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": str(root / "no-aws-config"),
           "AWS_SHARED_CREDENTIALS_FILE": str(root / "no-aws-credentials")}
    os.environ.update(env)

    import boto3

    s3 = boto3.client("s3", endpoint_url=state["moto_endpoint"], region_name="us-east-1")
    if BUCKET not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        s3.create_bucket(Bucket=BUCKET)
    for key, data in sample_stack().items():
        s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{key}", Body=data)
    print(f"demo: sample conf/stack (21 files) uploaded to s3://{BUCKET}/{PREFIX} on "
          f"{state['moto_endpoint']}")

    config = root / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "stack": {"source": f"s3://{BUCKET}/{PREFIX}", "endpoint_url": state["moto_endpoint"],
                  "region": "us-east-1", "dir": str(root / "stack")},
        "image": {"reference": "quay.io/projectquay/quay:v3.9.0"},
        "logging": {"format": "console"},
    }, sort_keys=False))
    print(f"demo: agent config written to {config}\n")

    agent = [str(Path(sys.executable).parent / "quay-bootstrap"), "--config", str(config)]
    for title in ("first boot: fetch conf/stack", "second pass: nothing changed"):
        print(f"$ quay-bootstrap --config {config} fetch    # {title}")
        code = subprocess.run([*agent, "fetch"], env=env).returncode
        if code != 0:
            print(f"demo: quay-bootstrap exited {code}", file=sys.stderr)
            return code
        print()
    print(f"demo: the live stack is {root / 'stack' / 'current'} (owned 1001:0, 0640/0750).")
    print("demo: the local services are still running for you to look around; "
          "`make demo-clean` stops them and removes .demo/.")
    return 0


def clean(root: Path) -> int:
    bed.stop(root / "bed")
    subprocess.run(["rm", "-rf", str(root)], check=True)
    print(f"demo: stopped the local services and removed {root}")
    return 0


if __name__ == "__main__":
    where = Path(sys.argv[2] if len(sys.argv) > 2 else ".demo").resolve()
    sys.exit(clean(where) if sys.argv[1:2] == ["clean"] else main(where))
