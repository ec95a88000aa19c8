"""Deterministic, offline builder of a small random-weight Qwen3-Next model.

Nothing can be downloaded on the machines this project runs on, yet the
connector has to be exercised against a real vLLM engine serving a *hybrid*
(GDN + full attention) model in ``mamba_cache_mode="align"``. This module
builds such a model (config, safetensors weights, byte-level BPE tokenizer,
generation config) from a seed, caches it on disk and hands back the path for
``vllm.LLM(model=path)``.

Build it with::

    python -m kvtier.testing.tiny_model --size tiny   # prints the path

The recipe (see the design note, section 5) is constrained by vLLM's CPU
kernels: GDN head dims must be 128, and the MoE block cannot be dense.
Random weights are rescaled (see :func:`_rescale_weights`) so that greedy
continuations depend on the whole prompt, which is what makes token
comparisons a meaningful test of restored KV / Mamba state.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Bump whenever the produced files change: it is part of the cache directory
# name, so stale builds are never reused.
BUILDER_VERSION = 1

# Special tokens take the lowest ids, so random prompts can avoid them
# without looking at the tokenizer (see make_prompt_token_ids).
PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (
    PAD_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    IM_START_TOKEN,
    IM_END_TOKEN,
)
NUM_SPECIAL_TOKENS = len(SPECIAL_TOKENS)
PAD_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID, IM_START_TOKEN_ID, IM_END_TOKEN_ID = range(
    NUM_SPECIAL_TOKENS
)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

COMPLETE_MARKER = ".kvtier-complete.json"
CACHE_ENV = "KVTIER_MODEL_CACHE"

# The tokenizer corpus does not depend on the model seed: token ids mean the
# same thing for every seed of a size.
_CORPUS_SEED = 20240917


@dataclass(frozen=True)
class ModelSize:
    """Shape of one model variant.

    GDN head dims are fixed at 128 (the only size vLLM's CPU GDN kernel
    accepts). ``linear_num_value_heads`` and the attention KV size decide the
    Mamba page size and hence the block size vLLM picks (384 for both stock
    sizes), so change them with care.
    """

    name: str
    hidden_size: int
    num_hidden_layers: int
    vocab_size: int
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    linear_num_key_heads: int = 1
    linear_num_value_heads: int = 2
    num_experts: int = 4
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 64
    shared_expert_intermediate_size: int = 64
    max_position_embeddings: int = 65536

    def __post_init__(self) -> None:
        if self.num_hidden_layers % 4:
            raise ValueError("num_hidden_layers must be a multiple of 4")
        if self.vocab_size <= NUM_SPECIAL_TOKENS + 256:
            raise ValueError("vocab_size must exceed the byte alphabet and specials")


SIZES: dict[str, ModelSize] = {
    # The design-note recipe: 4 MB, builds in ~6 s; a 2K-token prompt plus
    # 16 tokens takes ~0.2 s cold, ~0.08 s on a prefix hit.
    "tiny": ModelSize(name="tiny", hidden_size=128, num_hidden_layers=4, vocab_size=4096),
    # For TTFT benchmarks: recomputing a prefix must cost seconds (8K tokens:
    # ~7 s cold vs ~0.15 s on a hit, default vLLM CPU settings, 2 cores).
    # 254 MB, builds in ~8 s. Caveat: its greedy tokens change with the
    # engine's OpenMP thread count (bf16 rounding through 12 layers), so only
    # compare its tokens between engines with the same thread settings; the
    # tiny model's tokens did not change.
    "bench": ModelSize(
        name="bench",
        hidden_size=1024,
        num_hidden_layers=12,
        vocab_size=4096,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=512,
        shared_expert_intermediate_size=512,
    ),
}


def default_cache_dir() -> Path:
    """``$KVTIER_MODEL_CACHE`` or ``~/.cache/kvtier/models``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "kvtier" / "models"


def model_dir_name(size: str, seed: int) -> str:
    return f"qwen3next-{size}-s{seed}-v{BUILDER_VERSION}"


