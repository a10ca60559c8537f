"""Stand-in for Quay's `registry` entry point: its init scripts, config-tool, alembic and health/.

Reproduces, in Quay's order and with Quay's log lines: the init scripts of quay-entrypoint.sh
(`registry` runs them all, `registry-nomigrate` skips runmigration.sh);
d_validate_config_bundle.sh, i.e. `config-tool validate --mode online`
(config-tool/pkg/lib/fieldgroups/*/..._validator.go: the same rules, the same messages, the same
table, exit 1); app.py's DATABASE_SECRET_KEY and boot.py's SETUP_COMPLETE checks; runmigration.sh
(`alembic upgrade head` with data/migrations/env.py's transactional_ddl=False and no lock
between nodes); and health/ (services.py, healthcheck.py, data/model/health.py): the checks run
one after another with Quay's timeouts against the real services, Quay's JSON on 8080, or 8443
with 8080 answering 301 when conf/stack holds ssl.cert and ssl.key.

Runs under the image's Debian python3 with python3-psycopg2, python3-redis and python3-yaml only.
The storage and RDS calls are plain HTTP signed with AWS Signature V4 (no boto3 in the image).

Knobs for tests (environment): QUAY_STANDIN_HTTP_PORT (8080), QUAY_STANDIN_HTTPS_PORT (8443),
QUAY_STANDIN_MIGRATION_SECONDS (seconds each migration step takes, default 2),
QUAY_STANDIN_CONTROL (a folder, default /control): its file `local` holds lines
`<service> fail|hang` for web_gunicorn, registry_gunicorn, service_key, disk_space.
AWS_ENDPOINT_URL sends the RDS call of RDSAwareHealthCheck to moto.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import http.client
import http.server
import json
import os
import re
import shutil
import signal
import socket
import ssl
import sys
import threading
import time
import traceback
import urllib.parse
import xml.etree.ElementTree as ET

CONF = os.environ.get("QUAYCONF_STACK", "/conf/stack")
INIT = "/quay-registry/conf/init"
VERSION_FILE = "/quay-registry/VERSION"
REVISIONS_FILE = "/quay-registry/revisions.json"
CONTROL = os.environ.get("QUAY_STANDIN_CONTROL", "/control")
LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOSTNAME_RE = re.compile(rf"^(?=.{{1,253}}(:|$)){LABEL}(\.{LABEL})*(:[0-9]{{1,5}})?$")
LOCAL_SERVICES = ("registry_gunicorn", "web_gunicorn", "service_key", "disk_space")
GUNICORN_TIMEOUT = 2.0  # health/services.py _check_gunicorn: client.get(..., timeout=2)
DB_CONNECT_TIMEOUT = 3  # data/model/health.py: validate_database_url(..., connect_timeout=3)
DB_STATEMENT_TIMEOUT_MS = 5000  # data/model/health.py: SET LOCAL statement_timeout=5000
STORAGE_TIMEOUT = 3.0  # config-tool: context.WithTimeout(..., 3*time.Second) around BucketExists


def say(text: str = "") -> None:
    print(text, flush=True)


def log(logger: str, level: str, message: str) -> None:
    # Quay's gunicorn/worker format: "<process> stdout | <time> [pid] [LEVEL] [logger] message"
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]
    say(f"gunicorn-web stdout | {stamp} [{os.getpid()}] [{level}] [{logger}] {message}")


# ---------------------------------------------------------------- config (conf/stack)


def load_config() -> dict:
    import yaml

    path = os.path.join(CONF, "config.yaml")
    with open(path) as handle:
        config = yaml.safe_load(handle) or {}
    override = os.environ.get("QUAY_OVERRIDE_CONFIG")
    if override:
        config.update(json.loads(override))
    return config


def certificates() -> dict:
    """config-tool's shared.LoadCerts: every *.crt, *.cert, *.key, *.pem in conf/stack."""
    found = {}
    for name in sorted(os.listdir(CONF)):
        if name.endswith((".crt", ".cert", ".key", ".pem")):
            with open(os.path.join(CONF, name), "rb") as handle:
                found[name] = handle.read()
    return found


