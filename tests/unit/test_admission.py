"""Admission policies: where each one ends chunks and which offered states it keeps."""

from __future__ import annotations

import pytest

from kvtier.admission import POLICIES, RequestView, make_admission

B = 100  # tokens per boundary


def view(prompt: int = 1050, junctions: tuple[int, ...] = (), in_chunk: bool = False,
         state: int = 300 * 1000, kv: int = 1000) -> RequestView:
    return RequestView(num_prompt_tokens=prompt, boundary_tokens=B, hit_boundary=0,
                       junctions=junctions, is_pd_prefill=False,
                       state_bytes_per_boundary=state, kv_bytes_per_token=kv,
                       in_chunk_checkpoints=in_chunk)


def chunk_ends(policy, req: RequestView) -> list[int]:
    out, pos = [], 0
    while (t := policy.chunk_end(req, pos)) is not None:
        assert t > pos and t % B == 0 and t <= req.num_prompt_tokens
        out.append(t)
        pos = t
    return out


def admitted(policy, req: RequestView, decode: bool = False) -> list[int]:
    return [b for b in range(1, 21) if policy.admit_state(req, b, decode)]


def test_registry() -> None:
    assert set(POLICIES) == {"dense", "prompt_end", "marconi", "default"}
    assert make_admission("dense", every=2).every == 2
    with pytest.raises(ValueError, match="unknown admission"):
        make_admission("nope")


def test_dense_ends_every_nth_boundary_and_admits_all() -> None:
    req = view()
    assert chunk_ends(make_admission("dense"), req) == list(range(100, 1001, 100))
    assert chunk_ends(make_admission("dense", every=3), req) == [300, 600, 900]
    assert chunk_ends(make_admission("dense", every=0), req) == []
    assert admitted(make_admission("dense"), req) == list(range(1, 21))


def test_prompt_end_moves_nothing_keeps_last_aligned_and_decode() -> None:
    p, req = make_admission("prompt_end"), view(junctions=(3,))
    assert chunk_ends(p, req) == []
    assert admitted(p, req) == [10]
    assert admitted(p, req, decode=True) == list(range(1, 21))


def test_marconi_keeps_junctions_and_sequence_end_only() -> None:
    p = make_admission("marconi")
    assert chunk_ends(p, view()) == [] and admitted(p, view()) == [10]
    req = view(junctions=(7, 3, 40))  # 40 lies past the prompt
    assert chunk_ends(p, req) == [300, 700]
    assert admitted(p, req) == [3, 7, 10]
    assert admitted(p, req, decode=True) == list(range(1, 21))


def test_default_period_from_state_to_kv_ratio() -> None:
    p = make_admission("default", state_share=0.5)
    # 300 kB state / (0.5 x 1 kB per token) = 600 tokens = 6 boundaries
    assert p.period_boundaries(view()) == 6
    assert p.period_boundaries(view(state=10)) == 1
    assert make_admission("default", state_share=1.0).period_boundaries(view()) == 3


def test_default_is_neutral_on_a_miss() -> None:
    """No junction and no in-chunk checkpoints: vLLM's chunk ends stay untouched."""
    p = make_admission("default")
    req = view(prompt=5000)
    assert chunk_ends(p, req) == []
    # states vLLM offers by itself: prompt end (50) and the periodic ones (every 6)
    assert admitted(p, req) == [6, 12, 18]
    assert p.admit_state(req, 50, False) and not p.admit_state(req, 49, False)
    assert admitted(p, req, decode=True) == list(range(1, 21))


def test_default_moves_chunk_ends_to_junctions_and_periodic_in_chunk() -> None:
    p = make_admission("default")
    req = view(prompt=1450, junctions=(4,))
    assert chunk_ends(p, req) == [400]
    assert admitted(p, req) == [4, 6, 12, 14, 18]
    in_chunk = view(prompt=1450, junctions=(4,), in_chunk=True)
    assert chunk_ends(p, in_chunk) == [400, 600, 1200]
