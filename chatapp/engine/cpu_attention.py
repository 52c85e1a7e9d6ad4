"""SDPA on the CPU for grouped-query heads: attend without copying keys and values, and decode without SDPA's
slow single-row path.

Three cases differ from transformers' own SDPA:

- **One new token** (a decode step). SDPA's CPU flash kernel handles each query head's single row on its own,
  and in bf16 that is slow: with 6,000 cached tokens, SmolLM2-135M's 9 heads over 3 key/value heads took
  3.2 ms a layer, 97 ms of a 144 ms step. So the query heads that share a key/value head are handed to SDPA
  as that head's rows: (batch, kv heads, heads per kv head, dim). Each row still attends exactly as before,
  the kernel reads each key once per kv head, and the same call took 0.58 ms. transformers packs the heads
  this way itself (`pack_gqa`) when a decode step has a mask, as a sliding window's does, but takes the slow
  path when there is none, as in every step of an ordinary chat.
- **One new token over a long bf16 cache** (LONG tokens or more). Even packed, SDPA's bf16 kernel read the
  cache at about 5 GB/s on a 2-core AVX512-BF16 EPYC that streams 25-34 GB/s. Where chatapp's C kernel is
  built (decode_kernel), it attends instead, reading the cache at about 18-29 GB/s: at 6k tokens SmolLM2-135M
  decoded at 0.85 of its rate at 100 tokens, against 0.69 with the products below (bench/kernel_ab.py).
  Below LONG it was no faster than SDPA (within 4% up to 300 tokens, 10% ahead at 1,000), so short chats
  keep SDPA and its numerics. Where the kernel isn't built (no compiler, no AVX512-BF16), two bf16 matrix
  products and an fp32 softmax between them, as transformers' eager attention computes, ran at about 10
  GB/s: a 6k-token step went from 17.5 to 22.4 tok/s. Below about 1,000 tokens SDPA's single call is faster
  than the products. Both read the growing layer's whole buffer (kvcache.whole): the kernel its tokens in
  use, the products all of it, masking the room past the tokens. Heads that don't share a key/value head
  (SmolLM2-1.7B, Phi) take this path too, a row each.
- **Several new tokens with a mask** (a later turn's prefill on top of the cache, a speculative verify).
  transformers expands each key/value head to every query head it serves (`repeat_kv`), because on a GPU
  SDPA's grouped-query path (`enable_gqa`) with a mask would leave the fast kernels for the math one. On the
  CPU it is the other way round: 125 new tokens attending to 1,500 cached ones in SmolLM2-135M's 30 layers
  took 0.16 s with `enable_gqa` and 0.26 s on the expanded copies.

And one on a GPU:

- **One new token under torch.compile** (the static path's compiled decode step). transformers packs a decode
  step's heads only when dynamo isn't tracing; in the compiled step it expanded every key/value head to the query
  heads it serves, copying the whole cache each step. On an H200 at 8k tokens of Llama 8B that copy took 1.5 ms of
  a ~7.8 ms step, and attention then read four times the cache (bench/GPU.md). Here the heads are packed under
  compile too, with the step's mask, which every head shares.

Every other call is transformers' own SDPA, unchanged: the GPU's other calls, ungrouped heads, softcaps, position
bias and attention sinks.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from . import decode_kernel, kvcache

#: From this many cached tokens, a bf16 decode step attends by the C kernel (decode_kernel), or where it isn't
#: built by two matrix products (_products), rather than SDPA.
LONG = 1024
#: Devices whose decode steps attend with packed heads under a mask here (the tests add the CPU).
PACKED_UNDER_MASK = ("cuda",)


def sdpa_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' SDPA attention, with grouped heads packed for a decode step and `enable_gqa` for a masked
    multi-token call, on the CPU."""
    groups = getattr(module, "num_key_value_groups", 1)
    if (
        kwargs.get("position_bias") is not None
        or kwargs.get("softcap") is not None
        or kwargs.get("s_aux") is not None
        or key.shape[-1] != value.shape[-1]
    ):
        return _theirs(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    one_mask = attention_mask is None or attention_mask.shape[1] == 1
    if query.shape[2] == 1 and one_mask and query.device.type in PACKED_UNDER_MASK and groups > 1:
        return _packed(query, key, value, attention_mask, dropout, scaling)
    if query.device.type != "cpu":
        return _theirs(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    if query.shape[2] == 1 and attention_mask is None:
        return _decode(query, key, value, dropout, scaling)
    # Under a mask, transformers packs a decode step's heads itself.
    if groups == 1 or query.shape[2] == 1 or attention_mask is None:
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
    if key.shape[2] >= LONG and query.dtype == torch.bfloat16 and not dropout:
        keys, values = _buffer(key), _buffer(value)
        if keys is not None and values is not None:
            scale = dim**-0.5 if scaling is None else scaling
            output = decode_kernel.attend(packed, keys, values, key.shape[2], scale)
            if output is None:
                output = _products(packed, keys, values, key.shape[2], scale)
            return output.reshape(batch, 1, heads, dim), None
    output = torch.nn.functional.scaled_dot_product_attention(packed, key, value, dropout_p=dropout, scale=scaling)
    return output.reshape(batch, 1, heads, dim), None


def _buffer(view: torch.Tensor) -> torch.Tensor | None:
    """The contiguous tensor whose first tokens `view` is: a growing layer's buffer, or the view itself."""
    buffer = kvcache.whole(view)
    return buffer if buffer is not None or not view.is_contiguous() else view


def _packed(query, key, value, attention_mask, dropout, scaling):
    """One query token, its heads packed as _decode packs them, under the mask all heads share: (batch, 1, 1,
    keys) broadcasts over the packed rows, since each is the same token."""
    batch, heads, _, dim = query.shape
    packed = query.reshape(batch, key.shape[1], heads // key.shape[1], dim)
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    output = torch.nn.functional.scaled_dot_product_attention(
        packed, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling
    )
    return output.reshape(batch, 1, heads, dim), None


def _products(packed, keys, values, length: int, scale: float) -> torch.Tensor:
    """Attention as two bf16 matrix products over the cache's whole buffers, masking the room past `length`.

    The products need each key/value head's rows at one stride: a view of the first `length` tokens would be
    copied whole first, so they run over the buffer, and the scores of the room after it are masked.
    """
    batch, kv_heads, rows, dim = packed.shape
    room = keys.shape[2]
    keys = keys.view(batch * kv_heads, room, dim)
    values = values.view(batch * kv_heads, room, dim)
    scores = torch.bmm(packed.reshape(batch * kv_heads, rows, dim), keys.transpose(1, 2)).float().mul_(scale)
    scores[..., length:] = float("-inf")
    weights = scores.softmax(-1).to(values.dtype)
    return torch.bmm(weights, values)


def _theirs(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs):
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


def install() -> None:
    """Make every model in this process that runs "sdpa" use sdpa_forward (idempotent)."""
    AttentionInterface.register("sdpa", sdpa_forward)