def storage_engines(config: dict) -> list:
    """[(location, driver, params)] from DISTRIBUTED_STORAGE_CONFIG, preferred first."""
    locations = config.get("DISTRIBUTED_STORAGE_CONFIG") or {}
    preferred = list(config.get("DISTRIBUTED_STORAGE_PREFERENCE") or [])
    env_pref = os.environ.get("QUAY_DISTRIBUTED_STORAGE_PREFERENCE")
    if env_pref:
        preferred = [p.strip() for p in env_pref.split(",") if p.strip()]
    ordered = [name for name in preferred if name in locations]
    ordered += [name for name in locations if name not in ordered]
    return [(name, locations[name][0], locations[name][1] or {}) for name in ordered]


# ---------------------------------------------------------------- AWS Signature V4 over HTTP


def _sign(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def aws_request(method: str, url: str, *, service: str, region: str, access_key: str | None,
                secret_key: str | None, body: bytes = b"", headers: dict | None = None,
                timeout: float = 3.0) -> tuple[int, bytes]:
    """One HTTP request signed with SigV4 (anonymous when no keys); returns (status, body).
    Only to 127.0.0.1: a config that sends real Quay elsewhere (S3Storage with `s3_region`,
    say) fails as an unreachable endpoint would, without any traffic leaving the machine."""
    parts = urllib.parse.urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise OSError(f'Could not connect to the endpoint URL: "{url}" (the test bed reaches '
                      "127.0.0.1 only)")
    now = datetime.datetime.now(datetime.timezone.utc)
    amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    payload_hash = hashlib.sha256(body).hexdigest()
    all_headers = {"host": parts.netloc, "x-amz-date": amz_date, "x-amz-content-sha256": payload_hash}
    all_headers.update({k.lower(): v for k, v in (headers or {}).items()})
    if access_key and secret_key:
        names = sorted(all_headers)
        query = "&".join(
            f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}"
            for k, v in sorted(urllib.parse.parse_qsl(parts.query, keep_blank_values=True)))
        canonical = "\n".join([method, urllib.parse.quote(parts.path or "/", safe="/-_.~"), query,
                               "".join(f"{n}:{str(all_headers[n]).strip()}\n" for n in names),
                               ";".join(names), payload_hash])
        scope = f"{day}/{region}/{service}/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                             hashlib.sha256(canonical.encode()).hexdigest()])
        key = _sign(_sign(_sign(_sign(f"AWS4{secret_key}".encode(), day), region), service),
                    "aws4_request")
        signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        all_headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
                                        f"SignedHeaders={';'.join(names)}, Signature={signature}")
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = cls(parts.hostname, parts.port, timeout=timeout)
    try:
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        conn.request(method, target, body=body or None, headers=all_headers)
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def s3_location(driver: str, params: dict) -> dict:
    """Endpoint, bucket and keys of an S3-like storage engine (S3Storage, RadosGWStorage, ...)."""
    if driver in ("S3Storage", "IBMCloudStorage", "CloudFlareStorage"):
        host = params.get("host") or params.get("endpoint_url")
        scheme = "https" if params.get("is_secure", True) else "http"
        if driver == "S3Storage" and params.get("s3_region"):
            # storage/cloud.py: with s3_region, S3Storage goes to AWS's endpoint for the region
            # and ignores endpoint_url and host (checked in v3.17.4 and v3.18.0).
            region = params["s3_region"]
            endpoint = f"https://s3.{region}.amazonaws.com" + (".cn" if region.startswith("cn-")
                                                                 else "")
        elif host and "://" in host:
            endpoint = host.rstrip("/")
        elif host:
            endpoint = f"{scheme}://{host}" + (f":{params['port']}" if params.get("port") else "")
        else:
            endpoint = f"https://s3.{params.get('s3_region') or 'us-east-1'}.amazonaws.com"
        return {"endpoint": endpoint, "bucket": params.get("s3_bucket"),
                "access_key": params.get("s3_access_key"), "secret_key": params.get("s3_secret_key"),
                "region": params.get("s3_region") or "us-east-1",
                "path": params.get("storage_path", "").strip("/")}
    if driver == "RadosGWStorage":
        scheme = "https" if params.get("is_secure") else "http"
        hostname = params.get("hostname", "")
        if params.get("port"):
            hostname = f"{hostname}:{params['port']}"
        return {"endpoint": f"{scheme}://{hostname}", "bucket": params.get("bucket_name"),
                "access_key": params.get("access_key"), "secret_key": params.get("secret_key"),
                "region": "us-east-1", "path": params.get("storage_path", "").strip("/")}
    raise ValueError(f"{driver} is not a valid storage type.")


