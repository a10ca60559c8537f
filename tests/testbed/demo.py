"""`make demo`: the agent's main job on this machine, against a local object store and Docker.

Starts the test bed (its moto S3 stands in for the cluster's bucket, its private dockerd and
registry for the node's engine and Quay's registry), uploads a sample conf/stack, pushes the fake
Quay image (tests/testbed/fake_quay.py), writes an agent config under .demo/, and runs
`quay-bootstrap run --once` the way a node does at boot, then once more to show that a second
pass changes nothing. Everything stays on 127.0.0.1. `make demo-clean` stops the services and
removes .demo/.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from tests.testbed import bed, fake_quay
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

    import docker

    client = docker.DockerClient(base_url=state["docker_host"])
    reference = fake_quay.build(client, state["registry"])
    client.images.remove(reference)  # a blank node: the agent pulls it
    print(f"demo: fake Quay image pushed to the local registry as {reference}")

    port = _free_port()
    control = root / "control"
    control.mkdir(exist_ok=True)
    os.chmod(control, 0o777)
    config = root / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "stack": {"source": f"s3://{BUCKET}/{PREFIX}", "endpoint_url": state["moto_endpoint"],
                  "region": "us-east-1", "dir": str(root / "stack")},
        "image": {"reference": reference},
        # Host networking keeps every packet on 127.0.0.1; a real node publishes 443 and 80.
        "container": {"name": "quay-demo", "network_mode": "host", "ports": [], "sysctls": {},
                      "env": {"PORT": str(port)}, "volumes": [f"{control}:/control"]},
        "health": {"url": f"http://127.0.0.1:{port}/health/instance", "start_period": "60s"},
        # No cloud here: never ask an instance-metadata address.
        "report": {"autoscaling": False, "state_file": str(root / "status.json")},
        "logging": {"format": "console", "level": "warning"},
    }, sort_keys=False))
    print(f"demo: agent config written to {config}\n")

    env["DOCKER_HOST"] = state["docker_host"]
    agent = [str(Path(sys.executable).parent / "quay-bootstrap"), "--config", str(config)]
    for title in ("first boot of a blank node", "second pass: nothing to do"):
        print(f"$ quay-bootstrap --config {config} run --once    # {title}")
        code = subprocess.run([*agent, "run", "--once"], env=env).returncode
        if code != 0:
            print(f"demo: quay-bootstrap exited {code}", file=sys.stderr)
            return code
        print()
    print(f"demo: Quay (the fake) answers on http://127.0.0.1:{port}/health/instance; "
          f"DOCKER_HOST={state['docker_host']} docker ps shows it.")
    print(f"demo: the live stack is {root / 'stack' / 'current'} (owned 1001:0, 0640/0750), "
          "mounted read-only at /conf/stack.")
    print("demo: the local services are still running for you to look around; "
          "`make demo-clean` stops them and removes .demo/.")
    return 0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def clean(root: Path) -> int:
    bed.stop(root / "bed")
    subprocess.run(["rm", "-rf", str(root)], check=True)
    print(f"demo: stopped the local services and removed {root}")
    return 0


if __name__ == "__main__":
    where = Path(sys.argv[2] if len(sys.argv) > 2 else ".demo").resolve()
    sys.exit(clean(where) if sys.argv[1:2] == ["clean"] else main(where))
