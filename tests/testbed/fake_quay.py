"""A fake Quay image for tests and the demo: static busybox, no `docker build`, no pull.

It serves Quay's /health/instance JSON (see ../shared/notes/quay-facts.md) on $PORT with
host networking, as user 1001 like Quay's image, and refuses to start when it cannot read
/conf/stack/config.yaml (Quay's config validation would fail the same way). What it answers is
read, per request, from /conf/stack/fake-health when the stack has one (a config that breaks
Quay), else from /control/state in a folder the test mounts:

    healthy                      200, every service true (also when the file is missing)
    fail web_gunicorn database   503, those services false
    hang                         accepts the connection and never answers

Each start appends a line to /control/starts. SIGTERM stops it at once.
"""
from __future__ import annotations

from tests.testbed import bed

REPOSITORY = "quay/quay"
SERVICES = "auth database disk_space registry_gunicorn service_key web_gunicorn"

HANDLER = r"""#!/bin/sh
# One HTTP exchange on stdin/stdout (busybox nc -ll -e), shaped like Quay's health endpoints.
read -r method path proto
while IFS= read -r line; do
  [ -z "$(printf '%s' "$line" | tr -d '\r')" ] && break
done
state=$(cat /conf/stack/fake-health /control/state 2>/dev/null | head -n 1)
[ -n "$state" ] || state=healthy
set -- $state
case "${path%%\?*}" in
  /health/instance|/health) ;;
  *) printf 'HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n'; exit 0;;
esac
case "$1" in
  hang) sleep 3600; exit 0;;
  fail) shift; failing="$*"; code=503; status="503 Service Unavailable";;
  *) failing=""; code=200; status="200 OK";;
esac
body='{"data":{"services":{'
sep=''
for s in SERVICES; do
  v=true
  for f in $failing; do [ "$f" = "$s" ] && v=false; done
  body="$body$sep\"$s\":$v"
  sep=','
done
body="$body}},\"status_code\":$code}"
printf 'HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %s\r\nConnection: close\r\n\r\n%s' \
  "$status" "${#body}" "$body"
""".replace("SERVICES", SERVICES)

ENTRY = r"""#!/bin/sh
# PID 1: check conf/stack like Quay's start-up does, then serve until SIGTERM.
if ! cat /conf/stack/config.yaml >/dev/null 2>&1; then
  echo "fake-quay: cannot read /conf/stack/config.yaml as $(id -u)" >&2
  exit 1
fi
echo "$(date +%s) $(cat /version)" >> /control/starts 2>/dev/null
trap 'kill $pid 2>/dev/null; exit 0' TERM INT
nc -ll -p "${PORT:-8080}" -e /bin/quay-health.sh &
pid=$!
wait $pid
"""


def build(client, registry: str, tag: str = "v3.9.0") -> str:
    """Import the fake Quay as REGISTRY/quay/quay:TAG, push it, and return the reference.

    Different tags are different images (their /version differs), so their digests differ.
    """
    repository = f"{registry}/{REPOSITORY}"
    bed.import_busybox_image(
        client, repository, tag,
        files={"/bin/quay-health.sh": HANDLER, "/bin/fake-quay.sh": ENTRY, "/version": tag,
               "/control/.keep": ""},
        cmd=["/bin/fake-quay.sh"], env={"PORT": "8080"},
        # Quay declares anonymous volumes; a replacement that forgets them leaks one each time.
        extra_changes=["USER 1001", 'VOLUME ["/datastorage", "/tmp"]'])
    bed.push_image(client, repository, tag)
    return f"{repository}:{tag}"
