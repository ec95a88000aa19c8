"""TLS, bearer tokens, tenant isolation and quotas on a real ``kvtier serve`` process.

Every refusal the issue names is tried with a real client (GrpcBackend, which
reads over the bulk port and falls back to gRPC) or a raw socket: no token, a
wrong, expired or rotated-out token, another tenant's key named directly,
plaintext to the TLS ports, a non-admin flush, a tenant past its quota. The
right token works end to end, and refusals are counted in the metrics.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtier import payload
from kvtier.backends import BackendError
from kvtier.backends.base import PutItem
from kvtier.backends.grpc import GrpcBackend
from kvtier.keys import BlockKey, Namespace, manifest_key
from kvtier.lookup import GroupKind, GroupQuery, LookupQuery
from kvtier.manifest import NamespaceManifest
from kvtier.testing.redis_servers import TlsFiles, make_tls_files
from kvtier.testing.waits import scrape_metrics, wait_until
from kvtier.transport import tcp_bulk
from tests.helpers.servers import TierProcess, free_port, server_log

MODEL, LAYOUT_FP = "tiny-model", "layout-fingerprint"
LAYOUT = payload.layout_digest("security test")
HASHES = [hashlib.sha256(b"s%d" % i).digest() for i in range(6)]
TOKENS = {"acme": "acme-secret-1", "beta": "beta-secret", "acme_admin": "acme-admin-secret",
          "expired": "expired-secret", "ops": "ops-secret", "acme_new": "acme-secret-2"}


def token_file(path: Path, acme_token: str = TOKENS["acme"]) -> Path:
    path.write_text(json.dumps({
        "tenants": {"acme": {}, "beta": {"quota": "64KiB"}},
        "tokens": [
            {"name": "acme-engines", "sha256": hashlib.sha256(acme_token.encode()).hexdigest(),
             "tenants": ["acme"], "roles": ["read", "write"]},
            {"name": "beta-engines", "token": TOKENS["beta"], "tenants": ["beta"],
             "roles": ["read", "write"]},
            {"name": "acme-admin", "token": TOKENS["acme_admin"], "tenants": ["acme"],
             "roles": ["read", "write", "admin"]},
            {"name": "old", "token": TOKENS["expired"], "tenants": ["acme"], "roles": ["read"],
             "expires": time.time() - 60},
            {"name": "ops", "token": TOKENS["ops"], "tenants": ["*"],
             "roles": ["read", "write", "admin"]}]}))
    return path


def tenant_items(tenant: str, size: int = 4096) -> tuple[bytes, list[PutItem]]:
    """A tenant's manifest (salted with its name, as its connector writes it) and blocks."""
    ns = Namespace(MODEL, LAYOUT_FP, tenant).id
    man = NamespaceManifest(namespace=ns.hex(), model=MODEL, layout=LAYOUT_FP)
    items = [PutItem(manifest_key(ns), man.to_bytes())]
    parent = None
    for h in HASHES:
        k = BlockKey(ns, 0, 0, h)
        items.append(PutItem(k.encode(), payload.encode(k, LAYOUT, os.urandom(size)), parent))
        parent = k.encode()
    return ns, items


def _query(ns: bytes) -> LookupQuery:
    return LookupQuery(ns, 0, HASHES, 1, [GroupQuery(0, GroupKind.ATTENTION, 1)])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def secure_tier(pki: TlsFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TierProcess]:
    d = tmp_path_factory.mktemp("auth")
    tokens = token_file(d / "tokens.json")
    metrics = free_port()
    tier = TierProcess(capacity="64MiB", tls_ca=str(pki.ca_cert), extra_args=(
        "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
        "--auth-token-file", str(tokens), "--metrics-port", str(metrics)))
    tier.tokens, tier.metrics_port = tokens, metrics  # type: ignore[attr-defined]
    tier.start()
    try:
        yield tier
    finally:
        tier.stop()
        tier.kill()


