"""Settings: read from the environment, refused at start-up when wrong."""

from __future__ import annotations

import pytest

from govflow.schemas.errors import ConfigError
from govflow.schemas.settings import Settings, parse_tokens


def test_defaults_are_the_spec_defaults():
    settings = Settings.from_env({})
    assert settings.redis_url is None
    assert settings.database_url is None
    assert settings.data_dir == ".govflow"
    assert settings.prefix == "govflow"
    assert settings.max_attempts == 5
    assert settings.backoff_base == 2.0
    assert settings.claim_idle == 30.0
    assert settings.tokens() == {}


def test_environment_strings_become_typed_values():
    settings = Settings.from_env(
        {
            "GOVFLOW_PREFIX": "acme-prod",
            "GOVFLOW_MAX_ATTEMPTS": "7",
            "GOVFLOW_BACKOFF_BASE": "0.5",
            "GOVFLOW_CLAIM_IDLE": "3",
            "GOVFLOW_DATA_DIR": "/var/lib/govflow",
            "PATH": "/usr/bin",  # not ours: ignored
        }
    )
    assert settings.prefix == "acme-prod"
    assert settings.max_attempts == 7
    assert settings.backoff_base == 0.5
    assert settings.claim_idle == 3.0
    assert settings.data_dir == "/var/lib/govflow"


def test_an_empty_variable_means_the_default():
    assert Settings.from_env({"GOVFLOW_PREFIX": "", "GOVFLOW_REDIS_URL": ""}) == Settings()


def test_redis_url_and_database_url_are_fallbacks():
    settings = Settings.from_env(
        {"REDIS_URL": "redis://cache:6379/1", "DATABASE_URL": "postgresql://db/app"}
    )
    assert settings.redis_url == "redis://cache:6379/1"
    assert settings.database_url == "postgresql://db/app"


def test_govflow_urls_win_over_the_fallbacks():
    settings = Settings.from_env(
        {
            "REDIS_URL": "redis://other:6379/0",
            "GOVFLOW_REDIS_URL": "rediss://user:pw@cache:6380/0",
            "DATABASE_URL": "postgresql://other/app",
            "GOVFLOW_DATABASE_URL": "postgres://db/govflow",
        }
    )
    assert settings.redis_url == "rediss://user:pw@cache:6380/0"
    assert settings.database_url == "postgres://db/govflow"


def test_overrides_beat_the_environment_and_none_is_no_override():
    settings = Settings.from_env({"GOVFLOW_PREFIX": "env"}, prefix="flag", max_attempts=None)
    assert settings.prefix == "flag"
    assert settings.max_attempts == 5


def test_an_unknown_govflow_variable_is_refused_by_name():
    with pytest.raises(ConfigError, match="GOVFLOW_MAX_ATEMPTS"):
        Settings.from_env({"GOVFLOW_MAX_ATEMPTS": "7"})


def test_a_misspelt_setting_is_told_the_nearest_real_name():
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"GOVFLOW_MAX_ATEMPTS": "7"})
    assert str(caught.value) == (
        "unknown setting GOVFLOW_MAX_ATEMPTS; did you mean GOVFLOW_MAX_ATTEMPTS?"
    )
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"GOVFLOW_FLAVOUR": "mint", "GOVFLOW_REDIS_UR": "redis://r/0"})
    assert str(caught.value) == (
        "unknown setting GOVFLOW_FLAVOUR; unknown setting GOVFLOW_REDIS_UR; "
        "did you mean GOVFLOW_REDIS_URL?"
    )


# What the kubelet gives every pod of the namespace for a Service `govflow-api` with one
# named port, and for a Service `govflow` (its names start GOVFLOW_ too) with two.
SERVICE_LINKS = {
    "GOVFLOW_API_SERVICE_HOST": "10.96.4.20",
    "GOVFLOW_API_SERVICE_PORT": "80",
    "GOVFLOW_API_SERVICE_PORT_HTTP": "80",
    "GOVFLOW_API_PORT": "tcp://10.96.4.20:80",
    "GOVFLOW_API_PORT_80_TCP": "tcp://10.96.4.20:80",
    "GOVFLOW_API_PORT_80_TCP_PROTO": "tcp",
    "GOVFLOW_API_PORT_80_TCP_PORT": "80",
    "GOVFLOW_API_PORT_80_TCP_ADDR": "10.96.4.20",
    "GOVFLOW_SERVICE_HOST": "fd00:10:96::7",
    "GOVFLOW_SERVICE_PORT": "9100",
    "GOVFLOW_SERVICE_PORT_METRICS": "9100",
    "GOVFLOW_SERVICE_PORT_OTLP_GRPC": "4317",
    "GOVFLOW_PORT": "tcp://[fd00:10:96::7]:9100",
    "GOVFLOW_PORT_9100_TCP": "tcp://[fd00:10:96::7]:9100",
    "GOVFLOW_PORT_9100_TCP_PROTO": "tcp",
    "GOVFLOW_PORT_9100_TCP_PORT": "9100",
    "GOVFLOW_PORT_9100_TCP_ADDR": "fd00:10:96::7",
    "GOVFLOW_PORT_4317_UDP": "udp://[fd00:10:96::7]:4317",
    "GOVFLOW_PORT_4317_UDP_PROTO": "udp",
    "GOVFLOW_PORT_4317_UDP_PORT": "4317",
    "GOVFLOW_PORT_4317_UDP_ADDR": "fd00:10:96::7",
}


