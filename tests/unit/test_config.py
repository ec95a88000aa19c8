"""Typed configuration: sizes, defaults, and one readable ConfigError per bad config."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kvtier.config import (
    TIER_SCHEMES,
    ConfigError,
    ConnectorConfig,
    ServerConfig,
    check_tier_url,
    load_config,
    parse_bytes,
)

GiB = 1 << 30


# -- parse_bytes -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "n"),
    [
        ("1", 1),
        ("4096", 4096),
        ("10b", 10),
        ("10B", 10),
        ("1k", 1 << 10),
        ("1KiB", 1 << 10),
        ("1kb", 1000),
        ("2KB", 2000),
        ("512MiB", 512 << 20),
        ("512m", 512 << 20),
        ("3MB", 3 * 10**6),
        ("4GiB", 4 * GiB),
        ("4g", 4 * GiB),
        ("2GB", 2 * 10**9),
        ("1TiB", 1 << 40),
        ("1t", 1 << 40),
        ("1.5GiB", 3 * GiB // 2),
        ("0.5KiB", 512),
        ("  8 MiB  ", 8 << 20),
    ],
)
def test_parse_bytes_units(text: str, n: int) -> None:
    assert parse_bytes(text) == n


def test_parse_bytes_ints_pass_through() -> None:
    assert parse_bytes(123) == 123
    assert parse_bytes(4 * GiB) == 4 * GiB


@pytest.mark.parametrize("text", ["", "lots", "4 GiBs", "GiB", "-1GiB", "1e9", "4 G B",
                                  "1.2.3MiB", "0x10"])
def test_parse_bytes_rejects_garbage_with_example(text: str) -> None:
    with pytest.raises(ValueError, match="cannot parse size") as ei:
        parse_bytes(text)
    assert "GiB" in str(ei.value)  # says what would work


@pytest.mark.parametrize("value", [0, -5, "0", "0GiB", "0.1b"])
def test_parse_bytes_rejects_non_positive(value: int | str) -> None:
    with pytest.raises(ValueError, match="size must be positive"):
        parse_bytes(value)


# -- tier urls ---------------------------------------------------------------------------------
@pytest.mark.parametrize("url", ["memory://", "memory://x?capacity=1GiB", "grpc://127.0.0.1:7070",
                                 "redis://localhost:6379/0", "rediss://u:p@h:6380",
                                 "redis+cluster://a:1,b:2", "rediss+cluster://a:1"])
def test_check_tier_url_accepts_supported_schemes(url: str) -> None:
    assert check_tier_url(url) == url


@pytest.mark.parametrize("url", ["http://x:1", "127.0.0.1:7070", "", "grpc:/x", "GRPC://x:1",
                                 "unix:///tmp/sock"])
def test_check_tier_url_lists_supported_schemes(url: str) -> None:
    with pytest.raises(ValueError, match="no supported scheme") as ei:
        check_tier_url(url)
    msg = str(ei.value)
    for scheme in TIER_SCHEMES:
        assert f"{scheme}://" in msg
    assert "grpc://127.0.0.1:7070" in msg  # an example


# -- defaults ----------------------------------------------------------------------------------
def test_server_config_defaults() -> None:
    c = ServerConfig()
    assert (c.host, c.port, c.capacity, c.backend) == ("127.0.0.1", 7070, 4 * GiB, "memory")
    assert (c.redis_url, c.eviction, c.metrics_port, c.max_workers) == (None, "value", None, 8)


def test_connector_config_defaults() -> None:
    c = ConnectorConfig()
    assert c.tier_url == "grpc://127.0.0.1:7070"
    assert (c.tenant, c.timeout_s, c.retry_after_s) == ("", 2.0, 5.0)
    assert (c.save, c.load, c.save_queue_blocks, c.checkpoint_every) == (True, True, 4096, None)
    assert (c.admission, c.admission_params, c.admission_policy().name) == ("default", {},
                                                                             "default")
    assert (c.metrics_port, c.model_id) == (None, None)


def test_load_config_none_and_empty_give_defaults() -> None:
    assert load_config(ServerConfig, None) == ServerConfig()
    assert load_config(ConnectorConfig, {}) == ConnectorConfig()


def test_load_config_parses_capacity_strings() -> None:
    c = load_config(ServerConfig, {"capacity": "512MiB", "eviction": "fifo", "port": 0})
    assert (c.capacity, c.eviction, c.port) == (512 << 20, "fifo", 0)
    assert load_config(ServerConfig, {"capacity": 1234}).capacity == 1234


def test_configs_are_frozen() -> None:
    c = ServerConfig()
    with pytest.raises(ValidationError, match="frozen"):
        c.port = 1  # type: ignore[misc]
    assert c.port == 7070


# -- errors --------------------------------------------------------------------------------------
def _error(cls: type, data: dict) -> str:
    with pytest.raises(ConfigError) as ei:
        load_config(cls, data)
    assert isinstance(ei.value, ValueError)
    return str(ei.value)


def test_bad_eviction_names_field_and_options() -> None:
    msg = _error(ServerConfig, {"eviction": "random"})
    assert msg.startswith("invalid ServerConfig: eviction:")
    assert "'lru'" in msg and "'fifo'" in msg
    assert "'random'" in msg  # what was given
    assert "Known options:" in msg


def test_bad_backend_names_options() -> None:
    msg = _error(ServerConfig, {"backend": "postgres"})
    assert "backend:" in msg and "'memory'" in msg and "'redis'" in msg and "'postgres'" in msg


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"port": 70000}, "port"),
        ({"port": -1}, "port"),
        ({"port": "http"}, "port"),
        ({"max_workers": 0}, "max_workers"),
        ({"metrics_port": 99999}, "metrics_port"),
        ({"capacity": "lots"}, "capacity"),
        ({"capacity": 0}, "capacity"),
    ],
)
def test_server_bad_values_name_the_field(data: dict, field: str) -> None:
    msg = _error(ServerConfig, data)
    assert f"{field}:" in msg
    assert repr(data[field]) in msg


def test_capacity_error_keeps_the_fix_it_hint() -> None:
    msg = _error(ServerConfig, {"capacity": "4 gigs"})
    assert "capacity:" in msg and "4GiB" in msg


def test_several_errors_reported_together() -> None:
    msg = _error(ServerConfig, {"port": -1, "eviction": "mru", "max_workers": 0})
    assert msg.count(";") >= 2
    for field in ("port:", "eviction:", "max_workers:"):
        assert field in msg


def test_unknown_option_rejected_and_known_options_listed() -> None:
    msg = _error(ServerConfig, {"capactiy": "1GiB"})
    assert "capactiy:" in msg
    known = msg.split("Known options:")[1]
    for f in ("capacity", "host", "port", "eviction", "backend", "redis_url", "max_workers"):
        assert f in known
    msg = _error(ConnectorConfig, {"tier": "grpc://x:1"})
    assert "tier:" in msg and "tier_url" in msg.split("Known options:")[1]


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"timeout_s": 0}, "timeout_s"),
        ({"timeout_s": 601}, "timeout_s"),
        ({"retry_after_s": -1}, "retry_after_s"),
        ({"save_queue_blocks": 0}, "save_queue_blocks"),
        ({"checkpoint_every": -1}, "checkpoint_every"),
        ({"checkpoint_every": 2000}, "checkpoint_every"),
        ({"save": "perhaps"}, "save"),
    ],
)
def test_connector_bad_values_name_the_field(data: dict, field: str) -> None:
    msg = _error(ConnectorConfig, data)
    assert msg.startswith("invalid ConnectorConfig:")
    assert f"{field}:" in msg


def test_checkpoint_every_selects_dense_with_that_period() -> None:
    for n in (0, 1, 3):
        p = load_config(ConnectorConfig, {"checkpoint_every": n}).admission_policy()
        assert (p.name, p.every) == ("dense", n)
    p = load_config(ConnectorConfig, {"admission": "dense",
                                      "admission_params": {"every": 4}}).admission_policy()
    assert (p.name, p.every) == ("dense", 4)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"admission": "lru"}, ["unknown admission policy 'lru'", "marconi", "prompt_end"]),
        ({"admission": "dense", "admission_params": {"evry": 2}}, ["evry"]),
        ({"admission": "dense", "admission_params": {"every": -1}}, ["every must be >= 0"]),
        ({"admission": "marconi", "checkpoint_every": 2}, ["checkpoint_every", "marconi"]),
    ],
)
def test_bad_admission_is_a_clear_config_error(data: dict, words: list[str]) -> None:
    msg = _error(ConnectorConfig, data)
    assert msg.startswith("invalid ConnectorConfig:")
    for w in words:
        assert w in msg


def test_connector_tier_url_scheme_check_lists_schemes() -> None:
    msg = _error(ConnectorConfig, {"tier_url": "http://127.0.0.1:7070"})
    assert "tier_url:" in msg
    for scheme in TIER_SCHEMES:
        assert f"{scheme}://" in msg
    ok = load_config(ConnectorConfig, {"tier_url": "redis+cluster://a:1,b:2"})
    assert ok.tier_url == "redis+cluster://a:1,b:2"


def test_redis_backend_without_url_has_fix_it_message() -> None:
    msg = _error(ServerConfig, {"backend": "redis"})
    assert "--backend redis needs --redis-url" in msg
    assert "redis://" in msg  # an example
    c = load_config(ServerConfig, {"backend": "redis", "redis_url": "redis://127.0.0.1:6379/0"})
    assert (c.backend, c.redis_url) == ("redis", "redis://127.0.0.1:6379/0")
    msg = _error(ServerConfig, {"backend": "redis", "redis_url": ""})
    assert "--redis-url" in msg


def test_redis_backend_without_url_fails_on_direct_construction_too() -> None:
    with pytest.raises(ValueError, match="--redis-url"):
        ServerConfig(backend="redis")
