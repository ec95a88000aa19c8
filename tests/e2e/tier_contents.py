"""What the tier holds for a prompt, read from outside the engines (any tier URL)."""

from __future__ import annotations

from kvtier import payload
from kvtier.backends import open_backend
from kvtier.hashing import prompt_block_hashes
from kvtier.keys import BlockKey
from kvtier.manifest import load_manifests


def decode_flagged_blocks(url: str, tokens: list[int]) -> dict[str, list[int]]:
    """Token offsets at which the tier's blocks of ``tokens`` end, for blocks stored as
    decode-written (``FLAG_DECODE``), by group kind."""
    with open_backend(url) as b:
        (m,) = load_manifests(b).values()
        hashes = prompt_block_hashes(tokens, m.hash_block_size, m.hash_algo)
        out: dict[str, list[int]] = {"attention": [], "state": []}
        for g in m.groups:
            keys = [BlockKey(bytes.fromhex(m.namespace), 0, g.group_id, h).encode()
                    for h in hashes]
            for i, v in enumerate(b.get_many(keys)):
                end = (i + 1) * m.hash_block_size
                decode = v is not None and payload.read_header(v).flags & payload.FLAG_DECODE
                if decode and end not in out[g.kind]:
                    out[g.kind].append(end)
    return out
