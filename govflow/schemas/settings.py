"""One frozen settings object, read from the environment at the edge of the program.

Nothing below the command line reads ``os.environ``: it receives a ``Settings``.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from typing import Annotated, Literal

import msgspec

from govflow.schemas._service_links import is_service_link
from govflow.schemas.durations import parse_retention
from govflow.schemas.errors import ConfigError
from govflow.schemas.keys import Keys

_ENV_PREFIX = "GOVFLOW_"
SCOPES = frozenset({"publish", "read", "operate", "decide"})

Positive = Annotated[int, msgspec.Meta(ge=1)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every knob of govflow; the environment names are ``GOVFLOW_`` + the upper-cased field."""

    redis_url: str | None = None  # None: the embedded Redis
    database_url: str | None = None  # None: the embedded Postgres
    data_dir: str = ".govflow"
    prefix: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.\-]+$")] = "govflow"
    max_attempts: Positive = 5
    backoff_base: Seconds = 2.0
    backoff_max: Seconds = 3600.0  # the longest wait before a retry (backoff, Retry-After)
    claim_idle: Seconds = 30.0
    api_tokens: str = ""
    webhook_secret: str = ""
    webhook_timeout: Seconds = 10.0
    webhook_allowed_hosts: str = ""  # space-separated; empty: public addresses only
    webhook_host_concurrency: Positive = 8  # webhooks in flight to one host, per worker
    webhook_key_grace: Seconds = 86_400.0  # a rotated-out signing key still signs this long
    step_timeout: Seconds = 60.0  # a step's time limit, unless its definition sets one
    io_concurrency: Positive = 64  # I/O steps (webhooks) in flight per worker
    hold_max: Seconds = 600.0  # a batch held for an unavailable server, before it counts
    partitions: Positive = 1
    lease_ttl: Seconds = 10.0  # a partition's lease (partitions > 1); renewed every third
    batch_size: Positive = 200
    retention: Annotated[int, msgspec.Meta(ge=0)] = 10_000  # acknowledged entries kept
    shutdown_grace: Seconds = 30.0
    max_chain_depth: Positive = 8
    # Work untouched this long, and that Redis no longer carries, is put back.
    reconcile_after: Seconds = 120.0
    max_chain_executions: Positive = 1000  # per root event, counted in Postgres
    # OpenTelemetry: auto exports when OTEL_EXPORTER_OTLP_ENDPOINT is set (docs/tracing.md).
    tracing: Literal["auto", "on", "off"] = "auto"
    # Finished executions are deleted this long after they finished, with their steps and
    # effects (``consumers.retention``): a duration such as 30d, or off (kept for good).
    execution_retention: str = "off"
    # How often a worker looks for approvals and tasks past their due time.
    deadline_interval: Seconds = 1.0
    # A worker writes its heartbeat this often (``runtime.heartbeat``); one silent for four
    # of these is stale.
    heartbeat_interval: Seconds = 5.0
    # A worker whose consumers have neither finished a batch nor polled for this long is
    # stalled, and `govflow check` fails. Above hold_max: a batch held through an outage
    # is no stall.
    stall_after: Seconds = 900.0

    def __post_init__(self) -> None:
        for url, schemes in (
            (self.redis_url, ("redis://", "rediss://", "unix://")),
            (self.database_url, ("postgresql://", "postgres://")),
        ):
            if url is not None and not url.startswith(schemes):
                raise ConfigError(f"{url.split(':', 1)[0]!r} is not one of {', '.join(schemes)}")
        parse_tokens(self.api_tokens)
        try:
            parse_retention(self.execution_retention)
        except ValueError as e:
            raise ConfigError(f"GOVFLOW_EXECUTION_RETENTION: {e}, or off") from e
        if self.backoff_max < self.backoff_base:
            raise ConfigError(
                f"GOVFLOW_BACKOFF_MAX ({self.backoff_max:g}) is shorter than "
                f"GOVFLOW_BACKOFF_BASE ({self.backoff_base:g})"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, **overrides: object) -> Settings:
        """Read ``GOVFLOW_*`` (and ``REDIS_URL`` / ``DATABASE_URL``) into settings.

        The names Kubernetes gives a pod for a Service called ``govflow-…``
        (``GOVFLOW_API_SERVICE_HOST`` and the like) are not settings, and are ignored.

        Raises:
            ConfigError: an unknown ``GOVFLOW_`` variable or a value of the wrong type.
        """
        raw: dict[str, object] = {}
        unknown: list[str] = []
        for key, value in sorted(env.items()):
            if not key.startswith(_ENV_PREFIX) or value == "":
                continue
            field = key.removeprefix(_ENV_PREFIX).lower()
            if field in cls.__struct_fields__:
                raw[field] = value
            elif not is_service_link(key, value):
                unknown.append(key)
        if unknown:
            raise ConfigError("; ".join(_unknown(key, cls.__struct_fields__) for key in unknown))
        for fallback in ("redis_url", "database_url"):
            if fallback not in raw and env.get(fallback.upper()):
                raw[fallback] = env[fallback.upper()]
        raw.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return msgspec.convert(raw, cls, strict=False)
        except msgspec.ValidationError as e:
            raise ConfigError(f"invalid setting: {_env_name(str(e))}") from e

    def keys(self) -> Keys:
        """The Redis key names of this deployment (its prefix and partitions)."""
        return Keys(self.prefix, self.partitions)

    def execution_retention_s(self) -> float | None:
        """Seconds a finished execution is kept; ``None``: for good."""
        return parse_retention(self.execution_retention)

    def tokens(self) -> dict[str, frozenset[str]]:
        """Map each API token to its scopes."""
        return parse_tokens(self.api_tokens)

    def allowed_hosts(self) -> frozenset[str]:
        """The webhook hosts, addresses and networks an operator allows; empty means any
        host at a public address (``plugins.egress``)."""
        return frozenset(self.webhook_allowed_hosts.split())


def parse_tokens(spec: str) -> dict[str, frozenset[str]]:
    """Parse ``token:scope[,scope] ...``.

    Raises:
        ConfigError: a token without scopes or with an unknown scope.
    """
    tokens: dict[str, frozenset[str]] = {}
    for item in spec.split():
        token, _, scopes = item.rpartition(":")
        wanted = frozenset(scopes.split(","))
        if not token or not wanted <= SCOPES:
            raise ConfigError(
                "GOVFLOW_API_TOKENS takes 'token:scope[,scope]' items with scopes "
                f"{', '.join(sorted(SCOPES))}"
            )
        tokens[token] = wanted
    return tokens


def _unknown(name: str, fields: tuple[str, ...]) -> str:
    """Say that ``name`` is no setting, and which one it may have meant."""
    field = name.removeprefix(_ENV_PREFIX).lower()
    near = difflib.get_close_matches(field, fields, n=1)
    hint = f"; did you mean {_ENV_PREFIX}{near[0].upper()}?" if near else ""
    return f"unknown setting {name}{hint}"


def _env_name(message: str) -> str:
    """Turn msgspec's ``at `$.max_attempts``` into the variable a person sets."""
    head, sep, path = message.partition(" - at `$.")
    if not sep:
        head, sep, path = message.rpartition(" `")
        field = path.strip("`")
        return f"{head} `{_ENV_PREFIX}{field.upper()}`" if sep else message
    return f"{_ENV_PREFIX}{path.rstrip('`').upper()}: {head}"
