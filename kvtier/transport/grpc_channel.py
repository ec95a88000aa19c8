"""gRPC settings and the hand-framed ``Get`` data chunks both ends agree on.

Bulk bytes skip protobuf: the server frames ``GetChunk(data=...)`` itself and
the client slices the payload out of the serialized message, so the multi-megabyte
reads of a restore are not copied through protobuf on either side.
"""

from __future__ import annotations

MAX_MESSAGE = 512 << 20
DEFAULT_CHUNK = 4 << 20
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.http2.max_frame_size", 16 << 20),
    ("grpc.http2.bdp_probe", 1),
]
# A tier that was unreachable is retried within seconds, not gRPC's default minutes.
CLIENT_OPTIONS = [*GRPC_OPTIONS, ("grpc.initial_reconnect_backoff_ms", 500),
                  ("grpc.min_reconnect_backoff_ms", 500), ("grpc.max_reconnect_backoff_ms", 2000)]


def identity(b: bytes) -> bytes:
    """(De)serializer for messages passed as raw bytes."""
    return b


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


_DATA_TAG = bytes([(2 << 3) | 2])  # GetChunk.data: field 2, length-delimited


def data_chunk(parts: list[memoryview], nbytes: int) -> bytes:
    """A serialized ``GetChunk(data=...)``, built with one copy of the payload bytes."""
    return b"".join([_DATA_TAG, _varint(nbytes), *parts])


def split_data_chunk(raw: bytes) -> memoryview:
    """The ``data`` bytes of a serialized data-only GetChunk, without copying."""
    mv = memoryview(raw)
    if not raw or raw[0] != _DATA_TAG[0]:
        raise ValueError("not a data chunk")
    n, shift, i = 0, 0, 1
    while True:
        b = raw[i]
        n |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            break
        shift += 7
    if len(raw) - i != n:
        raise ValueError("truncated data chunk")
    return mv[i:]
