"""``kvtier explain``: what a prompt would hit, boundary by boundary, and why it stops."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvtier.backends.base import Backend
from kvtier.hashing import prompt_block_hashes
from kvtier.lookup import GroupKind, LookupQuery
from kvtier.manifest import NamespaceManifest


def explain_prompt(backend: Backend, m: NamespaceManifest, token_ids: Sequence[int],
                   rank: int = 0) -> dict[str, Any]:
    ns = bytes.fromhex(m.namespace)
    hashes = prompt_block_hashes(token_ids, m.hash_block_size, m.hash_algo)
    per_boundary = m.boundary_tokens // m.hash_block_size
    groups = m.group_queries()
    # The engine always computes the last token: boundaries past (len - 1) are never restored.
    # Cap by passing only their hashes (a max_boundary of 0 means "no cap" on the wire).
    max_b = max(0, (len(token_ids) - 1) // m.boundary_tokens)
    q = LookupQuery(ns, rank, hashes[:max_b * per_boundary], per_boundary, groups, 0, max_b)
    res = backend.lookup(q, with_details=True)
    rows = []
    for d in res.details:
        present = [d.present.get(g.group_id, False) for g in groups]
        rows.append({"boundary": d.boundary, "tokens": d.boundary * m.boundary_tokens,
                     "present": present, "prefix_ok": d.prefix_ok,
                     "restorable": d.boundary <= res.boundary})
    report: dict[str, Any] = {
        "namespace": m.namespace, "model": m.model, "tokens": len(token_ids),
        "groups": [{"group_id": g.group_id, "kind": g.kind.value} for g in groups],
        "boundaries": rows, "hit_boundary": res.boundary,
        "hit_tokens": res.boundary * m.boundary_tokens, "reason": res.reason.value,
    }
    report["why"] = _why(report, groups, backend, m, hashes, rank)
    return report


def _why(report: dict[str, Any], groups, backend: Backend, m: NamespaceManifest,  # noqa: ANN001
         hashes: list[bytes], rank: int) -> str:
    rows = report["boundaries"]
    if not rows:
        return (f"the prompt is shorter than one boundary ({m.boundary_tokens} tokens) plus the "
                "token vLLM must compute")
    hit = report["hit_boundary"]
    if hit == len(rows):
        return "every boundary the engine may restore is restorable (vLLM computes the rest)"
    nxt = rows[hit]  # first boundary past the hit
    missing = [g for g, p in zip(groups, nxt["present"]) if not p]
    attn_missing = [g for g in missing if g.kind is GroupKind.ATTENTION]
    if attn_missing:
        gid = attn_missing[0].group_id
        later = any(r["present"][groups.index(attn_missing[0])] for r in rows[hit + 1:])
        if hit == 0 and not any(any(r["present"]) for r in rows):
            other = _other_namespace(backend, m, hashes, groups, rank)
            if other:
                return (f"nothing stored for this prompt in this namespace, but namespace "
                        f"{other} holds it: layout mismatch (different model, dtype, block size "
                        f"or TP), so those blocks can never be loaded here")
            return "nothing of this prompt is stored (never served through the tier, or evicted)"
        if later:
            return (f"attention block of group {gid} missing at boundary {hit + 1} while later "
                    f"ones survive: an evicted parent caps the hit")
        return f"attention blocks of group {gid} stop at boundary {hit} (not stored further)"
    gids = ", ".join(str(g.group_id) for g in missing)
    return (f"boundary {hit + 1} has its attention blocks but no recurrent state for group(s) "
            f"{gids}: no state was checkpointed there")


def _other_namespace(backend: Backend, m: NamespaceManifest, hashes: list[bytes],  # noqa: ANN001
                     groups, rank: int) -> str | None:
    if not hashes:
        return None
    per = m.boundary_tokens // m.hash_block_size
    first = hashes[min(per, len(hashes)) - 1]
    for k, _ in backend.scan_blocks():
        if k.block_hash == first and k.namespace.hex() != m.namespace:
            return k.namespace.hex()
    return None
