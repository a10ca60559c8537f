#!/bin/sh
# Installs quay-bootstrap into a machine image (Packer, a chroot, a running VM), as root:
# a self-contained virtualenv under /opt/quay-bootstrap, /usr/local/bin/quay-bootstrap, the
# systemd unit (enabled), and an example config beside the real one, never over it.
#
#   systemd/install.sh                   install from this source tree (needs the package index)
#   systemd/install.sh --wheels DIR      install offline from wheels (`make dist` + deps)
#
# Environment: PREFIX (/opt/quay-bootstrap), BINDIR (/usr/local/bin),
# UNITDIR (/etc/systemd/system), CONFDIR (/etc/quay-bootstrap), PYTHON (python3).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
PREFIX=${PREFIX:-/opt/quay-bootstrap}
BINDIR=${BINDIR:-/usr/local/bin}
UNITDIR=${UNITDIR:-/etc/systemd/system}
CONFDIR=${CONFDIR:-/etc/quay-bootstrap}
PYTHON=${PYTHON:-python3}
wheels=""
if [ "${1:-}" = "--wheels" ]; then wheels=$2; fi

"$PYTHON" -m venv "$PREFIX"
if [ -n "$wheels" ]; then
  "$PREFIX/bin/pip" install --quiet --no-index --find-links "$wheels" quay-bootstrap
else
  "$PREFIX/bin/pip" install --quiet "$here/.."
fi
[ -f "$here/../README.md" ] && install -m 0644 "$here/../README.md" "$PREFIX/README.md"

install -d -m 0755 "$BINDIR" "$UNITDIR"
ln -sf "$PREFIX/bin/quay-bootstrap" "$BINDIR/quay-bootstrap"
install -m 0644 "$here/quay-bootstrap.service" "$UNITDIR/quay-bootstrap.service"
# Installed, not enabled: where a load balancer checks /ready (see the file).
install -m 0644 "$here/quay-bootstrap.socket" "$UNITDIR/quay-bootstrap.socket"
install -d -m 0750 "$CONFDIR"
install -m 0640 "$here/config.example.yaml" "$CONFDIR/config.example.yaml"

# `systemctl enable` only makes links, so it works at image-build time without a running systemd.
if ! systemctl enable quay-bootstrap.service 2>/dev/null; then
  install -d -m 0755 "$UNITDIR/multi-user.target.wants"
  ln -sf "$UNITDIR/quay-bootstrap.service" "$UNITDIR/multi-user.target.wants/quay-bootstrap.service"
fi
echo "quay-bootstrap installed in $PREFIX; write $CONFDIR/config.yaml (see config.example.yaml)"
