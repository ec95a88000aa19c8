"""Pytest fixtures for real Redis servers (registered from tests/conftest.py).

Servers are session-scoped and started only when a test asks for them;
``redis_target`` parametrises a test over standalone, cluster, ACL, TLS and
a cluster with both TLS and ACL.
Destructive tests (kill, restart, pause) use the function-scoped
``redis_private`` server instead, so shared servers stay healthy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kvtier.testing.redis_servers import (
    ADMIN_USER,
    KVTIER_USER,
    RedisClusterServers,
    RedisServer,
    ensure_redis_server,
    make_tls_files,
    redis_acl,
    redis_cluster,
    redis_standalone,
    redis_tls,
)

REDIS_KINDS = ("standalone", "cluster", "acl", "tls", "cluster_tls_acl")


@dataclass
class RedisTarget:
    """One server set as tests see it: the tier URL plus an admin client for poking behind it."""

    kind: str
    url: str
    server: RedisServer | RedisClusterServers
    admin: Any  # redis.Redis or redis.cluster.RedisCluster with full rights

    def backend(self, **kw: Any):
        from kvtier.backends.redis import RedisBackend

        return RedisBackend(self.url, **kw)


@pytest.fixture(scope="session")
def redis_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ensure_redis_server()  # fails with install instructions when missing
    return tmp_path_factory.mktemp("redis")


def _target(kind: str, server: RedisServer | RedisClusterServers) -> Iterator[RedisTarget]:
    admin = server.client()
    try:
        yield RedisTarget(kind, server.url(), server, admin)
    finally:
        with contextlib.suppress(Exception):
            admin.close()


@pytest.fixture(scope="session")
def redis_standalone_target(redis_base: Path) -> Iterator[RedisTarget]:
    with redis_standalone(redis_base) as srv:
        yield from _target("standalone", srv)


@pytest.fixture(scope="session")
def redis_cluster_target(redis_base: Path) -> Iterator[RedisTarget]:
    with redis_cluster(redis_base) as cl:
        yield from _target("cluster", cl)


@pytest.fixture(scope="session")
def redis_acl_target(redis_base: Path) -> Iterator[RedisTarget]:
    with redis_acl(redis_base) as srv:
        yield from _target("acl", srv)


@pytest.fixture(scope="session")
def redis_tls_target(redis_base: Path) -> Iterator[RedisTarget]:
    with redis_tls(redis_base) as srv:
        yield from _target("tls", srv)


@pytest.fixture(scope="session")
def redis_cluster_tls_acl_target(redis_base: Path) -> Iterator[RedisTarget]:
    """The production shape: a cluster over mutual TLS with a least-privilege ACL user."""
    tls = make_tls_files(redis_base / "cluster-certs")
    with redis_cluster(redis_base, tls=tls, acl_users=[KVTIER_USER], admin=ADMIN_USER) as cl:
        yield from _target("cluster_tls_acl", cl)


@pytest.fixture(params=REDIS_KINDS)
def redis_target(request: pytest.FixtureRequest) -> RedisTarget:
    """Each test using this runs once per server kind (servers shared across the session)."""
    return request.getfixturevalue(f"redis_{request.param}_target")


@pytest.fixture
def redis_private(redis_base: Path) -> Iterator[RedisServer]:
    """A standalone server of this test's own, free to kill, pause or restart."""
    with redis_standalone(redis_base) as srv:
        yield srv
