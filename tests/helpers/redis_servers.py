"""Test-side entry point for real ``redis-server`` processes.

The implementation lives in :mod:`kvtier.testing.redis_servers` so that the
benchmark (``python -m kvtier.benches.redis``) can start servers too.
"""

from kvtier.testing.redis_servers import (  # noqa: F401 - re-exported for tests
    ADMIN_USER,
    INSTALL_HINT,
    KVTIER_ACL_RULES,
    KVTIER_USER,
    AclUser,
    RedisClusterServers,
    RedisServer,
    TlsFiles,
    ensure_redis_server,
    free_port,
    make_tls_files,
    redis_acl,
    redis_cluster,
    redis_standalone,
    redis_tls,
    start_cluster,
    start_standalone,
)
