"""Random tier requests for fuzzing a real server (Hypothesis strategies; test extra).

Every method of the ``kvtier.v1.Tier`` service, read from the proto descriptor
(so methods added later are fuzzed too), gets random well-typed messages
(random keys, counts, sizes, nested groups) or raw garbage bytes. Used by
``tests/unit/test_fuzz_server.py`` and ``kvtier bench reliability``.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import strategies as st

from kvtier.keys import BlockKey, manifest_key
from kvtier.proto import tier_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Tier"]
# Answers a fuzzed request may get; UNKNOWN (an unhandled exception), UNAVAILABLE and
# DEADLINE_EXCEEDED (a dead or stuck server) may not. A request that is not a protobuf
# message at all fails in grpc's own deserializer: INTERNAL, allowed for garbage only.
CLIENT_ERRORS = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
                 grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE,
                 grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND,
                 grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED}


def keys() -> st.SearchStrategy[bytes]:
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
        return st.one_of(st.integers(0, 70), st.sampled_from([2**32 - 1]))
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_STRING:
        return st.text(max_size=40)
    if t == FieldDescriptor.TYPE_BYTES:
        return st.one_of(keys(), st.binary(max_size=4096))
    if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return st.floats(allow_nan=True)
    raise NotImplementedError(f"field type {t}")


def _repeated(f: FieldDescriptor) -> bool:
    is_repeated = getattr(f, "is_repeated", None)
    return is_repeated if isinstance(is_repeated, bool) else (
        f.label == FieldDescriptor.LABEL_REPEATED)


def messages(desc: Descriptor, depth: int = 0) -> st.SearchStrategy[bytes]:
    """Serialized random instances of ``desc`` (any field set or not, repeated up to 8)."""
    cls = getattr(pb, desc.name)
    fields = {}
    for f in desc.fields:
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= 2:
                continue
            one = messages(f.message_type, depth + 1).map(
                getattr(pb, f.message_type.name).FromString)
        else:
            one = _scalar(f)
        fields[f.name] = st.lists(one, max_size=8) if _repeated(f) else st.one_of(st.none(), one)

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


def requests(method: Any) -> st.SearchStrategy[tuple[bytes, bool]]:
    """(serialized request, is garbage) for one method."""
    return st.one_of(messages(method.input_type).map(lambda b: (b, False)),
                     st.binary(max_size=512).map(lambda b: (b, True)))


def sparing(protected: bytes) -> Any:
    """A filter dropping Flush requests whose prefix would flush ``protected``."""
    def keep(raw: bytes) -> bool:
        try:  # garbage bytes often parse (b"" is a FlushRequest for everything)
            return not protected.startswith(pb.FlushRequest.FromString(raw).prefix)
        except Exception:  # noqa: BLE001 - not a FlushRequest at all
            return True

    return keep


@st.composite
def calls(draw: st.DrawFn, protected: bytes = b"") -> tuple:
    """A random (method, [(request bytes, garbage?)...]); Flush never reaches ``protected``."""
    method = draw(st.sampled_from(list(SERVICE.methods)))
    n = draw(st.integers(0, 3)) if method.client_streaming else 1
    reqs = [draw(requests(method)) for _ in range(n)]
    if method.name == "Flush":
        keep = sparing(protected)
        reqs = [(b, g) for b, g in reqs if keep(b)]
        if not reqs:
            reqs = [(pb.FlushRequest(prefix=b"kvt1:ffff").SerializeToString(), False)]
    return method, reqs


def call(channel: grpc.Channel, method: Any, reqs: list[bytes],
         timeout_s: float = 20) -> grpc.StatusCode:
    """Send raw request bytes to ``method``; the status code it ended with."""
    path = f"/{SERVICE.full_name}/{method.name}"
    kw = dict(request_serializer=bytes, response_deserializer=bytes)
    try:
        if method.client_streaming:
            make = channel.stream_stream if method.server_streaming else channel.stream_unary
            out = make(path, **kw)(iter(reqs), timeout=timeout_s)
            if method.server_streaming:
                list(out)
        elif method.server_streaming:
            list(channel.unary_stream(path, **kw)(reqs[0], timeout=timeout_s))
        else:
            channel.unary_unary(path, **kw)(reqs[0], timeout=timeout_s)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def acceptable(code: grpc.StatusCode, garbage: bool) -> bool:
    return code in CLIENT_ERRORS or (garbage and code == grpc.StatusCode.INTERNAL)
