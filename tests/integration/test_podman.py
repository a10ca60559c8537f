"""The node-level tests again, with podman 4's Docker-compatible API (`podman system service`)
as the engine instead of dockerd: first boot, adopt, crash restart, replace, volumes, labels,
events and stop. The same test functions, collected here a second time, with a `node` whose
engine is the bed's podman (tests/testbed/podman.py); the agent is told nothing but
DOCKER_HOST."""
from __future__ import annotations

import os
import signal

import pytest

from tests.integration.conftest import Node, wait_for
from tests.testbed import podman
from tests.testbed.stacks import sample_stack


@pytest.fixture(scope="session")
def podman_host(testbed) -> str:
    return podman.start(testbed["dir"])


@pytest.fixture(scope="session")
def podman_client(podman_host, tmp_path_factory):
    """A docker.DockerClient on the bed's podman; never reads ~/.docker/config.json."""
    import docker

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DOCKER_CONFIG", str(tmp_path_factory.mktemp("podman-client-config")))
        client = docker.DockerClient(base_url=podman_host, version="auto")
        yield client
        client.close()


@pytest.fixture
def node(agent, s3_backend, podman_client, podman_host, testbed, fake_images, tmp_path,
         monkeypatch):
    """The fake Quay, run by podman, its images already there as dockerd's are (built there)."""
    import docker

    for reference in fake_images.values():
        try:
            podman_client.images.get(reference)
        except docker.errors.ImageNotFound:
            podman_client.images.pull(reference)
    s3_backend.upload(sample_stack())
    made = Node(agent, s3_backend, podman_client, {**testbed, "docker_host": podman_host},
                fake_images, tmp_path, monkeypatch)
    made.configure()
    yield made
    made.cleanup()


def test_a_quay_process_that_dies_is_back_at_once_and_counted_once(node, daemon):
    """podman's restart policy and the agent's watch both see the exit: one restart."""
    agent = daemon()
    agent.wait_state("healthy")
    before, starts = node.found().attrs["State"], len(node.starts())
    os.kill(before["Pid"], signal.SIGKILL)  # Quay's process dies (not an API kill: podman
    # takes that for a stop and leaves the container to the agent, as another test shows)
    wait_for(lambda: agent.status().get("restarts_in_window") == 1, 10,
             lambda: f"the restart counted; log:\n{agent.log[-3000:]}")
    wait_for(lambda: node.found().status == "running"
             and node.found().attrs["State"]["StartedAt"] != before["StartedAt"], 10,
             "Quay running again")
    assert agent.wait_state("healthy", timeout=30)["restarts_in_window"] == 1
    assert len(node.starts()) == starts + 1  # started once: by podman or by the agent, not both


from tests.integration.test_daemon import (  # noqa: E402,F401 - collected here again
    test_a_crash_right_after_our_restart_is_still_seen,
    test_each_restart_counts_once,
    test_sighup_applies_a_new_stack_and_a_bad_config_keeps_quay_watched,
    test_sigterm_stops_at_once_and_leaves_quay_running_for_the_next_agent,
)
from tests.integration.test_run_once import (  # noqa: E402,F401 - collected here again
    test_a_blank_node_becomes_a_healthy_quay,
    test_a_container_the_agent_did_not_create_is_never_touched,
    test_a_new_stack_replaces_the_container_with_the_new_version_mounted,
    test_a_replacement_that_cannot_start_puts_the_old_quay_back,
    test_a_second_pass_changes_nothing,
    test_a_stopped_container_is_started_not_recreated,
    test_replacements_remove_the_old_container_s_anonymous_volumes,
)
