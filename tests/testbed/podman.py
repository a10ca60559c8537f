"""podman beside the bed's dockerd: `podman system service` serving its Docker-compatible API on
a private socket, which docker-py and the agent use unchanged (DOCKER_HOST=unix://SOCK).

Private in every way (../shared/notes/test-bed.md): its own containers.conf (on this kind of
machine runc needs explicit `nofile` and `nproc` ulimits, cgroupfs, events in a file),
storage.conf (vfs under the bed's directory) and registries.conf (the bed's registry is plain
HTTP). Started on demand by the tests that use it (`start`), recorded in the bed's state so
`bed.stop` ends it by PID and removes its containers first (`remove_containers`).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.testbed import bed

NAME = "podman"


def config_env(directory: Path) -> dict:
    """The environment that points podman (the service and the CLI) at the bed's own files."""
    root = directory / "podman"
    return {"CONTAINERS_CONF": str(root / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(root / "storage.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(root / "registries.conf")}


def start(directory: str | Path) -> str:
    """Start the service for the bed in DIRECTORY (once); returns its DOCKER_HOST."""
    directory = Path(directory).resolve()
    state = bed.load(directory)
    if bed.running(state).get(NAME):
        return state["podman_host"]
    podman = shutil.which("podman")
    if podman is None:
        raise bed.TestbedError("podman is not installed: tests/testbed/install-debian.sh adds it")
    root = directory / "podman"
    root.mkdir(exist_ok=True)
    # A socket path stays short: DIR may be deep (AF_UNIX paths end at 108 bytes).
    sock = Path(state.get("short_run_dir") or root) / "podman.sock"
    (root / "containers.conf").write_text(
        "[containers]\n"
        'default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]\n'
        "[engine]\n"
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
        f'events_logfile_path = "{root / "events.log"}"\n'
        f'tmp_dir = "{root / "tmp"}"\n')
    (root / "storage.conf").write_text(
        "[storage]\n"
        'driver = "vfs"\n'
        f'runroot = "{root / "run"}"\n'
        f'graphroot = "{root / "graph"}"\n')
    (root / "registries.conf").write_text(
        "".join(f'[[registry]]\nlocation = "{state[key]}"\ninsecure = true\n\n'
                for key in ("registry", "auth_registry")))
    state["podman_host"] = f"unix://{sock}"
    state["spawn"][NAME] = {"argv": [podman, "system", "service", "--time=0", f"unix://{sock}"],
                            "env": config_env(directory)}
    proc = bed._spawn(NAME, logs=directory / "logs", state=state, **state["spawn"][NAME])
    bed._save(directory, state)
    bed._wait_ready({NAME: lambda: sock.exists() and bed._docker_ping(str(sock))},
                    {NAME: proc}, directory / "logs")
    return state["podman_host"]


def remove_containers(directory: Path) -> None:
    """Every container podman runs for the bed, removed at once (conmon outlives the service)."""
    if not (directory / "podman" / "storage.conf").exists() or shutil.which("podman") is None:
        return
    subprocess.run(["podman", "rm", "--all", "--force", "--time", "0"], check=False,
                   capture_output=True, timeout=120,
                   env={**os.environ, **config_env(directory)})