def storage_validate(driver: str, params: dict) -> None:
    """Quay's storage.validate(): write a small object and read it back (raises on failure)."""
    if driver == "LocalStorage":
        path = os.path.join(params.get("storage_path", "/datastorage"), "_verify")
        with open(path, "w") as handle:
            handle.write("testing 123")
        return
    where = s3_location(driver, params)
    key = "/".join(p for p in (where["path"], "_verify") if p)
    url = f"{where['endpoint']}/{where['bucket']}/{key}"
    common = {k: where[k] for k in ("access_key", "secret_key", "region")}
    status, body = aws_request("PUT", url, service="s3", body=b"testing 123", **common)
    if status != 200:
        raise OSError(f"PUT {key}: HTTP {status} {body[:200]!r}")
    status, body = aws_request("GET", url, service="s3", **common)
    if status != 200 or body != b"testing 123":
        raise OSError(f"GET {key}: HTTP {status}")


# ---------------------------------------------------------------- d_validate_config_bundle.sh


def _db_connect(uri: str, connect_timeout: float, statement_timeout_ms: int | None = None):
    import psycopg2

    options = f"-c statement_timeout={statement_timeout_ms}" if statement_timeout_ms else None
    kwargs = {"connect_timeout": connect_timeout}
    if options:
        kwargs["options"] = options
    return psycopg2.connect(uri.replace("postgresql+psycopg2://", "postgresql://"), **kwargs)


