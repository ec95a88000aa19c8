"""Block copy kernels: Triton on GPUs, torch (the reference) elsewhere."""

from __future__ import annotations

from types import ModuleType

import torch


def for_device(device: torch.device) -> ModuleType:
    """The module whose ``gather``/``scatter`` to use for KV tensors on ``device``."""
    if device.type == "cuda":
        try:
            from kvtier.kernels import triton_copy

            return triton_copy
        except ImportError:  # no Triton: the torch path is always correct
            pass
    from kvtier.kernels import torch_copy

    return torch_copy