def build_model(size: str = "tiny", cache_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Return the directory of the model ``size`` built with ``seed``.

    A finished build (one holding the completion marker) is returned as is.
    Otherwise the model is built in a temporary sibling directory and renamed
    into place with ``os.replace``, so readers never see a partial model and
    concurrent builders (xdist workers, separate processes) are safe; an
    advisory file lock merely keeps them from doing the work twice.
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(SIZES)}")
    spec = SIZES[size]
    parent = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    parent = parent.expanduser().resolve()
    final = parent / model_dir_name(size, seed)
    if _is_complete(final):
        return final
    parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(parent / f".{final.name}.lock"):
        if _is_complete(final):
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            _write_model(spec, seed, tmp)
            _install(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def make_prompt_token_ids(n_tokens: int, seed: int, vocab_size: int) -> list[int]:
    """Deterministic random token ids that are never special tokens.

    Specials occupy ids ``[0, NUM_SPECIAL_TOKENS)`` in every tokenizer this
    module builds, so the ids are drawn from the rest of the vocabulary.
    The ids for ``n`` tokens are a prefix of those for ``m > n`` tokens with
    the same seed: prompts of one seed share prefixes (and prefix-cache hits).
    """
    if n_tokens < 0:
        raise ValueError("n_tokens must be >= 0")
    if vocab_size <= NUM_SPECIAL_TOKENS:
        raise ValueError("vocab_size leaves no regular token ids")
    rng = random.Random(f"kvtier-prompt:{seed}")
    return [rng.randrange(NUM_SPECIAL_TOKENS, vocab_size) for _ in range(n_tokens)]


# --------------------------------------------------------------------------
# build steps


def _is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _install(tmp: Path, final: Path) -> None:
    """Atomically move a finished build into place.

    ``os.replace`` of a directory fails if the target is a non-empty
    directory: then either another builder won (fine) or a foreign,
    unfinished directory sits there, which is moved aside and retried.
    """
    try:
        os.replace(tmp, final)
        return
    except OSError:
        if _is_complete(final):
            return
    stale = Path(tempfile.mkdtemp(prefix=f".{final.name}.stale-", dir=final.parent))
    with contextlib.suppress(FileNotFoundError):
        os.replace(final, stale / "old")
    shutil.rmtree(stale, ignore_errors=True)
    os.replace(tmp, final)


def _write_model(spec: ModelSize, seed: int, out: Path) -> None:
    import torch
    from transformers import GenerationConfig, Qwen3NextConfig, Qwen3NextForCausalLM

    config = Qwen3NextConfig(**_config_kwargs(spec))
    # Build on CPU in fp32 with the global RNG seeded (transformers' init
    # uses it), then rescale with a private generator and cast to bf16.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3NextForCausalLM(config)
        _rescale_weights(model, spec, seed)
    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=[EOS_TOKEN_ID, IM_END_TOKEN_ID],
        pad_token_id=PAD_TOKEN_ID,
    )
    model.save_pretrained(out, safe_serialization=True)
    _build_tokenizer(spec.vocab_size).save_pretrained(out)
    meta = {"builder_version": BUILDER_VERSION, "seed": seed, "size": asdict(spec)}
    (out / COMPLETE_MARKER).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def _config_kwargs(spec: ModelSize) -> dict[str, Any]:
    layer_types = [
        "linear_attention" if (i + 1) % 4 else "full_attention"
        for i in range(spec.num_hidden_layers)
    ]
    return {
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        # Unused: every layer is MoE (decoder_sparse_step 1, no mlp_only_layers).
        "intermediate_size": 2 * spec.moe_intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "layer_types": layer_types,
        "full_attention_interval": 4,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "partial_rotary_factor": 0.25,
        "linear_key_head_dim": 128,
        "linear_value_head_dim": 128,
        "linear_num_key_heads": spec.linear_num_key_heads,
        "linear_num_value_heads": spec.linear_num_value_heads,
        "linear_conv_kernel_dim": 4,
        "num_experts": spec.num_experts,
        "num_experts_per_tok": spec.num_experts_per_tok,
        "moe_intermediate_size": spec.moe_intermediate_size,
        "shared_expert_intermediate_size": spec.shared_expert_intermediate_size,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "max_position_embeddings": spec.max_position_embeddings,
        "initializer_range": 1.0 / math.sqrt(spec.hidden_size),
        "tie_word_embeddings": False,
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "pad_token_id": PAD_TOKEN_ID,
        "torch_dtype": "bfloat16",
    }


# Init knobs, chosen by measuring (HF forward, 2000-token prompts) how often
# the argmax changes when an early block of the prompt changes (want: often)
# versus between bf16 and fp32 (want: rarely).
_EMBED_STD = 1.0  # residual stream starts at unit scale
_LOGIT_STD = 6.0  # std of the logits: big gaps between the top tokens
_A_MIN, _A_MAX = 1e-4, 0.1  # GDN decay rates: memory of hundreds of tokens+
_DT_BIAS = -3.0  # softplus(-3) ~ 0.05: slows the decay further
_QK_NORM_GAIN = 2.0  # attention logits std ~4: peaked, not a flat average
_RESIDUAL_OUT = ("out_proj.weight", "o_proj.weight", "down_proj.weight", "down_proj")


