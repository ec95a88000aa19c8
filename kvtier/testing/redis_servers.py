"""Real ``redis-server`` processes for tests and benchmarks (no system service assumed).

Every server runs in its own temporary directory on free localhost ports with
persistence off, so a restart comes back empty -- exactly what a tier must
survive. Helpers cover a standalone server, a 3-master cluster, an ACL server
(default user off, a least-privilege ``kvtier`` user) and a mutual-TLS server
with a CA, server and client certificates generated on the fly.

It lives in the package (not only under ``tests/``) so that
``python -m kvtier.benches.redis`` can start its own servers; the test suite
imports it through ``tests/helpers/redis_servers.py``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

INSTALL_HINT = (
    "redis-server was not found on PATH; install it with `apt-get install -y redis-server` "
    "(Debian/Ubuntu) or set KVTIER_REDIS_SERVER=/path/to/redis-server"
)

# The least-privilege ACL that kvtier documents (kvtier.backends.redis.ACL_RULES), so the
# tests prove it is enough.
KVTIER_ACL_RULES = (
    "~kvt1:* resetchannels -@all +@read +@write +@keyspace +@connection -@dangerous "
    "+info +cluster|slots +cluster|shards"
)


def ensure_redis_server() -> str:
    """Path of ``redis-server``; raises RuntimeError with install instructions if absent."""
    path = os.environ.get("KVTIER_REDIS_SERVER") or shutil.which("redis-server")
    if not path or not os.access(path, os.X_OK):
        raise RuntimeError(INSTALL_HINT)
    return path


def _redis_cli() -> str:
    server = Path(ensure_redis_server())
    cli = shutil.which("redis-cli") or str(server.with_name("redis-cli"))
    if not os.access(cli, os.X_OK):
        raise RuntimeError("redis-cli was not found next to redis-server; " + INSTALL_HINT)
    return cli


def free_port(cluster_bus: bool = False) -> int:
    """A currently free TCP port (and port+10000 too when a cluster bus needs it)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not cluster_bus:
            return port
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair found")


