"""Checks on what a client sends, shared by every transport the server speaks.

A malformed key is the client's fault (``INVALID_ARGUMENT`` on gRPC, a refusal
frame on the bulk port), never a reason to touch the store.
"""

from __future__ import annotations

from kvtier.keys import BlockKey, is_block_key, is_manifest_key

MAX_KEYS = 1 << 20
MAX_VALUE = 256 << 20


class BadRequest(ValueError):
    """Client error: reported as INVALID_ARGUMENT."""


def check_count(n: int) -> None:
    """At most MAX_KEYS keys in one call."""
    if n > MAX_KEYS:
        raise BadRequest(f"too many keys in one call ({n} > {MAX_KEYS}); batch them")


def check_keys(keys: list[bytes]) -> list[bytes]:
    """``keys`` unchanged if each is a block or manifest key and there are not too many."""
    check_count(len(keys))
    for k in keys:
        if not is_block_key(k) and not is_manifest_key(k):
            try:
                BlockKey.decode(k)  # for its message
            except ValueError as e:
                raise BadRequest(str(e)) from None
            raise BadRequest(f"not a canonical kvtier block key: {k[:80]!r}")
    return keys
