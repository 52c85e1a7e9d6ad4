"""SDPA on the CPU for grouped-query heads: attend without copying keys and values, and decode without SDPA's
slow single-row path.

Two cases differ from transformers' own SDPA:

- **One new token** (a decode step). SDPA's CPU flash kernel handles each query head's single row on its own,
  and in bf16 that is slow: with 6,000 cached tokens, SmolLM2-135M's 9 heads over 3 key/value heads took
  3.2 ms a layer, 97 ms of a 144 ms step. So the query heads that share a key/value head are handed to SDPA
  as that head's rows: (batch, kv heads, heads per kv head, dim). Each row still attends exactly as before,
  the kernel reads each key once per kv head, and the same call took 0.58 ms. transformers packs the heads
  this way itself (`pack_gqa`) when a decode step has a mask, as a sliding window's does, but takes the slow
  path when there is none, as in every step of an ordinary chat.
- **Several new tokens with a mask** (a later turn's prefill on top of the cache, a speculative verify).
  transformers expands each key/value head to every query head it serves (`repeat_kv`), because on a GPU
  SDPA's grouped-query path (`enable_gqa`) with a mask would leave the fast kernels for the math one. On the
  CPU it is the other way round: 125 new tokens attending to 1,500 cached ones in SmolLM2-135M's 30 layers
  took 0.16 s with `enable_gqa` and 0.26 s on the expanded copies.

Every other call is transformers' own SDPA, unchanged: the GPU, ungrouped heads, softcaps, position bias and
attention sinks.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward


def sdpa_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' SDPA attention, with grouped heads packed for a decode step and `enable_gqa` for a masked
    multi-token call, on the CPU."""
    groups = getattr(module, "num_key_value_groups", 1)
    if (
        query.device.type != "cpu"
        or groups == 1
        or kwargs.get("position_bias") is not None
        or kwargs.get("softcap") is not None
        or kwargs.get("s_aux") is not None
        or key.shape[-1] != value.shape[-1]
    ):
        return _theirs(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    if query.shape[2] == 1 and attention_mask is None:
        return _decode(query, key, value, dropout, scaling)
    if query.shape[2] == 1 or attention_mask is None:  # under a mask, transformers packs a decode step's heads
        return _theirs(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
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


def _decode(query, key, value, dropout, scaling):
    """One query token without a mask: the heads that share a key/value head become that head's query rows."""
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    # Query head h reads key/value head h // (heads // kv_heads), as repeat_kv lays them out.
    packed = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    output = torch.nn.functional.scaled_dot_product_attention(packed, key, value, dropout_p=dropout, scale=scaling)
    return output.reshape(batch, 1, heads, dim), None


def _theirs(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs):
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


def install() -> None:
    """Make every model in this process that runs "sdpa" use sdpa_forward (idempotent)."""
    AttentionInterface.register("sdpa", sdpa_forward)