def test_the_names_kubernetes_gives_a_pod_for_services_are_ignored():
    settings = Settings.from_env({**SERVICE_LINKS, "GOVFLOW_PREFIX": "acme"})
    assert settings == Settings(prefix="acme")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GOVFLOW_API_PORT", "8000"),  # Kubernetes writes tcp://ip:port here
        ("GOVFLOW_METRICS_PORT", "9100"),
        ("GOVFLOW_API_SERVICE_HOST", "api.example.org"),  # a cluster IP, never a name
        ("GOVFLOW_API_SERVICE_PORT", "http"),
        ("GOVFLOW_API_PORT_80_HTTP", "tcp://10.96.4.20:80"),
        ("GOVFLOW_API_PORT_80_TCP_PROTO", "http"),
        ("GOVFLOW_API_PORT_80_TCP_HOST", "10.96.4.20"),
        ("GOVFLOW_API_SERVICE_ADDR", "10.96.4.20"),
        ("GOVFLOW_API_HOST", "10.96.4.20"),
        ("GOVFLOW__SERVICE_HOST", "10.96.4.20"),
    ],
)
def test_names_only_like_a_service_link_are_still_refused(name, value):
    with pytest.raises(ConfigError, match=f"unknown setting {name}"):
        Settings.from_env({name: value})


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("GOVFLOW_MAX_ATTEMPTS", "many", "Expected `int`"),
        ("GOVFLOW_MAX_ATTEMPTS", "0", ">= 1"),
        ("GOVFLOW_BACKOFF_BASE", "-1", "> 0"),
        ("GOVFLOW_CLAIM_IDLE", "soon", "Expected `float`"),
        ("GOVFLOW_PREFIX", "has space", "matching regex"),
        ("GOVFLOW_PARTITIONS", "1.5", "Expected `int`"),
    ],
)
def test_a_wrong_type_is_refused_with_the_variable_name(name, value, expected):
    with pytest.raises(ConfigError, match=name) as caught:
        Settings.from_env({name: value})
    assert expected in str(caught.value)


@pytest.mark.parametrize(
    ("env", "scheme"),
    [
        ({"GOVFLOW_REDIS_URL": "http://cache:6379"}, "'http'"),
        ({"REDIS_URL": "memcached://cache"}, "'memcached'"),
        ({"GOVFLOW_DATABASE_URL": "mysql://db/app"}, "'mysql'"),
        ({"DATABASE_URL": "sqlite:///app.db"}, "'sqlite'"),
    ],
)
def test_a_url_of_the_wrong_kind_is_refused(env, scheme):
    with pytest.raises(ConfigError, match=scheme):
        Settings.from_env(env)


@pytest.mark.parametrize(
    "url", ["redis://h:6379/0", "rediss://u:p@h:6380/0", "unix:///run/redis.sock"]
)
def test_every_redis_url_kind_is_accepted(url):
    assert Settings.from_env({"GOVFLOW_REDIS_URL": url}).redis_url == url


def test_api_tokens_map_to_their_scopes():
    settings = Settings.from_env(
        {"GOVFLOW_API_TOKENS": "svc-a:publish  ops:read,operate inbox:read,decide"}
    )
    assert settings.tokens() == {
        "svc-a": frozenset({"publish"}),
        "ops": frozenset({"read", "operate"}),
        "inbox": frozenset({"read", "decide"}),
    }


def test_a_token_may_contain_a_colon():
    assert parse_tokens("a:b:read") == {"a:b": frozenset({"read"})}


@pytest.mark.parametrize("spec", ["lonely", "tok:", "tok:admin", "tok:read,admin", ":read"])
def test_malformed_api_tokens_are_refused(spec):
    with pytest.raises(ConfigError, match="GOVFLOW_API_TOKENS"):
        Settings.from_env({"GOVFLOW_API_TOKENS": spec})