def _redis_ping(settings: dict, timeout: float) -> None:
    import redis

    client = redis.Redis(host=settings.get("host"), port=int(settings.get("port") or 6379),
                         password=settings.get("password"), ssl=bool(settings.get("ssl")),
                         socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        client.ping()
    finally:
        client.close()


def validate(config: dict) -> list:
    """config-tool validate --mode online for the field groups Quay's start depends on.

    Returns [(field group, message)] of every failure, like config-tool's table.
    """
    problems = []
    # HostSettings
    hostname = config.get("SERVER_HOSTNAME")
    if not hostname:
        problems.append(("HostSettings", "SERVER_HOSTNAME is required"))
    if not isinstance(hostname, str) or not HOSTNAME_RE.match(hostname or ""):
        problems.append(("HostSettings", "SERVER_HOSTNAME must be of type Hostname"))
    scheme = config.get("PREFERRED_URL_SCHEME", "http")
    if scheme not in ("http", "https"):
        problems.append(("HostSettings", "PREFERRED_URL_SCHEME must be one of http, https."))
    if scheme == "https" and not config.get("EXTERNAL_TLS_TERMINATION", False):
        certs = certificates()
        for name in ("ssl.cert", "ssl.key"):
            if name not in certs:
                problems.append(("HostSettings", f"Certificate {name} is required for HostSettings ."))
                break
        else:
            try:
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                context.load_cert_chain(os.path.join(CONF, "ssl.cert"), os.path.join(CONF, "ssl.key"))
            except (ssl.SSLError, OSError) as err:
                problems.append(("HostSettings", f"tls: private key does not match public key ({err})"))
    # Database
    uri = config.get("DB_URI")
    if not uri:
        problems.append(("Database", "DB_URI is required."))
    else:
        try:
            _db_connect(uri, DB_CONNECT_TIMEOUT).close()
        except Exception as err:  # noqa: BLE001 - any driver error is the message
            problems.append(("Database", f"Could not connect to database. Error: {str(err).strip()}"))
    # Redis
    for field in ("BUILDLOGS_REDIS", "USER_EVENTS_REDIS"):
        settings = config.get(field)
        if not isinstance(settings, dict):
            problems.append(("Redis", f"{field} is required"))
            continue
        if not settings.get("host"):
            problems.append(("Redis", f"{field}.HOST is required"))
            continue
        try:
            _redis_ping(settings, 3.0)
        except Exception as err:  # noqa: BLE001
            problems.append(("Redis", f"Could not connect to Redis with values provided in {field}. "
                                      f"Error: {err}"))
    # DistributedStorage
    engines = storage_engines(config)
    if not engines:
        problems.append(("DistributedStorage",
                         "DISTRIBUTED_STORAGE_CONFIG must contain at least one storage location."))
    for name, driver, params in engines:
        if driver == "LocalStorage":
            continue
        try:
            where = s3_location(driver, params)
        except ValueError as err:
            problems.append(("DistributedStorage", str(err)))
            continue
        try:
            status, _ = aws_request("HEAD", f"{where['endpoint']}/{where['bucket']}", service="s3",
                                    access_key=where["access_key"], secret_key=where["secret_key"],
                                    region=where["region"], timeout=STORAGE_TIMEOUT)
        except OSError as err:
            problems.append(("DistributedStorage", f"Could not connect to storage {name}. Error: {err}"))
            continue
        if status == 404:
            problems.append(("DistributedStorage",
                             f"Could not find bucket ({where['bucket']}) in storage ({name})"))
        elif status != 200:
            problems.append(("DistributedStorage",
                             f"Could not connect to storage {name}. Error: HTTP {status}"))
    return problems


def table(problems: list) -> str:
    """config-tool's tablewriter output: Field Group | Error | Status."""
    groups = ["Database", "DistributedStorage", "HostSettings", "Redis"]
    rows = []
    for group in groups:
        mine = [message for g, message in problems if g == group]
        rows += [(group, m, "🔴") for m in mine] if mine else [(group, "-", "🟢")]
    widths = [max(len(r[i]) for r in rows + [("Field Group", "Error", "Status")]) for i in range(3)]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def row(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    out = [line, row(("Field Group", "Error", "Status")), line]
    for r in rows:
        out += [row(r), line]
    return "\n".join(out)


# ---------------------------------------------------------------- runmigration.sh (alembic)


def revisions() -> list:
    """This image's migration chain, oldest first: [{"revision", "down", "table", "message"}]."""
    with open(REVISIONS_FILE) as handle:
        return json.load(handle)


def migrate(config: dict) -> None:
    """alembic upgrade head, as data/migrations/env.py runs it: no lock, no transaction."""
    import psycopg2

    chain = revisions()
    known = {step["revision"]: i for i, step in enumerate(chain)}
    conn = _db_connect(config["DB_URI"], DB_CONNECT_TIMEOUT)
    conn.autocommit = True  # transactional_ddl=False: each statement stands on its own
    say("INFO  [alembic.runtime.migration] Context impl PostgresqlImpl.")
    say("INFO  [alembic.runtime.migration] Will assume non-transactional DDL.")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass('alembic_version')")
            current = None
            if cur.fetchone()[0] is None:
                cur.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL, "
                            "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))")
            else:
                cur.execute("SELECT version_num FROM alembic_version")
                row = cur.fetchone()
                current = row[0] if row else None
            if current is not None and current not in known:
                # alembic's message when the database is at a revision this image does not have.
                say("Traceback (most recent call last):")
                say('  File "/usr/local/bin/alembic", line 8, in <module>')
                say("    sys.exit(main())")
                say(f"alembic.script.revision.ResolutionError: No such revision or branch '{current}'")
                say("")
                say("The above exception was the direct cause of the following exception:")
                say("")
                say(f"alembic.util.exc.CommandError: Can't locate revision identified by '{current}'")
                # Real Quay (v3.17.4 on v3.18.0's database): runmigration.sh ends with alembic's
                # "FAILED: ..." line and exit status 255, which the entry point passes on.
                say(f"FAILED: Can't locate revision identified by '{current}'")
                raise SystemExit(255)
            start = known[current] + 1 if current is not None else 0
            seconds = float(os.environ.get("QUAY_STANDIN_MIGRATION_SECONDS", "2"))
            for step in chain[start:]:
                down = step["down"] or "<base>"
                say(f"INFO  [alembic.runtime.migration] Running upgrade {down} -> {step['revision']}, "
                    f"{step['message']}")
                # Half the work, a pause, the other half: killed in between, the table stays and
                # the revision does not move, so the next start fails on CREATE TABLE until repaired.
                cur.execute(f"CREATE TABLE {step['table']} (id SERIAL PRIMARY KEY)")
                time.sleep(seconds / 2)
                cur.execute(f"ALTER TABLE {step['table']} ADD COLUMN name VARCHAR(255)")
                time.sleep(seconds / 2)
                if step["down"] is None and current is None:
                    cur.execute("INSERT INTO alembic_version (version_num) VALUES (%s)",
                                (step["revision"],))
                else:
                    cur.execute("UPDATE alembic_version SET version_num = %s", (step["revision"],))
                current = step["revision"]
            if start == 0 and chain:
                # The first migration creates Quay's tables; the health check reads teamrole.
                cur.execute("CREATE TABLE IF NOT EXISTS teamrole (id SERIAL PRIMARY KEY, "
                            "name VARCHAR(255) NOT NULL)")
                cur.execute("INSERT INTO teamrole (name) SELECT unnest(ARRAY['admin','creator','member'])"
                            " WHERE NOT EXISTS (SELECT 1 FROM teamrole)")
    except psycopg2.Error as err:
        say("Traceback (most recent call last):")
        say(f"sqlalchemy.exc.ProgrammingError: ({type(err).__module__}.{type(err).__name__}) "
            f"{str(err).strip()}")
        raise SystemExit(1) from None
    finally:
        conn.close()


# ---------------------------------------------------------------- health/ (services.py, healthcheck.py)


def local_state() -> dict:
    """service -> "fail" | "hang" from CONTROL/local, read on every check."""
    states = {}
    try:
        with open(os.path.join(CONTROL, "local")) as handle:
            for line in handle:
                words = line.split()
                if len(words) == 2 and words[0] in LOCAL_SERVICES:
                    states[words[0]] = words[1]
    except OSError:
        pass
    return states


class Checks:
    """The checks of health/services.py, in its order, against the real services."""

    def __init__(self, config: dict):
        self.config = config

    def _local(self, name: str, timeout: float) -> tuple:
        state = local_state().get(name)
        if state == "hang":
            time.sleep(timeout)
            return False, f"Exception when checking worker health: {name}"
        return state != "fail", None

    def registry_gunicorn(self):
        return self._local("registry_gunicorn", GUNICORN_TIMEOUT)

    def web_gunicorn(self):
        return self._local("web_gunicorn", GUNICORN_TIMEOUT)

    def service_key(self):
        if not self.config.get("SETUP_COMPLETE", False):
            return True, "Stack not fully setup; skipping check"
        return self._local("service_key", 0)

    def disk_space(self):
        if local_state().get("disk_space"):
            return self._local("disk_space", 0)
        threshold = self.config.get("DISKSPACE_HEALTH_THRESHOLD", 0.01)
        for path in ("/", "/tmp"):
            usage = shutil.disk_usage(path)
            if usage.free / usage.total < threshold:
                return False, f"Disk space has gone below threshold on {path}"
        return True, ""

    def database(self):
        try:
            conn = _db_connect(self.config["DB_URI"], DB_CONNECT_TIMEOUT)
        except Exception as err:  # noqa: BLE001
            return False, f"Could not connect to the database: {err}"
        try:
            with conn.cursor() as cur:
                cur.execute("SET LOCAL statement_timeout=%s;", (DB_STATEMENT_TIMEOUT_MS,))
                cur.execute("SELECT id FROM teamrole LIMIT 1")
                okay = cur.fetchone() is not None
            return okay, None if okay else "Could not execute query, timeout reached"
        except Exception as err:  # noqa: BLE001
            return False, f"Could not connect to the database: {err}"
        finally:
            conn.close()

    def redis(self):
        try:
            _redis_ping(self.config.get("BUILDLOGS_REDIS") or {}, 5.0)
            return True, None
        except Exception as err:  # noqa: BLE001
            return False, f"Could not connect to redis: {err}"

    def storage(self):
        if self.config.get("REGISTRY_STATE", "normal") == "readonly":
            return True, "Storage check disabled for readonly mode"
        engines = storage_engines(self.config)
        for index, (name, driver, params) in enumerate(engines):
            try:
                storage_validate(driver, params)
            except Exception as err:  # noqa: BLE001
                if index == 0:  # only a preferred engine fails the check
                    return False, f"Storage check failed for {name}: {err}"
        return True, None

    def preferred_storage(self):
        engines = storage_engines(self.config)
        try:
            storage_validate(engines[0][1], engines[0][2])
            return True, None
        except Exception as err:  # noqa: BLE001
            return False, f"Preferred storage check failed with exception {err}"

    def auth(self):
        if self.config.get("AUTHENTICATION_TYPE", "Database") != "LDAP":
            return True, None
        uri = urllib.parse.urlsplit(self.config.get("LDAP_URI", ""))
        port = uri.port or (636 if uri.scheme == "ldaps" else 389)
        try:
            socket.create_connection((uri.hostname, port), timeout=3).close()
            return True, None
        except OSError as err:
            return False, f"Could not connect to LDAP: {err}"

    def run(self, for_instance: bool, skip: list) -> dict:
        names = ["registry_gunicorn", "web_gunicorn", "service_key", "disk_space"] if for_instance else []
        names += ["database", "redis", "storage", "auth"]
        if for_instance and self.config.get("HEALTH_CHECKER_INSTANCE_CHECK_PREFERRED_STORAGE"):
            names.append("preferred_storage")
        return {name: getattr(self, name)() for name in names if name not in skip}


def rds_status(params: dict) -> str:
    """RDSAwareHealthCheck._get_rds_status: DescribeDBInstances over the query API."""
    region = params.get("region", "us-east-1")
    endpoint = (os.environ.get("AWS_ENDPOINT_URL_RDS") or os.environ.get("AWS_ENDPOINT_URL")
                or f"https://rds.{region}.amazonaws.com")
    body = b"Action=DescribeDBInstances&Version=2014-10-31"
    try:
        status, answer = aws_request(
            "POST", endpoint.rstrip("/") + "/", service="rds", region=region,
            access_key=params.get("access_key"), secret_key=params.get("secret_key"), body=body,
            headers={"content-type": "application/x-www-form-urlencoded; charset=utf-8"},
            timeout=10)
        if status != 200:
            return "error"
        for element in ET.fromstring(answer).iter():
            if element.tag.endswith("DBInstance"):
                fields = {child.tag.split("}")[-1]: child.text for child in element}
                if fields.get("DBInstanceIdentifier") == params.get("db_instance", "quay"):
                    return fields.get("DBInstanceStatus") or "error"
        return "error"
    except Exception:  # noqa: BLE001
        log("health.healthcheck", "ERROR", "Exception while checking RDS status")
        return "error"


def health(config: dict, kind: str) -> tuple:
    """(body, status) of /health/instance or /health/endtoend, as healthcheck.py computes it."""
    checker = config.get("HEALTH_CHECKER") or ["LocalHealthCheck", {}]
    name, params = checker[0], dict(checker[1] or {})
    skips = params.pop("instance_skips", None)
    if skips is None:
        skips = ["redis", "storage"]
    if kind == "instance":
        statuses = Checks(config).run(True, skips)
    else:
        statuses = Checks(config).run(False, [])
    skip = []
    if kind == "instance" and name in ("RDSAwareHealthCheck", "ProductionHealthCheck"):
        # Real Quay (v3.17.4 and v3.18.0, seen on it): get_instance_health tests
        # `not service_statuses["database"]`, a (bool, message) tuple that is never false, so it
        # never asks RDS and the database always counts. The stand-in does the same.
        database = statuses.get("database")
        if database is not None and not database and rds_status(params) != "available":
            skip.append("database")
    healthy = all(ok for service, (ok, _) in statuses.items() if service not in skip)
    services = {service: ok for service, (ok, _) in statuses.items()}
    if not healthy:
        expanded = {s: ({"status": ok, "failure": m} if not ok else {"status": ok})
                    for s, (ok, m) in statuses.items()}
        log("health.healthcheck", "WARNING", f"[FAILED HEALTH CHECK] {{'services_expanded': {expanded}}}")
    return {"services": services}, 200 if healthy else 503


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    config: dict = {}
    redirect_to: str | None = None  # set on the 8080 server when TLS is on

    def log_message(self, fmt, *args):
        code = args[1] if len(args) > 1 else "-"
        say(f'nginx stdout | {self.client_address[0]} - - [{self.log_date_time_string()}] '
            f'"{self.requestline}" {code}')

    def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):  # noqa: N802 - http.server's naming
        if self.redirect_to is not None:
            # conf/nginx: with ssl.key present, 8080 only redirects to https.
            location = f"https://{self.redirect_to}{self.path}"
            self._send(301, b"", {"Location": location, "Content-Type": "text/html"})
            return
        path = self.path.split("?", 1)[0]
        if path == "/v2/":
            # Load for the cluster's balancer (tests/loadgen.py): the registry API's version
            # check, answered at once, touching no shared service (real Quay asks for auth).
            self._send(200, b"{}", {"Content-Type": "application/json",
                                    "Docker-Distribution-API-Version": "registry/2.0"})
            return
        pinged = {"/_internal_ping": "web_gunicorn", "/v1/_internal_ping": "registry_gunicorn"}
        if path in pinged:
            # Quay's own liveness pings (endpoints/web.py, endpoints/v1): answered by each
            # gunicorn, touching no shared service; a hung or failed gunicorn does not answer.
            how = local_state().get(pinged[path])
            if how == "hang":
                time.sleep(3600)
            if how == "fail":
                self._send(502, b"<html>502 Bad Gateway</html>", {"Content-Type": "text/html"})
            else:
                self._send(200, b"true", {"Content-Type": "text/html; charset=utf-8"})
            return
        if path in ("/health/instance", "/health"):
            kind = "instance"
        elif path in ("/health/endtoend", "/status"):
            kind = "endtoend"
        else:
            self._send(404, b"", {"Content-Type": "text/html"})
            return
        if kind == "instance" and local_state().get("web_gunicorn") == "hang":
            time.sleep(3600)  # the request is served by the hung web worker itself
        data, status = health(self.config, kind)
        body = json.dumps({"data": data, "status_code": status}, sort_keys=True,
                          separators=(",", ":")).encode() + b"\n"
        self._send(status, body, {"Content-Type": "application/json", "Cache-Control": "no-cache"})

    do_HEAD = do_GET

    def do_PUT(self):  # noqa: N802 - http.server's naming
        # Load for the cluster's balancer (tests/loadgen.py): a blob-upload-like request whose
        # body is read in full (it may trickle in for seconds) and counted.
        if self.redirect_to is not None:
            self.close_connection = True  # the body is not read
            self._send(301, b"", {"Location": f"https://{self.redirect_to}{self.path}",
                                  "Content-Type": "text/html", "Connection": "close"})
            return
        if self.path.split("?", 1)[0] != "/load/upload":
            self.close_connection = True
            self._send(404, b"", {"Content-Type": "text/html", "Connection": "close"})
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            self._send(411, b"", {"Content-Type": "text/html", "Connection": "close"})
            return
        left = int(length)
        try:
            while left:
                chunk = self.rfile.read1(min(left, 65536))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass
        if left:
            # The client went away mid-body: nothing to answer. nginx logs 400 for it
            # ("client prematurely closed connection").
            self.close_connection = True
            self.log_request(400)
            return
        body = json.dumps({"received": int(length)}).encode()
        self._send(201, body, {"Content-Type": "application/json"})

    do_PATCH = do_PUT


