"""One botocore session per process for every AWS client the agent makes (S3 stack source and
leases, ECR tokens, Auto Scaling health, lifecycle hooks and Standby, RDS status).

A session keeps what it loaded for good: its endpoint table (botocore's endpoints.json, about
9 MiB once parsed, listing every region of every AWS service) and each service's model. Before
this module the S3 store, ECR, the lifecycle hooks, Standby and RDS each made a session of their
own (ECR and the Auto Scaling health mark shared boto3's default one), so an AWS node with all of
them paid the table five times. One session pays it once, and keeps of the table only the
services the agent and botocore's credential providers call (`KEPT`); the endpoint rule sets
botocore resolves them with are per service and untouched, so their clients resolve exactly as
before (`tests/unit/test_aws_session.py` checks it).

A session reads credentials and settings from the environment once, so one is kept per AWS_*
environment (the agent's does not change; a test's does). Making clients from one session is
not thread-safe, so clients are made under a lock; a botocore client itself is thread-safe.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Dict, List

# The services whose clients the agent makes.
SERVICES = frozenset({"s3", "ecr", "autoscaling", "rds"})
# Their entries in the endpoint table (keyed by endpoint prefix), and those of the clients
# botocore's credential providers make themselves (STS for assume-role, SSO, sign-in).
KEPT = frozenset({"s3", "api.ecr", "autoscaling", "rds", "sts", "portal.sso", "oidc", "signin"})

_SESSIONS: Dict[tuple, Any] = {}
_LOCK = threading.Lock()


def client(service: str, **kwargs: Any) -> Any:
    """A botocore client of SERVICE (one of SERVICES) from this process's session for the
    current AWS_* environment; KWARGS as botocore's create_client takes them."""
    if service not in SERVICES:  # a new caller: add it to SERVICES, its endpoint prefix to KEPT
        raise ValueError(f"aws_session.client: {service!r} is not in SERVICES")
    environment = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    with _LOCK:
        session = _SESSIONS.get(environment)
        if session is None:
            session = _SESSIONS[environment] = _session()
        return session.create_client(service, **kwargs)


def credential_secrets() -> List[str]:
    """The keys every session signs with now, however botocore found them (environment, shared
    credentials file, instance profile): a refreshed instance-profile key is new each time."""
    found: List[str] = []
    with _LOCK:
        sessions = list(_SESSIONS.values())
    for session in sessions:
        credentials = session.get_credentials()
        if credentials is not None:
            frozen = credentials.get_frozen_credentials()
            found += [v for v in (frozen.access_key, frozen.secret_key, frozen.token) if v]
    return found


def _session() -> Any:
    import botocore.session

    session = botocore.session.Session()
    # The loader returns (and caches) the same parsed table to the endpoint resolver that every
    # client of this session is made with; trimmed here, before the first client, it is what
    # they all see. Partitions, regions and defaults stay; only other services' entries go.
    table = session.get_component("data_loader").load_data("endpoints")
    for partition in table.get("partitions", []):
        services = partition.get("services", {})
        partition["services"] = {k: v for k, v in services.items() if k in KEPT}
    return session
