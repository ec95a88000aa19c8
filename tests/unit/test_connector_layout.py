"""The connector's view of vLLM's KV-cache config: kinds, boundaries, and the layout fingerprint."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from kvtier.connectors.vllm.layout import CacheLayout, UnsupportedLayout  # noqa: E402
from vllm.v1.kv_cache_interface import (  # noqa: E402
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    MambaSpec,
    SlidingWindowSpec,
)

from kvtier.lookup import GroupKind  # noqa: E402


def gdn(block_size: int = 384, mode: str = "align") -> MambaSpec:
    return MambaSpec(block_size=block_size, shapes=((3, 512), (2, 128, 128)),
                     dtypes=(torch.bfloat16, torch.float32), mamba_cache_mode=mode)


def attn(block_size: int = 384, dtype=torch.bfloat16, heads: int = 2) -> FullAttentionSpec:
    return FullAttentionSpec(block_size=block_size, num_kv_heads=heads, head_size=64, dtype=dtype)


def kv_config(specs) -> KVCacheConfig:
    groups = [KVCacheGroupSpec([f"model.layers.{i}.attn"], s) for i, s in enumerate(specs)]
    return KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=groups)


def vllm_config(tp: int = 1, model: str = "tiny-qwen3next"):
    # A stand-in carrying only the fields the layout reads.
    return SimpleNamespace(
        parallel_config=SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=1),
        cache_config=SimpleNamespace(prefix_caching_hash_algo="sha256"),
        model_config=SimpleNamespace(model=model),
    )


HYBRID = [gdn(), gdn(), gdn(), attn()]


def test_hybrid_groups_and_boundaries():
    layout = CacheLayout.from_vllm(vllm_config(), kv_config(HYBRID))
    assert [g.kind for g in layout.groups] == [GroupKind.STATE] * 3 + [GroupKind.ATTENTION]
    assert layout.scheduler_block_size == 384
    assert layout.anchor.group_id == 3
    per_block = 384 // layout.hash_block_size
    assert [q.hashes_per_block for q in layout.group_queries()] == [per_block] * 4


def test_same_layout_same_namespace_across_processes():
    a = CacheLayout.from_vllm(vllm_config(), kv_config(HYBRID))
    b = CacheLayout.from_vllm(vllm_config(), kv_config([gdn(), gdn(), gdn(), attn()]))
    assert a.namespace().id == b.namespace().id


@pytest.mark.parametrize(
    "change",
    [
        lambda: (vllm_config(), kv_config([gdn(), gdn(), gdn(), attn(dtype=torch.float16)])),
        lambda: (vllm_config(), kv_config([gdn(), gdn(), gdn(), attn(heads=4)])),
        lambda: (vllm_config(tp=2), kv_config(HYBRID)),
        lambda: (vllm_config(model="other-model"), kv_config(HYBRID)),
        lambda: (vllm_config(), kv_config([gdn(768), gdn(768), gdn(768), attn(768)])),
        lambda: (vllm_config(), kv_config([replace(gdn(), dtypes=(torch.float32, torch.float32)),
                                           gdn(), gdn(), attn()])),
    ],
)
def test_any_layout_change_changes_the_namespace(change):
    base = CacheLayout.from_vllm(vllm_config(), kv_config(HYBRID)).namespace().id
    assert CacheLayout.from_vllm(*change()).namespace().id != base


def test_tenant_salt_separates_namespaces():
    layout = CacheLayout.from_vllm(vllm_config(), kv_config(HYBRID))
    assert layout.namespace("tenant-a").id != layout.namespace("tenant-b").id
    assert layout.namespace("tenant-a").id != layout.namespace().id


def test_states_need_align_mode():
    with pytest.raises(UnsupportedLayout, match="align"):
        CacheLayout.from_vllm(vllm_config(), kv_config([gdn(mode="none"), attn()]))


def test_sliding_window_groups_are_refused():
    sw = SlidingWindowSpec(block_size=384, num_kv_heads=2, head_size=64, dtype=torch.bfloat16,
                           sliding_window=128)
    with pytest.raises(UnsupportedLayout):
        CacheLayout.from_vllm(vllm_config(), kv_config([gdn(), sw, attn()]))


def test_block_hash_indexing():
    layout = CacheLayout.from_vllm(vllm_config(), kv_config(HYBRID))
    per = 384 // layout.hash_block_size
    hashes = [bytes([i]) * 32 for i in range(3 * per)]
    g = layout.anchor
    assert layout.block_hash(hashes, g, 0) == hashes[per - 1]
    assert layout.block_hash(hashes, g, 2) == hashes[3 * per - 1]
    assert layout.block_hash(hashes, g, 3) is None


# -- the prefix-hash seed (vLLM 0.32: PYTHONHASHSEED seeds NONE_HASH, sha256 included) --------
def layout_with_seed(monkeypatch: pytest.MonkeyPatch, seed: str | None,
                     algo: str = "sha256") -> CacheLayout:
    if seed is None:
        monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    else:
        monkeypatch.setenv("PYTHONHASHSEED", seed)
    cfg = vllm_config()
    cfg.cache_config.prefix_caching_hash_algo = algo
    return CacheLayout.from_vllm(cfg, kv_config(HYBRID))


def test_hash_seed_is_part_of_the_namespace(monkeypatch):
    unset, zero, one = (layout_with_seed(monkeypatch, s) for s in (None, "0", "1"))
    assert len({x.namespace().id for x in (unset, zero, one)}) == 3
    assert len({x.fingerprint for x in (unset, zero, one)}) == 3
    assert unset.unseeded == zero.unseeded == one.unseeded  # only the seed differs
    assert layout_with_seed(monkeypatch, "1").namespace().id == one.namespace().id
    # vLLM's default seed for sha256 is a fixed string, so "unset" is reproducible too
    assert layout_with_seed(monkeypatch, None).namespace().id == unset.namespace().id


def engine_none_hash(monkeypatch: pytest.MonkeyPatch) -> bytes:
    """vLLM's NONE_HASH under this environment (its globals restored after the test)."""
    from vllm.utils.hashing import sha256
    from vllm.v1.core import kv_cache_utils as kcu

    for name in ("NONE_HASH", "_NONE_HASH_SEED"):
        monkeypatch.setattr(kcu, name, getattr(kcu, name, None), raising=False)
    kcu.init_none_hash(sha256)
    return bytes(kcu.NONE_HASH)


