#!/bin/sh
# Builds quay-bootstrap_VERSION_ARCH.deb for Debian and Ubuntu images: the agent's virtualenv
# under /opt/quay-bootstrap (on the distribution's own python3), /usr/bin/quay-bootstrap, the
# systemd units, the example config, and maintainer scripts that enable the service at install
# (never start it: an image being built has no config yet) and stop and clean up at removal.
#
#   systemd/build-deb.sh OUTDIR                  from this source tree (needs the package index)
#   systemd/build-deb.sh OUTDIR --wheels DIR     offline from wheels (`pip wheel .`)
#
# Run it on the release the package is for (the venv links /usr/bin/python3 of that release).
# Needs: python3-venv, dpkg-deb, gzip. Environment: PYTHON (/usr/bin/python3).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build-deb.sh OUTDIR [--wheels DIR]}
PYTHON=${PYTHON:-/usr/bin/python3}
wheels=""
if [ "${2:-}" = "--wheels" ]; then wheels=${3:?--wheels needs a folder}; fi
prefix=/opt/quay-bootstrap

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/root
venv=$root$prefix

# The venv is made where it is staged, then told where it will live: the interpreter is a link
# to $PYTHON, and only the scripts' first lines and pyvenv.cfg name the staging path. No .pyc
# files are shipped (they would name it too); postinst compiles them in place.
"$PYTHON" -m venv "$venv"
if [ -n "$wheels" ]; then
  "$venv/bin/pip" install --quiet --no-compile --no-index --find-links "$wheels" quay-bootstrap
else
  # Compiled here, against this release's python3-dev, never from a cache of wheels another
  # interpreter built (systemd-python would keep that interpreter's RUNPATH).
  "$venv/bin/pip" install --quiet --no-cache-dir wheel
  "$venv/bin/pip" install --quiet --no-compile --no-cache-dir "$here/.."
fi
"$venv/bin/pip" uninstall --quiet --yes pip setuptools wheel 2>/dev/null || true
site=$(echo "$venv"/lib/python3*/site-packages)
# Only the agent's own command: the libraries' command-line tools are not for this machine.
find "$venv/bin" -type f ! -name quay-bootstrap -delete
find "$venv" -name __pycache__ -type d -prune -exec rm -rf {} +
sed -i "1s|^#!$venv/bin/python|#!$prefix/bin/python|" "$venv/bin/quay-bootstrap"
sed -i "s|$venv|$prefix|g" "$venv/pyvenv.cfg"
# Wheels ship some files executable and their shared objects with debug symbols.
find "$site" -type f -exec chmod 0644 {} +
find "$site" -type f -name '*.so*' -exec strip --strip-unneeded --remove-section=.comment {} +
"$venv/bin/python" -c 'import quay_bootstrap.cli, yaml, pydantic, cryptography.hazmat.bindings._rust, google_crc32c, google.cloud.storage, botocore.session, docker, systemd.daemon' || {
  echo "build-deb: the stripped venv does not import" >&2; exit 1; }
find "$venv" -name __pycache__ -type d -prune -exec rm -rf {} +
if grep -rIl "$stage" "$venv" >/dev/null; then
  echo "build-deb: the staging path is still named in:" >&2
  grep -rIl "$stage" "$venv" >&2
  exit 1
fi
version=$("$venv/bin/python" -B -c 'import quay_bootstrap; print(quay_bootstrap.__version__)')
# The newest glibc symbol version any shared object asks for: the libc6 the package needs.
glibc=$(find "$site" -name '*.so*' -type f -exec objdump -T {} + 2>/dev/null |
        grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n1)
arch=$(dpkg --print-architecture)
pyver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
pynext=$("$PYTHON" -c 'import sys; print("%d.%d" % (sys.version_info[0], sys.version_info[1] + 1))')
install -m 0644 "$here/../README.md" "$venv/README.md"

install -d -m 0755 "$root/usr/bin" "$root/lib/systemd/system" "$root/DEBIAN" \
  "$root/usr/share/doc/quay-bootstrap" "$root/usr/share/lintian/overrides"
ln -s "$prefix/bin/quay-bootstrap" "$root/usr/bin/quay-bootstrap"
# The units as install.sh installs them, but started from the package's /usr/bin.
sed 's|^ExecStart=/usr/local/bin/quay-bootstrap |ExecStart=/usr/bin/quay-bootstrap |;
     s|^# Installed by `make install` (systemd/install.sh)|# Installed by the quay-bootstrap package|' \
  "$here/quay-bootstrap.service" >"$root/lib/systemd/system/quay-bootstrap.service"
install -m 0644 "$here/quay-bootstrap.socket" "$root/lib/systemd/system/quay-bootstrap.socket"
chmod 0644 "$root/lib/systemd/system/quay-bootstrap.service"
install -d -m 0755 "$root/etc/quay-bootstrap"
install -m 0644 "$here/config.example.yaml" "$root/etc/quay-bootstrap/config.example.yaml"
install -m 0644 "$here/deb/copyright" "$root/usr/share/doc/quay-bootstrap/copyright"
install -m 0644 "$here/deb/lintian-overrides" "$root/usr/share/lintian/overrides/quay-bootstrap"
date=$(date -R -d "@${SOURCE_DATE_EPOCH:-$(git -C "$here" log -1 --format=%ct 2>/dev/null || date +%s)}")
printf 'quay-bootstrap (%s) unstable; urgency=medium\n\n  * Release %s (built by systemd/build-deb.sh).\n\n -- quay-bootstrap maintainers <quay-bootstrap@example.com>  %s\n' \
  "$version" "$version" "$date" | gzip -9n >"$root/usr/share/doc/quay-bootstrap/changelog.gz"

for script in postinst prerm postrm; do
  install -m 0755 "$here/deb/$script" "$root/DEBIAN/$script"
done
echo /etc/quay-bootstrap/config.example.yaml >"$root/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat >"$root/DEBIAN/control" <<CONTROL
Package: quay-bootstrap
Version: $version
Architecture: $arch
Maintainer: quay-bootstrap maintainers <quay-bootstrap@example.com>
Installed-Size: $size
Depends: python3 (>= $pyver), python3 (<< $pynext), libc6 (>= $glibc), libsystemd0, init-system-helpers (>= 1.54~)
Recommends: docker.io | podman
Section: admin
Priority: optional
Description: turns a blank machine into a node of a highly available Quay cluster
 quay-bootstrap is started by systemd on each machine of a Quay cluster. It
 fetches the saved conf/stack folder from object storage (S3, GCS or an
 S3-compatible store), checks the Quay image against its tag lock, runs Quay
 with the configuration mounted, and restarts it or marks the instance
 unhealthy when /health/instance fails. Changes roll through the cluster a
 few nodes at a time.
 .
 The service is enabled at install and starts once
 /etc/quay-bootstrap/config.yaml exists.
CONTROL

mkdir -p "$out"
deb="$out/quay-bootstrap_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
