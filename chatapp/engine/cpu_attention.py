"""SDPA on the CPU for several query tokens over a cache: grouped-query attention without copying keys and values.

A chat's later turns prefill the new message on top of the cache, and a speculative verify runs its drafts
the same way. Those calls carry a mask, and transformers' SDPA then expands each key/value head to every
query head it serves (`repeat_kv`) before attending, because on a GPU SDPA's grouped-query path
(`enable_gqa`) would leave the fast kernels for the math one. On the CPU it is the other way round: 125 new
tokens attending to 1,500 cached ones in SmolLM2-135M's 30 layers took 0.16 s with `enable_gqa` and 0.26 s on
the expanded copies, time that a chat's later turns add to their wait for the first token. So on the CPU,
masked calls with grouped heads take `enable_gqa`; every other call is transformers' own SDPA, unchanged.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward


def sdpa_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' SDPA attention, but with `enable_gqa` for a masked multi-token call on the CPU."""
    groups = getattr(module, "num_key_value_groups", 1)
    if (
        query.device.type != "cpu"
        or attention_mask is None
        or query.shape[2] == 1
        or groups == 1
        or kwargs.get("position_bias") is not None
        or kwargs.get("softcap") is not None
        or kwargs.get("s_aux") is not None
        or key.shape[-1] != value.shape[-1]
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    output = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        enable_gqa=True,
    )
    return output.transpose(1, 2).contiguous(), None


def install() -> None:
    """Make every model in this process that runs "sdpa" use sdpa_forward (idempotent)."""
    AttentionInterface.register("sdpa", sdpa_forward)
