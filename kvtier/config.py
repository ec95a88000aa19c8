"""Typed configuration: one object per component, every option validated with a fix-it message."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

if TYPE_CHECKING:
    from kvtier.admission import AdmissionPolicy

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6,
          "mib": 1 << 20, "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12,
          "tib": 1 << 40}
TIER_SCHEMES = ("memory", "grpc", "grpcs", "redis", "rediss", "redis+cluster", "rediss+cluster")


class ConfigError(ValueError):
    """Raised with a message that says which option is wrong and how to fix it."""


def parse_bytes(value: int | str) -> int:
    """``"4GiB"`` -> 4294967296; plain ints pass through."""
    if isinstance(value, bool):
        raise ValueError(f"size must be a byte count or e.g. 4GiB, got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"cannot parse size {value!r}; use e.g. 512MiB, 4GiB or a byte count")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return n


def check_tier_url(url: str) -> str:
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme not in TIER_SCHEMES:
        raise ValueError(
            f"tier url {url!r} has no supported scheme; use one of "
            + ", ".join(f"{s}://" for s in TIER_SCHEMES)
            + " (e.g. grpc://127.0.0.1:7070)"
        )
    return url


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    """``kvtier serve``: the tier server and the store behind it."""

    host: str = "127.0.0.1"
    port: int = Field(7070, ge=0, le=65535)
    capacity: int = Field(4 << 30, description="bytes of payload the memory store may hold")
    backend: Literal["memory", "redis"] = "memory"
    redis_url: str | None = None
    eviction: Literal["lru", "fifo", "value"] = "value"
    metrics_port: int | None = Field(None, ge=0, le=65535)
    bulk_port: int | None = Field(
        0, ge=0, le=65535,
        description="raw-TCP bulk read port (0: any free port, advertised by Health; None: off)")
    max_workers: int = Field(8, ge=1, le=256)
    nixl: bool | None = Field(
        None, description="NIXL data plane (memory store in registered arena regions, a NIXL "
        "agent, leased one-sided reads and writes); None: on when nixl imports, the backend is "
        "memory and TLS is off (NIXL bytes are not encrypted)")
    snapshot_dir: str | None = Field(
        None, description="memory store: load this directory's snapshot at start, write it on "
        "shutdown (warm restart)")
    snapshot_interval_s: float = Field(
        0, ge=0, description="also snapshot every N seconds when the store changed (0: only on "
        "shutdown)")
    tls_cert: str | None = Field(None, description="PEM server certificate: TLS on gRPC and bulk")
    tls_key: str | None = Field(None, description="PEM private key of tls_cert")
    tls_client_ca: str | None = Field(None, description="require client certificates (mTLS)")
    auth_token_file: str | None = Field(
        None, description="JSON bearer tokens bound to tenants and roles (kvtier.security.tokens)"
        "; re-read on SIGHUP and on change")
    stream_idle_s: float = Field(30, ge=0, description="cancel an upload stream that sent "
                                 "nothing this long (a stalled client holds a worker); 0: never")
    max_concurrent_rpcs: int = Field(1024, ge=1, description="more at once: RESOURCE_EXHAUSTED")
    max_message_bytes: int = Field(
        64 << 20, ge=1 << 20, le=512 << 20, description="largest gRPC message accepted (it is "
        "received whole before any check: the bound on what one request can make the server "
        "allocate); larger: RESOURCE_EXHAUSTED")
    bulk_max_connections: int = Field(512, ge=1, description="bulk port connections at once")
    bulk_idle_s: float = Field(600, ge=0, description="close a bulk connection idle this long")

    @field_validator("capacity", "max_message_bytes", mode="before")
    @classmethod
    def _cap(cls, v: Any) -> int:
        return parse_bytes(v)

    def model_post_init(self, _ctx: Any) -> None:
        if self.backend == "redis" and not self.redis_url:
            raise ConfigError("--backend redis needs --redis-url (e.g. redis://127.0.0.1:6379/0)")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together (PEM certificate and key)")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("--tls-client-ca (mutual TLS) needs --tls-cert/--tls-key")
        if self.backend == "redis" and self.snapshot_dir:
            raise ConfigError("--snapshot-dir snapshots the memory store; Redis persists itself "
                              "(RDB/AOF): drop --snapshot-dir or use --backend memory")


class ConnectorConfig(_Strict):
    """``kv_connector_extra_config`` of :class:`kvtier.connectors.vllm.KVTierConnector`."""

    tier_url: str = "grpc://127.0.0.1:7070"
    tenant: str = Field("", description="salt separating tenants that must not share blocks")
    timeout_s: float = Field(2.0, gt=0, le=600, description="per tier call")
    retry_after_s: float = Field(5.0, ge=0, description="back-off after the tier failed")
    transport: Literal["auto", "nixl", "tcp", "grpc"] = Field(
        "auto", description="how a grpc:// tier's reads move: auto = NIXL when both sides have "
        "it, else the bulk TCP port, else gRPC streaming; nixl/tcp = prefer that one (falls back "
        "down the same order when the tier lacks it); grpc = gRPC streaming only")
    direct_reads: bool = Field(
        True, description="over NIXL, read payload data straight into the KV-cache blocks "
        "(checked where it lands) instead of through a staging buffer; CPU KV caches whose "
        "blocks are contiguous byte runs")
    save: bool = True
    load: bool = True
    save_queue_blocks: int = Field(4096, ge=1, description="blocks waiting for upload before drops")
    save_decode: bool = Field(
        True, description="also save blocks and states written by decode (lets the next turn "
        "of a chat hit past this turn's prompt; such restores are equivalent to a cold prefill "
        "up to kernel rounding, not bit-identical)")
    admission: str = Field(
        "default",
        description="which recurrent states to save and where prefill chunks end: default "
        "(prompt end, decode, fleet junctions, sparse periodic; vLLM's own chunking on a "
        "miss), prompt_end, marconi or dense (see kvtier/admission)")
    admission_params: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of the admission policy")
    checkpoint_every: int | None = Field(
        None, ge=0, le=1024,
        description="shorthand for admission=dense with every=N: end a prefill chunk (so a "
        "state is written and saved) every N boundaries; 0 saves every state vLLM writes "
        "without moving a chunk end. Not neutral: forced chunk ends change vLLM's arithmetic",
    )
    handoff_wait_s: float = Field(
        1.0, ge=0, le=600,
        description="a PD decode request whose params announce a hand-off waits this long for "
        "the prefill's upload to land in the tier, then falls back to the prefix cache "
        "(keep it well under a cold prefill of your prompts)")
    handoff_poll_s: float = Field(0.01, gt=0, le=10,
                                  description="how often a waiting decode request asks the tier")
    metrics_port: int | None = Field(None, ge=0, le=65535)
    model_id: str | None = Field(None, description="override the model identity in the namespace")
    tls_ca: str | None = Field(None, description="grpcs://: PEM CA that signed the tier's "
                               "certificate (default: system trust store)")
    tls_cert: str | None = Field(None, description="grpcs://: client certificate (mutual TLS)")
    tls_key: str | None = Field(None, description="grpcs://: key of tls_cert")
    auth_token_file: str | None = Field(None, description="file holding the tier bearer token")
    auth_token_env: str = Field("KVTIER_TOKEN", description="else this environment variable")

    def tier_options(self) -> dict[str, Any]:
        """TLS and token options for :func:`kvtier.backends.open_backend` (gRPC tiers)."""
        if not self.tier_url.startswith("grpc"):
            return {}
        return {"tls_ca": self.tls_ca, "tls_cert": self.tls_cert, "tls_key": self.tls_key,
                "token_file": self.auth_token_file, "token_env": self.auth_token_env,
                "transport": self.transport}

    @field_validator("tier_url")
    @classmethod
    def _url(cls, v: str) -> str:
        return check_tier_url(v)

    def model_post_init(self, _ctx: Any) -> None:
        if self.transport != "auto" and not self.tier_url.startswith("grpc"):
            raise ConfigError(f"transport={self.transport!r} applies to grpc:// tiers only; "
                              f"{self.tier_url.split('://')[0]}:// tiers have one way to read "
                              "(drop transport or use a grpc:// tier_url)")
        if self.checkpoint_every is not None and self.admission not in ("default", "dense"):
            raise ConfigError(
                f"checkpoint_every selects admission=dense; it cannot be combined with "
                f"admission={self.admission!r} (drop one of them)")
        self.admission_policy()  # a bad name or parameter fails here, not in the engine

    def admission_policy(self) -> AdmissionPolicy:
        """The configured policy; ``checkpoint_every=N`` means ``dense`` with ``every=N``."""
        from kvtier.admission import make_admission

        name, params = self.admission, dict(self.admission_params)
        if self.checkpoint_every is not None:
            name = "dense"
            params.setdefault("every", self.checkpoint_every)
        try:
            return make_admission(name, **params)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"admission={name!r} with {params}: {e}") from None


def load_config(cls: type[_Strict], data: dict[str, Any] | None) -> Any:
    """Build ``cls`` from a dict, turning pydantic errors into one readable ConfigError."""
    try:
        return cls(**(data or {}))
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "config"
            lines.append(f"{loc}: {err['msg']} (got {err.get('input')!r})")
        fields = ", ".join(sorted(cls.model_fields))
        raise ConfigError(
            f"invalid {cls.__name__}: " + "; ".join(lines) + f". Known options: {fields}"
        ) from None