def test_manifest_records_the_seed_without_the_raw_none_hash(monkeypatch):
    from vllm.v1.core import kv_cache_utils as kcu

    m = layout_with_seed(monkeypatch, "7").manifest()
    assert (m.hash_seed_source, m.hash_seed) == ("PYTHONHASHSEED", "7")
    none_hash = engine_none_hash(monkeypatch)
    assert m.hash_seed_digest and none_hash.hex() not in m.to_bytes().decode()
    assert m.hash_seed_digest not in none_hash.hex()
    assert m.layout_unseeded == layout_with_seed(monkeypatch, None).manifest().layout_unseeded

    unset = layout_with_seed(monkeypatch, None).manifest()
    assert (unset.hash_seed_source, unset.hash_seed) == ("default", kcu.DEFAULT_NONE_HASH_SEED)


def test_non_cryptographic_hash_seed_stays_unrecorded(monkeypatch):
    m = layout_with_seed(monkeypatch, "7", "xxhash").manifest()
    assert (m.hash_seed_source, m.hash_seed) == ("PYTHONHASHSEED", None)  # must stay secret
    assert m.hash_seed_digest not in ("", "random")
    r = layout_with_seed(monkeypatch, None, "xxhash").manifest()
    assert (r.hash_seed_source, r.hash_seed, r.hash_seed_digest) == ("random", None, "random")


def test_prompt_hashes_with_a_recorded_seed_equal_the_engines(monkeypatch):
    from vllm.utils.hashing import sha256
    from vllm.v1.core import kv_cache_utils as kcu

    from kvtier.hashing import prompt_block_hashes

    ids = list(range(100))
    monkeypatch.setenv("PYTHONHASHSEED", "3")
    engine, parent = [], engine_none_hash(monkeypatch)
    for s in range(0, 96, 16):
        parent = kcu.hash_block_tokens(sha256, parent, ids[s:s + 16], None)
        engine.append(bytes(parent))
    monkeypatch.setenv("PYTHONHASHSEED", "4")  # the tool's own setting does not matter
    assert prompt_block_hashes(ids, 16, "sha256", seed="3") == engine
    assert prompt_block_hashes(ids, 16, "sha256") != engine
