"""``kvtier explain``: what a prompt would hit, boundary by boundary, and why it stops."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kvtier.backends.base import Backend
from kvtier.hashing import RANDOM, HashSeed, engine_hash_seed, prompt_block_hashes
from kvtier.lookup import GroupKind, LookupQuery, LookupResult
from kvtier.manifest import NamespaceManifest, load_manifests


def _seed(m: NamespaceManifest) -> HashSeed | None:
    """The hash seed a namespace's engines use, as recorded (None: an older manifest)."""
    if not m.hash_seed_source:
        return None
    return HashSeed(m.hash_algo, m.hash_seed_source, m.hash_seed, m.hash_seed_digest)


def _hashes(m: NamespaceManifest, token_ids: Sequence[int]) -> tuple[list[bytes], str | None]:
    """The prompt's hashes as the namespace's engines compute them, or why they cannot be:
    with the recorded seed, else with this process's (checked against the recorded digest)."""
    seed = _seed(m)
    if seed is not None and seed.source == RANDOM:
        return [], (f"hash seed mismatch: the engines of this namespace seed vLLM's prefix hash "
                    f"with {seed.describe()}, so no two engines (or restarts) share a block; "
                    f"set PYTHONHASHSEED=<one value> the same on every node")
    if seed is not None and seed.seed is not None:
        return prompt_block_hashes(token_ids, m.hash_block_size, m.hash_algo, seed.seed), None
    hashes = prompt_block_hashes(token_ids, m.hash_block_size, m.hash_algo)
    own = engine_hash_seed(m.hash_algo)
    if seed is not None and own.digest != seed.digest:
        return hashes, (f"hash seed mismatch: this namespace's engines hash with a PYTHONHASHSEED "
                        f"that is not recorded ({m.hash_algo} keeps it secret) and this process "
                        f"has {own.describe()}: run explain with the engines' PYTHONHASHSEED, and "
                        f"set PYTHONHASHSEED=<that value> the same on every node")
    return hashes, None


def _lookup(backend: Backend, m: NamespaceManifest, hashes: list[bytes], n_tokens: int,
            rank: int) -> LookupResult:
    per_boundary = m.boundary_tokens // m.hash_block_size
    # The engine always computes the last token: boundaries past (len - 1) are never restored.
    # Cap by passing only their hashes (a max_boundary of 0 means "no cap" on the wire).
    max_b = max(0, (n_tokens - 1) // m.boundary_tokens)
    q = LookupQuery(bytes.fromhex(m.namespace), rank, hashes[:max_b * per_boundary],
                    per_boundary, m.group_queries(), 0, max_b)
    return backend.lookup(q, with_details=True)


def explain_prompt(backend: Backend, m: NamespaceManifest, token_ids: Sequence[int],
                   rank: int = 0, manifests: Mapping[str, NamespaceManifest] | None = None
                   ) -> dict[str, Any]:
    """``manifests``: every namespace in the tier (read from it when not given)."""
    hashes, seed_problem = _hashes(m, token_ids)
    groups = m.group_queries()
    res = _lookup(backend, m, hashes, len(token_ids), rank)
    rows = []
    for d in res.details:
        present = [d.present.get(g.group_id, False) for g in groups]
        rows.append({"boundary": d.boundary, "tokens": d.boundary * m.boundary_tokens,
                     "present": present, "prefix_ok": d.prefix_ok,
                     "restorable": d.boundary <= res.boundary})
    seed = _seed(m)
    report: dict[str, Any] = {
        "namespace": m.namespace, "model": m.model, "tokens": len(token_ids),
        "hash_seed": seed.describe() if seed else "not recorded (manifest of an older kvtier)",
        "groups": [{"group_id": g.group_id, "kind": g.kind.value} for g in groups],
        "boundaries": rows, "hit_boundary": res.boundary,
        "hit_tokens": res.boundary * m.boundary_tokens, "reason": res.reason.value,
    }
    if seed_problem and res.boundary < max(1, len(rows)):
        report["why"] = seed_problem
    else:
        report["why"] = _why(report, groups, backend, m, hashes, rank, token_ids, manifests)
    return report


def _why(report: dict[str, Any], groups, backend: Backend, m: NamespaceManifest,  # noqa: ANN001
         hashes: list[bytes], rank: int, token_ids: Sequence[int],
         manifests: Mapping[str, NamespaceManifest] | None) -> str:
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
            seeded = _seed_mismatch(backend, m, token_ids, rank, manifests)
            if seeded:
                return seeded
            other = _other_namespace(backend, m, hashes, rank)
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


def _seed_mismatch(backend: Backend, m: NamespaceManifest, token_ids: Sequence[int], rank: int,
                   manifests: Mapping[str, NamespaceManifest] | None) -> str | None:
    """Namespaces that differ from ``m`` only in the hash seed: engines of one model and
    layout seeded differently, which never share a block. Names the seed that holds the
    prompt, when one does."""
    mine = _seed(m)
    if mine is None or not m.layout_unseeded:
        return None
    if manifests is None:
        manifests = load_manifests(backend)
    twins = [o for o in manifests.values()
             if o.namespace != m.namespace and o.model == m.model
             and o.layout_unseeded == m.layout_unseeded and o.tenant_salted == m.tenant_salted
             and o.hash_seed_digest != m.hash_seed_digest]
    if not twins:
        return None
    holder = None
    for o in twins:
        seed = _seed(o)
        if seed is not None and seed.seed is not None:
            hashes = prompt_block_hashes(token_ids, o.hash_block_size, o.hash_algo, seed.seed)
            if _lookup(backend, o, hashes, len(token_ids), rank).boundary > 0:
                holder = (o, seed)
                break
    others = "; ".join(f"{o.namespace}: {_seed(o).describe()}" for o in twins)  # type: ignore[union-attr]
    if holder is None:
        return (f"hash seed mismatch: nothing of this prompt is stored here, and namespace(s) "
                f"of the same model and layout were written with another hash seed ({others}; "
                f"this one: {mine.describe()}): set PYTHONHASHSEED=<one value> the same on "
                f"every node")
    o, seed = holder
    value = seed.seed if seed.source == "PYTHONHASHSEED" else None
    fix = (f"set PYTHONHASHSEED={value} the same on every node" if value is not None
           else "unset PYTHONHASHSEED on every node (or set it the same everywhere)")
    return (f"hash seed mismatch: namespace {o.namespace} (same model and layout, "
            f"{seed.describe()}) holds this prompt, but this namespace's engines hash with "
            f"{mine.describe()}, so they compute other block hashes: {fix}")


def _other_namespace(backend: Backend, m: NamespaceManifest, hashes: list[bytes],
                     rank: int) -> str | None:
    if not hashes:
        return None
    per = m.boundary_tokens // m.hash_block_size
    first = hashes[min(per, len(hashes)) - 1]
    for k, _ in backend.scan_blocks():
        if k.block_hash == first and k.namespace.hex() != m.namespace:
            return k.namespace.hex()
    return None
