"""Per-model state and KV sizes, derived from the models' public configs.

Bytes are what the tier stores per boundary for the whole model (all TP ranks
together). Recurrent states: GDN keeps a fp32 state of v_heads x k_dim x v_dim
per layer plus a bf16 conv window of (kernel - 1) x channels; Mamba2 keeps a
state of heads x head_dim x state_size in the model dtype (bf16; vLLM's
``mamba_ssm_cache_dtype=auto``) plus its conv window. Attention: K and V of
kv_heads x head_dim per layer and token, bf16.

``block_tokens`` is vLLM's align-mode block (one restorable boundary): the
attention block is grown until one layer's attention page holds one layer's
state, in multiples of 16 tokens, unless measured otherwise (noted).
"""

from __future__ import annotations

from dataclasses import dataclass

BF16, FP32 = 2, 4


@dataclass(frozen=True)
class ModelSpec:
    name: str
    block_tokens: int  # tokens per restorable boundary (align-mode block)
    state_bytes: int  # all recurrent layers' state at one boundary
    kv_bytes_per_token: int  # all attention layers
    source: str = ""

    @property
    def attention_block_bytes(self) -> int:
        return self.block_tokens * self.kv_bytes_per_token

    @property
    def state_share_dense(self) -> float:
        """Fraction of bytes that are states when every boundary keeps one."""
        return self.state_bytes / (self.state_bytes + self.attention_block_bytes)


def gdn_layer_bytes(v_heads: int, k_heads: int, k_dim: int, v_dim: int, kernel: int) -> int:
    conv_channels = 2 * k_heads * k_dim + v_heads * v_dim
    return v_heads * k_dim * v_dim * FP32 + (kernel - 1) * conv_channels * BF16


def mamba2_layer_bytes(heads: int, head_dim: int, state: int, groups: int, kernel: int) -> int:
    conv_channels = heads * head_dim + 2 * groups * state
    return heads * head_dim * state * BF16 + (kernel - 1) * conv_channels * BF16


def kv_token_bytes(layers: int, kv_heads: int, head_dim: int) -> int:
    return layers * 2 * kv_heads * head_dim * BF16


def align_block_tokens(state_layer: int, kv_token_layer: int, align: int = 16) -> int:
    per = align * kv_token_layer
    return align * -(-state_layer // per)


def _qwen3_next() -> ModelSpec:
    # Qwen3-Next-80B-A3B: 48 layers = 36 GDN (32 v / 16 k heads of 128, conv 4)
    # + 12 attention (2 KV heads x 256)
    layer = gdn_layer_bytes(32, 16, 128, 128, 4)
    return ModelSpec("qwen3-next-80b", align_block_tokens(layer, kv_token_bytes(1, 2, 256)),
                     36 * layer, kv_token_bytes(12, 2, 256), "Qwen/Qwen3-Next-80B-A3B config, TP1")


def _nemotron_h() -> ModelSpec:
    # Nemotron-H-56B: 118 layers, 54 Mamba2 (256 heads x 64, state 256, 8 groups, conv 4),
    # 10 attention (8 KV heads x 128), the rest MLP
    layer = mamba2_layer_bytes(256, 64, 256, 8, 4)
    return ModelSpec("nemotron-h-56b", align_block_tokens(layer, kv_token_bytes(1, 8, 128)),
                     54 * layer, kv_token_bytes(10, 8, 128), "nvidia/Nemotron-H-56B-Base-8K config")


def _qwen35() -> ModelSpec:
    # Qwen3.5-35B-A3B: 40 layers = 30 GDN (32 v / 16 k heads of 128, conv 4)
    # + 10 attention (2 KV heads x 256); block 2048 tokens measured at TP2 (design notes section 7)
    layer = gdn_layer_bytes(32, 16, 128, 128, 4)
    return ModelSpec("qwen3.5-35b", 2048, 30 * layer, kv_token_bytes(10, 2, 256),
                     "Qwen/Qwen3.5-35B-A3B config; block measured at TP2")


MODELS: dict[str, ModelSpec] = {m.name: m for m in (_qwen3_next(), _nemotron_h(), _qwen35())}


def get_model(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}") from None