def serve(config: dict) -> None:
    http_port = int(os.environ.get("QUAY_STANDIN_HTTP_PORT", "8080"))
    https_port = int(os.environ.get("QUAY_STANDIN_HTTPS_PORT", "8443"))
    bind = os.environ.get("QUAY_STANDIN_BIND", "127.0.0.1")
    tls = all(os.path.exists(os.path.join(CONF, n)) for n in ("ssl.cert", "ssl.key"))
    servers = []
    app = type("App", (Handler,), {"config": config})
    if tls:
        secure = http.server.ThreadingHTTPServer((bind, https_port), app)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(os.path.join(CONF, "ssl.cert"), os.path.join(CONF, "ssl.key"))
        secure.socket = context.wrap_socket(secure.socket, server_side=True)
        servers.append(secure)
        redirect = type("Redirect", (Handler,), {"redirect_to": config["SERVER_HOSTNAME"]})
        servers.append(http.server.ThreadingHTTPServer((bind, http_port), redirect))
    else:
        servers.append(http.server.ThreadingHTTPServer((bind, http_port), app))
    for server in servers:
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]
    say(f"{stamp} INFO success: nginx entered RUNNING state, process has stayed up for > "
        "than 1 seconds (startsecs)")
    ports = f"{http_port}" + (f" (301 to https), {https_port} (https)" if tls else " (http)")
    log("boot", "INFO", f"quay stand-in {read_version()} serving on {bind}:{ports}")
    while True:
        time.sleep(3600)  # until SIGTERM: _stop exits


