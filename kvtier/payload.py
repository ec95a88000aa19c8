"""Self-describing block payloads.

Every stored value carries a fixed header: magic, format version, the key it
was stored under, a digest of the tensor layout it was gathered from, the
data length and an xxh3-64 checksum of the data seeded with a digest of the
header fields before it (so no header bit, flags included, can change
unnoticed). A loader checks all of them;
any mismatch raises :class:`PayloadError`, which the connector turns into a
miss (recompute), never into wrong bytes in the KV cache.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

from kvtier.keys import NAMESPACE_BYTES, BlockKey

MAGIC = b"KVTB"
FORMAT_VERSION = 2  # 2: the checksum covers the header too
HASH_BYTES = 32
# Flags. DECODE: written by decode steps. Such a block holds exactly what the
# engine computed, but decode kernels round differently from a cold prefill of
# the same tokens (about 0.5% relative on a GDN state), so a restore from it is
# equivalent, not bit-identical, to recomputing.
FLAG_DECODE = 0x01
KNOWN_FLAGS = FLAG_DECODE
# magic, version, flags, group, rank, namespace, hash len, hash, layout, length, checksum
_HEADER = struct.Struct(f"<4sBBHH{NAMESPACE_BYTES}sB{HASH_BYTES}s8sQQ")
HEADER_SIZE = _HEADER.size


class PayloadError(ValueError):
    """A stored payload that must not be loaded (corrupt, truncated, foreign)."""


@dataclass(frozen=True, slots=True)
class PayloadHeader:
    version: int
    key: BlockKey
    layout: bytes
    length: int
    checksum: int
    flags: int = 0


def layout_digest(desc: str | bytes) -> bytes:
    """8-byte digest of a tensor-layout description."""
    if isinstance(desc, str):
        desc = desc.encode()
    return xxhash.xxh3_64_digest(desc)


def encode(key: BlockKey, layout: bytes, data: bytes | memoryview, flags: int = 0) -> bytes:
    """Header + data as one bytes object (what backends store)."""
    if len(key.block_hash) > HASH_BYTES:
        raise ValueError(f"block hash longer than {HASH_BYTES} bytes")
    if len(layout) != 8:
        raise ValueError("layout digest must be 8 bytes (use layout_digest())")
    if flags & ~KNOWN_FLAGS:
        raise ValueError(f"unknown payload flags {flags:#04x}")
    if not (0 <= key.group <= 0xFFFF and 0 <= key.rank <= 0xFFFF):
        raise ValueError("group and rank must be within 0..65535")
    mv = memoryview(data).cast("B")
    header = _HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        flags,
        key.group,
        key.rank,
        key.namespace,
        len(key.block_hash),
        key.block_hash,
        layout,
        mv.nbytes,
        0,
    )
    return b"".join((header[:_SEEDED], struct.pack("<Q", _checksum(header, mv)), mv))


_SEEDED = HEADER_SIZE - 8  # the header bytes before the checksum field


def _checksum(header: bytes | memoryview, data: memoryview) -> int:
    """xxh3-64 of the data, seeded by the header fields: one pass over the data."""
    return xxhash.xxh3_64_intdigest(data, seed=xxhash.xxh3_64_intdigest(header[:_SEEDED]))


def read_header(buf: bytes | memoryview) -> PayloadHeader:
    mv = memoryview(buf)
    if mv.nbytes < HEADER_SIZE:
        raise PayloadError(f"truncated payload: {mv.nbytes} < header {HEADER_SIZE} bytes")
    magic, version, flags, group, rank, ns, hlen, bhash, layout, length, checksum = (
        _HEADER.unpack_from(mv)
    )
    if magic != MAGIC:
        raise PayloadError("bad magic: not a kvtier payload")
    if version != FORMAT_VERSION:
        raise PayloadError(f"unsupported payload format version {version}")
    if flags & ~KNOWN_FLAGS:  # an unknown bit is corruption or a newer writer
        raise PayloadError(f"corrupt header: unknown flags {flags:#04x}")
    if hlen > HASH_BYTES or any(bhash[hlen:]):
        raise PayloadError("corrupt header: hash length")
    key = BlockKey(namespace=ns, rank=rank, group=group, block_hash=bhash[:hlen])
    return PayloadHeader(version, key, layout, length, checksum, flags)


def _checked_header(head: memoryview, expected_key: BlockKey | None,
                    expected_layout: bytes | None, nbytes: int) -> PayloadHeader:
    header = read_header(head)
    if expected_key is not None and header.key != expected_key:
        raise PayloadError("payload was stored under a different key")
    if expected_layout is not None and header.layout != expected_layout:
        raise PayloadError("payload layout does not match this engine's KV-cache layout")
    if nbytes != header.length:
        raise PayloadError(f"length mismatch: header says {header.length}, got {nbytes}")
    return header


def decode(
    buf: bytes | memoryview,
    expected_key: BlockKey | None = None,
    expected_layout: bytes | None = None,
) -> memoryview:
    """Validate ``buf`` and return a view of its data; raise PayloadError if unusable."""
    mv = memoryview(buf).cast("B")
    data = mv[HEADER_SIZE:]
    header = _checked_header(mv, expected_key, expected_layout, data.nbytes)
    if _checksum(mv[:HEADER_SIZE], data) != header.checksum:
        raise PayloadError("checksum mismatch: payload is corrupt")
    return data


def check_split(
    head: bytes | memoryview,
    parts: Sequence[memoryview],
    expected_key: BlockKey | None = None,
    expected_layout: bytes | None = None,
) -> None:
    """Validate a payload whose header is ``head`` and whose data was placed in ``parts``
    (in order: a read straight into paged slots); raise PayloadError if unusable."""
    mv = memoryview(head).cast("B")
    header = _checked_header(mv, expected_key, expected_layout, sum(p.nbytes for p in parts))
    h = xxhash.xxh3_64(seed=xxhash.xxh3_64_intdigest(mv[:_SEEDED]))
    for p in parts:
        h.update(p)
    if h.intdigest() != header.checksum:
        raise PayloadError("checksum mismatch: payload is corrupt")


def _sound(key: BlockKey, buf: bytes | memoryview) -> PayloadHeader | None:
    """The header of ``buf`` if it is a whole, uncorrupted payload of ``key``, else None."""
    try:
        header = read_header(buf)
        if header.key != key:
            return None
        decode(buf)  # length and checksum
    except PayloadError:
        return None
    return header


KEEP, REPLACE, REFUSE = "keep", "replace", "refuse"


def put_verdict(key: bytes, stored: bytes | memoryview, new: bytes | memoryview) -> str:
    """What a put of ``new`` under ``key`` does to the ``stored`` value: KEEP it (the
    put counts as stored: the tier holds this block), REPLACE it, or REFUSE the put.

    One rule for every medium, so a bad entry cannot outlive the saves that
    could heal it (the loader only deletes the blocks it tried):

    - same bytes: keep;
    - a value that is not a sound payload of ``key`` (header, key, length,
      checksum) is refused: nothing stored is lost to a bad writer;
    - a stored value that is not a sound payload of ``key`` (corrupt, truncated,
      misfiled, foreign) is replaced;
    - a sound one is replaced only by one of another layout (the writer's layout
      is the current one) or by a prefill-written copy of a decode-written one
      (prefill restores bit-identically); otherwise the first copy stays.

    Keys that are not block keys (manifests, tests' raw keys): last writer wins.
    Cost: a byte comparison, then one xxh3 pass over each value (~5 us per 192 KiB).
    """
    if isinstance(stored, bytes) and isinstance(new, bytes) and stored == new:
        return KEEP  # memcmp; the checks below would also keep it
    try:
        block = BlockKey.decode(key)
    except ValueError:
        return REPLACE
    incoming = _sound(block, new)
    if incoming is None:
        return REFUSE
    old = _sound(block, stored)
    if old is None or old.layout != incoming.layout:
        return REPLACE
    better = bool(old.flags & FLAG_DECODE) and not incoming.flags & FLAG_DECODE
    return REPLACE if better else KEEP