def client(tier: TierProcess, token: str | None, **kw: object) -> GrpcBackend:
    return GrpcBackend(tier.url, timeout_s=5, tls_ca=tier.tls_ca, token=token,
                       token_env=None, **kw)


@pytest.fixture(scope="module")
def stored(secure_tier: TierProcess) -> dict[str, tuple[bytes, list[PutItem]]]:
    out = {}
    for tenant in ("acme", "beta"):
        ns, items = tenant_items(tenant)
        with client(secure_tier, TOKENS[tenant]) as b:
            assert b.put_many(items) == len(items), server_log(secure_tier)
        out[tenant] = (ns, items)
    return out


def _refused(fn, code: str) -> str:  # noqa: ANN001
    with pytest.raises(BackendError) as e:
        fn()
    assert code in str(e.value), str(e.value)
    return str(e.value)


@pytest.mark.parametrize("bulk", [True, False])
def test_right_token_works_end_to_end(secure_tier: TierProcess, stored: dict,
                                      bulk: bool) -> None:
    ns, items = stored["acme"]
    with client(secure_tier, TOKENS["acme"], bulk=bulk) as b:
        assert b.lookup(_query(ns)).boundary == len(HASHES)
        got = b.get_many([it.key for it in items])
        assert [bytes(v) for v in got] == [it.value for it in items]
        assert b.bulk_fallbacks == 0  # bulk reads really went over TLS + hello
        assert {e.key for e in b.scan()} == {it.key for it in items}  # only its own


@pytest.mark.parametrize("token", [None, "wrong-token", TOKENS["expired"]])
def test_missing_wrong_or_expired_token_is_refused(secure_tier: TierProcess, stored: dict,
                                                   token: str | None) -> None:
    ns, items = stored["acme"]
    with client(secure_tier, token) as b:
        msg = _refused(lambda: b.get_many([items[1].key]), "")  # bulk port refusal
        assert "token" in msg, msg
        _refused(lambda: b.lookup(_query(ns)), "UNAUTHENTICATED")
        _refused(lambda: b.put_many(items[:1]), "UNAUTHENTICATED")
        assert b.health()["ok"]  # liveness stays open
    with client(secure_tier, token, bulk=False) as b:
        _refused(lambda: b.get_many([items[1].key]), "UNAUTHENTICATED")


def test_other_tenants_keys_are_refused_even_named_directly(secure_tier: TierProcess,
                                                            stored: dict) -> None:
    ns_a, items_a = stored["acme"]
    keys = [it.key for it in items_a]
    with client(secure_tier, TOKENS["beta"]) as b:
        assert "PERMISSION_DENIED" not in str(b.stats())  # its own role works
        assert "not one of token" in _refused(lambda: b.get_many(keys[1:2]), "")  # bulk
        _refused(lambda: b.lookup(_query(ns_a)), "PERMISSION_DENIED")
        _refused(lambda: b.contains_many(keys), "PERMISSION_DENIED")
        _refused(lambda: b.delete_many(keys), "PERMISSION_DENIED")
        _refused(lambda: b.put_many(items_a[1:2]), "PERMISSION_DENIED")  # overwrite
        # Claiming acme's namespace with acme's own manifest: not derived from beta's tenant.
        _refused(lambda: b.put_many(items_a[:1]), "PERMISSION_DENIED")
        assert not {e.key for e in b.scan()} & set(keys)
    with client(secure_tier, TOKENS["beta"], bulk=False) as b:
        _refused(lambda: b.get_many(keys[1:2]), "PERMISSION_DENIED")
    with client(secure_tier, TOKENS["acme"]) as b:  # untouched
        assert all(b.contains_many(keys))