def _die_with_parent() -> None:
    """Linux: SIGKILL the server if the process that started it dies (no leaked servers)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# -- TLS material -------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path  # a CA that signed nothing here: trusting it must fail


def make_tls_files(directory: Path) -> TlsFiles:
    """A throwaway CA plus server (SAN localhost/127.0.0.1) and client certificates."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        path.chmod(0o600)
        return path

    def write_cert(cert: x509.Certificate, path: Path) -> Path:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    def make_ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return key, cert

    def leaf(
        ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, cn: str, server: bool
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                    if server
                    else [ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
        return key, builder.sign(ca_key, hashes.SHA256())

    ca_key, ca = make_ca("kvtier test CA")
    s_key, s_cert = leaf(ca_key, ca, "localhost", server=True)
    c_key, c_cert = leaf(ca_key, ca, "kvtier-client", server=False)
    _, other = make_ca("unrelated CA")
    return TlsFiles(
        ca_cert=write_cert(ca, directory / "ca.pem"),
        server_cert=write_cert(s_cert, directory / "server.pem"),
        server_key=write_key(s_key, directory / "server.key"),
        client_cert=write_cert(c_cert, directory / "client.pem"),
        client_key=write_key(c_key, directory / "client.key"),
        other_ca_cert=write_cert(other, directory / "other-ca.pem"),
    )


# -- servers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AclUser:
    username: str
    password: str
    rules: str = KVTIER_ACL_RULES


@dataclass
class RedisServer:
    """One ``redis-server`` process; restartable on the same port (and empty afterwards)."""

    port: int
    workdir: Path
    tls: TlsFiles | None = None
    acl_users: Sequence[AclUser] = ()
    admin: AclUser | None = None  # full-rights user for test set-up when the default is off
    cluster: bool = False
    extra_conf: Sequence[str] = ()
    proc: subprocess.Popen | None = field(default=None, repr=False)
    host: str = "127.0.0.1"

    # -- lifecycle --
    def config_text(self) -> str:
        lines = [
            f"bind {self.host}",
            "protected-mode no",
            f"dir {self.workdir}",
            'save ""',
            "appendonly no",
            "daemonize no",
            f"logfile {self.workdir / 'redis.log'}",
            f"pidfile {self.workdir / 'redis.pid'}",
            "loglevel notice",
        ]
        if self.tls is None:
            lines.append(f"port {self.port}")
        else:
            lines += [
                "port 0",
                f"tls-port {self.port}",
                f"tls-cert-file {self.tls.server_cert}",
                f"tls-key-file {self.tls.server_key}",
                f"tls-ca-cert-file {self.tls.ca_cert}",
                "tls-auth-clients yes",
            ]
            if self.cluster:
                lines += ["tls-cluster yes", "tls-replication yes"]
        if self.cluster:
            lines += [
                "cluster-enabled yes",
                f"cluster-config-file {self.workdir / 'nodes.conf'}",
                "cluster-node-timeout 3000",
            ]
        if self.acl_users or self.admin:
            lines.append("user default off")
            for u in [*self.acl_users, *([self.admin] if self.admin else [])]:
                lines.append(f"user {u.username} on >{u.password} {u.rules}")
        lines += list(self.extra_conf)
        return "\n".join(lines) + "\n"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "redis.conf"
        conf.write_text(self.config_text())
        # nodes.conf from a previous life would resurrect cluster membership; a restart is empty.
        (self.workdir / "nodes.conf").unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [ensure_redis_server(), str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C goes to the test run, which then stops us
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server on port {self.port} exited with {self.proc.returncode}: "
                    + self.log_tail()
                )
            with contextlib.suppress(Exception):
                if self.ping():
                    return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"redis-server on port {self.port} did not answer: {self.log_tail()}"
                )
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """Kill the process (SIGKILL: no shutdown save; it was persistence-free anyway)."""
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGCONT)  # a paused server must be able to die
            os.kill(p.pid, sig)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)

    def restart(self) -> RedisServer:
        """Stop and start again on the same port: the server comes back empty."""
        self.stop()
        return self.start()

    def pause(self) -> None:
        """SIGSTOP: the socket stays open but nothing answers (a hung server)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def log_tail(self, n: int = 15) -> str:
        log = self.workdir / "redis.log"
        if not log.exists():
            return "(no log)"
        return " | ".join(log.read_text(errors="replace").splitlines()[-n:])

    # -- access --
    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _conn_kwargs(self) -> dict:
        kw: dict = {"host": self.host, "port": self.port, "socket_timeout": 5}
        user = self.admin or (self.acl_users[0] if self.acl_users else None)
        if user is not None:
            kw.update(username=user.username, password=user.password)
        if self.tls is not None:
            kw.update(
                ssl=True,
                ssl_ca_certs=str(self.tls.ca_cert),
                ssl_certfile=str(self.tls.client_cert),
                ssl_keyfile=str(self.tls.client_key),
            )
        return kw

    def client(self):  # -> redis.Redis (admin rights; for set-up and assertions)
        import redis

        return redis.Redis(**self._conn_kwargs())

    def ping(self) -> bool:
        with self.client() as c:
            return bool(c.ping())

    def cli_args(self) -> list[str]:
        """redis-cli connection flags for this server."""
        args = ["-h", self.host, "-p", str(self.port)]
        user = self.admin or (self.acl_users[0] if self.acl_users else None)
        if user is not None:
            args += ["--user", user.username, "--pass", user.password, "--no-auth-warning"]
        if self.tls is not None:
            args += [
                "--tls",
                "--cacert",
                str(self.tls.ca_cert),
                "--cert",
                str(self.tls.client_cert),
                "--key",
                str(self.tls.client_key),
            ]
        return args

    def url(
        self,
        user: AclUser | None = None,
        *,
        ca: bool = True,
        client_cert: bool = True,
        scheme: str | None = None,
    ) -> str:
        """A kvtier tier URL for this server (``user`` defaults to the first ACL user)."""
        return _url([self], user, ca=ca, client_cert=client_cert, scheme=scheme)


def _url(
    servers: Sequence[RedisServer],
    user: AclUser | None,
    *,
    ca: bool,
    client_cert: bool,
    scheme: str | None,
) -> str:
    first = servers[0]
    user = user or (first.acl_users[0] if first.acl_users else None)
    if scheme is None:
        scheme = ("rediss" if first.tls else "redis") + ("+cluster" if first.cluster else "")
    auth = f"{quote(user.username, safe='')}:{quote(user.password, safe='')}@" if user else ""
    hosts = ",".join(s.address for s in servers)
    query = []
    if first.tls is not None:
        if ca:
            query.append(f"ssl_ca_certs={first.tls.ca_cert}")
        if client_cert:
            query.append(f"ssl_certfile={first.tls.client_cert}")
            query.append(f"ssl_keyfile={first.tls.client_key}")
    return f"{scheme}://{auth}{hosts}" + ("?" + "&".join(query) if query else "")


@dataclass
class RedisClusterServers:
    """A set of cluster-enabled servers joined with ``redis-cli --cluster create``."""

    nodes: list[RedisServer]

    def url(self, user: AclUser | None = None, *, ca: bool = True, client_cert: bool = True) -> str:
        return _url(self.nodes, user, ca=ca, client_cert=client_cert, scheme=None)

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()

    def restart(self, timeout_s: float = 30.0) -> RedisClusterServers:
        """Every node stopped and started again on its address, and the cluster
        formed anew: it comes back empty (new node ids, same slots layout)."""
        self.stop()
        for n in self.nodes:
            n.start()
        _form_cluster(self.nodes, timeout_s)
        return self

    def wait_replicated(self, timeout_s: float = 30.0) -> None:
        """Until every replica has acknowledged everything its primary holds."""
        deadline = time.monotonic() + timeout_s
        while True:
            behind = []
            for n in self.nodes:
                if n.proc is None:
                    continue
                with n.client() as c:
                    info = c.info("replication")
                if info.get("role") != "master":
                    continue
                offset = info.get("master_repl_offset", 0)
                behind += [k for k, v in info.items() if k.startswith("slave")
                           and isinstance(v, dict) and int(v.get("offset", 0)) < offset]
            if not behind:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"replicas still behind: {behind}")
            time.sleep(0.1)

    def kill_a_primary_and_wait_for_failover(self, timeout_s: float = 60.0) -> RedisServer:
        """SIGKILL the primary of slot 0 and wait until its replica took over (the
        cluster's own failover, cluster-node-timeout 3 s) and the cluster is ok again.
        Writes not yet replicated are lost (misses), as in production. Returns the dead one."""
        with self.nodes[0].client() as c:
            slots = c.execute_command("CLUSTER", "SLOTS")
        host, port = slots[0][2][0], slots[0][2][1]
        host = host.decode() if isinstance(host, bytes) else host
        primary = next(n for n in self.nodes if (n.host, n.port) == (host, int(port)))
        primary.stop()
        alive = [n for n in self.nodes if n is not primary]
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(Exception), alive[0].client() as c:
                info = c.execute_command("CLUSTER", "INFO")
                text = info.decode() if isinstance(info, bytes) else str(info)
                owner = c.execute_command("CLUSTER", "SLOTS")[0][2]
                if "cluster_state:ok" in text and int(owner[1]) != primary.port:
                    return primary
            if time.monotonic() > deadline:
                raise RuntimeError("no replica took over the killed primary")
            time.sleep(0.2)

    def node_clients(self) -> list:
        return [n.client() for n in self.nodes]

    def client(self):  # -> redis.cluster.RedisCluster (admin rights)
        from redis.cluster import ClusterNode
        from redis.cluster import RedisCluster as _RedisCluster

        kw = self.nodes[0]._conn_kwargs()
        kw.pop("host"), kw.pop("port")
        return _RedisCluster(startup_nodes=[ClusterNode(n.host, n.port) for n in self.nodes], **kw)


def _tmpdir(base: Path | None, tag: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"kvtier-redis-{tag}-", dir=base))


def start_standalone(
    base: Path | None = None,
    *,
    tls: TlsFiles | None = None,
    acl_users: Sequence[AclUser] = (),
    admin: AclUser | None = None,
    extra_conf: Sequence[str] = (),
) -> RedisServer:
    tag = "tls" if tls else ("acl" if acl_users else "std")
    srv = RedisServer(
        port=free_port(),
        workdir=_tmpdir(base, tag),
        tls=tls,
        acl_users=acl_users,
        admin=admin,
        extra_conf=extra_conf,
    )
    return srv.start()


def start_cluster(
    base: Path | None = None,
    masters: int = 3,
    *,
    tls: TlsFiles | None = None,
    acl_users: Sequence[AclUser] = (),
    admin: AclUser | None = None,
    timeout_s: float = 30.0,
    replicas: int = 0,
) -> RedisClusterServers:
    """``masters`` primaries with ``replicas`` replicas each, every slot assigned; waits for
    ``cluster_state:ok``."""
    nodes: list[RedisServer] = []
    try:
        for _ in range(masters * (1 + replicas)):
            srv = RedisServer(
                port=free_port(cluster_bus=True),
                workdir=_tmpdir(base, "cluster"),
                tls=tls,
                acl_users=acl_users,
                admin=admin,
                cluster=True,
            )
            nodes.append(srv.start())
        _form_cluster(nodes, timeout_s, replicas)
        return RedisClusterServers(nodes)
    except BaseException:
        for n in nodes:
            n.stop()
        raise


def _form_cluster(nodes: Sequence[RedisServer], timeout_s: float, replicas: int = 0) -> None:
    """``redis-cli --cluster create`` over fresh nodes; waits for ``cluster_state:ok``."""
    cmd = [
        _redis_cli(),
        *nodes[0].cli_args()[4:],  # auth/TLS flags only; addresses follow
        "--cluster",
        "create",
        *(n.address for n in nodes),
        "--cluster-replicas",
        str(replicas),
        "--cluster-yes",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if res.returncode != 0:
        raise RuntimeError(f"redis-cli --cluster create failed: {res.stdout} {res.stderr}")
    deadline = time.monotonic() + timeout_s
    while True:
        states = []
        for n in nodes:
            with n.client() as c:
                info = c.execute_command("CLUSTER", "INFO")
                text = info.decode() if isinstance(info, bytes) else str(info)
                states.append("cluster_state:ok" in text)
        if all(states):
            return
        if time.monotonic() > deadline:
            raise RuntimeError("cluster did not reach cluster_state:ok")
        time.sleep(0.1)


@contextlib.contextmanager
def redis_standalone(base: Path | None = None, **kw) -> Iterator[RedisServer]:
    srv = start_standalone(base, **kw)
    try:
        yield srv
    finally:
        srv.stop()
        shutil.rmtree(srv.workdir, ignore_errors=True)


@contextlib.contextmanager
def redis_cluster(
    base: Path | None = None, masters: int = 3, **kw
) -> Iterator[RedisClusterServers]:
    """A started cluster (``replicas=N`` per primary), stopped and removed afterwards."""
    cl = start_cluster(base, masters, **kw)
    try:
        yield cl
    finally:
        cl.stop()
        for n in cl.nodes:
            shutil.rmtree(n.workdir, ignore_errors=True)


KVTIER_USER = AclUser("kvtier", "s3cret-pw:@/x")  # URL-special characters on purpose
ADMIN_USER = AclUser("admin", "admin-pw", "~* &* +@all")


@contextlib.contextmanager
def redis_acl(base: Path | None = None) -> Iterator[RedisServer]:
    """Default user off; ``kvtier`` (least privilege) and ``admin`` users with passwords."""
    with redis_standalone(base, acl_users=[KVTIER_USER], admin=ADMIN_USER) as srv:
        yield srv


@contextlib.contextmanager
def redis_tls(base: Path | None = None) -> Iterator[RedisServer]:
    """TLS only (``port 0``), client certificates required (mutual TLS)."""
    d = _tmpdir(base, "certs")
    try:
        with redis_standalone(base, tls=make_tls_files(d)) as srv:
            yield srv
    finally:
        shutil.rmtree(d, ignore_errors=True)
