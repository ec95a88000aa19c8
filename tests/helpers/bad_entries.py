"""Bad stored entries, and the sound payload a later save brings, for every backend's tests.

Each case is what a tier can hold under a block key that the loader must refuse:
corrupt data, a truncated value, a payload of another block (misfiled), bytes
that are not a payload at all (foreign), a payload of another tensor layout,
and a decode-written copy (sound, but a prefill-written one restores
bit-identically). A save of a sound prefill payload must replace each of them.
"""

from __future__ import annotations

import os
import uuid

from kvtier import payload
from kvtier.keys import BlockKey, Namespace, fingerprint

PAGE = 4096
LAYOUT = payload.layout_digest("test layout page=4096")
OTHER_LAYOUT = payload.layout_digest("test layout page=4096, other strides")
BAD_KINDS = ("corrupt", "truncated", "misfiled", "foreign", "other_layout", "decode_written")


def block_key(group: int = 0, tag: str = "") -> BlockKey:
    ns = Namespace("bad-entries", fingerprint({"page": PAGE}), uuid.uuid4().hex).id
    return BlockKey(ns, 0, group, os.urandom(16) if not tag else tag.encode().ljust(16, b"."))


def good(key: BlockKey, flags: int = 0) -> bytes:
    return payload.encode(key, LAYOUT, os.urandom(PAGE), flags)


def bad(kind: str, key: BlockKey) -> bytes:
    """A value under ``key`` that the loader refuses (or, decode_written, would rather not have)."""
    if kind == "corrupt":
        raw = bytearray(good(key))
        raw[-1] ^= 0xFF
        return bytes(raw)
    if kind == "truncated":
        return good(key)[:-100]
    if kind == "misfiled":
        other = BlockKey(key.namespace, key.rank, key.group, os.urandom(16))
        return good(other)
    if kind == "foreign":
        return b"not a kvtier payload" * 10
    if kind == "other_layout":
        return payload.encode(key, OTHER_LAYOUT, os.urandom(PAGE))
    if kind == "decode_written":
        return good(key, payload.FLAG_DECODE)
    raise ValueError(kind)


def loads(key: BlockKey, value: bytes | memoryview | None) -> bool:
    """Whether an engine (layout LAYOUT) would load ``value`` as ``key``."""
    if value is None:
        return False
    try:
        payload.decode(value, key, LAYOUT)
    except payload.PayloadError:
        return False
    return True