def _rescale_weights(model: Any, spec: ModelSize, seed: int) -> None:
    """Make a random model whose next token depends on the whole prompt.

    With transformers' default init (std 0.02) the mixers add almost nothing
    to the residual stream, GDN heads forget within a few tokens and the
    logits are nearly flat: the continuation is a function of the last token
    only, so a test could not tell a correctly restored cache from garbage,
    and bf16 rounding flips near-tied argmaxes. Hence: unit-scale embeddings
    and ``1/sqrt(fan_in)`` projections (via ``initializer_range``), slowly
    decaying GDN heads (long memory), sharper attention, widely spread
    logits, and special tokens that greedy decoding never picks.
    """
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    hidden = spec.hidden_size
    # Depth-scaled residual writes (as in GPT-2): keeps deeper models from
    # amplifying bf16 rounding into different argmaxes.
    out_gain = math.sqrt(4 / spec.num_hidden_layers)
    with torch.no_grad():
        inner = model.model
        inner.embed_tokens.weight.normal_(0.0, _EMBED_STD, generator=gen)
        lm_head = model.lm_head.weight
        lm_head.normal_(0.0, _LOGIT_STD / math.sqrt(hidden), generator=gen)
        # A zero row gives logit 0, far below the max of thousands of
        # random logits: greedy decoding never stops early on EOS.
        lm_head[:NUM_SPECIAL_TOKENS].zero_()
        for layer in inner.layers:
            gdn = getattr(layer, "linear_attn", None)
            if gdn is not None:
                # Per-token decay is exp(-A * softplus(a + dt_bias)): A
                # log-uniform in [A_MIN, A_MAX] mixes long and short memory.
                n = gdn.A_log.numel()
                u = torch.rand(n, generator=gen)
                gdn.A_log.copy_(math.log(_A_MIN) + u * math.log(_A_MAX / _A_MIN))
                gdn.dt_bias.fill_(_DT_BIAS)
            for name, param in layer.named_parameters():
                if name.endswith(_RESIDUAL_OUT):
                    param.mul_(out_gain)
            attn = getattr(layer, "self_attn", None)
            if attn is not None:
                # RMSNorm weights are (1 + w): raise q/k scale so attention
                # is peaked rather than a uniform average of the prefix.
                attn.q_norm.weight.fill_(_QK_NORM_GAIN - 1.0)
                attn.k_norm.weight.fill_(_QK_NORM_GAIN - 1.0)


# --------------------------------------------------------------------------
# tokenizer

_ONSETS = (
    "", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s",
    "t", "v", "w", "z", "br", "ch", "cl", "dr", "fl", "gr", "pl", "pr", "sh",
    "sk", "sl", "sp", "st", "str", "th", "tr",
)  # fmt: skip
_NUCLEI = ("a", "e", "i", "o", "u", "ai", "ea", "ee", "ia", "io", "oo", "ou", "y")
_CODAS = ("", "", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "nt", "rs", "st", "ck")
_PUNCT = (",", ",", ".", ".", ".", ";", ":", "?", "!", " -")


def _corpus(n_lines: int = 6000) -> Iterator[str]:
    """Seeded pseudo-English: a Zipf-distributed lexicon of syllable words,
    plus numbers, capitals and punctuation, so BPE learns word pieces and
    the byte fallback is exercised. Pure Python RNG: identical everywhere."""
    rng = random.Random(_CORPUS_SEED)
    lexicon: list[str] = []
    seen: set[str] = set()
    while len(lexicon) < 12000:
        word = "".join(
            rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS)
            for _ in range(rng.choice((1, 1, 2, 2, 2, 3, 3, 4)))
        )
        if word not in seen:
            seen.add(word)
            lexicon.append(word)
    weights = [1.0 / (rank + 10) for rank in range(len(lexicon))]
    for _ in range(n_lines):
        words = rng.choices(lexicon, weights, k=rng.randint(6, 30))
        parts: list[str] = []
        for i, word in enumerate(words):
            if i == 0 or parts[-1][-1] in ".?!":
                word = word.capitalize()
            if rng.random() < 0.04:
                word = str(rng.randrange(100000))
            if rng.random() < 0.12:
                word += rng.choice(_PUNCT)
            parts.append(word)
        yield " ".join(parts) + "."


def _build_tokenizer(vocab_size: int) -> Any:
    """Train a byte-level BPE with exactly ``vocab_size`` entries."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(
            f"tokenizer has {tok.get_vocab_size()} entries, wanted {vocab_size}: enlarge the corpus"
        )
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == i, token
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START_TOKEN, IM_END_TOKEN],
        chat_template=CHAT_TEMPLATE,
        model_max_length=max(s.max_position_embeddings for s in SIZES.values()),
    )


# --------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cache-dir", default=None, help=f"default: ${CACHE_ENV} or ~/.cache/kvtier/models"
    )
    args = parser.parse_args(argv)
    print(build_model(args.size, cache_dir=args.cache_dir, seed=args.seed))


if __name__ == "__main__":
    main()