def read_version() -> str:
    try:
        with open(VERSION_FILE) as handle:
            return handle.read().strip()
    except OSError:
        return "unknown"


# ---------------------------------------------------------------- quay-entrypoint.sh


def _stop(signum, frame) -> None:
    # Real Quay: supervisord stops its programs (19-38 s here, see test_conformance.py) and
    # exits 0. The stand-in stops at once: its one documented difference on SIGTERM.
    say("supervisord: received SIGTERM indicating exit request")
    os._exit(0)


def init_script(name: str) -> None:
    say(f"Running init script '{INIT}/{name}'")


def main(argv: list) -> int:
    entry = argv[1] if len(argv) > 1 else "registry"
    if entry not in ("registry", "registry-nomigrate"):
        say(f"Usage: {argv[0]} <registry|registry-nomigrate>")
        return 1
    # A PID 1 without a handler ignores SIGTERM; Quay's dumb-init passes it on and everything ends.
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    say("")
    say("Startup timestamp: ")
    say(time.strftime("%a %b %d %H:%M:%S UTC %Y", time.gmtime()))
    say("")
    if entry == "registry":
        say("Running all default registry services")
    else:
        say("Running all default registry services without migration")
    for name in ("certs_install.sh", "client_certs.sh", "copy_config_files.sh"):
        init_script(name)
    init_script("d_validate_config_bundle.sh")
    say("Validating Configuration")
    try:
        config = load_config()
    except Exception as err:  # noqa: BLE001 - config-tool: log.Fatalf(err.Error())
        say(f'time="{time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}" level=fatal msg="{err}"')
        return 1
    problems = validate(config)
    say(table(problems))
    if problems and not os.environ.get("IGNORE_VALIDATION"):
        return 1
    init_script("nginx_conf_create.sh")
    if entry == "registry":
        init_script("runmigration.sh")
        try:
            # app.py is imported by the migration's data_migration.py before alembic runs.
            check_app(config)
            migrate(config)
        except SystemExit as done:
            return int(done.code or 0)
    init_script("supervisord_conf_create.sh")
    init_script("zz_boot.sh")
    try:
        check_app(config)
        if not config.get("SETUP_COMPLETE", False):
            raise Exception("Your configuration bundle is either not mounted or setup has not been completed")
    except Exception:  # noqa: BLE001 - boot.py dies with a traceback
        say("Traceback (most recent call last):")
        say('  File "/quay-registry/boot.py", line 232, in main')
        say("".join(traceback.format_exception_only(*sys.exc_info()[:2])).rstrip())
        return 1
    serve(config)
    return 0


def check_app(config: dict) -> None:
    """app.py's import-time check: a set-up stack without DATABASE_SECRET_KEY is fatal."""
    if config.get("DATABASE_SECRET_KEY") is None and config.get("SETUP_COMPLETE", False):
        say("Traceback (most recent call last):")
        say('  File "/quay-registry/app.py", line 365, in <module>')
        say("Exception: Missing DATABASE_SECRET_KEY in config; did you perhaps forget to add it?")
        raise SystemExit(1)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
