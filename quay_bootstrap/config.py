"""The agent's config: one YAML file parsed once, strictly, into frozen typed objects."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import (
    Annotated,
    Any,
    Callable,
    Dict,
    Iterable,
    List,
    Literal,
    Mapping,
    Optional,
    Tuple,
    Union,
)

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.functional_validators import AfterValidator, BeforeValidator

from quay_bootstrap import config_checks as checks
from quay_bootstrap import safe_yaml
from quay_bootstrap.config_checks import HEALTH_SERVICES as HEALTH_SERVICES
from quay_bootstrap.errors import ConfigError
from quay_bootstrap.units import parse_duration, parse_size

DEFAULT_PATH = "/etc/quay-bootstrap/config.yaml"
ENV_PATH = "QUAY_BOOTSTRAP_CONFIG"

Duration = Annotated[float, BeforeValidator(parse_duration)]
PositiveDuration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]
Size = Annotated[int, BeforeValidator(parse_size)]
PositiveInt = Annotated[int, Field(gt=0)]


PortMapping = Annotated[str, AfterValidator(checks.port_mapping)]


class _Section(BaseModel):
    # Frozen and strict: a typo is an error, never a silent default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class StackConfig(_Section):
    source: str
    endpoint_url: Optional[str] = None
    region: Optional[str] = None
    ca_bundle: Optional[Path] = None
    dir: Path = Path("/var/lib/quay-bootstrap/stack")
    owner: str = "1001:0"
    refresh_interval: Duration = 60.0
    max_files: PositiveInt = 10_000
    max_bytes: Size = 64 * 1024 * 1024
    concurrency: Annotated[int, Field(ge=1, le=64)] = 16
    retry_deadline: Duration = 120.0
    keep_versions: Annotated[int, Field(ge=1)] = 3
    # An ed25519 public key (PEM): only versions published with `publish --sign` and this key's
    # private half are applied; hand-uploaded files never are.
    verify_key: Optional[Path] = None
    # Files copied by hand under `source` are taken only once a second listing this much later
    # shows the same objects (published versions never wait); 0 turns it off.
    settle: Duration = 5.0

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        return checks.stack_source(value)

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: Optional[str]) -> Optional[str]:
        return checks.endpoint_url(value)

    @field_validator("owner")
    @classmethod
    def _owner(cls, value: str) -> str:
        return checks.owner(value)

    @property
    def uid_gid(self) -> Tuple[int, int]:
        uid, gid = self.owner.split(":")
        return int(uid), int(gid)


class AuthConfig(_Section):
    username: Optional[str] = None
    password_file: Optional[Path] = None
    ecr: bool = False

    @model_validator(mode="after")
    def _one_kind(self) -> "AuthConfig":
        basic = self.username is not None or self.password_file is not None
        if basic and self.ecr:
            raise ValueError("use either username + password_file or ecr: true, not both")
        if basic and (self.username is None or self.password_file is None):
            raise ValueError("username and password_file go together")
        return self


# A fixed release tag: v3.9.0, 3.9.0, v3.9.0-rc1. Floating tags (latest, v3, 3.9) never match.
DEFAULT_ALLOWED_TAGS = r"^v?\d+\.\d+\.\d+(-[0-9A-Za-z][0-9A-Za-z.]*)?$"


class ImageConfig(_Section):
    reference: str
    lock: Optional[str] = None
    allowed_tags: str = DEFAULT_ALLOWED_TAGS
    auth: Optional[AuthConfig] = None
    pull_deadline: Duration = 600.0

    @field_validator("lock")
    @classmethod
    def _lock(cls, value: Optional[str]) -> Optional[str]:
        return checks.lock_url(value)

    @field_validator("allowed_tags")
    @classmethod
    def _regex(cls, value: str) -> str:
        return checks.regex(value)


class ContainerConfig(_Section):
    name: str = "quay"
    ports: List[PortMapping] = Field(default_factory=lambda: ["443:8443", "80:8080"])
    volumes: List[str] = Field(default_factory=list)
    env: Dict[str, str] = Field(default_factory=dict)
    # None: Quay's documented net.core.somaxconn=4096 with bridge networking, none with host
    # networking (Docker refuses net.* sysctls there).
    sysctls: Optional[Dict[str, str]] = None
    network_mode: Optional[str] = None
    privileged: bool = False
    # Real Quay (supervisord stopping its programs) took 19-38 s to end on SIGTERM here
    # (tests/integration/test_real_quay.py): 30 s SIGKILLed it mid-request.
    stop_timeout: Duration = 90.0
    adopt_unmanaged: bool = False

    @field_validator("env", "sysctls", mode="before")
    @classmethod
    def _stringify(cls, value: Any) -> Any:
        return checks.stringify(value)

    @field_validator("env")
    @classmethod
    def _quay_env(cls, value: Dict[str, str]) -> Dict[str, str]:
        return checks.quay_env(value)


# Quay's /health/instance runs its checks one after another: gunicorn 2 s each, the database a
# 3 s connect plus a 5 s statement (health/services.py), an LDAP bind 10 s network + 10 s
# operation (data/users/externalldap.py). A timeout below that sum would call a slow shared
# service a hung local Quay on every node at once. Slower still (the preferred storage's and
# RDS's boto3 calls, 60 s with retries): Quay's own pings tell those apart (health.py).
QUAY_WORST_CASE = 2 + 2 + 3 + 5 + 10 + 10


class HealthConfig(_Section):
    # None: follows conf/stack and the port mapping (8443 with ssl.key, else 8080; see
    # container.health_url).
    url: Optional[str] = None
    tls_verify: bool = False
    start_period: Duration = 300.0
    interval: PositiveDuration = 10.0
    timeout: PositiveDuration = QUAY_WORST_CASE + 3.0
    failure_threshold: PositiveInt = 3
    success_threshold: PositiveInt = 1
    shared_services: List[str] = Field(
        default_factory=lambda: ["database", "redis", "storage", "auth", "preferred_storage"])

    @field_validator("url")
    @classmethod
    def _url(cls, value: Optional[str]) -> Optional[str]:
        return checks.health_url(value)


class RestartConfig(_Section):
    backoff_initial: PositiveDuration = 10.0
    backoff_max: PositiveDuration = 300.0
    unhealthy_after: PositiveInt = 5
    window: PositiveDuration = 1800.0


class RdsConfig(_Section):
    db_instance: str
    region: Optional[str] = None


class LifecycleConfig(_Section):
    launch_hook: Optional[str] = None
    termination_hook: Optional[str] = None
    heartbeat_interval: Duration = 60.0


class ReportConfig(_Section):
    autoscaling: Union[bool, Literal["auto"]] = "auto"
    listen: str = "127.0.0.1:9101"
    state_file: Path = Path("/run/quay-bootstrap/status.json")
    on_unhealthy: Optional[List[str]] = None
    rds: Optional[RdsConfig] = None
    lifecycle: Optional[LifecycleConfig] = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        return checks.listen(value)

    @field_validator("on_unhealthy", mode="before")
    @classmethod
    def _argv(cls, value: Any) -> Any:
        return checks.argv(value)


class BalancerConfig(_Section):
    """The load balancer in front of the nodes, as its health check is set up: how often it
    checks the agent's /ready and after how many failed checks it stops sending a node new
    connections. The drain period follows from them (drain.drain_period)."""

    check_interval: PositiveDuration = 10.0
    fall: PositiveInt = 3
    # The longest request to let finish once no new one arrives (a large push's upload).
    in_flight: Duration = 15.0


class RolloutConfig(_Section):
    max_unavailable: PositiveInt = 1
    # Renewed while held, so it only bounds how long a node that died mid-roll blocks the others.
    lease_ttl: PositiveDuration = 600.0
    # Leave the load balancer before every planned stop of Quay (a roll, an upgrade, a restart
    # the agent chose, a termination). Off: Quay is stopped at once (a measured comparison).
    drain: bool = True
    # None: from `balancer` (check_interval x (fall + 1) + in_flight); no wait without it.
    drain_period: Optional[Duration] = None
    # On AWS: EnterStandby before a planned stop and ExitStandby once healthy, so the group's
    # target groups deregister the node (their deregistration delay lets requests finish).
    standby: bool = False
    # A new image rolls only while Quay's /health/endtoend answers (a migration needs the
    # database). False: an operator's way past a check that fails for a reason of its own.
    wait_for_shared_services: bool = True


class LoggingConfig(_Section):
    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"


class Config(_Section):
    """The whole agent config; every section but `stack` and `image` has defaults."""

    stack: StackConfig
    image: ImageConfig
    container: ContainerConfig = Field(default_factory=ContainerConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    restart: RestartConfig = Field(default_factory=RestartConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    balancer: Optional[BalancerConfig] = None
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        if self.container.network_mode == "host" and any(
                k.startswith("net.") for k in self.container.sysctls or {}):
            raise ValueError("container.sysctls: net.* sysctls cannot be set with network_mode "
                             "host; remove them or use the default bridge network")
        # A lease must outlive a replacement (drain, stop, then Quay's start), or a second node
        # could take the slot while this one is still down.
        from quay_bootstrap.drain import drain_period

        drain = drain_period(self)
        floor = drain + self.container.stop_timeout + self.health.start_period
        if self.rollout.lease_ttl <= floor:
            raise ValueError(f"rollout.lease_ttl ({self.rollout.lease_ttl:g}s) must be longer "
                             f"than {'rollout.drain_period + ' if drain else ''}"
                             f"container.stop_timeout + health.start_period ({floor:g}s)")
        return self

    def secrets(self) -> List[str]:
        """Values in this config to mask in every output: secret-named container.env values, and
        the arguments of report.on_unhealthy that may be a credential (checks.secret_args)."""
        from quay_bootstrap.logs import SECRET_NAME

        found = [v for k, v in self.container.env.items() if SECRET_NAME.search(k)]
        return found + checks.secret_args(self.report.on_unhealthy or [])


def config_path(cli_value: Optional[str], environ: Mapping[str, str]) -> str:
    """The config file to read: --config, else $QUAY_BOOTSTRAP_CONFIG, else the default."""
    return cli_value or environ.get(ENV_PATH) or DEFAULT_PATH


def load_config(path: str, add_secrets: Optional[Callable[[Iterable[str]], None]] = None) -> Config:
    """Read and validate the agent config at `path`.

    Raises:
        ConfigError: the file is missing, unreadable, not YAML, or breaks the schema; every
            problem is listed with its key path.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("the agent config file does not exist", where=path,
                          hint=f"Write it, or point --config or ${ENV_PATH} at it") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read the agent config: {err}", where=path) from err
    return parse_config(text, path, add_secrets)