def test_flush_needs_admin_and_stays_within_the_tenant(secure_tier: TierProcess,
                                                      stored: dict) -> None:
    ns_a, items_a = tenant_items("acme")  # fresh blocks, same namespace as `stored`
    with client(secure_tier, TOKENS["acme"]) as b:
        b.put_many(items_a)
        _refused(lambda: b.flush(), "PERMISSION_DENIED")
        _refused(lambda: b.pin([items_a[1].key]), "PERMISSION_DENIED")
    with client(secure_tier, TOKENS["ops"]) as ops:
        before = {e.key for e in ops.scan()}
    with client(secure_tier, TOKENS["acme_admin"]) as admin:
        assert admin.pin([items_a[1].key]) == 1
        admin.pin([items_a[1].key], False)
        assert admin.flush() > 0
    with client(secure_tier, TOKENS["ops"]) as ops:
        after = {e.key for e in ops.scan()}
    gone = before - after
    assert gone and all(k.startswith(b"kvt1:" + ns_a.hex().encode()) for k in gone)
    assert any(b"kvt1:" + Namespace(MODEL, LAYOUT_FP, "beta").id.hex().encode() in k
               for k in after)  # beta's blocks survived acme's flush
    with client(secure_tier, TOKENS["acme"]) as b:  # put back for the next tests
        assert b.put_many(stored["acme"][1]) == len(stored["acme"][1])


def test_quota_evicts_only_the_tenants_own_blocks(secure_tier: TierProcess,
                                                  stored: dict) -> None:
    ns_a, items_a = stored["acme"]
    ns_b = Namespace(MODEL, LAYOUT_FP, "beta").id
    with client(secure_tier, TOKENS["beta"]) as b:
        for i in range(30):  # 30 x 4 KiB blocks past a 64 KiB quota
            k = BlockKey(ns_b, 0, 1, hashlib.sha256(b"q%d" % i).digest())
            assert b.put_many([PutItem(k.encode(), payload.encode(k, LAYOUT,
                                                                  os.urandom(4096)))]) == 1
        held = sum(e.size for e in b.scan())
        assert held <= 64 << 10, held
        big = BlockKey(ns_b, 0, 1, b"\x01" * 32)
        _refused(lambda: b.put_many([PutItem(big.encode(), payload.encode(
            big, LAYOUT, os.urandom(80 << 10)))]), "RESOURCE_EXHAUSTED")
    with client(secure_tier, TOKENS["acme"]) as b:
        assert all(b.contains_many([it.key for it in items_a]))


def test_plaintext_to_tls_ports_is_refused(secure_tier: TierProcess, stored: dict) -> None:
    with GrpcBackend(f"grpc://127.0.0.1:{secure_tier.port}", timeout_s=2,
                     token=TOKENS["acme"]) as b:
        _refused(b.health, "UNAVAILABLE")
    with client(secure_tier, TOKENS["acme"]) as b:
        bulk_port = b.health()["bulk_port"]
    with socket.create_connection(("127.0.0.1", bulk_port), timeout=5) as s:
        s.sendall(tcp_bulk.encode_request([stored["acme"][1][1].key]))
        try:
            answer = s.recv(4096)
        except ConnectionResetError:
            answer = b""
        assert answer == b""  # dropped: no data ever leaves in the clear
    # And a client that does not trust the tier's CA never talks to it either.
    with pytest.raises(ssl.SSLError), socket.create_connection(("127.0.0.1", bulk_port)) as s:
        ssl.create_default_context().wrap_socket(s, server_hostname="127.0.0.1")


def test_rotated_token_stops_working_without_restart(secure_tier: TierProcess,
                                                     stored: dict) -> None:
    ns, _ = stored["acme"]
    path: Path = secure_tier.tokens  # type: ignore[attr-defined]
    try:
        token_file(path, acme_token=TOKENS["acme_new"])  # file change is picked up
        with client(secure_tier, TOKENS["acme"], bulk=False) as old:
            wait_until(lambda: _fails(lambda: old.lookup(_query(ns))), 10, "old token refused")
        with client(secure_tier, TOKENS["acme_new"]) as new:
            assert new.lookup(_query(ns)).boundary == len(HASHES)
        # SIGHUP reloads too (the file is rewritten with the same mtime granularity risk).
        token_file(path)
        assert secure_tier.proc is not None
        secure_tier.proc.send_signal(signal.SIGHUP)
        with client(secure_tier, TOKENS["acme"]) as b:
            wait_until(lambda: not _fails(lambda: b.lookup(_query(ns))), 10, "token back")
    finally:
        token_file(path)


