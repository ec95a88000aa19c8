"""Block keys and namespaces: what a stored block means, and which key space it lives in."""

from __future__ import annotations

import hashlib

import pytest

from kvtier.keys import (
    KEY_PREFIX,
    NAMESPACE_BYTES,
    BlockKey,
    Namespace,
    fingerprint,
    is_manifest_key,
    manifest_key,
    namespace_prefix,
)

LAYOUT = fingerprint({"dtype": "bfloat16", "page": 196_608, "block": 384, "tp": 1})


def _ns(model: str = "tiny-qwen3next", layout: str = LAYOUT, tenant: str = "") -> bytes:
    return Namespace(model, layout, tenant).id


def _hash(i: int) -> bytes:
    return hashlib.sha256(i.to_bytes(8, "little")).digest()


# -- BlockKey encode / decode ----------------------------------------------------------------
@pytest.mark.parametrize(
    "key",
    [
        BlockKey(_ns(), 0, 0, _hash(1)),
        BlockKey(_ns(tenant="acme"), 7, 3, _hash(2)),
        BlockKey(bytes(NAMESPACE_BYTES), 0, 0, b"\x00"),  # all-zero namespace, 1-byte hash
        BlockKey(b"\xff" * NAMESPACE_BYTES, 65_535, 1_000, b"\x00\xff" * 16),
        BlockKey(_ns(), 1, 2, b""),  # empty hash still round-trips
    ],
)
def test_encode_decode_round_trip(key: BlockKey) -> None:
    raw = key.encode()
    assert isinstance(raw, bytes)
    assert raw.startswith(KEY_PREFIX + b":")
    assert BlockKey.decode(raw) == key
    # str input is accepted too (CLI arguments)
    assert BlockKey.decode(raw.decode()) == key


def test_encoding_is_readable_and_ordered_by_field() -> None:
    ns = _ns()
    h = _hash(5)
    raw = BlockKey(ns, 2, 3, h).encode()
    assert raw == b"kvt1:" + ns.hex().encode() + b":2:3:" + h.hex().encode()


def test_distinct_fields_give_distinct_keys() -> None:
    ns, h = _ns(), _hash(1)
    keys = {
        BlockKey(ns, 0, 0, h).encode(),
        BlockKey(ns, 1, 0, h).encode(),
        BlockKey(ns, 0, 1, h).encode(),
        BlockKey(ns, 0, 0, _hash(2)).encode(),
        BlockKey(_ns(tenant="t"), 0, 0, h).encode(),
    }
    assert len(keys) == 5


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"garbage",
        b"kvt2:00:0:0:00",  # wrong prefix / version
        b"kvt1:00:0:0",  # too few parts
        b"kvt1:00:0:0:00:extra",  # too many parts
        b"redis:key:with:five:parts",
    ],
)
def test_decode_rejects_non_kvtier_keys(raw: bytes) -> None:
    with pytest.raises(ValueError, match="not a kvtier block key"):
        BlockKey.decode(raw)


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"kvt1:zz:0:0:00", "namespace not hex"),
        (b"kvt1:000:0:0:00", "odd-length hex namespace"),
        (b"kvt1:00:x:0:00", "rank not an int"),
        (b"kvt1:00:0:g:00", "group not an int"),
        (b"kvt1:00:0:0:0g", "hash not hex"),
    ],
)
def test_decode_rejects_malformed_fields_with_clear_message(raw: bytes, why: str) -> None:
    with pytest.raises(ValueError, match="malformed kvtier block key") as ei:
        BlockKey.decode(raw)
    # the message quotes the offending key so an operator can find it
    assert repr(raw)[2:-1] in str(ei.value), why


def test_decode_error_message_truncates_huge_keys() -> None:
    raw = b"x" * 10_000
    with pytest.raises(ValueError) as ei:
        BlockKey.decode(raw)
    assert len(str(ei.value)) < 200


# -- Namespace --------------------------------------------------------------------------------
def test_namespace_id_is_16_stable_bytes() -> None:
    a = Namespace("m", LAYOUT, "t")
    assert len(a.id) == NAMESPACE_BYTES
    assert a.id == Namespace("m", LAYOUT, "t").id  # deterministic
    assert a.hex == a.id.hex()
    assert len(a.hex) == 2 * NAMESPACE_BYTES