def parse_config(text: str, where: str = "<config>",
                 add_secrets: Optional[Callable[[Iterable[str]], None]] = None) -> Config:
    """Validate YAML text as an agent config; see load_config. `add_secrets` (the redactor's
    `add`) is given the config's secret values as soon as it parses, before it is validated:
    a problem found then must not show one."""
    try:
        data = safe_yaml.load(text)
    except yaml.YAMLError as err:
        raise ConfigError("the agent config is not valid YAML",
                          where=f"{where} {safe_yaml.where(err, text)}",
                          hint="Fix the YAML there (its text is not shown: it may hold a "
                               "secret)") from None
    if not isinstance(data, dict):
        raise ConfigError("the agent config must be a YAML mapping with at least "
                          "`stack` and `image` sections", where=where)
    if add_secrets:
        from quay_bootstrap.stack.validate import stack_secrets

        add_secrets(stack_secrets(data))
    try:
        config = Config.model_validate(data)
    except ValidationError as err:
        # from None: pydantic's own text quotes every input value, secrets too.
        raise ConfigError(f"the agent config has {err.error_count()} problem(s)", where=where,
                          hint="Fix every key listed below",
                          problems=_problems(err)) from None
    if add_secrets:
        add_secrets(config.secrets())
    return config


def _problems(err: ValidationError) -> List[Tuple[str, str]]:
    problems = []
    for item in err.errors(include_url=False):
        loc = [str(part) for part in item["loc"]]
        if item["type"] == "extra_forbidden":
            model = _model_at(loc[:-1])
            known = sorted(model.model_fields) if model else []
            close = difflib.get_close_matches(loc[-1], known, n=1)
            what = "unknown key" + (f"; did you mean {close[0]!r}?" if close
                                    else f"; known keys here: {', '.join(known)}")
        elif item["type"] == "missing":
            what = "required key is missing"
        else:
            what = item["msg"].removeprefix("Value error, ")
        problems.append((".".join(loc), what))
    return problems


def _model_at(path: List[str]) -> Optional[type]:
    model: Any = Config
    for part in path:
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return None
        annotation = field.annotation
        for candidate in getattr(annotation, "__args__", (annotation,)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                model = candidate
                break
        else:
            return None
    return model