def _fails(fn) -> bool:  # noqa: ANN001
    try:
        fn()
    except BackendError:
        return True
    return False


def test_refusals_are_counted_in_metrics(secure_tier: TierProcess, stored: dict) -> None:
    with client(secure_tier, "nope", bulk=False) as b:
        _fails(lambda: b.lookup(_query(stored["acme"][0])))
    m = scrape_metrics(secure_tier.metrics_port)  # type: ignore[attr-defined]
    refused = {dict(k[1])["reason"]: v for k, v in m.items() if k[0] == "kvtier_refused_total"}
    assert refused.get("bad_token", 0) >= 1 and refused.get("no_token", 0) >= 1, refused
    for reason in ("expired", "tenant", "role", "quota", "tls"):  # earlier tests' attacks
        assert refused.get(reason, 0) >= 1, (reason, refused)
    assert "acme-secret" not in server_log(secure_tier)  # tokens never logged


def test_mutual_tls_requires_a_client_certificate(pki: TlsFiles, tmp_path: Path) -> None:
    ca, cert, key = str(pki.ca_cert), str(pki.client_cert), str(pki.client_key)
    rogue = make_tls_files(tmp_path)  # a client certificate from another CA
    tier = TierProcess(capacity="16MiB", tls_ca=ca, client_options={
        "tls_cert": cert, "tls_key": key}, extra_args=(
        "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
        "--tls-client-ca", ca)).start()
    try:
        ns, items = tenant_items("anyone")
        with GrpcBackend(tier.url, timeout_s=5, tls_ca=ca, tls_cert=cert, tls_key=key) as b:
            assert b.put_many(items) == len(items)
            assert [bytes(v) for v in b.get_many([items[1].key])] == [items[1].value]
            assert b.bulk_fallbacks == 0
        for c, k in [(None, None), (str(rogue.client_cert), str(rogue.client_key))]:
            with GrpcBackend(tier.url, timeout_s=3, tls_ca=ca, tls_cert=c, tls_key=k) as b:
                _refused(b.health, "UNAVAILABLE")
    finally:
        tier.stop()
        tier.kill()


def test_connector_options_reach_the_tier(secure_tier: TierProcess, stored: dict,
                                          tmp_path: Path) -> None:
    """kv_connector_extra_config's TLS and token-file options, as the connector opens its tier."""
    from kvtier.backends.guard import GuardedBackend
    from kvtier.config import ConnectorConfig

    (tmp_path / "token").write_text(TOKENS["acme"] + "\n")
    cfg = ConnectorConfig(tier_url=secure_tier.url, tls_ca=secure_tier.tls_ca,
                          auth_token_file=str(tmp_path / "token"))
    tier = GuardedBackend(cfg.tier_url, 5, 1, options=cfg.tier_options())
    ns, items = stored["acme"]
    assert tier.lookup(_query(ns)).boundary == len(HASHES)
    assert [bytes(v) for v in tier.get_many([items[2].key])] == [items[2].value]
    assert TOKENS["acme"] not in repr(cfg) + repr(tier._backend.__dict__)  # never printed


def test_admin_cli_takes_tls_and_token_from_the_environment(secure_tier: TierProcess,
                                                            stored: dict) -> None:
    import subprocess

    from tests.helpers.servers import kvtier_cmd

    env = {**os.environ, "KVTIER_TLS_CA": str(secure_tier.tls_ca)}
    env.pop("KVTIER_TOKEN", None)
    cmd = [*kvtier_cmd(), "stats", "--url", secure_tier.url, "--json"]
    denied = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert denied.returncode != 0 and "UNAUTHENTICATED" in denied.stderr, denied.stderr
    ok = subprocess.run(cmd, env={**env, "KVTIER_TOKEN": TOKENS["ops"]}, capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0 and json.loads(ok.stdout)["entries"] > 0, ok.stderr
    assert TOKENS["ops"] not in ok.stdout + ok.stderr
