"""A machine image for the boot test: Debian bookworm with systemd and cloud-init, and
quay-bootstrap installed the way an image builder does: its .deb (systemd/build-deb.sh), with
`dpkg -i` and no network.

The base root file system (debootstrap, about a minute) is cached as a tar under CACHE keyed by
what goes in it; the package is built from this tree and installed on top for every session.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("QB_E2E_CACHE", "/var/cache/quay-bootstrap-e2e"))
PACKAGES = ["systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "ca-certificates",
            "locales"]
LATE_PACKAGES = ["cloud-init"]
# cloud-init must never touch the network: with host networking it would be the host's.
CLOUD_CFG = """datasource_list: [ NoCloud, None ]
network: {config: disabled}
"""


def _mirror() -> str:
    """The Debian mirror this machine's apt already uses."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    for line in Path("/etc/apt/sources.list").read_text().splitlines():
        parts = line.split()
        if parts[:1] == ["deb"]:
            return parts[1]
    raise RuntimeError("no Debian mirror found in this machine's apt sources")


def _run(*argv: str, **kw) -> None:
    subprocess.run(list(argv), check=True, **kw)


def base_rootfs_tar() -> Path:
    """The cached tar of the base root file system, built when missing."""
    key = hashlib.sha256(" ".join(PACKAGES + LATE_PACKAGES + [CLOUD_CFG]).encode()).hexdigest()[:12]
    tar = CACHE / f"bookworm-{key}.tar"
    if tar.exists():
        return tar
    CACHE.mkdir(parents=True, exist_ok=True)
    root = CACHE / f"rootfs-{key}.tmp"
    shutil.rmtree(root, ignore_errors=True)
    _run("debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", "bookworm",
         str(root), _mirror(), stdout=subprocess.DEVNULL)
    try:
        for fs in ("proc", "sys", "dev"):
            _run("mount", "--bind", f"/{fs}", str(root / fs))
        env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        policy = root / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        _run("chroot", str(root), "apt-get", "install", "-y", "-qq", "--no-install-recommends",
             *LATE_PACKAGES, env=env, stdout=subprocess.DEVNULL)
        policy.unlink()
    finally:
        for fs in ("dev", "sys", "proc"):
            subprocess.run(["umount", "-l", str(root / fs)], check=False)
    (root / "etc/cloud/cloud.cfg.d/90-quay-bootstrap-e2e.cfg").write_text(CLOUD_CFG)
    (root / "etc/locale.gen").write_text("en_US.UTF-8 UTF-8\n")
    _run("chroot", str(root), "locale-gen", stdout=subprocess.DEVNULL)
    # The container has no console to log in on; stop getty from trying.
    for unit in ("getty@tty1.service", "console-getty.service"):
        (root / f"etc/systemd/system/{unit}").unlink(missing_ok=True)
        (root / f"etc/systemd/system/{unit}").symlink_to("/dev/null")
    partial = tar.with_suffix(".partial")
    _run("tar", "-C", str(root), "--numeric-owner", "-cf", str(partial), ".")
    partial.rename(tar)
    shutil.rmtree(root, ignore_errors=True)
    return tar


def wheels(into: Path) -> Path:
    """Wheels of this tree and every dependency (the agent image installs them offline)."""
    into.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir",
                           str(into), str(REPO)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"pip wheel failed:\n{done.stdout}{done.stderr}")
    return into


def base_image(client) -> str:
    """The base root file system as an image of CLIENT's engine, imported once: its tag."""
    base_tar = base_rootfs_tar()
    base = f"qb-e2e-base:{base_tar.stem.split('-')[-1]}"
    try:
        client.images.get(base)
    except Exception:  # noqa: BLE001 - docker.errors.ImageNotFound
        client.api.import_image_from_file(str(base_tar), repository=base.split(":")[0],
                                          tag=base.split(":")[1])
    return base


def agent_image(client, workdir: Path, tag: str = "") -> str:
    """The agent's image (Containerfile) on the local Debian base, built by CLIENT's engine
    with no network: the context is the Containerfile and a wheelhouse of this tree."""
    from quay_bootstrap import __version__

    context = workdir / "image-context"
    shutil.rmtree(context, ignore_errors=True)
    wheels(context / "build" / "wheels")
    shutil.copy(REPO / "Containerfile", context / "Containerfile")
    tag = tag or f"quay-bootstrap:{__version__}"
    image, _ = client.images.build(path=str(context), dockerfile="Containerfile", tag=tag,
                                   buildargs={"BASE": base_image(client)}, network_mode="none",
                                   rm=True, forcerm=True)
    return tag


def install_sh_check(client, workdir: Path) -> str:
    """systemd/install.sh run offline from wheels in a throwaway container of the base image,
    as `make install` runs in an image build; what it printed and what it left, as text."""
    wheel_dir = wheels(workdir / "wheels")
    script = ("/bin/sh /src/systemd/install.sh --wheels /wheels && quay-bootstrap version && "
              "ls /etc/systemd/system/multi-user.target.wants/ /etc/quay-bootstrap && "
              "grep ^ExecStart= /etc/systemd/system/quay-bootstrap.service")
    out = client.containers.run(
        base_image(client), ["/bin/sh", "-c", script], network_mode="none", remove=True,
        volumes={str(wheel_dir): {"bind": "/wheels", "mode": "ro"},
                 str(REPO / "systemd"): {"bind": "/src/systemd", "mode": "ro"},
                 str(REPO / "README.md"): {"bind": "/src/README.md", "mode": "ro"}})
    return out.decode(errors="replace")


def debian_package(into: Path) -> Path:
    """quay-bootstrap_VERSION_ARCH.deb of this tree, as `make deb` builds it (Debian's python3,
    the libraries compiled or fetched anew)."""
    done = subprocess.run(["systemd/build-deb.sh", str(into)], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "PYTHON": "/usr/bin/python3"})
    if done.returncode != 0:
        raise RuntimeError(f"build-deb.sh failed:\n{done.stdout}{done.stderr}")
    return Path(done.stdout.strip().splitlines()[-1])


def node_image(client, workdir: Path, deb: Path) -> str:
    """The image a cloud would boot: base + quay-bootstrap's .deb installed with dpkg."""
    base = base_image(client)
    # Binds only (no `volumes` list): a declared volume would be committed into the image.
    created = client.api.create_container(
        base, ["dpkg", "-i", f"/debs/{deb.name}"],
        host_config=client.api.create_host_config(network_mode="none", binds=[
            f"{deb.parent}:/debs:ro"]))
    installer = client.containers.get(created["Id"])
    installer.start()
    try:
        result = installer.wait(timeout=600)
        logs = installer.logs().decode(errors="replace")
        if result["StatusCode"] != 0:
            raise RuntimeError(f"dpkg -i failed in the image:\n{logs}")
        image = installer.commit(repository="qb-e2e-node", tag="latest",
                                 changes=['CMD ["/sbin/init"]', "ENV container=docker"])
    finally:
        installer.remove(force=True)
    return image.id


if __name__ == "__main__":  # `make image`: the agent's image on DOCKER_HOST's engine
    import tempfile

    import docker

    with tempfile.TemporaryDirectory() as scratch:
        print(agent_image(docker.from_env(), Path(scratch)))
