#!/usr/bin/env bash
# Installs the Debian packages the agent's build and test bed need, only when missing.
# Idempotent; run as root on Debian/Ubuntu. Never starts a system-wide Docker daemon.
set -euo pipefail

# postgresql-15 and redis-server: the real database and Redis the stand-in Quay runs on (the bed
# starts private ones; policy-rc.d below keeps the packages from starting system-wide ones).
# haproxy: the TCP load balancer in front of the cluster tests (tests/testbed/balancer.py).
# systemd: systemd-analyze, which checks the unit's sandbox (a slim container may lack it).
# lintian, binutils: `make deb` strips the shared objects and the boot test lints the package.
# ignition: ignition-validate checks cloud-config/flatcar.ign.
# podman: its Docker-compatible API is the second engine the node tests run on (testbed/podman.py).
# lib*-dev: real Quay's venv (tests/testbed/real_quay.py) compiles psycopg2, python-ldap and more.
pkgs=(docker.io docker-registry busybox-static libsystemd-dev pkg-config gcc python3-dev iproute2 python3-venv
      libpq-dev libldap2-dev libsasl2-dev libssl-dev libffi-dev libjpeg-dev zlib1g-dev
      debootstrap postgresql-15 redis-server openssl systemd haproxy lintian binutils ignition podman)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "install-debian: missing packages: ${missing[*]}; run as root (or install them) first" >&2
  exit 1
fi

# A policy-rc.d that refuses service starts keeps docker.io and docker-registry from starting
# system-wide daemons during install; the test bed runs its own private ones.
policy=/usr/sbin/policy-rc.d
ours=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod 755 "$policy"
  ours=1
fi
trap '[ "$ours" = 1 ] && rm -f "$policy"' EXIT

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-debian: installed ${missing[*]}"