def test_namespace_id_changes_with_model_layout_and_tenant() -> None:
    base = _ns("model-a", LAYOUT, "")
    other_layout = fingerprint({"dtype": "float16", "page": 196_608, "block": 384, "tp": 1})
    variants = {
        "model": _ns("model-b", LAYOUT, ""),
        "layout": _ns("model-a", other_layout, ""),
        "tenant": _ns("model-a", LAYOUT, "tenant-1"),
        "tenant2": _ns("model-a", LAYOUT, "tenant-2"),
    }
    for what, ns in variants.items():
        assert ns != base, what
    assert len(set(variants.values())) == len(variants)


def test_namespace_fields_cannot_be_confused_by_concatenation() -> None:
    # ("ab", "c") must not collide with ("a", "bc"): fields are separated.
    assert Namespace("ab", "c").id != Namespace("a", "bc").id
    assert Namespace("m", "l", "").id != Namespace("m", "", "l").id


def test_fingerprint_is_order_insensitive_and_value_sensitive() -> None:
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    assert fingerprint({"a": [1, 2]}) != fingerprint({"a": [2, 1]})


# -- manifest keys -----------------------------------------------------------------------------
def test_manifest_key_lives_in_the_namespace_and_is_recognised() -> None:
    ns = _ns()
    mk = manifest_key(ns)
    assert is_manifest_key(mk)
    assert mk.startswith(KEY_PREFIX + b":" + ns.hex().encode())
    # inside kvtier's key space (Redis ACL kvt1:*) and beside the namespace's blocks, so a
    # namespace flush takes it along
    assert mk.startswith(namespace_prefix())
    assert mk.startswith(namespace_prefix(ns))
    assert not mk.startswith(namespace_prefix(_ns(tenant="x")))
    assert manifest_key(_ns(tenant="x")) != mk


def test_block_keys_are_not_manifest_keys() -> None:
    ns = _ns()
    for g in range(4):
        assert not is_manifest_key(BlockKey(ns, 0, g, _hash(g)).encode())
    assert not is_manifest_key(b"other:manifest")  # right suffix, foreign key space
    assert not is_manifest_key(b"kvt1:" + ns.hex().encode())


def test_manifest_key_is_not_a_block_key() -> None:
    with pytest.raises(ValueError):
        BlockKey.decode(manifest_key(_ns()))


# -- namespace_prefix --------------------------------------------------------------------------
def test_namespace_prefix_selects_exactly_one_namespace() -> None:
    namespaces = [_ns(tenant=f"t{i}") for i in range(5)]
    keys = {
        ns: [BlockKey(ns, r, g, _hash(i)).encode()
             for r in range(2) for g in range(4) for i in range(3)]
        for ns in namespaces
    }
    all_keys = [k for ks in keys.values() for k in ks] + [manifest_key(ns) for ns in namespaces]
    for ns in namespaces:
        pre = namespace_prefix(ns)
        selected = {k for k in all_keys if k.startswith(pre)}
        assert selected == set(keys[ns]) | {manifest_key(ns)}
        blocks = selected - {manifest_key(ns)}
        assert all(BlockKey.decode(k).namespace == ns for k in blocks)


def test_namespace_prefix_without_namespace_selects_every_kvtier_key() -> None:
    ns = _ns()
    pre = namespace_prefix()
    assert pre == KEY_PREFIX + b":"
    assert BlockKey(ns, 0, 0, _hash(0)).encode().startswith(pre)
    assert manifest_key(ns).startswith(pre)
    assert not b"kvt10:foo".startswith(pre)


def test_namespace_prefix_does_not_match_a_namespace_sharing_leading_bytes() -> None:
    a = bytes(15) + b"\x01"
    b = bytes(15) + b"\x01" + b"\x02"  # not a valid 16-byte namespace, but a hex-prefix trap
    ka = BlockKey(a, 0, 0, b"\x01").encode()
    kb = BlockKey(b, 0, 0, b"\x01").encode()
    assert ka.startswith(namespace_prefix(a))
    assert not kb.startswith(namespace_prefix(a))
