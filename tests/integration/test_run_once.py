"""`quay-bootstrap run --once` against the test bed's real dockerd, registry and moto, with the
fake Quay: the tag lock, pulling, reconciling, waiting for health, and bad input that must never
cost the running Quay."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from tests.integration.conftest import free_port
from tests.testbed import bed


def healthy_run(node):
    code, out, err = node.agent.run("run", "--once")
    assert code == 0, out + err
    return out, err


def test_a_blank_node_becomes_a_healthy_quay(node):
    node.docker.images.remove(node.images["v3.9.0"])  # a blank node has no image yet
    out, err = healthy_run(node)
    assert "image      pulled" in out
    assert '"image.layer"' in err and '"image.pulled"' in err  # progress per layer, not per byte
    container = node.found()
    assert container.status == "running"
    version, files = node.agent.live()
    labels = container.labels
    assert labels["io.quay-bootstrap.managed"] == "true"
    assert labels["io.quay-bootstrap.stack-version"] == version
    repository = node.images["v3.9.0"].rsplit(":", 1)[0]
    assert labels["io.quay-bootstrap.image-digest"].startswith(repository + "@sha256:")
    mounts = {m["Destination"]: m for m in container.attrs["Mounts"]}
    assert mounts["/conf/stack"]["Source"] == str((node.agent.stack_dir / "versions" / version))
    assert mounts["/conf/stack"]["RW"] is False
    assert container.attrs["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    for step in ("stack ", "lock ", "image ", "container ", "health "):
        assert any(line.startswith(step) for line in out.splitlines()), out
    assert "container  created" in out and "health     healthy" in out
    assert f"node healthy: stack {version[:12]}" in out
    assert os.readlink(node.agent.stack_dir / "last-known-good") == f"versions/{version}"


def test_a_second_pass_changes_nothing(node):
    healthy_run(node)
    started = node.found().attrs["State"]["StartedAt"]
    out, _ = healthy_run(node)
    assert "container  adopted" in out and "image      present" in out
    assert node.found().attrs["State"]["StartedAt"] == started
    assert len(node.starts()) == 1


def test_a_stopped_container_is_started_not_recreated(node):
    healthy_run(node)
    container = node.found()
    container.stop(timeout=5)
    out, _ = healthy_run(node)
    assert "container  started" in out
    assert node.found().id == container.id


def test_a_new_stack_replaces_the_container_with_the_new_version_mounted(node):
    healthy_run(node)
    old = node.found().id
    node.backend.put("robots.txt", b"User-agent: *\nDisallow: /new\n")
    out, _ = healthy_run(node)
    assert "container  replaced" in out and "stack version" in out
    container = node.found()
    assert container.id != old
    version, _ = node.agent.live()
    assert container.labels["io.quay-bootstrap.stack-version"] == version
    assert [c for c in node.docker.containers.list(all=True) if "previous" in c.name
            and c.name.startswith(node.name)] == []


def test_the_cluster_lock_overrides_the_local_reference(node):
    node.backend.put("quay-lock.yaml", f"reference: {node.images['v3.9.1']}\n".encode())
    lock_url = node.backend.url + "/quay-lock.yaml"
    node.configure(image={"lock": lock_url})
    out, err = healthy_run(node)
    assert "lock       cluster lock" in out and node.images["v3.9.1"] in out
    assert '"image.lock_overrides"' in err
    assert node.starts()[-1].endswith("v3.9.1")


@pytest.mark.parametrize("tag,says", [("latest", "'latest'"), ("v3", "'v3'"), (None, "no tag")])
def test_a_floating_tag_is_refused_before_anything_is_pulled(node, tag, says):
    repository = node.images["v3.9.0"].rsplit(":", 1)[0]
    node.configure(image={"reference": repository + (f":{tag}" if tag else "")})
    code, out, err = node.agent.run("run", "--once")
    assert code == 65
    assert says in err and "Lock to a fixed release tag" in err
    assert node.found() is None
    assert "image " not in out  # never got to pulling


def test_a_pinned_digest_the_registry_does_not_serve_is_refused_and_quay_keeps_running(node):
    healthy_run(node)
    running = node.found()
    wrong = "sha256:" + "0" * 64
    node.configure(image={"reference": node.images["v3.9.1"] + "@" + wrong})
    code, _, err = node.agent.run("run", "--once")
    assert code == 65 and f"not the pinned {wrong}" in err
    after = node.found()
    assert after.id == running.id and after.status == "running"
    assert after.attrs["State"]["StartedAt"] == running.attrs["State"]["StartedAt"]


def test_the_right_pinned_digest_runs(node):
    digest = node.docker.images.get(node.images["v3.9.1"]).attrs["RepoDigests"][0]
    node.configure(image={"reference": node.images["v3.9.1"] + "@" + digest.split("@")[1]})
    out, _ = healthy_run(node)
    assert digest in out


def test_registry_unreachable_during_an_update_leaves_quay_running(node):
    healthy_run(node)
    running = node.found()
    dead = f"127.0.0.1:{free_port()}/quay/quay:v3.9.2"
    node.configure(image={"reference": dead, "pull_deadline": "3s"})
    code, _, err = node.agent.run("run", "--once")
    assert code == 69 and "registry did not answer within 3s" in err
    after = node.found()
    assert after.id == running.id and after.status == "running"


def test_an_unknown_tag_fails_fast_naming_the_registry_answer(node):
    repository = node.images["v3.9.0"].rsplit(":", 1)[0]
    node.configure(image={"reference": f"{repository}:v9.9.9", "pull_deadline": "60s"})
    code, _, err = node.agent.run("run", "--once")
    assert code == 1 and "refused to serve" in err and "Check that the tag exists" in err


def test_a_container_the_agent_did_not_create_is_never_touched(node):
    stranger = node.docker.containers.create(node.images["v3.9.0"], name=node.name,
                                             command=["sleep", "300"], network_mode="host")
    code, _, err = node.agent.run("run", "--once")
    assert code == 1 and "did not create" in err and "adopt_unmanaged" in err
    assert node.found().id == stranger.id
    node.configure(container={"adopt_unmanaged": True})
    out, _ = healthy_run(node)
    assert "container  replaced" in out and node.found().id != stranger.id


def test_not_healthy_in_time_exits_1_and_leaves_the_container_for_debugging(node):
    node.state("fail web_gunicorn")
    node.configure(health={"start_period": "4s"})
    code, out, _ = node.agent.run("run", "--once")
    assert code == 1
    assert "health     unhealthy" in out and "failing: web_gunicorn" in out
    assert "left running for debugging" in out
    assert node.found().status == "running"


def test_docker_unreachable_names_the_socket(node, monkeypatch, tmp_path):
    sock = f"unix://{tmp_path}/no-docker.sock"
    monkeypatch.setenv("DOCKER_HOST", sock)
    code, _, err = node.agent.run("run", "--once")
    assert code == 69 and "Docker daemon does not answer" in err and sock in err


def test_a_taken_host_port_is_named(node):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        node.configure(container={"network_mode": None, "ports": [f"127.0.0.1:{port}:8080"]})
        code, _, err = node.agent.run("run", "--once")
    assert code == 1 and f"127.0.0.1:{port}" in err and "already in use" in err
    assert node.found() is None  # nothing half-made is left behind


def test_registry_credentials(node, auth_registry, docker_client, tmp_path):
    repo = f"{auth_registry['registry']}/quay/quay"
    docker_client.images.get(node.images["v3.9.0"]).tag(repo, "v3.9.0")
    bed.push_image(docker_client, repo, "v3.9.0",
                   auth_config={"username": auth_registry["username"],
                                "password": auth_registry["password"]})
    docker_client.images.remove(f"{repo}:v3.9.0")
    healthy_run(node)  # a Quay that runs, from the registry without auth
    running = node.found()
    secret = tmp_path / "registry-password"
    secret.write_text("wrong-password\n")
    os.chmod(secret, 0o600)
    auth = {"username": auth_registry["username"], "password_file": str(secret)}
    node.configure(image={"reference": f"{repo}:v3.9.0", "auth": auth})
    code, _, err = node.agent.run("run", "--once")
    assert code == 1 and "Check image.auth" in err and "wrong-password" not in err
    assert node.found().id == running.id and node.found().status == "running"  # untouched

    os.chmod(secret, 0o644)
    code, _, err = node.agent.run("run", "--once")
    assert code == 78 and "readable by every user" in err and "chmod 600" in err
    assert node.found().id == running.id and node.found().status == "running"

    secret.write_text(auth_registry["password"])
    os.chmod(secret, 0o600)
    out, err = healthy_run(node)
    assert "image      pulled" in out and auth_registry["password"] not in out + err
    assert not Path.home().joinpath(".docker", "config.json").exists() or \
        auth_registry["registry"] not in Path.home().joinpath(".docker", "config.json").read_text()


def test_prefetch_image_pulls_the_locked_image_and_runs_nothing(node):
    node.docker.images.remove(node.images["v3.9.1"])
    node.configure(image={"reference": node.images["v3.9.1"]})
    code, out, err = node.agent.run("prefetch-image")
    assert code == 0, err
    assert out.startswith("image  pulled") and "@sha256:" in out
    assert node.found() is None
    code, out, _ = node.agent.run("prefetch-image")
    assert code == 0 and out.startswith("image  present")


def test_a_replacement_that_cannot_start_puts_the_old_quay_back(node):
    healthy_run(node)
    old = node.found()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        node.configure(container={"network_mode": None, "ports": [f"127.0.0.1:{port}:8080"]})
        code, _, err = node.agent.run("run", "--once")
    assert code == 1 and f"127.0.0.1:{port}" in err and "already in use" in err
    back = node.found()
    assert back.id == old.id and back.status == "running"  # restored under its own name
    assert [c.name for c in node.docker.containers.list(all=True)
            if c.name.startswith(node.name)] == [node.name]


def test_replacements_remove_the_old_container_s_anonymous_volumes(node):
    """Quay's image declares VOLUMEs: ten replacements must not leave ten sets behind."""
    healthy_run(node)

    def volumes():
        return {v.name for v in node.docker.volumes.list()}

    mounted = [m["Name"] for m in node.found().attrs["Mounts"] if m.get("Type") == "volume"]
    assert len(mounted) == 2  # /datastorage and /tmp, as Quay's image declares
    before = volumes()
    for round_ in range(10):
        node.configure(container={"env": {"PORT": str(node.port), "ROUND": str(round_)}})
        out, _ = healthy_run(node)
        assert "container  replaced" in out
    after = volumes()
    assert len(after) == len(before), f"volumes leaked: {sorted(after - before)}"
    assert not set(mounted) & after  # the first container's volumes went with it


KILL_POINTS = [("stack.done", 0.0), ("lock.done", 0.0), ("image.done", 0.0)] + [
    ("container.reconcile", i * 0.02) for i in range(20)]


def test_kill_9_anywhere_in_a_replacement_leaves_a_quay_after_the_next_start(node):
    """SIGKILL the agent at 23 points of a replacement (from the fetch to the health wait): the
    next start always ends with one running Quay and no container left aside."""
    import signal
    import time

    healthy_run(node)
    for round_, (event, delay) in enumerate(KILL_POINTS):
        node.configure(container={"env": {"PORT": str(node.port), "ROUND": str(round_)}})
        proc = node.agent.spawn("run", "--once")
        for line in proc.stderr:
            if f'"{event}"' in line:
                break
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        out, _ = healthy_run(node)  # the next start
        running = [c for c in node.docker.containers.list(all=True)
                   if c.name.startswith(node.name)]
        assert [(c.name, c.status) for c in running] == [(node.name, "running")], \
            (event, delay, out)
        assert node.found().attrs["Config"]["Env"].count(f"ROUND={round_}") == 1
