"""Property-based fuzzing (Hypothesis) of a real ``kvtier serve`` process over gRPC.

Every method of the service (read from the proto descriptor, so new methods are
fuzzed too) gets random well-typed messages (random keys, counts, sizes, nested
groups) and raw garbage bytes. The server must answer each with OK or a clear
client error, never an unhandled exception (``UNKNOWN``) or a crash, and keep
the entry stored before the fuzzing began.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier import payload
from kvtier.backends.base import PutItem
from kvtier.backends.grpc import GrpcBackend
from kvtier.keys import BlockKey, manifest_key
from kvtier.proto import tier_pb2 as pb
from tests.helpers.servers import TierProcess, running_tier, server_log

SERVICE = pb.DESCRIPTOR.services_by_name["Tier"]
KNOWN = BlockKey(hashlib.sha256(b"fuzz-known").digest()[:16], 0, 0, b"\x42" * 32)
KNOWN_VALUE = payload.encode(KNOWN, payload.layout_digest("fuzz"), b"precious" * 512)
# Client errors a fuzzed request may get; UNKNOWN (an unhandled exception), UNAVAILABLE and
# DEADLINE_EXCEEDED (a dead or stuck server) may not.
CLIENT_ERRORS = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
                 grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE,
                 grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND,
                 grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED}
FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _keys() -> st.SearchStrategy[bytes]:
    block = st.builds(lambda ns, r, g, h: BlockKey(ns, r, g, h).encode(),
                      st.binary(min_size=16, max_size=16), st.integers(0, 70000),
                      st.integers(0, 70000), st.binary(max_size=40))
    return st.one_of(block, st.binary(max_size=80),
                     st.binary(min_size=16, max_size=16).map(manifest_key),
                     st.sampled_from([b"", b"kvt1:", b"kvt1:" + b"0" * 32 + b":0:0:",
                                      b"kvt1:zz:0:0:00", b"kvt1:" + b"0" * 32 + b":-1:0:00"]))


def _scalar(f: FieldDescriptor) -> st.SearchStrategy:
    t = f.type
    if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_ENUM):
        return st.one_of(st.integers(-3, 70), st.sampled_from([4096, 1 << 20, 2**31 - 1,
                                                                -(2**31)]))
    if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64):
        return st.one_of(st.integers(-3, 70), st.sampled_from([2**63 - 1, -(2**63)]))
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64):
        return st.integers(0, 2**32 - 1)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_STRING:
        return st.text(max_size=40)
    if t == FieldDescriptor.TYPE_BYTES:
        return st.one_of(_keys(), st.binary(max_size=4096))
    if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return st.floats(allow_nan=True)
    raise NotImplementedError(f"field type {t}")


def messages(desc: Descriptor, depth: int = 0) -> st.SearchStrategy[bytes]:
    """Serialized random instances of ``desc`` (any field set or not, repeated up to 8)."""
    cls = getattr(pb, desc.name)
    fields = {}
    for f in desc.fields:
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= 2:
                continue
            one = messages(f.message_type, depth + 1).map(getattr(pb, f.message_type.name)
                                                           .FromString)
        else:
            one = _scalar(f)
        is_repeated = getattr(f, "is_repeated", None)
        repeated = is_repeated if isinstance(is_repeated, bool) else (
            f.label == FieldDescriptor.LABEL_REPEATED)
        fields[f.name] = st.lists(one, max_size=8) if repeated else st.one_of(st.none(), one)

    def build(values: dict) -> bytes:
        m = cls()
        for name, v in values.items():
            if v is None:
                continue
            field = getattr(m, name)
            if isinstance(v, list):
                if v and isinstance(v[0], bytes | str | bool | int | float):
                    field.extend(v)
                else:
                    for x in v:
                        field.add().CopyFrom(x)
            elif hasattr(field, "CopyFrom"):
                field.CopyFrom(v)
            else:
                setattr(m, name, v)
        return m.SerializeToString()

    return st.fixed_dictionaries(fields).map(build)


def _request(method) -> st.SearchStrategy[tuple[bytes, bool]]:  # noqa: ANN001
    return st.one_of(messages(method.input_type).map(lambda b: (b, False)),
                     st.binary(max_size=512).map(lambda b: (b, True)))


@pytest.fixture(scope="module")
def tier() -> Iterator[TierProcess]:
    with running_tier(capacity="64MiB") as t:
        with GrpcBackend(t.url, timeout_s=10) as b:
            assert b.put_many([PutItem(KNOWN.encode(), KNOWN_VALUE)]) == 1
        yield t


@pytest.fixture(scope="module")
def channel(tier: TierProcess) -> Iterator[grpc.Channel]:
    ch = grpc.insecure_channel(tier.url.split("://", 1)[1],
                               options=[("grpc.max_receive_message_length", 512 << 20)])
    yield ch
    ch.close()


def _call(channel: grpc.Channel, method, reqs: list[bytes]) -> grpc.StatusCode:  # noqa: ANN001
    path = f"/{SERVICE.full_name}/{method.name}"
    ident = bytes
    kw = dict(request_serializer=ident, response_deserializer=ident)
    try:
        if method.client_streaming:
            call = channel.stream_stream if method.server_streaming else channel.stream_unary
            out = call(path, **kw)(iter(reqs), timeout=20)
            if method.server_streaming:
                list(out)
        elif method.server_streaming:
            list(channel.unary_stream(path, **kw)(reqs[0], timeout=20))
        else:
            channel.unary_unary(path, **kw)(reqs[0], timeout=20)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def _flushes_known(raw: bytes) -> bool:
    try:  # garbage bytes often parse (b"" is a FlushRequest for everything)
        return KNOWN.encode().startswith(pb.FlushRequest.FromString(raw).prefix)
    except Exception:  # noqa: BLE001 - not a FlushRequest at all
        return False


@st.composite
def calls(draw: st.DrawFn) -> tuple:
    method = draw(st.sampled_from(list(SERVICE.methods)))
    n = draw(st.integers(0, 3)) if method.client_streaming else 1
    reqs = [draw(_request(method)) for _ in range(n)]
    if method.name == "Flush":  # the fuzzer may flush anything but the entry it must keep
        reqs = [(b, g) for b, g in reqs if not _flushes_known(b)]
        if not reqs:
            reqs = [(pb.FlushRequest(prefix=b"kvt1:ffff").SerializeToString(), False)]
    return method, reqs


@FUZZ
@given(calls())
def test_random_requests_get_clear_answers(channel: grpc.Channel, tier: TierProcess,
                                           call: tuple) -> None:
    method, reqs = call
    code = _call(channel, method, [b for b, _ in reqs])
    garbage = any(g for _, g in reqs)
    # A request that is not a protobuf message fails in grpc's deserializer: INTERNAL.
    allowed = CLIENT_ERRORS | ({grpc.StatusCode.INTERNAL} if garbage else set())
    assert code in allowed, (method.name, code, reqs, server_log(tier))


def test_server_survived_and_kept_its_data(channel: grpc.Channel, tier: TierProcess) -> None:
    """Runs after the fuzzing (file order): still up, still holding the entry."""
    assert tier.proc is not None and tier.proc.poll() is None, server_log(tier)
    with GrpcBackend(tier.url, timeout_s=10) as b:
        assert b.health()["ok"]
        assert bytes(b.get_many([KNOWN.encode()])[0]) == KNOWN_VALUE
        assert b.get_many([KNOWN.encode()])  # bulk port too
    assert "Exception calling application" not in server_log(tier), server_log(tier)
